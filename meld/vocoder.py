"""Vocoders: log-mel spectrogram (the front end of :mod:`meld.features`) -> 16 kHz waveform.

Two implementations share one interface (:class:`Vocoder`, called on a ``(T, 80)`` array of
*denormalised* log10 mel magnitudes, returning ``T * 256`` float32 samples):

- :class:`HiFiGANVocoder`: the SpeechT5 HiFi-GAN generator (``microsoft/speecht5_hifigan``),
  written here in plain torch and loaded from a local folder in the ``transformers`` layout
  (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``). No hub access, no code execution.
- :class:`GriffinLimVocoder`: no weights at all. The mel filterbank is inverted by non-negative
  least squares, then Griffin-Lim recovers a phase with the front end's own STFT parameters.

Example::

    from meld.vocoder import build_vocoder
    vocoder = build_vocoder("hifigan", "models/speecht5_hifigan")  # falls back to Griffin-Lim if absent
    wav = vocoder(stats.denormalise(predicted_mel))  # (T * 256,) float32 at vocoder.sample_rate
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from meld.audio import SAMPLE_RATE
from meld.features import HOP_LENGTH, N_FFT, N_MELS, WIN_LENGTH, log_mel_ceiling, mel_filterbank
from meld.weights import check_fits, first_line, read_json_object, read_weights, tensor_state

logger = logging.getLogger(__name__)

VOCODER_NAMES = ("griffin_lim", "hifigan")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _check_log_mel(log_mel: np.ndarray) -> np.ndarray:
    log_mel = np.asarray(log_mel)
    if log_mel.ndim != 2 or log_mel.shape[1] != N_MELS:
        raise ValueError(f"a vocoder expects a (frames, {N_MELS}) log-mel array, got shape {log_mel.shape}")
    if log_mel.shape[0] == 0:
        raise ValueError("a vocoder got an empty (0-frame) spectrogram")
    if not np.isfinite(log_mel).all():
        raise ValueError("a vocoder got a spectrogram holding NaN or infinite values")
    return log_mel


class Vocoder(ABC):
    """Turns ``(T, 80)`` denormalised log10 mel magnitudes into ``(T * hop,)`` float32 samples."""

    name: str
    sample_rate: int = SAMPLE_RATE
    hop_length: int = HOP_LENGTH

    @abstractmethod
    def __call__(self, log_mel: np.ndarray) -> np.ndarray:
        """Synthesise one utterance.

        Args:
            log_mel: (T, 80) log10 mel magnitudes, *not* globally normalised.

        Returns:
            (T * 256,) float32 waveform at ``self.sample_rate``.
        """


# --------------------------------------------------------------------------- Griffin-Lim


def mel_to_linear(log_mel: np.ndarray, n_iter: int = 50) -> np.ndarray:
    """Invert the mel filterbank: the non-negative linear magnitude whose mel projection fits best.

    Starts from the clipped pseudo-inverse and refines it by multiplicative NNLS updates
    (Lee & Seung), which keep every bin non-negative and cost two small matrix products each;
    librosa's L-BFGS NNLS reaches the same fit but is several times slower.

    Args:
        log_mel: (T, 80) log10 mel magnitudes.
        n_iter: multiplicative update steps (0 = clipped pseudo-inverse only).

    Returns:
        (T, n_fft // 2 + 1) float64 linear magnitudes; bins outside 80-7600 Hz are zero.
    """
    fb = mel_filterbank()  # (513, 80)
    mel = np.power(10.0, np.asarray(log_mel, dtype=np.float64))  # (T, 80)
    spec = np.maximum(mel @ np.linalg.pinv(fb), 1e-10)  # (T, 513)
    target = mel @ fb.T  # (T, 513): F^T m, fixed across iterations
    for _ in range(n_iter):
        spec *= target / np.maximum((spec @ fb) @ fb.T, 1e-20)
    return spec


class GriffinLimVocoder(Vocoder):
    """Mel inversion (NNLS) followed by Griffin-Lim with the front end's STFT parameters.

    Args:
        n_iter: Griffin-Lim iterations.
        momentum: fast Griffin-Lim momentum (Perraudin et al. 2013; 0 = classic Griffin-Lim).
        nnls_iter: multiplicative NNLS steps of the mel inversion.
        seed: seed of the random initial phase, so that synthesis is deterministic.
    """

    name = "griffin_lim"

    def __init__(self, n_iter: int = 32, momentum: float = 0.99, nnls_iter: int = 50, seed: int = 0):
        if n_iter < 1:
            raise ValueError(f"Griffin-Lim needs n_iter >= 1, got {n_iter}")
        self.n_iter = n_iter
        self.momentum = momentum
        self.nnls_iter = nnls_iter
        self.seed = seed

    def __call__(self, log_mel: np.ndarray) -> np.ndarray:
        log_mel = _check_log_mel(log_mel)
        # float overflow anywhere (10 ** a frame far beyond any log-mel: a model's frames denormalised
        # with wrong statistics) is said here in one line, not as numpy warnings and then librosa's
        # "Audio buffer is not finite everywhere", which named neither the input nor its values
        with np.errstate(over="ignore", invalid="ignore"):
            wav = self._synthesise(log_mel)
        if wav is None:
            raise ValueError(
                f"Griffin-Lim overflows on log-mel values up to {log_mel.max():.3g}; no log-mel exceeds "
                f"{log_mel_ceiling():.1f} (frames denormalised with the wrong statistics?)"
            )
        return wav

    def _synthesise(self, log_mel: np.ndarray) -> np.ndarray | None:
        """(T, 80) checked log-mel -> (T * hop,) float32 samples, or None if a step overflowed."""
        import librosa  # lazy: slow import, and HiFi-GAN users never need it

        spec = mel_to_linear(log_mel, self.nnls_iter)  # (T, 513)
        stft = {
            "n_fft": N_FFT,
            "hop_length": HOP_LENGTH,
            "win_length": WIN_LENGTH,
            "window": "hann",
            "center": True,
        }
        # (513, T): librosa's layout; float32 halves the cost, and the phase needs no more precision
        magnitude = spec.T.astype(np.float32)
        if not np.isfinite(magnitude).all():
            return None
        rng = np.random.default_rng(self.seed)
        angles = np.exp(2j * np.pi * rng.random(magnitude.shape, dtype=np.float32))  # complex64
        # Fast Griffin-Lim (Perraudin et al. 2013), as librosa.griffinlim; written out because
        # librosa's version can't return T * hop samples for T frames (it re-analyses at that length).
        # istft makes (T - 1) * hop samples of T frames, which re-analyse to T frames; a single frame
        # would make none, and an empty signal has no STFT, so it gets one hop (re-analysed to 2 frames)
        frames = log_mel.shape[0]
        analysed = max(frames - 1, 1) * HOP_LENGTH
        rebuilt = np.zeros_like(angles)
        for _ in range(self.n_iter):
            previous = rebuilt
            inverse = librosa.istft(magnitude * angles, length=analysed, **stft)
            if not np.isfinite(inverse).all():  # librosa.stft refuses it
                return None
            rebuilt = librosa.stft(inverse, pad_mode="reflect", **stft)[:, :frames]  # (513, T)
            angles = rebuilt - (self.momentum / (1.0 + self.momentum)) * previous
            angles /= np.abs(angles) + 1e-16
        wav = librosa.istft(magnitude * angles, length=frames * HOP_LENGTH, **stft)  # T * hop samples
        return wav.astype(np.float32) if np.isfinite(wav).all() else None


# --------------------------------------------------------------------------- HiFi-GAN


class HiFiGANResBlock(nn.Module):
    """HiFi-GAN "resblock 1": pairs of (dilated conv, conv), each pair wrapped in a residual."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int], leaky_relu_slope: float):
        super().__init__()
        self.leaky_relu_slope = leaky_relu_slope
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=(kernel_size - 1) * d // 2)
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2) for _ in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L) -> (B, C, L)
        for conv1, conv2 in zip(self.convs1, self.convs2):
            y = conv1(F.leaky_relu(x, self.leaky_relu_slope))
            y = conv2(F.leaky_relu(y, self.leaky_relu_slope))
            x = x + y
        return x


