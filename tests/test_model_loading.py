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
