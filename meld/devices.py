"""Torch device names from users (``meld --device``, ``evaluate.device``), checked in one place."""

from __future__ import annotations

import re

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"


def check_device_name(name: str, label: str) -> None:
    """Raise ValueError("<label> <name>: ...") unless ``name`` is one of :data:`DEVICE_HELP`'s forms;
    what this machine has is not asked (params are checked where they are read, not where they run)."""
    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise ValueError(f"{label} {name}: unknown device; use {DEVICE_HELP}")


def resolve_device(name: str, label: str) -> str:
    """The device to use for ``name`` on this machine (``auto``: CUDA when there is one, else the CPU).

    Raises:
        ValueError: a malformed name, or a device this machine does not have; the message starts with
            ``label`` (the option or param that named it).
    """
    import torch

    check_device_name(name, label)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"{label} {name}: CUDA is not available on this machine")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"{label} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{label} mps: MPS is not available on this machine")
    return name
