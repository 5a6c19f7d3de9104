"""Framework-free training: optimiser, LR schedule, train_step, atomic checkpoints.

Nothing here knows about Ray; ``ray_jobs/train.py`` wraps these functions.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif isinstance(model, LossModule):
            model = model.model
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW; biases, norms and embeddings are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "emb" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-8, fused=fused or None)


def lr_factor(step: int, warmup: int, hold: int, decay: int) -> float:
    """Warm-up (linear from 0) -> hold at 1 -> linear decay to 0 (paper: 1k / 100k / 100k)."""
    if step < warmup:
        return (step + 1) / warmup
    if step < warmup + hold:
        return 1.0
    if decay <= 0:
        return 1.0
    return max(0.0, 1.0 - (step - warmup - hold) / decay)


def build_scheduler(optimizer, warmup: int, hold: int, decay: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, hold, decay))


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: training stops and keeps the last good checkpoint."""


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    batch: dict[str, torch.Tensor],
    *,
    task: str,
    loss_weights: dict[str, float],
    grad_clip: float,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """One optimisation step.

    Args:
        model: a system (with ``compute_losses(batch, task)``), or a :class:`LossModule` around one,
            possibly DDP-wrapped.
        loss_weights: weight per loss name without its namespace (``{"ce": 1, "slowness": 0.2}``);
            a loss without a weight counts with weight 1.
        autocast_dtype: e.g. torch.bfloat16 on GPU; None for full precision.

    Returns:
        metrics: ``loss/<name>`` per component, ``loss/total``, ``grad/norm``, ``lr`` (the rate this
        step's update used, not the one the scheduler sets for the next step).

    Raises:
        NonFiniteLoss: the loss or the gradient norm is NaN or infinite. The check comes after the
            backward pass and before the optimiser step, so the weights and the optimiser state
            stay as they were; a finite loss with non-finite gradients is caught too.

    The step reads the device once (a GPU waits for its queue at each read): the losses, the
    gradient norm and the finiteness check come back together (tests/test_host_reads.py).
    """
    model.train()
    device_type = next(iter(batch.values())).device.type
    ctx = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with ctx:
        # through forward, so that DDP's gradient sync hooks fire
        losses = model(batch, task) if isinstance(model, LossModule) or hasattr(model, "module") else model.compute_losses(batch, task)
    total = sum(loss_weights.get(k.split("/", 1)[1], 1.0) * v for k, v in losses.items())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scalars = torch.stack([t.detach().float() for t in (total, grad_norm, *losses.values())]).tolist()  # the one host read
    total_value, norm_value, loss_values = scalars[0], scalars[1], dict(zip(losses, scalars[2:]))
    if not (math.isfinite(total_value) and math.isfinite(norm_value)):
        what = "loss" if not math.isfinite(total_value) else "gradient norm"
        raise NonFiniteLoss(f"non-finite {what}: loss {total_value} ({loss_values}), gradient norm {norm_value}")
    # read before scheduler.step(), which sets the next step's rate: logged after it, step 1 of a
    # 4-step warm-up showed peak/2 while it trained at peak/4
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    return {**loss_values, "loss/total": total_value, "grad/norm": norm_value, "lr": lr}


