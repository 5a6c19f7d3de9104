"""``meld transcribe``: beam-search STT of audio files, printed batch by batch."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from meld.cli.checkpoint import load_inference_checkpoint
from meld.cli.common import (
    _EVAL_DEFAULTS,
    EXIT_USER_ERROR,
    PROG,
    CLIError,
    _check_finite,
    _configure_decoding,
    _device,
    _task,
    read_audio,
    read_list_lines,
    write_line,
)
from meld.config import FeaturesConfig


def read_audio_list(path: str | Path) -> list[tuple[str, str]]:
    """``--list``: audio paths, one per line; blank lines and ``#`` comments skipped (a BOM too).

    Returns:
        (where, audio path) per entry, ``where`` being "list.txt:3: " so that a message names the line.
    """
    return [(f"{path}:{number}: ", line.strip()) for number, line in read_list_lines(path)]


# the longest clip the default training keeps: a checkpoint does not record its features.max_seconds
TRAINED_CLIP_SECONDS = FeaturesConfig().max_seconds


def _read_log_mel(path: str) -> np.ndarray:
    """An audio file's raw log-mel, or a :class:`CLIError` naming the file."""
    from meld.audio import SAMPLE_RATE
    from meld.features import log_mel

    wav = read_audio(path)
    try:
        return log_mel(wav, SAMPLE_RATE)
    except ValueError as err:  # samples so large that the spectrum overflows
        raise CLIError(f"{path}: {err}") from err


def cmd_transcribe(args: argparse.Namespace) -> int:
    from meld.features import FRAME_RATE
    from meld.generate import stt_beam_search
    from meld.progress import progress

    if args.beam < 1:
        raise CLIError(f"--beam must be >= 1, got {args.beam}")
    if args.max_tokens < 1:
        raise CLIError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if not args.max_tokens_per_second > 0:  # NaN too
        raise CLIError(f"--max-tokens-per-second must be > 0, got {args.max_tokens_per_second}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_finite(args, "--ctc-weight")
    if args.ctc_weight is not None and not 0.0 <= args.ctc_weight <= 1.0:
        raise CLIError(f"--ctc-weight must be in [0, 1], got {args.ctc_weight}")
    audio = [("", p) for p in args.audio] + (read_audio_list(args.list) if args.list else [])
    if not audio:
        raise CLIError("no audio to transcribe: give audio files, or --list FILE with one path per line")
    device = _device(args.device)
    ckpt = load_inference_checkpoint(args.checkpoint, device)
    if not all(hasattr(ckpt.model, m) for m in ("stt_prefix", "stt_step", "text_logprobs")):
        raise CLIError(f"{ckpt.path}: system {ckpt.state['system']!r} cannot transcribe (no STT decoder)")
    has_ctc = bool(getattr(ckpt.model, "stt_ctc", False))
    ctc_weight = args.ctc_weight if args.ctc_weight is not None else (_EVAL_DEFAULTS.stt_ctc_weight if has_ctc else 0.0)
    if ctc_weight > 0 and not has_ctc:
        raise CLIError(f"--ctc-weight {ctc_weight:g}: {ckpt.path} was trained without a CTC head (args.stt_ctc); "
                       "use --ctc-weight 0")
    _configure_decoding(ckpt.model, args.compile)
    log = logging.getLogger(PROG)
    if _task(ckpt.state) == "tts":
        log.warning("%s was trained for TTS only: its transcripts are not meaningful", ckpt.path)

    def decode_and_print(paths: list[str], mels: list[np.ndarray]) -> None:
        ids = stt_beam_search(
            ckpt.model,
            mels,
            reduction=ckpt.reduction,
            beam_size=args.beam,
            max_tokens=args.max_tokens,
            max_tokens_per_second=args.max_tokens_per_second,
            batch_size=args.batch_size,
            ctc_weight=ctc_weight,
        )
        for p, hyp in zip(paths, ids):
            write_line(f"{p}\t{ckpt.tokenizer.decode(hyp)}", sys.stdout)
        bar.update(len(paths))

    # Each batch is printed as soon as it is decoded, so a crash late in a long list keeps what was
    # done. Batches are the readable files taken batch_size at a time, as one call over them all would form.
    # Many files get a progress bar and a count on stderr: stdout holds only the transcripts (path TAB text).
    many = len(audio) > 1
    bar = progress(total=len(audio), desc="transcribe", unit="file", disable=not many)
    paths, mels, failed = [], [], 0
    with bar:  # closed however the loop ends, so that a message after it starts a line of its own
        for where, p in audio:
            try:
                mel = _read_log_mel(p)
            except CLIError as err:
                write_line(f"{PROG}: error: {where}{err}", sys.stderr)
                failed += 1
                bar.update(1)
                continue
            seconds = mel.shape[0] / FRAME_RATE
            if seconds > TRAINED_CLIP_SECONDS:  # transcribed anyway: the user may know the model copes
                write_line(f"{PROG}: warning: {where}{p}: {seconds:.1f} s is longer than the {TRAINED_CLIP_SECONDS:g} s "
                           "clips training keeps (features.max_seconds): the model has not heard so long a clip, "
                           "and its decoding memory grows with the length; cut it into shorter pieces", sys.stderr)
            paths.append(p)
            mels.append(ckpt.stats.normalise(mel))
            if len(mels) == args.batch_size:
                decode_and_print(paths, mels)
                paths, mels = [], []
        if mels:
            decode_and_print(paths, mels)
    if many:
        print(f"{PROG}: transcribed {len(audio) - failed} of {len(audio)} files ({failed} refused)", file=sys.stderr)
    return EXIT_USER_ERROR if failed else 0


