"""Checks shared by every loader of weights from disk (HiFi-GAN, the DAC codec, the Whisper and WavLM
judges): what a file that is there but unusable gets said about it, in one line naming what is wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a check runs: the judges' modules import this without it
    import torch


def first_line(err: BaseException) -> str:
    """``Type: first line of the message``: a library's error (often pages long), kept to one line."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else 'no message'}"


def read_json_object(path: Path) -> dict:
    """A model folder's ``config.json``; a ValueError naming it when it is not a JSON object."""
    try:
        # JSON is UTF-8 (RFC 8259): the locale's encoding (ASCII, Latin-1) fails on a non-ASCII path inside
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({first_line(err)})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: holds a JSON {type(config).__name__}, expected an object")
    return config


def read_weights(path: Path, what: str):
    """What a weights file holds (safetensors by its suffix, else torch's format, never unpickling code); a
    file that is there but does not read (truncated, empty, another format) is a ValueError naming it."""
    import torch

    try:
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # each library says it its own way
        raise ValueError(f"{path}: not a readable {what} weights file ({first_line(err)})") from err


def tensor_state(state, path: Path, what: str) -> dict[str, torch.Tensor]:
    """``state`` if it is a dict of tensors, else a ValueError naming ``path``."""
    import torch

    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a {what} state dict of tensors (got {type(state).__name__})")
    return state


def check_fits(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Refuse, naming ``path``, tensors that do not fit the model ``what`` describes (names and shapes of
    ``expected``) or that hold NaN or infinity (they load, and give NaN audio or codes much later)."""
    mismatch = state_mismatch(expected, state)
    if mismatch:
        raise ValueError(f"{path}: weights do not match {what}: {mismatch}")
    bad = first_non_finite(state)
    if bad is not None:
        raise ValueError(f"{path}: tensor {bad} holds NaN or infinite values (a corrupt or diverged model)")


def state_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str | None:
    """How ``found``'s tensor names and shapes differ from ``expected``'s, in one line (None: they fit)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} tensors of other shapes (e.g. {k}: {tuple(found[k].shape)} in the file, "
                     f"{tuple(expected[k].shape)} expected: another model size?)")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    return "; ".join(parts) or None


def first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or infinity, if any."""
    import torch

    return next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
