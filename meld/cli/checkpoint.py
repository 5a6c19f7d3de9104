"""Inference checkpoints (``model.pt``), loaded with every failure turned into a one-line error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meld.cli.common import CLIError, _checkpoint_error, _first_line


@dataclass
class LoadedCheckpoint:
    """An inference checkpoint, unpacked: model, tokenizer, normalisation and the raw state."""

    path: Path
    model: Any  # nn.Module
    state: dict
    reduction: int
    stats: Any  # NormStats
    tokenizer: Any  # BPETokenizer


def _to_numpy(value, name: str, path: Path) -> np.ndarray:
    """A float field of the extras as a float32 array; one holding NaN or inf would pass every range check."""
    try:
        arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        arr = np.asarray(arr, dtype=np.float32)
    except Exception as err:  # a wrong type in a hand-edited checkpoint
        raise CLIError(f"{path}: checkpoint field extra.{name} is not an array ({err})") from err
    if not np.isfinite(arr).all():
        raise CLIError(f"{path}: checkpoint field extra.{name} holds NaN or infinite values")
    return arr


def _reduction_factor(value, path: Path) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError) as err:  # a hand-edited checkpoint: "two", None, inf, a list
        raise CLIError(f"{path}: checkpoint field extra.reduction_factor is not an integer ({value!r})") from err


def _bpe_bytes(value) -> bytes:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy().astype(np.uint8).tobytes()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return np.asarray(value, dtype=np.uint8).tobytes()


def _tokenizer(state: dict, path: Path):
    from meld.text import tokenizer_from_bytes

    extra = state.get("extra") or {}
    if "bpe_model" not in extra:
        raise CLIError(f"{path}: checkpoint holds no BPE model (extra.bpe_model); use an exported model.pt")
    try:
        return tokenizer_from_bytes(_bpe_bytes(extra["bpe_model"]))
    except Exception as err:  # sentencepiece raises RuntimeError/OSError on corrupt protos
        raise CLIError(f"{path}: the embedded BPE model is corrupt ({err})") from err


def load_inference_checkpoint(path: str | Path, device: str = "cpu") -> LoadedCheckpoint:
    """Load an exported inference checkpoint, turning every failure into a :class:`CLIError`.

    Args:
        path: ``model.pt`` as written by the train stage's export.
        device: torch device for the model.

    Returns:
        The model (eval mode, on ``device``), its state, reduction factor, stats and tokenizer.
    """
    from meld.features import N_MELS, NormStats
    from meld.training import CheckpointError, load_model

    path = Path(path)
    try:
        model, state = load_model(path, map_location="cpu")
    except CheckpointError as err:
        raise CLIError(_checkpoint_error(path, err)) from err
    except Exception as err:  # unknown system, wrong kwargs, weights that don't fit the model
        raise CLIError(
            f"{path}: checkpoint does not rebuild into a model ({type(err).__name__}: {_first_line(err)})"
        ) from err
    extra = state.get("extra") or {}
    if state["system"] == "codec_lm":  # speaks DAC codes: no mel normalisation, the codec is described instead
        missing = [k for k in ("codec", "bpe_model") if k not in extra]
        if missing:
            raise CLIError(f"{path}: not an inference checkpoint (extra lacks {', '.join(missing)}); "
                           "use the train stage's model.pt")
        return LoadedCheckpoint(path, model.to(device), state, 1, None, _tokenizer(state, path))
    missing = [k for k in ("reduction_factor", "norm_mean", "norm_std", "bpe_model") if k not in extra]
    if missing:
        raise CLIError(
            f"{path}: not an inference checkpoint (extra lacks {', '.join(missing)}); use the train stage's model.pt"
        )
    reduction = _reduction_factor(extra["reduction_factor"], path)
    mean = _to_numpy(extra["norm_mean"], "norm_mean", path)
    std = _to_numpy(extra["norm_std"], "norm_std", path)
    if mean.shape != (N_MELS,) or std.shape != (N_MELS,) or not (std > 0).all():
        raise CLIError(f"{path}: normalisation statistics must be two ({N_MELS},) arrays with std > 0")
    frame_dim = getattr(model, "frame_dim", N_MELS * reduction)
    if reduction < 1 or frame_dim != N_MELS * reduction:
        raise CLIError(
            f"{path}: reduction factor {reduction} does not match the model's frame size {frame_dim}"
        )
    tokenizer = _tokenizer(state, path)
    n_text = (state.get("model_kwargs") or {}).get("n_text")
    if n_text is not None and tokenizer.vocab_size > int(n_text):
        raise CLIError(f"{path}: the BPE model has {tokenizer.vocab_size} pieces, the model only {n_text}")
    model = model.to(device)
    return LoadedCheckpoint(path, model, state, reduction, NormStats(mean, std), tokenizer)


