"""The serving benchmark's tables: capacity and quality per configuration, then each serving run."""

from __future__ import annotations


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def quality_table(q: dict) -> list[str]:
    base = q.get("bf16", {})
    out = ["| config | B/token/layer | bytes x | blocks | tokens x | ppl | Δppl | KL | KL p99 | top-1 | greedy vs bf16 |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, r in q.items():
        if "error" in r or "error" in base or not base:
            out.append(f"| {c} | {r.get('error') or base.get('error', 'no bf16 run')} |")
            continue
        g, bg = r["greedy"], base["greedy"]
        diverge = next((i for i, (a, b) in enumerate(zip(g, bg)) if a != b), None)
        out.append(f"| {c} | {r['bytes_per_token_layer']:.0f} | {base['bytes_per_token_layer'] / r['bytes_per_token_layer']:.3f}"
                   f" | {r['blocks']} | {r['blocks'] / base['blocks']:.3f} | {r['ppl']:.4f}"
                   f" | {100 * (r['ppl'] / base['ppl'] - 1):+.2f}% | {_fmt(r.get('kl'), '.5f')} | {_fmt(r.get('kl_p99'), '.4f')}"
                   f" | {_fmt(r.get('top1_agreement'), '.4f')} | {'identical' if diverge is None else f'differs at {diverge}'}"
                   f" ({len(g)}) |")
    return out


def _repeats(args: dict) -> str:
    n = args.get("repeats", 1)
    return f"; the fastest of {n} runs each, configurations in order then reversed" if n > 1 else ""


def _seconds(r: dict) -> str:
    each = r.get("seconds_each", [])
    return f"{r['seconds']:.1f}" + (f" ({' / '.join(f'{s:.1f}' for s in each)})" if len(each) > 1 else "")


def serve_table(name: str, runs: dict, args: dict) -> list[str]:
    out = ["", f"Serving, {name}: {args['requests']} requests x ({args['prompt']} prompt + {args['output']} output)"
           f" tokens, chunks of {args['serve_chunk']}" + _repeats(args), "",
           "| config | KV MiB | blocks | all fit | requests/s | output tok/s | preemptions | seconds | vs bf16 | vs fp8 |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for c, r in runs.items():
        if "error" in r:
            out.append(f"| {c} | {r['error']} |")
            continue
        rel = [runs.get(k, {}).get("output_tokens_per_s") for k in ("bf16", "fp8")]
        out.append(f"| {c} | {r['kv_mib']} | {r['blocks']} | {'yes' if r['fits'] else 'no'} | {r['requests_per_s']:.3f}"
                   f" | {r['output_tokens_per_s']:.1f} | {_fmt(r['preemptions'], '.0f')} | {_seconds(r)}"
                   + "".join(f" | {r['output_tokens_per_s'] / v:.2f}x" if v else " | —" for v in rel) + " |")
    return out


def render(res: dict) -> str:
    head = (f"`{res['command']}` — {res['date']}, load {res['load_before'][0]:.2f} before,"
            f" {res['load_after'][0]:.2f} after\n")
    lines = quality_table(res["quality"]) if res["quality"] else []
    for name, runs in res["serve"].items():
        lines += serve_table(name, runs, res["args"])
    return head + "\n" + "\n".join(lines) + "\n"
