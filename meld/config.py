"""Frozen dataclasses, one per params.yaml section; unknown keys and wrong types are errors.

The library never reads params.yaml: pipeline scripts call :func:`load_section` and pass
explicit arguments down to builders.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meld.devices import DEVICE_HELP, DEVICE_PATTERN


class ConfigError(ValueError):
    """A params section holds an unknown key, a missing key, a value of the wrong type or one out of range."""


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


def section_mapping(value, where: str) -> Mapping:
    """A params section: a mapping, or empty when absent or null.

    ``train: 3`` or a list where a section belongs would otherwise fail in ``dict()`` or a merge with a bare
    TypeError or ValueError that names neither the section nor the file.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"params section '{where}': expected a mapping of keys to values, got "
                          f"{type(value).__name__} {value!r:.80}")
    return value


class Section:
    """Mixin: ``from_dict`` validates keys and types against the dataclass fields."""

    @classmethod
    def from_dict(cls, data: dict | None, section: str | None = None):
        section = section or cls.__name__.removesuffix("Config").lower()
        data = dict(section_mapping(data, section))
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


# ------------------------------------------------------------------ value rules
# A rule checks one value and raises a ConfigError naming ``where`` (``section.key``), the value and
# what is allowed. Sections list their per-key rules in a table, so the override dicts that other
# sections carry (``tune.model_overrides``, ``codec_lm.model`` / ``codec_lm.train``) get the same checks.
Rule = Callable[[str, Any], None]


def _rule(ok: Callable[[Any], bool], allowed: str) -> Rule:
    """A rule from a predicate and the words for what it allows."""

    def check(where: str, value: Any) -> None:
        if not ok(value):
            raise ConfigError(f"{where} must be {allowed}, got {value!r}")

    return check


def _at_least(lo: int, note: str = "") -> Rule:
    return _rule(lambda v: v >= lo, f">= {lo}{note}")


def _finite_number(lo: float, *, above: bool = False, note: str = "") -> Rule:
    """A finite float ``> lo`` (``above``) or ``>= lo``: NaN and inf fail."""
    if above:
        return _rule(lambda v: math.isfinite(v) and v > lo, f"a finite number > {lo:g}{note}")
    return _rule(lambda v: math.isfinite(v) and v >= lo, f"a finite number >= {lo:g}{note}")


_POSITIVE = _at_least(1)
_NON_NEGATIVE = _at_least(0)
_FRACTION = _rule(lambda v: 0.0 <= v <= 1.0, "in [0, 1]")  # NaN fails every comparison
_DROPOUT = _rule(lambda v: 0.0 <= v < 1.0, "in [0, 1) (1 would drop everything)")
REDUCTION_FACTORS = (1, 2, 3, 4, 5)  # frames grouped per step that the models support
_REDUCTION_FACTOR = _rule(lambda v: v in REDUCTION_FACTORS, "in 1..5")


def _one_of(where: str, value: Any, names: typing.Iterable[str]) -> None:
    names = list(names)
    if value not in names:
        raise ConfigError(f"{where} must be one of {names}, got {value!r}")


def _apply_rules(section: str, values: Mapping[str, Any], rules: Mapping[str, Rule]) -> None:
    """Check each key of ``values`` that ``rules`` has a rule for."""
    for key, check in rules.items():
        if key in values:
            check(f"{section}.{key}", values[key])


def _values(section: Section) -> dict[str, Any]:
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}


def _check_overrides(where: str, overrides: Mapping[str, Any], cls: type, rules: Mapping[str, Rule]) -> None:
    """Keys, types and per-key rules of a dict that overrides some keys of section ``cls``.

    Cross-key checks (``d_model`` divisible by ``n_heads``, ...) wait for the merged section.
    """
    hints = typing.get_type_hints(cls)
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {known}")
    checked = {key: _check_type(value, hints[key], f"{where}.{key}") for key, value in overrides.items()}
    _apply_rules(where, checked, rules)


def _check_unique(where: str, values: typing.Sequence[Any]) -> None:
    twice = sorted({v for v in values if list(values).count(v) > 1}, key=str)
    if twice:
        raise ConfigError(f"{where} lists {twice} more than once, got {list(values)}")


