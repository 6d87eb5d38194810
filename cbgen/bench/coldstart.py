"""Cold start: ``echo hi | cbgen run - --max-new-tokens 1`` to its first stdout byte.

With one new token the record is written as soon as the first token exists,
so time-to-first-byte is process start + imports + model load from the cache
+ engine setup + prefill. The model must already be converted (cache hit);
the OS page cache is warm after the first repeat, so ``runs[0]`` is the
coldest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .measure import percentile


def _cbgen_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("cbgen")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("cbgen")
    return [found] if found else [sys.executable, "-m", "cbgen.cli"]


def _time_to_first_byte(cmd: list[str], stdin: bytes, env: dict) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env)
    proc.stdin.write(stdin)
    proc.stdin.close()
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - t0
    proc.stdout.read()
    code = proc.wait()
    if not first:
        raise RuntimeError(f"{' '.join(cmd)} wrote nothing to stdout (exit {code})")
    return t_first, time.perf_counter() - t0, code


def run_args(model: str | None, dtype: str, threads: int | None) -> list[str]:
    """The measured command's arguments: ``cbgen run -`` for one token on the bench's model."""
    args = ["run", "-", "--max-new-tokens", "1"]
    if model:
        args += ["--model", model]
    if dtype != "auto":
        args += ["--dtype", dtype]
    if threads:
        args += ["--threads", str(threads)]
    return args


def import_breakdown(env: dict, args: list[str], min_ms: float = 100.0, max_depth: int = 5) -> list[dict]:
    """``python -X importtime`` of the same command: imports of at least ``min_ms`` (cumulative)
    down to ``max_depth`` levels of nesting (0 = imported by cbgen's own code)."""
    cmd = [sys.executable, "-X", "importtime", "-m", "cbgen.cli", *args]
    proc = subprocess.run(cmd, input=b"hi\n", capture_output=True, env=env, timeout=300)
    rows = []
    for line in proc.stderr.decode(errors="replace").splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if not m:
            continue
        depth = (len(m.group(3)) - 1) // 2
        if depth <= max_depth and int(m.group(2)) >= min_ms * 1000:
            rows.append({"module": m.group(4), "depth": depth, "self_ms": int(m.group(1)) / 1000,
                         "cumulative_ms": int(m.group(2)) / 1000})
    rows.sort(key=lambda r: -r["cumulative_ms"])
    return rows


_PHASES = """
import json, sys, time
t0 = time.perf_counter()
import cbgen.cli
t1 = time.perf_counter()
import cbgen.frontends.run
t2 = time.perf_counter()
from cbgen.config import EngineConfig, ModelConfig, SamplingParams
from cbgen.models import load_model
model, dtype, threads = json.loads(sys.argv[1])
loaded = load_model(ModelConfig(model=model, dtype=dtype, threads=threads))
t3 = time.perf_counter()
from cbgen.engine.engine import Engine
from cbgen.frontends.prompting import encode
engine = Engine.from_loaded(loaded, EngineConfig())
import gc; gc.freeze()   # as cbgen run does
t4 = time.perf_counter()
engine.generate([encode(loaded.tokenizer, prompt="hi")], SamplingParams(max_new_tokens=1))
t5 = time.perf_counter()
engine.generate([encode(loaded.tokenizer, prompt="hi again")], SamplingParams(max_new_tokens=1))
t6 = time.perf_counter()
r = lambda x: round(x, 3)
print(json.dumps({"import_cli_s": r(t1 - t0), "import_engine_torch_transformers_s": r(t2 - t1),
                  "load_model_s": r(t3 - t2), "engine_init_s": r(t4 - t3), "first_prefill_s": r(t5 - t4),
                  "second_prefill_s": r(t6 - t5), "total_s": r(t5 - t0)}))
"""


def phase_breakdown(env: dict, model: str | None, dtype: str, threads: int | None) -> dict:
    """The same path as ``cbgen run``, timed phase by phase in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-c", _PHASES, json.dumps([model, dtype, threads])],
                          capture_output=True, env=env, timeout=300)
    try:
        return json.loads(proc.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": proc.stderr.decode(errors="replace")[-500:]}


def cold_start(repeats: int = 3, target_s: float = 3.0, model: str | None = None, dtype: str = "auto",
               threads: int | None = None) -> dict:
    args = run_args(model, dtype, threads)
    cmd = _cbgen_cmd() + args
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    runs = [_time_to_first_byte(cmd, b"hi\n", env) for _ in range(repeats)]
    firsts = [r[0] for r in runs]
    out = {"command": "echo hi | " + " ".join(["cbgen"] + cmd[len(_cbgen_cmd()):]),
           "first_byte_s": [round(t, 3) for t in firsts], "exit_s": [round(r[1], 3) for r in runs],
           "exit_codes": [r[2] for r in runs], "first_byte_p50_s": round(percentile(firsts, 50), 3),
           "first_byte_min_s": round(min(firsts), 3), "target_s": target_s}
    out["holds"] = out["first_byte_p50_s"] < target_s
    if not out["holds"]:
        out["phases"] = phase_breakdown(env, model, dtype, threads)
        out["import_breakdown"] = import_breakdown(env, args)
    return out
