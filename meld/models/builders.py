"""Builders: explicit arguments in, a model out; checkpoints rebuild models from stored kwargs."""

from __future__ import annotations

from typing import Any

from torch import nn

from meld.features import N_MELS

SYSTEMS = ("meld", "meld_stt", "meld_joint", "melle", "mel_lm", "dmel", "codec_lm")
NEEDS_CODEBOOK = ("meld", "meld_stt", "meld_joint")
# the training tasks each system takes: MELD and dMel do all three, the other baselines only speak, and
# a name that says its task takes that one alone (a params file without the system's own section
# would otherwise train meld_joint as TTS only, under the joint model's name)
SYSTEM_TASKS = {"meld": ("tts", "stt", "joint"), "meld_stt": ("stt",), "meld_joint": ("joint",),
                "melle": ("tts",), "mel_lm": ("tts",), "dmel": ("tts", "stt", "joint"), "codec_lm": ("tts",)}


# The ModelConfig fields each part of a system takes, so every system's kwargs builder composes
# the same pieces and a new shared field is added in one place.
def backbone_kwargs(model_cfg) -> dict[str, Any]:
    """The Transformer's size and dropout: every system has one."""
    return dict(
        d_model=model_cfg.d_model,
        n_layers=model_cfg.n_layers,
        n_heads=model_cfg.n_heads,
        d_ff=model_cfg.d_ff,
        dropout=model_cfg.dropout,
    )


def mel_frames_kwargs(model_cfg) -> dict[str, Any]:
    """Grouped mel frames in (the mel encoder) and out (the postnet): MELD, MELLE and Mel-LM."""
    return dict(
        frame_dim=N_MELS * model_cfg.reduction_factor,
        encoder_hidden=model_cfg.encoder_hidden,
        encoder_dropout=model_cfg.encoder_dropout,
        postnet_channels=model_cfg.postnet_channels,
        postnet_kernel=model_cfg.postnet_kernel,
        postnet_layers=model_cfg.postnet_layers,
        postnet_dropout=model_cfg.postnet_dropout,
    )


def specaug_kwargs(model_cfg) -> dict[str, Any]:
    """SpecAugment of the STT input: the systems that recognise speech from mel frames (MELD, dMel)."""
    return dict(
        specaug_freq_masks=model_cfg.specaug_freq_masks,
        specaug_freq_width=model_cfg.specaug_freq_width,
        specaug_time_masks=model_cfg.specaug_time_masks,
        specaug_time_width=model_cfg.specaug_time_width,
        specaug_max_time_fraction=model_cfg.specaug_max_time_fraction,
    )


def meld_kwargs(model_cfg, *, n_text: int, codebook_size: int) -> dict[str, Any]:
    """Constructor kwargs of :class:`MELD` from a ModelConfig section and the data sizes."""
    return dict(
        n_text=n_text,
        codebook_size=codebook_size,
        **backbone_kwargs(model_cfg),
        **mel_frames_kwargs(model_cfg),
        recon_hidden=model_cfg.recon_hidden,
        q_temperature=model_cfg.q_temperature,
        **specaug_kwargs(model_cfg),
    )


def system_kwargs(system: str, model_cfg, *, n_text: int, codebook_size: int | None = None,
                  args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Constructor kwargs for any system: the shared ModelConfig plus system-specific ``args``.

    Args:
        system: one of :data:`SYSTEMS`.
        model_cfg: the merged ``model`` section.
        n_text: BPE vocabulary size.
        codebook_size: k-means codes (MELD systems only).
        args: the system's own constructor arguments from params (``<system>.args``).
    """
    args = dict(args or {})
    if system in NEEDS_CODEBOOK:
        if codebook_size is None:
            raise ValueError(f"{system} needs a codebook size")
        return meld_kwargs(model_cfg, n_text=n_text, codebook_size=codebook_size) | args
    if system == "melle":
        from meld.models.melle import melle_kwargs

        return melle_kwargs(model_cfg, n_text=n_text, **args)
    if system == "mel_lm":
        from meld.models.mel_lm import mel_lm_kwargs

        return mel_lm_kwargs(model_cfg, n_text=n_text, **args)
    if system == "dmel":
        from meld.models.dmel import dmel_kwargs

        return dmel_kwargs(model_cfg, n_text=n_text, **args)
    if system == "codec_lm":
        from meld.models.codec_lm import codec_lm_kwargs

        return codec_lm_kwargs(model_cfg, n_text=n_text, **args)
    raise ValueError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")


def model_class(system: str):
    """The class that implements a system (``meld``, ``meld_stt`` and ``meld_joint`` share MELD)."""
    if system in NEEDS_CODEBOOK:
        from meld.models.meld import MELD

        return MELD
    if system == "melle":
        from meld.models.melle import MELLE

        return MELLE
    if system == "mel_lm":
        from meld.models.mel_lm import MelLM

        return MelLM
    if system == "dmel":
        from meld.models.dmel import DMel

        return DMel
    if system == "codec_lm":
        from meld.models.codec_lm import CodecLM

        return CodecLM
    raise ValueError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")


def build_model(system: str, kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate a system from its constructor kwargs (as stored in checkpoints)."""
    return model_class(system)(**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
