"""Peak memory of a GGUF conversion, against its bound, and the time of the next (cached) load.

    python benchmarks/convert_memory.py MODEL.gguf [--dtype float32|bfloat16|auto] [--keep DIR]

1. Converts MODEL.gguf in a fresh subprocess with an empty cache dir (``CBGEN_CACHE``), sampling its
   peak RSS (``VmHWM`` from /proc/PID/status, the kernel's own high-water mark, read every 50 ms and
   once more just before exit) and reports the final weights' size, the peak, the bound
   (final weights + 1 GB, issue #12) and pass/fail.
2. Times a second load (``load_model`` in another fresh process, the conversion now cached) and
   reports it against the 3 s target. Interpreter start-up and cbgen's own imports are not
   included; importing torch and transformers' tokenizer is (``load_model`` imports them lazily,
   so a fresh process pays for them inside it), and is reported as its own part: the imports
   first, timed alone, then ``load_model`` (the figure is their sum).

Run it on an idle machine (it waits for /tmp/bench/LOCK to go away first).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOUND_EXTRA = 1e9  # bytes over the final weights (issue #12)
LOAD_TARGET_S = 3.0

_CONVERT = """
import os, sys, torch
from pathlib import Path
from cbgen.config import ModelConfig
from cbgen.models import resolve_model
from cbgen.models.gguf import ensure_converted
from cbgen.models.load import pick_device, pick_dtype
cfg = ModelConfig(model=sys.argv[1], dtype=sys.argv[2], device="cpu")
res = resolve_model(cfg.model, cache_dir=cfg.cache_dir)
dtype, _ = pick_dtype(cfg.dtype, pick_device(cfg.device))
dest, _ = ensure_converted(res.path, dtype, cfg.cache_dir, status=lambda m: print(m, file=sys.stderr))
status = Path("/proc/self/status").read_text()
hwm = next(int(l.split()[1]) * 1024 for l in status.splitlines() if l.startswith("VmHWM:"))
print(dest, hwm)
"""

_LOAD = """
import sys, time
from cbgen.config import ModelConfig
from cbgen.models import load_model
t0 = time.perf_counter()
import torch                                    # what load_model would import first
from transformers import TokenizersBackend      # the native path's tokenizer for llama dirs
t1 = time.perf_counter()
m = load_model(ModelConfig(model=sys.argv[1], dtype=sys.argv[2], device="cpu"))
assert not m.converted, "the conversion was not cached"
print(t1 - t0, time.perf_counter() - t1, m.native, m.path)
"""


def _hwm(pid: int) -> int:
    """VmHWM of ``pid`` in bytes, 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _env(cache: Path) -> dict:
    """The subprocesses' environment; they also run in REPO, because ``python -c`` puts the
    working directory first on sys.path (run from another checkout, it would measure that one)."""
    return {**os.environ, "CBGEN_CACHE": str(cache), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def convert(gguf: Path, dtype: str, cache: Path) -> tuple[Path, int, float]:
    """(converted dir, peak RSS bytes, seconds) of a conversion in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CONVERT, str(gguf), dtype], env=_env(cache), cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _hwm(proc.pid))
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode != 0:
        sys.exit(f"conversion failed (exit {proc.returncode})")
    dest, own_hwm = out.split()
    return Path(dest), max(peak, int(own_hwm)), time.perf_counter() - t0


def load_seconds(gguf: Path, dtype: str, cache: Path) -> tuple[float, float, str]:
    """(seconds importing torch + transformers' tokenizer, seconds in load_model after them, impl)."""
    out = subprocess.run([sys.executable, "-c", _LOAD, str(gguf), dtype], env=_env(cache), cwd=REPO, check=True,
                         stdout=subprocess.PIPE, text=True).stdout.split()
    return float(out[0]), float(out[1]), "native" if out[2] == "True" else "transformers"


def weights_bytes(dest: Path) -> int:
    return sum(f.stat().st_size for f in dest.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--dtype", default="auto", help="as cbgen's --dtype (default auto)")
    parser.add_argument("--keep", type=Path, help="use this cache dir and keep it (default: a temp dir, removed)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    args = parser.parse_args()
    while os.path.exists("/tmp/bench/LOCK"):
        time.sleep(20)
    with tempfile.TemporaryDirectory(prefix="cbgen-convmem-") as tmp:
        cache = args.keep or Path(tmp)
        if cache.exists() and any(cache.iterdir()):
            sys.exit(f"{cache} is not empty: the conversion must start from an empty cache")
        dest, peak, seconds = convert(args.gguf.resolve(), args.dtype, cache)
        final = weights_bytes(dest)
        bound = final + BOUND_EXTRA
        imports_s, after_s, impl = load_seconds(args.gguf.resolve(), args.dtype, cache)
        load_s = imports_s + after_s
    result = {"gguf": str(args.gguf), "gguf_bytes": args.gguf.stat().st_size, "dtype": dest.name.split("-")[-2],
              "convert_seconds": round(seconds, 1), "final_weights_bytes": final, "peak_rss_bytes": peak,
              "bound_bytes": bound, "memory_ok": peak <= bound, "second_load_seconds": round(load_s, 2),
              "second_load_imports_seconds": round(imports_s, 2),
              "second_load_after_imports_seconds": round(after_s, 2),
              "load_impl": impl, "load_target_seconds": LOAD_TARGET_S, "load_ok": load_s <= LOAD_TARGET_S}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.gguf.name} ({result['gguf_bytes'] / 1e9:.2f} GB) -> {result['dtype']}, converted in {seconds:.0f} s")
    print(f"final weights {final / 1e9:.2f} GB; peak RSS {peak / 1e9:.2f} GB; bound {bound / 1e9:.2f} GB "
          f"(final + 1 GB): {'PASS' if peak <= bound else 'FAIL'}")
    print(f"second load ({impl}): {load_s:.2f} s = {imports_s:.2f} s importing torch and transformers' "
          f"tokenizer + {after_s:.2f} s in load_model; target {LOAD_TARGET_S:.0f} s: "
          f"{'PASS' if load_s <= LOAD_TARGET_S else 'FAIL'}")


if __name__ == "__main__":
    main()
