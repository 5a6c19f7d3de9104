"""Speaker embeddings for SIM: cosine similarity between the 3-second prompt and the generated speech.

- ``resemblyzer``: the GE2E d-vector encoder whose weights ship inside the ``resemblyzer`` wheel
  (fully offline; its VAD needs ``setuptools<81`` for ``pkg_resources``).
- ``wavlm``: ``WavLMForXVector`` (e.g. ``microsoft/wavlm-base-sv``, the paper's SIM model) from a
  local folder in the ``transformers`` layout; never downloaded.

Example::

    embedder = build_speaker_embedder("resemblyzer")
    sim = cosine_similarity(embedder.embed(prompt, 16000), embedder.embed(generated, 16000))
"""

from __future__ import annotations

import logging
import warnings
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from meld.audio import SAMPLE_RATE, resample

logger = logging.getLogger(__name__)

SPEAKER_NAMES = ("resemblyzer", "wavlm")


def _as_mono_16k(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1 or wav.size == 0:
        raise ValueError(
            f"a speaker embedder expects a non-empty mono (samples,) waveform, got shape {wav.shape}"
        )
    if not np.isfinite(wav).all():
        raise ValueError("a speaker embedder got a waveform holding NaN or infinite samples")
    return resample(wav, sample_rate, SAMPLE_RATE)


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("speaker embedding has zero or non-finite norm")
    return vector / norm


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two embeddings, in [-1, 1].

    Raises:
        ValueError: shapes differ, or either vector has zero norm.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"embeddings differ in size: {a.shape} vs {b.shape}")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 or nb == 0.0:
        raise ValueError("cosine similarity of a zero vector is undefined")
    return float(np.clip(a @ b / (na * nb), -1.0, 1.0))


def wavlm_min_samples(config: dict) -> int:
    """Fewest 16 kHz samples a ``WavLMForXVector`` of this config embeds: its TDNN layers need as many
    frames as their receptive field, and one more for the standard deviation of the statistics pooling."""
    frames = 2 + sum((k - 1) * d for k, d in zip(config.get("tdnn_kernel", (5, 3, 3, 1, 1)),
                                                  config.get("tdnn_dilation", (1, 2, 3, 1, 1))))
    kernels = config.get("conv_kernel", (10, 3, 3, 3, 3, 2, 2))
    strides = config.get("conv_stride", (5, 2, 2, 2, 2, 2, 2))
    for k, s in reversed(list(zip(kernels, strides))):  # frames out of a conv layer -> samples into it
        frames = (frames - 1) * s + k
    return frames


class SpeakerEmbedder(ABC):
    """Waveform in, unit-norm speaker embedding out."""

    name: str

    @abstractmethod
    def embed(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        """Embed one utterance.

        Args:
            wav: (samples,) mono float waveform; resampled to 16 kHz if needed.
            sample_rate: rate of ``wav``.

        Returns:
            (dim,) float32 embedding of unit L2 norm.
        """


class ResemblyzerEmbedder(SpeakerEmbedder):
    """Resemblyzer's GE2E voice encoder (256-dim d-vectors).

    Audio is volume-normalised and trimmed of long silences by resemblyzer's own VAD first. A clip
    the VAD trims to nothing (e.g. a silent generation) is embedded untrimmed, so it still scores
    (low) instead of failing.

    Args:
        device: torch device of the encoder.
    """

    name = "resemblyzer"

    def __init__(self, device: str = "cpu"):
        with warnings.catch_warnings():  # webrtcvad's pkg_resources import warns on every run
            warnings.simplefilter("ignore")
            from resemblyzer import VoiceEncoder, preprocess_wav
        self._preprocess = preprocess_wav
        self._encoder = VoiceEncoder(device, verbose=False)

    def embed(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        wav = _as_mono_16k(wav, sample_rate)  # resemblyzer's sampling rate is also 16 kHz
        if np.abs(wav).max() > 0.0:
            with np.errstate(all="ignore"):
                trimmed = self._preprocess(wav, source_sr=SAMPLE_RATE)
            if trimmed.size > 0 and np.isfinite(trimmed).all():
                wav = trimmed
        return _unit(self._encoder.embed_utterance(wav))


class WavLMEmbedder(SpeakerEmbedder):
    """``transformers`` ``WavLMForXVector`` x-vectors from a local folder.

    Args:
        path: folder with ``config.json``, weights and ``preprocessor_config.json``.
        device: torch device.
    """

    name = "wavlm"

    def __init__(self, path: str | Path, device: str = "cpu"):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path}: not a WavLM x-vector folder (no config.json)")
        from transformers import AutoFeatureExtractor, WavLMForXVector

        from meld.evaluation.asr import check_transformers_config, load_transformers_model
        from meld.weights import first_line

        self.device = device
        config = check_transformers_config(self.path, "wavlm", "WavLM x-vector")
        try:
            self._extractor = AutoFeatureExtractor.from_pretrained(str(self.path), local_files_only=True)
        except OSError:  # no preprocessor_config.json: a missing backend, said by the caller
            raise
        except Exception as err:
            raise ValueError(f"{self.path}: WavLM's feature extractor does not load ({first_line(err)})") from err
        self._model = load_transformers_model(WavLMForXVector, self.path, "WavLM x-vector").to(device).eval()
        self.min_samples = wavlm_min_samples(config)

    def embed(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        import torch

        wav = _as_mono_16k(wav, sample_rate)
        if wav.size < self.min_samples:  # the convolutions and x-vector statistics need this much
            raise ValueError(f"WavLM x-vectors need at least {self.min_samples} samples at {SAMPLE_RATE} Hz "
                             f"({self.min_samples / SAMPLE_RATE:.3f} s), got {wav.size}")
        inputs = self._extractor(wav, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        with torch.inference_mode():
            embedding = self._model(inputs["input_values"].to(self.device)).embeddings[0]  # (dim,)
        return _unit(embedding.float().cpu().numpy())


def build_speaker_embedder(
    name: str, path: str | Path | None = None, device: str = "cpu"
) -> SpeakerEmbedder | None:
    """Build a speaker embedder, or log why it can't be had and return ``None``.

    Args:
        name: ``"resemblyzer"`` or ``"wavlm"``.
        path: model folder; required for ``wavlm``, unused by ``resemblyzer``.
        device: torch device.

    Returns:
        The embedder, or ``None`` when its package or weights are missing (the message says which).

    Raises:
        ValueError: ``name`` is not a known backend, or the folder holds something broken: another
            model's config (e.g. a Whisper folder), a truncated weights file, weights of another size,
            missing the x-vector head or holding NaN (one line naming the folder).
    """
    if name not in SPEAKER_NAMES:
        raise ValueError(f"unknown speaker embedder {name!r}; choose one of {', '.join(SPEAKER_NAMES)}")
    try:
        if name == "resemblyzer":
            return ResemblyzerEmbedder(device=device)
        if path is None:
            logger.warning(
                "speaker embedder 'wavlm' needs a local model folder (no hub access): SIM disabled"
            )
            return None
        return WavLMEmbedder(path, device=device)
    except ImportError as err:
        logger.warning("speaker embedder %r unavailable: %s (install its package to enable it)", name, err)
    except (FileNotFoundError, OSError) as err:
        logger.warning("speaker embedder %r unavailable: %s", name, err)
    return None
