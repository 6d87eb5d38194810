"""The exact greedy token from an int8 proxy of a bf16 LM head (engine/greedy_head.py,
csrc/greedy_head.c): the same token as the whole head's bf16 logits and the sampler's native
argmax on adversarial heads (exact ties, near-ties a bf16 ulp apart, NaN), through both of its
paths; the error bound it relies on holds."""

from __future__ import annotations

import ctypes

import pytest
import torch

from cbgen.config import cache_root
from cbgen.engine import fused_ops, greedy_head, linear_rows


@pytest.fixture(scope="module")
def libs():
    from helpers import native_or_skip

    gh = native_or_skip(greedy_head.load(cache_root() / "kernels"), "native greedy head")
    return gh, linear_rows.load(cache_root() / "kernels"), fused_ops.load(cache_root() / "kernels")


def _reference(libs, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The whole head's bf16 logits (the decode step's head projection) and argmax_rows_bf16."""
    _, lr, fused = libs
    return fused.argmax(lr(x, w, None, None, torch.bfloat16))


def test_struct_layout_matches_the_header(libs):
    assert libs[0].size() == ctypes.sizeof(greedy_head.GreedyHeadStruct)


def test_the_bound_holds_on_random_rows(libs):
    _, lr, _ = libs
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(512, 320, generator=g) * 0.05).bfloat16()
    head = greedy_head.GreedyHead(w)
    x = (torch.randn(64, 320, generator=g) * 2).bfloat16()
    exact = lr(x, w, None, None, torch.float32).double()
    proxy = lr(x, head.q, head.scale, None, torch.float32).double()
    bound = x.double().norm(dim=1, keepdim=True) * head.slack.double()[None, :]
    assert ((exact - proxy).abs() <= bound).all()
    assert (bound < 0.2 * exact.abs().max()).all()   # and is tight enough to rule most rows out


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_same_token_as_the_whole_head_on_adversarial_heads(libs, rows):
    gh = libs[0]
    g = torch.Generator().manual_seed(rows)
    K, N = 192, 3000
    w = (torch.randn(N, K, generator=g) * 0.04).bfloat16()
    w[2000] = w[17]                                   # an exact tie, later index
    w[1500] = w[17]
    w[901] = w[900]
    w[901, 5] = torch.tensor(w[901, 5].float().item() * 1.0078125).bfloat16()   # one bf16 ulp apart
    head = greedy_head.GreedyHead(w)
    for trial in range(40):
        x = (torch.randn(rows, K, generator=g) * 1.5).bfloat16()
        if trial % 4 == 0:                            # aim at the tied rows: their logits lead
            x[0] = (w[17].float() * 40).bfloat16()
        if trial % 4 == 1:
            x[-1] = (w[900].float() * 40).bfloat16()
        assert torch.equal(gh.argmax(head, x), _reference(libs, w, x)), trial
    assert head.rows_exact > 0


def test_rows_with_too_many_candidates_take_the_whole_head(libs):
    gh = libs[0]
    w = torch.full((300, 64), 0.01).bfloat16()        # every logit equal: 300 candidates
    w[250] = 0.011
    head = greedy_head.GreedyHead(w, max_candidates=16)
    x = torch.ones(2, 64).bfloat16()
    x[1] = -1
    assert torch.equal(gh.argmax(head, x), _reference(libs, w, x))
    assert head.rows_full == 1 and head.rows_exact == 1   # row 0: 250 leads; row 1: all but 250 tie


def test_non_finite_rows_follow_the_argmax_rule(libs):
    gh = libs[0]
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(400, 64, generator=g) * 0.05).bfloat16()
    head = greedy_head.GreedyHead(w)
    x = torch.randn(3, 64, generator=g).bfloat16()
    x[0, 7] = float("nan")
    x[1, 3] = float("inf")
    assert torch.equal(gh.argmax(head, x), _reference(libs, w, x))
    assert head.rows_full == 2


def test_refuses_what_it_does_not_cover():
    with pytest.raises(ValueError, match="bf16"):
        greedy_head.GreedyHead(torch.zeros(4, 8))
