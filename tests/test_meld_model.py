"""Properties of the MELD model: causality, KV cache, overfitting, checkpoint resume, losses."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_error, tiny_batch, tiny_meld

from meld.models.backbone import Backbone, packed_positions
from meld.models.meld import slowness_penalty
from meld.models.vocab import EOS, PAD
from meld.training import (
    build_optimizer,
    build_scheduler,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    train_step,
)

WEIGHTS = {"ce": 1.0, "mse_pre": 1.0, "mse_post": 1.0, "slowness": 0.2}


def test_tts_logits_are_causal_by_gradient():
    model, _ = tiny_meld()
    model.eval()
    batch = tiny_batch(B=1, T=10)
    mel = batch["mel"].clone().requires_grad_(True)
    out = model.forward_tts(batch["text"], batch["text_len"], mel, batch["mel_len"])
    for k in (1, 4, 8):
        (grad,) = torch.autograd.grad(out.logits[:, k].sum(), mel, retain_graph=True)
        assert grad[:, k:].abs().max() == 0, f"step {k} sees frames at or after {k}"
        assert grad[:, :k].abs().sum() > 0, f"step {k} ignores its past"


def test_stt_logits_are_causal_by_gradient():
    model, _ = tiny_meld()
    model.eval()
    batch = tiny_batch(B=1, T=6, L=5)
    emb = model.token_emb.weight
    out = model.forward_stt(batch["mel"], batch["mel_len"], batch["text"], batch["text_len"])
    (grad,) = torch.autograd.grad(out.logits[:, 2].sum(), emb)
    later = batch["text"][0, 2:] + model.vocab.text_offset
    earlier = batch["text"][0, :2] + model.vocab.text_offset
    only_later = [int(t) for t in later if int(t) not in {int(e) for e in earlier}]
    for t in only_later:
        assert grad[t].abs().max() == 0
    assert grad[earlier].abs().sum() > 0


def test_kv_cached_decoding_equals_full_pass_with_padding_gaps():
    torch.manual_seed(0)
    bb = Backbone(d_model=32, n_layers=3, n_heads=4, d_ff=64, dropout=0.0).eval()
    B, P, N = 3, 7, 6
    x = torch.randn(B, P + N, 32)
    valid = torch.ones(B, P + N, dtype=torch.bool)
    valid[1, 3:5] = False  # a gap in the middle (padded text block)
    valid[2, 5:P] = False  # a right-padded prompt
    positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
    full = bb(x, positions, valid)
    cache = bb.new_cache(B, P + N)
    prefix = bb(x[:, :P], positions[:, :P], valid[:, :P], cache)
    steps = [bb(x[:, t : t + 1], positions[:, t : t + 1], None, cache) for t in range(P, P + N)]
    inc = torch.cat([prefix] + steps, dim=1)
    rows = valid.nonzero(as_tuple=True)
    assert rel_error(inc[rows], full[rows]) <= 1e-5


def test_bidirectional_prefix_sees_ahead_inside_the_prefix_only_and_caches_the_same():
    torch.manual_seed(0)
    bb = Backbone(d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0).eval()
    B, P, N = 2, 6, 4
    x = torch.randn(B, P + N, 32, requires_grad=True)
    valid = torch.ones(B, P + N, dtype=torch.bool)
    valid[1, 4:P] = False  # a right-padded frame block
    positions = packed_positions(valid)
    full = bb(x, positions, valid, bidirectional_prefix=P)
    w = torch.randn(32)  # a random read-out: the plain sum of a LayerNorm output has no gradient

    def grad_of(row, slot):
        return torch.autograd.grad((full[row, slot] * w).sum(), x, retain_graph=True)[0][row].abs().sum(-1)

    g = grad_of(0, 1)
    assert g[2:P].min() > 0, "a prefix slot must see every later prefix slot"
    assert g[P:].max() == 0, "a prefix slot must not see the continuation"
    g = grad_of(0, P + 1)
    assert g[: P + 2].min() > 0 and g[P + 2 :].max() == 0, "after the prefix, attention stays causal"
    g = grad_of(1, 1)
    assert g[4:P].max() == 0 and g[2:4].min() > 0, "padding inside the prefix stays invisible"
    causal = bb(x, positions, valid)
    assert rel_error(causal[:, P:], full[:, P:]) > 1e-3  # the prefix really changes what follows

    cache = bb.new_cache(B, P + N)
    prefix = bb(x[:, :P], positions[:, :P], valid[:, :P], cache, bidirectional_prefix=P)
    steps = [bb(x[:, t : t + 1], positions[:, t : t + 1], None, cache, bidirectional_prefix=P)
             for t in range(P, P + N)]
    inc = torch.cat([prefix] + steps, dim=1)
    rows = valid.nonzero(as_tuple=True)
    assert rel_error(inc[rows], full[rows]) <= 1e-5


def test_kv_cache_select_keeps_rows_consistent():
    torch.manual_seed(0)
    bb = Backbone(d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0).eval()
    x = torch.randn(3, 6, 16)
    full = bb(x)
    cache = bb.new_cache(3, 6)
    bb(x[:, :4], cache=cache)
    cache.select(torch.tensor([0, 2]))
    out = torch.cat([bb(x[[0, 2], t : t + 1], torch.full((2, 1), t), None, cache) for t in (4, 5)], 1)
    assert rel_error(out, full[[0, 2], 4:]) <= 1e-5


def test_tiny_meld_overfits_a_fixed_batch():
    model, _ = tiny_meld(codebook_size=8)
    batch = tiny_batch(B=2, T=8)
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.0)
    sched = build_scheduler(opt, warmup=1, hold=10_000, decay=0)
    first, reached = None, None
    for step in range(1, 301):  # within 300 steps (it takes ~50): stop there, the rest is CI time
        m = train_step(model, opt, sched, batch, task="tts", loss_weights=WEIGHTS, grad_clip=10.0)
        first = first or m
        if m["loss/ce"] < first["loss/ce"] / 10 and m["loss/mse_post"] < first["loss/mse_post"] / 5:
            reached = step
            break
    assert reached is not None, f"after 300 steps: {m} (first step: {first})"


def test_checkpoint_resume_continues_identically(tmp_path):
    batches = [tiny_batch(B=2, T=8, seed=s) for s in range(6)]

    def run(model, opt, sched, steps):
        for b in steps:
            train_step(model, opt, sched, b, task="tts", loss_weights=WEIGHTS, grad_clip=10.0)

    def fresh():
        model, kwargs = tiny_meld(dropout=0.1)
        opt = build_optimizer(model, lr=1e-3, weight_decay=0.01)
        return model, kwargs, opt, build_scheduler(opt, 2, 2, 4)

    torch.manual_seed(123)
    ref, _, opt, sched = fresh()
    torch.manual_seed(123)
    run(ref, opt, sched, batches)

    torch.manual_seed(123)
    model, kwargs, opt, sched = fresh()
    torch.manual_seed(123)
    run(model, opt, sched, batches[:3])
    save_checkpoint(tmp_path / "step-3.pt", system="meld", model=model, model_kwargs=kwargs,
                    optimizer=opt, scheduler=sched, step=3)
    torch.manual_seed(999)  # whatever happens in between must not matter
    model2, _, opt2, sched2 = fresh()
    step = restore_training_state(load_checkpoint(tmp_path / "step-3.pt"), model2, opt2, sched2)
    assert step == 3
    run(model2, opt2, sched2, batches[3:])
    for (name, a), b in zip(ref.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


def test_slowness_penalty_is_lower_for_changing_frames():
    mask = torch.ones(1, 10, dtype=torch.bool)
    static = torch.ones(1, 10, 80)
    changing = torch.randn(1, 10, 80)
    assert float(slowness_penalty(static, mask)) == 1.0
    assert float(slowness_penalty(changing, mask)) < 0.5
    assert 0.0 <= float(slowness_penalty(changing * 100, mask)) <= 1.0


def test_generate_respects_guard_and_drops_finished(tmp_path):
    model, _ = tiny_meld(reduction=2)
    batch = tiny_batch(reduction=2, B=3, T=6)
    g = torch.Generator().manual_seed(0)
    gen = model.generate(batch["text"], batch["text_len"], batch["mel"], batch["mel_len"], max_frames=5,
                         top_k=4, top_p=0.9, temperature=1.0, repetition_penalty_value=1.3, generator=g)
    assert len(gen.frames) == 3
    for frames, hit, codes in zip(gen.frames, gen.hit_max_length, gen.codes):
        assert frames.shape[1] == 160 and frames.shape[0] <= 5
        assert hit == (frames.shape[0] == 5)
        assert all(0 <= c < 16 for c in codes)


def test_prefill_and_step_equal_full_pass_and_drop_the_mask_once_padding_leaves():
    torch.manual_seed(0)
    bb = Backbone(d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0).eval()
    B, P, N = 2, 6, 4
    x = torch.randn(B, P + N, 32)
    valid = torch.ones(B, P + N, dtype=torch.bool)
    valid[1, 2:P] = False  # row 1: a right-padded prompt of 2 tokens
    full = bb(x, packed_positions(valid), valid)
    last = torch.tensor([P - 1, 1])
    h, cache, pos = bb.prefill(x[:, :P], valid[:, :P], last, N)
    assert not cache.all_valid  # row 1's padding needs a mask
    assert rel_error(h, full[[0, 1], [P - 1, 1]]) <= 1e-5
    cache.select(torch.tensor([0]))
    assert cache.all_valid  # the padded row left: steps attend without a mask
    steps = [bb.step(x[[0], t], pos[[0]] + t - P, cache) for t in range(P, P + N)]
    assert rel_error(torch.stack(steps, 1), full[[0], P:]) <= 1e-5


def test_bfloat16_cache_decodes_close_to_float32_and_bad_dtypes_are_refused():
    import pytest

    from meld.config import ConfigError, EvaluateConfig
    from meld.models.backbone import check_cache_dtype

    torch.manual_seed(0)
    bb = Backbone(d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0).eval()
    B, P, N = 2, 6, 5
    x = torch.randn(B, P + N, 32)
    valid = torch.ones(B, P + N, dtype=torch.bool)
    valid[1, 2:P] = False  # a padded row: the masked attention path too
    last = torch.tensor([P - 1, 1])
    outs = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            h, cache, pos = bb.prefill(x[:, :P], valid[:, :P], last, N, cache_dtype=dtype)
            assert cache.kv.dtype == dtype and h.dtype == torch.float32  # only the cache changes dtype
            outs[dtype] = torch.stack([h] + [bb.step(x[:, t], pos + t - P, cache) for t in range(P, P + N)], 1)
    err = rel_error(outs[torch.bfloat16], outs[torch.float32])
    assert 0 < err <= 2e-2, err  # bf16 keys/values: close, not equal
    assert check_cache_dtype("bfloat16") is torch.bfloat16 and check_cache_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="KV cache dtype must be one of .*got 'float16'"):
        check_cache_dtype("float16")
    with pytest.raises(ConfigError, match="evaluate.kv_cache_dtype must be float32 or bfloat16"):
        EvaluateConfig.from_dict({"kv_cache_dtype": "half"}, "evaluate")


def test_meld_generates_with_a_bfloat16_cache():
    model, _ = tiny_meld(reduction=2)
    with torch.no_grad():
        model.head.bias[EOS] = -1e4  # no row stops early: every step of both runs is compared
    batch = tiny_batch(reduction=2, B=3, T=6)
    gens = {}
    for dtype in (None, torch.bfloat16):
        gens[dtype] = model.generate(batch["text"], batch["text_len"], batch["mel"], batch["mel_len"], max_frames=8,
                                     generator=torch.Generator().manual_seed(0), test_time_dropout=False,
                                     kv_cache_dtype=dtype)
    diffs = []
    for a, b in zip(gens[None].frames, gens[torch.bfloat16].frames):
        assert b.dtype == torch.float32 and torch.isfinite(b).all() and b.shape == a.shape == (8, 2 * 80)
        # the first (grouped) frame comes from the prefill, whose attention reads the cache in bf16 too:
        # close to the fp32 run's, and not identical (else the bf16 cache was not used)
        diffs.append((b[0] - a[0]).abs().max().item())
        assert diffs[-1] <= 0.1 * a[0].abs().max().item(), diffs
    assert max(diffs) > 0, diffs


def test_decoding_layout_keeps_values_and_outputs_and_training_still_works():
    from meld.models.backbone import prepare_for_decoding

    model, _ = tiny_meld(reduction=2)
    batch = tiny_batch(reduction=2, B=3, T=6)
    model.eval()
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(2, 5, model.backbone.d_model, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model.backbone(x)
        head_before = model.head(before)
    prepare_for_decoding(model)
    assert not model.training
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.stride() == (1, m.weight.shape[0]) for m in linears)  # (in, out)-contiguous
    for n, p in model.named_parameters():
        assert torch.equal(p, params_before[n]), n  # same values, same shapes
    with torch.no_grad():
        after = model.backbone(x)
        head_after = model.head(after)
    assert rel_error(after, before) <= 1e-5 and rel_error(head_after, head_before) <= 1e-5
    prepare_for_decoding(model)  # idempotent
    assert all(m.weight.stride() == (1, m.weight.shape[0]) for m in linears)
    # a model that has decoded can still be trained: its loss falls on a fixed batch
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.0)
    sched = build_scheduler(opt, warmup=1, hold=10_000, decay=0)
    first = train_step(model, opt, sched, batch, task="tts", loss_weights=WEIGHTS, grad_clip=10.0)
    for _ in range(30):
        last = train_step(model, opt, sched, batch, task="tts", loss_weights=WEIGHTS, grad_clip=10.0)
    assert last["loss/ce"] < first["loss/ce"]


def test_tts_head_gives_the_code_logits_of_the_full_head_in_both_layouts():
    from meld.models.backbone import prepare_for_decoding

    model, _ = tiny_meld(reduction=2)
    model.eval()
    h = torch.randn(4, model.backbone.d_model, generator=torch.Generator().manual_seed(5))
    for prepared in (False, True):
        if prepared:
            prepare_for_decoding(model)
        weight, bias = model._tts_head()
        assert weight.shape == (1 + model.codebook.shape[0], model.backbone.d_model)
        # the layout decoding chose is kept: (in, out)-contiguous once prepared, row-major before
        assert weight.stride() == ((1, weight.shape[0]) if prepared else (weight.shape[1], 1))
        with torch.no_grad():
            full, restricted = model._code_logits(h), model._code_logits(h, (weight, bias))
        assert restricted.shape == full.shape and rel_error(restricted, full) <= 1e-6


def test_decoding_kernels_switch_onednn_off_inside_only_and_agree():
    import torch.nn.functional as F

    from meld.models.backbone import decoding_kernels

    x = torch.randn(3, 1, 768, generator=torch.Generator().manual_seed(0)) * 3
    before = torch.backends.mkldnn.enabled
    reference = F.gelu(x)
    with decoding_kernels("cpu"):
        assert not torch.backends.mkldnn.enabled
        inside = F.gelu(x)
    assert torch.backends.mkldnn.enabled == before
    assert rel_error(inside, reference) <= 1e-6
    try:
        with decoding_kernels("cpu"):
            raise KeyboardInterrupt  # an interrupted generation must not leave oneDNN off
    except KeyboardInterrupt:
        pass
    assert torch.backends.mkldnn.enabled == before
    with decoding_kernels("meta"):  # off the CPU: left alone
        assert torch.backends.mkldnn.enabled == before


def test_keep_mask_dropout_matches_inverted_dropout_statistics():
    from meld.models.layers import keep_mask_dropout

    torch.manual_seed(0)
    x = torch.ones(200_000)
    y = keep_mask_dropout(x, 0.5)
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.5) < 0.01  # Bernoulli(1 - p) keep mask
    assert torch.all(y[kept] == 2.0)  # kept entries scaled by 1 / (1 - p)
    assert abs(float(y.mean()) - 1.0) < 0.02  # unbiased, as F.dropout
    assert torch.equal(keep_mask_dropout(x, 1.0), torch.zeros_like(x))
    assert abs(float((keep_mask_dropout(x, 0.1) != 0).float().mean()) - 0.9) < 0.01
    # its keep mask is rand >= p from the global generator: the same draws give the same output
    z = torch.randn(64, 7)
    torch.manual_seed(1)
    expected = z * (torch.rand_like(z) >= 0.3) * (1 / 0.7)
    torch.manual_seed(1)
    assert torch.equal(keep_mask_dropout(z, 0.3), expected)


def test_a_decoding_step_over_a_padded_cache_masks_exactly_the_padding():
    """The one-query step's mask is the cache's own key record: every real key before and at the query,
    no padded one, for each row (checked against the rule written out here), and the steps' outputs
    match a full pass over the padded sequence."""
    torch.manual_seed(0)
    bb = Backbone(d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0).eval()
    x = torch.randn(3, 7, 16)
    # padded prompts of 5 slots, then two decoded (real) tokens per row
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1, 1], [1, 1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    positions = valid.long().cumsum(1) - 1  # packed positions, as the full pass numbers them
    with torch.no_grad():
        full = bb(x, positions, valid)
        cache = bb.new_cache(3, 7)
        bb(x[:, :5], positions[:, :5], valid[:, :5], cache)
        assert not cache.all_valid
        outs = []
        for t in (5, 6):
            cache.admit(1)  # what the step records before building its mask
            mask = Backbone.attention_mask(1, None, cache)
            assert mask.shape == (3, 1, 1, t + 1) and torch.equal(mask[:, 0, 0], valid[:, : t + 1])
            outs.append(bb(x[:, t : t + 1], positions[:, t : t + 1], None, cache))
    assert rel_error(torch.cat(outs, 1), full[:, 5:]) <= 1e-5


def test_frames_holding_nan_are_refused_by_tts_and_stt_naming_their_row():
    """A NaN prompt reached the code sampler and failed inside multinomial; a NaN STT input made NaN
    logits that the beam search ranked. Both are refused before decoding, padding included (attention
    weighs a masked key 0, but 0 * NaN is NaN)."""
    import pytest

    from meld.generate import stt_beam_search

    model, _ = tiny_meld()
    model.eval()
    batch = tiny_batch(B=3, T=6)
    prompt_len = torch.tensor([6, 3, 0])
    bad = batch["mel"].clone()
    bad[1, 4, 0] = float("nan")  # row 1's padding
    with pytest.raises(ValueError, match=r"MELD.generate: prompt: row\(s\) \[1\] .*NaN or infinite"):
        model.generate(batch["text"], batch["text_len"], bad, prompt_len, max_frames=3)
    assert model.generate(batch["text"], batch["text_len"], batch["mel"], prompt_len, max_frames=3).codes
    mels = [batch["mel"][0].numpy(), batch["mel"][1, :3].numpy().copy()]
    mels[1][2, 5] = float("inf")
    # named by its index in the list, not its row in a batch (batches of one: it is row 0 of its own)
    with pytest.raises(ValueError, match=r"^stt_beam_search: mel 1 holds inf at frame 2, channel 5: normalised frames"):
        stt_beam_search(model, mels, reduction=1, beam_size=1, max_tokens=4, batch_size=1)


def _fill_padding(batch: dict, seed: int) -> dict:
    """The batch with every padded frame and text slot overwritten by large random values."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in batch.items()}
    for i in range(out["mel"].shape[0]):
        n, n_text = int(out["mel_len"][i]), int(out["text_len"][i])
        out["mel"][i, n:] = torch.randn(out["mel"][i, n:].shape, generator=g) * 1e3
        out["text"][i, n_text:] = torch.randint(-1000, 10**6, (out["text"].shape[1] - n_text,), generator=g)
    return out


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("task,reduction,extra", [
    ("tts", 1, {}),
    ("stt", 2, {"stt_ctc": True, "stt_frontend_layers": 1, "stt_bidirectional_frames": True}),
    ("joint", 2, {"stt_ctc": True, "stt_voice_warp": 0.1, "stt_speed_perturb": 0.1, "stt_spectral_tilt": 1.0}),
])
def test_losses_and_gradients_ignore_what_the_padding_holds(task, reduction, extra, training):
    """Padded frames and text slots filled with huge random values change no loss, and no loss has a
    gradient through a padded frame: masks, targets and the postnet's batch norm see real frames only
    (in training too, where dropout, SpecAugment and the q(z|x) draws come from seeded generators)."""
    model, _ = tiny_meld(reduction=reduction, dropout=0.1, postnet_dropout=0.1, **extra)
    model.train(training)
    batch = tiny_batch(reduction=reduction, B=4, T=10, L=6)
    runs = []
    for b in (batch, _fill_padding(batch, 0)):
        b["mel"].requires_grad_(True)
        torch.manual_seed(0)
        losses = model.compute_losses(b, task, torch.Generator().manual_seed(1))
        (grad,) = torch.autograd.grad(sum(losses.values()), b["mel"])
        runs.append((losses, grad))
    (clean, clean_grad), (noisy, noisy_grad) = runs
    assert clean.keys() == noisy.keys()
    for name in clean:
        assert torch.isfinite(noisy[name]) and rel_error(noisy[name], clean[name]) <= 1e-5, name
    padded = ~(torch.arange(batch["mel"].shape[1])[None, :] < batch["mel_len"][:, None])
    assert padded.any() and noisy_grad[padded].abs().max() == 0, "a loss reaches a padded frame"
    assert rel_error(noisy_grad[~padded], clean_grad[~padded]) <= 1e-4


