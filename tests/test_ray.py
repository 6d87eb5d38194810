"""`cbgen run --ray` on one local Ray instance (2 CPUs) with the tiny model: same records as a
plain run, worker deaths, all workers lost, the driver killed, Ctrl-C, a closed stdout.

One Ray instance serves the whole module (starting one costs seconds); in-process runs
reuse it, and subprocess drivers join it through RAY_ADDRESS, as on a cluster.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from cbgen.cli import app
from cbgen.config import EngineConfig, ModelConfig, SamplingParams

ray = pytest.importorskip("ray")

from cbgen.frontends.ray_pool import PoolOptions, RayPool  # noqa: E402
from cbgen.frontends.run import BatchRun, RunOptions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CBGEN = [sys.executable, "-m", "cbgen.cli", "run"]
TWO_WORKERS = ["--ray", "--workers", "2", "--cpus-per-worker", "1"]
ONE_WORKER = ["--ray", "--workers", "1", "--cpus-per-worker", "1"]  # where two add start-up time, not coverage


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray instance with 2 CPUs (workers inherit this process's PYTHONPATH)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def base_args(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--dtype", "float32", "-q"]


def _records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _comparable(rec: dict) -> dict:
    """All but wall times and prefix-cache hits (each worker has its own cache, filled in its own order)."""
    out = {k: v for k, v in rec.items() if k != "timings"}
    if out.get("usage"):
        out["usage"] = {k: v for k, v in out["usage"].items() if k != "cached_tokens"}
    return out


def _write(tmp_path, name, lines) -> str:
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(p)


def _run(args):
    return CliRunner().invoke(app, ["run", *args], catch_exceptions=False)


def _counting(n: int, tokens: int) -> list[str]:
    return [json.dumps({"id": f"r{i}", "prompt": f"count {i}", "max_new_tokens": tokens, "ignore_eos": True})
            for i in range(n)]


def test_same_records_as_a_single_process_run_in_input_order(tmp_path, ray_address, base_args):
    lines = [
        "Tell me a story about a fox",
        json.dumps({"id": "p1", "prompt": "Once upon a time", "max_new_tokens": 5}),
        json.dumps({"id": "m1", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.8, "seed": 3}),
        json.dumps({"custom_id": "o1", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}}),
        json.dumps({"id": "bad", "prompt": "x", "temperature": -1}),
        json.dumps({"id": "long", "prompt": "word " * 3000}),   # refused by the engine: over the context
        json.dumps({"id": "n2", "prompt": "The sea", "n": 2, "temperature": 1.0, "seed": 7}),
    ] + [json.dumps({"id": f"g{i}", "prompt": f"The capital of France {i}", "max_new_tokens": 6 + i})
         for i in range(12)]
    src = _write(tmp_path, "in.jsonl", lines)
    args = [src, "--max-new-tokens", "8", "--order", "input", "--max-num-seqs", "4", *base_args]
    local = _run([*args, "--threads", "1"])  # a worker has one thread: same float sums
    over_ray = _run([*args, *TWO_WORKERS])
    assert local.exit_code == over_ray.exit_code == 1  # the bad and the too-long line
    want, got = _records(local.stdout), _records(over_ray.stdout)
    assert [r["id"] for r in got] == [r["id"] for r in want]  # one record per input, input order
    assert [_comparable(r) for r in got] == [_comparable(r) for r in want]
    errors = {r["id"]: r["error"] for r in got if r["error"]}
    assert set(errors) == {"bad", "long"} and "context length" in errors["long"]


def _pool(model_dir, workers: int = 2, max_num_seqs: int = 4) -> RayPool:
    return RayPool(ModelConfig(model=str(model_dir), dtype="float32"), EngineConfig(max_num_seqs=max_num_seqs),
                   PoolOptions(workers=workers, cpus_per_worker=1)).connect()


def _batch_run(pool, src, out, err_stream, resume=False) -> int:
    from cbgen.models import load_model
    tok = load_model(ModelConfig(model=str(Path(pool.model_cfg.model)), dtype="float32")).tokenizer
    opts = RunOptions(inputs=[src], output=str(out), order="input", resume=resume,
                      defaults=SamplingParams(max_new_tokens=8), quiet=True, progress=False, model_name="tiny")
    err = Console(file=err_stream, width=200)
    return BatchRun(None, tok, opts, err, backend=pool).run()


def _kill_when(pool, index: int, done_at_least: int, timeout: float = 120) -> threading.Thread:
    """Kill worker ``index`` once ``done_at_least`` requests are done and it holds some in flight."""
    def watch():
        deadline = time.time() + timeout
        while time.time() < deadline:
            w = pool.workers[index]
            if sum(x.done for x in pool.workers) >= done_at_least and w.in_flight:
                ray.kill(w.actor)
                return
            time.sleep(0.01)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_killed_worker_requeues_every_request_exactly_once(tmp_path, ray_address, tiny_model_dir):
    ids = [f"r{i}" for i in range(40)]
    src = _write(tmp_path, "in.jsonl", _counting(40, 24))
    out = tmp_path / "out.jsonl"
    err = io.StringIO()
    pool = _pool(tiny_model_dir)
    try:
        killer = _kill_when(pool, 0, done_at_least=4)
        code = _batch_run(pool, src, out, err)
        killer.join()
        view = Console(record=True, width=120)
        view.print(pool.progress_view().render())
    finally:
        pool.close()
    assert code == 0, err.getvalue()
    recs = _records(out.read_text())
    assert [r["id"] for r in recs] == ids  # each exactly once, in input order
    assert all(r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 24 for r in recs)
    assert "Ray worker w0" in err.getvalue() and "died" in err.getvalue() and "re-queued" in err.getvalue()
    assert not pool.workers[0].alive and pool.workers[1].alive
    shown = view.export_text()
    assert "w0" in shown and "dead" in shown and "w1" in shown and "ok" in shown


def test_all_workers_lost_keeps_written_records_and_resume_finishes(tmp_path, ray_address, tiny_model_dir):
    ids = [f"r{i}" for i in range(30)]
    src = _write(tmp_path, "in.jsonl", _counting(30, 24))
    out = tmp_path / "out.jsonl"
    err = io.StringIO()
    pool = _pool(tiny_model_dir, workers=1)
    try:
        _kill_when(pool, 0, done_at_least=3)
        code = _batch_run(pool, src, out, err)
    finally:
        pool.close()
    assert code == 1
    assert "all 1 Ray workers died" in err.getvalue() and "--resume" in err.getvalue()
    first = [r["id"] for r in _records(out.read_text())]
    assert 3 <= len(first) < 30 and len(set(first)) == len(first)
    pool = _pool(tiny_model_dir, workers=1)
    try:
        assert _batch_run(pool, src, out, io.StringIO(), resume=True) == 0
    finally:
        pool.close()
    got = [r["id"] for r in _records(out.read_text())]
    assert sorted(got) == sorted(ids) and len(got) == len(ids)


def test_a_worker_that_cannot_load_fails_the_run_at_start(tmp_path, ray_address):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    pool = RayPool(ModelConfig(model=str(bad)), EngineConfig(), PoolOptions(workers=1, cpus_per_worker=1))
    try:
        with pytest.raises(Exception) as e:
            pool.connect()
    finally:
        pool.close()
    assert "Ray worker w0 cannot start" in str(e.value) and str(bad) in str(e.value)


def _popen(args, ray_address, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_ADDRESS=ray_address)
    return subprocess.Popen([*CBGEN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=REPO, **kw)


def test_resume_after_the_driver_is_killed(tmp_path, ray_address, base_args):
    ids = [f"r{i}" for i in range(40)]
    src = _write(tmp_path, "in.jsonl", _counting(40, 32))
    out = tmp_path / "out.jsonl"
    p = _popen([src, "-o", str(out), "--max-num-seqs", "4", *TWO_WORKERS, *base_args], ray_address)
    deadline = time.time() + 180
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 5):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert 5 <= out.read_text().count("\n") < 40, "killed mid-run"
    r = _run([src, "-o", str(out), "--resume", "--max-num-seqs", "4", *ONE_WORKER, *base_args])
    assert r.exit_code == 0, r.stderr
    got = [rec["id"] for rec in _records(out.read_text())]
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))


def test_ctrl_c_twice_and_closed_stdout(tmp_path, ray_address, base_args):
    lines = [json.dumps({"id": "quick", "prompt": "x", "max_new_tokens": 1})]
    lines += [json.dumps({"id": f"c{i}", "prompt": "x", "max_new_tokens": 3000, "ignore_eos": True})
              for i in range(6)]
    src = _write(tmp_path, "c.jsonl", lines)
    # max-num-seqs 1: each worker runs one, the others wait in the driver or a worker's queue.
    p = _popen([src, "--max-num-seqs", "1", "--order", "finish", *TWO_WORKERS, *base_args[:-1]], ray_address)
    first = json.loads(p.stdout.readline())
    assert first["id"] == "quick"
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    err = err.decode()
    recs = _records(out.decode())
    assert "stopping" in err and "aborting" in err and "Traceback" not in err, err
    # Started ones end with partial text (or, on a fast CPU, reached the tiny model's 2,048-token
    # context between the two Ctrl-Cs); the rest get no record, for --resume.
    assert any(r["finish_reason"] == "abort" for r in recs)
    assert all(r["finish_reason"] in ("abort", "length") and r["usage"]["completion_tokens"] > 0 for r in recs)
    assert f"{6 - len(recs)} inputs never started" in err

    src = _write(tmp_path, "h.jsonl", [json.dumps({"prompt": "x", "max_new_tokens": 30}) for _ in range(30)])
    cmd = (f"RAY_ADDRESS={ray_address} {sys.executable} -m cbgen.cli run {src} {' '.join(base_args)} "
           f"{' '.join(ONE_WORKER)} --max-num-seqs 2 | head -1")
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert len(r.stdout.splitlines()) == 1
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_without_ray_the_flag_names_the_extra(monkeypatch, base_args, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    src = _write(tmp_path, "in.txt", ["hi"])
    r = _run([src, "--ray", *base_args])
    assert r.exit_code == 2 and "cbgen[ray]" in r.stderr and len(r.stderr.strip().splitlines()) == 1
