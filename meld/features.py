"""The one mel front end of the toolkit, and its normalisation statistics.

16 kHz mono; STFT n_fft=1024, window 1024 (periodic Hann), hop 256 (62.5 Hz), centred
with reflect padding; magnitude; 80 Slaney mel bands over 80-7600 Hz; log10(max(1e-10, mel)).
This is exactly what the SpeechT5 HiFi-GAN vocoder consumes. The STFT runs in float64:
in float32 it differs from the reference by up to ~3e-4 in log10 (far more in near-empty bands).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from meld.audio import SAMPLE_RATE, resample

N_FFT = 1024
WIN_LENGTH = 1024
HOP_LENGTH = 256
N_MELS = 80
F_MIN = 80.0
F_MAX = 7600.0
LOG_FLOOR = 1e-10
FRAME_RATE = SAMPLE_RATE / HOP_LENGTH  # 62.5 frames per second


@lru_cache(maxsize=1)
def mel_filterbank() -> np.ndarray:
    """(n_fft // 2 + 1, 80) float64 Slaney-normalised mel filters on the Slaney mel scale."""
    import librosa

    fb = librosa.filters.mel(
        sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=F_MIN, fmax=F_MAX, htk=False, norm="slaney", dtype=np.float64
    )  # (80, 513)
    return np.ascontiguousarray(fb.T)


@lru_cache(maxsize=1)
def _periodic_hann() -> np.ndarray:
    n = np.arange(WIN_LENGTH, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / WIN_LENGTH)


def num_frames(num_samples: int) -> int:
    """Frames produced by :func:`log_mel` for a 16 kHz signal of ``num_samples`` samples."""
    return 1 + num_samples // HOP_LENGTH


def log_mel(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """Log-mel spectrogram of a mono waveform.

    Args:
        wav: (samples,) mono float waveform in [-1, 1].
        sample_rate: rate of ``wav``; anything but 16 kHz is resampled first.

    Returns:
        (frames, 80) float32 log10 mel magnitudes, frames = 1 + samples_16k // 256.
    """
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise ValueError(f"log_mel expects a mono (samples,) waveform, got shape {wav.shape}")
    if wav.size == 0:
        raise ValueError("log_mel got an empty waveform")
    if sample_rate != SAMPLE_RATE:
        wav = resample(wav, sample_rate, SAMPLE_RATE)
    x = wav.astype(np.float64)
    pad = N_FFT // 2
    x = np.pad(x, (pad, pad), mode="reflect")
    n_frames = 1 + (x.size - N_FFT) // HOP_LENGTH
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP_LENGTH][:n_frames]  # (T, n_fft)
    spec = np.abs(np.fft.rfft(frames * _periodic_hann(), axis=-1))  # (T, 513) magnitude
    mel = spec @ mel_filterbank()  # (T, 80)
    return np.log10(np.maximum(mel, LOG_FLOOR)).astype(np.float32)


@dataclass(frozen=True)
class NormStats:
    """Per-channel mean and std of log-mel frames (computed on the training split only)."""

    mean: np.ndarray  # (80,)
    std: np.ndarray  # (80,)

    def normalise(self, mel: np.ndarray) -> np.ndarray:
        return ((mel - self.mean) / self.std).astype(np.float32)

    def denormalise(self, mel: np.ndarray) -> np.ndarray:
        return (mel * self.std + self.mean).astype(np.float32)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> NormStats:
        return cls(np.asarray(d["mean"], dtype=np.float32), np.asarray(d["std"], dtype=np.float32))


class RunningStats:
    """Streaming per-channel mean/std (Chan's parallel update, float64) over many utterances."""

    def __init__(self, dim: int = N_MELS):
        self.count = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros(dim, dtype=np.float64)

    def update(self, frames: np.ndarray) -> None:
        n = frames.shape[0]
        if n == 0:
            return
        batch_mean = frames.mean(axis=0, dtype=np.float64)
        batch_m2 = ((frames - batch_mean) ** 2).sum(axis=0, dtype=np.float64)
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + batch_m2 + delta**2 * self.count * n / total
        self.count = total

    def finalise(self, min_std: float = 1e-3) -> NormStats:
        if self.count < 2:
            raise ValueError("normalisation statistics need at least two frames")
        std = np.sqrt(self.m2 / (self.count - 1))
        return NormStats(self.mean.astype(np.float32), np.maximum(std, min_std).astype(np.float32))
