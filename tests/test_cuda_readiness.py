"""What a first run on a CUDA GPU (bf16 autocast, device generators) must not break, checked on the CPU
where that is possible: training losses stay float32 under bf16 autocast, and random draws follow the
device of the generator they are given."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_meld
from test_codec_lm import code_batch, tiny_codec_lm
from test_dmel import tiny_dmel
from test_mel_lm import tiny_mel_lm
from test_melle import tiny_melle

from meld.models.meld import slowness_penalty

pytestmark = pytest.mark.usefixtures("one_thread")

SYSTEMS = {
    "meld": (lambda: tiny_meld(stt_ctc=True)[0], tiny_batch, ("tts", "stt", "joint")),
    "melle": (lambda: tiny_melle(kl_start_step=0)[0], tiny_batch, ("tts",)),
    "mel_lm": (lambda: tiny_mel_lm()[0], tiny_batch, ("tts",)),
    "dmel": (lambda: tiny_dmel()[0], tiny_batch, ("tts", "stt", "joint")),
    "codec_lm": (lambda: tiny_codec_lm()[0], code_batch, ("tts",)),
}


@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_every_training_loss_is_float32_under_bf16_autocast(system):
    """train_step sums the losses and reads them back as float32: one computed in bf16 (8 bits of
    mantissa) would be rounded before it is weighted, whatever the rest of the step does."""
    build, batch_of, tasks = SYSTEMS[system]
    model = build().train()
    batch = batch_of()
    for task in tasks:
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model.compute_losses(batch, task)
        wrong = {k: v.dtype for k, v in losses.items() if v.dtype != torch.float32}
        assert not wrong, f"{system} {task}: losses not in float32 under bf16 autocast: {wrong}"


def test_slowness_penalty_of_bf16_frames_is_the_float32_one():
    """MELD's postnet output is bf16 under autocast; the penalty over it must be the float32 value on the
    same frames (a bf16 sum of 301 valid steps is 300 or 302)."""
    g = torch.Generator().manual_seed(0)
    frames = (torch.randn(1, 302, 80, generator=g) * 0.1).to(torch.bfloat16)
    mask = torch.ones(1, 302, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = slowness_penalty(frames, mask)
    want = slowness_penalty(frames.float(), mask)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-6, atol=0.0), (float(got), float(want))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("task", ["stt", "joint"])
def test_stt_augmentation_draws_from_a_cuda_generator(task):
    """One generator drives q(z|x)'s sampling (on the model's device) and SpecAugment / voice
    perturbation: a CUDA generator must work for both (a CPU draw from it raises)."""
    model = tiny_meld(stt_voice_warp=0.1, stt_speed_perturb=0.1, stt_spectral_tilt=1.0)[0].cuda().train()
    batch = {k: v.cuda() for k, v in tiny_batch().items()}
    g = torch.Generator(device="cuda").manual_seed(0)
    losses = model.compute_losses(batch, task, generator=g)
    assert all(torch.isfinite(v) for v in losses.values())
