"""The tables must-show: a 10,000-row Parquet table through `cbgen run --template` into
Parquet, killed with SIGKILL at about half, finished with `--resume`, read back with pyarrow.

    python benchmarks/table_resume_demo.py --workdir /tmp/cbgen-tables
    python benchmarks/table_resume_demo.py --workdir /tmp/cbgen-tables --model /path/to/model  # another model

By default it uses the test suite's tiny random llama (saved into the workdir): the point
is I/O correctness, not text quality. Prints what it checks and exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from make_table import build  # noqa: E402


def _cbgen(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "cbgen.cli", "run", *args]


def _parts_rows(parts: Path) -> int:
    files = sorted(parts.glob("*.parquet")) if parts.exists() else []
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/cbgen-tables")
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--model", help="default: the tiny random llama, saved into the workdir")
    ap.add_argument("--max-new-tokens", default="8")
    ap.add_argument("--kill-at", type=float, default=0.5, help="fraction of rows done when SIGKILL is sent")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src, out = work / "table.parquet", work / "out.parquet"
    n = build(a.rows, str(src))
    print(f"input: {src} ({n} rows)")
    model = a.model
    if model is None:
        model = str(work / "tiny-llama")
        subprocess.run([sys.executable, str(HERE / "make_tiny_model.py"), model], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for p in (out, Path(str(out) + ".parts")):
        subprocess.run(["rm", "-rf", str(p)], check=True)
    args = [str(src), "--template", "{task}: {question}", "--id-column", "id", "-o", str(out),
            "--model", model, "--dtype", "float32", "-n", a.max_new_tokens, "-q", "--row-group-size", "250"]
    print("$ cbgen run " + " ".join(args))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen(_cbgen(args), cwd=REPO, env=env)
    parts = Path(str(out) + ".parts")
    while p.poll() is None and _parts_rows(parts) < a.kill_at * n:
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = _parts_rows(parts)
    print(f"SIGKILL with {done} of {n} rows in {parts} ({len(list(parts.glob('*.parquet')))} parts); "
          f"final file exists: {out.exists()}")
    print("$ cbgen run ... --resume")
    r = subprocess.run(_cbgen([*args, "--resume"]), cwd=REPO, env=env)
    t = pq.read_table(out)
    ids, want = t.column("id").to_pylist(), pq.read_table(src).column("id").to_pylist()
    checks = {
        f"one row per input ({t.num_rows} rows for {n} inputs)": t.num_rows == n,
        "no duplicate ids": len(set(ids)) == len(ids),
        "input order (ids and line numbers)": ids == want and t.column("line").to_pylist() == list(range(1, n + 1)),
        "no error or abort rows": set(t.column("finish_reason").to_pylist()) <= {"stop", "length"},
        "parts directory removed": not parts.exists(),
        "resume exit code 0": r.returncode == 0,
    }
    print(f"{out}: {pq.ParquetFile(out).metadata.num_row_groups} row groups; columns: {', '.join(t.schema.names)}")
    for what, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
