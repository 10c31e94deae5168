"""Run a catalogue of bad inputs and faults through the runners and check that each ends cleanly.

    python tools/fault_catalogue.py              # every case (19 minutes measured on 2 busy CPU cores)
    python tools/fault_catalogue.py signal net   # only the cases whose name contains one of these words
    python tools/fault_catalogue.py --list

A case ends cleanly when its exit status is the expected one, stderr holds no traceback and, for a
failure, ends with exactly one ``error:`` line containing the expected words, the case takes less
than its time bound (a hang fails), and what it leaves on disk passes the case's own check (nothing
lost, nothing written where it must not be). Every case runs in a fresh process, on a tiny random
Llama (head_dim 64, one character per token) built in a temporary directory, with the offline flags
set, except the network cases: these unset them and send every request to a loopback proxy that
accepts connections and never answers. The README's "Failure behaviour" table lists the classes.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]
from fault_cases import Catalogue  # noqa: E402  (tools/: the cases themselves)
from fault_process import Case, launch  # noqa: E402


def verdict(case: Case, rc: int, err: str, secs: float) -> Optional[str]:
    """None when the case ended cleanly, else what was wrong."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if "Traceback" in err:
        return "a traceback"
    if rc != case.rc:
        return f"exit {rc}, expected {case.rc}: {lines[-1] if lines else ''}"
    if secs > case.bound:
        return f"took {secs:.0f} s > {case.bound:g} s"
    if case.rc != 0:
        errors = [ln for ln in lines if ln.startswith("error: ")]
        if len(errors) != 1 or lines[-1] != errors[0]:
            return f"{len(errors)} error lines, last line: {lines[-1] if lines else ''}"
        if case.needle not in errors[0]:
            return f"{errors[0]!r} lacks {case.needle!r}"
    return case.check() if case.check else None


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="streamkv-faults-") as tmp:
        catalogue = Catalogue(Path(tmp))
        words = [a for a in argv if a != "--list"]
        cases = [c for c in catalogue.cases() if not words or any(w in c.name for w in words)]
        if "--list" in argv:
            print("\n".join(c.name for c in cases))
            return 0
        clean = 0
        for i, case in enumerate(cases, 1):
            if case.before:
                case.before()
            rc, err, secs = case.run(case) if case.run else launch(case.argv, case.env, case.interrupt, case.bound + 60)
            problem = verdict(case, rc, err, secs)
            clean += problem is None
            last = next((ln for ln in reversed(err.splitlines()) if ln.startswith("error: ")), "")
            print(f"{'ok  ' if problem is None else 'FAIL'} {i:3d} {case.name} [exit {rc}, {secs:.1f} s] "
                  f"{problem or last}"[:300], flush=True)
        catalogue.proxy.close()
        print(f"{clean} of {len(cases)} cases ended cleanly")
        return 0 if clean == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
