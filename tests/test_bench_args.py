"""The bench scripts check ``--out`` before their long runs (a stem under bench/results/, never a path),
and time the configurations the pipeline would run."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import _common
from bench._common import result_stem

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("stem", ["generation", "generation-xeon", "kmeans_zen1.v2"])
def test_a_plain_stem_is_kept_and_names_the_file_written(stem, tmp_path, monkeypatch):
    assert result_stem(stem) == stem
    monkeypatch.setattr(_common, "RESULTS", tmp_path / "results")  # not the repository's own results
    path = _common.write_result(stem, {"ratio": 1.5})
    assert path == tmp_path / "results" / f"{stem}.json"
    assert json.loads(path.read_text()) == {"ratio": 1.5}
    assert [p.name for p in (tmp_path / "results").iterdir()] == [f"{stem}.json"]  # no temporary left


@pytest.mark.parametrize("bad", ["/tmp/x", "../x", "sub/x", "", ".", ".."])
def test_a_path_is_refused_with_the_reason(bad):
    with pytest.raises(argparse.ArgumentTypeError, match="file stem"):
        result_stem(bad)


def test_the_script_stops_at_argument_parsing():
    # kmeans parses its arguments before importing faiss or reading data: the refusal is immediate
    proc = subprocess.run(
        [sys.executable, "-m", "bench.kmeans", "--out", "/tmp/elsewhere"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "--out '/tmp/elsewhere': give a file stem" in proc.stderr
    assert not Path("/tmp/elsewhere.json").exists()


def test_the_benches_time_the_paper_config_the_pipeline_would_train():
    """bench.generation/training/gpu's "paper" rows come from configs/paper.yaml itself: changing the
    file changes what is timed, and only the frame grouping is the benches' own."""
    from bench._common import paper_frames_per_batch, paper_meld_kwargs
    from meld.config import ModelConfig, read_params
    from meld.models.builders import meld_kwargs

    params = read_params(ROOT / "configs" / "paper.yaml")
    cfg = ModelConfig.from_dict(params["model"], "model")
    pipeline = meld_kwargs(cfg, n_text=params["bpe"]["vocab_size"], codebook_size=params["codebook"]["size"])
    bench = paper_meld_kwargs(cfg.reduction_factor)
    assert bench == pipeline
    assert paper_meld_kwargs(2)["frame_dim"] == 2 * pipeline["frame_dim"] // cfg.reduction_factor
    assert paper_frames_per_batch() == params["train"]["num_workers"] * params["train"]["frames_per_batch"]


def test_generation_ratios_tallies_each_target_and_both_across_processes():
    from bench.generation_ratios import TARGETS, across_processes

    def result(kv_vs_full, b16_vs_b1):
        return {"ratios": {"kv_vs_full": kv_vs_full, "b16_vs_b1": b16_vs_b1}}

    bars = TARGETS["kv_vs_full"], TARGETS["b16_vs_b1"]
    runs = [result(bars[0] + 0.5, bars[1] - 0.1), result(bars[0] - 0.2, bars[1] + 0.3),
            result(bars[0], bars[1]), result(bars[0] - 1, bars[1] - 1)]
    tally = across_processes(runs)
    assert tally["processes"] == 4
    assert tally["met"] == {"kv_vs_full": 2, "b16_vs_b1": 2}  # a ratio exactly at its bar meets it
    assert tally["both_met"] == 1  # only the third met both in the same process
    assert tally["ranges"]["kv_vs_full"] == [bars[0] - 1, bars[0] + 0.5]
    # the product of the ratios reaching the bars' product is necessary for both, not sufficient:
    # the first two reach it with one target missed each
    assert tally["product_met"] == 3


def test_joint_window_holds_batch_1_exactly_when_both_targets_are_met():
    """joint(): batch 1's time lies in its window iff both ratios meet their bars, and the window is
    empty iff the product of the ratios (free of batch 1) falls short of the bars' product."""
    import random

    from bench.generation_ratios import TARGETS, joint

    rng = random.Random(0)
    for _ in range(500):
        kv1, kv16, full1 = rng.uniform(0.2, 0.6), rng.uniform(0.6, 2.0), rng.uniform(2.0, 6.0)
        j = joint(kv16, full1)
        both = full1 / kv1 >= TARGETS["kv_vs_full"] and 16 * kv1 / kv16 >= TARGETS["b16_vs_b1"]
        lo, hi = j["kv1_window"]
        assert (lo <= kv1 <= hi) == both
        assert (lo <= hi) == (j["product"] >= j["needed"])
        assert abs(j["product"] - (full1 / kv1) * (16 * kv1 / kv16)) < 1e-9
        assert (kv16 <= j["kv16_max"]) == (j["product"] >= j["needed"])
