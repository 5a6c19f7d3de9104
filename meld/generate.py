"""Generation front ends shared by the CLI and the evaluation: TTS continuation and STT beam search.

Both are batched and KV-cached; they take plain arrays (normalised frames, BPE ids) so
they know nothing of files or stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from meld.features import FRAME_RATE
from meld.models.layers import group_frames, ungroup_frames
from meld.models.vocab import EOS
from meld.store import collate


@dataclass
class Continuation:
    frames: np.ndarray  # (T, 80) normalised frames generated after the prompt
    hit_max_length: bool
    codes: list[int]


@torch.no_grad()
def tts_continue(
    model,
    texts: list[list[int]],
    prompts: list[np.ndarray],
    *,
    reduction: int,
    max_frames: list[int] | int,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    test_time_dropout: bool = True,
    zero_latent: bool = False,
    batch_size: int = 8,
    seed: int = 0,
) -> list[Continuation]:
    """Continue each prompt (normalised (P, 80) frames, P may be 0) speaking its full transcript.

    Args:
        texts: BPE ids of each full transcript.
        max_frames: guard in 80-dim frames (per utterance or one for all).
        batch_size: utterances generated together (finished ones leave the batch).
    """
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    torch.manual_seed(seed)  # test-time dropout draws from the global generator: seed it too
    if isinstance(max_frames, int):
        max_frames = [max_frames] * len(texts)
    out: list[Continuation] = []
    for s in range(0, len(texts), batch_size):
        chunk = slice(s, s + batch_size)
        ps = [p[: (p.shape[0] // reduction) * reduction] for p in prompts[chunk]]  # whole groups only
        lens = [p.shape[0] for p in ps]
        padded = [p if p.shape[0] else np.zeros((reduction, 80), np.float32) for p in ps]
        batch = collate(padded, texts[chunk], reduction)
        prompt_len = torch.tensor([n // reduction for n in lens])
        guard = math.ceil(max(max_frames[chunk]) / reduction)
        gen = model.generate(
            batch["text"].to(device), batch["text_len"].to(device), batch["mel"].to(device), prompt_len.to(device),
            max_frames=guard, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty_value=repetition_penalty, test_time_dropout=test_time_dropout,
            zero_latent=zero_latent, generator=g,
        )
        for frames, hit, codes in zip(gen.frames, gen.hit_max_length, gen.codes):
            mel = ungroup_frames(frames[None].float().cpu(), reduction)[0].numpy()
            out.append(Continuation(mel, hit, codes))
    return out


@torch.no_grad()
def stt_beam_search(
    model,
    mels: list[np.ndarray],
    *,
    reduction: int,
    beam_size: int = 5,
    max_tokens: int = 200,
    max_tokens_per_second: float | None = None,
    length_penalty: float = 1.0,
    batch_size: int = 8,
) -> list[list[int]]:
    """Batched, KV-cached beam search over BPE tokens; beam 1 is greedy decoding.

    Hypotheses are ranked by log-probability / length**length_penalty (EOS included in the length).
    The max-length guard is ``max_tokens``, tightened per utterance to ``10 + max_tokens_per_second``
    x its duration when given: speech carries a bounded number of tokens per second, and a model
    that never says <EOS> (an undertrained one) would otherwise decode ``max_tokens`` x beam steps
    for every short clip. An utterance that hits its guard returns its best unfinished hypothesis.

    Returns:
        BPE ids (0-based) of the best hypothesis per utterance.
    """
    device = next(model.parameters()).device
    results: list[list[int]] = []
    for s in range(0, len(mels), batch_size):
        chunk = mels[s : s + batch_size]
        limits = [max_tokens if max_tokens_per_second is None else
                  min(max_tokens, 10 + math.ceil(max_tokens_per_second * len(m) / FRAME_RATE)) for m in chunk]
        batch = collate(chunk, [[0]] * len(chunk), reduction)
        results.extend(_beam_batch(model, batch["mel"].to(device), batch["mel_len"].to(device),
                                   beam_size, limits, length_penalty))
    return results


def _beam_batch(model, mel, mel_len, K: int, limits: list[int], alpha: float) -> list[list[int]]:
    B = mel.shape[0]
    max_tokens = max(limits)
    h, cache, pos = model.stt_prefix(mel, mel_len, max_tokens + 1)
    rows = torch.arange(B, device=mel.device).repeat_interleave(K)  # (B*K,) beam rows per utterance
    cache.select(rows)
    h, pos = h[rows], pos[rows]
    scores = torch.full((B, K), float("-inf"), device=mel.device)
    scores[:, 0] = 0.0  # all beams start identical: only the first may expand at step 0
    seqs: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    guarded: list[list[int] | None] = [None] * B  # best unfinished hypothesis of an utterance stopped by its guard
    for step in range(max_tokens):
        logp = model.text_logprobs(h).view(B, K, -1)  # (B, K, V)
        V = logp.shape[-1]
        total = (scores[..., None] + logp).view(B, K * V)
        top_scores, top_idx = total.topk(min(2 * K, K * V), dim=-1)  # (B, 2K)
        new_rows, new_tokens, new_scores = [], [], []
        new_seqs: list[list[list[int]]] = []
        for b in range(B):
            alive: list[tuple[int, int, float]] = []
            for sc, ix in zip(top_scores[b].tolist(), top_idx[b].tolist()):
                beam, tok = divmod(ix, V)
                if sc == float("-inf"):
                    break
                if tok == EOS:
                    if not done[b] and len(alive) < K:
                        hyp = seqs[b][beam]
                        finished[b].append((sc / (len(hyp) + 1) ** alpha, hyp))
                elif len(alive) < K:
                    alive.append((beam, tok, sc))
            if len(finished[b]) >= K and not done[b]:
                # stop once no alive beam can beat the K-th best finished one (log-probs only fall,
                # so a beam's best normalised score is its current sum over the next length).
                # With K == 1 the first finished hypothesis ends the search: beam 1 is greedy.
                kth = sorted((f[0] for f in finished[b]), reverse=True)[K - 1]
                best_alive = max((sc for _, _, sc in alive), default=-math.inf)
                if K == 1 or best_alive / (step + 2) ** alpha <= kth:
                    done[b] = True
            if not done[b] and step + 1 >= limits[b]:
                done[b] = True
                if not finished[b]:
                    guarded[b] = seqs[b][alive[0][0]] + [alive[0][1]] if alive else seqs[b][0]
            while len(alive) < K:  # keep the shape: pad with dead beams
                alive.append((0, EOS, float("-inf")))
            new_seqs.append([seqs[b][beam] + [tok] for beam, tok, _ in alive])
            for beam, tok, sc in alive:
                new_rows.append(b * K + beam)
                new_tokens.append(tok)
                new_scores.append(-math.inf if done[b] else sc)
        seqs = new_seqs
        if all(done):
            break
        idx = torch.tensor(new_rows, device=mel.device)
        cache.select(idx)
        pos = pos[idx]
        scores = torch.tensor(new_scores, device=mel.device).view(B, K)
        h = model.stt_step(torch.tensor(new_tokens, device=mel.device), pos, cache)
        pos = pos + 1
    out = []
    for b in range(B):
        if finished[b]:
            best = max(finished[b], key=lambda t: t[0])[1]
        elif guarded[b] is not None:
            best = guarded[b]
        else:  # guard hit: best alive hypothesis
            best = seqs[b][int(scores[b].argmax())] if torch.isfinite(scores[b]).any() else seqs[b][0]
        out.append(model.vocab.union_to_text(best) if hasattr(model, "vocab") else best)
    return out


def prompt_frames(mel: np.ndarray, prompt_seconds: float, frame_rate: float = 62.5) -> int:
    """Frames in the first ``prompt_seconds`` of an utterance."""
    return min(mel.shape[0], int(round(prompt_seconds * frame_rate)))


__all__ = ["Continuation", "tts_continue", "stt_beam_search", "prompt_frames", "group_frames"]