def corpus_split_names() -> tuple[str, ...]:
    """Every split a corpus stage can write: the mini corpus's and LibriSpeech's."""
    from meld.corpus.librispeech import SUBSET_SPLITS
    from meld.corpus.mini import SPLITS

    return tuple(dict.fromkeys([*SPLITS, *SUBSET_SPLITS.values()]))


def read_params(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no params file")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


# what a stage's user can mend (params, corpus, audio, codec weights, checkpoints, missing files, paths
# a cluster's nodes cannot share), by
# module and class: looked up in sys.modules, so that reporting them imports nothing
INPUT_ERRORS = (("meld.config", "ConfigError"), ("meld.corpus.librispeech", "LibriSpeechError"),
                ("meld.corpus.mini", "VoiceUnavailableError"), ("meld.audio", "AudioError"),
                ("meld.codes", "CodecMismatch"), ("meld.training", "CheckpointError"),
                ("meld.training", "NonFiniteLoss"), ("meld.store", "StatsError"), ("meld.store", "StoreError"),
                ("meld.corpus", "ManifestError"), ("meld.tracking", "TrackingStoreUnavailable"),
                ("ray_jobs.cluster", "NodeLocalStorage"), ("builtins", "FileNotFoundError"))


def is_input_error(err: BaseException) -> bool:
    """Whether ``err`` is one of :data:`INPUT_ERRORS`: what the user can mend, said in one line."""
    import sys

    kinds = [getattr(sys.modules.get(module), cls, None) for module, cls in INPUT_ERRORS]
    return isinstance(err, tuple(k for k in kinds if isinstance(k, type)))


def run_stage(name: str, main: Callable[[], int]) -> int:
    """Run a DVC stage script's ``main`` (its ``__main__`` entry; tests call ``main`` itself).

    Input the stage cannot use ends it with one line, ``<stage>: <what and where>``, and exit status 1
    instead of a traceback of the stage's internals; any other error keeps its traceback (a bug).
    """
    import sys

    try:
        return main()
    except Exception as err:
        if not is_input_error(err):
            raise
        print(f"{name}: {err}", file=sys.stderr)
        return 1


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
        if self.name == "mini":  # the voice lists are the mini corpus's; LibriSpeech ignores them
            from meld.corpus.mini import VOICES

            if not self.train_voices:
                raise ConfigError("corpus.train_voices: the mini corpus needs at least one training voice")
            for key in ("train_voices", "held_out_voices"):
                voices = getattr(self, key)
                unknown = [v for v in voices if v not in VOICES]
                if unknown:
                    raise ConfigError(f"corpus.{key}: unknown voice(s) {unknown}; known: {sorted(VOICES)}")
                _check_unique(f"corpus.{key}", voices)
            # voices built from one recorded person are one speaker: held out, it would not be unseen
            trained = {VOICES[v].family: v for v in self.train_voices}
            for v in self.held_out_voices:
                if VOICES[v].family in trained:
                    raise ConfigError(
                        f"corpus.held_out_voices: {v!r} is built from the same recorded speaker "
                        f"({VOICES[v].family}) as corpus.train_voices' {trained[VOICES[v].family]!r}"
                    )
        if self.name == "librispeech":
            from meld.corpus.librispeech import LIBRISPEECH_MD5

            unknown = [s for s in self.librispeech_subsets if s not in LIBRISPEECH_MD5]
            if unknown or not self.librispeech_subsets:
                raise ConfigError(
                    f"corpus.librispeech_subsets must be LibriSpeech subsets out of {list(LIBRISPEECH_MD5)} "
                    f"(at least one), got {list(self.librispeech_subsets)}"
                )


_FEATURES_RULES: dict[str, Rule] = {
    "num_workers": _POSITIVE,
    "max_seconds": _finite_number(0, above=True),
    "min_seconds": _finite_number(0),
    "max_rejected_fraction": _FRACTION,
}


@dataclass(frozen=True)
class FeaturesConfig(Section):
    num_workers: int = 2
    max_seconds: float = 20.0  # longer clips don't fit the frame budget: rejected
    min_seconds: float = 0.3
    max_rejected_fraction: float = 0.05  # shared by the codes stage

    def validate(self) -> None:
        _apply_rules("features", _values(self), _FEATURES_RULES)
        if self.min_seconds > self.max_seconds:
            raise ConfigError(
                f"features.min_seconds must be <= features.max_seconds ({self.max_seconds}), got {self.min_seconds}"
            )


_CODEBOOK_RULES: dict[str, Rule] = {
    "size": _POSITIVE,
    "niter": _at_least(0, " (0: the seeding alone)"),
    "max_points_per_centroid": _POSITIVE,
    # numpy's default_rng takes no negative seed, faiss's k-means no seed past a C int (it used to fail
    # there, after the stage had read every training frame)
    "seed": _rule(lambda v: 0 <= v < 2**31, "in [0, 2**31)"),
}


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
        _apply_rules("codebook", _values(self), _CODEBOOK_RULES)
        if not self.reduction_factors:
            raise ConfigError("codebook.reduction_factors must name at least one reduction factor, got []")
        for i, r in enumerate(self.reduction_factors):
            _REDUCTION_FACTOR(f"codebook.reduction_factors[{i}]", r)
        _check_unique("codebook.reduction_factors", self.reduction_factors)
        # the stage keeps about max_vectors training vectors: fewer than size codes cannot be fitted
        if self.max_vectors < self.size:
            raise ConfigError(f"codebook.max_vectors must be >= codebook.size ({self.size}), got {self.max_vectors}")


@dataclass(frozen=True)
class BPEConfig(Section):
    vocab_size: int = 256  # paper: 4096

    def validate(self) -> None:
        # SentencePiece needs a piece per character of the transcripts and <unk>: at the very least
        # <unk>, the word boundary and one letter (about 30 for English text)
        _at_least(3, " (a piece per transcript character plus <unk>)")("bpe.vocab_size", self.vocab_size)


_MODEL_RULES: dict[str, Rule] = {
    "d_model": _POSITIVE,
    "n_layers": _POSITIVE,
    "n_heads": _POSITIVE,
    "d_ff": _POSITIVE,
    "dropout": _DROPOUT,
    "encoder_hidden": _POSITIVE,
    "encoder_dropout": _DROPOUT,
    "recon_hidden": _POSITIVE,
    "postnet_channels": _POSITIVE,
    # the postnet pads kernel // 2 frames on each side: an even kernel returns one frame too many
    "postnet_kernel": _rule(lambda v: v >= 1 and v % 2 == 1, "an odd number >= 1"),
    "postnet_layers": _POSITIVE,
    "postnet_dropout": _DROPOUT,
    "q_temperature": _finite_number(0, above=True),
    "reduction_factor": _REDUCTION_FACTOR,
    "specaug_freq_masks": _at_least(0, " (0: none)"),
    "specaug_freq_width": _NON_NEGATIVE,
    "specaug_time_masks": _at_least(0, " (0: none)"),
    "specaug_time_width": _NON_NEGATIVE,
    "specaug_max_time_fraction": _FRACTION,
}


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
        _apply_rules("model", _values(self), _MODEL_RULES)  # n_heads >= 1 before it divides
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")


TRAIN_TASKS = ("tts", "stt", "joint")


# every loss a system's compute_losses returns, without its "loss/" namespace (tests/test_configs.py
# checks each system's against it); a weight under another name would be ignored, and the loss the
# user meant would count at weight 1
LOSS_NAMES = frozenset({"ce", "mse_pre", "mse_post", "slowness", "stt_ce", "stt_ctc", "ce_codes", "ce_channels",
                        "eos", "stop", "l1_pre", "l1_post", "kl", "flux"})


def _check_loss_weights(where: str, weights: Mapping[str, float]) -> None:
    unknown = sorted(set(weights) - LOSS_NAMES)
    if unknown:
        raise ConfigError(f"{where}: unknown loss name(s) {unknown}; the systems' losses are {sorted(LOSS_NAMES)}")
    for name, w in weights.items():
        _finite_number(0)(f"{where}.{name}", w)


_TRAIN_RULES: dict[str, Rule] = {
    "num_workers": _POSITIVE,
    "max_steps": _POSITIVE,
    "frames_per_batch": _POSITIVE,
    "lr": _finite_number(0, note=" (0 trains nothing, as tests of init_from use)"),
    "weight_decay": _finite_number(0),
    "warmup_steps": _at_least(0, " (0: no warm-up)"),
    "hold_steps": _NON_NEGATIVE,
    "decay_steps": _at_least(0, " (0: no decay)"),
    "grad_clip": _finite_number(0, above=True),
    "checkpoint_every": _POSITIVE,  # ray_jobs.train takes step % checkpoint_every and step % log_every
    "log_every": _POSITIVE,
    "loss_weights": _check_loss_weights,
    "task": lambda where, v: _one_of(where, v, TRAIN_TASKS),
    "stt_warmup_steps": _at_least(0, " (0: no TTS-only warm-up)"),
    "max_skipped_fraction": _FRACTION,
}


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
    # utterances longer than frames_per_batch are left out of training and listed (the driver's log,
    # MLflow, the exported model.pt); more than this share of the split stops the run before it starts
    max_skipped_fraction: float = 0.01

    def validate(self) -> None:
        _apply_rules("train", _values(self), _TRAIN_RULES)


@dataclass(frozen=True)
class MLflowConfig(Section):
    """The ``mlflow:`` params section. The tracking store itself comes from ``MLFLOW_TRACKING_URI``
    (default: ``sqlite:///mlflow.db`` in the project), so a cluster job and a laptop share one file."""

    experiment: str = "meld"

    def validate(self) -> None:
        if not self.experiment.strip():
            raise ConfigError("mlflow.experiment must name an experiment, got an empty string")


def mlflow_experiment(params: Mapping[str, Any]) -> str:
    """The MLflow experiment a run logs to, from a whole params file (its ``mlflow:`` section checked)."""
    return MLflowConfig.from_dict(params.get("mlflow"), "mlflow").experiment


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
        from meld.models.codec_lm import codec_lm_kwargs

        if self.random_codec_width < 1:
            raise ConfigError(f"codec_lm.random_codec_width must be >= 1, got {self.random_codec_width}")
        if self.encode_workers < 1:
            raise ConfigError(f"codec_lm.encode_workers must be >= 1, got {self.encode_workers}")
        # args are the Codec-LM builder's keyword arguments (besides n_text, which the BPE model gives)
        accepted = [p.name for p in inspect.signature(codec_lm_kwargs).parameters.values()
                    if p.kind is p.KEYWORD_ONLY and p.name != "n_text"]
        unknown = sorted(set(self.args) - set(accepted))
        if unknown:
            raise ConfigError(f"codec_lm.args: unknown key(s) {unknown}; known: {accepted}")
        # the system's overrides of the shared sections: checked here rather than when a Ray run starts
        _check_overrides("codec_lm.model", self.model, ModelConfig, _MODEL_RULES)
        _check_overrides("codec_lm.train", self.train, TrainConfig, _TRAIN_RULES)
        for key in ("n_levels", "codebook_size"):
            value = self.args.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"codec_lm.args.{key} must be a positive integer, got {value!r}")
        if self.args.get("codebook_size", 0) > 32767:  # the code store keeps codes as int16
            raise ConfigError(f"codec_lm.args.codebook_size must be <= 32767, got {self.args['codebook_size']}")


