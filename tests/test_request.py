"""Request and SamplingParams / EngineConfig validation. No torch, no model."""

import subprocess
import sys

import pytest

from cbgen.config import EngineConfig, SamplingParams
from cbgen.engine.request import Request, RequestStatus


def test_engine_core_modules_import_without_torch():
    # In a fresh interpreter: torch may already be loaded in this one by other tests.
    code = ("import sys\n"
            "import cbgen.engine.request, cbgen.engine.block_manager, cbgen.engine.scheduler\n"
            "import cbgen.engine.outputs, cbgen.config\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_request_counters_and_derived_figures():
    r = Request("a", [5, 6, 7], SamplingParams(max_new_tokens=4), frozenset({2}))
    assert r.status is RequestStatus.WAITING and r.key == ("a", 0)
    assert (r.num_prompt_tokens, r.num_tokens, r.num_output_tokens, r.num_uncomputed) == (3, 3, 0, 3)
    assert not r.prefilled and r.logprobs is None
    r.num_computed_tokens = 3
    r.token_ids.append(9)
    assert r.prefilled and r.output_token_ids == [9] and r.num_uncomputed == 1
    assert r.prompt_token_ids == [5, 6, 7], "the prompt is not aliased by token_ids"
    m = r.metrics()
    assert (m.num_prompt_tokens, m.num_generated_tokens, m.num_cached_tokens) == (3, 1, 0)


def test_request_copies_prompt_and_prepares_logprobs():
    prompt = [1, 2]
    r = Request("a", prompt, SamplingParams(logprobs=0), index=2)
    r.token_ids.append(3)
    assert prompt == [1, 2]
    assert r.logprobs == [] and r.key == ("a", 2)


def test_request_needs_a_prompt_token():
    with pytest.raises(AssertionError):
        Request("a", [], SamplingParams())


@pytest.mark.parametrize("field,value,words", [
    ("temperature", -1, ["temperature", "-1", "[0, 100]"]),
    ("top_p", 0, ["top_p", "0", "(0, 1]"]),
    ("top_p", 1.5, ["top_p", "1.5", "(0, 1]"]),
    ("n", 0, ["n=0", "[1, 64]"]),
    ("top_k", -1, ["top_k", "-1", ">= 0"]),
    ("min_p", 1.0, ["min_p", "[0, 1)"]),
    ("max_new_tokens", 0, ["max_new_tokens", "0", ">= 1"]),
    ("repetition_penalty", 0, ["repetition_penalty", "(0, 10]"]),
    ("presence_penalty", 3, ["presence_penalty", "[-2, 2]"]),
    ("frequency_penalty", -3, ["frequency_penalty", "[-2, 2]"]),
    ("seed", -5, ["seed", "-5"]),
    ("stop", [""], ["stop", "non-empty"]),
    ("stop_token_ids", [-1], ["stop_token_ids"]),
    ("ignore_eos", "yes", ["ignore_eos", "true or false"]),
    ("logprobs", 21, ["logprobs", "[0, 20]"]),
    ("logprobs", True, ["logprobs", "null or an integer"]),
    ("prompt_logprobs", -1, ["prompt_logprobs", "[0, 20]"]),
])
def test_sampling_params_reject_out_of_range(field, value, words):
    with pytest.raises(ValueError) as e:
        SamplingParams(**{field: value})
    msg = str(e.value)
    for w in words:
        assert w in msg, (w, msg)


def test_min_new_tokens_bounded_by_max():
    with pytest.raises(ValueError, match=r"min_new_tokens=9.*max_new_tokens=4"):
        SamplingParams(max_new_tokens=4, min_new_tokens=9)


def test_sampling_params_normalise_stop_and_replace_revalidates():
    p = SamplingParams(stop="END", stop_token_ids=[3, 4])
    assert p.stop == ("END",) and p.stop_token_ids == (3, 4)
    assert p.greedy and not p.has_penalties
    with pytest.raises(ValueError, match="temperature"):
        p.replace(temperature=-0.5)
    with pytest.raises(ValueError, match="unknown sampling field"):
        SamplingParams.from_mapping(p, {"temprature": 1.0})


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_batched_tokens=8), "max_num_batched_tokens"),
    (dict(max_num_seqs=64, max_num_batched_tokens=32), "max_num_batched_tokens"),
    (dict(block_size=0), "block_size"),
    (dict(num_kv_blocks=0), "num_kv_blocks"),
    (dict(max_model_len=1), "max_model_len"),
])
def test_engine_config_rejects_out_of_range(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kwargs)