def test_tts_and_stt_targets_line_up_with_the_frames_and_tokens_they_name():
    """Step t's TTS target is frame t's code (then <EOS> at the length, PAD beyond), and the frame
    reconstructed at step t is built from that code: changing frame t's code changes x_hat_t and no
    earlier frame. STT's targets are the text shifted past <STT>, then <EOS>."""
    model, _ = tiny_meld(q_temperature=1e-4)  # q(z|x) is the nearest centroid
    model.eval()
    batch = tiny_batch(B=3, T=7)
    K, off = model.codebook.shape[0], model.vocab.code_offset
    codes = torch.randint(0, K, batch["mel"].shape[:2], generator=torch.Generator().manual_seed(2))
    mel = model.codebook[codes] + 0.01 * batch["mel"]  # each frame next to a known centroid
    out = model.forward_tts(batch["text"], batch["text_len"], mel, batch["mel_len"])
    for i, n in enumerate(batch["mel_len"].tolist()):
        assert out.targets[i, :n].tolist() == (codes[i, :n] + off).tolist()
        assert out.targets[i, n] == EOS and (out.targets[i, n + 1:] == PAD).all()
    t = 3
    moved = mel.clone()
    moved[:, t] = model.codebook[(codes[:, t] + 1) % K]
    out2 = model.forward_tts(batch["text"], batch["text_len"], moved, batch["mel_len"])
    assert torch.equal(out2.mel_pre[:, :t], out.mel_pre[:, :t])  # the past does not see frame t
    assert (out2.mel_pre[:, t] - out.mel_pre[:, t]).abs().amax(-1).min() > 0  # x_hat_t uses z_t

    stt = model.forward_stt(batch["mel"], batch["mel_len"], batch["text"], batch["text_len"])
    for i, n in enumerate(batch["text_len"].tolist()):
        assert stt.targets[i, :n].tolist() == (batch["text"][i, :n] + model.vocab.text_offset).tolist()
        assert stt.targets[i, n] == EOS and (stt.targets[i, n + 1:] == PAD).all()