class HiFiGANGenerator(nn.Module):
    """The SpeechT5 HiFi-GAN generator; parameter names follow ``transformers.SpeechT5HifiGan``.

    Args:
        model_in_dim: mel channels.
        upsample_initial_channel: channels after ``conv_pre``; halved by every upsampling layer.
        upsample_rates: stride of each transposed convolution (their product is the hop length).
        upsample_kernel_sizes: kernel of each transposed convolution.
        resblock_kernel_sizes: kernels of the parallel residual blocks after each upsampling.
        resblock_dilation_sizes: dilations inside each of those blocks.
        leaky_relu_slope: negative slope inside the network.
        normalize_before: standardise the input with the ``mean`` / ``scale`` buffers first.
    """

    def __init__(
        self,
        model_in_dim: int = N_MELS,
        upsample_initial_channel: int = 512,
        upsample_rates: Sequence[int] = (4, 4, 4, 4),
        upsample_kernel_sizes: Sequence[int] = (8, 8, 8, 8),
        resblock_kernel_sizes: Sequence[int] = (3, 7, 11),
        resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
        leaky_relu_slope: float = 0.1,
        normalize_before: bool = True,
    ):
        super().__init__()
        if len(upsample_rates) != len(upsample_kernel_sizes):
            raise ValueError("upsample_rates and upsample_kernel_sizes must have the same length")
        if len(resblock_kernel_sizes) != len(resblock_dilation_sizes):
            raise ValueError("resblock_kernel_sizes and resblock_dilation_sizes must have the same length")
        self.leaky_relu_slope = leaky_relu_slope
        self.normalize_before = normalize_before
        self.num_kernels = len(resblock_kernel_sizes)
        self.hop_length = int(np.prod(upsample_rates))

        self.conv_pre = nn.Conv1d(model_in_dim, upsample_initial_channel, kernel_size=7, padding=3)
        self.upsampler = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        channels = upsample_initial_channel
        for i, (rate, kernel) in enumerate(zip(upsample_rates, upsample_kernel_sizes)):
            channels = upsample_initial_channel // (2 ** (i + 1))
            self.upsampler.append(
                nn.ConvTranspose1d(
                    upsample_initial_channel // (2**i),
                    channels,
                    kernel,
                    stride=rate,
                    padding=(kernel - rate) // 2,
                )
            )
            for k, dilations in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(HiFiGANResBlock(channels, k, dilations, leaky_relu_slope))
        self.conv_post = nn.Conv1d(channels, 1, kernel_size=7, padding=3)
        self.register_buffer("mean", torch.zeros(model_in_dim))
        self.register_buffer("scale", torch.ones(model_in_dim))

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        """(B, T, mel) log10 mel -> (B, T * hop_length) waveform in [-1, 1]."""
        if self.normalize_before:
            log_mel = (log_mel - self.mean) / self.scale
        x = self.conv_pre(log_mel.transpose(1, 2))  # (B, C0, T)
        for i, upsample in enumerate(self.upsampler):
            x = upsample(F.leaky_relu(x, self.leaky_relu_slope))  # (B, C_i, T * prod(rates[:i+1]))
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels
        # The reference applies the final leaky ReLU with torch's default slope (0.01), not the config's.
        x = self.conv_post(F.leaky_relu(x))  # (B, 1, T * hop)
        return torch.tanh(x).squeeze(1)  # (B, T * hop)


