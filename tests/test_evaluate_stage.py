"""The evaluate stage's checks before any work: every TTS split it is asked for must exist, and its device."""

from __future__ import annotations

import pytest
import yaml

from pipeline import evaluate


def test_a_split_missing_from_the_corpus_stops_before_any_generation(tmp_path):
    for split in ("test",):  # the corpus has test, not test_other
        (tmp_path / "features" / split).mkdir(parents=True)
        (tmp_path / "features" / split / "index.jsonl").write_text("")
        (tmp_path / "corpus" / split).mkdir(parents=True)
        (tmp_path / "corpus" / split / "manifest.jsonl").write_text("")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": {"splits": ["test", "test_other"]}}))
    with pytest.raises(SystemExit, match=r"evaluate.splits: \['test_other'\] not in .*this corpus has \['test'\]"):
        evaluate.main(["--params", str(params), "--system", "meld", "--model", str(tmp_path / "no-model.pt"),
                       "--features", str(tmp_path / "features"), "--corpus", str(tmp_path / "corpus"),
                       "--out", str(tmp_path / "eval"), "--metrics", str(tmp_path / "metrics.json")])
    assert not (tmp_path / "eval").exists()  # nothing started (the model does not even exist)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_device_this_machine_lacks_stops_before_the_model_loads(tmp_path):
    for split in ("test",):
        (tmp_path / "features" / split).mkdir(parents=True)
        (tmp_path / "features" / split / "index.jsonl").write_text("")
        (tmp_path / "corpus" / split).mkdir(parents=True)
        (tmp_path / "corpus" / split / "manifest.jsonl").write_text("")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": {"splits": ["test"], "device": "cuda"}}))
    # the model file does not exist: an error about the device, not the file, shows the order of the checks
    with pytest.raises(SystemExit, match="evaluate.device cuda: CUDA is not available on this machine"):
        evaluate.main(["--params", str(params), "--system", "meld", "--model", str(tmp_path / "no-model.pt"),
                       "--features", str(tmp_path / "features"), "--corpus", str(tmp_path / "corpus"),
                       "--out", str(tmp_path / "eval"), "--metrics", str(tmp_path / "metrics.json")])


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
