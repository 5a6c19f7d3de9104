"""MELD speech-to-text: SpecAugment bounds, beam search properties, overfitting to 0 WER, joint task."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_batch, tiny_meld

from meld.generate import stt_beam_search
from meld.models.layers import spec_augment, voice_perturb
from meld.models.vocab import EOS
from meld.training import build_optimizer, build_scheduler, train_step


def _runs(mask: torch.Tensor) -> int:
    """Number of contiguous runs of True in a 1-D boolean tensor."""
    m = mask.int()
    return int(m[0]) + int((m[1:] - m[:-1] == 1).sum())


def test_spec_augment_masks_stay_within_bounds():
    g = torch.Generator().manual_seed(0)
    mel = torch.randn(4, 200, 80) + 10.0  # no real value is 0, so zeros are masks
    before = mel.clone()
    lengths = torch.tensor([200, 150, 60, 20])
    seen_channels, seen_frames = [0] * 4, [0] * 4
    for _ in range(20):
        out = spec_augment(mel, lengths, freq_masks=2, freq_width=30, time_masks=2, time_width=50,
                           max_time_fraction=0.2, generator=g)
        for b, n in enumerate(lengths.tolist()):
            channel_masked = (out[b, :n] == 0).all(0)  # channels zero over the whole utterance
            assert channel_masked.sum() <= 2 * 30 and _runs(channel_masked) <= 2
            frame_masked = (out[b, :n] == 0).all(1)
            assert frame_masked.sum() <= 2 * min(50, int(0.2 * n)) and _runs(frame_masked) <= 2
            assert torch.equal(out[b, n:], mel[b, n:])  # padding untouched
            seen_channels[b] += int(channel_masked.sum())
            seen_frames[b] += int(frame_masked.sum())
    # over 20 draws every utterance was masked in both directions (a no-op would pass the bounds)
    assert all(c > 0 for c in seen_channels) and all(f > 0 for f in seen_frames)
    assert torch.equal(mel, before)  # input not modified in place


def test_voice_perturb_off_is_identity_and_bad_ranges_are_refused():
    mel, lengths = torch.randn(2, 30, 80), torch.tensor([30, 17])
    out, out_len = voice_perturb(mel, lengths, max_warp=0.0, max_speed=0.0, max_tilt=0.0)
    assert torch.equal(out, mel) and torch.equal(out_len, lengths)
    for bad in ({"max_warp": 1.0}, {"max_speed": -0.1}, {"max_tilt": float("nan")}):
        kw = {"max_warp": 0.0, "max_speed": 0.0, "max_tilt": 0.0} | bad
        with pytest.raises(ValueError, match="stt_"):
            voice_perturb(mel, lengths, **kw)
    with pytest.raises(ValueError, match="stt_voice_warp"):
        tiny_meld(stt_voice_warp=1.5)


def test_voice_warp_and_tilt_stay_within_their_ranges():
    g = torch.Generator().manual_seed(0)
    C = 80
    ramp = torch.arange(C, dtype=torch.float32).expand(4, 25, C).clone()  # value = channel index
    lengths = torch.tensor([25, 25, 10, 3])
    for _ in range(10):
        out, out_len = voice_perturb(ramp, lengths, max_warp=0.1, max_speed=0.0, max_tilt=0.0, generator=g)
        assert torch.equal(out_len, lengths)
        for b, n in enumerate(lengths.tolist()):
            # a linear function survives linear interpolation exactly: channel c reads min(c * a, C - 1)
            a = float(out[b, 0, 1])
            assert 0.9 - 1e-6 <= a <= 1.1 + 1e-6
            expected = (torch.arange(C) * a).clamp(max=C - 1)
            assert torch.allclose(out[b, :n], expected.expand(n, C), atol=1e-4)
            assert (out[b, n:] == 0).all()
        out, _ = voice_perturb(ramp, lengths, max_warp=0.0, max_speed=0.0, max_tilt=2.0, generator=g)
        for b, n in enumerate(lengths.tolist()):
            added = out[b, :n] - ramp[b, :n]
            assert torch.allclose(added, added[0].expand(n, C))  # the same tilt in every frame
            slope = added[0, 1:] - added[0, :-1]
            assert torch.allclose(slope, slope[0].expand(C - 1), atol=1e-5)  # a straight line over channels
            assert abs(float(added[0, -1] - added[0, 0])) <= 2.0 + 1e-5  # end to end at most max_tilt
            assert abs(float(added[0].mean())) < 1e-4  # centred: the mean level is kept


def test_voice_speed_perturbation_resamples_time_within_range():
    g = torch.Generator().manual_seed(1)
    T = 100
    ramp = torch.arange(T, dtype=torch.float32)[None, :, None].expand(3, T, 80).clone()  # value = frame index
    lengths = torch.tensor([100, 64, 7])
    seen = set()
    for _ in range(20):
        out, out_len = voice_perturb(ramp, lengths, max_warp=0.0, max_speed=0.2, max_tilt=0.0, generator=g)
        assert out.shape[1] == int(out_len.max())
        for b, n in enumerate(lengths.tolist()):
            m = int(out_len[b])
            assert round(n / 1.2) <= m <= round(n / 0.8)
            steps = out[b, 1:m, 0] - out[b, : m - 1, 0]
            if m > 2:  # constant step s (the speed) until the last frame clamps at n - 1
                s = float(steps[0])
                assert 0.8 - 1e-5 <= s <= 1.2 + 1e-5
                seen.add(round(s, 2))
            assert float(out[b, :m, 0].max()) <= n - 1 + 1e-5 and (out[b, m:] == 0).all()
    assert len(seen) > 5  # the speed varies between draws
    _, out_len = voice_perturb(ramp, lengths, max_warp=0.0, max_speed=0.2, max_tilt=0.0, length_multiple=4, generator=g)
    assert (out_len % 4 == 0).all() and (out_len >= 4).all() and (out_len <= torch.round(lengths / 0.8)).all()


def test_meld_stt_training_with_voice_perturbation_keeps_whole_frame_groups():
    model, _ = tiny_meld(reduction=2, stt_ctc=True, stt_voice_warp=0.1, stt_speed_perturb=0.2, stt_spectral_tilt=1.0)
    batch = tiny_batch(reduction=2, B=3, T=12)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(5):
        mel, mel_len = model.augment(batch["mel"], batch["mel_len"], g)
        assert mel.shape[2] == 160 and mel.shape[1] == int(mel_len.max())
        for b, n in enumerate(mel_len.tolist()):
            assert (mel[b, n:] == 0).all()
            assert round(int(batch["mel_len"][b]) * 2 / 1.2) // 2 <= n <= round(int(batch["mel_len"][b]) * 2 / 0.8) // 2 + 1
    losses = model.compute_losses(batch, "stt", g)
    assert set(losses) == {"loss/stt_ce", "loss/stt_ctc"} and all(torch.isfinite(v) for v in losses.values())


def _greedy(model, mel, mel_len, max_tokens=30):
    h, cache, pos = model.stt_prefix(mel, mel_len, max_tokens + 1)
    out = []
    for _ in range(max_tokens):
        tok = int(model.text_logprobs(h).argmax(-1))
        if tok == EOS:
            break
        out.append(tok)
        h = model.stt_step(torch.tensor([tok]), pos, cache)
        pos = pos + 1
    return model.vocab.union_to_text(out)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional-frames"])
def test_beam_one_equals_greedy_and_batched_equals_one_by_one(bidirectional):
    model, _ = tiny_meld(reduction=2, stt_bidirectional_frames=bidirectional)
    model.eval()
    batch = tiny_batch(reduction=2, B=4, T=9)
    mels = [batch["mel"][b, : int(batch["mel_len"][b])].reshape(-1, 80).numpy() for b in range(4)]
    greedy = [_greedy(model, batch["mel"][b : b + 1, : int(batch["mel_len"][b])], batch["mel_len"][b : b + 1])
              for b in range(4)]
    assert stt_beam_search(model, mels, reduction=2, beam_size=1, max_tokens=30) == greedy
    one_by_one = [stt_beam_search(model, [m], reduction=2, beam_size=3, max_tokens=30)[0] for m in mels]
    assert stt_beam_search(model, mels, reduction=2, beam_size=3, max_tokens=30, batch_size=4) == one_by_one


@pytest.mark.parametrize("frontend_layers", [0, 2], ids=["no-frontend", "conv-frontend"])
def test_stt_prefix_and_steps_equal_the_teacher_forced_pass_with_bidirectional_frames(frontend_layers):
    model, _ = tiny_meld(reduction=2, stt_bidirectional_frames=True, stt_frontend_layers=frontend_layers)
    model.eval()
    batch = tiny_batch(reduction=2, B=3, T=9, L=5)
    full = model.forward_stt(batch["mel"], batch["mel_len"], batch["text"], batch["text_len"]).logits
    L = batch["text"].shape[1]
    h, cache, pos = model.stt_prefix(batch["mel"], batch["mel_len"], L + 1)
    inc = [model.head(h)]
    for i in range(L):
        h = model.stt_step(batch["text"][:, i] + model.vocab.text_offset, pos, cache)
        inc.append(model.head(h))
        pos = pos + 1
    inc = torch.stack(inc, dim=1)  # (B, L+1, V)
    for b in range(3):
        n = int(batch["text_len"][b]) + 1  # <STT> and each real text token
        assert torch.allclose(inc[b, :n], full[b, :n], atol=1e-5, rtol=1e-5)
    causal, _ = tiny_meld(reduction=2, stt_frontend_layers=frontend_layers)
    causal.load_state_dict(model.state_dict())
    causal.eval()
    other = causal.forward_stt(batch["mel"], batch["mel_len"], batch["text"], batch["text_len"]).logits
    assert not torch.allclose(other, full, atol=1e-3)  # the option changes what the text reads


def test_conv_front_end_mixes_neighbours_and_ignores_padding():
    from meld.models.layers import ConvFrontEnd

    torch.manual_seed(0)
    fe = ConvFrontEnd(dim=16, n_layers=2, kernel=5)
    x = torch.randn(2, 12, 16, requires_grad=True)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    y = fe(x, mask)
    w = torch.randn(16)
    (g,) = torch.autograd.grad((y[0, 5] * w).sum(), x, retain_graph=True)
    reach = g[0].abs().sum(-1) > 0
    assert reach[1:10].all() and not reach[:1].any() and not reach[10:].any()  # 2 layers x 2 frames each way
    (g,) = torch.autograd.grad((y[1, :7] * w).sum(), x, retain_graph=True)
    assert g[1, 7:].abs().max() == 0, "padding leaked into real frames"
    assert y[1, 7:].abs().max() == 0
    with pytest.raises(ValueError, match="odd"):
        ConvFrontEnd(dim=16, n_layers=1, kernel=4)


def test_tiny_stt_model_overfits_a_fixed_batch_to_zero_wer():
    model, _ = tiny_meld(reduction=2, dropout=0.0, specaug_time_masks=0, specaug_freq_masks=0)
    batch = tiny_batch(reduction=2, B=2, T=8, L=5)
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.0)
    sched = build_scheduler(opt, 1, 10_000, 0)
    for _ in range(150):
        train_step(model, opt, sched, batch, task="stt", loss_weights={}, grad_clip=10.0)
    mels = [batch["mel"][b, : int(batch["mel_len"][b])].reshape(-1, 80).numpy() for b in range(2)]
    hyps = stt_beam_search(model, mels, reduction=2, beam_size=2, max_tokens=20)
    refs = [batch["text"][b, : int(batch["text_len"][b])].tolist() for b in range(2)]
    assert hyps == refs


def test_joint_task_trains_both_heads_and_stt_has_no_prenet_dropout():
    model, _ = tiny_meld(reduction=2)
    batch = tiny_batch(reduction=2, B=4, T=8)
    losses = model.compute_losses(batch, "joint")
    assert {"loss/ce", "loss/mse_post", "loss/stt_ce"} <= set(losses)
    model.train()
    a = model.forward_stt(batch["mel"], batch["mel_len"], batch["text"], batch["text_len"]).logits
    torch.manual_seed(1)
    b = model.forward_stt(batch["mel"], batch["mel_len"], batch["text"], batch["text_len"]).logits
    assert torch.allclose(a, b)  # backbone dropout is 0 in the tiny config; E has none in STT


def test_stt_ctc_auxiliary_spells_the_transcript_at_the_frame_positions():
    """With only the CTC term trained, best-path decoding of the frame states (blank = PAD's row,
    repeats merged) gives back each transcript: the auxiliary reads the right head rows."""
    from meld.models.vocab import PAD

    plain, _ = tiny_meld(reduction=2)
    batch = tiny_batch(reduction=2, B=2, T=12, L=4)
    assert "loss/stt_ctc" not in plain.compute_losses(batch, "stt")  # off unless asked for

    model, _ = tiny_meld(reduction=2, stt_ctc=True, specaug_time_masks=0, specaug_freq_masks=0)
    assert torch.isfinite(model.compute_losses(batch, "stt")["loss/stt_ctc"])
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.0)
    sched = build_scheduler(opt, 1, 10_000, 0)
    for _ in range(200):
        train_step(model, opt, sched, batch, task="stt", loss_weights={"stt_ce": 0.0, "stt_ctc": 1.0}, grad_clip=10.0)
    model.eval()
    with torch.no_grad():
        h = model.forward_stt(batch["mel"], batch["mel_len"], batch["text"], batch["text_len"]).frame_hidden
        rows = [PAD] + list(range(model.vocab.text_offset, model.vocab.text_offset + model.vocab.n_text))
        best = model.head(h)[..., rows].argmax(-1)  # (B, T): 0 = blank, i + 1 = BPE id i
    for b in range(2):
        path = best[b, : int(batch["mel_len"][b])].tolist()
        merged = [c for i, c in enumerate(path) if c != 0 and (i == 0 or c != path[i - 1])]
        assert [c - 1 for c in merged] == batch["text"][b, : int(batch["text_len"][b])].tolist()


def test_duration_guard_bounds_each_hypothesis_and_keeps_its_prefix():
    """A model that never says <EOS> stops at 10 + rate x seconds tokens per utterance, with the same
    tokens the unguarded search had chosen up to there (greedy: the guard only cuts)."""
    model, _ = tiny_meld(reduction=2)
    with torch.no_grad():  # <EOS> can never win
        model.head.bias[EOS] = -1e4
    model.eval()
    g = torch.Generator().manual_seed(3)
    mels = [torch.randn(n, 80, generator=g).numpy() for n in (16, 40, 70)]  # 0.26 s, 0.64 s, 1.12 s
    rate = 20.0
    free = stt_beam_search(model, mels, reduction=2, beam_size=1, max_tokens=60)
    guarded = stt_beam_search(model, mels, reduction=2, beam_size=1, max_tokens=60, max_tokens_per_second=rate)
    for m, f, h in zip(mels, free, guarded):
        limit = 10 + math.ceil(rate * len(m) / 62.5)
        assert len(f) == 60 and len(h) == limit
        assert h == f[:limit]
    # beam search under the guard also returns a bounded, non-empty hypothesis
    beams = stt_beam_search(model, mels, reduction=2, beam_size=3, max_tokens=60, max_tokens_per_second=rate)
    assert all(0 < len(h) <= 10 + math.ceil(rate * len(m) / 62.5) for m, h in zip(mels, beams))


# ---------------------------------------------------------------- joint CTC/attention decoding


def _brute_force_ctc(log_probs: torch.Tensor, length: int) -> dict[tuple[int, ...], float]:
    """Probability of every collapsed label sequence: a sum over all C**T alignments (blank = 0)."""
    import itertools

    probs: dict[tuple[int, ...], float] = {}
    p = log_probs[:length].double().exp()  # (T, C)
    for path in itertools.product(range(p.shape[1]), repeat=length):
        seq = tuple(c for i, c in enumerate(path) if c != 0 and (i == 0 or c != path[i - 1]))
        probs[seq] = probs.get(seq, 0.0) + math.prod(float(p[t, c]) for t, c in enumerate(path))
    return probs


def test_ctc_prefix_scorer_equals_brute_force_enumeration_under_beam_reordering():
    """Each row's prefix score is log P(the collapsed output starts with its prefix) and its full score
    log P(the output is its prefix), both by enumerating every alignment, the latter also F.ctc_loss;
    rows are re-drawn (copied, permuted, across padded utterances) at every step, as a beam does."""
    import torch.nn.functional as F

    from meld.generate import CTCPrefixScorer

    g = torch.Generator().manual_seed(0)
    T, C, lengths = 5, 4, torch.tensor([5, 3])  # utterance 1 has 2 padded frames of noise
    log_probs = torch.randn(T, 2, C, generator=g).mul(2).log_softmax(-1)  # (T, B, C)
    brute = [_brute_force_ctc(log_probs[:, b], int(lengths[b])) for b in range(2)]

    def prob(b, prefix, whole):
        return sum(v for s, v in brute[b].items() if (s == prefix if whole else s[: len(prefix)] == prefix))

    def log(v):
        return math.log(v) if v > 0 else -math.inf

    utterance = torch.tensor([0] * 6 + [1] * 6)
    scorer = CTCPrefixScorer(log_probs, lengths, utterance)
    held = [()] * 12
    for _ in range(4):
        full = scorer.full_scores()
        cand = torch.arange(1, C).expand(12, -1)
        ext = scorer.prefix_scores(cand)
        for r, prefix in enumerate(held):
            b = int(utterance[r])
            assert float(scorer.psi[r]) == pytest.approx(log(prob(b, prefix, False)), abs=1e-4)
            assert float(full[r]) == pytest.approx(log(prob(b, prefix, True)), abs=1e-4)
            ref = -F.ctc_loss(log_probs[:, b : b + 1], torch.tensor([list(prefix)]), lengths[b : b + 1],
                              torch.tensor([len(prefix)]), reduction="none")
            assert float(full[r]) == pytest.approx(float(ref), abs=1e-4)
            for m, c in enumerate(cand[r].tolist()):
                assert float(ext[r, m]) == pytest.approx(log(prob(b, prefix + (c,), False)), abs=1e-4)
        # new rows: parents drawn within each utterance, with repeats, and random classes (repeats included)
        rows = torch.cat([torch.randint(0, 6, (6,), generator=g), torch.randint(6, 12, (6,), generator=g)])
        classes = torch.randint(1, C, (12,), generator=g)
        scorer.advance(rows, classes)
        held = [held[int(p)] + (int(c),) for p, c in zip(rows, classes)]
    assert any(math.isinf(float(s)) for s in scorer.full_scores())  # utterance 1 (3 frames) cannot hold 4 tokens


def _stt_mels(batch, B):
    return [batch["mel"][b, : int(batch["mel_len"][b])].reshape(-1, 80).numpy() for b in range(B)]


def test_ctc_weight_zero_is_the_plain_search_and_a_model_without_ctc_refuses():
    model, _ = tiny_meld(reduction=2, stt_ctc=True)
    mels = _stt_mels(tiny_batch(reduction=2, B=3, T=9), 3)
    plain = stt_beam_search(model, mels, reduction=2, beam_size=3, max_tokens=12)
    assert stt_beam_search(model, mels, reduction=2, beam_size=3, max_tokens=12, ctc_weight=0.0) == plain
    hybrid = stt_beam_search(model, mels, reduction=2, beam_size=3, max_tokens=12, ctc_weight=0.5)
    assert all(len(h) <= len(m) // 2 for h, m in zip(hybrid, mels))  # CTC emits at most one token per frame
    no_ctc, _ = tiny_meld(reduction=2)
    with pytest.raises(ValueError, match="CTC head"):
        stt_beam_search(no_ctc, mels, reduction=2, beam_size=3, max_tokens=12, ctc_weight=0.3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stt_beam_search(model, mels, reduction=2, beam_size=3, max_tokens=12, ctc_weight=1.5)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional-frames"])
def test_hybrid_ctc_beam_search_batched_equals_one_by_one(bidirectional):
    model, _ = tiny_meld(reduction=2, stt_ctc=True, stt_bidirectional_frames=bidirectional)
    mels = _stt_mels(tiny_batch(reduction=2, B=4, T=12), 4)  # 12, 9, 6 and 3 frames: padded rows
    kw = dict(reduction=2, beam_size=3, max_tokens=15, ctc_weight=0.3, ctc_candidates=5)
    one_by_one = [stt_beam_search(model, [m], **kw)[0] for m in mels]
    assert stt_beam_search(model, mels, batch_size=4, **kw) == one_by_one
    greedy = stt_beam_search(model, mels, **{**kw, "beam_size": 1})
    assert greedy == [stt_beam_search(model, [m], **{**kw, "beam_size": 1})[0] for m in mels]


def test_tiny_stt_model_with_ctc_head_decodes_a_fixed_batch_to_zero_wer_with_hybrid_decoding():
    model, _ = tiny_meld(reduction=2, stt_ctc=True, dropout=0.0, specaug_time_masks=0, specaug_freq_masks=0)
    batch = tiny_batch(reduction=2, B=2, T=10, L=5)
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.0)
    sched = build_scheduler(opt, 1, 10_000, 0)
    first = last = None
    for _ in range(60):
        losses = train_step(model, opt, sched, batch, task="stt", loss_weights={}, grad_clip=10.0)
        first, last = first or float(losses["loss/stt_ctc"]), float(losses["loss/stt_ctc"])
    assert last < first / 20
    refs = [batch["text"][b, : int(batch["text_len"][b])].tolist() for b in range(2)]
    for weight in (0.3, 1.0):  # 1.0: CTC alone scores, the decoder only proposes the candidates
        hyps = stt_beam_search(model, _stt_mels(batch, 2), reduction=2, beam_size=2, max_tokens=20,
                               ctc_weight=weight)
        assert hyps == refs


def _per_token_logp(model, mel, hyp: list[int], with_eos: bool) -> float:
    """A transcript's decoder log-probability (teacher-forced), over its length (its <EOS> counted if scored)."""
    from meld.generate import collate

    batch = collate([mel], [[0]], 2)
    h, cache, pos = model.stt_prefix(batch["mel"], batch["mel_len"], len(hyp) + 2)
    total = 0.0
    for t in hyp:
        tok = t + model.vocab.text_offset
        total += float(model.text_logprobs(h)[0, tok])
        h = model.stt_step(torch.tensor([tok]), pos, cache)
        pos = pos + 1
    if with_eos:
        total += float(model.text_logprobs(h)[0, EOS])
    return total / (len(hyp) + int(with_eos))


