"""ASR judges: transcribe generated speech so that its WER against the prompt text can be scored.

Backends are pluggable and none of them reaches a model hub:

- ``pocketsphinx``: CMU PocketSphinx 5, whose US-English model ships inside the wheel. Fully
  offline; ~15-30 % WER on clean synthetic speech, so it ranks systems rather than scoring them.
- ``whisper``: OpenAI Whisper from a local folder, either in the ``transformers`` layout
  (``config.json`` + weights + processor files) or in the CTranslate2 layout of ``faster-whisper``
  (``model.bin``).

Every judge returns text already passed through :func:`meld.text.normalise_transcript`, the
normaliser WER is computed on. :func:`build_asr_judge` turns a missing backend into a logged
message and ``None`` instead of a crash.

Example::

    judge = build_asr_judge("pocketsphinx")
    text = judge.transcribe(wav, 16000)
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from meld.audio import SAMPLE_RATE, resample
from meld.text import normalise_transcript
from meld.weights import first_line, first_non_finite, read_json_object

logger = logging.getLogger(__name__)

ASR_NAMES = ("pocketsphinx", "whisper")
WHISPER_WINDOW_SECONDS = 30.0  # Whisper's encoder sees 30 s at a time
_FILLER = re.compile(r"^[<\[].*[>\]]$")  # <s>, </s>, <sil>, [NOISE]
_ALT_PRON = re.compile(r"\(\d+\)$")  # "read(2)": the second dictionary pronunciation of "read"


def _as_mono_16k(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"an ASR judge expects a mono (samples,) waveform, got shape {wav.shape}")
    if not np.isfinite(wav).all():
        raise ValueError("an ASR judge got a waveform holding NaN or infinite samples")
    return resample(wav, sample_rate, SAMPLE_RATE)


def check_transformers_config(folder: Path, model_type: str, what: str) -> dict:
    """``folder/config.json`` read and checked to be a ``model_type`` model before any weights load.

    Raises:
        ValueError: not JSON, or another model's config (e.g. a WavLM folder given as Whisper).
    """
    config_path = folder / "config.json"
    config = read_json_object(config_path)
    found = config.get("model_type")
    if found != model_type:
        raise ValueError(f"{config_path}: model_type is {found!r}, expected {model_type!r} (not a {what} folder)")
    return config


def load_transformers_model(cls, folder: Path, what: str):
    """``cls.from_pretrained(folder)``, offline, with every weight checked to come from the folder.

    A weights file that is missing is an ``OSError`` (a missing backend, for the caller to report);
    one that is there but truncated, of another model size, lacking some of the model's tensors
    or holding NaN is a one-line ``ValueError`` naming the folder, raised before any audio is read.
    """

    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, ignore_mismatched_sizes=True,
                                          output_loading_info=True)
    except OSError:
        raise
    except Exception as err:  # a truncated safetensors file, a corrupt .bin, ...
        raise ValueError(f"{folder}: the {what} weights do not load ({first_line(err)})") from err
    mismatched, missing = info.get("mismatched_keys") or [], info.get("missing_keys") or []
    if mismatched:  # transformers left these randomly initialised (ignore_mismatched_sizes)
        name, found, expected = next(iter(mismatched))
        raise ValueError(f"{folder}: {len(mismatched)} {what} weights have other shapes than config.json says "
                         f"(e.g. {name}: {tuple(found)} in the file, {tuple(expected)} by the config: another "
                         "model size?)")
    if missing:  # left randomly initialised: the scores would mean nothing
        raise ValueError(f"{folder}: {len(missing)} {what} weights are not in the file (e.g. {sorted(missing)[0]}); "
                         f"is this a {cls.__name__} checkpoint?")
    bad = first_non_finite(model.state_dict())
    if bad is not None:
        raise ValueError(f"{folder}: {what} weight {bad} holds NaN or infinite values")
    return model


class ASRJudge(ABC):
    """Speech in, normalised transcript out."""

    name: str

    @abstractmethod
    def transcribe(self, wav: np.ndarray, sample_rate: int) -> str:
        """Transcribe one utterance.

        Args:
            wav: (samples,) mono float waveform in [-1, 1]; resampled to 16 kHz if needed.
            sample_rate: rate of ``wav``.

        Returns:
            The normalised transcript (``""`` when nothing was recognised).
        """


class PocketSphinxJudge(ASRJudge):
    """CMU PocketSphinx 5 with the US-English acoustic model, dictionary and LM of its wheel.

    Args:
        model_dir: a PocketSphinx model folder (``hmm``/``dict``/``lm`` inside); default: the wheel's.
        log_level: PocketSphinx's own log level (``FATAL`` keeps evaluation logs readable).
    """

    name = "pocketsphinx"

    def __init__(self, model_dir: str | Path | None = None, log_level: str = "FATAL"):
        from pocketsphinx import Decoder

        options: dict = {"samprate": SAMPLE_RATE, "loglevel": log_level}
        if model_dir is not None:
            model_dir = Path(model_dir)
            options.update(
                hmm=str(model_dir / "en-us"),
                lm=str(model_dir / "en-us.lm.bin"),
                dict=str(model_dir / "cmudict-en-us.dict"),
            )
            missing = [Path(options[k]).name for k in ("hmm", "lm", "dict") if not Path(options[k]).exists()]
            if missing:
                raise FileNotFoundError(f"{model_dir}: not a PocketSphinx model folder (no {', '.join(missing)})")
        try:
            self._decoder = Decoder(**options)
        except RuntimeError as err:  # PocketSphinx says only "Failed to initialize PocketSphinx"
            where = model_dir if model_dir is not None else "the pocketsphinx wheel's model"
            raise ValueError(f"{where}: PocketSphinx's model does not load ({first_line(err)})") from err

    def transcribe(self, wav: np.ndarray, sample_rate: int) -> str:
        wav = _as_mono_16k(wav, sample_rate)
        if wav.size == 0:
            return ""
        pcm = (np.clip(wav, -1.0, 1.0) * 32767.0).astype(np.int16)  # the decoder takes 16-bit PCM
        # the front end carries its noise estimate and cepstral mean over from the last utterance, so a
        # transcript would depend on what this process read before (worker count, order): reset, ~0.2 ms
        self._decoder.reinit_feat()
        self._decoder.start_utt()
        self._decoder.process_raw(pcm.tobytes(), no_search=False, full_utt=True)
        self._decoder.end_utt()
        hyp = self._decoder.hyp()
        if hyp is None:
            return ""
        words = [_ALT_PRON.sub("", w) for w in hyp.hypstr.split() if not _FILLER.match(w)]
        return normalise_transcript(" ".join(words))


class WhisperJudge(ASRJudge):
    """Whisper from a local folder (never the hub).

    A folder holding ``model.bin`` is a CTranslate2 model and runs through ``faster-whisper``;
    a folder holding ``config.json`` runs through ``transformers``. Audio longer than Whisper's
    30-second window is transcribed window by window (a word cut by a boundary may be misheard).

    Args:
        path: the model folder.
        language: spoken language, passed to multilingual models (English-only models ignore it).
        beam_size: decoding beam width.
        device: torch / CTranslate2 device.
    """

    name = "whisper"

    def __init__(self, path: str | Path, language: str = "en", beam_size: int = 1, device: str = "cpu"):
        self.path = Path(path)
        self.language = language
        self.beam_size = beam_size
        self.device = device
        if (self.path / "model.bin").is_file():
            self.backend = "faster_whisper"
            if not (self.path / "tokenizer.json").is_file():  # faster-whisper would fetch one from the hub
                raise FileNotFoundError(f"{self.path}: a CTranslate2 Whisper folder without tokenizer.json "
                                        "(faster-whisper would download one; copy the model's tokenizer.json there)")
            from faster_whisper import WhisperModel

            kind, _, index = device.partition(":")  # CTranslate2 takes "cuda" and the GPU's index apart
            self._model = WhisperModel(
                str(self.path), device=kind, device_index=int(index or 0),
                compute_type="int8" if kind == "cpu" else "float16",
            )
        elif (self.path / "config.json").is_file():
            self.backend = "transformers"
            from transformers import WhisperForConditionalGeneration, WhisperProcessor

            check_transformers_config(self.path, "whisper", "Whisper")
            try:
                self._processor = WhisperProcessor.from_pretrained(str(self.path), local_files_only=True)
            except OSError:  # a file it needs is not there: a missing backend, said by the caller
                raise
            except Exception as err:  # there, but not Whisper's (another model's tokenizer, a corrupt file)
                raise ValueError(f"{self.path}: Whisper's processor (feature extractor + tokenizer) does not "
                                 f"load ({first_line(err)})") from err
            self._model = load_transformers_model(WhisperForConditionalGeneration, self.path, "Whisper")
            self._model.to(device).eval()
        else:
            raise FileNotFoundError(
                f"{self.path}: not a Whisper model folder (expected config.json for transformers "
                "or model.bin for faster-whisper)"
            )

    def transcribe(self, wav: np.ndarray, sample_rate: int) -> str:
        wav = _as_mono_16k(wav, sample_rate)
        if wav.size == 0:
            return ""
        if self.backend == "faster_whisper":
            segments, _ = self._model.transcribe(wav, language=self.language, beam_size=self.beam_size)
            return normalise_transcript(" ".join(segment.text for segment in segments))
        window = int(WHISPER_WINDOW_SECONDS * SAMPLE_RATE)
        texts = [self._transcribe_window(wav[start : start + window]) for start in range(0, wav.size, window)]
        return normalise_transcript(" ".join(texts))

    def _transcribe_window(self, wav: np.ndarray) -> str:
        import torch

        features = self._processor(wav, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        kwargs: dict = {"num_beams": self.beam_size}
        if getattr(self._model.generation_config, "is_multilingual", False):
            kwargs.update(language=self.language, task="transcribe")
        with torch.inference_mode():
            ids = self._model.generate(features.to(self.device), **kwargs)
        return self._processor.batch_decode(ids, skip_special_tokens=True)[0]


def build_asr_judge(name: str, path: str | Path | None = None, device: str = "cpu") -> ASRJudge | None:
    """Build an ASR judge, or log why it can't be had and return ``None``.

    Args:
        name: ``"pocketsphinx"`` or ``"whisper"``.
        path: model folder; required for ``whisper``, optional for ``pocketsphinx``.
        device: device of the Whisper model.

    Returns:
        The judge, or ``None`` when its package or weights are missing (the message says which).

    Raises:
        ValueError: ``name`` is not a known backend (a configuration error, not a missing backend), or
            the folder holds something broken: another model's config, a truncated weights file,
            weights of another size or holding NaN (one line naming the folder).
    """
    if name not in ASR_NAMES:
        raise ValueError(f"unknown ASR judge {name!r}; choose one of {', '.join(ASR_NAMES)}")
    try:
        if name == "pocketsphinx":
            return PocketSphinxJudge(model_dir=path)
        if path is None:
            logger.warning("ASR judge 'whisper' needs a local model folder (no hub access): judge disabled")
            return None
        return WhisperJudge(path, device=device)
    except ImportError as err:
        logger.warning("ASR judge %r unavailable: %s (install its package to enable it)", name, err)
    except (FileNotFoundError, OSError) as err:
        logger.warning("ASR judge %r unavailable: %s", name, err)
    return None