def test_q_posterior_draws_follow_softmax_of_negative_squared_distance_over_tau():
    model, _ = tiny_meld(codebook_size=4, q_temperature=2.0)
    model.set_codebook(torch.zeros(4, 80))
    with torch.no_grad():
        model.codebook[1, 0], model.codebook[2, 0], model.codebook[3, 0] = 1.0, 1.5, 3.0
    x = torch.zeros(20_000, 80)
    z = model.quantise(x, torch.Generator().manual_seed(0))
    freq = torch.bincount(z, minlength=4).double() / len(z)
    want = torch.softmax(-torch.tensor([0.0, 1.0, 2.25, 9.0], dtype=torch.float64) / 2.0, -1)
    se = torch.sqrt(want * (1 - want) / len(z))
    assert torch.all((freq - want).abs() <= 5 * se + 1e-4), (freq, want)


def test_slowness_penalty_counts_only_steps_between_real_frames():
    """Static real frames followed by wildly changing padding: still the static value, 1; a row whose
    frames change and a static row average over their real steps, whatever their lengths."""
    frames = torch.ones(2, 8, 80)
    frames[0, 5:] = torch.randn(3, 80) * 100  # padding of row 0
    mask = torch.tensor([[True] * 5 + [False] * 3, [True] * 8])
    assert float(slowness_penalty(frames, mask)) == 1.0
    frames[1] = torch.randn(8, 80) * 100  # row 1 now changes at each of its 7 steps: exp(-huge) = 0
    assert float(slowness_penalty(frames, mask)) == pytest.approx(4 / 11)  # 4 static steps of 11 real ones


