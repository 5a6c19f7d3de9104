"""Sampling: the top-k fast path draws from the same distribution as filtering the whole row."""

from __future__ import annotations

import math

import pytest
import torch

from meld.sampling import repetition_penalty, sample, top_k_filter, top_k_mask, top_p_filter


def _expected(logits: torch.Tensor, temperature: float, k: int, p: float) -> torch.Tensor:
    """The reference distribution: filter the full row (top-k, then top-p), then softmax."""
    return top_p_filter(top_k_filter(logits / temperature, k), p).softmax(-1)


# k < 40 takes the top-k fast path (39: all but one token); k = 40 = V filters the full row
@pytest.mark.parametrize("k,p", [(5, 1.0), (5, 0.7), (12, 0.9), (39, 1.0), (40, 1.0)])
def test_top_k_fast_path_matches_the_full_row_distribution(k, p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 40, generator=g) * 2
    n = 40_000
    draws = sample(logits.expand(n, -1), temperature=0.8, top_k=k, top_p=p, generator=g)
    freq = torch.bincount(draws, minlength=40).double() / n
    want = _expected(logits, 0.8, k, p)[0].double()
    assert torch.all(freq[want == 0] == 0)  # excluded tokens are never drawn
    # every allowed token within 5 standard errors of its probability
    se = torch.sqrt(want * (1 - want) / n).clamp_min(1e-4)
    assert torch.all((freq - want).abs() <= 5 * se), (freq, want)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.8))[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    g = torch.Generator().manual_seed(1)
    draws = sample(logits.expand(2000, -1), top_k=3, top_p=0.8, generator=g)
    assert set(draws.tolist()) == {0, 1}


def test_repetition_penalty_scales_candidate_probabilities():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    cand = top_k_mask(logits, 1)
    assert cand.tolist() == [[False, False, True]]
    out = repetition_penalty(logits, cand, 2.0)
    assert out[0, 2] == pytest.approx(3.0 - math.log(2.0)) and out[0, :2].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"top_p": 0.0, "top_k": 2}, {"top_p": -1.0}])
def test_bad_sampling_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        sample(torch.randn(2, 8), **kwargs)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sample_among_top_k_draws_as_sample_and_returns_the_top_k_candidates(temperature):
    from meld.sampling import sample_among_top_k

    logits = torch.randn(16, 257, generator=torch.Generator().manual_seed(4))
    choice, index = sample_among_top_k(logits, 10, temperature=temperature, top_p=0.95,
                                       generator=torch.Generator().manual_seed(9))
    # every draw is a token the full-row filter allows (its distribution: the test above, via sample)
    allowed = _expected(logits, temperature, 10, 0.95) > 0
    assert allowed.gather(-1, choice[:, None]).all()
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, index, True)
    assert torch.equal(mask, top_k_mask(logits, 10))  # the candidates the repetition penalty remembers
    assert all(c in row for c, row in zip(choice.tolist(), index.tolist()))


@pytest.mark.parametrize("top_k", [0, 5])  # the full-row path and the top-k path
def test_a_tiny_top_p_keeps_only_the_best_token(top_k):
    """Top-p never empties a row: the best token's mass is counted after it, so even a p below every
    probability keeps it (and only it, the rest being strictly worse here)."""
    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(2))
    kept = torch.isfinite(top_p_filter(logits, 1e-9))
    assert torch.equal(kept, top_k_mask(logits, 1))
    draws = sample(logits, top_k=top_k, top_p=1e-9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(draws, logits.argmax(-1))


def test_top_k_at_or_above_the_vocabulary_size_filters_nothing():
    logits = torch.randn(256, 12, generator=torch.Generator().manual_seed(5))
    unfiltered = sample(logits, top_k=0, top_p=0.9, generator=torch.Generator().manual_seed(6))
    for k in (12, 13, 1000):
        assert torch.equal(top_k_filter(logits, k), logits)
        assert top_k_mask(logits, k).all()  # every token was a candidate: a uniform penalty, no effect
        assert torch.equal(sample(logits, top_k=k, top_p=0.9, generator=torch.Generator().manual_seed(6)), unfiltered)


@pytest.mark.parametrize("kwargs,name", [
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": float("inf"), "top_k": 3}, "temperature"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_p": float("nan"), "top_k": 3}, "top_p"),
])
def test_non_finite_sampling_parameters_are_refused_naming_them(kwargs, name):
    """NaN failed comparisons like ``temperature <= 0``: a NaN temperature reached ``multinomial`` (an
    error about the probability tensor), a NaN top-p switched nucleus filtering off unnoticed, and an
    infinite temperature made every logit 0, so the top-k candidates were the first k by index."""
    with pytest.raises(ValueError, match=name):
        sample(torch.randn(2, 8), generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.mark.parametrize("penalty", [float("nan"), float("inf")])
def test_a_non_finite_repetition_penalty_is_refused(penalty):
    """``logit - mask * log(penalty)``: an infinite penalty gave 0 * inf = NaN to every token that was
    not a candidate, and a NaN one made the whole row NaN."""
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="repetition penalty"):
        repetition_penalty(logits, top_k_mask(logits, 1), penalty)


def test_top_p_of_bfloat16_logits_keeps_the_nucleus_of_their_float32_values():
    """The nucleus's cumulative mass is summed in float32: in bfloat16 (spacing 2^-8 near 1) it drifted
    enough to keep or drop ~3 % of the nucleus of a 1000-token row differently."""
    logits = (torch.randn(64, 1000, generator=torch.Generator().manual_seed(7)) * 2).bfloat16()
    for p in (0.5, 0.9, 0.95):
        kept = torch.isfinite(top_p_filter(logits, p))
        want = torch.isfinite(top_p_filter(logits.float(), p))
        # the same number of tokens per row (tied logits may swap places in the sort, so not the same set)
        assert torch.equal(kept.sum(-1), want.sum(-1)), p
        assert top_p_filter(logits, p).dtype == torch.bfloat16
