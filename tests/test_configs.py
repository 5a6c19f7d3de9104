"""params files load into their sections; the paper config builds a ~200M-parameter MELD."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from meld.config import (
    BPEConfig,
    CodebookConfig,
    CodecLMConfig,
    ConfigError,
    CorpusConfig,
    EvaluateConfig,
    FeaturesConfig,
    MLflowConfig,
    ModelConfig,
    TrainConfig,
    TuneConfig,
    read_params,
)
from meld.models.builders import build_model, count_parameters, meld_kwargs

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"corpus": CorpusConfig, "features": FeaturesConfig, "codebook": CodebookConfig, "bpe": BPEConfig,
            "model": ModelConfig, "train": TrainConfig, "evaluate": EvaluateConfig, "tune": TuneConfig,
            "mlflow": MLflowConfig}
OPTIONAL = {"codec_lm": CodecLMConfig}  # only where the codec baseline is configured


@pytest.mark.parametrize("path", [ROOT / "params.yaml", ROOT / "configs" / "paper.yaml"], ids=lambda p: p.name)
def test_every_section_loads(path):
    """Each section validates (from_dict raises ConfigError on an unknown key or a bad value), and
    keeps the values the file gives rather than its defaults."""
    params = read_params(path)
    present = {name: cls for name, cls in OPTIONAL.items() if name in params}
    assert "codec_lm" in present or path.name == "paper.yaml"
    for name, cls in (SECTIONS | present).items():
        section = cls.from_dict(params[name], name)
        for key, value in params[name].items():
            got = getattr(section, key)
            assert (list(got) if isinstance(got, tuple) else got) == value, (name, key)


@pytest.mark.parametrize("path", [ROOT / "params.yaml", ROOT / "configs" / "paper.yaml"], ids=lambda p: p.name)
def test_every_system_has_a_section_that_builds_and_trains_its_own_task(path):
    """`cp configs/paper.yaml params.yaml` replaces the whole file, so each file carries every system's
    section: without one, a system trains with MELD's loss weights (its own at weight 1) and the
    top-level task, which for meld_joint was TTS alone. Each section's args build the model (on the
    meta device: no weights) and its merged task is one the system takes."""
    from meld.config import mlflow_experiment
    from meld.models.builders import SYSTEM_TASKS, SYSTEMS, system_kwargs

    params = read_params(path)
    assert mlflow_experiment(params)
    for system in SYSTEMS:
        section = params[system]
        model = ModelConfig.from_dict({**params["model"], **(section.get("model") or {})}, "model")
        train = TrainConfig.from_dict({**params["train"], **(section.get("train") or {})}, "train")
        assert train.task in SYSTEM_TASKS[system], (system, train.task)
        kwargs = system_kwargs(system, model, n_text=100, codebook_size=64 if system.startswith("meld") else None,
                               args=section.get("args"))
        with torch.device("meta"):
            build_model(system, kwargs)
    assert set(params["meld_joint"]["train"]) >= {"task", "stt_warmup_steps"}


def test_the_mlflow_section_is_checked():
    from meld.config import mlflow_experiment

    assert mlflow_experiment({}) == "meld" and mlflow_experiment({"mlflow": {"experiment": "x"}}) == "x"
    with pytest.raises(ConfigError, match=r"params section 'mlflow': unknown key\(s\) \['experimnet'\]"):
        mlflow_experiment({"mlflow": {"experimnet": "x"}})
    with pytest.raises(ConfigError, match="mlflow.experiment must name an experiment"):
        mlflow_experiment({"mlflow": {"experiment": " "}})


def test_wrong_params_are_clear_errors():
    with pytest.raises(ConfigError, match="train.*unknown.*max_stepz"):
        TrainConfig.from_dict({"max_stepz": 3}, "train")
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        TrainConfig.from_dict({"lr": "fast"}, "train")
    with pytest.raises(ConfigError, match="reduction_factor"):
        ModelConfig.from_dict({"reduction_factor": 7}, "model")
    with pytest.raises(ConfigError, match=r"evaluate.stt_ctc_weight must be in \[0, 1\]"):
        EvaluateConfig.from_dict({"stt_ctc_weight": 1.5}, "evaluate")
    # a section written as a value or a list (``train: 3``, ``model: [...]``) is named, not a bare TypeError
    with pytest.raises(ConfigError, match=r"params section 'train': expected a mapping of keys to values, got int 3"):
        TrainConfig.from_dict(3, "train")
    with pytest.raises(ConfigError, match=r"params section 'model': expected a mapping .*, got list \['d_model'"):
        ModelConfig.from_dict(["d_model", 8], "model")


NAN, INF = float("nan"), float("inf")

# (section, one bad value, the key the error must name): one case per check of a section's validate()
BAD_VALUES = [
    # corpus: mini voices by name, once each, no held-out voice sharing a speaker; LibriSpeech subsets by name
    ("corpus", {"train_voices": ["flite-rms", "flite-nobody"]}, "corpus.train_voices"),
    ("corpus", {"held_out_voices": ["flite-awb", "flite-awb"]}, "corpus.held_out_voices"),
    ("corpus", {"train_voices": ["flite-kal"], "held_out_voices": ["festival-kal"]}, "corpus.held_out_voices"),
    ("corpus", {"name": "librispeech", "librispeech_subsets": ["train-clean-1000"]}, "corpus.librispeech_subsets"),
    ("corpus", {"name": "librispeech", "librispeech_subsets": []}, "corpus.librispeech_subsets"),
    ("features", {"num_workers": 0}, "features.num_workers"),
    ("features", {"max_seconds": 0.0}, "features.max_seconds"),
    ("features", {"max_seconds": INF}, "features.max_seconds"),
    ("features", {"min_seconds": -0.1}, "features.min_seconds"),
    ("features", {"min_seconds": NAN}, "features.min_seconds"),
    ("features", {"min_seconds": 5.0, "max_seconds": 2.0}, "features.min_seconds"),
    ("features", {"max_rejected_fraction": 1.5}, "features.max_rejected_fraction"),
    ("features", {"max_rejected_fraction": -0.1}, "features.max_rejected_fraction"),
    ("codebook", {"size": 0}, "codebook.size"),
    ("codebook", {"reduction_factors": []}, "codebook.reduction_factors"),
    ("codebook", {"reduction_factors": [1, 6]}, "codebook.reduction_factors[1]"),
    ("codebook", {"reduction_factors": [2, 2]}, "codebook.reduction_factors"),
    ("codebook", {"niter": -1}, "codebook.niter"),
    ("codebook", {"size": 256, "max_vectors": 100}, "codebook.max_vectors"),
    ("codebook", {"max_points_per_centroid": 0}, "codebook.max_points_per_centroid"),
    ("codebook", {"seed": -1}, "codebook.seed"),
    ("codebook", {"seed": 2**31}, "codebook.seed"),  # faiss takes a C int
    ("bpe", {"vocab_size": 0}, "bpe.vocab_size"),
    ("bpe", {"vocab_size": 2}, "bpe.vocab_size"),
    ("model", {"d_model": 0}, "model.d_model"),
    ("model", {"n_layers": 0}, "model.n_layers"),
    ("model", {"n_heads": 0}, "model.n_heads"),
    ("model", {"d_ff": 0}, "model.d_ff"),
    ("model", {"dropout": 1.0}, "model.dropout"),
    ("model", {"dropout": NAN}, "model.dropout"),
    ("model", {"encoder_hidden": 0}, "model.encoder_hidden"),
    ("model", {"encoder_dropout": -0.1}, "model.encoder_dropout"),
    ("model", {"recon_hidden": 0}, "model.recon_hidden"),
    ("model", {"postnet_channels": 0}, "model.postnet_channels"),
    ("model", {"postnet_kernel": 4}, "model.postnet_kernel"),
    ("model", {"postnet_kernel": 0}, "model.postnet_kernel"),
    ("model", {"postnet_layers": 0}, "model.postnet_layers"),
    ("model", {"postnet_dropout": 1.5}, "model.postnet_dropout"),
    ("model", {"q_temperature": 0.0}, "model.q_temperature"),
    ("model", {"q_temperature": INF}, "model.q_temperature"),
    ("model", {"reduction_factor": 0}, "model.reduction_factor"),
    ("model", {"specaug_freq_masks": -1}, "model.specaug_freq_masks"),
    ("model", {"specaug_freq_width": -1}, "model.specaug_freq_width"),
    ("model", {"specaug_time_masks": -1}, "model.specaug_time_masks"),
    ("model", {"specaug_time_width": -1}, "model.specaug_time_width"),
    ("model", {"specaug_max_time_fraction": 1.5}, "model.specaug_max_time_fraction"),
    ("train", {"num_workers": 0}, "train.num_workers"),
    ("train", {"max_steps": 0}, "train.max_steps"),
    ("train", {"frames_per_batch": 0}, "train.frames_per_batch"),
    ("train", {"lr": -1.0}, "train.lr"),
    ("train", {"lr": NAN}, "train.lr"),
    ("train", {"weight_decay": -0.01}, "train.weight_decay"),
    ("train", {"warmup_steps": -1}, "train.warmup_steps"),
    ("train", {"hold_steps": -1}, "train.hold_steps"),
    ("train", {"decay_steps": -1}, "train.decay_steps"),
    ("train", {"grad_clip": NAN}, "train.grad_clip"),
    ("train", {"grad_clip": 0.0}, "train.grad_clip"),
    ("train", {"grad_clip": INF}, "train.grad_clip"),
    ("train", {"checkpoint_every": 0}, "train.checkpoint_every"),
    ("train", {"log_every": 0}, "train.log_every"),
    ("train", {"loss_weights": {"ce": 1.0, "slowness": -0.2}}, "train.loss_weights.slowness"),
    ("train", {"loss_weights": {"ce": NAN}}, "train.loss_weights.ce"),
    ("train", {"loss_weights": {"ce": 1.0, "slownes": 0.0}}, "train.loss_weights: unknown loss name"),
    ("train", {"task": "asr"}, "train.task"),
    ("train", {"stt_warmup_steps": -1}, "train.stt_warmup_steps"),
    # codec_lm: its builder's arguments, and its model/train overrides under the shared sections' rules
    ("codec_lm", {"args": {"levels": 4}}, "codec_lm.args"),
    ("codec_lm", {"model": {"n_headz": 2}}, "codec_lm.model"),
    ("codec_lm", {"model": {"dropout": 1.5}}, "codec_lm.model.dropout"),
    ("codec_lm", {"train": {"log_every": 0}}, "codec_lm.train.log_every"),
    ("codec_lm", {"train": {"lr": "fast"}}, "codec_lm.train.lr"),
    ("codec_lm", {"train": {"loss_weights": {"ce_codes": -1.0}}}, "codec_lm.train.loss_weights.ce_codes"),
    ("evaluate", {"splits": ["tset"]}, "evaluate.splits[0]"),
    ("evaluate", {"splits": ["test", "test"]}, "evaluate.splits"),
    ("evaluate", {"stt_splits": ["dev", "tset"]}, "evaluate.stt_splits[1]"),
    ("evaluate", {"utterances_per_split": 0}, "evaluate.utterances_per_split"),
    ("evaluate", {"generations": 0}, "evaluate.generations"),
    ("evaluate", {"prompt_seconds": -1.0}, "evaluate.prompt_seconds"),
    ("evaluate", {"prompt_seconds": 10.0, "max_seconds": 10.0}, "evaluate.prompt_seconds"),
    ("evaluate", {"prompt_seconds": 4.0, "min_seconds": 4.0}, "evaluate.prompt_seconds"),
    ("evaluate", {"min_seconds": -1.0}, "evaluate.min_seconds"),
    ("evaluate", {"max_seconds": 0.0}, "evaluate.max_seconds"),
    ("evaluate", {"min_seconds": 5.0, "max_seconds": 4.0}, "evaluate.min_seconds"),
    ("evaluate", {"temperature": 0.0}, "evaluate.temperature"),
    ("evaluate", {"temperature": NAN}, "evaluate.temperature"),
    ("evaluate", {"top_p": 2.0}, "evaluate.top_p"),
    ("evaluate", {"top_p": 0.0}, "evaluate.top_p"),
    ("evaluate", {"top_p": 1e-300}, "evaluate.top_p"),  # rounds to 0 in float32: every token dropped
    ("evaluate", {"temperature": 1e-45}, "evaluate.temperature"),  # the logits overflow
    ("evaluate", {"repetition_penalty": 0.5}, "evaluate.repetition_penalty"),
    ("evaluate", {"max_length_factor": 0.0}, "evaluate.max_length_factor"),
    ("evaluate", {"vocoder": "hifi"}, "evaluate.vocoder"),
    ("evaluate", {"asr_judge": "wisper"}, "evaluate.asr_judge"),
    ("evaluate", {"speaker_model": "ecapa"}, "evaluate.speaker_model"),
    ("evaluate", {"judge_exclude_prefixes": ["espeak-", ""]}, "evaluate.judge_exclude_prefixes"),
    ("evaluate", {"stt_beam_size": 0}, "evaluate.stt_beam_size"),
    ("evaluate", {"stt_ctc_weight": 1.5}, "evaluate.stt_ctc_weight"),
    ("evaluate", {"stt_max_utterances": 0}, "evaluate.stt_max_utterances"),
    ("evaluate", {"stt_max_tokens_per_second": -1.0}, "evaluate.stt_max_tokens_per_second"),
    ("evaluate", {"stt_max_tokens_per_second": INF}, "evaluate.stt_max_tokens_per_second"),
    ("evaluate", {"audio_samples": -1}, "evaluate.audio_samples"),
    ("evaluate", {"batch_size": 0}, "evaluate.batch_size"),
    ("evaluate", {"kv_cache_dtype": "half"}, "evaluate.kv_cache_dtype"),
    ("evaluate", {"device": "gpu"}, "evaluate.device"),
    ("evaluate", {"device": 0}, "evaluate.device"),
    ("evaluate", {"score_workers": 0}, "evaluate.score_workers"),
    ("tune", {"slowness_weights": []}, "tune.slowness_weights"),
    ("tune", {"slowness_weights": [0.1, -0.1]}, "tune.slowness_weights[1]"),
    ("tune", {"slowness_weights": [NAN]}, "tune.slowness_weights[0]"),
    ("tune", {"slowness_weights": [0.1, 0.1]}, "tune.slowness_weights"),
    ("tune", {"reduction_factors": []}, "tune.reduction_factors"),
    ("tune", {"reduction_factors": [1, 7]}, "tune.reduction_factors[1]"),
    ("tune", {"reduction_factors": [2, 2]}, "tune.reduction_factors"),
    ("tune", {"eval_every": 0}, "tune.eval_every"),
    ("tune", {"max_steps": 4, "eval_every": 8}, "tune.eval_every"),
    ("tune", {"frames_per_batch": 0}, "tune.frames_per_batch"),
    ("tune", {"num_workers_per_trial": 0}, "tune.num_workers_per_trial"),
    ("tune", {"cpus_per_worker": 0}, "tune.cpus_per_worker"),
    ("tune", {"gpus_per_worker": -1.0}, "tune.gpus_per_worker"),
    ("tune", {"gpus_per_worker": NAN}, "tune.gpus_per_worker"),
    ("tune", {"gpus_per_worker": 1.5}, "tune.gpus_per_worker"),  # Ray takes fractions of one GPU only
    # two DDP ranks of a trial may land on one GPU, which NCCL refuses once the trial runs
    ("tune", {"num_workers_per_trial": 2, "gpus_per_worker": 0.5}, "tune.gpus_per_worker"),
    ("tune", {"max_concurrent_trials": -1}, "tune.max_concurrent_trials"),
    ("tune", {"max_failures": -2}, "tune.max_failures"),
    ("tune", {"grace_period": 0}, "tune.grace_period"),
    ("tune", {"max_steps": 16, "grace_period": 32}, "tune.grace_period"),
    ("tune", {"asha_reduction": 1}, "tune.asha_reduction"),
    ("tune", {"model_overrides": {"reduction_factor": 1}}, "tune.model_overrides.reduction_factor"),
    ("tune", {"model_overrides": {"d_modl": 64}}, "tune.model_overrides"),
    ("tune", {"model_overrides": {"n_heads": 0}}, "tune.model_overrides.n_heads"),
    ("tune", {"model_overrides": {"dropout": "none"}}, "tune.model_overrides.dropout"),
]


@pytest.mark.parametrize(("section", "bad", "key"), BAD_VALUES, ids=[f"{k}={b}" for _, b, k in BAD_VALUES])
def test_out_of_range_values_are_errors_naming_the_key(section, bad, key):
    """Each value that cannot work fails at load time, before a stage or a Ray worker reaches it, and the
    message names the key (as ``section.key``) and the value."""
    cls = (SECTIONS | OPTIONAL)[section]
    with pytest.raises(ConfigError, match=re.escape(key)) as err:
        cls.from_dict(bad, section)
    value = next(iter(bad.values())) if len(bad) == 1 else None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        assert repr(value) in str(err.value) or str(value) in str(err.value), str(err.value)


# values with a meaning the code gives them on purpose (0: off, -1: no limit, ...): they still load
ACCEPTED_EDGES = [
    ("corpus", {"name": "librispeech", "train_voices": [], "held_out_voices": [],
                "librispeech_subsets": ["dev-clean", "dev-clean"]}),
    ("features", {"min_seconds": 0.0, "max_rejected_fraction": 1.0}),
    ("codebook", {"niter": 0, "pca_dims": 0, "size": 16, "max_vectors": 16}),
    ("model", {"dropout": 0.0, "specaug_freq_masks": 0, "specaug_time_masks": 0, "specaug_max_time_fraction": 0.0}),
    ("train", {"warmup_steps": 0, "decay_steps": 0, "weight_decay": 0.0, "loss_weights": {"slowness": 0.0}}),
    ("train", {"lr": 0.0}),  # trains nothing: tests of init_from check the weights stay where they started
    ("evaluate", {"prompt_seconds": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "audio_samples": 0,
                  "splits": [], "stt_splits": ["dev_other", "test_other"], "min_seconds": 4.0, "max_seconds": 4.0}),
    ("evaluate", {"top_k": -1}),  # sampling keeps every token for any k <= 0
    ("tune", {"max_concurrent_trials": 0, "max_failures": -1, "gpus_per_worker": 0.5}),  # trials share GPUs
    ("tune", {"num_workers_per_trial": 2, "gpus_per_worker": 2.0}),
    ("tune", {"scheduler": "fifo", "grace_period": 0, "asha_reduction": 1}),  # ASHA's knobs, unused by FIFO
    ("codec_lm", {"args": {"n_levels": 4}, "model": {"d_model": 64}, "train": {"task": "tts", "max_steps": 3}}),
]


@pytest.mark.parametrize(("section", "values"), ACCEPTED_EDGES, ids=[s for s, _ in ACCEPTED_EDGES])
def test_values_the_code_handles_on_purpose_still_load(section, values):
    cls = (SECTIONS | OPTIONAL)[section]
    loaded = cls.from_dict(values, section)
    for key, value in values.items():
        got = getattr(loaded, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key


def test_paper_config_is_about_200m_parameters_and_trains_one_step():
    params = read_params(ROOT / "configs" / "paper.yaml")
    cfg = ModelConfig.from_dict(params["model"], "model")
    kwargs = meld_kwargs(cfg, n_text=params["bpe"]["vocab_size"], codebook_size=params["codebook"]["size"])
    model = build_model("meld", kwargs)
    n = count_parameters(model)
    assert 170e6 <= n <= 230e6, n
    torch.manual_seed(0)
    batch = {"mel": torch.randn(1, 40, 80), "mel_len": torch.tensor([40]),
             "text": torch.randint(0, 4096, (1, 12)), "text_len": torch.tensor([12])}
    losses = model.compute_losses(batch, "tts")
    sum(losses.values()).backward()
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_a_stage_reports_input_it_cannot_use_in_one_line_and_bugs_with_their_traceback(tmp_path):
    import subprocess
    import sys

    from meld.config import run_stage

    (tmp_path / "params.yaml").write_text("features:\n  max_rejected_fraction: 5\n")
    done = subprocess.run([sys.executable, "-m", "pipeline.features", "--params", str(tmp_path / "params.yaml"),
                           "--corpus", str(tmp_path / "corpus"), "--out", str(tmp_path / "features")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["features: features.max_rejected_fraction must be in [0, 1], got 5.0"]
    assert not (tmp_path / "features").exists()

    def missing_file():
        raise FileNotFoundError(f"{tmp_path / 'stats.json'}: no normalisation statistics")

    assert run_stage("codebook", missing_file) == 1

    def bug():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_stage("codebook", bug)


# --------------------------------------------------------------- the paper's facts in configs/paper.yaml
PAPER = ROOT / "configs" / "paper.yaml"
LIBRISPEECH_ALL = {"train-clean-100", "train-clean-360", "train-other-500", "dev-clean", "dev-other", "test-clean",
                   "test-other"}


def _system(params: dict, system: str, section: str) -> dict:
    """A system's ``model`` or ``train`` section as the training driver merges it (the system's own over the top level)."""
    from ray_jobs.train import _merge

    return _merge(params[section], (params.get(system) or {}).get(section) or {})


def paper_fact_mismatches(params: dict) -> list[str]:
    """Every hyper-parameter or protocol value that DESIGN.md states for the MELD paper and that a
    paper-scale params file does not carry, as ``what: got X, DESIGN.md <where> says Y``. Values that
    DESIGN.md does not give (learning rate, sampling settings, encoder width, ...) are not checked;
    deliberate deviations (MELLE's flux start, meld_joint's warm-up length: docs/decisions.md) neither."""
    from meld.corpus.librispeech import SUBSET_SPLITS

    meld_model, meld_train = _system(params, "meld", "model"), _system(params, "meld", "train")
    train, ev, tune = params["train"], params["evaluate"], params["tune"]
    melle_args, melle_weights = params["melle"].get("args") or {}, _system(params, "melle", "train")["loss_weights"]
    subset_of = {split: subset for subset, split in SUBSET_SPLITS.items() if not subset.startswith("train")}
    facts = [  # (what, value in the file, DESIGN.md's value, where DESIGN.md says it)
        ("codebook.size", params["codebook"]["size"], 8192, "§3 (line 72)"),
        ("codebook.reduction_factors", sorted(params["codebook"]["reduction_factors"]), [1, 2], "§3/§5 (lines 73, 114)"),
        ("bpe.vocab_size", params["bpe"]["vocab_size"], 4096, "§3 (line 74)"),
        ("meld model.n_layers", meld_model["n_layers"], 12, "§5 (line 106)"),
        ("meld model.n_heads", meld_model["n_heads"], 16, "§5 (line 106)"),
        ("meld model.d_model", meld_model["d_model"], 1024, "§5 (line 106)"),
        ("meld model.d_ff", meld_model["d_ff"], 4096, "§5 (line 106)"),
        ("meld model.dropout", meld_model["dropout"], 0.2, "§5 (line 106)"),
        ("meld model.encoder_dropout", meld_model["encoder_dropout"], 0.5, "§5 (line 104)"),
        ("meld model.postnet_channels", meld_model["postnet_channels"], 512, "§5 (line 109)"),
        ("meld model.postnet_kernel", meld_model["postnet_kernel"], 5, "§5 (line 109)"),
        ("meld model.reduction_factor in {1, 2}", meld_model["reduction_factor"] in (1, 2), True, "§5 (line 114)"),
        ("meld train.loss_weights.slowness", meld_train["loss_weights"].get("slowness"), 0.2, "§5 (line 110)"),
        ("meld_joint train.loss_weights.slowness",
         _system(params, "meld_joint", "train")["loss_weights"].get("slowness"), 0.2, "§5 (line 110)"),
        ("frames per batch (train.num_workers x train.frames_per_batch)",
         meld_train["num_workers"] * meld_train["frames_per_batch"], 50_000, "§7 (line 130)"),
        ("train.warmup_steps", train["warmup_steps"], 1_000, "§7 (line 131)"),
        ("train.hold_steps", train["hold_steps"], 100_000, "§7 (line 131)"),
        ("train.decay_steps", train["decay_steps"], 100_000, "§7 (line 131)"),
        ("train.max_steps (the whole schedule)", train["max_steps"],
         train["warmup_steps"] + train["hold_steps"] + train["decay_steps"], "§7 (line 131)"),
        ("train.grad_clip", train["grad_clip"], 10.0, "§7 (line 131)"),
        ("train.bf16", train["bf16"], True, "§7 (line 131)"),
        ("melle loss_weights.kl", melle_weights.get("kl"), 0.1, "§6 (line 120)"),
        ("melle args.kl_start_step", melle_args.get("kl_start_step"), 10_000, "§6 (line 120)"),
        ("melle loss_weights.flux", melle_weights.get("flux"), 0.5, "§6 (line 120)"),
        ("melle args.stop_pos_weight", melle_args.get("stop_pos_weight"), 100.0, "§6 (line 121)"),
        ("dmel args.n_bins", (params["dmel"].get("args") or {}).get("n_bins"), 16, "§6 (line 123)"),
        ("codec_lm args.n_levels", (params["codec_lm"].get("args") or {}).get("n_levels"), 12, "§6 (line 124)"),
        ("corpus.name", params["corpus"]["name"], "librispeech", "§9 (line 143)"),
        ("corpus.librispeech_subsets", set(params["corpus"]["librispeech_subsets"]), LIBRISPEECH_ALL,
         "§9 (lines 143-149: 960 h to train on, dev/test clean/other)"),
        ("evaluate.splits (as LibriSpeech subsets)", [subset_of.get(s, s) for s in ev["splits"]], ["test-clean"],
         "§9 (line 145)"),
        ("evaluate.min_seconds", ev["min_seconds"], 4.0, "§9 (line 145)"),
        ("evaluate.max_seconds", ev["max_seconds"], 10.0, "§9 (line 145)"),
        ("evaluate.prompt_seconds", ev["prompt_seconds"], 3.0, "§9 (line 145)"),
        ("evaluate.generations", ev["generations"], 3, "§9 (line 146)"),
        ("evaluate.stt_splits", set(ev["stt_splits"]), {"dev", "test", "dev_other", "test_other"}, "§9 (line 149)"),
        ("evaluate.stt_beam_size", ev["stt_beam_size"], 5, "§9 (line 149)"),
        ("evaluate.asr_judge", ev["asr_judge"], "whisper", "§9 (line 150)"),
        ("evaluate.speaker_model", ev["speaker_model"], "wavlm", "§9 (line 150)"),
        ("tune sweeps the paper's slowness weight", 0.2 in tune["slowness_weights"], True, "§3 (line 77), §5 (line 110)"),
        ("tune.reduction_factors", sorted(tune["reduction_factors"]), [1, 2], "§3 (line 77), §5 (line 114)"),
    ]
    return [f"{what}: got {got!r}, DESIGN.md {where} says {want!r}" for what, got, want, where in facts if got != want]


def test_the_paper_config_carries_every_paper_fact_design_md_states():
    """configs/paper.yaml holds the paper's sizes, schedule, loss weights and evaluation protocol as
    DESIGN.md states them, for MELD as the training driver merges its section (a ``meld:`` override
    of the top-level sections counts)."""
    assert paper_fact_mismatches(read_params(PAPER)) == []


PAPER_FACT_BREAKS = [  # one edit each, and the fact it breaks: the check above can fail
    ({"meld": {"train": {"task": "tts", "loss_weights": {"slowness": 0.5}}}}, "meld train.loss_weights.slowness"),
    ({"meld": {"model": {"dropout": 0.1}}}, "meld model.dropout"),
    ({"train": {"frames_per_batch": 2500}}, "frames per batch"),
    ({"train": {"max_steps": 20_000}}, "train.max_steps"),
    ({"melle": {"args": {"kl_start_step": 20}}}, "melle args.kl_start_step"),
    ({"evaluate": {"splits": ["test_other"]}}, "evaluate.splits"),
    ({"evaluate": {"stt_splits": ["dev", "test"]}}, "evaluate.stt_splits"),
    ({"codebook": {"size": 256}}, "codebook.size"),
]


@pytest.mark.parametrize(("edit", "fact"), PAPER_FACT_BREAKS, ids=[f for _, f in PAPER_FACT_BREAKS])
def test_a_paper_config_that_loses_a_paper_fact_is_named(edit, fact):
    from ray_jobs.train import _merge

    mismatches = paper_fact_mismatches(_merge(read_params(PAPER), edit))
    assert [m for m in mismatches if m.startswith(fact)], mismatches
    assert "DESIGN.md §" in mismatches[0]


def test_the_benches_paper_model_is_the_one_the_training_driver_builds_from_the_paper_config():
    """bench/_common.paper_meld_kwargs times "exactly the configuration a paper-scale run trains":
    the kwargs ray_jobs.train builds for ``meld`` (its section merged over ``model``, its args)."""
    from bench._common import paper_meld_kwargs
    from meld.models.builders import system_kwargs

    params = read_params(PAPER)
    model = ModelConfig.from_dict(_system(params, "meld", "model"), "model")
    driver = system_kwargs("meld", model, n_text=params["bpe"]["vocab_size"], codebook_size=params["codebook"]["size"],
                           args=params["meld"].get("args"))
    assert paper_meld_kwargs() == driver
