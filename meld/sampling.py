"""Sampling from a categorical distribution: temperature, top-k, top-p, repetition penalty.

All functions work on (B, V) logits and return new tensors; -inf marks excluded tokens.
"""

from __future__ import annotations

import math

import torch


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # written so that NaN fails too; an infinite temperature would make every logit 0 (a top-k of ties)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (k <= 0 keeps all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability mass reaches p (p >= 1 keeps all)."""
    if p >= 1.0 and not math.isnan(p):
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    kept_sorted = top_p_filter_sorted(sorted_logits, p)
    return torch.empty_like(logits).scatter(-1, order, kept_sorted)  # back to vocabulary order


def top_p_filter_sorted(sorted_logits: torch.Tensor, p: float) -> torch.Tensor:
    """:func:`top_p_filter` for rows already sorted best first (no sort, no scatter back)."""
    if math.isnan(p) or p <= 0:  # NaN fails every comparison: it would switch the filter off unnoticed
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p >= 1.0:
        return sorted_logits
    # the mass in float32: a bfloat16 cumsum (spacing 2^-8 near 1) moves the cut by several tokens
    probs = sorted_logits.float().softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # mass of strictly better tokens
    return sorted_logits.masked_fill(mass_before >= p, float("-inf"))  # the best token always stays


def repetition_penalty(logits: torch.Tensor, previous_candidates: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """Divide the probability of last step's top-k candidates by ``penalty`` (MELD's repetition penalty).

    Args:
        logits: (B, V).
        previous_candidates: (B, V) bool, the tokens that were top-k candidates at the previous step.
        penalty: finite, >= 1; 1 disables. Applied as ``logit - log(penalty)``, which scales the
            probability by 1/penalty whatever the logit's sign. The temperature divides the logits
            afterwards (the order CTRL and most samplers use), so at temperature T the factor is
            ``penalty ** (1 / T)``; the shipped configs sample at T = 1.
    """
    # checked before anything is skipped, so a bad value is refused at a decoding's first step; an
    # infinite one would give 0 * inf = NaN to every token that was not a candidate
    if not (math.isfinite(penalty) and penalty >= 1.0):
        raise ValueError(f"repetition penalty must be a finite number >= 1, got {penalty}")
    if previous_candidates is None or penalty == 1.0:
        return logits
    return logits - previous_candidates.to(logits.dtype) * math.log(penalty)


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row from filtered logits; returns (B,) int64.

    With 0 < top_k < V the draw happens among the k best logits only (``topk`` returns them
    sorted, so top-p needs no sort over the whole vocabulary): the same distribution as
    filtering the full row, at a fraction of the cost of a decoding step's sampling. Ties at
    the k-th logit are broken by ``topk`` instead of all being kept.
    """
    if 0 < top_k < logits.shape[-1]:
        return sample_among_top_k(logits, top_k, temperature=temperature, top_p=top_p, generator=generator)[0]
    logits = top_p_filter(apply_temperature(logits, temperature), top_p)
    probs = logits.float().softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_among_top_k(
    logits: torch.Tensor, k: int, *, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample` for 0 < k < V, also returning the (B, k) indices of the k candidates, best first:
    a decoding step that remembers them for the repetition penalty (:func:`top_k_mask`) needs no
    second ``topk`` (the same set, temperature being a positive scale)."""
    values, index = torch.topk(apply_temperature(logits, temperature), k, dim=-1)  # sorted, best first
    values = top_p_filter_sorted(values, top_p)
    pick = torch.multinomial(values.float().softmax(-1), 1, generator=generator)  # (B, 1) in 0..k-1
    return index.gather(-1, pick).squeeze(-1), index


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(B, V) bool mask of each row's k best tokens (what the repetition penalty remembers)."""
    k = min(max(k, 1), logits.shape[-1])
    idx = torch.topk(logits, k, dim=-1).indices
    return torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, True)
