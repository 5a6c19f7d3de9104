"""The one mel front end of the toolkit, and its normalisation statistics.

16 kHz mono; STFT n_fft=1024, window 1024 (periodic Hann), hop 256 (62.5 Hz), centred
with reflect padding; magnitude; 80 Slaney mel bands over 80-7600 Hz; log10(max(1e-10, mel)).
This is exactly what the SpeechT5 HiFi-GAN vocoder consumes.

How :func:`log_mel` computes it (measured by ``bench/features.py``):

* The FFT runs in float64 (MKL's real FFT through torch). A float32 FFT is ~2x faster but its
  rounding error scales with the whole frame's energy, so weak bands come out up to ~1e-3 off in
  log10 on the corpus (and ~0.4 on 8 kHz audio upsampled to 16 kHz), over the 1e-4 the SpeechT5
  agreement allows.
* The FFT reads the overlapping frames in place (a strided view of the padded signal, no (T, 1024)
  copy); the periodic Hann window is applied after it, as the 3-tap filter (-1/4, 1/2, -1/4)
  across neighbouring bins, which is the same product computed in the frequency domain.
* Window, magnitude and mel projection run in one numba kernel over each frame's spectrum; the
  projection touches only the 942 non-zero filterbank weights (of 41,040). Magnitudes and the mel
  sums are float32: sums of positive terms, no cancellation, so their relative error (~1e-6) is far
  inside the tolerance. The log10 is float32 (torch's vectorised one), within 3e-7 of a float64 log,
  and clamped so the floor stays exactly -10.
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


@dataclass(frozen=True)
class _MelBands:
    """The filterbank as one run of weights per band, from its first to its last non-zero bin."""

    first_bin: int  # lowest bin any band uses (>= 1: the window needs bin k - 1)
    end_bin: int  # one past the highest (<= n_fft // 2: the window needs bin k + 1)
    start: np.ndarray  # (80,) uint64, band's first bin relative to first_bin
    length: np.ndarray  # (80,) uint64, bins in the band's run
    offset: np.ndarray  # (80,) uint64, where the run starts in weights
    weights: np.ndarray  # (sum of lengths,) float32


@lru_cache(maxsize=1)
def _mel_bands() -> _MelBands:
    fb = mel_filterbank()  # (513, 80)
    nonzero = [np.flatnonzero(fb[:, m]) for m in range(N_MELS)]
    lo = np.array([nz[0] for nz in nonzero])
    hi = np.array([nz[-1] + 1 for nz in nonzero])
    first, end = int(lo.min()), int(hi.max())
    if first < 1 or end > N_FFT // 2:  # the 3-tap window reads one bin either side
        raise ValueError(f"mel bands span FFT bins {first}..{end - 1}; the kernel needs 1..{N_FFT // 2 - 1}")
    lengths = hi - lo
    return _MelBands(
        first_bin=first,
        end_bin=end,
        start=(lo - first).astype(np.uint64),
        length=lengths.astype(np.uint64),
        offset=np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.uint64),
        weights=np.concatenate([fb[a:b, m] for m, (a, b) in enumerate(zip(lo, hi))]).astype(np.float32),
    )


def _hann_magnitude_mel(spec, first_bin, n_bins, start, length, offset, weights, out):  # compiled by numba
    """Per frame: Hann window as a 3-tap filter, magnitude, mel projection.

    Args:
        spec: (T, 2 * (n_fft // 2 + 1)) float64, rFFT of the *unwindowed* frames, (re, im) interleaved.
        first_bin, n_bins: uint64, the bins the bands use.
        start, length, offset, weights: :class:`_MelBands` fields.
        out: (T, 80) float32, written with the mel magnitudes.
    """
    # Unsigned indices throughout: numba checks signed ones for negative wrap-around, which
    # stops LLVM from vectorising these loops (2-3x slower).
    one, two, three = np.uint64(1), np.uint64(2), np.uint64(3)
    mag = np.empty(n_bins, np.float32)
    for t in range(spec.shape[0]):
        row = spec[t]
        for i in range(n_bins):
            j = two * (first_bin + i)  # real part of bin first_bin + i
            # periodic Hann over the whole frame (WIN_LENGTH == N_FFT = N): w[n] = 1/2 - cos(2 pi n / N) / 2
            # <=> X_w[k] = X[k]/2 - (X[k-1] + X[k+1])/4
            re = 0.5 * row[j] - 0.25 * (row[j - two] + row[j + two])
            im = 0.5 * row[j + one] - 0.25 * (row[j - one] + row[j + three])
            mag[i] = np.sqrt(np.float32(re * re + im * im))
        mel = out[t]
        for m in range(np.uint64(start.size)):
            acc = np.float32(0.0)
            s, w = start[m], offset[m]
            for i in range(length[m]):
                acc += weights[w + i] * mag[s + i]
            mel[m] = acc


@lru_cache(maxsize=1)
def _kernel():
    """The numba-compiled kernel, built on first use (numba is a librosa dependency; importing it
    with this module would slow down every import of ``meld.features``). Cached on disk."""
    import numba

    # reassoc lets LLVM vectorise the mel sums; contract allows fused multiply-adds.
    return numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})(_hann_magnitude_mel)


def _reflect_pad(wav: np.ndarray, pad: int) -> np.ndarray:
    """float64 copy of ``wav`` with ``pad`` reflected samples at each end (numpy's ``reflect``)."""
    n = wav.size
    if n <= pad:  # shorter than the pad: numpy's repeated reflection
        return np.pad(wav.astype(np.float64), (pad, pad), mode="reflect")
    x = np.empty(n + 2 * pad)
    x[pad : pad + n] = wav  # float64 cast on the way in
    x[:pad] = x[2 * pad : pad : -1]  # w[pad], ..., w[1]
    x[pad + n :] = x[pad + n - 2 : n - 2 : -1]  # w[n-2], ..., w[n-1-pad]
    return x


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

    Raises:
        ValueError: not a non-empty mono waveform, a NaN or infinite sample, or samples so large
            that the spectrum overflows float32 (only samples beyond sqrt(float32 max) / 512 = 3.6e16
            can: the window sums to 512); louder than full scale short of that is analysed as it is.
    """
    import torch

    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise ValueError(f"log_mel expects a mono (samples,) waveform, got shape {wav.shape}")
    if wav.size == 0:
        raise ValueError("log_mel got an empty waveform")
    if not np.isfinite(wav).all():  # a NaN would come out as frames of silence (-10), not as an error
        raise ValueError("log_mel got a waveform holding NaN or infinite samples")
    if sample_rate != SAMPLE_RATE:
        wav = resample(wav, sample_rate, SAMPLE_RATE)
    x = _reflect_pad(wav, N_FFT // 2)
    n_frames = num_frames(wav.size)
    frames = torch.from_numpy(x).as_strided((n_frames, N_FFT), (HOP_LENGTH, 1))  # (T, n_fft) view, no copy
    spec = np.ascontiguousarray(torch.fft.rfft(frames, dim=-1).numpy())  # (T, 513) complex128, unwindowed
    bands = _mel_bands()
    mel = np.empty((n_frames, N_MELS), np.float32)
    _kernel()(
        spec.view(np.float64),  # (T, 1026) re, im interleaved
        np.uint64(bands.first_bin),
        np.uint64(bands.end_bin - bands.first_bin),
        bands.start,
        bands.length,
        bands.offset,
        bands.weights,
        mel,
    )
    logged = _log10_floored(mel)
    if not np.isfinite(logged).all():  # |X|^2 overflows float32 in the kernel: a spectrum of inf
        raise ValueError(f"log_mel: samples up to {float(np.abs(wav).max()):.3g} overflow the spectrum "
                         "(float32); audio should lie in [-1, 1]")
    return logged


def _log10_floored(mel: np.ndarray) -> np.ndarray:
    """log10(max(1e-10, mel)) of a float32 array, in place.

    float32 through torch, which is vectorised (numpy's float64 log10 runs a scalar loop on CPUs
    without AVX-512): within 3e-7 of the float64 log. The float32 floor's log is a few ulp under
    -10, so the result is clamped to put silence exactly on -10.
    """
    import torch

    logged = torch.from_numpy(mel).clamp_(min=LOG_FLOOR).log10_().clamp_(min=float(np.log10(LOG_FLOOR)))
    return logged.numpy()


@lru_cache(maxsize=1)
def log_mel_ceiling() -> float:
    """The largest value :func:`log_mel` can return, whatever the audio: a magnitude at the float32
    overflow limit (sqrt of float32's max, as the kernel squares it) through the band whose weights
    sum highest. A "log-mel" above it (a model's frames denormalised by wrong statistics) is no
    spectrum of anything, and Griffin-Lim's float32 arithmetic overflows from about twice it."""
    band_weight = float(mel_filterbank().sum(axis=0).max())
    return float(np.log10(np.sqrt(np.finfo(np.float32).max, dtype=np.float64) * band_weight))


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
