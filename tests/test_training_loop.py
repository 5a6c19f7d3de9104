"""The training loop's parts, below Ray: checkpoint writes, resumption, logging steps, dev metrics.

tests/test_faults.py runs the whole loop through Ray Train; these check its pieces in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from itertools import islice
from pathlib import Path

import pytest
import torch
from conftest import tiny_batch, tiny_meld

from meld.store import FrameBudgetSampler
from meld.training import (
    CheckpointError,
    build_optimizer,
    build_scheduler,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    step_checkpoints,
    train_step,
    write_checkpoint_state,
)

REPO = Path(__file__).resolve().parents[1]


def test_a_checkpoint_write_that_fails_leaves_no_partial_file_and_the_old_checkpoint(tmp_path):
    """A write cut short (here the process's file-size limit, as a full disk or a quota would) raises
    an error naming the file, removes its partial temporary file (at paper size, gigabytes that no
    later run would ever delete: every retry of the failed worker left one more) and leaves the
    checkpoint already under that name as it was."""
    path = tmp_path / "step-4.pt"
    write_checkpoint_state(path, {"system": "meld", "model": {"w": torch.ones(4)}, "step": 4})
    script = textwrap.dedent(f"""
        import resource, sys, torch
        from meld.training import CheckpointError, write_checkpoint_state
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))  # Python ignores SIGXFSZ
        try:
            write_checkpoint_state({str(path)!r}, {{"system": "meld", "model": {{"w": torch.zeros(1_000_000)}}, "step": 6}})
        except CheckpointError as err:
            print(err)
            sys.exit(3)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert str(path) in done.stdout and "could not be written" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4.pt"]
    assert load_checkpoint(path)["step"] == 4


def test_the_partial_files_of_a_killed_writer_go_with_the_next_prune(tmp_path):
    """A writer killed mid-write (a preempted node: no Python cleanup runs) leaves ``step-N.pt.tmp<pid>``.
    It never counts as a checkpoint, and the next save's pruning removes it; other files stay."""
    from ray_jobs.train import _prune

    for step in (2, 4, 6):
        write_checkpoint_state(tmp_path / f"step-{step}.pt", {"system": "meld", "model": {}, "step": step})
    (tmp_path / "step-8.pt.tmp4242").write_bytes(b"PK\x03\x04 cut short")
    (tmp_path / "mlflow_run_id").write_text("abc")
    (tmp_path / "step-best.pt").write_bytes(b"a user's copy")
    assert [n for n, _ in step_checkpoints(tmp_path)] == [2, 4, 6]
    _prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow_run_id", "step-4.pt", "step-6.pt", "step-best.pt"]


def test_the_last_step_is_logged_whatever_the_logging_interval():
    """Steps 1, every ``log_every``-th, and the last: a 16-step run logging every 10 steps ended its
    MLflow curves at step 10, and the run table showed step 10's losses as the run's last."""
    from ray_jobs.train import logs_at

    assert [s for s in range(1, 17) if logs_at(s, max_steps=16, log_every=10)] == [1, 10, 16]
    assert [s for s in range(1, 9) if logs_at(s, max_steps=8, log_every=4)] == [1, 4, 8]
    assert [s for s in range(1, 4) if logs_at(s, max_steps=3, log_every=1)] == [1, 2, 3]


def test_dev_metrics_over_no_frames_are_not_a_perfect_score():
    """A dev split none of whose utterances fit the frame budget scores nothing: its errors are NaN
    (which a sweep's scheduler treats as no result), not 0.0, the best a trial could report."""
    import math

    from ray_jobs.train import dev_metrics

    model, _ = tiny_meld()
    metrics = dev_metrics(model, None, [], [], torch.device("cpu"))
    assert metrics["dev/frames"] == 0
    mse = {k: v for k, v in metrics.items() if k.startswith("dev/mse")}
    assert len(mse) == 4 and all(math.isnan(v) for v in mse.values())


