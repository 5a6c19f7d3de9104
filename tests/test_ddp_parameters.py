"""Each system's declaration to DDP of whether a task's loss reaches every parameter.

``uses_every_parameter(task)`` True lets the training driver skip DDP's search for unused
parameters (a graph walk per step); a wrong True makes a multi-worker run fail at its second step,
a wrong False only costs that walk. Checked here on one batch per system and task: True means
every parameter gets a gradient; False means some parameter gets none.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_meld
from test_codec_lm import code_batch, tiny_codec_lm
from test_dmel import tiny_dmel
from test_mel_lm import tiny_mel_lm
from test_melle import tiny_melle

CASES = [
    ("meld", "tts"), ("meld", "stt"), ("meld", "joint"), ("meld_frontend", "tts"),
    ("mel_lm", "tts"), ("melle", "tts"), ("dmel", "tts"), ("dmel", "stt"), ("codec_lm", "tts"),
]


def _model_and_batch(system: str):
    if system == "meld":
        return tiny_meld()[0], tiny_batch()
    if system == "meld_frontend":  # MELD with STT's conv front end: a module TTS never runs
        return tiny_meld(stt_frontend_layers=1, stt_frontend_kernel=3)[0], tiny_batch()
    if system == "codec_lm":
        return tiny_codec_lm()[0], code_batch()
    build = {"mel_lm": tiny_mel_lm, "melle": tiny_melle, "dmel": tiny_dmel}[system]
    return build()[0], tiny_batch()


@pytest.mark.parametrize("system,task", CASES)
def test_every_parameter_declaration_matches_the_gradients(system, task):
    model, batch = _model_and_batch(system)
    model.train()
    losses = model.compute_losses(batch, task, generator=torch.Generator().manual_seed(0))
    sum(losses.values()).backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    if model.uses_every_parameter(task):
        assert not no_grad, f"{system}/{task} declares every parameter used, but {no_grad} got no gradient"
    else:
        assert no_grad, f"{system}/{task} could declare every parameter used (all got gradients)"


def test_a_joint_run_with_the_front_end_is_not_declared_because_its_warm_up_is_tts_only():
    with_frontend = tiny_meld(stt_frontend_layers=1, stt_frontend_kernel=3)[0]
    assert not with_frontend.uses_every_parameter("joint")
    # the warm-up's TTS batches skip the front end: DDP must keep searching in a joint run
    losses = with_frontend.compute_losses(tiny_batch(), "tts", generator=torch.Generator().manual_seed(0))
    sum(losses.values()).backward()
    assert any(p.grad is None for p in with_frontend.stt_frontend.parameters())


@pytest.mark.parametrize("system,task", CASES + [("meld_ctc", "stt")])
def test_every_loss_a_system_returns_is_a_name_train_loss_weights_accepts(system, task):
    """`train.loss_weights` refuses names outside LOSS_NAMES (a misspelt one used to be ignored, so the
    loss meant counted at weight 1): every loss a system returns must be among them."""
    from meld.config import LOSS_NAMES

    model, batch = (tiny_meld(stt_ctc=True)[0], tiny_batch()) if system == "meld_ctc" else _model_and_batch(system)
    losses = model.compute_losses(batch, task, generator=torch.Generator().manual_seed(0))
    names = {k.split("/", 1)[1] for k in losses}
    assert names and names <= LOSS_NAMES, names - LOSS_NAMES
