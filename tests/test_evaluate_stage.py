"""The evaluate stage's checks before any work: every TTS split it is asked for must exist, its device, and
the Ray cluster's room for its decoding pool."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pipeline import evaluate

NO_CUDA = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")


def _run_stage(tmp_path, evaluate_params: dict) -> None:
    """The stage on an empty corpus that has a test split only, with no model file at all: an error
    about anything else shows that it is checked before the model loads."""
    (tmp_path / "features" / "test").mkdir(parents=True)
    (tmp_path / "features" / "test" / "index.jsonl").write_text("")
    (tmp_path / "corpus" / "test").mkdir(parents=True)
    (tmp_path / "corpus" / "test" / "manifest.jsonl").write_text("")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": evaluate_params}))
    evaluate.main(["--params", str(params), "--system", "meld", "--model", str(tmp_path / "no-model.pt"),
                   "--features", str(tmp_path / "features"), "--corpus", str(tmp_path / "corpus"),
                   "--out", str(tmp_path / "eval"), "--metrics", str(tmp_path / "metrics.json")])


def test_a_split_missing_from_the_corpus_stops_before_any_generation(tmp_path):
    with pytest.raises(SystemExit, match=r"evaluate.splits: \['test_other'\] not in .*this corpus has \['test'\]"):
        _run_stage(tmp_path, {"splits": ["test", "test_other"]})
    assert not (tmp_path / "eval").exists()  # nothing started


@NO_CUDA
def test_a_device_this_machine_lacks_stops_before_the_model_loads(tmp_path):
    with pytest.raises(SystemExit, match="evaluate.device cuda: CUDA is not available on this machine"):
        _run_stage(tmp_path, {"splits": ["test"], "device": "cuda"})


@NO_CUDA
def test_judges_on_a_device_this_machine_lacks_stop_before_the_model_loads(tmp_path):
    with pytest.raises(SystemExit, match="evaluate.score_device cuda: CUDA is not available on this machine"):
        _run_stage(tmp_path, {"splits": ["test"], "score_device": "cuda"})


def test_a_decode_pool_the_cluster_cannot_hold_stops_before_the_model_loads(tmp_path):
    import ray
    from test_faults import ensure_ray

    ensure_ray()  # the session's cluster, which the stage joins (as under `ray job submit`)
    cpus = int(ray.cluster_resources()["CPU"])
    with pytest.raises(SystemExit, match=f"evaluate: decode_workers={cpus + 1} needs {cpus + 1} CPUs, one per "
                                         f"worker; the Ray cluster has {cpus}: lower evaluate.decode_workers"):
        _run_stage(tmp_path, {"splits": ["test"], "decode_workers": cpus + 1})
    assert not (tmp_path / "eval").exists()


def test_device_names_resolve_or_say_which_option_named_them():
    import torch

    from meld.devices import resolve_device

    assert resolve_device("cpu", "evaluate.device") == "cpu"
    assert resolve_device("auto", "evaluate.device") == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", ""):
        with pytest.raises(ValueError, match=f"^evaluate.device {bad}: unknown device"):
            resolve_device(bad, "evaluate.device")
    with pytest.raises(ValueError, match=r"^--device cuda:\d+: "):
        resolve_device(f"cuda:{torch.cuda.device_count()}", "--device")  # one past the last GPU, or no CUDA


@pytest.mark.parametrize("task, judged", [("tts", False), ("joint", True), ("stt", True)])
def test_a_tts_only_checkpoint_is_no_meld_stt_judge_and_a_missing_one_is_skipped(task, judged, tmp_path, caplog):
    """evaluate.stt_judge_model: a model trained for TTS only is no judge (how a config under dvc names
    none, DVC taking no null); any model that learned STT is one."""
    import logging

    import numpy as np
    import torch
    from conftest import tiny_meld

    from meld.features import N_MELS
    from meld.text import BPETokenizer, train_bpe
    from meld.training import save_checkpoint

    bpe = train_bpe(["the quick brown fox", "jumps over the lazy dog"], tmp_path / "bpe", vocab_size=30)
    model, kwargs = tiny_meld(reduction=2, n_text=BPETokenizer(bpe).vocab_size, codebook_size=16)
    extra = {"reduction_factor": 2, "norm_mean": torch.zeros(N_MELS), "norm_std": torch.ones(N_MELS),
             "bpe_model": torch.from_numpy(np.frombuffer(bpe.read_bytes(), dtype=np.uint8).copy()), "task": task}
    path = save_checkpoint(tmp_path / "model.pt", system="meld", model=model, model_kwargs=kwargs, step=1, extra=extra)
    with caplog.at_level(logging.INFO, logger="meld.evaluate"):
        judge = evaluate.load_stt_judge(str(path), 0.0, "cpu")
    assert (judge is not None) == judged
    assert judged or "trained for TTS only: no MELD-STT judge" in caplog.text
    if judged:  # the evaluated model's own STT side is the judge when it is the same file, however named
        evaluated = evaluate.load_stt_model(path)
        assert evaluate.load_stt_judge(str(tmp_path / "." / "model.pt"), 0.0, "cpu", evaluated=evaluated) is evaluated
        other = Path(shutil.copyfile(path, tmp_path / "other.pt"))  # the same bytes, another file: loaded
        assert evaluate.load_stt_judge(str(other), 0.0, "cpu", evaluated=evaluated).path == str(other)
    assert evaluate.load_stt_judge(None, 0.0, "cpu") is None
    assert evaluate.load_stt_judge(str(tmp_path / "absent.pt"), 0.0, "cpu") is None
    assert "absent.pt does not exist" in caplog.text


def test_mel_plots_share_one_time_axis(tmp_path, monkeypatch):
    """A generation three times too long must look three times too long beside its ground truth."""
    import matplotlib.pyplot as plt
    import numpy as np

    closed = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: closed.append(fig))
    path = evaluate.plot_mels(tmp_path / "m.png", [("ground truth", np.zeros((40, 80))), ("generated", np.zeros((120, 80)))],
                              prompt_frames_n=10)
    assert path.is_file()
    (fig,) = closed
    assert [ax.get_xlim() for ax in fig.axes] == [(-0.5, 119.5)] * 2
    real_close(fig)


@pytest.mark.parametrize("system", ["meld", "meld_joint", "melle", "mel_lm", "dmel", "codec_lm"])
def test_a_model_loaded_without_weights_is_the_same_model_holding_no_tensor(tmp_path, system):
    """What the evaluation's own process loads when a decoding pool runs the models: the same structure,
    attributes and extras as a full load, every parameter and buffer on the meta device (no memory)."""
    from test_faults import TINY_PARAMS

    from meld.config import ModelConfig
    from meld.models.builders import build_model, system_kwargs
    from meld.training import load_model, save_checkpoint

    kwargs = system_kwargs(system, ModelConfig.from_dict(TINY_PARAMS["model"], "model"), n_text=20, codebook_size=16)
    path = save_checkpoint(tmp_path / "model.pt", system=system, model=build_model(system, kwargs),
                           model_kwargs=kwargs, step=7, extra={"task": "tts", "norm_mean": __import__("torch").ones(80)})
    full, full_state = load_model(path)
    bare, bare_state = load_model(path, weights=False)
    assert type(bare) is type(full) and bare.system == full.system and not bare.training
    assert bare_state["system"] == system
    tensors = dict(bare.named_parameters()) | dict(bare.named_buffers())
    assert tensors and all(t.is_meta for t in tensors.values())
    assert {n: t.shape for n, t in tensors.items()} == {
        n: t.shape for n, t in (dict(full.named_parameters()) | dict(full.named_buffers())).items()}
    for attr in ("reduction_factor", "frame_dim", "stt_ctc", "n_levels"):
        assert getattr(bare, attr, None) == getattr(full, attr, None), attr
    assert bare_state["step"] == 7 and bare_state["model_kwargs"] == kwargs
    assert (bare_state["extra"]["norm_mean"].numpy() == full_state["extra"]["norm_mean"].numpy()).all()
