"""Builders: explicit arguments in, a model out; checkpoints rebuild models from stored kwargs."""

from __future__ import annotations

from typing import Any

from torch import nn

from meld.features import N_MELS


def meld_kwargs(model_cfg, *, n_text: int, codebook_size: int) -> dict[str, Any]:
    """Constructor kwargs of :class:`MELD` from a ModelConfig section and the data sizes."""
    return dict(
        n_text=n_text,
        codebook_size=codebook_size,
        frame_dim=N_MELS * model_cfg.reduction_factor,
        d_model=model_cfg.d_model,
        n_layers=model_cfg.n_layers,
        n_heads=model_cfg.n_heads,
        d_ff=model_cfg.d_ff,
        dropout=model_cfg.dropout,
        encoder_hidden=model_cfg.encoder_hidden,
        encoder_dropout=model_cfg.encoder_dropout,
        recon_hidden=model_cfg.recon_hidden,
        postnet_channels=model_cfg.postnet_channels,
        postnet_kernel=model_cfg.postnet_kernel,
        postnet_layers=model_cfg.postnet_layers,
        postnet_dropout=model_cfg.postnet_dropout,
        q_temperature=model_cfg.q_temperature,
        specaug_freq_masks=model_cfg.specaug_freq_masks,
        specaug_freq_width=model_cfg.specaug_freq_width,
        specaug_time_masks=model_cfg.specaug_time_masks,
        specaug_time_width=model_cfg.specaug_time_width,
        specaug_max_time_fraction=model_cfg.specaug_max_time_fraction,
    )


def model_class(system: str):
    """The class that implements a system (``meld``, ``meld_stt`` and ``meld_joint`` share MELD)."""
    if system in ("meld", "meld_stt", "meld_joint"):
        from meld.models.meld import MELD

        return MELD
    raise ValueError(f"unknown system {system!r}")


def build_model(system: str, kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate a system from its constructor kwargs (as stored in checkpoints)."""
    return model_class(system)(**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
