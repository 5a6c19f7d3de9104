"""Generation front ends shared by the CLI and the evaluation: TTS continuation and STT beam search.

Both are batched and KV-cached; they take plain arrays (normalised frames, BPE ids) so
they know nothing of files or stages.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from meld.features import FRAME_RATE, N_MELS
from meld.models.backbone import check_cache_dtype
from meld.models.layers import group_frames, ungroup_frames
from meld.models.vocab import EOS
from meld.progress import progress
from meld.store import collate


def batch_seed(seed: int, k: int) -> int:
    """Batch k's seed, ``seed + k`` wrapped into torch's seed range (a seed may be 2**64 - 1)."""
    return seed + k if seed + k < 2**64 else seed + k - 2**64


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
    first_batch: int = 0,
    kv_cache_dtype: str = "float32",
    progress_desc: str | None = None,
) -> list[Continuation]:
    """Continue each prompt (normalised (P, 80) frames, P may be 0) speaking its full transcript.

    Args:
        texts: BPE ids of each full transcript.
        max_frames: guard in 80-dim frames (per utterance or one for all): each utterance stops at its
            own, whichever utterances share its batch, and returns at most that many frames.
        batch_size: utterances generated together (finished ones leave the batch).
        seed, first_batch: batch k of this call draws from its own generator, seeded
            :func:`batch_seed` (seed, first_batch + k): a list split at batch boundaries and generated
            in parts (``first_batch`` = the part's first batch in the whole list, as the sharded
            evaluation does) gives the same output as the whole list in one call.
        kv_cache_dtype: ``float32`` or ``bfloat16`` (:func:`meld.models.backbone.check_cache_dtype`).
        progress_desc: show a progress bar over the utterances under this label (None: none).

    Raises:
        ValueError: texts, prompts and a per-utterance ``max_frames`` differ in length, a text is
            empty or holds an id outside the model's BPE vocabulary, a prompt is not (P, 80) or holds
            NaN or infinity in a frame the model reads, ``batch_size`` < 1, ``reduction`` is not the
            model's, or an unknown ``kv_cache_dtype``. Each names the utterance by its index in the lists.
    """
    cache_dtype = check_cache_dtype(kv_cache_dtype)
    max_frames = check_continuation_inputs("tts_continue", texts, prompts, max_frames, batch_size, N_MELS,
                                           "normalised frames")
    check_reduction("tts_continue", model, reduction)
    check_text_ids("tts_continue", model, texts)
    # the frames the model reads: whole groups of r (the models' own check names a row of one batch only)
    check_finite_host_frames("tts_continue", "prompt", [p[: (p.shape[0] // reduction) * reduction] for p in prompts])
    device = next(model.parameters()).device
    out: list[Continuation] = []
    bar = progress(total=len(texts), desc=progress_desc, unit="utt", disable=progress_desc is None)
    for k, s in enumerate(range(0, len(texts), batch_size), start=first_batch):
        batch = batch_seed(seed, k)
        g = torch.Generator(device=device).manual_seed(batch)
        torch.manual_seed(batch)  # test-time dropout draws from the global generator: seed it too
        chunk = slice(s, s + batch_size)
        ps = [p[: (p.shape[0] // reduction) * reduction] for p in prompts[chunk]]  # whole groups only
        lens = [p.shape[0] for p in ps]
        padded = [p if p.shape[0] else np.zeros((reduction, 80), np.float32) for p in ps]
        batch = collate(padded, texts[chunk], reduction)
        prompt_len = torch.tensor([n // reduction for n in lens])
        guards = [math.ceil(m / reduction) for m in max_frames[chunk]]  # grouped frames, each its own
        gen = model.generate(
            batch["text"].to(device), batch["text_len"].to(device), batch["mel"].to(device), prompt_len.to(device),
            max_frames=guards, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty_value=repetition_penalty, test_time_dropout=test_time_dropout,
            zero_latent=zero_latent, generator=g, kv_cache_dtype=cache_dtype,
        )
        for frames, hit, codes, limit in zip(gen.frames, gen.hit_max_length, gen.codes, max_frames[chunk]):
            mel = ungroup_frames(frames[None].float().cpu(), reduction)[0].numpy()
            out.append(Continuation(mel[:limit], hit, codes))  # the guard to the frame (grouping rounds it up)
        bar.update(len(guards))
    bar.close()
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
    ctc_weight: float = 0.0,
    ctc_candidates: int | None = None,
    progress_desc: str | None = None,
) -> list[list[int]]:
    """Batched, KV-cached beam search over BPE tokens; beam 1 is greedy decoding.

    Hypotheses are ranked by log-probability / length**length_penalty (EOS included in the length).
    The max-length guard is ``max_tokens``, tightened per utterance to ``10 + max_tokens_per_second``
    x its duration when given: speech carries a bounded number of tokens per second, and a model
    that never says <EOS> (an undertrained one) would otherwise decode ``max_tokens`` x beam steps
    for every short clip. An utterance that hits its guard ranks its live hypotheses with the finished
    ones (each over its own length) and returns the best.

    With ``ctc_weight`` = lambda > 0 the search is hybrid CTC/attention decoding (Watanabe et al. 2017;
    not in the MELD paper, docs/decisions.md): a hypothesis y scores (1 - lambda) log p_att(y) +
    lambda log p_ctc(y...), the CTC prefix probability of y under the model's CTC head, and at <EOS>
    its full-sequence CTC probability. Only each beam's ``ctc_candidates`` best tokens under the decoder
    (and <EOS>, whose CTC score is free) are scored; the others are pruned.

    Args:
        ctc_weight: lambda in [0, 1]; 0 is the decoder alone (bit-for-bit the plain search). > 0 needs
            a model trained with a CTC head (``args.stt_ctc``), else ValueError.
        ctc_candidates: tokens per beam and step given a CTC score; default max(10, 2 x beam_size).
        progress_desc: show a progress bar over the utterances under this label (None: none).

    Returns:
        BPE ids (0-based) of the best hypothesis per utterance.

    Raises:
        ValueError: ``batch_size``, ``beam_size`` or ``max_tokens`` < 1, ``max_tokens_per_second`` <= 0,
            a mel that is not (T, 80), a ``reduction`` that is not the model's, or a bad ``ctc_weight``.
    """
    for name, value in (("batch_size", batch_size), ("beam_size", beam_size), ("max_tokens", max_tokens)):
        check_positive_int("stt_beam_search", name, value)
    if max_tokens_per_second is not None and not 0 < max_tokens_per_second < math.inf:
        # <= 0 would give every utterance the 10-token floor (or less), whatever its duration
        raise ValueError(f"stt_beam_search: max_tokens_per_second must be a finite number > 0 or None, "
                         f"got {max_tokens_per_second!r}")
    for i, m in enumerate(mels):
        if np.ndim(m) != 2 or np.shape(m)[1] != N_MELS:
            raise ValueError(f"stt_beam_search: mel {i} must be (T, {N_MELS}) normalised frames, got shape {np.shape(m)}")
    check_reduction("stt_beam_search", model, reduction)
    # named by its index in the list: the model's own check can only name a row of the batch
    check_finite_host_frames("stt_beam_search", "mel", mels)
    if not 0.0 <= ctc_weight <= 1.0:
        raise ValueError(f"ctc_weight must be in [0, 1], got {ctc_weight}")
    if ctc_weight > 0 and not getattr(model, "stt_ctc", False):
        raise ValueError(f"ctc_weight={ctc_weight} needs a model trained with a CTC head (args.stt_ctc: true); "
                         f"this {getattr(model, 'system', type(model).__name__)} model has none: use ctc_weight=0")
    ctc_candidates = ctc_candidates or max(10, 2 * beam_size)
    device = next(model.parameters()).device
    results: list[list[int]] = []
    bar = progress(total=len(mels), desc=progress_desc, unit="utt", disable=progress_desc is None)
    for s in range(0, len(mels), batch_size):
        chunk = mels[s : s + batch_size]
        limits = [max_tokens if max_tokens_per_second is None else
                  min(max_tokens, 10 + math.ceil(max_tokens_per_second * len(m) / FRAME_RATE)) for m in chunk]
        batch = collate(chunk, [[0]] * len(chunk), reduction)
        results.extend(_beam_batch(model, batch["mel"].to(device), batch["mel_len"].to(device),
                                   beam_size, limits, length_penalty, ctc_weight, ctc_candidates))
        bar.update(len(chunk))
    bar.close()
    return results


class CTCPrefixScorer:
    """CTC prefix scores of a batch of growing hypotheses (Watanabe et al. 2017, Algorithm 2; ESPnet's
    CTCPrefixScore), in log space, vectorised over hypothesis rows, candidate tokens and frames.

    Each row holds a prefix g through its forward variables over frames t: r^n_t(g) and r^b_t(g),
    the log-probability that frames 0..t collapse to g with frame t a non-blank / a blank. Extending
    g by class c with phi_t = r^b_t(g) + r^n_t(g) (only r^b_t(g) when c repeats g's last class):

        r^n_t(gc) = (r^n_{t-1}(gc) + phi_{t-1}) p_t(c),    r^b_t(gc) = (r^b_{t-1}(gc) + r^n_{t-1}(gc)) p_t(blank),
        prefix probability psi(gc) = sum_{t < T} phi_{t-1} p_t(c),   phi_{-1} = [g is empty],

    in probabilities. Both recursions are first-order linear, so they are solved over all frames at once
    with cumulative sums (r^n_t = sum_{s<=t} phi_{s-1} prod_{u=s..t} p_u(c): a logcumsumexp), in float64
    so that differences of long cumulative sums stay exact. Frames past an utterance's length are never
    read: psi sums over real frames only, the full-sequence score is read at the last real frame, and
    frame t depends on frames <= t only.

    Args:
        log_probs: (T, B, C) per-frame CTC log-probs of B utterances, class 0 the blank.
        lengths: (B,) real frames per utterance.
        utterance: (R,) the utterance of each hypothesis row.
    """

    def __init__(self, log_probs: torch.Tensor, lengths: torch.Tensor, utterance: torch.Tensor):
        if log_probs.shape[0] == 0:
            # a batch whose every utterance has no frame: one padded frame (never read, as in a batch with
            # longer utterances) gives the full-sequence score a frame to be read at, log 1 for the empty text
            log_probs = log_probs.new_zeros(1, *log_probs.shape[1:])
        T = log_probs.shape[0]
        frame_valid = torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]  # (B, T)
        # (B, C, T), a class's frames contiguous; kept in the input's dtype (B x C x T is the big tensor),
        # gathered rows go to float64. Padded frames: any finite value (never read; finite keeps the
        # cumulative sums free of inf - inf).
        x = log_probs.permute(1, 2, 0).masked_fill(~frame_valid[:, None, :], 0.0).clamp_min(-1e4)
        self.x = x.contiguous()
        self.frame_valid = frame_valid
        self.last_frame = (lengths - 1).clamp_min(0)  # (B,)
        self.blank_cum = x[:, 0].to(torch.float64).cumsum(-1)  # (B, T) sum of log p_u(blank), u <= t
        R = utterance.shape[0]
        self.utterance = utterance
        self.r_n = torch.full((R, T), -math.inf, dtype=torch.float64, device=x.device)  # empty prefix
        self.r_b = self.blank_cum[utterance].clone()
        self.psi = torch.zeros(R, dtype=torch.float64, device=x.device)  # log psi(g): 0 for the empty prefix
        self.last = torch.full((R,), -1, dtype=torch.long, device=x.device)  # g's last class, -1: empty
        self.empty = torch.ones(R, dtype=torch.bool, device=x.device)

    def _phi_prev(self, rows: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """phi_{t-1} for extending rows (R',) by classes (R', M): (R', M, T)."""
        total = torch.logaddexp(self.r_n[rows], self.r_b[rows])  # (R', T)
        repeat = (classes == self.last[rows, None])[..., None]  # (R', M, 1)
        phi = torch.where(repeat, self.r_b[rows, None], total[:, None])  # (R', M, T)
        start = torch.where(self.empty[rows], 0.0, -math.inf).to(phi.dtype)  # (R',) phi_{-1}
        return torch.cat([start[:, None, None].expand(-1, phi.shape[1], 1), phi[..., :-1]], dim=-1)

    def prefix_scores(self, classes: torch.Tensor) -> torch.Tensor:
        """log psi(g c) of every row's prefix g extended by each of its (R, M) candidate classes: (R, M)."""
        rows = torch.arange(classes.shape[0], device=classes.device)
        x_c = self.x[self.utterance[:, None], classes].to(torch.float64)  # (R, M, T)
        terms = self._phi_prev(rows, classes) + x_c
        return terms.masked_fill(~self.frame_valid[self.utterance, None], -math.inf).logsumexp(-1)

    def full_scores(self) -> torch.Tensor:
        """log p_ctc(g) of every row's prefix as a whole sequence: (R,)."""
        t = self.last_frame[self.utterance, None]  # (R, 1)
        return torch.logaddexp(self.r_n.gather(1, t), self.r_b.gather(1, t))[:, 0]

    def advance(self, rows: torch.Tensor, classes: torch.Tensor) -> None:
        """Row i becomes row ``rows[i]``'s prefix extended by ``classes[i]`` (beam reordering included)."""
        utt = self.utterance[rows]
        x_c = self.x[utt, classes].to(torch.float64)  # (R, T)
        phi_prev = self._phi_prev(rows, classes[:, None])[:, 0]  # (R, T)
        s = x_c.cumsum(-1)  # sum of log p_u(c), u <= t
        s_before = F.pad(s[:, :-1], (1, 0))  # the same sum up to t - 1
        r_n = s + (phi_prev - s_before).logcumsumexp(-1)
        b = self.blank_cum[utt]
        r_n_before = F.pad(r_n[:, :-1], (1, 0), value=-math.inf)
        r_b = b + (r_n_before - F.pad(b[:, :-1], (1, 0))).logcumsumexp(-1)
        psi = (phi_prev + x_c).masked_fill(~self.frame_valid[utt], -math.inf).logsumexp(-1)
        self.r_n, self.r_b, self.psi, self.utterance = r_n, r_b, psi, utt
        self.last, self.empty = classes, torch.zeros_like(self.empty)


def _joint_logprobs(model, logp: torch.Tensor, ctc: CTCPrefixScorer, weight: float, n_cand: int) -> torch.Tensor:
    """(R, V) per-token score increments of hybrid decoding: (1 - w) log p_att + w (log psi(g c) - log psi(g)),
    and at <EOS> (1 - w) log p_att + w (log p_ctc(g) - log psi(g)); -inf beyond each row's candidates.
    The CTC increments are <= 0, like log-probs, so scores still only fall as hypotheses grow (what the
    search's early stop assumes)."""
    offset, n_text = model.vocab.text_offset, model.vocab.n_text
    att, idx = logp[:, offset : offset + n_text].topk(min(n_cand, n_text), dim=-1)  # (R, M): BPE id idx
    ctc_inc = ctc.prefix_scores(idx + 1) - ctc.psi[:, None]  # CTC class of BPE id i is i + 1
    eos_inc = ctc.full_scores() - ctc.psi
    # a dead row (score -inf, padded with <EOS>) may hold an impossible prefix: -inf - -inf is NaN
    dead = torch.isneginf(ctc.psi)
    ctc_inc = ctc_inc.masked_fill(dead[:, None], -math.inf).float()
    eos_inc = eos_inc.masked_fill(dead, -math.inf).float()
    out = torch.full_like(logp, -math.inf)
    out.scatter_(1, idx + offset, (1 - weight) * att + weight * ctc_inc)
    out[:, EOS] = (1 - weight) * logp[:, EOS] + weight * eos_inc
    return out


def _beam_batch(model, mel, mel_len, K: int, limits: list[int], alpha: float, ctc_weight: float = 0.0,
                ctc_candidates: int = 10) -> list[list[int]]:
    B = mel.shape[0]
    max_tokens = max(limits)
    rows = torch.arange(B, device=mel.device).repeat_interleave(K)  # (B*K,) beam rows per utterance
    ctc = None
    if ctc_weight > 0:  # the CTC head reads the frame states of the same prefill
        h, cache, pos, ctc_log_probs = model.stt_prefix_with_ctc(mel, mel_len, max_tokens + 1)
        ctc = CTCPrefixScorer(ctc_log_probs, mel_len, rows)
    else:
        h, cache, pos = model.stt_prefix(mel, mel_len, max_tokens + 1)
    cache.select(rows)
    h, pos = h[rows], pos[rows]
    scores = torch.full((B, K), float("-inf"), device=mel.device)
    scores[:, 0] = 0.0  # all beams start identical: only the first may expand at step 0
    seqs: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    guarded: list[list[int] | None] = [None] * B  # best unfinished hypothesis of an utterance stopped by its guard
    for step in range(max_tokens):
        logp = model.text_logprobs(h)  # (B*K, V)
        if ctc is not None:
            logp = _joint_logprobs(model, logp, ctc, ctc_weight, ctc_candidates)
        logp = logp.view(B, K, -1)  # (B, K, V)
        V = logp.shape[-1]
        total = (scores[..., None] + logp).view(B, K * V)
        top_scores, top_idx = total.topk(min(2 * K, K * V), dim=-1)  # (B, 2K)
        # the step's host reads, for every utterance at once (per utterance, a GPU would wait 2B times)
        top_scores_of, top_idx_of = top_scores.tolist(), top_idx.tolist()
        new_rows, new_tokens, new_scores = [], [], []
        new_seqs: list[list[list[int]]] = []
        for b in range(B):
            alive: list[tuple[int, int, float]] = []
            for sc, ix in zip(top_scores_of[b], top_idx_of[b]):
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
                # stop once no alive beam is expected to beat the K-th best finished one: its score
                # (a log-prob sum, which only falls) over the next length. A heuristic, the usual one
                # (Hugging Face's early_stopping=False), not a bound: with length_penalty > 0 a longer
                # hypothesis divides by more and can still overtake. The exact bound, its score over
                # the longest allowed length, would rarely stop a search before the length limit.
                # With K == 1 the first finished hypothesis ends the search: beam 1 is greedy.
                kth = sorted((f[0] for f in finished[b]), reverse=True)[K - 1]
                best_alive = max((sc for _, _, sc in alive), default=-math.inf)
                if K == 1 or best_alive / (step + 2) ** alpha <= kth:
                    done[b] = True
            if not done[b] and step + 1 >= limits[b]:
                done[b] = True
                # the live beams compete with the finished ones, each over its own length (no <EOS> in
                # it): kept out, one early and unlikely <EOS> (the empty transcript at step 0, say)
                # held the search open to the guard and then won unopposed, worse than greedy decoding
                finished[b].extend((sc / (step + 1) ** alpha, seqs[b][beam] + [tok]) for beam, tok, sc in alive)
                if not finished[b]:
                    guarded[b] = seqs[b][0]
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
        if ctc is not None:  # a dead row's <EOS> gets any class: its score is -inf and its state unused
            ctc.advance(idx, (torch.tensor(new_tokens, device=mel.device) - model.vocab.text_offset + 1).clamp_min(1))
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


def check_positive_int(caller: str, name: str, value) -> None:
    """Refuse anything but a positive integer (numpy's too; not a bool) as ``caller``'s ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{caller}: {name} must be a positive integer, got {value!r}")


def check_reduction(caller: str, model, reduction) -> None:
    """Refuse a reduction factor that does not give ``model``'s own frame size (80 x r), for a model that
    says it (``frame_dim``): grouped frames of another size fail deep inside the model's first matmul."""
    check_positive_int(caller, "reduction", reduction)
    frame_dim = getattr(model, "frame_dim", None)
    if frame_dim is not None and frame_dim != N_MELS * reduction:
        raise ValueError(f"{caller}: reduction={reduction} groups frames into {N_MELS * reduction}-dim ones, but this "
                         f"{getattr(model, 'system', type(model).__name__)} model takes {frame_dim} "
                         f"(reduction {frame_dim // N_MELS})")


def check_text_ids(caller: str, model, texts: list) -> None:
    """Refuse a BPE id outside ``model``'s text vocabulary (for a model with a union ``vocab``). The
    union vocabulary has no gap around the BPE ids: one past them is the first latent code, one
    before them a special token, so such an id would be embedded as one and spoken without a word."""
    vocab = getattr(model, "vocab", None)
    if vocab is None:
        return
    for i, text in enumerate(texts):
        ids = np.asarray(text)
        bad = ids[(ids < 0) | (ids >= vocab.n_text)]
        if bad.size:
            raise ValueError(f"{caller}: text {i} holds BPE id {bad[0]}, outside this model's vocabulary "
                             f"0..{vocab.n_text - 1} (a tokenizer other than the checkpoint's?)")


def check_finite_host_frames(caller: str, name: str, frames: list) -> None:
    """Refuse (T, 80) host frames holding NaN or infinity, naming the item by its index in ``frames``
    (not its row in a batch, as the models' own ``layers.check_finite_frames`` must), the frame, the
    channel and the value. One ``isfinite`` pass per host array, before the first batch."""
    for i, f in enumerate(frames):
        f = np.asarray(f)
        finite = np.isfinite(f)
        if not finite.all():
            t, c = (int(x) for x in np.argwhere(~finite)[0])
            raise ValueError(f"{caller}: {name} {i} holds {f[t, c].item()} at frame {t}, channel {c}: "
                             "normalised frames must be finite")


def check_continuation_inputs(caller: str, texts: list, prompts: list, max_frames, batch_size, width: int,
                              kind: str) -> list[int]:
    """What :func:`tts_continue` and :func:`meld.codes.continue_codes` check before their first batch:
    one text, prompt and guard per utterance, no empty text, (P, ``width``) prompts, a positive
    integer ``batch_size``. Returns the per-utterance guards (one int, numpy's too, is one for all).

    Raises:
        ValueError: naming ``caller`` and the list lengths, the empty text's or the bad prompt's index.
    """
    check_positive_int(caller, "batch_size", batch_size)
    if isinstance(max_frames, numbers.Integral):  # a numpy integer too
        max_frames = [int(max_frames)] * len(texts)
    lengths = {"texts": len(texts), "prompts": len(prompts), "max_frames": len(max_frames)}
    if len(set(lengths.values())) > 1:  # else a batch would pair one utterance's text with another's prompt
        raise ValueError(f"{caller}: one text, prompt and max_frames guard per utterance, got {lengths}")
    for i, text in enumerate(texts):
        if len(text) == 0:  # nothing to speak: the model would continue the prompt with made-up speech
            raise ValueError(f"{caller}: text {i} is empty: give each utterance's full transcript")
    for i, p in enumerate(prompts):
        if np.ndim(p) != 2 or np.shape(p)[1] != width:
            raise ValueError(f"{caller}: prompt {i} must be (P, {width}) {kind}, got shape {np.shape(p)}")
    return list(max_frames)


def prompt_frames(mel: np.ndarray, prompt_seconds: float, frame_rate: float = FRAME_RATE) -> int:
    """Frames in the first ``prompt_seconds`` of an utterance (at most all of them).

    Raises:
        ValueError: a negative or non-finite ``prompt_seconds`` (``mel[:p]`` with a negative ``p`` would
            keep all but the last frames as the prompt, without a word).
    """
    if not 0 <= prompt_seconds < math.inf:
        raise ValueError(f"prompt_seconds must be a finite number >= 0, got {prompt_seconds}")
    return min(mel.shape[0], int(round(prompt_seconds * frame_rate)))


__all__ = ["Continuation", "batch_seed", "tts_continue", "stt_beam_search", "CTCPrefixScorer", "prompt_frames", "group_frames"]
