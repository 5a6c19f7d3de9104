"""Loading a checkpoint for inference: what the returned state holds, that the file is not kept mapped,
and one set of weights decoded two ways (``weight_sharing_copy``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_batch, tiny_meld

from meld.models.backbone import Backbone, configure_decoding
from meld.training import CheckpointError, load_model, save_checkpoint, weight_sharing_copy


def _checkpoint(tmp_path: Path, **state) -> tuple[Path, torch.nn.Module]:
    model, kwargs = tiny_meld(reduction=2)
    extra = {"task": "joint", "norm_mean": torch.arange(80.0)}
    return save_checkpoint(tmp_path / "model.pt", system="meld", model=model, model_kwargs=kwargs, step=3,
                           extra=extra, **state), model


def _mapped_files() -> set[str]:
    return {line.split(maxsplit=5)[5].strip() for line in Path("/proc/self/maps").read_text().splitlines()
            if len(line.split(maxsplit=5)) == 6}


def test_the_state_returned_holds_no_weights_and_keeps_the_extras(tmp_path):
    model, _ = tiny_meld(reduction=2)
    optimizer = torch.optim.AdamW(model.parameters())
    model.compute_losses(tiny_batch(reduction=2))["loss/ce"].backward()
    optimizer.step()  # a training checkpoint: its optimiser holds two more tensors per weight
    path, saved = _checkpoint(tmp_path, optimizer=optimizer)
    loaded, state = load_model(path)
    assert "model" not in state and "optimizer" not in state
    assert state["step"] == 3 and state["system"] == "meld" and state["extra"]["task"] == "joint"
    assert torch.equal(state["extra"]["norm_mean"], torch.arange(80.0))
    for (name, ours), (_, theirs) in zip(loaded.state_dict().items(), saved.state_dict().items(), strict=True):
        assert torch.equal(ours, theirs), name
    assert not loaded.training


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
@pytest.mark.parametrize("weights", [True, False])
def test_no_page_of_the_checkpoint_stays_mapped_once_loaded(tmp_path, weights):
    """The file is read through a mapping; a state still viewing it would keep the weights' pages."""
    path, _ = _checkpoint(tmp_path)
    model, state = load_model(path, weights=weights)
    assert str(path.resolve()) not in _mapped_files()
    assert state["extra"]["norm_mean"].sum() == sum(range(80)) and model is not None


def test_a_weight_sharing_copy_holds_the_same_tensors_under_modules_of_its_own(tmp_path):
    path, _ = _checkpoint(tmp_path)
    model, _ = load_model(path)
    configure_decoding(model, fixed_shape=True)
    twin = weight_sharing_copy(model)
    assert [id(p) for p in twin.parameters()] == [id(p) for p in model.parameters()]
    assert [b.data_ptr() for b in twin.buffers()] == [b.data_ptr() for b in model.buffers()]
    our_bbs = [m for m in model.modules() if isinstance(m, Backbone)]
    their_bbs = [m for m in twin.modules() if isinstance(m, Backbone)]
    assert our_bbs and len(our_bbs) == len(their_bbs) and not {id(m) for m in our_bbs} & {id(m) for m in their_bbs}
    # the copy decodes with the default step; the original keeps its settings
    assert all(m.fixed_shape_decoding for m in our_bbs) and not any(m.fixed_shape_decoding for m in their_bbs)
    assert all(m._compiled_step is None for m in their_bbs) and not twin.training
    batch = tiny_batch(reduction=2)
    with torch.no_grad():
        ours, theirs = model.compute_losses(batch), twin.compute_losses(batch)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():  # one set of weights: a change through one is seen by the other
        next(model.parameters()).add_(1.0)
    assert torch.equal(next(model.parameters()), next(twin.parameters()))


def test_weights_holding_nan_or_inf_are_refused_naming_the_first(tmp_path):
    """A diverged run's weights make a model that samples from NaN or decodes garbage without a word."""
    path, _ = _checkpoint(tmp_path)
    state = torch.load(path, weights_only=True)
    names = [name for name, tensor in state["model"].items() if tensor.is_floating_point()]
    first, later = names[len(names) // 2], names[-1]
    state["model"][later].view(-1)[-1] = float("inf")
    state["model"][first].view(-1)[0] = float("nan")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: weight {first} holds NaN or infinite values")):
        load_model(path)
    model, state = load_model(path, weights=False)  # structure and extras only: no weight is read
    assert state["extra"]["task"] == "joint" and next(model.parameters()).is_meta


def test_a_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path}: is a folder, not a checkpoint file")):
        load_model(tmp_path)


