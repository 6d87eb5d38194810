"""How close `cbgen run --dry-run`'s ETA comes to the real run, on one prompt file.

Runs `cbgen run FILE --dry-run ARGS`, then `cbgen run FILE -o OUT ARGS` (each a
fresh process, back to back), and prints the ETA next to the measured times and
the error. Two comparisons:

* generation: the ETA vs the real run's own "generated in Xs" summary;
* total: ETA + the start-up the dry run measured vs the real process's wall time.

The target (issue #15) is within +-30% on the 271 dev prompts, with the defaults
(max_new_tokens 256, natural EOS). Run it on a quiet machine:

    .venv/bin/python benchmarks/dryrun_accuracy.py                      # the 271 dev prompts
    .venv/bin/python benchmarks/dryrun_accuracy.py --limit 8 -- -n 16   # a smoke test, not a measurement

Arguments after ``--`` go to both runs (``--max-num-seqs 64``, ``--model DIR``...).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CBGEN = [sys.executable, "-m", "cbgen.cli", "run"]
DUR = r"(?:(\d+)h)?(\d+)m(\d+)s"
ETA = re.compile(rf"ETA: {DUR} \(range {DUR}-{DUR}\) for generation \+ ([\d.]+)s start-up")
SUMMARY = re.compile(r"generated in ([\d.]+)s")
# The shared dev prompts sit beside the repository (or beside its worktrees' directory).
DEV = next((p for p in (ROOT.parent / "shared", ROOT.parent.parent / "shared") if p.is_dir()), ROOT.parent / "shared")


def _seconds(h: str | None, m: str, s: str) -> float:
    return int(h or 0) * 3600 + int(m) * 60 + int(s)


def _timed(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return proc, time.monotonic() - t0


def _error(estimate: float, real: float) -> str:
    err = (estimate - real) / real
    return f"{err:+.1%} ({'within' if abs(err) <= 0.30 else 'OUTSIDE'} +-30%)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", default=str(DEV / "bench" / "prompts-dev.jsonl"))
    ap.add_argument("--limit", type=int, default=0, help="Use only the first N lines (0 = all).")
    ap.add_argument("extra", nargs="*", help="Arguments for both cbgen runs (after --).")
    args = ap.parse_args()
    lines = Path(args.prompts).read_text(encoding="utf-8").splitlines(keepends=True)
    if args.limit:
        lines = lines[: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "prompts.jsonl", Path(tmp) / "out.jsonl"
        src.write_text("".join(lines), encoding="utf-8")
        dry, dry_wall = _timed([*CBGEN, str(src), "--dry-run", *args.extra])
        m = ETA.search(dry.stdout)
        if dry.returncode not in (0, 1) or m is None:
            print(f"dry run failed (exit {dry.returncode}):\n{dry.stdout}\n{dry.stderr}", file=sys.stderr)
            return 1
        eta, low, high = (_seconds(*m.groups()[i:i + 3]) for i in (0, 3, 6))
        startup = float(m[10])
        real, real_wall = _timed([*CBGEN, str(src), "-o", str(out), "--no-progress", *args.extra])
        s = SUMMARY.search(real.stderr)
        if real.returncode not in (0, 1) or s is None:
            print(f"real run failed (exit {real.returncode}):\n{real.stderr}", file=sys.stderr)
            return 1
        gen = float(s[1])
    print(f"inputs: {len(lines)} lines of {args.prompts} {' '.join(args.extra)}")
    print(dry.stdout.rstrip())
    print(f"dry run took {dry_wall:.1f}s (start-up, checks and probe)")
    print(f"generation: ETA {eta:.0f}s (range {low:.0f}-{high:.0f}s), real {gen:.1f}s: {_error(eta, gen)}")
    print(f"total:      ETA {eta + startup:.0f}s, real wall {real_wall:.1f}s: {_error(eta + startup, real_wall)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
