"""bench.gpu, the script a lent GPU machine runs for issue 6's GPU rows, works before a GPU is lent.

Device time comes in short leases, so the script must not fail there for reasons a CPU could have
shown: it is run here on the CPU, end to end, in a process where every package that machine lacks
(the audio, clustering, tracking and tokeniser libraries) fails to import, and its numbers are
checked for what they must satisfy on any device.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# (the lent GPU image has torch, numpy, PyYAML, sentencepiece, numba, scikit-learn and tqdm)
ABSENT_ON_THE_GPU_MACHINE = ("soundfile", "librosa", "faiss", "soxr", "mlflow", "ray", "jiwer", "dvc")

RUNNER = """
import importlib.abc, sys
ABSENT = set(sys.argv[1].split(","))
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (absent on the GPU machine)")
sys.meta_path.insert(0, Absent())
from pathlib import Path
import bench._common
bench._common.RESULTS = Path(sys.argv[2])
from bench import gpu
sys.exit(gpu.main(["--device", "cpu", "--quick", "--configs", "tiny", "--modes", "sliced,fixed", "--out", "gpu-smoke"]))
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu-bench")
    proc = subprocess.run([sys.executable, "-c", RUNNER, ",".join(ABSENT_ON_THE_GPU_MACHINE), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu-smoke.json").read_text())


def test_generation_rows_decode_the_same_codes_in_every_mode(smoke):
    rows = smoke["generation"]
    assert {(r["mode"], r["batch"]) for r in rows} == {(m, b) for m in ("sliced", "fixed") for b in (1, 2)}
    for r in rows:
        assert r["same_codes_as_sliced"] is (None if r["mode"] == "sliced" else True), r
        assert r["s_per_batch"] > 0 and r["ms_per_step"] == pytest.approx(1e3 * r["s_per_batch"] / r["frames"])
        assert r["rtf"] == pytest.approx(r["s_per_batch"] / (10.0 * r["frames"] / 313 * r["batch"]))
    assert all((r["floor_ms"] is not None) == (r["batch"] == 1) for r in rows)
    # nothing compiled while timed, and no step fell back from CUDA graphs (none are used on a CPU)
    assert all(r["compiles_in_timed_rounds"] == 0 and r["cudagraph_skips"] == 0 for r in rows)
    # the field a GPU run reads to see that its timed rounds replayed graphs; a CPU records none, so
    # this checks only that every row carries it as a yes/no
    assert all(isinstance(r["graphs_recorded_in_timed_rounds"], bool) for r in rows)


def test_the_bandwidth_floor_reads_the_weights_at_the_measured_read_rate(smoke):
    """A decoding step reads its weights: the floor is their bytes over the device's read rate, not over
    half a copy's read + write rate (on HBM a read runs at about the copy's total, so that floor was
    twice too high and a step looked twice closer to it than it was)."""
    import torch

    from bench import generation as G
    from bench.gpu import build

    model, _ = build("tiny", torch.device("cpu"), no_eos=True)
    read = smoke["rates"]["read_gbs"]
    assert read > 0
    for r in smoke["generation"]:
        if r["batch"] == 1:
            assert r["floor_ms"] == pytest.approx(1e3 * G.weight_bytes_per_step(model) / (read * 1e9))


def test_training_flops_counted_and_estimated_agree(smoke):
    """The PaLM estimate (6 x matmul parameters per token + attention) and the FLOPs torch counts on a
    real step are independent; on the CPU the count misses only the attention kernel, which is small
    at these lengths, so they must agree closely, or the MFU a GPU run reports is wrong."""
    (row,) = smoke["training"]
    assert row["config"] == "tiny" and row["batch"] >= 1 and row["batch"] * row["longest"] <= row["budget"]
    assert 0 <= row["padding"] < 0.5
    assert row["counted_tflop_per_step"] == pytest.approx(row["palm_tflop_per_step"], rel=0.1)
    assert row["mfu_palm"] is None  # no bf16 peak is known for a CPU: no MFU is invented
    # read against the rate of the dtype the step ran in: no autocast on a CPU, so fp32
    assert row["autocast"] == "None" and row["matmul_dtype"] == "fp32" and smoke["rates"]["matmul_fp32_tflops"] > 0
    assert row["mfu_palm_vs_measured_matmul"] == pytest.approx(row["palm_tflops"] / smoke["rates"]["matmul_fp32_tflops"])


def test_a_training_batch_fills_its_frame_budget_like_the_sampler():
    import torch

    from bench.gpu import training_batch

    batch = training_batch(5000, n_text=100, frame_dim=160, device=torch.device("cpu"))
    lengths = batch["mel_len"].tolist()
    assert lengths == sorted(lengths, reverse=True)  # neighbours in length: little padding
    assert len(lengths) * max(lengths) <= 5000 < (len(lengths) + 1) * max(lengths)
    assert all(31 <= n <= 500 for n in lengths)  # 4-16 s at r=2
    assert batch["mel"].shape == (len(lengths), max(lengths), 160)
    assert (batch["text_len"] >= 1).all() and batch["text"].shape[1] == int(batch["text_len"].max())
    with pytest.raises(ValueError, match="holds no utterance"):
        training_batch(50, n_text=100, frame_dim=160, device=torch.device("cpu"))


def test_the_paper_rows_train_what_configs_paper_yaml_trains():
    """Generation times the paper model at the tiny grouping (10 s = 313 steps in both configs);
    training times it as configs/paper.yaml trains it: its own grouping, one worker's frames per step
    and the whole global batch. A long utterance that alone overflows a budget is skipped, not fatal."""
    import torch
    import yaml

    from bench.gpu import model_kwargs, training_batch

    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    tiny = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert model_kwargs("paper", training=True)["frame_dim"] == 80 * paper["model"]["reduction_factor"]
    assert model_kwargs("paper")["frame_dim"] == 80 * tiny["model"]["reduction_factor"]
    assert model_kwargs("paper", training=True)["d_model"] == paper["model"]["d_model"]
    per_worker = paper["train"]["frames_per_batch"]
    batch = training_batch(per_worker, n_text=100, frame_dim=80, device=torch.device("cpu"))
    assert 1 <= len(batch["mel_len"]) and int(batch["mel_len"].max()) * len(batch["mel_len"]) <= per_worker
    small = training_batch(300, n_text=100, frame_dim=80, device=torch.device("cpu"))  # 4.8 s at most
    assert int(small["mel_len"].max()) <= 300


def test_the_rows_issue_6_asks_for_run_first_and_a_deadline_keeps_what_ran(tmp_path, monkeypatch):
    """A lease can end early: the paper config's batch-1 RTF and its training MFU come first, every
    other mode after the row its codes are checked against, and past the deadline the rest are
    listed as not run while the rows already measured are on disk."""
    from bench.gpu import plan

    tasks = plan(["tiny", "paper"], ["sliced", "compiled"], [1, 16], {"tiny": [2500], "paper": [3125, 50000]})
    assert tasks[:3] == [("generation", "paper", "sliced", 1), ("training", "paper", 3125), ("training", "paper", 50000)]
    assert len(tasks) == len(set(tasks)) == 2 * 2 * 2 + 3
    for t in tasks:
        if t[0] == "generation" and t[2] != "sliced":
            assert tasks.index(("generation", t[1], "sliced", t[3])) < tasks.index(t)
    assert plan(["tiny"], ["sliced"], [1], {"tiny": [600], "paper": []}, skip={"training"}) == [("generation", "tiny", "sliced", 1)]

    import copy

    import bench._common
    from bench import gpu

    written = []
    monkeypatch.setattr(bench._common, "RESULTS", tmp_path)
    monkeypatch.setattr(gpu, "write_result", lambda name, result, also=None: written.append(copy.deepcopy(result)))
    quick = ["--device", "cpu", "--quick", "--configs", "tiny", "--modes", "sliced", "--out", "gpu-order"]
    assert gpu.main(quick + ["--skip", "training"]) == 0
    # on disk with the device's rates before any row, after each row, then the final write
    assert [len(r["generation"]) for r in written] == [0, 1, 2, 2]
    written.clear()
    assert gpu.main(quick + ["--deadline-s", "1e-9"]) == 0
    first, final = written  # the device's rates, then the final write: no row ran
    assert first["generation"] == [] and first["rates"]["matmul_fp32_tflops"] > 0
    assert final["generation"] == [] and final["training"] == []
    assert [tuple(t) for t in final["not_run"]] == [("generation", "tiny", "sliced", 1),
                                                    ("generation", "tiny", "sliced", 2), ("training", "tiny", 600)]


QUICK_TINY = ["--device", "cpu", "--quick", "--configs", "tiny", "--modes", "sliced"]


def test_a_row_that_fails_anywhere_is_kept_and_the_rest_still_run(tmp_path, monkeypatch):
    """Only the first call of a generation row and a training row's out-of-memory were caught: a timed
    round that raised (a CUDA graph replay, say), or a training step that failed any other way (the
    second row a lease runs), ended the run there, and every row after it was lost."""
    import bench._common
    from bench import generation as G
    from bench import gpu

    monkeypatch.setattr(bench._common, "RESULTS", tmp_path)
    real, calls = G.run_path, []

    def run_path(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the first row's first timed round, after its first call went well
            raise RuntimeError("replay failed")
        return real(*a, **k)

    def training_row(*a, **k):
        raise RuntimeError("no fused AdamW here")

    monkeypatch.setattr(G, "run_path", run_path)
    monkeypatch.setattr(gpu, "training_row", training_row)
    assert gpu.main(QUICK_TINY + ["--out", "gpu-fail"]) == 0
    result = json.loads((tmp_path / "gpu-fail.json").read_text())
    first, second = result["generation"]
    assert first["error"] == "RuntimeError: replay failed" and (first["config"], first["batch"]) == ("tiny", 1)
    assert "error" not in second and second["s_per_batch"] > 0
    (train,) = result["training"]
    assert train["error"] == "RuntimeError: no fused AdamW here" and train["budget"] == 600


def test_a_training_row_frees_its_model_before_the_next_row_reads_its_baseline(monkeypatch):
    """The optimiser and its LR scheduler hold each other, so without a collection a finished training
    row's weights, gradients and AdamW state stayed allocated into the next row: counted in that row's
    baseline, then freed whenever the collector ran (its peak then read low), and in the way of an
    out-of-memory retry."""
    import gc
    import weakref

    import torch

    from bench import gpu

    params, alive_at_baseline = [], []
    real_build = gpu.build

    def build(*a, **k):
        model, kwargs = real_build(*a, **k)
        params.append(weakref.ref(next(model.parameters())))
        return model, kwargs

    def allocated(device):
        alive_at_baseline.append([p() is not None for p in params])
        return 0

    monkeypatch.setattr(gpu, "build", build)
    monkeypatch.setattr(gpu, "allocated", allocated)
    args = gpu.argparse.Namespace(steps=1, quick=True)
    rates = {"matmul_fp32_tflops": 1.0, "matmul_bf16_tflops": 1.0}
    was_enabled = gc.isenabled()
    gc.disable()  # what the collector does on its own is left to chance: here it does nothing
    try:
        for _ in range(2):
            assert "error" not in gpu.training_task("tiny", torch.device("cpu"), 600, args, rates, None)
    finally:
        if was_enabled:
            gc.enable()
    assert alive_at_baseline == [[], [False]]


def test_copy_to_holds_the_rows_measured_when_the_run_is_killed(tmp_path, monkeypatch):
    """A lease whose device time runs short kills the command before its closing `cp`: the result is
    also copied after every row into --copy-to (the device tool's $OUT, which comes back even then)."""
    import bench._common
    from bench import gpu

    monkeypatch.setattr(bench._common, "RESULTS", tmp_path / "results")
    out = tmp_path / "OUT"

    def killed(*a, **k):
        raise KeyboardInterrupt  # what a kill at the limit leaves: no final write, no cp

    monkeypatch.setattr(gpu, "training_task", killed)
    with pytest.raises(KeyboardInterrupt):
        gpu.main(QUICK_TINY + ["--out", "gpu-killed", "--copy-to", str(out)])
    copied = json.loads((out / "gpu-killed.json").read_text())
    assert [(r["config"], r["batch"]) for r in copied["generation"]] == [("tiny", 1), ("tiny", 2)]
    assert copied["args"]["copy_to"] == str(out) and copied["rates"]["read_gbs"] > 0
    assert [p.name for p in out.iterdir()] == ["gpu-killed.json"]  # no temporary file left beside it


def test_the_mfu_peak_is_the_named_cards_own():
    """A lent "nvidia-h200" can be an H200 NVL: the peak was the SXM card's 989 TFLOP/s for every name
    holding "H100"/"H200" but "PCIe", which read an NVL card's MFU 16 % low. A card the table lacks gets
    no peak (the MFU is then left out, not invented)."""
    from bench.gpu import bf16_peak_tflops

    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == bf16_peak_tflops("NVIDIA H200") == 989.4
    assert bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bf16_peak_tflops("NVIDIA H100 NVL") == bf16_peak_tflops("NVIDIA H200 NVL") == 835.5
    assert bf16_peak_tflops("NVIDIA H200 PCIe") is None and bf16_peak_tflops("NVIDIA A100-SXM4-80GB") is None