def _file_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges of this process's mappings of ``path``."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].strip() == str(path.resolve()):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def _bytes_in_file(model: torch.nn.Module, path: Path) -> tuple[int, int]:
    """(bytes of the model's parameters and buffers whose data lies in a mapping of ``path``, all their bytes)."""
    ranges, inside, total = _file_ranges(path), 0, 0
    for tensor in model.state_dict().values():
        size = tensor.numel() * tensor.element_size()
        total += size
        inside += size * any(lo <= tensor.data_ptr() and tensor.data_ptr() + size <= hi for lo, hi in ranges)
    return inside, total


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_a_model_on_the_files_pages_decodes_as_the_copied_one_and_its_mapping_lives_with_it(tmp_path, one_thread):
    """``share_file_pages``: the weights are the checkpoint's mapped pages (shared through the page cache
    by every process loading the file), and the model decodes bit for bit as the copied one."""
    import gc

    import numpy as np

    from meld.generate import stt_beam_search, tts_continue

    model, kwargs = tiny_meld(reduction=2, encoder_dropout=0.5)  # sampled, with test-time dropout
    path = save_checkpoint(tmp_path / "model.pt", system="meld", model=model, model_kwargs=kwargs,
                           extra={"task": "joint"})
    copied, _ = load_model(path)
    mapped, state = load_model(path, share_file_pages=True)
    inside, total = _bytes_in_file(mapped, path)
    assert inside == total > 0 and _bytes_in_file(copied, path)[0] == 0
    assert "model" not in state and not mapped.training
    for (name, ours), (_, theirs) in zip(mapped.named_parameters(), copied.named_parameters(), strict=True):
        assert type(ours) is type(theirs) and ours.requires_grad == theirs.requires_grad, name
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), name
    for (name, ours), (_, theirs) in zip(mapped.named_buffers(), copied.named_buffers(), strict=True):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), name

    rng = np.random.default_rng(0)
    texts = [list(rng.integers(1, 20, 3 + i % 3)) for i in range(5)]
    prompts = [rng.standard_normal((2 * (1 + i % 2), 80)).astype(np.float32) for i in range(5)]
    mels = [rng.standard_normal((2 * n, 80)).astype(np.float32) for n in (7, 4, 9)]
    tts = dict(max_frames=[10, 6, 12, 8, 9], batch_size=2, reduction=2, temperature=1.0, top_k=8, top_p=0.95,
               repetition_penalty=1.2, seed=3)
    stt = dict(batch_size=2, reduction=2, beam_size=2, max_tokens=6)
    ours, theirs = tts_continue(mapped, texts, prompts, **tts), tts_continue(copied, texts, prompts, **tts)
    for a, b in zip(ours, theirs, strict=True):
        assert a.codes == b.codes and a.hit_max_length == b.hit_max_length
        np.testing.assert_array_equal(a.frames, b.frames)
    assert stt_beam_search(mapped, mels, **stt) == stt_beam_search(copied, mels, **stt)
    # decoding re-lays the Linear weights into private memory (prepare_for_decoding); the rest stays mapped
    assert 0 < _bytes_in_file(mapped, path)[0] < total

    # the mapping is the model's: it closes when the last tensor viewing it goes
    assert _file_ranges(path)
    del mapped, ours, inside
    gc.collect()
    assert not _file_ranges(path)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_a_cpu_decoding_actor_holds_the_files_pages_not_a_copy(tmp_path):
    """The decode pool's CPU actors (one per core on a node) each load the checkpoint: on its pages, the
    node holds one copy of the weights in the page cache instead of one per actor."""
    from ray_jobs.decode_pool import _Decoder

    path, _ = _checkpoint(tmp_path)
    actor = _Decoder("cpu", 1)
    plain, compiled = actor._model(str(path), False), actor._model(str(path), True)
    inside, total = _bytes_in_file(plain, path)
    assert inside == total > 0
    assert [p.data_ptr() for p in compiled.parameters()] == [p.data_ptr() for p in plain.parameters()]


def test_shared_file_pages_need_the_cpu(tmp_path):
    path, _ = _checkpoint(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: share_file_pages makes the file's mapped pages the "
                                                   "weights, so it needs map_location cpu, not meta")):
        load_model(path, "meta", share_file_pages=True)


class _Tied(torch.nn.Module):
    """An embedding and an output projection tied: one parameter under two names."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.out = torch.nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight
        self.register_buffer("scale", torch.ones(4))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_weights_assigned_from_the_file_keep_a_tie_and_the_models_dtypes(tmp_path):
    from meld.training import _assign_file_pages

    torch.manual_seed(0)
    saved = _Tied()
    state = saved.state_dict()
    state["scale"] = torch.full((4,), 2.0, dtype=torch.float64)  # another dtype than the model's: converted
    torch.save(state, tmp_path / "tied.pt")
    tensors = torch.load(tmp_path / "tied.pt", mmap=True, weights_only=True)
    model = _Tied()
    _assign_file_pages(model, tensors)
    assert model.out.weight is model.emb.weight and torch.equal(model.emb.weight, saved.emb.weight)
    assert [name for name, _ in model.named_parameters()] == ["emb.weight"] and model.emb.weight.requires_grad
    assert model.scale.dtype == torch.float32 and torch.equal(model.scale, torch.full((4,), 2.0))
    assert any(lo <= model.emb.weight.data_ptr() < hi for lo, hi in _file_ranges(tmp_path / "tied.pt"))


# one process loading a checkpoint, measuring its memory (/proc/self/smaps_rollup, kB) before and after, the
# second reading taken once every process has loaded (pages several processes map are then shared)
_LOAD_AND_MEASURE = """
import gc, json, sys
import torch
torch.set_num_threads(1)
import meld.models.meld  # the model's code in memory before the first reading: what is measured is the weights
from meld.training import load_model