def test_zero_latent_ignores_the_sampled_code_and_test_time_dropout_is_random():
    """The zero-latent ablation reconstructs without E(c_z): one step's frame is the same whatever code was
    drawn. Test-time dropout draws its masks from the global generator: it changes the frames, and they
    repeat once that generator is reseeded."""
    model, _ = tiny_meld(reduction=2)
    with torch.no_grad():
        model.head.bias[EOS] = -1e4  # no row stops early
    batch = tiny_batch(reduction=2, B=2, T=6)

    def run(seed, **kw):
        torch.manual_seed(100)
        gen = model.generate(batch["text"], batch["text_len"], batch["mel"], batch["mel_len"], max_frames=1,
                             generator=torch.Generator().manual_seed(seed), **kw)
        return torch.stack(gen.frames), gen.codes

    seeds = range(8)
    plain = [run(s, test_time_dropout=False) for s in seeds]
    zeroed = [run(s, test_time_dropout=False, zero_latent=True) for s in seeds]
    assert len({tuple(map(tuple, codes)) for _, codes in plain}) > 1  # the draws differ
    assert len({f.sum().item() for f, _ in plain}) > 1  # ... and so do the frames built from them
    assert all(torch.equal(f, zeroed[0][0]) for f, _ in zeroed)  # ... unless the latent is zeroed

    def frames_with_dropout(global_seed):
        torch.manual_seed(global_seed)
        return torch.stack(model.generate(batch["text"], batch["text_len"], batch["mel"], batch["mel_len"],
                                          max_frames=1, generator=torch.Generator().manual_seed(0),
                                          zero_latent=True).frames)
    assert torch.equal(frames_with_dropout(1), frames_with_dropout(1))
    assert not torch.equal(frames_with_dropout(1), frames_with_dropout(2))


