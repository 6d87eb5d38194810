"""EngineWorker, the engine inside a Ray actor, used directly (no Ray): whole requests per
report, refusals as data, and no request escaping an abort_all."""

from __future__ import annotations

import time

import pytest

from cbgen.config import EngineConfig, ModelConfig, SamplingParams
from cbgen.frontends.ray_worker import EngineWorker, WorkItem


@pytest.fixture
def worker(tiny_model_dir):
    w = EngineWorker()
    info = w.load(ModelConfig(model=str(tiny_model_dir), dtype="float32", threads=1), EngineConfig(max_num_seqs=4))
    assert info.threads == 1 and info.node and info.model_name == tiny_model_dir.name
    yield w
    w.shutdown()


def _until(worker, want: int, timeout: float = 60):
    finished, rejected, deadline = [], [], time.time() + timeout
    while len(finished) + len(rejected) < want and time.time() < deadline:
        rep = worker.poll(0.05)
        finished += rep.finished
        rejected += rep.rejected
    return finished, rejected, rep


def test_reports_whole_requests_and_refusals(worker):
    worker.submit([
        WorkItem("a", [5, 6, 7], SamplingParams(max_new_tokens=4), {"line": 1}),
        WorkItem("n3", [5, 6], SamplingParams(max_new_tokens=6, n=3, temperature=1.0, seed=1), {"line": 2}),
        WorkItem("huge", [5] * 5000, SamplingParams(), {"line": 3}),   # past the tiny model's context
    ])
    finished, rejected, rep = _until(worker, 3)
    by_id = {outs[0].request_id: outs for outs in finished}
    assert sorted(by_id) == ["a", "n3"]
    assert sorted(o.index for o in by_id["n3"]) == [0, 1, 2]  # all samples in one report
    assert all(o.finished for outs in finished for o in outs) and by_id["a"][0].extra == {"line": 1}
    assert [rid for rid, _ in rejected] == ["huge"] and "context length" in rejected[0][1]
    assert rep.num_live == 0 and rep.stats.num_generated_tokens == 4 + 3 * 6


def test_a_submit_after_abort_all_is_aborted_too(worker):
    worker.submit([WorkItem("long", [5, 6], SamplingParams(max_new_tokens=2000, ignore_eos=True))])
    worker.abort_all()
    worker.submit([WorkItem("late", [5, 6], SamplingParams(max_new_tokens=2000, ignore_eos=True))])
    finished, _, _ = _until(worker, 2)
    assert sorted(outs[0].request_id for outs in finished) == ["late", "long"]
    assert all(outs[0].finish_reason.value == "abort" and outs[0].metrics.num_generated_tokens < 2000
               for outs in finished)
