"""Shared fixtures: tiny models and batches on CPU."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///:memory:")  # tests that need MLflow set their own
# tests never reach a model hub: transformers and huggingface_hub fail fast instead of trying
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


TINY = dict(
    d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, encoder_hidden=32, encoder_dropout=0.5,
    recon_hidden=32, postnet_channels=16, postnet_kernel=5, postnet_layers=3, postnet_dropout=0.0, q_temperature=1.0,
)


def tiny_meld(reduction: int = 1, n_text: int = 20, codebook_size: int = 16, seed: int = 0, **over):
    from meld.models.meld import MELD

    torch.manual_seed(seed)
    kwargs = {**TINY, **over, "n_text": n_text, "codebook_size": codebook_size, "frame_dim": 80 * reduction}
    model = MELD(**kwargs)
    model.set_codebook(torch.randn(codebook_size, 80 * reduction))
    return model, kwargs


def tiny_batch(reduction: int = 1, B: int = 3, T: int = 12, L: int = 5, n_text: int = 20, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(B, T, 80 * reduction, generator=g)
    mel_len = torch.tensor([T] + [max(2, T - 3 * i) for i in range(1, B)])[:B]
    text = torch.randint(0, n_text, (B, L), generator=g)
    text_len = torch.tensor([L] + [max(1, L - i) for i in range(1, B)])[:B]
    return {"mel": mel, "mel_len": mel_len, "text": text, "text_len": text_len}


@pytest.fixture
def meld_model():
    return tiny_meld()


def batch_and_each_row_alone(model, batch: dict, prompt_len: torch.Tensor, **kwargs):
    """``model.generate`` of a whole batch of prompts (mel frames) whose rows stop at three different
    steps, and of each row alone (its own text and prompt, unpadded): (together, [alone_0, ...])."""
    together = model.generate(batch["text"], batch["text_len"], batch["mel"], prompt_len, **kwargs)
    lengths = [f.shape[0] for f in together.frames]
    assert len(set(lengths)) == 3 and 0 < max(lengths) < kwargs["max_frames"], lengths  # three different steps
    assert together.hit_max_length == [False] * 3
    alone = []
    for i in range(len(lengths)):
        p, n = int(prompt_len[i]), int(batch["text_len"][i])
        alone.append(model.generate(batch["text"][i : i + 1, :n], batch["text_len"][i : i + 1],
                                    batch["mel"][i : i + 1, :p], prompt_len[i : i + 1], **kwargs))
        assert alone[i].hit_max_length[0] == together.hit_max_length[i]
    return together, alone


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (the KV-cache equivalence tests' measure)."""
    a, b = a.detach(), b.detach()  # a measure, not part of any graph (no requires_grad warning)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


class ScheduledStop(nn.Module):
    """A stop head for tests: at the k-th call, the batch's first row stops when k is in ``stop_at``."""

    def __init__(self, stop_at: set[int]):
        super().__init__()
        self.stop_at, self.calls = stop_at, 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = torch.full((h.shape[0], 1), -30.0)
        if self.calls in self.stop_at:
            out[0] = 30.0
        self.calls += 1
        return out


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and the CI machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_tracking_uri(monkeypatch):
    """MLFLOW_TRACKING_URI unset, and as it was after the test (set first, so that monkeypatch records the
    value before: ``mlflow.set_tracking_uri`` sets the variable in this process, and a test's setup would leak)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "-")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    return monkeypatch
