"""Audio input/output: load any readable file as float32 mono at a target rate, write WAV.

Every loader error is turned into :class:`AudioError`, which names the file and the
reason, so that the data stages can skip and list bad files instead of crashing.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import struct
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000


class AudioError(ValueError):
    """An audio file could not be read or holds no usable signal."""


class AudioTooLong(AudioError):
    """An audio file longer than the caller's limit: by its header, and then not decoded, or, where the
    header does not give the length, by the part decoded before the limit was passed (``seconds`` is that
    part's length, a lower bound)."""

    def __init__(self, path: Path, seconds: float, max_seconds: float, *, header: bool = True):
        how = "not decoded" if header else "its header does not give its length; decoding stopped there"
        more = "" if header else "at least "
        super().__init__(f"{path}: too long ({more}{seconds:.1f} s > {max_seconds:g} s), {how}")
        self.seconds = seconds


# libsndfile's frame count for a file whose header does not give its length (FLAC's STREAMINFO allows
# 0 = "unknown", which a streaming encoder writing to a pipe leaves there): 2**63 - 1. FLAC's own field
# holds 36 bits, so no file states 2**62 frames or more.
UNKNOWN_LENGTH_FRAMES = 1 << 62
_BLOCK_FRAMES = 1 << 16


def length_unknown(frames: int) -> bool:
    """Whether libsndfile's ``frames`` of a file means that its header does not give the length."""
    return frames >= UNKNOWN_LENGTH_FRAMES


def _open_sequential(path: str | Path):
    """``path`` opened for reading front to back with soundfile, which after every read seeks to where
    the read ended: on a FLAC without its length libFLAC cannot seek to the very end (libsndfile
    excuses that only at the length the header gives), so the read that reaches it would fail. A
    reader that says it cannot seek is spared that seek; the decoder reads on from where it is."""
    import soundfile as sf

    class _Sequential(sf.SoundFile):
        def seekable(self) -> bool:
            return False

    return _Sequential(str(path))


def _read_to_end(path: str | Path, dtype: str, max_frames: int | None) -> np.ndarray:
    """All of a file's frames, ``(frames, channels)``, read in blocks until the decoder has no more (one
    read would allocate the 2**63 - 1 frames libsndfile reports for a header without the length); stops
    once more than ``max_frames`` are read and returns those."""
    blocks, read = [], 0
    with _open_sequential(path) as f:
        while len(block := f.read(_BLOCK_FRAMES, dtype=dtype, always_2d=True)):
            blocks.append(block)
            read += len(block)
            if max_frames is not None and read > max_frames:
                break
        channels = f.channels
    return np.concatenate(blocks) if blocks else np.zeros((0, channels), dtype)


def count_frames(path: str | Path) -> int:
    """The number of frames in an audio file: from its header or, where the header does not give it,
    by decoding the whole file (in blocks, nothing kept).

    Raises:
        soundfile's errors for an unreadable file, as ``soundfile.info`` does.
    """
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:
        if not length_unknown(f.frames):
            return f.frames
    frames = 0
    with _open_sequential(path) as f:
        while n := len(f.read(_BLOCK_FRAMES, dtype="int16", always_2d=True)):
            frames += n
    return frames


def resample(wav: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a mono float waveform (soxr, high quality); a no-op at equal rates."""
    if orig_sr <= 0 or target_sr <= 0:
        raise AudioError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    if orig_sr == target_sr:
        return wav.astype(np.float32, copy=False)
    import librosa  # imported lazily: librosa's import is slow and most callers never resample

    return librosa.resample(wav.astype(np.float32, copy=False), orig_sr=orig_sr, target_sr=target_sr, res_type="soxr_hq")


def load_audio(path: str | Path, target_sr: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """Read an audio file as float32 mono in [-1, 1] at ``target_sr``.

    Args:
        path: any format libsndfile reads (WAV, FLAC, OGG, ...).
        target_sr: output sample rate; other rates are resampled.
        max_seconds: refuse, before decoding, a file whose header says it is clearly longer (a
            10-minute recording in a corpus of sentences costs hundreds of MB to decode). The
            exact limit is the caller's to apply to the decoded audio. A file whose header does not
            give its length (a FLAC streamed to a pipe) is decoded in blocks and refused once more
            than ``max_seconds`` + 1 s of it has been read.

    Returns:
        (samples,) float32 array.

    Raises:
        AudioTooLong: longer than ``max_seconds`` by more than 1 s, by the header (or by the part read).
        AudioError: missing, unreadable, truncated, empty, or non-finite audio (message names the file).
    """
    import soundfile as sf  # here, not at the top: the models import this module's constants, and a training
    # node that reads only feature stores (or a GPU bench machine) needs no audio I/O library

    path = Path(path)
    if path.is_dir():
        raise AudioError(f"{path}: is a folder, not an audio file")
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    _check_wav_complete(path)
    integer_pcm = False
    try:
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            known = not length_unknown(f.frames)
            if known and max_seconds is not None and f.frames / sr > max_seconds + 1.0:
                raise AudioTooLong(path, f.frames / sr, max_seconds)
            integer_pcm = f.subtype.startswith("PCM_")
            # 16-bit PCM (our corpus, LibriSpeech FLAC): read as int16 and scale, the same samples as
            # libsndfile's float conversion (x / 32768) at a quarter of the decode time
            dtype = "int16" if f.subtype == "PCM_16" else "float32"
            if known:
                wav = f.read(dtype=dtype, always_2d=True)
            else:  # a header without the length: what is there, up to the same limit
                limit = None if max_seconds is None else int((max_seconds + 1.0) * sr)  # frames
                wav = _read_to_end(path, dtype, limit)
                if limit is not None and len(wav) > limit:
                    raise AudioTooLong(path, len(wav) / sr, max_seconds, header=False)
            if dtype == "int16":
                wav = wav.astype(np.float32) * np.float32(1.0 / 32768.0)
    except AudioTooLong:
        raise
    except Exception as err:  # libsndfile raises several types for corrupt data
        raise AudioError(f"{path}: unreadable audio ({err})") from err
    wav = wav[:, 0] if wav.shape[1] == 1 else wav.mean(axis=1)  # (samples,) mono downmix
    if wav.size == 0:
        raise AudioError(f"{path}: audio holds no samples")
    if not integer_pcm:  # integer samples cannot be NaN, infinite or outside [-1, 1]
        if not np.isfinite(wav).all():
            raise AudioError(f"{path}: audio holds NaN or infinite samples")
        peak = float(np.abs(wav).max())
        if peak > 1.0:  # kept as is: the log-mel (and what a model hears) is louder than the file means
            logging.getLogger(__name__).warning(
                "%s: float samples reach %.3g, outside [-1, 1]; the features will be %.1f dB louder than "
                "a full-scale file", path, peak, 20 * np.log10(peak))
    return resample(wav, sr, target_sr)


# a RIFF chunk size streaming writers put in a header before they know the length (and never fix up)
_UNKNOWN_RIFF_SIZE = 0xFFFFFFFF


def _check_wav_complete(path: Path) -> None:
    """Refuse a RIFF/WAVE file that holds fewer sample bytes than its header promises.

    libsndfile reads such a file without a word, as the few samples that are there (a copy cut
    short, a download that stopped). Other formats are left to libsndfile.

    Raises:
        AudioError: the ``data`` chunk is cut short.
    """
    with open(path, "rb") as f:
        promised = _wav_data_size(f)
        if promised is None:
            return
        data_start = f.tell()
        held = f.seek(0, os.SEEK_END) - data_start
    if held < promised:
        raise AudioError(f"{path}: truncated: header promises {promised} bytes of samples, the file holds {held}")


def _wav_data_size(f: io.BufferedReader) -> int | None:
    """The ``data`` chunk's size by a RIFF/WAVE header, ``f`` left at the chunk's first sample byte.

    Returns:
        The size; None for anything else than a RIFF/WAVE file, a header whose chunks end before a
        ``data`` chunk, or one that does not know its length.
    """
    riff = f.read(12)
    if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
        return None
    while len(header := f.read(8)) == 8:
        chunk_id, size = header[:4], struct.unpack("<I", header[4:])[0]
        if chunk_id == b"data":
            return None if size == _UNKNOWN_RIFF_SIZE else size
        f.seek(size + (size & 1), os.SEEK_CUR)  # chunks are padded to an even size
    return None


LOSSY_FORMATS = ("OGG", "MP3")  # hold no PCM: written in their own codecs (Vorbis, MPEG layer III)


def _write_subtype(audio_format: str) -> str | None:
    """How :func:`write_audio` encodes ``audio_format`` (soundfile's name, e.g. "WAV"): 16-bit PCM, a lossy
    format's own codec, or None for a format it does not write (RAW has no header to say its rate; XI,
    WVE hold only codecs no tool reads speech from)."""
    import soundfile as sf

    if audio_format not in sf.available_formats():
        return None
    if sf.check_format(audio_format, "PCM_16") and sf.default_subtype(audio_format) is not None:
        return "PCM_16"
    return sf.default_subtype(audio_format) if audio_format in LOSSY_FORMATS else None


def audio_extensions() -> list[str]:
    """The file extensions :func:`write_audio` writes (``.wav``, ``.flac``, ..., ``.ogg``, ``.mp3``), one rule
    for it and for the CLI's check of an output name before any model work."""
    import soundfile as sf

    return sorted(f".{name.lower()}" for name in sf.available_formats() if _write_subtype(name) is not None)


def write_audio(path: str | Path, wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write float audio as 16-bit PCM (clipped to [-1, 1]) in the format of ``path``'s extension;
    a format without 16-bit PCM (.ogg, .mp3) in its own codec.

    The file appears whole or not at all: the audio is encoded in memory, written to a temporary
    file beside ``path`` and renamed over it. A write that fails (disk full, a file size limit)
    leaves a file already at ``path`` as it was, and no partial file anywhere.

    Args:
        path: .wav, .flac, ... ; missing parent folders are created.
        wav: (samples,) float waveform.
        sample_rate: its rate.

    Returns:
        ``path``.

    Raises:
        OSError: the file system refused the write (its errno and reason).
        ValueError: ``path``'s extension names no format of :func:`audio_extensions`.
    """
    import soundfile as sf

    path = Path(path)
    audio_format = path.suffix.lstrip(".").upper()
    subtype = _write_subtype(audio_format)
    if subtype is None:
        raise ValueError(f"{path}: the extension names no audio format written here ({', '.join(audio_extensions())})")
    encoded = io.BytesIO()
    sf.write(encoded, np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0), sample_rate, subtype=subtype,
             format=audio_format)
    target = path.resolve()  # a symlink at ``path`` keeps pointing where it did, at the new audio
    target.parent.mkdir(parents=True, exist_ok=True)
    _replace_file(target, encoded.getbuffer())
    return path


def _replace_file(path: Path, data: memoryview) -> None:
    """Put ``data`` at ``path`` by a temporary file in the same folder and a rename (atomic there).

    Not fsynced: the corpus stage writes thousands of clips this way, and what this guards against
    is a failed or interrupted write, not a power cut.
    """
    temporary = path.with_name(f".meld-{secrets.token_hex(8)}.tmp")  # not from path's name: a long one stays writable
    f = open(temporary, "xb")  # "x": never another file's name; the mode the target would get (umask)
    try:
        with f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:  # an interrupt too: no temporary file is left behind
        temporary.unlink(missing_ok=True)
        raise