# config.json keys that define the architecture; the rest (transformers bookkeeping) is ignored.
_GENERATOR_KEYS = (
    "model_in_dim",
    "upsample_initial_channel",
    "upsample_rates",
    "upsample_kernel_sizes",
    "resblock_kernel_sizes",
    "resblock_dilation_sizes",
    "leaky_relu_slope",
    "normalize_before",
)


def _fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace weight-norm pairs by the plain ``weight`` they stand for.

    Handles both layouts torch has used: ``X.weight_g`` / ``X.weight_v`` (``nn.utils.weight_norm``)
    and ``X.parametrizations.weight.original0`` / ``original1`` (``nn.utils.parametrizations``).
    Norms are taken over every dimension but 0, torch's default ``dim=0``.
    """
    pairs = {  # g key suffix -> v key suffix
        ".weight_g": ".weight_v",
        ".parametrizations.weight.original0": ".parametrizations.weight.original1",
    }
    out = dict(state)
    for key in state:
        for g_suffix, v_suffix in pairs.items():
            if not key.endswith(g_suffix):
                continue
            prefix = key[: -len(g_suffix)]
            v_key = prefix + v_suffix
            if v_key not in state:
                raise ValueError(f"HiFi-GAN weights hold {key} but not its pair {v_key}")
            g, v = state[key].float(), state[v_key].float()
            norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))  # (out, 1, 1)
            out[prefix + ".weight"] = v * (g.view_as(norm) / norm)
            del out[key], out[v_key]
    return out


def _load_state_dict(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the weights file, its tensors); a file that is there but does not read is a ValueError naming it."""
    for name in _WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            return path, tensor_state(read_weights(path, "HiFi-GAN"), path, "HiFi-GAN")
    raise FileNotFoundError(f"{folder}: no HiFi-GAN weights (expected one of {', '.join(_WEIGHT_FILES)})")


