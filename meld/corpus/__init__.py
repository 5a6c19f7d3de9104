"""Corpus sources. Each writes ``<out>/<split>/manifest.jsonl`` rows ``{id, speaker, text, audio, duration}``.

``audio`` is relative to the manifest's folder, so that a corpus folder can be moved or shared together with
its audio; or absolute where the source was given an absolute place (a LibriSpeech root on shared storage),
so that the corpus folder can be copied or pulled into a checkout anywhere while the audio stays put.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

MANIFEST_KEYS = ("id", "speaker", "text", "audio", "duration")


def write_manifest(rows: Iterable[dict], path: str | Path) -> int:
    """Write manifest rows as JSON lines (atomically); returns the number of rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            missing = [k for k in MANIFEST_KEYS if k not in row]
            if missing:
                raise ValueError(f"manifest row {row.get('id', '?')} lacks {missing}")
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


class ManifestError(ValueError):
    """A manifest that cannot be read as one: the message names the file and line."""


def read_manifest(path: str | Path) -> list[dict]:
    """Read a manifest; each row gains ``audio_path``, the absolute path of its audio file.

    Every row needs an ``audio`` path and an ``id`` that is unique in the file and usable as a file name
    (stages name per-utterance outputs after it, and key audio paths by it: a repeated id would give one
    utterance the other's audio). Missing ``text``, ``speaker`` or ``duration`` are left to
    :func:`load_utterance`, which rejects that utterance alone, and a missing audio file likewise.

    Raises:
        FileNotFoundError: no file at ``path``.
        ManifestError: a line that is not UTF-8, not a JSON object, or lacks or repeats its id or audio path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest (did the corpus stage run?)")
    rows = []
    line_of_id: dict[str, int] = {}
    with open(path, "rb") as f:  # decoded line by line, so that a bad byte names its line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ManifestError(f"{path}:{lineno}: not UTF-8 ({err.reason} at byte {err.start} of the line: "
                                    f"{raw[max(0, err.start - 20):err.start + 4]!r})") from err
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ManifestError(f"{path}:{lineno}: not valid JSON ({err})") from err
            if not isinstance(row, dict) or not isinstance(row.get("audio"), str):
                raise ManifestError(
                    f"{path}:{lineno}: a manifest row needs an \"audio\" path (got {line.strip()[:80]})")
            utt_id = row.get("id")
            if not isinstance(utt_id, str) or utt_id in ("", ".", "..") or "/" in utt_id or "\\" in utt_id:
                raise ManifestError(f"{path}:{lineno}: a manifest row needs an \"id\" that can name a file: a "
                                    f"non-empty string without / or \\ (got {utt_id!r})")
            if utt_id in line_of_id:
                raise ManifestError(f"{path}:{lineno}: id {utt_id!r} is already the id of line {line_of_id[utt_id]}; "
                                    "ids must be unique within a split")
            line_of_id[utt_id] = lineno
            row["audio_path"] = str((path.parent / row["audio"]).resolve())
            rows.append(row)
    return rows


def load_utterance(row: dict, min_seconds: float, max_seconds: float):
    """The checks every data stage applies to a manifest row, then its 16 kHz audio.

    One definition, so the feature store and the code store keep and reject the same utterances.

    Args:
        row: a manifest row as :func:`read_manifest` returns it (with ``audio_path``).
        min_seconds, max_seconds: clips outside this range are rejected.

    Returns:
        (meta {id, speaker, text, duration}, (samples,) float32 waveform or None, rejection reason or None);
        ``duration`` is the measured length of the audio.
    """
    from meld.audio import (  # soundfile only where audio is read
        SAMPLE_RATE,
        AudioError,
        AudioTooLong,
        load_audio,
    )
    from meld.text import normalise_transcript

    meta = {k: row.get(k) for k in ("id", "speaker", "text", "duration")}
    text = row.get("text")
    if not isinstance(text, str) or not normalise_transcript(text):
        return meta, None, "empty or non-text transcript"
    speaker = row.get("speaker")
    if not isinstance(speaker, str) or not speaker.strip():  # evaluation chooses and judges by speaker
        return meta, None, f"no speaker (got {speaker!r})"
    try:
        wav = load_audio(row["audio_path"], max_seconds=max_seconds)
    except AudioTooLong as err:  # told by the file's header: not decoded
        return meta, None, duration_rejection(err.seconds, min_seconds, max_seconds)
    except AudioError as err:
        return meta, None, str(err)
    seconds = wav.size / SAMPLE_RATE
    reason = duration_rejection(seconds, min_seconds, max_seconds)
    if reason:
        return meta, None, reason
    meta["duration"] = round(seconds, 4)
    return meta, wav, None


def duration_rejection(seconds: float, min_seconds: float, max_seconds: float) -> str | None:
    """Why a clip of ``seconds`` is rejected by the data stages' length range, or None: the one rule
    :func:`load_utterance` applies to decoded audio and :func:`check_manifest_durations` to the manifest."""
    if seconds > max_seconds:
        return f"too long: {seconds:.1f} s > features.max_seconds={max_seconds}"
    if seconds < min_seconds:
        return f"too short: {seconds:.2f} s < features.min_seconds={min_seconds}"
    return None


def check_manifest_durations(stage: str, split: str, rows: list[dict], min_seconds: float, max_seconds: float,
                             limit: float) -> None:
    """Stop a data stage before its pass over the audio when the manifest's durations alone (the corpus stage
    reads them from each file's header) put more of a split outside ``[min_seconds, max_seconds]`` than
    ``limit`` allows: the pass would stop it anyway (:func:`meld.store.enforce_rejected_fraction`), but only
    after decoding every file (hours, on LibriSpeech 960 h). Rows without a duration are left to the pass."""
    outside = [r for r in rows if isinstance(r.get("duration"), (int, float))
               and duration_rejection(r["duration"], min_seconds, max_seconds)]
    frac = len(outside) / max(1, len(rows))
    if frac > limit:
        longest = max(outside, key=lambda r: r["duration"])
        shortest = min(outside, key=lambda r: r["duration"])
        raise SystemExit(
            f"{stage}: split '{split}' has {len(outside)}/{len(rows)} utterances ({frac:.1%}) outside "
            f"features.min_seconds..features.max_seconds = {min_seconds:g}..{max_seconds:g} s by its manifest's "
            f"durations (from {shortest['duration']:g} s, {shortest.get('id')}, to {longest['duration']:g} s, "
            f"{longest.get('id')}), more than features.max_rejected_fraction={limit:.1%} allows; nothing was "
            "processed: widen the range or raise the fraction"
        )
