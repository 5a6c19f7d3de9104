"""The evaluate stage's checks before any work: every TTS split it is asked for must exist."""

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