class HiFiGANVocoder(Vocoder):
    """SpeechT5 HiFi-GAN: neural vocoder for the exact mel front end of :mod:`meld.features`.

    Args:
        generator: a loaded :class:`HiFiGANGenerator` (use :meth:`from_path` for a folder on disk).
        device: torch device for inference.
    """

    name = "hifigan"

    def __init__(self, generator: HiFiGANGenerator, device: str = "cpu"):
        self.device = torch.device(device)
        self.generator = generator.to(self.device).eval()
        self.hop_length = generator.hop_length
        self.source = "HiFi-GAN"  # where its weights came from, for messages (set by from_path)

    @classmethod
    def from_path(cls, path: str | Path, device: str = "cpu") -> HiFiGANVocoder:
        """Load a folder in the ``transformers`` layout (``config.json`` + weights).

        Raises:
            FileNotFoundError: the folder, its config or its weights are missing.
            ValueError: the config is not a SpeechT5 HiFi-GAN (or not JSON), the weights file does not read
                (truncated, empty), its tensors don't fit the config, or hold NaN / infinity.
        """
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise FileNotFoundError(f"{folder}: is a file, not a folder (expected a SpeechT5 HiFi-GAN folder)")
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder}: no config.json (expected a SpeechT5 HiFi-GAN folder)")
        config = read_json_object(config_path)
        model_type = config.get("model_type", "speecht5_hifigan")
        if model_type != "speecht5_hifigan":
            raise ValueError(f"{config_path}: model_type is {model_type!r}, expected 'speecht5_hifigan'")
        try:
            sample_rate = int(config.get("sampling_rate", SAMPLE_RATE))
            generator = HiFiGANGenerator(**{k: config[k] for k in _GENERATOR_KEYS if k in config})
        except (TypeError, ValueError, RuntimeError) as err:  # a key of the wrong type, length or sign
            raise ValueError(f"{config_path}: not a valid SpeechT5 HiFi-GAN config ({first_line(err)})") from err
        if sample_rate != SAMPLE_RATE:
            raise ValueError(
                f"{config_path}: vocoder runs at {sample_rate} Hz, the toolkit at {SAMPLE_RATE} Hz"
            )
        if generator.hop_length != HOP_LENGTH:
            raise ValueError(
                f"{config_path}: upsampling by {generator.hop_length}, the front end's hop is {HOP_LENGTH}"
            )
        # another front end's vocoder (e.g. 100 bands) loads and passes the probe below, which takes its
        # own width, then fails on every utterance with a broadcasting error that names no file
        if generator.conv_pre.in_channels != N_MELS:
            raise ValueError(
                f"{config_path}: model_in_dim is {generator.conv_pre.in_channels} mel bands, the front end has {N_MELS}"
            )
        weights_path, state = _load_state_dict(folder)
        try:
            state = _fold_weight_norm(state)
        except ValueError as err:
            raise ValueError(f"{weights_path}: {err}") from err
        check_fits(generator.state_dict(), state, weights_path, "the SpeechT5 HiFi-GAN in config.json")
        generator.load_state_dict(state, strict=True)
        # finite weights can still overflow (e.g. a checkpoint saved mid-divergence): a few frames
        # spanning the log-mel range say so now, not after a whole split has been generated
        with torch.inference_mode():
            probe = torch.linspace(-5.0, 1.0, 8 * generator.conv_pre.in_channels).reshape(1, 8, -1)
            if not torch.isfinite(generator.eval()(probe)).all():
                raise ValueError(f"{weights_path}: the HiFi-GAN outputs NaN or infinite samples for a test "
                                 "spectrogram (log-mel -5..1): its weights overflow")
        logger.info("loaded HiFi-GAN vocoder from %s", folder)
        vocoder = cls(generator, device=device)
        vocoder.source = str(folder)
        return vocoder

    @torch.inference_mode()
    def __call__(self, log_mel: np.ndarray) -> np.ndarray:
        log_mel = _check_log_mel(log_mel)
        x = torch.as_tensor(log_mel, dtype=torch.float32, device=self.device).unsqueeze(0)  # (1, T, 80)
        wav = self.generator(x)[0].float().cpu().numpy()  # (T * hop,)
        if not np.isfinite(wav).all():  # said here, not by a judge that reads the audio later
            raise ValueError(
                f"{self.source}: HiFi-GAN output holds NaN or infinite samples for a finite {log_mel.shape} "
                f"spectrogram (log-mel range {log_mel.min():.3g}..{log_mel.max():.3g}; weights overflowing?)"
            )
        return wav