KV_CACHE_DTYPES = ("float32", "bfloat16")  # names of torch dtypes a decoding KV cache may use

# Smallest temperature and top-p (evaluate's and the CLI's). Below it float32 sampling breaks: the
# logits divided by a temperature of 1e-45 overflow to inf (softmax: NaN), and a top-p of 1e-300
# rounds to 0 in float32, which drops every token. Nothing is lost: at 1e-6 a logit lead of 1e-4 is already a probability ratio of e^-100, and any
# top-p under 1 / vocabulary size keeps the best token alone (the vocabularies are far under a million).
SAMPLING_FLOOR = 1e-6


_EVALUATE_RULES: dict[str, Rule] = {
    "utterances_per_split": _POSITIVE,
    "generations": _POSITIVE,
    "prompt_seconds": _finite_number(0, note=" (0: no prompt)"),
    "min_seconds": _finite_number(0),
    "max_seconds": _finite_number(0, above=True),
    "temperature": _finite_number(SAMPLING_FLOOR, note=" (smaller ones break float32 sampling; top_k 1 is greedy)"),
    # top_k: any integer (sampling keeps every token for k <= 0)
    "top_p": _rule(lambda v: SAMPLING_FLOOR <= v <= 1.0, f"in [{SAMPLING_FLOOR:g}, 1] (1: no nucleus filtering)"),
    "repetition_penalty": _finite_number(1, note=" (1: no penalty)"),
    "max_length_factor": _finite_number(0, above=True),
    "stt_beam_size": _POSITIVE,
    "stt_ctc_weight": _rule(lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "stt_max_utterances": _POSITIVE,
    "stt_max_tokens_per_second": _finite_number(0),
    "audio_samples": _at_least(0, " (0: none saved)"),
    "batch_size": _POSITIVE,
    "kv_cache_dtype": _rule(lambda v: v in KV_CACHE_DTYPES, "float32 or bfloat16"),
    "device": _rule(lambda v: isinstance(v, str) and DEVICE_PATTERN.fullmatch(v) is not None, f"one of {DEVICE_HELP}"),
    "score_workers": _POSITIVE,
    "score_device": _rule(lambda v: isinstance(v, str) and DEVICE_PATTERN.fullmatch(v) is not None and v != "mps",
                          "one of auto, cpu, cuda, cuda:N"),
    "decode_workers": _POSITIVE,
}


# BPE tokens per transcript at most, in the evaluation and `meld transcribe` alike; the per-second
# guard (EvaluateConfig.stt_max_tokens_per_second) is the tighter one for clips under ~39 s
STT_MAX_TOKENS = 400


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
    device: str = "cpu"  # of the evaluated model and the MELD-STT judge (the vocoder and judges: score_device)
    score_workers: int = 2  # processes running vocoder + judges (the slow part), capped at the CPU count
    decode_workers: int = 1  # > 1: TTS/STT decoding sharded over this many Ray actors, one GPU (cuda) or core (cpu) each
    score_device: str = "cpu"  # of HiFi-GAN, Whisper and WavLM in the score_workers (cuda: the node's GPUs in turn)
    seed: int = 0

    def validate(self) -> None:
        from meld.evaluation.asr import ASR_NAMES
        from meld.evaluation.speaker import SPEAKER_NAMES
        from meld.vocoder import VOCODER_NAMES

        _apply_rules("evaluate", _values(self), _EVALUATE_RULES)
        if self.min_seconds > self.max_seconds:
            raise ConfigError(
                f"evaluate.min_seconds must be <= evaluate.max_seconds ({self.max_seconds}), got {self.min_seconds}"
            )
        # a prompt as long as the shortest chosen utterance leaves it nothing to continue (its duration
        # ratio and SIM would fail after the generation, losing the split's work)
        if self.prompt_seconds > 0 and self.prompt_seconds >= self.min_seconds:
            raise ConfigError(
                f"evaluate.prompt_seconds must be < evaluate.min_seconds ({self.min_seconds}), got {self.prompt_seconds}"
            )
        _one_of("evaluate.vocoder", self.vocoder, VOCODER_NAMES)
        _one_of("evaluate.asr_judge", self.asr_judge, ASR_NAMES)
        _one_of("evaluate.speaker_model", self.speaker_model, SPEAKER_NAMES)
        # splits are checked here, not when reached: results are written only after the last split
        splits = corpus_split_names()
        for key in ("splits", "stt_splits"):
            for i, split in enumerate(getattr(self, key)):
                _one_of(f"evaluate.{key}[{i}]", split, splits)
            _check_unique(f"evaluate.{key}", getattr(self, key))
        if self.decode_workers > 1 and self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(
                f"evaluate.decode_workers={self.decode_workers} shards decoding over Ray actors, one device each, "
                f"chosen by Ray: evaluate.device must be auto, cpu or cuda, got {self.device}"
            )
        if "" in self.judge_exclude_prefixes:  # every speaker id starts with ""
            raise ConfigError(
                f"evaluate.judge_exclude_prefixes must not hold an empty prefix (it would exclude every speaker "
                f"from the ASR judge), got {list(self.judge_exclude_prefixes)}"
            )


# dev metrics of ray_jobs.train.dev_metrics that can be the objective (all comparable across frame rates)
OBJECTIVES = ("dev/mse_post_greedy", "dev/mse_pre_greedy", "dev/mse_post", "dev/mse_pre")


_TUNE_RULES: dict[str, Rule] = {
    "eval_every": _POSITIVE,
    "frames_per_batch": _POSITIVE,
    "num_workers_per_trial": _POSITIVE,
    "cpus_per_worker": _POSITIVE,
    "gpus_per_worker": _finite_number(0, note=" (0: CPU only)"),
    "max_concurrent_trials": _at_least(0, " (0: as many as the cluster holds)"),
    "max_failures": _at_least(-1, " (-1: retry without limit, as in Ray Train)"),
}


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
        for key in ("slowness_weights", "reduction_factors"):
            if not getattr(self, key):
                raise ConfigError(f"tune.{key} must not be empty, got []")
        for i, w in enumerate(self.slowness_weights):
            _finite_number(0)(f"tune.slowness_weights[{i}]", w)
        # one trial per pair, named by f"{w:g}": two weights printing alike would share a trial's folder
        if len({f"{w:g}" for w in self.slowness_weights}) < len(self.slowness_weights):
            raise ConfigError(
                "tune.slowness_weights must be distinct (a trial is named by the weight's f'{w:g}'), "
                f"got {list(self.slowness_weights)}"
            )
        for i, r in enumerate(self.reduction_factors):
            _REDUCTION_FACTOR(f"tune.reduction_factors[{i}]", r)
        _check_unique("tune.reduction_factors", self.reduction_factors)
        _apply_rules("tune", _values(self), _TUNE_RULES)
        if self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ConfigError(
                f"tune.gpus_per_worker above 1 must be a whole number (Ray shares only a fraction of one GPU), "
                f"got {self.gpus_per_worker}"
            )
        if self.num_workers_per_trial > 1 and 0 < self.gpus_per_worker < 1:
            # Ray would be free to pack two DDP ranks of a trial onto one GPU, and NCCL refuses that
            # ("Duplicate GPU detected") only once the trial has started
            raise ConfigError(
                f"tune.gpus_per_worker={self.gpus_per_worker} with tune.num_workers_per_trial="
                f"{self.num_workers_per_trial}: each DDP worker of a trial needs a GPU of its own (NCCL refuses "
                "two ranks on one GPU); use a whole GPU per worker, or one worker per trial to share GPUs"
            )
        if self.max_steps < self.eval_every:
            raise ConfigError(f"tune.eval_every must be <= tune.max_steps ({self.max_steps}), got {self.eval_every}")
        if self.metric not in OBJECTIVES:
            raise ConfigError(f"tune.metric must be one of {list(OBJECTIVES)}, got {self.metric!r}")
        if self.scheduler == "asha":  # ASHA's own asserts, raised here instead of inside the Tune driver
            if not 1 <= self.grace_period <= self.max_steps:
                raise ConfigError(
                    f"tune.grace_period must be in 1..tune.max_steps ({self.max_steps}), got {self.grace_period}"
                )
            _at_least(2)("tune.asha_reduction", self.asha_reduction)
        if "reduction_factor" in self.model_overrides:
            raise ConfigError(
                "tune.model_overrides.reduction_factor: each trial sets it from tune.reduction_factors, got "
                f"{self.model_overrides['reduction_factor']!r}"
            )
        _check_overrides("tune.model_overrides", self.model_overrides, ModelConfig, _MODEL_RULES)
