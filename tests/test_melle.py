"""Properties of MELLE: causality, KV cache, losses by hand, KL/flux schedule, overfitting, checkpoints, stop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ScheduledStop, rel_error, tiny_batch
from torch import nn
from torch.distributions import Normal, kl_divergence

from meld.config import ModelConfig
from meld.models.mel_lm import stop_bce
from meld.models.melle import MELLE, gaussian_kl_to_target, melle_kwargs, spectrogram_flux
from meld.training import build_optimizer, build_scheduler, load_checkpoint, save_checkpoint, train_step

TINY_MELLE = dict(
    d_model=32,
    n_layers=2,
    n_heads=4,
    d_ff=64,
    dropout=0.0,
    encoder_hidden=32,
    encoder_dropout=0.5,
    latent_hidden=32,
    postnet_channels=16,
    postnet_kernel=5,
    postnet_layers=3,
    postnet_dropout=0.0,
)
WEIGHTS = {
    "l1_pre": 1.0,
    "mse_pre": 1.0,
    "l1_post": 1.0,
    "mse_post": 1.0,
    "kl": 0.1,
    "flux": 0.5,
    "stop": 1.0,
}


def tiny_melle(reduction: int = 1, n_text: int = 20, seed: int = 0, **over) -> tuple[MELLE, dict]:
    torch.manual_seed(seed)
    kwargs = {**TINY_MELLE, **over, "n_text": n_text, "frame_dim": 80 * reduction}
    return MELLE(**kwargs), kwargs


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- model properties
def test_predictions_are_causal_by_gradient():
    model, _ = tiny_melle()
    model.eval()
    batch = tiny_batch(B=1, T=10)
    mel = batch["mel"].clone().requires_grad_(True)
    out = model.forward_tts(batch["text"], batch["text_len"], mel, batch["mel_len"], zero_latent=True)
    for k in (1, 4, 8):
        preds = {
            "mu": out.mu[:, k],
            "logvar": out.logvar[:, k],
            "frame": out.mel_pre[:, k],
            "stop": out.stop_logits[:, k],
        }
        for name, pred in preds.items():
            (grad,) = torch.autograd.grad(pred.sum(), mel, retain_graph=True)
            assert grad[:, k:].abs().max() == 0, f"{name} prediction {k} sees frames at or after {k}"
            assert grad[:, :k].abs().sum() > 0, f"{name} prediction {k} ignores its past"


def test_kv_cached_generation_equals_full_teacher_forced_pass():
    model, _ = tiny_melle(reduction=2)
    batch = tiny_batch(reduction=2, B=3, T=5)
    prompt_len = torch.tensor([5, 2, 0])  # a full, a right-padded and an empty prompt
    model.stop_head = ScheduledStop({2, 4})  # rows leave the batch after 2 and 4 frames
    gen = model.generate(
        batch["text"],
        batch["text_len"],
        batch["mel"],
        prompt_len,
        max_frames=6,
        test_time_dropout=False,
        zero_latent=True,
    )
    assert [f.shape[0] for f in gen.frames_pre] == [2, 4, 6]
    assert gen.hit_max_length == [False, False, True]
    seqs = [torch.cat([batch["mel"][b, : prompt_len[b]], gen.frames_pre[b]]) for b in range(3)]
    mel_len = torch.tensor([s.shape[0] for s in seqs])
    mel = torch.zeros(3, int(mel_len.max()), 160)
    for b, s in enumerate(seqs):
        mel[b, : s.shape[0]] = s
    with torch.no_grad():
        out = model.forward_tts(batch["text"], batch["text_len"], mel, mel_len, zero_latent=True)
    for b in range(3):
        p, n = int(prompt_len[b]), gen.frames_pre[b].shape[0]
        assert rel_error(gen.frames_pre[b], out.mel_pre[b, p : p + n]) <= 1e-5, f"row {b}"
        # one padded postnet call for the batch: equal to the utterance alone up to float rounding
        torch.testing.assert_close(gen.frames[b], model.postnet(gen.frames_pre[b][None])[0], rtol=1e-5, atol=1e-6)


def test_stop_predictor_ends_generation_and_sampling_is_seeded():
    model, _ = tiny_melle(reduction=3)
    batch = tiny_batch(reduction=3, B=2, T=4)
    with torch.no_grad():
        model.stop_head.weight.zero_()
        model.stop_head.bias.fill_(20.0)
    gen = model.generate(batch["text"], batch["text_len"], batch["mel"], batch["mel_len"], max_frames=5)
    assert [f.shape for f in gen.frames] == [torch.Size([0, 240])] * 2
    assert gen.hit_max_length == [False, False] and gen.codes == [[], []]

    with torch.no_grad():
        model.stop_head.bias.fill_(-20.0)

    def run(seed: int, zero_latent: bool = False):
        g = torch.Generator().manual_seed(seed)
        return model.generate(
            batch["text"],
            batch["text_len"],
            batch["mel"],
            batch["mel_len"],
            max_frames=5,
            test_time_dropout=False,
            zero_latent=zero_latent,
            generator=g,
        )

    a, b, c, mean = run(0), run(0), run(1), run(0, zero_latent=True)
    assert [f.shape for f in a.frames] == [torch.Size([5, 240])] * 2 and a.hit_max_length == [True, True]
    assert all(torch.equal(x, y) for x, y in zip(a.frames, b.frames))  # the generator drives eps
    assert not torch.allclose(a.frames[0], c.frames[0])
    assert not torch.allclose(a.frames[0], mean.frames[0])


# ---------------------------------------------------------------------- losses by hand
def test_gaussian_kl_to_target_matches_hand_computation():
    mu = torch.tensor([[[0.5, -1.0], [2.0, 0.0]], [[1.0, 1.0], [9.0, 9.0]]])
    logvar = torch.tensor([[[0.0, math.log(4.0)], [-1.0, 0.5]], [[0.2, -0.3], [7.0, 7.0]]])
    y = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[0.5, -0.5], [0.0, 0.0]]])
    mask = torch.tensor([[True, True], [True, False]])  # the last frame of utterance 2 is padding

    def kl(m, lv, t):  # KL(N(m, e^lv) || N(t, 1)) for one channel
        return 0.5 * (math.exp(lv) + (m - t) ** 2 - 1 - lv)

    terms = [
        kl(mu[b, t, d].item(), logvar[b, t, d].item(), y[b, t, d].item())
        for b, t in ((0, 0), (0, 1), (1, 0))
        for d in range(2)
    ]
    assert float(gaussian_kl_to_target(mu, logvar, y, mask)) == pytest.approx(sum(terms) / 6, rel=1e-6)
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(y, torch.ones_like(y)))[mask].mean()
    assert float(gaussian_kl_to_target(mu, logvar, y, mask)) == pytest.approx(float(ref), rel=1e-6)


def test_spectrogram_flux_matches_hand_computation():
    mu = torch.tensor([[[0.0, 0.0], [1.0, 3.0], [2.0, -1.0]], [[5.0, 5.0], [0.5, 0.0], [7.0, 7.0]]])
    y = torch.tensor([[[1.0, 1.0], [0.0, 2.0], [4.0, 4.0]], [[0.0, 1.0], [3.0, 3.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # steps t >= 1 with frames t and t-1 real: (0,1), (0,2), (1,1); mean over channels of |mu_t - y_{t-1}|
    steps = [(abs(1 - 1) + abs(3 - 1)) / 2, (abs(2 - 0) + abs(-1 - 2)) / 2, (abs(0.5 - 0) + abs(0 - 1)) / 2]
    assert float(spectrogram_flux(mu, y, mask)) == pytest.approx(-sum(steps) / 3, rel=1e-6)
    static = y[:, :1].expand(-1, 3, -1)  # predicting the previous frame scores 0, moving away scores < 0
    assert float(spectrogram_flux(static, static, torch.ones(2, 3, dtype=torch.bool))) == 0.0


def test_stop_bce_with_positive_weight_100_matches_hand_computation():
    logits = torch.tensor([[-2.0, -3.0, 1.0], [0.5, 4.0, 9.0]])
    mel_len = torch.tensor([2, 0])  # utterance 1: steps 0..2, stop at 2; utterance 2: stop at step 0

    def bce(x, y):
        p = 1 / (1 + math.exp(-x))
        return -(100 * y * math.log(p) + (1 - y) * math.log(1 - p))

    terms = [bce(-2.0, 0), bce(-3.0, 0), bce(1.0, 1), bce(0.5, 1)]
    assert float(stop_bce(logits, mel_len, 100.0)) == pytest.approx(sum(terms) / 4, rel=1e-6)


def test_compute_losses_wires_each_term_to_its_definition():
    model, _ = tiny_melle(kl_start_step=0)
    model.eval()
    batch = tiny_batch(B=2, T=5)
    with torch.no_grad():
        losses = model.compute_losses(batch, generator=torch.Generator().manual_seed(7))
        out = model.forward_tts(
            batch["text"],
            batch["text_len"],
            batch["mel"],
            batch["mel_len"],
            generator=torch.Generator().manual_seed(7),
        )
    y, mask, n = batch["mel"], out.frame_mask, batch["mel_len"]
    expect = {
        "l1_pre": (out.mel_pre - y).abs()[mask].mean(),
        "mse_pre": (out.mel_pre - y).pow(2)[mask].mean(),
        "l1_post": (out.mel_post - y).abs()[mask].mean(),
        "mse_post": (out.mel_post - y).pow(2)[mask].mean(),
        "kl": kl_divergence(Normal(out.mu, (0.5 * out.logvar).exp()), Normal(y, torch.ones_like(y)))[
            mask
        ].mean(),
        "flux": -torch.stack(
            [(out.mu[b, t] - y[b, t - 1]).abs().mean() for b in range(2) for t in range(1, int(n[b]))]
        ).mean(),
        "stop": torch.stack(
            [
                nn.functional.binary_cross_entropy_with_logits(
                    out.stop_logits[b, t], torch.tensor(float(t == n[b])), pos_weight=torch.tensor(100.0)
                )
                for b in range(2)
                for t in range(int(n[b]) + 1)
            ]
        ).mean(),
    }
    assert sorted(losses) == sorted(f"loss/{k}" for k in expect)
    for k, v in expect.items():
        assert float(losses[f"loss/{k}"]) == pytest.approx(float(v), rel=1e-5), k


def test_kl_and_flux_start_at_their_steps():
    model, _ = tiny_melle(kl_start_step=2, flux_start_step=1)
    batch = tiny_batch(B=2, T=5)
    seen = [model.compute_losses(batch) for _ in range(3)]  # training mode: each call is a step
    assert [float(s["loss/kl"].detach()) == 0 for s in seen] == [True, True, False]
    assert [float(s["loss/flux"].detach()) == 0 for s in seen] == [True, False, False]
    assert int(model.train_steps) == 3
    model.eval()
    with torch.no_grad():
        model.compute_losses(batch)
    assert int(model.train_steps) == 3  # evaluation is not a training step
    model.train()
    model.current_step = 0  # a trainer's own step count wins
    assert float(model.compute_losses(batch)["loss/kl"].detach()) == 0.0
    model.current_step = 2
    assert float(model.compute_losses(batch)["loss/kl"].detach()) > 0.0


# ---------------------------------------------------------------------- training and checkpoints
def test_tiny_melle_overfits_a_fixed_batch():
    model, _ = tiny_melle(encoder_dropout=0.1, kl_start_step=0)
    batch = tiny_batch(B=2, T=8)
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.0)
    sched = build_scheduler(opt, warmup=1, hold=10_000, decay=0)
    first = last = None
    for _ in range(120):
        last = train_step(model, opt, sched, batch, task="tts", loss_weights=WEIGHTS, grad_clip=10.0)
        first = first or last
    assert last["loss/mse_post"] < first["loss/mse_post"] / 10
    assert last["loss/mse_pre"] < first["loss/mse_pre"] / 5
    assert last["loss/stop"] < first["loss/stop"] / 10


def test_checkpoint_round_trip_rebuilds_an_identical_model(tmp_path):
    cfg = ModelConfig(
        d_model=32,
        n_heads=4,
        n_layers=2,
        d_ff=64,
        encoder_hidden=32,
        recon_hidden=32,
        postnet_channels=16,
        postnet_layers=3,
        reduction_factor=2,
    )
    kwargs = json.loads(json.dumps(melle_kwargs(cfg, n_text=20, kl_start_step=1)))  # JSON-able model_kwargs
    torch.manual_seed(0)
    model = MELLE(**kwargs)
    batch = tiny_batch(reduction=2, B=2, T=6)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    sched = build_scheduler(opt, 1, 10, 0)
    for _ in range(2):
        train_step(model, opt, sched, batch, task="tts", loss_weights=WEIGHTS, grad_clip=10.0)
    save_checkpoint(tmp_path / "model.pt", system=model.system, model=model, model_kwargs=kwargs, step=2)

    state = load_checkpoint(tmp_path / "model.pt")
    assert state["system"] == "melle"
    clone = MELLE(**state["model_kwargs"])
    clone.load_state_dict(state["model"])
    assert int(clone.train_steps) == 2  # the KL schedule resumes where it was
    outs = []
    for m in (model, clone):
        m.eval()
        torch.manual_seed(3)  # test-time dropout draws from the global RNG
        gen = m.generate(
            batch["text"],
            batch["text_len"],
            batch["mel"],
            batch["mel_len"],
            max_frames=4,
            generator=torch.Generator().manual_seed(5),
        )
        with torch.no_grad():
            losses = m.compute_losses(batch, generator=torch.Generator().manual_seed(6))
        outs.append((gen, losses))
    (g1, l1), (g2, l2) = outs
    for a, b in zip(g1.frames, g2.frames):
        assert torch.equal(a, b)
    assert all(torch.equal(l1[k], l2[k]) for k in l1)


def test_only_tts_is_supported():
    model, _ = tiny_melle()
    with pytest.raises(ValueError, match="TTS-only"):
        model.compute_losses(tiny_batch(), task="stt")
