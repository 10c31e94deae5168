"""The cases of ``tools/fault_catalogue.py``: bad inputs and faults (config, files, models, output
directories, concurrency, network, signals, sweeps, the seed API), each with the exit status, the
words of its one error line and what must (not) be on disk afterwards."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Optional

from conftest import DeadProxy, _random_llama, _save_with_char_tokenizer  # the tests' tiny model
from fault_process import ONE_WINDOW, PLUGIN, REPO, Case, launch, start, umask
from transformers import T5Config


class Catalogue:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.proxy = DeadProxy()
        self.model = _save_with_char_tokenizer(
            _random_llama(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1),
            root / "tiny",
        )
        self.text = root / "text.txt"
        self.text.write_text("The quick brown fox jumps over the lazy dog. " * 3000)  # ~500 windows
        self.n = 0

    # -- helpers ------------------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        self.n += 1
        return self.root / f"{self.n:03d}_{name}"

    def file(self, name: str, content: bytes | str) -> Path:
        p = self.path(name)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        return p

    def tiny(self, overrides, model: bool = True, text: bool = True) -> list[str]:
        """The tiny run's overrides, then ``overrides`` (which replace those of the same key)."""
        base = ([f"model.path={self.model}"] if model else []) + (["data=text_file", f"data.path={self.text}"] if text else [])
        if "task=lm_eval" not in overrides:
            base += ONE_WINDOW
        given = {o.split("=", 1)[0] for o in overrides}
        return [o for o in base if o.split("=", 1)[0] not in given] + list(overrides)

    def eval(self, *overrides: str, run_dir: Path | None = None, **kw) -> list[str]:
        return ["-m", "runners.eval", *self.tiny(overrides, **kw), f"hydra.run.dir={run_dir or self.path('run')}"]

    def sweep(self, name: str, sweep_dir: Path, *overrides: str) -> list[str]:
        return ["-m", "runners.sweep", name, *self.tiny(overrides), f"hydra.sweep.dir={sweep_dir}"]

    def online(self, **extra) -> dict:
        """No offline flag; every request to the dead proxy."""
        p = self.proxy.url
        return {**dict(HF_HUB_OFFLINE=None, HF_DATASETS_OFFLINE=None, TRANSFORMERS_OFFLINE=None, WANDB_MODE=None,
                       HTTPS_PROXY=p, HTTP_PROXY=p, https_proxy=p, http_proxy=p, NO_PROXY=None, no_proxy=None), **extra}

    def seed(self, code: str) -> list[str]:
        """A seed-API snippet; a ConfigError becomes the one error line a script of the user's would print."""
        body = "\n".join("    " + ln for ln in code.strip().splitlines())
        return ["-c", f"import sys, torch\nfrom streamkv import CompressedLlamaForCausalLM, CompressionConfig, ConfigError\n"
                      f"MODEL = {str(self.model)!r}\ntry:\n{body}\nexcept ConfigError as e:\n"
                      f"    print('error:', e, file=sys.stderr); sys.exit(2)\n"]

    # -- the cases ----------------------------------------------------------------------------------------
    def cases(self) -> list[Case]:
        c: list[Case] = []
        add = c.append

        # config: options, keys, types, values (fail before the model loads)
        for overrides, needle in [
            (["model=nope"], "model=nope is not an option of 'model'; choose one of"),
            (["data=nope"], "data=nope is not an option"),
            (["task=nope"], "task=nope is not an option"),
            (["logger=nope"], "logger=nope is not an option"),
            (["quantizer=nope"], "quantizer=nope is not an option"),
            (["+experiment=nope"], "experiment=nope is not an option"),
            (["+ablation=nope"], "ablation=nope is not an option"),
            (["nope=1"], "unknown key 'nope'; valid keys at the top level: ["),
            (["+nonsense_key=1"], "unknown key 'nonsense_key'; valid keys at the top level: ["),
            (["quantizer.nope=1"], "unknown key 'quantizer.nope'; valid keys at quantizer (UniformQuantizer)"),
            (["+quantizer.nope=1"], "unknown key 'quantizer.nope'; valid keys at quantizer"),
            (["+model.nope=1"], "unknown key 'model.nope'; valid keys at model (CausalLM)"),
            (["chunk_size=abc"], "chunk_size"),
            (["seed=abc"], "seed"),
            (["chunk_size=0"], "chunk_size=0 must be >= 1"),
            (["chunk_size=-3"], "chunk_size=-3 must be >= 1"),
            (["chunk_size=64"], "chunk_size=64"),
            (["task.window=1"], "task.window=1 must be >= 2"),
            (["task.max_windows=0"], "task.max_windows=0 must be >= 1"),
            (["task.mode=nope"], "task.mode='nope' is not allowed; choose one of"),
            (["quantizer.key_bits=5"], "quantizer.key_bits=5 is not allowed; choose one of [2, 3, 4, 8]"),
            (["quantizer.value_bits=1"], "quantizer.value_bits=1 is not allowed"),
            (["quantizer.value_group_size=48"], "quantizer.value_group_size=48 does not divide head_dim=64"),
            (["sink.key_bits=5"], "sink.key_bits=5 is not allowed"),
            (["sink.size=-1"], "sink.size=-1 must be >= 0"),
            (["sink.size=256"], "sink.size=256 is not smaller than the longest sequence (256 tokens)"),
            (["outlier.ema_decay=1.5"], "ema_decay=1.5"),
            (["outlier.threshold=0"], "outlier.threshold=0"),
            (["outlier.key_bits=4"], "outlier.key_bits=4 is not allowed"),
            (["model.dtype=float8"], "model.dtype='float8' is not allowed"),
            (["model.device=tpu"], "model.device='tpu' is not allowed"),
            (["task.window=5000"], "task.window=5000 exceeds the model's 1024 positions"),
            (["task=lm_eval", "task.names=[nope_task]"], "task.names: ['nope_task'] not lm-eval tasks"),
            (["task=lm_eval", "task.limit=0"], "task.limit=0 must be >= 1"),
            (["task=lm_eval", "task.passkey_filler=x"], "task.passkey_filler='x' is not allowed"),
            (["task=lm_eval", "task.max_length=5000"], "task.max_length=5000 exceeds the model's 1024 positions"),
            (["task=lm_eval", "task.passkey_length=1020"], "task.passkey_length=1020 plus a 8-token answer exceeds"),
        ]:
            add(Case(f"config {' '.join(overrides)}", self.eval(*overrides), needle=needle))
        add(Case("config runners.sweep nope", ["-m", "runners.sweep", "nope"], needle="no sweep named 'nope'"))
        add(Case("config sweep with an unknown option", self.sweep("ablation", self.path("sweep"), "ablation=nope"),
                 needle="ablation=nope is not an option"))

        # files
        d = self.path("a_directory")
        d.mkdir()
        fifo = self.path("fifo")
        os.mkfifo(fifo)
        for name, path, needle in [
            ("missing", "/no/such/file.txt", "data.path=/no/such/file.txt does not exist"),
            ("a directory", d, "does not exist (or is not a file)"),
            ("a fifo (would block a reader)", fifo, "does not exist (or is not a file)"),
            ("/dev/null", "/dev/null", "does not exist (or is not a file)"),
            ("empty", self.file("empty.txt", ""), "the text is empty"),
            ("whitespace only", self.file("blank.txt", "\n\n  \t\n"), "the text is empty"),
            ("binary", self.file("x.bin", bytes(range(256)) * 64), "is a binary file, not text"),
            ("latin-1", self.file("latin1.txt", "café ".encode("latin-1") * 200), "is not UTF-8 text (byte 0xe9"),
            ("utf-16", self.file("utf16.txt", ("hello world " * 100).encode("utf-16")), "is a binary file"),
            ("shorter than a window", self.file("short.txt", "short text"), "shorter than one window"),
        ]:
            add(Case(f"file {name}", self.eval(f"data.path={path}"), needle=needle))
        add(Case("file data=text_file without data.path", self.eval("data=text_file", text=False),
                 needle="data.path must be set"))
        empty = self.file("empty2.txt", " \n")
        add(Case("file empty text names its path", self.eval(f"data.path={empty}"), needle=f"data.path={empty}: the text is empty"))

        # models
        t5 = self.path("t5")
        T5Config(d_model=8, num_layers=1, num_heads=1, d_ff=8, d_kv=8, vocab_size=32).save_pretrained(t5)
        corrupt, no_weights, no_tokenizer, bad_json = (self.copy_model(n) for n in ("corrupt", "noweights", "notok", "badjson"))
        (corrupt / "model.safetensors").write_bytes(b"\x10" * 100)
        (no_weights / "model.safetensors").unlink()
        for f in no_tokenizer.glob("tokenizer*"):
            f.unlink()
        (bad_json / "config.json").write_text("{not json")
        for name, path, needle in [
            ("missing directory", "/no/such/model", "model.path=/no/such/model is not a model directory"),
            ("a directory without a model", d, "is not a loadable model"),
            ("not a causal LM (T5)", t5, "is not a causal language model"),
            ("corrupt weights", corrupt, "cannot load model from"),
            ("missing weights", no_weights, "cannot load model from"),
            ("missing tokenizer", no_tokenizer, "has no usable tokenizer"),
            ("config.json not JSON", bad_json, "is not a loadable model"),
            ("missing .gguf", "/no/such/model.gguf", "model.path=/no/such/model.gguf does not exist"),
            ("garbage .gguf", self.file("garbage.gguf", b"GGUF" + bytes(200)), "is not a loadable model"),
        ]:
            add(Case(f"model {name}", self.eval(f"model.path={path}"), needle=needle))
        add(Case("model window beyond positions, refused before the corrupt weights load",
                 self.eval(f"model.path={corrupt}", "task.window=5000"), needle="task.window=5000 exceeds"))

        # output directories
        a_file = self.file("file.txt", "a file: no directory can be made under it, even by root")
        for path, needle in [(f"{a_file}/sub", "cannot be written (Not a directory"),
                             ("/proc/self", "hydra.run.dir=/proc/self cannot be written"),
                             ("/sys/kernel/streamkv", "hydra.run.dir=/sys/kernel/streamkv cannot be written")]:
            add(Case(f"output hydra.run.dir={path}", self.eval(run_dir=Path(path)), needle=needle))
        add(Case("output hydra.sweep.dir under a file", self.sweep("chunk", a_file / "sub", "chunk_size=128"),
                 needle=f"hydra.sweep.dir={a_file}/sub cannot be written"))
        for extra in ([], ["force=true"]):
            held = self.path("held")
            before, check = self.results_kept(held)
            add(Case(f"output another config's results are refused {' '.join(extra)}",
                     self.eval("chunk_size=256", *extra, run_dir=held), needle="already holds results.json of another config",
                     before=before, check=check))
        busy = self.path("busy")
        add(Case("concurrency a directory in use by another run", self.eval(run_dir=busy), needle="is in use by another run",
                 run=self.holding_lock(busy)))
        add(Case("concurrency two runs at once, default directories", ["-m", "runners.eval", *self.tiny([])], rc=0,
                 run=self.two_at_once(self.path("cwd"))))

        # network: nothing answers
        wiki = ["data=wikitext2", "data.path=null"]
        add(Case("network hub model id", self.eval("model.path=someorg/somemodel"), env=self.online(),
                 needle="is not a loadable model (offline: ", bound=45))
        add(Case("network hub data set", self.eval(*wiki), env=self.online(), needle="cannot load wikitext", bound=45))
        add(Case("network stock lm-eval task", self.eval("task=lm_eval", "task.names=[hellaswag]"), env=self.online(),
                 needle="lm-eval task 'hellaswag' cannot load its data set", bound=90))
        add(Case("network wandb online with an API key logs offline", self.eval("logger=wandb"), rc=0,
                 env=self.online(WANDB_API_KEY="x" * 40), bound=60))
        add(Case("network a local run makes no request", self.eval(), rc=0, env=self.online(), run=self.counting_requests()))
        add(Case("network HF_DATASETS_OFFLINE=1 respected", self.eval(*wiki), env={"HF_DATASETS_OFFLINE": "1",
                 "HF_HUB_OFFLINE": None}, needle="offline: HF_DATASETS_OFFLINE=1 is set", bound=45))
        add(Case("network HF_HUB_OFFLINE=1 respected", self.eval("model=llama2_7b", model=False),
                 needle="offline: HF_HUB_OFFLINE=1 is set", bound=45))
        add(Case("network WANDB_MODE=offline respected", self.eval("logger=wandb"), rc=0,
                 env=self.online(WANDB_MODE="offline", WANDB_API_KEY="x" * 40), bound=45))

        # signals
        for sig in (signal.SIGINT, signal.SIGTERM):
            run_dir = self.path(f"run_{sig.name}")
            add(Case(f"signal {sig.name} during a run", self.eval("task.max_windows=null", run_dir=run_dir),
                     rc=128 + sig, needle=f"interrupted by {sig.name}", interrupt=(sig, f"{run_dir}/.lock"),
                     check=self.marked_interrupted(run_dir)))
            sweep_dir = self.path(f"sweep_{sig.name}")
            argv = self.sweep("chunk", sweep_dir, "chunk_size=128", "task.max_windows=1,null,2")
            add(Case(f"signal {sig.name} during a sweep", argv, rc=128 + sig, needle=f"interrupted by {sig.name}",
                     interrupt=(sig, f"{sweep_dir}/*task.max_windows=null*/.lock"), check=self.sweep_marked(sweep_dir)))
            add(Case(f"signal ... the re-run completes the {sig.name} sweep", argv, rc=0, bound=300,
                     check=self.sweep_complete(sweep_dir, 3)))

        # sweeps and bugs
        crash = [f"hydra.searchpath=[file://{PLUGIN / 'conf'}]"]
        plugin_env = {"PYTHONPATH": f"{REPO}{os.pathsep}{PLUGIN}"}
        sweep_dir = self.path("sweep_config")
        add(Case("sweep a job with a config error, the others run", self.sweep("chunk", sweep_dir, "chunk_size=64,128"),
                 needle="chunk_size=64", check=self.sweep_complete(sweep_dir, 1)))
        sweep_dir = self.path("sweep_bug")
        add(Case("sweep a job with a bug, the others run", self.sweep("chunk", sweep_dir, "task=crash,perplexity", *crash),
                 rc=1, needle="RuntimeError: boom", env=plugin_env, check=self.sweep_complete(sweep_dir, 1)))
        run_dir = self.path("bug")
        add(Case("bug in a run: one line, traceback in failed.json", self.eval("task=crash", *crash, run_dir=run_dir),
                 rc=1, needle="(the traceback is in", env=plugin_env, check=self.has_traceback(run_dir)))

        # the seed API
        fits = "CompressionConfig(chunk_size=32, quantizer_options=dict(key_group_size=32))"
        for code, needle in [
            ("CompressionConfig(key_bits_normal=5)", "key_bits_normal=5 is not allowed; choose one of [2, 3, 4, 8]"),
            ("CompressionConfig(value_bits_normal=3.5)", "value_bits_normal=3.5 is not allowed"),
            ("CompressionConfig(key_bits_sink_outlier=4)", "key_bits_sink_outlier=4 is not allowed; choose one of [8, 16]"),
            ("CompressionConfig(attention_sink_size=-1)", "attention_sink_size=-1 must be >= 0"),
            ("CompressionConfig(ema_decay=1)", "ema_decay=1 must be in [0, 1)"),
            ("CompressionConfig(outlier_threshold_relative=-1)", "outlier_threshold_relative=-1"),
            ("CompressionConfig(chunk_size=0)", "chunk_size=0 must be >= 1"),
            ("CompressionConfig(quantizer_options={'nope': 1})", "unknown key 'quantizer.nope'"),
            (f"m = CompressedLlamaForCausalLM.from_pretrained(MODEL, compression_config={fits})\n"
             "m.generate(input_ids=torch.zeros(1, 0, dtype=torch.long))", "the prompt is empty"),
            (f"m = CompressedLlamaForCausalLM.from_pretrained(MODEL, compression_config={fits})\n"
             "m.generate(torch.ones(1, 1100, dtype=torch.long), max_new_tokens=2)", "1102 > the model's 1024 positions"),
            (f"m = CompressedLlamaForCausalLM.from_pretrained(MODEL, compression_config={fits})\n"
             "m.get_compression_stats()", "no generation has run yet"),
        ]:
            add(Case(f"seed {code.splitlines()[-1]}", self.seed(code), needle=needle))
        add(Case("seed from_pretrained of a hub id, nothing answers",
                 self.seed("try:\n    CompressedLlamaForCausalLM.from_pretrained('someorg/somemodel')\n"
                           "except OSError as e:\n    raise ConfigError(str(e).splitlines()[0])"),
                 env=self.online(), needle="couldn't connect to 'https://huggingface.co'", bound=45))
        return c

    def copy_model(self, name: str) -> Path:
        return Path(shutil.copytree(self.model, self.path(name)))

    # -- custom runs and checks ---------------------------------------------------------------------------
    def results_kept(self, run_dir: Path):
        """(before, check): ``run_dir`` holds a finished run first; afterwards its results.json is byte-identical."""
        kept = {}

        def before() -> None:
            rc, err, _ = launch(self.eval(run_dir=run_dir), {})
            assert rc == 0, err[-2000:]
            kept["bytes"] = (run_dir / "results.json").read_bytes()

        def check() -> Optional[str]:
            if (run_dir / "results.json").read_bytes() != kept["bytes"]:
                return "results.json changed"
            return "a failed.json was written into another run's directory" if (run_dir / "failed.json").exists() else None

        return before, check

    def holding_lock(self, run_dir: Path):
        def run(case: Case):
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / ".lock", "w") as held:
                fcntl.flock(held, fcntl.LOCK_EX)
                return launch(case.argv, case.env)

        return run

    def two_at_once(self, cwd: Path):
        def run(case: Case):
            cwd.mkdir()
            t0 = time.monotonic()
            procs = [start(case.argv, case.env, cwd=cwd) for _ in range(2)]
            outs = [p.communicate(timeout=300) for p in procs]
            results = list(cwd.glob("outputs/runs/*/*/results.json"))
            modes = {oct(r.stat().st_mode & 0o777) for r in results}
            rc, err = max(p.returncode for p in procs), "".join(o[1] for o in outs)
            if len(results) != 2 or modes != {oct(0o666 & ~umask())}:
                rc, err = 3, err + f"\nerror: {len(results)} results.json, modes {modes}"
            return rc, err, time.monotonic() - t0

        return run

    def counting_requests(self):
        def run(case: Case):
            before = self.proxy.accepted
            rc, err, secs = launch(case.argv, case.env)
            if self.proxy.accepted != before:
                err += f"\nerror: {self.proxy.accepted - before} connections to the proxy"
                rc = 3
            return rc, err, secs

        return run

    @staticmethod
    def marked_interrupted(run_dir: Path):
        def check() -> Optional[str]:
            f = run_dir / "failed.json"
            if not f.is_file() or json.loads(f.read_text()).get("reason") != "interrupted":
                return "no failed.json saying interrupted"
            return "results.json written" if (run_dir / "results.json").exists() else None

        return check

    @staticmethod
    def sweep_marked(sweep_dir: Path):
        def check() -> Optional[str]:
            (long,) = sweep_dir.glob("*task.max_windows=null*")
            (first,) = sweep_dir.glob("*task.max_windows=1,*")
            if not (first / "results.json").is_file():
                return "the finished job lost its results"
            return Catalogue.marked_interrupted(long)()

        return check

    @staticmethod
    def sweep_complete(sweep_dir: Path, n: int):
        def check() -> Optional[str]:
            done = list(sweep_dir.glob("*/results.json"))
            return None if len(done) == n else f"{len(done)} of {n} jobs have results"

        return check

    @staticmethod
    def has_traceback(run_dir: Path):
        def check() -> Optional[str]:
            info = json.loads((run_dir / "failed.json").read_text())
            return None if info["reason"] == "error" and "Traceback" in info["traceback"] else "no traceback in failed.json"

        return check
