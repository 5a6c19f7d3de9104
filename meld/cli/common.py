"""What every ``meld`` subcommand shares: exit codes, errors, option checks, decoding set-up."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from meld.config import EvaluateConfig
from meld.devices import resolve_device

PROG = "meld"
EXIT_USER_ERROR = 2
EXIT_FAILURE = 1

# Sampling defaults are the evaluation's (paper) settings, so the CLI and the evaluation agree.
_EVAL_DEFAULTS = EvaluateConfig()


class CLIError(Exception):
    """A user error: reported as one line, exit code 2."""


class CLIFailure(Exception):
    """The command ran but could not produce a result: reported as one line, exit code 1."""


def read_list_lines(path: str | Path) -> list[tuple[int, str]]:
    """A ``--list`` file's entries as (line number, line): blank lines and ``#`` comments skipped, read
    as UTF-8 with an optional BOM (a Windows editor's BOM is not part of the first line); lines end at
    LF, CRLF or CR only."""
    path = Path(path)
    if path.is_dir():
        raise CLIError(f"--list {path}: is a folder, not a list file")
    if not path.is_file():
        raise CLIError(f"--list {path}: no such file")
    try:  # text mode turns CRLF and CR into LF; splitlines would also cut a line at U+2028, NEL, a form feed,
        # ... that a transcript or a file name may hold, and number the lines unlike an editor or sed
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"--list {path}: unreadable ({_first_line(err)})") from err
    return [(n, line) for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]



def read_audio(path: str | Path):
    """An audio file as a 16 kHz waveform, or a :class:`CLIError` naming the file (synthesize's prompts and
    transcribe's inputs alike)."""
    from meld.audio import AudioError, load_audio

    try:
        return load_audio(path)
    except AudioError as err:
        raise CLIError(str(err)) from err
    except (OSError, ValueError) as err:  # a path the file system refuses
        raise CLIError(f"{path}: not a usable path ({_first_line(err)})") from err


def _checkpoint_error(path: Path, err: Exception) -> str:
    """One line for a checkpoint that won't load (torch.load's own messages run to many lines)."""
    if err.__cause__ is not None:  # torch.load itself failed: corrupt, truncated, or not a torch file
        return f"{path}: unreadable or partial checkpoint ({type(err.__cause__).__name__}; corrupt, truncated or not a checkpoint)"
    return _first_line(err)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    if "loading state_dict" in text:  # torch lists every mismatched tensor, one per line
        return "its weights do not match its model_kwargs"
    return text.splitlines()[0] if text else type(err).__name__



def _device(name: str) -> str:
    """``--device``, checked: a device torch has here, or a one-line :class:`CLIError`."""
    try:
        return resolve_device(name, "--device")
    except ValueError as err:
        raise CLIError(str(err)) from None


def _check_finite(args: argparse.Namespace, *options: str) -> None:
    """NaN and infinity pass every ``<``/``>`` range check: refuse them first, by option name."""
    for option in options:
        value = getattr(args, option.removeprefix("--").replace("-", "_"))
        if value is not None and not math.isfinite(value):
            raise CLIError(f"{option} must be a finite number, got {value}")



def write_line(text: str, file) -> None:
    """Print one line above a progress bar that may be on stderr (:func:`meld.progress.progress`), not through it,
    and flush it: a line printed is kept if the run is killed later."""
    from tqdm import tqdm

    tqdm.write(text, file=file)
    file.flush()


def _task(state: dict) -> str:
    return str((state.get("extra") or {}).get("task", "unknown"))



COMPILE_HELP = ("torch.compile the decoding step (CUDA graphs on a GPU): a one-off compile, then fewer kernel "
                "launches per step; for GPUs and long runs (no faster on a CPU, docs/results.md)")


def _configure_decoding(model, compile_step: bool) -> None:
    """``--compile``: decode through the compiled fixed-shape step (:func:`meld.models.backbone.configure_decoding`)."""
    from meld.models.backbone import configure_decoding

    if compile_step:
        logging.getLogger(PROG).warning("--compile: compiling the decoding step first (tens of seconds on a CPU)")
    configure_decoding(model, compile=compile_step)