def test_each_row_of_a_padded_batch_gets_what_it_gets_alone():
    """Text padding sits inside the sequence (before <TTS>) and frame padding before <STT>: the key mask
    and the packed positions make each row's logits and reconstructions those of the row alone."""
    model, _ = tiny_meld(reduction=2, stt_frontend_layers=1, q_temperature=1e-4)  # z: the nearest code, no draw
    model.eval()
    batch = tiny_batch(reduction=2, B=3, T=8, L=6)
    tts = model.forward_tts(batch["text"], batch["text_len"], batch["mel"], batch["mel_len"])
    stt = model.forward_stt(batch["mel"], batch["mel_len"], batch["text"], batch["text_len"])
    for i in range(3):
        n, n_text = int(batch["mel_len"][i]), int(batch["text_len"][i])
        alone = {k: v[i : i + 1] for k, v in batch.items()}
        alone["mel"], alone["text"] = alone["mel"][:, :n], alone["text"][:, :n_text]
        one = model.forward_tts(alone["text"], alone["text_len"], alone["mel"], alone["mel_len"])
        assert rel_error(tts.logits[i, : n + 1], one.logits[0]) <= 1e-5
        assert rel_error(tts.mel_post[i, :n], one.mel_post[0]) <= 1e-5
        one = model.forward_stt(alone["mel"], alone["mel_len"], alone["text"], alone["text_len"])
        assert rel_error(stt.logits[i, : n_text + 1], one.logits[0]) <= 1e-5