def test_at_the_guard_live_hypotheses_compete_with_finished_ones():
    """One early, unlikely <EOS> (the empty transcript) kept the search open to the guard, where the live
    beams were dropped because something had finished: the empty transcript won unopposed, far below
    the live beams per token and worse than greedy decoding. Now they are ranked together."""
    import numpy as np

    model, _ = tiny_meld(reduction=2, n_text=12, seed=3)  # seeds torch's global generator
    with torch.no_grad():  # a peaky model that rarely says <EOS>, as an undertrained one loops
        model.head.weight.mul_(4.0)
        model.head.bias[EOS] += float(torch.randn(1)) * 2
    model.eval()
    rng = np.random.default_rng(3)
    mels = [rng.standard_normal((n, 80)).astype(np.float32) for n in rng.integers(3, 60, 6)]
    with torch.no_grad():
        beam = stt_beam_search(model, mels, reduction=2, beam_size=3, max_tokens=25)
        greedy = stt_beam_search(model, mels, reduction=2, beam_size=1, max_tokens=25)
        assert sum(len(g) == 25 for g in greedy) >= 3, "the case needs utterances that decode to the guard"
        for mel, b, g in zip(mels, beam, greedy):
            empty = _per_token_logp(model, mel, [], with_eos=True)
            if len(g) == 25 and empty < _per_token_logp(model, mel, g, with_eos=False):
                # greedy decodes to the guard, better per token than stopping at once: the empty
                # transcript must not be what beam search returns (it was, for the first utterance)
                assert b and _per_token_logp(model, mel, b, with_eos=len(b) < 25) > empty, b