def rollup():
    fields = (line.split() for line in open("/proc/self/smaps_rollup").read().splitlines()[1:])
    return {f[0].rstrip(":"): int(f[1]) * 1024 for f in fields}

gc.collect()
before = rollup()
held = load_model(sys.argv[1], share_file_pages=sys.argv[2] == "1")
gc.collect()
print("loaded", flush=True)
sys.stdin.readline()
print(json.dumps({"before": before, "after": rollup()}), flush=True)
sys.stdin.readline()  # the others still measuring: their shared pages stay shared until they have
"""


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="reads the processes' memory (Linux)")
def test_processes_loading_one_file_on_its_pages_share_one_copy_of_the_weights(tmp_path):
    """Two processes load one checkpoint each way, at once: copied, each holds the weights privately;
    on the file's pages, neither holds them privately, and the two together hold about one copy."""
    import json
    import os
    import subprocess
    import sys

    model, kwargs = tiny_meld(reduction=2, d_model=256, n_layers=8, d_ff=1024)  # ~30 MB of weights
    path = save_checkpoint(tmp_path / "model.pt", system="meld", model=model, model_kwargs=kwargs)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    procs = {share: [subprocess.Popen([sys.executable, "-c", _LOAD_AND_MEASURE, str(path), share], cwd=root, env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
             for share in ("0", "1")}
    try:
        for proc in [*procs["0"], *procs["1"]]:
            assert proc.stdout.readline().strip() == "loaded", proc.communicate()
        for proc in [*procs["0"], *procs["1"]]:
            proc.stdin.write("measure\n")
            proc.stdin.flush()
        grown = {share: [] for share in procs}
        for share, pair in procs.items():
            for proc in pair:
                m = json.loads(proc.stdout.readline())
                grown[share].append({k: m["after"][k] - m["before"][k] for k in ("Private_Clean", "Private_Dirty", "Pss", "Anonymous", "Shared_Clean")})
        for proc in [*procs["0"], *procs["1"]]:
            proc.communicate("exit\n", timeout=60)
    finally:
        for proc in [*procs["0"], *procs["1"]]:
            proc.kill()
    private = {share: [g["Private_Clean"] + g["Private_Dirty"] for g in gs] for share, gs in grown.items()}
    pss = {share: sum(g["Pss"] for g in gs) for share, gs in grown.items()}
    report = f"weights {weights / 2**20:.1f} MB; private growth {private}, summed Pss growth {pss} {grown}"
    assert min(private["0"]) > 0.9 * weights, report  # copied: each its own copy
    assert max(private["1"]) < 0.5 * weights, report  # mapped: the pages are the page cache's, in common
    assert pss["1"] < 0.75 * pss["0"], report


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_a_checkpoint_in_the_decoding_layout_stays_on_the_files_pages_while_it_decodes(tmp_path, one_thread):
    """model.pt is exported in the decoding layout (ray_jobs.train.export_model): decoding on its pages
    re-lays no weight into private memory, and decodes as the copied model does."""
    import numpy as np

    from meld.generate import tts_continue
    from meld.models.backbone import prepare_for_decoding

    model, kwargs = tiny_meld(reduction=2)
    prepare_for_decoding(model)
    path = save_checkpoint(tmp_path / "model.pt", system="meld", model=model, model_kwargs=kwargs,
                           extra={"task": "joint"})
    mapped, _ = load_model(path, share_file_pages=True)
    copied, _ = load_model(path)
    rng = np.random.default_rng(1)
    texts = [list(rng.integers(1, 20, 4)) for _ in range(3)]
    prompts = [rng.standard_normal((4, 80)).astype(np.float32) for _ in range(3)]
    tts = dict(max_frames=[8, 6, 10], batch_size=3, reduction=2, temperature=1.0, top_k=8, top_p=1.0,
               repetition_penalty=1.0, seed=5)
    ours, theirs = tts_continue(mapped, texts, prompts, **tts), tts_continue(copied, texts, prompts, **tts)
    for a, b in zip(ours, theirs, strict=True):
        assert a.codes == b.codes
        np.testing.assert_array_equal(a.frames, b.frames)
    inside, total = _bytes_in_file(mapped, path)
    assert inside == total > 0