LENGTHS = [5, 7, 9, 11, 12, 6, 8, 10, 12, 12, 4, 3]  # frames per utterance: four 36-frame batches


def _batch(idx: list[int]) -> dict[str, torch.Tensor]:
    """A batch for utterances ``idx``, the same for the same utterances (a stand-in for the feature store)."""
    batch = tiny_batch(B=len(idx), T=max(LENGTHS[i] for i in idx), seed=sum(idx))
    batch["mel_len"] = torch.tensor([LENGTHS[i] for i in idx])
    return batch


def _fresh_run():
    model, kwargs = tiny_meld(dropout=0.1)  # dropout and z ~ q(z|x): the steps draw from the RNG
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.01)
    scheduler = build_scheduler(optimizer, warmup=2, hold=2, decay=4)  # ends at step 8: past it, rate 0
    return model, kwargs, optimizer, scheduler, FrameBudgetSampler(LENGTHS, 36, seed=3)


def _train(model, optimizer, scheduler, sampler, steps: int) -> tuple[list[float], list[list[int]]]:
    rates, batches = [], []
    for idx in islice(iter(sampler), steps):
        rates.append(train_step(model, optimizer, scheduler, _batch(idx), task="tts", loss_weights={},
                                grad_clip=1.0)["lr"])
        batches.append(idx)
    return rates, batches


@pytest.mark.parametrize("stop_at", [1, 4, 5])  # in the warm-up, at an epoch's end, in the decay
def test_a_run_resumed_from_its_checkpoint_continues_as_the_uninterrupted_one(tmp_path, stop_at):
    """Save after ``stop_at`` steps, rebuild everything in a process state that drew other random
    numbers, restore, and train on: the learning rates, the batches (across an epoch boundary: four
    batches an epoch) and the final weights are those of one uninterrupted 10-step run (past its
    schedule's end)."""
    torch.manual_seed(123)
    model, _, optimizer, scheduler, sampler = _fresh_run()
    straight_rates, straight_batches = _train(model, optimizer, scheduler, sampler, 10)
    assert straight_rates[-2:] == [0.0, 0.0] and straight_rates[0] == pytest.approx(1e-2 / 2)

    torch.manual_seed(123)
    first, kwargs, optimizer, scheduler, sampler = _fresh_run()
    rates, batches = _train(first, optimizer, scheduler, sampler, stop_at)
    path = save_checkpoint(tmp_path / f"step-{stop_at}.pt", system="meld", model=first, model_kwargs=kwargs,
                           optimizer=optimizer, scheduler=scheduler, step=stop_at, sampler_state=sampler.state_dict())
    torch.manual_seed(999)
    resumed, _, optimizer, scheduler, sampler = _fresh_run()
    state = load_checkpoint(path)
    assert restore_training_state(state, resumed, optimizer, scheduler) == stop_at
    sampler.load_state_dict(state["sampler"])
    more_rates, more_batches = _train(resumed, optimizer, scheduler, sampler, 10 - stop_at)

    assert rates + more_rates == straight_rates
    assert batches + more_batches == straight_batches
    differ = [k for k, v in model.state_dict().items() if not torch.equal(v, resumed.state_dict()[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def test_an_interrupted_write_is_never_taken_for_a_checkpoint(tmp_path):
    """What a kill leaves before the rename (the temporary file, whole or cut short) is neither a
    training checkpoint nor loadable as one; a truncated ``step-N.pt`` (a copy cut short) is refused."""
    state = {"system": "meld", "model": {"w": torch.ones(1000)}, "step": 2}
    good = write_checkpoint_state(tmp_path / "step-2.pt", state)
    data = good.read_bytes()
    (tmp_path / f"step-4.pt.tmp{os.getpid() + 1}").write_bytes(data[: len(data) // 2])
    assert step_checkpoints(tmp_path) == [(2, good)]
    (tmp_path / "step-6.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or partial"):
        load_checkpoint(tmp_path / "step-6.pt")