class LossModule(nn.Module):
    """Makes ``compute_losses`` the forward, so DDP wraps the call that produces the losses."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, task):
        return self.model.compute_losses(batch, task)


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object (which config a checkpoint belongs to)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(
    path: str | Path,
    *,
    system: str,
    model: nn.Module,
    model_kwargs: dict,
    optimizer=None,
    scheduler=None,
    step: int = 0,
    sampler_state: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint atomically (temp file + rename): a crash never leaves a half file under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": 1,
        "system": system,
        "model_kwargs": model_kwargs,
        "model": unwrap(model).state_dict(),
        "step": step,
        "rng": {"torch": torch.get_rng_state()},
        "sampler": sampler_state or {},
        "extra": extra or {},
    }
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state()
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    return write_checkpoint_state(path, state)


def write_checkpoint_state(path: str | Path, state: dict) -> Path:
    """Write an already assembled checkpoint dict atomically (temp file, fsync, rename).

    Raises:
        CheckpointError: the write failed (a full disk, a quota); the file under ``path``, if any,
            is as it was, and the partial temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException as err:
        # the partial file goes (a paper-size training checkpoint is gigabytes, and a failed worker's every
        # retry left one more); torch's own message ("unexpected pos 768 vs 662") names neither file nor cause
        tmp.unlink(missing_ok=True)
        if not isinstance(err, Exception):  # an interrupt stays an interrupt
            raise
        free = shutil.disk_usage(path.parent).free
        raise CheckpointError(f"{path}: the checkpoint could not be written ({type(err).__name__}: {err}; "
                              f"{free / 2**20:.0f} MiB free on its file system); a file already under that "
                              "name is unchanged") from err
    return path


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or not a MELD checkpoint, or could not be written."""


def load_checkpoint(path: str | Path, map_location: str = "cpu", mmap: bool = False) -> dict:
    """Load a checkpoint without executing code (``weights_only=True``).

    ``mmap``: map the tensors instead of reading them, for a caller that only looks at the metadata.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable or partial checkpoint ({err})") from err
    if not isinstance(state, dict) or "model" not in state or "system" not in state:
        raise CheckpointError(f"{path}: not a MELD toolkit checkpoint")
    return state


