"""dvc.yaml's data stages list their params key by key: every key that shapes the output, and not the
worker counts, whose change would otherwise rerun hours of LibriSpeech preparation for the same bytes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from meld.config import CorpusConfig, FeaturesConfig

DAG = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())
SPEED_ONLY = {"num_workers"}


@pytest.mark.parametrize(("stage", "section", "config"), [("corpus", "corpus", CorpusConfig),
                                                          ("features", "features", FeaturesConfig)])
def test_a_data_stage_lists_every_key_of_its_section_but_the_worker_count(stage, section, config):
    listed = set(DAG["stages"][stage]["params"])
    keys = {f.name for f in dataclasses.fields(config)}
    assert listed == {f"{section}.{k}" for k in keys - SPEED_ONLY}
