"""Frozen dataclasses, one per params.yaml section; unknown keys and wrong types are errors.

The library never reads params.yaml: pipeline scripts call :func:`load_section` and pass
explicit arguments down to builders.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params section holds an unknown key, a missing key or a value of the wrong type."""


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _check_type(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return tuple(_check_type(v, arg, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_check_type(k, kt, where): _check_type(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


class Section:
    """Mixin: ``from_dict`` validates keys and types against the dataclass fields."""

    @classmethod
    def from_dict(cls, data: dict | None, section: str | None = None):
        section = section or cls.__name__.removesuffix("Config").lower()
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"params section '{section}': unknown key(s) {unknown}; known: {sorted(fields)}")
        kwargs = {}
        for name, f in fields.items():
            if name in data:
                kwargs[name] = _check_type(data[name], hints[name], f"{section}.{name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"params section '{section}': missing key '{name}'")
        obj = cls(**kwargs)
        validate = getattr(obj, "validate", None)
        if validate:
            validate()
        return obj

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_params(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no params file")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def load_section(path: str | Path, name: str, cls):
    """Load one section of a params file into its dataclass."""
    params = read_params(path)
    if name not in params:
        raise ConfigError(f"{path}: no '{name}' section")
    return cls.from_dict(params[name], name)


CORPUS_NAMES = ("mini", "librispeech")
CORPUS_SPLITS = ("train", "dev", "test", "test_unseen")


@dataclass(frozen=True)
class CorpusConfig(Section):
    """Where the speech comes from.

    ``name: mini`` synthesises the embedded corpus (:mod:`meld.corpus.mini`);
    ``name: librispeech`` prepares LibriSpeech (:mod:`meld.corpus.librispeech`).
    """

    name: str = "mini"
    seed: int = 0
    # mini corpus
    train_voices: list[str] = field(
        default_factory=lambda: [
            "flite-kal",
            "flite-kal16",
            "flite-rms",
            "flite-slt",
            "festival-kal",
            "espeak-f2",
            "espeak-f3",
            "espeak-m3",
            "espeak-m7",
            "espeak-klatt",
            "espeak-croak",
        ]
    )
    held_out_voices: list[str] = field(default_factory=lambda: ["flite-awb", "festival-ked", "espeak-f4"])
    utterances_per_voice: dict[str, int] = field(
        default_factory=lambda: {"train": 100, "dev": 5, "test": 5, "test_unseen": 10}
    )
    min_words: int = 10
    max_words: int = 20
    num_workers: int = 2
    # librispeech
    librispeech_root: str = "data/librispeech"
    librispeech_download: bool = False
    librispeech_subsets: list[str] = field(
        default_factory=lambda: ["train-clean-100", "dev-clean", "test-clean"]
    )

    def validate(self) -> None:
        """Check values beyond their types."""
        if self.name not in CORPUS_NAMES:
            raise ConfigError(f"corpus.name: expected one of {list(CORPUS_NAMES)}, got {self.name!r}")
        bad_splits = sorted(set(self.utterances_per_voice) - set(CORPUS_SPLITS))
        if bad_splits:
            raise ConfigError(
                f"corpus.utterances_per_voice: unknown split(s) {bad_splits}; known: {list(CORPUS_SPLITS)}"
            )
        for split, n in self.utterances_per_voice.items():
            if n < 0:
                raise ConfigError(f"corpus.utterances_per_voice.{split}: must be >= 0, got {n}")
        if not 1 <= self.min_words <= self.max_words:
            raise ConfigError(
                f"corpus.min_words/max_words: need 1 <= min_words <= max_words, got {self.min_words}, {self.max_words}"
            )
        if self.num_workers < 1:
            raise ConfigError(f"corpus.num_workers: must be >= 1, got {self.num_workers}")
        both = sorted(set(self.train_voices) & set(self.held_out_voices))
        if both:
            raise ConfigError(f"corpus.held_out_voices: {both} also listed in corpus.train_voices")
        if self.name == "mini" and not self.train_voices:
            raise ConfigError("corpus.train_voices: the mini corpus needs at least one training voice")


@dataclass(frozen=True)
class FeaturesConfig(Section):
    num_workers: int = 2
    max_seconds: float = 20.0  # longer clips don't fit the frame budget: rejected
    min_seconds: float = 0.3
    max_rejected_fraction: float = 0.05


@dataclass(frozen=True)
class CodebookConfig(Section):
    size: int = 256  # paper: 8192
    reduction_factors: tuple[int, ...] = (1, 2)
    niter: int = 20
    max_vectors: int = 200_000  # sub-sampling for LibriSpeech scale
    max_points_per_centroid: int = 256  # Lloyd iterations on at most this many vectors per code (faiss default)
    pca_dims: int = 0  # > 0: Lloyd in a PCA space of this many dimensions, codes = full-space means
    init: str = "random"  # or "k-means++"
    seed: int = 0

    def validate(self) -> None:
        if self.init not in ("random", "k-means++"):
            raise ConfigError(f"codebook.init: expected 'random' or 'k-means++', got {self.init!r}")
        if self.pca_dims < 0:
            raise ConfigError(f"codebook.pca_dims: expected >= 0 (0 = no PCA), got {self.pca_dims}")


@dataclass(frozen=True)
class BPEConfig(Section):
    vocab_size: int = 256  # paper: 4096


@dataclass(frozen=True)
class ModelConfig(Section):
    """The shared backbone and the mel layers (tiny by default; paper values in configs/paper.yaml)."""

    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 1024
    dropout: float = 0.1
    encoder_hidden: int = 256
    encoder_dropout: float = 0.5
    recon_hidden: int = 256
    postnet_channels: int = 256
    postnet_kernel: int = 5
    postnet_layers: int = 5
    postnet_dropout: float = 0.5
    q_temperature: float = 1.0
    reduction_factor: int = 2
    specaug_freq_masks: int = 2
    specaug_freq_width: int = 30
    specaug_time_masks: int = 2
    specaug_time_width: int = 50
    specaug_max_time_fraction: float = 0.2

    def validate(self) -> None:
        if self.reduction_factor not in (1, 2, 3, 4, 5):
            raise ConfigError(f"model.reduction_factor must be in 1..5, got {self.reduction_factor}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")


@dataclass(frozen=True)
class TrainConfig(Section):
    num_workers: int = 2
    use_gpu: bool = False
    max_steps: int = 1000
    frames_per_batch: int = 8000  # padded frames per batch and worker (paper: 50k)
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    hold_steps: int = 400
    decay_steps: int = 500
    grad_clip: float = 10.0
    bf16: bool = True  # autocast on GPU only
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 10
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"ce": 1.0, "mse_pre": 1.0, "mse_post": 1.0, "slowness": 0.2}
    )
    task: str = "tts"
    stt_warmup_steps: int = 0
    # start from these weights (a model.pt or training checkpoint of a model with the same shapes) at
    # step 0 with a fresh optimiser and this section's schedule: fine-tuning, or a finished run continued
    # on a new schedule. Not a DVC dependency by itself: list the file in the stage's deps if it changes.
    init_from: str | None = None

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ConfigError("train.num_workers must be >= 1")
        if self.task not in ("tts", "stt", "joint"):
            raise ConfigError(f"train.task must be tts, stt or joint, got {self.task!r}")


@dataclass(frozen=True)
class CodecLMConfig(Section):
    """The ``codec_lm:`` params section: the system's overrides and the DAC codec behind its code store.

    ``codec_weights`` is a local path to DAC's ``weights_16khz.pth`` (nothing is downloaded); null
    means a randomly initialised DAC (seeded), whose codes carry no speech: the codes stage marks
    them so and evaluation reports "codec weights unavailable" instead of numbers. The random DAC is
    narrowed to ``random_codec_width`` encoder channels (DAC: 64; decoder 24x that, as in DAC) with
    DAC's strides and levels, so its codes have the real shapes at a fraction of the cost.
    """

    args: dict[str, Any] = field(default_factory=dict)  # CodecLM constructor arguments: n_levels, codebook_size
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    codec_weights: str | None = None
    random_codec_width: int = 4
    random_codec_seed: int = 0
    encode_workers: int = 2  # processes encoding the corpus (one torch thread each)

    def validate(self) -> None:
        if self.random_codec_width < 1:
            raise ConfigError(f"codec_lm.random_codec_width must be >= 1, got {self.random_codec_width}")
        if self.encode_workers < 1:
            raise ConfigError(f"codec_lm.encode_workers must be >= 1, got {self.encode_workers}")
        for key in ("n_levels", "codebook_size"):
            value = self.args.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"codec_lm.args.{key} must be a positive integer, got {value!r}")
        if self.args.get("codebook_size", 0) > 32767:  # the code store keeps codes as int16
            raise ConfigError(f"codec_lm.args.codebook_size must be <= 32767, got {self.args['codebook_size']}")


KV_CACHE_DTYPES = ("float32", "bfloat16")  # names of torch dtypes a decoding KV cache may use


@dataclass(frozen=True)
class EvaluateConfig(Section):
    splits: tuple[str, ...] = ("test", "test_unseen")
    utterances_per_split: int = 10
    generations: int = 3
    prompt_seconds: float = 3.0
    min_seconds: float = 4.0  # paper: test-clean utterances of 4-10 s
    max_seconds: float = 10.0
    temperature: float = 1.0
    top_k: int = 10
    top_p: float = 0.95
    repetition_penalty: float = 1.2
    max_length_factor: float = 3.0  # guard: frames <= factor * reference frames
    vocoder: str = "griffin_lim"
    vocoder_path: str | None = None
    asr_judge: str = "pocketsphinx"
    asr_judge_path: str | None = None
    speaker_model: str = "resemblyzer"
    speaker_model_path: str | None = None
    judge_exclude_prefixes: tuple[str, ...] = ("espeak-",)
    stt_splits: tuple[str, ...] = ("dev", "test", "test_unseen")
    stt_beam_size: int = 5
    stt_ctc_weight: float = 0.7  # hybrid CTC/attention decoding weight, used only by a model with a CTC head
    stt_max_utterances: int = 100  # per split
    stt_max_tokens_per_second: float = 10.0  # decoding guard: 10 + this x seconds BPE tokens per utterance
    stt_judge_model: str | None = None  # a MELD STT checkpoint that also scores TTS output on its mel frames
    ablations: bool = True  # MELD rows without repetition penalty / with the latent zeroed (paper Table 5)
    audio_samples: int = 4
    batch_size: int = 8
    kv_cache_dtype: str = "float32"  # or bfloat16: faster batched decoding on CPU, slightly different samples
    compile_decoding: bool = False  # torch.compile the TTS decoding step (CUDA graphs on GPU): backbone.configure_decoding
    score_workers: int = 2  # processes running vocoder + judges (the slow part), capped at the CPU count
    seed: int = 0

    def validate(self) -> None:
        if not 0.0 <= self.stt_ctc_weight <= 1.0:
            raise ConfigError(f"evaluate.stt_ctc_weight must be in [0, 1], got {self.stt_ctc_weight}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"evaluate.kv_cache_dtype must be float32 or bfloat16, got {self.kv_cache_dtype!r}")


# dev metrics of ray_jobs.train.dev_metrics that can be the objective (all comparable across frame rates)
OBJECTIVES = ("dev/mse_post_greedy", "dev/mse_pre_greedy", "dev/mse_post", "dev/mse_pre")


@dataclass(frozen=True)
class TuneConfig(Section):
    """The ``tune:`` params section.

    Trials: every (slowness weight, reduction factor) pair, starting from the ``system``'s own
    ``model``/``train`` settings; each trains ``max_steps`` steps and is scored on the dev split
    every ``eval_every`` steps (ASHA's rungs: ``grace_period``, x ``asha_reduction``, ...).
    """

    system: str = "meld"
    slowness_weights: tuple[float, ...] = (0.0, 0.1, 0.2, 0.5)
    reduction_factors: tuple[int, ...] = (1, 2)
    max_steps: int = 16
    eval_every: int = 8
    frames_per_batch: int = (
        1500  # 62.5 Hz frames per batch and worker: a trial at r gets frames_per_batch / r
    )
    num_workers_per_trial: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int = 1
    scheduler: str = "asha"  # asha | fifo
    grace_period: int = 8
    asha_reduction: int = 2
    metric: str = "dev/mse_post_greedy"
    max_failures: int = 1
    # `model` keys set for every trial (e.g. a smaller model than the system's)
    model_overrides: dict[str, object] = field(default_factory=dict)

    def validate(self) -> None:
        from meld.models.builders import NEEDS_CODEBOOK

        if self.system not in NEEDS_CODEBOOK:
            raise ConfigError(
                f"tune.system must be a MELD system {list(NEEDS_CODEBOOK)} (its two knobs are swept), "
                f"got {self.system!r}"
            )
        if self.scheduler not in ("asha", "fifo"):
            raise ConfigError(f"tune.scheduler must be asha or fifo, got {self.scheduler!r}")
        if not self.slowness_weights or not self.reduction_factors:
            raise ConfigError("tune.slowness_weights and tune.reduction_factors must not be empty")
        if self.eval_every < 1 or self.max_steps < self.eval_every:
            raise ConfigError("tune: need 1 <= eval_every <= max_steps")
        if self.metric not in OBJECTIVES:
            raise ConfigError(f"tune.metric must be one of {list(OBJECTIVES)}, got {self.metric!r}")
        if self.frames_per_batch < 1:
            raise ConfigError("tune.frames_per_batch must be >= 1")
        if self.num_workers_per_trial < 1 or self.cpus_per_worker < 1:
            raise ConfigError("tune.num_workers_per_trial and tune.cpus_per_worker must be >= 1")