def build_vocoder(
    name: str, path: str | Path | None = None, n_iter: int = 32, device: str = "cpu"
) -> Vocoder:
    """Build a vocoder by name.

    Args:
        name: ``"griffin_lim"`` or ``"hifigan"``.
        path: folder of the HiFi-GAN weights (``hifigan`` only). If it is not given, or holds no
            config/weights, a warning is logged and Griffin-Lim is returned instead; weights that are
            there but broken (corrupt file, other shapes, NaN) are a ``ValueError`` naming the file.
        n_iter: Griffin-Lim iterations (for ``griffin_lim`` and the fallback).
        device: torch device of HiFi-GAN.

    Returns:
        A :class:`Vocoder`; check ``.name`` to see which one you got.
    """
    if name == "griffin_lim":
        return GriffinLimVocoder(n_iter=n_iter)
    if name != "hifigan":
        raise ValueError(f"unknown vocoder {name!r}; choose one of {', '.join(VOCODER_NAMES)}")
    if path is None:
        logger.warning("HiFi-GAN vocoder requested without a weights folder: falling back to Griffin-Lim")
        return GriffinLimVocoder(n_iter=n_iter)
    try:
        return HiFiGANVocoder.from_path(path, device=device)
    except FileNotFoundError as err:
        logger.warning("HiFi-GAN vocoder unavailable (%s): falling back to Griffin-Lim", err)
        return GriffinLimVocoder(n_iter=n_iter)