def load_model(path: str | Path, map_location: str = "cpu", *, weights: bool = True,
               share_file_pages: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild a model from a checkpoint's stored kwargs and load its weights; returns (model, state).

    The state is the checkpoint's less its weights (``"model"``, which live in the model alone) and a
    training checkpoint's ``"optimizer"``. Callers keep the state for its extras while the model runs;
    one still holding the tensors the weights were copied from held the weights twice (1.44 GB for
    the paper's 0.75 GB model, 0.72 GB now). The file is mapped, not read: the weights are copied from
    its pages, and the optimiser's are never touched.

    Raises :class:`CheckpointError` for a missing or unreadable file and for weights holding NaN or inf.

    ``weights=False``: the model's structure and attributes only, its tensors on the ``meta`` device,
    for a process that hands the decoding to others (the evaluation over a
    :class:`ray_jobs.decode_pool.DecodePool`) and reads only the state's metadata and extras.

    ``share_file_pages=True`` (CPU only): the weights are not copied; the model's parameters and
    buffers are the file's mapped pages themselves (a private, copy-on-write mapping), so processes
    on one machine loading the same file share one copy of them in the OS page cache (the decode
    pool's CPU actors). A page written (training, an in-place edit) becomes that process's own copy;
    the file never changes. The mapping lives as long as the model's tensors (the state holds none
    of its pages); meanwhile the file must not be rewritten in place, or its new bytes show through
    (a shortened file: SIGBUS); :func:`save_checkpoint` writes a new file and renames it, which
    leaves a mapped one intact. A weight stored in another dtype than the model's is converted (a
    copy of its own, as the default makes); the others keep the file's memory order. Decoding on
    CPU re-lays each Linear weight stored (out, in)-contiguous, as training checkpoints are, into a
    private copy (:func:`meld.models.backbone.prepare_for_decoding`; 90 % of the paper model's
    bytes); a checkpoint saved from a model already so laid out, as the training driver exports
    ``model.pt``, stays shared while it decodes (``bench.model_loading``).
    """
    from meld.models.builders import build_model

    if share_file_pages and torch.device(map_location).type != "cpu":
        raise ValueError(f"{path}: share_file_pages makes the file's mapped pages the weights, so it needs "
                         f"map_location cpu, not {map_location}")
    mapped = load_checkpoint(path, map_location, mmap=True)
    tensors = mapped.pop("model")
    mapped.pop("optimizer", None)  # a training checkpoint's: twice the weights again, never read here
    # the rest (extras, RNG state: kilobytes) copied out of the file, whose mapping then closes with the
    # last tensor viewing it: no page of the checkpoint is held once this returns (with share_file_pages,
    # the model's tensors are the last)
    state = copy.deepcopy(mapped)
    del mapped
    if not weights:
        with torch.device("meta"):
            model = build_model(state["system"], state["model_kwargs"])
        return model.eval(), state
    _refuse_non_finite(path, tensors)
    model = build_model(state["system"], state["model_kwargs"])
    if share_file_pages:
        _assign_file_pages(model, tensors)
        return_freed_heap()  # the weights built, freed as the file's replaced them
    else:
        model.load_state_dict(tensors)
    return model.eval(), state


def _assign_file_pages(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Make the mapped checkpoint ``tensors`` the model's own parameters and buffers (no copy); the
    ones built are dropped. Keeps what the default copy keeps: each parameter's ``requires_grad``
    (``assign=True`` does), the model's dtypes, and a tensor registered under several names (a tied
    embedding and output layer) one tensor, so a change through one name is seen through the other.

    Holds no reference to a built tensor once it returns (names, dtypes and ids only), so that they
    are freed by then."""
    dtypes = {key: built.dtype for key, built in model.state_dict().items()}
    for key, dtype in dtypes.items():
        if key in tensors and tensors[key].dtype != dtype:  # what copy_ into the built tensor would make
            tensors[key] = tensors[key].to(dtype)
    registered = [(id(t), name) for name, t in [*model.named_parameters(remove_duplicate=False),
                                                *model.named_buffers(remove_duplicate=False)]]
    tied: dict[int, list[str]] = {}
    for ident, name in registered:
        tied.setdefault(ident, []).append(name)
    model.load_state_dict(tensors, assign=True)
    # assign set each name to its own new tensor: a tie (one tensor, several names) becomes two tensors
    # viewing the same pages; the first name's is put back under the others
    for first, *others in (names for names in tied.values() if len(names) > 1):
        owner, _, attr = first.rpartition(".")
        tensor = getattr(model.get_submodule(owner), attr)
        for other in others:
            owner, _, attr = other.rpartition(".")
            setattr(model.get_submodule(owner), attr, tensor)


def return_freed_heap() -> None:
    """Hand the heap's free memory back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    The weights the model was built with, just replaced by the file's, are freed; but glibc keeps
    large freed blocks for reuse once its mmap threshold has grown, so in some processes a whole
    model's worth stayed private memory (bench.model_loading's side-by-side rows). The benches also call
    it before reading RSS, so that it counts live memory only."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


def _refuse_non_finite(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """A weight holding NaN or inf (a diverged run, a corrupt copy) makes a model that samples from NaN
    or decodes garbage without a word: refuse it here, naming the first such tensor."""
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: weight {name} holds NaN or infinite values")


def weight_sharing_copy(model: nn.Module) -> nn.Module:
    """A second instance of ``model`` whose parameters and buffers are the very same tensors (no memory
    for a second set of weights), with modules of its own, its decoding left at the default.

    For one checkpoint decoded two ways in one process: a joint model's TTS side decodes through
    ``configure_decoding(compile=...)`` while its STT side, and the same checkpoint as the STT judge,
    must decode with the default step; decoding settings are kept per module, so one module cannot
    serve both. A copy made from a configured model drops the settings (the compiled step is bound to
    the original's modules).
    """
    from meld.models.backbone import configure_decoding

    same = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    twin = copy.deepcopy(model, memo=same)
    configure_decoding(twin)
    return twin


def restore_training_state(state: dict, model: nn.Module, optimizer, scheduler) -> int:
    """Load weights, optimiser, scheduler and RNG from a checkpoint; returns the step to continue at."""
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if torch.cuda.is_available() and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return int(state["step"])


def step_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """The training checkpoints ``step-<N>.pt`` of a folder as (N, path), oldest first. Other names
    (a user's ``step-best.pt`` copy) are not training checkpoints and are left alone."""
    found = []
    for p in Path(folder).glob("step-*.pt"):
        n = p.stem[len("step-"):]
        if n.isdigit():
            found.append((int(n), p))
    return sorted(found)


def latest_good_checkpoint(folder: str | Path, mmap: bool = False) -> dict | None:
    """Newest loadable ``step-<N>.pt`` in a folder; corrupt or partial ones are skipped (with a warning).

    ``mmap``: map its tensors instead of reading them (:func:`load_checkpoint`), for a caller that may
    only look at its step and extras, as a resuming worker does with the candidate it does not take.
    """
    import logging

    folder = Path(folder)
    if not folder.is_dir():
        return None
    for _, p in reversed(step_checkpoints(folder)):
        try:
            return load_checkpoint(p, mmap=mmap)
        except CheckpointError as err:
            logging.getLogger(__name__).warning("skipping bad checkpoint: %s", err)
    return None