def test_lengths_that_do_not_fit_their_tensors_are_refused():
    """As for the baselines: a prompt length past the prompt tensor failed deep in the prefill, a negative
    one continued from a text token's state, a text or frame length past its tensor read padding as
    input. Each is refused before decoding, naming the input and the row."""
    model, _ = tiny_meld()
    model.eval()
    batch = tiny_batch(B=2, T=4, L=5)
    for name, text_len, prompt_len, row in (("prompt_len", [5, 4], [4, 5], 1), ("prompt_len", [5, 4], [-1, 2], 0),
                                            ("text_len", [6, 4], [4, 2], 0)):
        with pytest.raises(ValueError, match=rf"MELD.generate: {name}\[{row}\] = -?\d+ is outside \[0, \d+\]"):
            model.generate(batch["text"], torch.tensor(text_len), batch["mel"], torch.tensor(prompt_len), max_frames=2)
    with pytest.raises(ValueError, match=r"MELD.generate: text has 1 rows and prompt 2"):
        model.generate(batch["text"][:1], batch["text_len"][:1], batch["mel"], torch.tensor([4, 2]), max_frames=2)
    with pytest.raises(ValueError, match=r"MELD STT: mel_len\[0\] = 9 is outside \[0, 4\]"):
        model.stt_prefix(batch["mel"], torch.tensor([9, 2]), max_new=2)
