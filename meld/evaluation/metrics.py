"""Evaluation metrics: WER with S/D/I counts, silence, duration and speed.

Definitions (all are what ``metrics/<system>.json`` reports):

- **WER** = (S + D + I) / N over the whole corpus (not a mean of per-utterance WERs), on
  transcripts passed through :func:`meld.text.normalise_transcript`; N = reference words.
- **Longest silence**: the waveform is cut into non-overlapping frames of ``frame_ms``; a frame is
  silent when its RMS level is more than ``|threshold_db|`` dB below the loudest frame of the same
  utterance. The longest run of consecutive silent frames, in seconds. Leading and trailing
  silence count too unless ``interior_only`` (a model that fails to stop emits trailing silence).
  A continuation is measured against the loudest frame of its whole utterance, prompt included
  (``reference``): against its own, a continuation that is quiet throughout had no silence at all.
- **Duration ratio** = generated seconds / ground-truth seconds, per generation; the evaluation
  averages these ratios (the ratio of the totals is the paper's "minutes generated")
- **Real-time factor** = compute seconds / audio seconds (below 1 is faster than real time).
"""

from __future__ import annotations

import numpy as np

from meld.text import normalise_transcript


def wer_details(refs: list[str], hyps: list[str]) -> dict:
    """Corpus-level word error rate and its edit counts.

    Args:
        refs: reference transcripts (raw; normalised here).
        hyps: hypotheses, aligned with ``refs``; an empty hypothesis counts every reference word deleted.

    Returns:
        ``{"wer", "substitutions", "deletions", "insertions", "hits", "ref_words", "utterances"}``.

    Raises:
        ValueError: lengths differ, no utterances, or a reference is empty after normalisation.
    """
    import jiwer

    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("WER of an empty set of utterances is undefined")
    norm_refs = [normalise_transcript(r) for r in refs]
    norm_hyps = [normalise_transcript(h) for h in hyps]
    for i, ref in enumerate(norm_refs):
        if not ref:
            raise ValueError(f"reference {i} ({refs[i]!r}) is empty after normalisation")
    out = jiwer.process_words(norm_refs, norm_hyps)
    ref_words = sum(len(r.split()) for r in norm_refs)
    errors = out.substitutions + out.deletions + out.insertions
    return {
        "wer": errors / ref_words,
        "substitutions": int(out.substitutions),
        "deletions": int(out.deletions),
        "insertions": int(out.insertions),
        "hits": int(out.hits),
        "ref_words": int(ref_words),
        "utterances": len(refs),
    }


def _longest_run(mask: np.ndarray, interior_only: bool) -> int:
    """Length of the longest run of True in a 1-D boolean mask."""
    if interior_only:
        active = np.flatnonzero(~mask)
        if active.size == 0:
            return 0  # no sound at all: there is no interior
        mask = mask[active[0] : active[-1] + 1]
    if not mask.any():
        return 0
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.diff(padded)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return int((ends - starts).max())


def longest_silence_seconds(
    wav: np.ndarray,
    sample_rate: int,
    threshold_db: float = -40.0,
    frame_ms: float = 10.0,
    interior_only: bool = False,
    reference: np.ndarray | None = None,
) -> float:
    """Longest stretch of silence in a waveform (definition in the module docstring).

    Args:
        wav: (samples,) mono waveform.
        sample_rate: its rate.
        threshold_db: silence level relative to the loudest frame (negative).
        frame_ms: analysis frame length; the result is a multiple of it.
        interior_only: ignore silence before the first and after the last sounding frame.
        reference: the waveform whose loudest frame is the 0 dB level (default ``wav``): the whole
            utterance when ``wav`` is its continuation, so a continuation quiet throughout is silence.

    Returns:
        Seconds; an all-zero signal is entirely silent (or 0.0 with ``interior_only``).
    """
    wav = np.asarray(wav, dtype=np.float64)
    if wav.ndim != 1:
        raise ValueError(f"expects a mono (samples,) waveform, got shape {wav.shape}")
    frame = max(1, round(sample_rate * frame_ms / 1000.0))
    rms = _frame_rms(wav, frame)  # (n_frames,)
    if rms.size == 0:
        return 0.0
    peak = rms.max()
    if reference is not None:  # the continuation may hold the loudest frame, so take the larger
        peak = max(peak, _frame_rms(np.asarray(reference, dtype=np.float64), frame).max(initial=0.0))
    if peak == 0.0:
        silent = np.ones(rms.size, dtype=bool)
    else:
        level_db = 20.0 * np.log10(np.maximum(rms, 1e-12) / peak)
        silent = level_db < threshold_db
    return _longest_run(silent, interior_only) * frame / sample_rate


def _frame_rms(wav: np.ndarray, frame: int) -> np.ndarray:
    """RMS level of each non-overlapping ``frame``-sample frame of a 1-D waveform (the last one zero-padded)."""
    n_frames = int(np.ceil(wav.size / frame))
    padded = np.pad(wav, (0, n_frames * frame - wav.size))
    return np.sqrt(np.mean(padded.reshape(n_frames, frame) ** 2, axis=1))


def longest_silence_frames(
    log_mel: np.ndarray, threshold_db: float = -40.0, interior_only: bool = False
) -> int:
    """Longest silence of a log10 mel spectrogram, in frames (62.5 per second for the front end).

    A frame's level is ``20 * log10(sum of its mel magnitudes)``; it is silent when more than
    ``|threshold_db|`` dB below the loudest frame: the mel-domain twin of
    :func:`longest_silence_seconds`, usable on predicted spectrograms before vocoding.

    Args:
        log_mel: (T, n_mels) *denormalised* log10 mel magnitudes.
        threshold_db: silence level relative to the loudest frame (negative).
        interior_only: ignore leading and trailing silence.
    """
    log_mel = np.asarray(log_mel, dtype=np.float64)
    if log_mel.ndim != 2:
        raise ValueError(f"expects a (frames, n_mels) array, got shape {log_mel.shape}")
    if log_mel.shape[0] == 0:
        return 0
    level_db = 20.0 * np.log10(np.power(10.0, log_mel).sum(axis=1))  # (T,)
    silent = level_db - level_db.max() < threshold_db
    return _longest_run(silent, interior_only)


def duration_ratio(generated_seconds: float, reference_seconds: float) -> float:
    """Generated duration over ground-truth duration (1.0 = same length)."""
    if reference_seconds <= 0:
        raise ValueError(f"reference duration must be positive, got {reference_seconds}")
    return float(generated_seconds) / float(reference_seconds)


def real_time_factor(compute_seconds: float, audio_seconds: float) -> float:
    """Compute time over audio time (0.1 = ten times faster than real time)."""
    if audio_seconds <= 0:
        raise ValueError(f"audio duration must be positive, got {audio_seconds}")
    return float(compute_seconds) / float(audio_seconds)
