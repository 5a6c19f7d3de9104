"""Checks shared by every loader of weights from disk (HiFi-GAN, the DAC codec, the Whisper and WavLM
judges): what a file that is there but unusable gets said about it, in one line naming what is wrong."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a check runs: the judges' modules import this without it
    import torch


def first_line(err: BaseException) -> str:
    """``Type: first line of the message``: a library's error (often pages long), kept to one line."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else 'no message'}"


def state_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], *,
                   expected_by: str = "expected") -> str | None:
    """How ``found``'s tensor names and shapes differ from ``expected``'s, in one line (None: they fit)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} tensors of other shapes (e.g. {k}: {tuple(found[k].shape)} in the file, "
                     f"{tuple(expected[k].shape)} {expected_by}: another model size?)")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    return "; ".join(parts) or None


def first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or infinity, if any."""
    import torch

    return next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
