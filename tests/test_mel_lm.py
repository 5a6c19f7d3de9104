"""Properties of Mel-LM (decoder-only Tacotron 2): causality, KV cache, overfitting, checkpoints, stop."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ScheduledStop, batch_and_each_row_alone, rel_error, tiny_batch

from meld.config import ModelConfig
from meld.models.mel_lm import MelLM, mel_lm_kwargs, stop_bce
from meld.training import build_optimizer, build_scheduler, load_checkpoint, save_checkpoint, train_step

TINY_MEL_LM = dict(
    d_model=32,
    n_layers=2,
    n_heads=4,
    d_ff=64,
    dropout=0.0,
    encoder_hidden=32,
    encoder_dropout=0.5,
    postnet_channels=16,
    postnet_kernel=5,
    postnet_layers=3,
    postnet_dropout=0.0,
)
WEIGHTS = {"mse_pre": 1.0, "mse_post": 1.0, "slowness": 0.2, "stop": 1.0}


def tiny_mel_lm(reduction: int = 1, n_text: int = 20, seed: int = 0, **over) -> tuple[MelLM, dict]:
    torch.manual_seed(seed)
    kwargs = {**TINY_MEL_LM, **over, "n_text": n_text, "frame_dim": 80 * reduction}
    return MelLM(**kwargs), kwargs


pytestmark = pytest.mark.usefixtures("one_thread")


def test_predictions_are_causal_by_gradient():
    model, _ = tiny_mel_lm()
    model.eval()
    batch = tiny_batch(B=1, T=10)
    mel = batch["mel"].clone().requires_grad_(True)
    out = model.forward_tts(batch["text"], batch["text_len"], mel, batch["mel_len"])
    for k in (1, 4, 8):
        for name, pred in (("frame", out.mel_pre[:, k]), ("stop", out.stop_logits[:, k])):
            (grad,) = torch.autograd.grad(pred.sum(), mel, retain_graph=True)
            assert grad[:, k:].abs().max() == 0, f"{name} prediction {k} sees frames at or after {k}"
            assert grad[:, :k].abs().sum() > 0, f"{name} prediction {k} ignores its past"


def test_kv_cached_generation_equals_full_teacher_forced_pass():
    model, _ = tiny_mel_lm(reduction=2)
    batch = tiny_batch(reduction=2, B=3, T=5)
    prompt_len = torch.tensor([5, 2, 0])  # a full, a right-padded and an empty prompt
    model.stop_head = ScheduledStop({2, 4})  # rows leave the batch after 2 and 4 frames
    gen = model.generate(
        batch["text"], batch["text_len"], batch["mel"], prompt_len, max_frames=6, test_time_dropout=False
    )
    assert [f.shape[0] for f in gen.frames_pre] == [2, 4, 6]
    assert gen.hit_max_length == [False, False, True]
    seqs = [torch.cat([batch["mel"][b, : prompt_len[b]], gen.frames_pre[b]]) for b in range(3)]
    mel_len = torch.tensor([s.shape[0] for s in seqs])
    mel = torch.zeros(3, int(mel_len.max()), 160)
    for b, s in enumerate(seqs):
        mel[b, : s.shape[0]] = s
    with torch.no_grad():
        out = model.forward_tts(batch["text"], batch["text_len"], mel, mel_len)
    for b in range(3):
        p, n = int(prompt_len[b]), gen.frames_pre[b].shape[0]
        assert rel_error(gen.frames_pre[b], out.mel_pre[b, p : p + n]) <= 1e-5, f"row {b}"
        # one padded postnet call for the batch: equal to the utterance alone up to float rounding
        torch.testing.assert_close(gen.frames[b], model.postnet(gen.frames_pre[b][None])[0], rtol=1e-5, atol=1e-6)


def test_stop_predictor_ends_generation():
    model, _ = tiny_mel_lm(reduction=3)
    batch = tiny_batch(reduction=3, B=2, T=4)
    with torch.no_grad():
        model.stop_head.weight.zero_()
        model.stop_head.bias.fill_(20.0)
    gen = model.generate(batch["text"], batch["text_len"], batch["mel"], batch["mel_len"], max_frames=5)
    assert [f.shape for f in gen.frames] == [torch.Size([0, 240])] * 2
    assert gen.hit_max_length == [False, False] and gen.codes == [[], []]
    with torch.no_grad():
        model.stop_head.bias.fill_(-20.0)
    empty_prompt = batch["mel"][:, :0]
    gen = model.generate(
        batch["text"], batch["text_len"], empty_prompt, torch.zeros(2, dtype=torch.long), max_frames=5
    )
    assert [f.shape for f in gen.frames] == [torch.Size([5, 240])] * 2
    assert gen.hit_max_length == [True, True]


def test_stop_bce_matches_hand_computation():
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.3], [1.5, -0.2, 9.0, 9.0]])
    mel_len = torch.tensor([3, 1])  # steps 0..3 and 0..1 are real; the stop is at step 3 and step 1
    pw = 7.0

    def bce(x, y):
        s = torch.sigmoid(torch.tensor(x))
        return float(-(pw * y * torch.log(s) + (1 - y) * torch.log(1 - s)))

    terms = [bce(0.5, 0), bce(-1.0, 0), bce(2.0, 0), bce(0.3, 1), bce(1.5, 0), bce(-0.2, 1)]
    assert float(stop_bce(logits, mel_len, pw)) == pytest.approx(sum(terms) / len(terms), rel=1e-6)


def test_tiny_mel_lm_overfits_a_fixed_batch():
    model, _ = tiny_mel_lm(encoder_dropout=0.1)
    batch = tiny_batch(B=2, T=8)
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.0)
    sched = build_scheduler(opt, warmup=1, hold=10_000, decay=0)
    first = last = None
    for _ in range(80):
        last = train_step(model, opt, sched, batch, task="tts", loss_weights=WEIGHTS, grad_clip=10.0)
        first = first or last
    assert last["loss/mse_post"] < first["loss/mse_post"] / 10
    assert last["loss/stop"] < first["loss/stop"] / 10


def test_checkpoint_round_trip_rebuilds_an_identical_model(tmp_path):
    kwargs = mel_lm_kwargs(
        ModelConfig(
            d_model=32,
            n_heads=4,
            n_layers=2,
            d_ff=64,
            encoder_hidden=32,
            postnet_channels=16,
            postnet_layers=3,
            reduction_factor=2,
        ),
        n_text=20,
    )
    kwargs = json.loads(json.dumps(kwargs))  # stored as JSON-able model_kwargs
    torch.manual_seed(0)
    model = MelLM(**kwargs)
    batch = tiny_batch(reduction=2, B=2, T=6)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    train_step(
        model, opt, build_scheduler(opt, 1, 10, 0), batch, task="tts", loss_weights=WEIGHTS, grad_clip=10.0
    )
    save_checkpoint(tmp_path / "model.pt", system=model.system, model=model, model_kwargs=kwargs, step=1)

    state = load_checkpoint(tmp_path / "model.pt")
    assert state["system"] == "mel_lm"
    clone = MelLM(**state["model_kwargs"])
    clone.load_state_dict(state["model"])
    outs = []
    for m in (model, clone):
        m.eval()
        torch.manual_seed(3)  # test-time dropout draws from the global RNG
        gen = m.generate(batch["text"], batch["text_len"], batch["mel"], batch["mel_len"], max_frames=4)
        with torch.no_grad():
            losses = m.compute_losses(batch)
        outs.append((gen, losses))
    (g1, l1), (g2, l2) = outs
    for a, b in zip(g1.frames, g2.frames):
        assert torch.equal(a, b)
    assert all(torch.equal(l1[k], l2[k]) for k in l1)


def test_only_tts_is_supported():
    model, _ = tiny_mel_lm()
    with pytest.raises(ValueError, match="TTS-only"):
        model.compute_losses(tiny_batch(), task="stt")


def test_postnet_over_a_padded_batch_gives_each_utterance_what_it_gets_alone():
    """Generation refines all its utterances in one masked postnet call: padding must not reach a real
    frame through any of the stacked convs (each conv sees 2 neighbours a side, so without re-masking
    between layers the last frames of a short utterance would change)."""
    from meld.models.layers import Postnet

    torch.manual_seed(0)
    postnet = Postnet(dim=12, channels=16, kernel=5, n_layers=4, dropout=0.5).eval()
    with torch.no_grad():
        for m in postnet.modules():
            if isinstance(m, torch.nn.BatchNorm1d):  # statistics away from the identity, so padding would show
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.bias.normal_()
    frames = [torch.randn(n, 12) for n in (9, 0, 1, 3, 7)]
    with torch.no_grad():
        batched = postnet.refine_each(frames)
        alone = [postnet(f[None])[0] if len(f) else f for f in frames]
        unmasked = postnet(torch.nn.utils.rnn.pad_sequence(frames, batch_first=True))  # the leak it prevents
    assert [b.shape for b in batched] == [f.shape for f in frames]
    for b, a in zip(batched, alone):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[3, :3], alone[3], atol=1e-3)
    assert postnet.refine_each([]) == []


def test_postnet_training_statistics_ignore_padding():
    """In training, batch norm's batch statistics (and so the real frames' outputs, the losses and the
    running statistics inference uses) do not depend on how much padding the batch has; with nothing
    padded it is plain batch norm."""
    from meld.models.layers import MaskedBatchNorm1d, Postnet

    torch.manual_seed(0)
    postnet = Postnet(dim=12, channels=16, kernel=5, n_layers=3, dropout=0.0).train()
    fresh = {k: v.clone() for k, v in postnet.state_dict().items()}
    frames = [torch.randn(n, 12) for n in (9, 4)]

    def run(extra_padding: int):
        postnet.load_state_dict(fresh)
        x = torch.nn.utils.rnn.pad_sequence(frames, batch_first=True)
        x = torch.nn.functional.pad(x, (0, 0, 0, extra_padding))
        mask = torch.arange(x.shape[1])[None, :] < torch.tensor([9, 4])[:, None]
        y = postnet(x, mask)
        stats = [(m.running_mean.clone(), m.running_var.clone()) for m in postnet.modules()
                 if isinstance(m, MaskedBatchNorm1d)]
        return [y[0, :9], y[1, :4]], stats

    tight, tight_stats = run(0)
    loose, loose_stats = run(20)
    for a, b in zip(tight, loose):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for (m1, v1), (m2, v2) in zip(tight_stats, loose_stats):
        torch.testing.assert_close(m1, m2)
        torch.testing.assert_close(v1, v2)

    # nothing padded: the same outputs and running statistics as torch's own batch norm
    norm = MaskedBatchNorm1d(16).train()
    plain = torch.nn.BatchNorm1d(16).train()
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    plain.load_state_dict(norm.state_dict())
    y = torch.randn(3, 16, 10) * 2 + 1
    torch.testing.assert_close(norm(y, torch.ones(3, 1, 10)), plain(y), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.running_mean, plain.running_mean)
    torch.testing.assert_close(norm.running_var, plain.running_var)
    assert norm.num_batches_tracked == plain.num_batches_tracked == 1


def test_masked_batch_norm_counts_in_float32_under_bf16():
    """Under bf16 autocast the postnet's activations are bf16: the frame count and sums must not be
    (a bf16 count of 3,176 frames is 3,168), or the running statistics drift from the float32 ones."""
    from meld.models.layers import MaskedBatchNorm1d

    torch.manual_seed(0)
    y = torch.randn(2, 4, 1600) * 3 + 5
    keep = torch.ones(2, 1, 1600)
    keep[1, :, 1576:] = 0  # 3,176 real frames
    stats = []
    for dtype in (torch.float32, torch.bfloat16):
        norm = MaskedBatchNorm1d(4, momentum=1.0).train()  # running statistics = this batch's
        out = norm(y.to(dtype), keep.to(dtype))
        assert out.dtype == dtype
        stats.append((norm.running_mean.clone(), norm.running_var.clone()))
    # only the bf16 rounding of the inputs themselves remains (~0.4 % of a value, averaged out)
    torch.testing.assert_close(stats[1][0], stats[0][0], rtol=1e-3, atol=0)
    torch.testing.assert_close(stats[1][1], stats[0][1], rtol=2e-3, atol=0)


@pytest.mark.parametrize("system", ["mel_lm", "melle"])
def test_a_prompt_holding_nan_is_refused_naming_its_row(system):
    """A NaN prompt frame used to be continued silently with NaN frames up to the length guard; it is
    refused before decoding, naming the row. So is NaN in a row's padding, which attention would spread
    (a masked key weighs 0, but 0 * NaN is NaN); infinity too."""
    from test_melle import tiny_melle

    model, _ = (tiny_mel_lm if system == "mel_lm" else tiny_melle)()
    batch = tiny_batch(B=3, T=6)
    prompt_len = torch.tensor([6, 3, 0])
    kwargs = dict(max_frames=3, test_time_dropout=False, zero_latent=True)
    gen = model.generate(batch["text"], batch["text_len"], batch["mel"], prompt_len, **kwargs)
    assert all(torch.isfinite(f).all() for f in gen.frames)
    for row, frame, value in ((1, 2, float("nan")), (1, 4, float("nan")), (0, 5, float("-inf")), (2, 0, float("inf"))):
        bad = batch["mel"].clone()
        bad[row, frame, 7] = value  # row 1's frame 4 and row 2's frame 0 are padding
        with pytest.raises(ValueError, match=rf"generate: prompt: row\(s\) \[{row}\] .*NaN or infinite"):
            model.generate(batch["text"], batch["text_len"], bad, prompt_len, **kwargs)


@pytest.mark.parametrize("weight", [0.0, -100.0, float("inf"), float("nan")])
def test_a_stop_weight_that_cannot_teach_the_stop_is_refused(weight):
    """With a positive class weight of 0 (or below) the stop predictor learns never to stop (or is pushed
    to), and every utterance runs to the length guard: a clear error at build time instead."""
    from test_melle import tiny_melle

    for build in (tiny_mel_lm, tiny_melle):
        with pytest.raises(ValueError, match="stop_pos_weight must be a positive finite number"):
            build(stop_pos_weight=weight)


@pytest.mark.parametrize("system", ["mel_lm", "melle"])
def test_a_batch_of_different_prompts_stops_each_row_where_it_stops_alone(system):
    """Prompts of different lengths (one empty) in one batch, each ended by the stop predictor itself at
    its own step: every row gets exactly what it gets decoded alone (frames, stop, guard)."""
    from test_melle import tiny_melle

    model, _ = (tiny_mel_lm if system == "mel_lm" else tiny_melle)(seed=1)
    with torch.no_grad():  # a sharp stop predictor that fires after a few steps, at a different one per row
        model.stop_head.weight.mul_(8.0)
        model.stop_head.bias.fill_(-3.0)
    batch = tiny_batch(B=3, T=7, seed=1)
    prompt_len = torch.tensor([7, 3, 0])
    kwargs = dict(max_frames=12, test_time_dropout=False, zero_latent=True)
    together, alone = batch_and_each_row_alone(model, batch, prompt_len, **kwargs)
    for i, one in enumerate(alone):
        assert one.frames[0].shape == together.frames[i].shape, f"row {i}"
        torch.testing.assert_close(together.frames[i], one.frames[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("system", ["mel_lm", "melle"])
def test_lengths_that_do_not_fit_their_tensors_are_refused(system):
    """A prompt length past the prompt tensor was an IndexError deep in the backbone's prefill, and a
    negative one silently continued from a text token's hidden state; a text length past the text tensor
    read its padding as text. Each is refused before decoding, naming the input and the row."""
    from test_melle import tiny_melle

    model, _ = (tiny_mel_lm if system == "mel_lm" else tiny_melle)()
    batch = tiny_batch(B=2, T=4, L=5)
    kwargs = dict(max_frames=3, test_time_dropout=False, zero_latent=True)
    for name, text_len, prompt_len, row in (("prompt_len", [5, 4], [4, 5], 1), ("prompt_len", [5, 4], [-1, 2], 0),
                                            ("text_len", [6, 4], [4, 2], 0), ("text_len", [5, -2], [4, 2], 1)):
        with pytest.raises(ValueError, match=rf"generate: {name}\[{row}\] = -?\d+ is outside \[0, \d+\]"):
            model.generate(batch["text"], torch.tensor(text_len), batch["mel"], torch.tensor(prompt_len), **kwargs)
    with pytest.raises(ValueError, match=r"generate: prompt_len has 3 entries for a batch of 2"):
        model.generate(batch["text"], batch["text_len"], batch["mel"], torch.tensor([4, 2, 1]), **kwargs)
    with pytest.raises(ValueError, match=r"generate: text has 1 rows and prompt 2"):
        model.generate(batch["text"][:1], batch["text_len"][:1], batch["mel"], torch.tensor([4, 2]), **kwargs)
