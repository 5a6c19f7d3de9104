"""Host reads per step (issue 6): every TTS system's decoding loop reads the device once per step
(the stop check), a beam-search step three times, a training step once (twice more under the
Ray Train loop's cross-rank finiteness check).

On a GPU each read of a tensor's value from the host (``.tolist()``, ``.item()``, ``bool()``,
``int()``, ``nonzero()``) waits for every queued kernel, so a loop with several per step runs at the
speed of its launches. Such reads are Tensor methods that ``__torch_function__`` sees on any device,
so they are counted here on the CPU, with the real models, over two guard lengths: the difference is
what a decoding step costs in host reads.
"""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import ScheduledStop, tiny_batch, tiny_meld
from test_codec_lm import K, N, code_batch, tiny_codec_lm
from test_dmel import tiny_dmel
from test_mel_lm import tiny_mel_lm
from test_melle import tiny_melle
from torch.overrides import TorchFunctionMode

pytestmark = pytest.mark.usefixtures("one_thread")

HOST_READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero"}


class HostReads(TorchFunctionMode):
    """Counts the Tensor calls that copy a value to the host (a device sync on a GPU)."""

    def __init__(self, host_side: tuple[torch.Tensor, ...] = ()):
        """host_side: tensors that stay on the host whatever the model's device, whose reads cost no sync."""
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.host_side = {id(t) for t in host_side}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS and not (args and id(args[0]) in self.host_side):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _never_stopping(system: str):
    """(model, generate(max_frames)) for a tiny model of ``system`` whose rows all run to the guard."""
    batch = tiny_batch(B=3, T=6)
    prompt_len = torch.tensor([6, 2, 0])
    if system == "codec_lm":
        model, _ = tiny_codec_lm()
        with torch.no_grad():
            model.head.bias.view(K, N + 1)[:, N] = -1e4  # no <EOS> at any level
        codes = code_batch()
        return model, lambda m: model.generate(codes["text"], codes["text_len"], codes["codes"],
                                               torch.tensor([7, 3, 0]), max_frames=m, top_k=1)
    if system == "meld":
        model, _ = tiny_meld()
        with torch.no_grad():
            model.head.bias[0] = -1e4  # <EOS> (union id 0) never drawn
    elif system == "dmel":
        model, _ = tiny_dmel()
        with torch.no_grad():
            model.eos_head.bias.fill_(-20.0)
    else:
        model, _ = {"mel_lm": tiny_mel_lm, "melle": tiny_melle}[system]()
        with torch.no_grad():
            model.stop_head.bias.fill_(-20.0)
    return model, lambda m: model.generate(batch["text"], batch["text_len"], batch["mel"], prompt_len,
                                           max_frames=m, top_k=3)


def _host_reads(generate, max_frames: int) -> tuple[int, list[bool]]:
    with HostReads() as reads:
        gen = generate(max_frames)
    return sum(reads.counts.values()), gen.hit_max_length


@pytest.mark.parametrize("system", ["meld", "mel_lm", "melle", "dmel", "codec_lm"])
def test_a_decoding_step_reads_the_device_once(system):
    model, generate = _never_stopping(system)
    model.eval()
    short, hit_short = _host_reads(generate, 3)
    long, hit_long = _host_reads(generate, 9)
    assert hit_short == hit_long == [True] * 3  # every row ran to the guard: 6 more steps in the long run
    assert long - short == 6, f"{system}: {(long - short) / 6:g} host reads per decoding step, not 1"


def test_rows_leaving_the_batch_cost_one_read_per_leaving_step():
    """Rows that stop leave the batch; the step where some leave reads once more (the kept cache rows'
    padding check), the steps in between still read once."""
    model, _ = tiny_mel_lm()
    model.eval()
    batch = tiny_batch(B=3, T=6)
    prompt_len = torch.tensor([6, 2, 0])

    def reads_with(stop_head) -> tuple[int, list[int]]:
        model.stop_head = stop_head
        with HostReads() as reads:
            gen = model.generate(batch["text"], batch["text_len"], batch["mel"], prompt_len, max_frames=8)
        return sum(reads.counts.values()), [f.shape[0] for f in gen.frames_pre]

    all_run, lengths = reads_with(ScheduledStop(set()))
    assert lengths == [8, 8, 8]
    two_leave, lengths = reads_with(ScheduledStop({2, 5}))  # one row leaves after 2 frames, one after 5
    assert lengths == [2, 5, 8]
    assert two_leave - all_run == 2


def test_a_beam_search_step_reads_the_device_three_times_whatever_the_batch():
    """STT beam search keeps its hypotheses on the host, so a step reads the top scores and their indices
    back, for all utterances together (not twice per utterance), and the cache, reordered to the new
    beams, checks once whether its rows are still padded (these clips differ in length, so they are)."""
    from meld.generate import stt_beam_search

    model, _ = tiny_meld()
    model.eval()
    with torch.no_grad():
        model.head.bias[0] = -1e4  # <EOS> (union id 0) never wins: every search runs to its guard
    mels = [torch.randn(n, 80, generator=torch.Generator().manual_seed(n)).numpy() for n in (9, 6, 4)]

    def reads(max_tokens: int) -> int:
        with HostReads() as counted:
            out = stt_beam_search(model, mels, reduction=1, beam_size=2, max_tokens=max_tokens)
        assert [len(ids) for ids in out] == [max_tokens] * 3
        return sum(counted.counts.values())

    assert reads(9) - reads(3) == 3 * 6


def test_leaving_rows_keep_what_each_row_wrote_until_it_left():
    from meld.models.leaving_rows import LeavingRows

    rows = LeavingRows(values=torch.empty(4, 6, 2))
    leaves_after = {0: 4, 1: 2, 2: 6, 3: 2}  # original row -> steps it keeps
    for step in range(6):
        # each live row writes (its original index, step): what it wrote is checkable afterwards
        live = torch.tensor(rows.rows_of, dtype=torch.float32)
        rows.write(step, values=torch.stack([live, torch.full_like(live, step)], dim=-1))
        finished = [leaves_after[i] == step + 1 for i in rows.rows_of]
        idx = rows.leave(finished, step + 1)
        if idx is None:
            break
        assert rows.rows_of == [i for i in rows.rows_of if leaves_after[i] > step + 1]
        assert idx.tolist() == [row for row, done in enumerate(finished) if not done]
    assert idx is None
    for i, out in enumerate(rows.outputs["values"]):
        expected = torch.stack([torch.full((leaves_after[i],), float(i)), torch.arange(leaves_after[i]).float()], -1)
        assert torch.equal(out, expected)


def _training_setup(seed: int = 0):
    from meld.training import build_optimizer, build_scheduler

    torch.manual_seed(seed)
    model, _ = tiny_meld(dropout=0.1)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    return model, opt, build_scheduler(opt, warmup=1, hold=100, decay=0)


def test_a_training_step_reads_the_device_once():
    from meld.training import LossModule, train_step
    from ray_jobs.train import _finite_checked

    model, opt, sched = _training_setup()
    batch = tiny_batch(B=2, T=8)
    train_step(model, opt, sched, batch, task="tts", loss_weights={}, grad_clip=1.0)
    # AdamW's step counters: torch keeps them on the host unless the optimiser is fused or capturable
    # (the fused one, used on GPU, keeps them on the device and never reads them), so reading them is free
    counters = tuple(state["step"] for state in opt.state.values())
    assert len(counters) > 20 and all(c.device.type == "cpu" for c in counters)
    with HostReads(host_side=counters) as plain:
        metrics = train_step(model, opt, sched, batch, task="tts", loss_weights={}, grad_clip=1.0)
    assert sum(plain.counts.values()) == 1, plain.counts
    assert {"loss/total", "grad/norm", "lr"} <= metrics.keys() and any(k.startswith("loss/ce") for k in metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    # the Ray Train loop's module: inputs checked once before the model runs, losses once (with every rank's verdict)
    checked = _finite_checked(LossModule)(model)
    with HostReads(host_side=counters) as ray_loop:
        train_step(checked, opt, sched, batch, task="tts", loss_weights={}, grad_clip=1.0)
    assert sum(ray_loop.counts.values()) == 3, ray_loop.counts


def test_non_finite_gradients_stop_the_step_before_the_weights_move():
    """A finite loss whose gradients are not (one gradient is poisoned by a hook) raises before the
    optimiser step: weights and optimiser state stay as they were."""
    from meld.training import NonFiniteLoss, train_step

    model, opt, sched = _training_setup()
    batch = tiny_batch(B=2, T=8)
    train_step(model, opt, sched, batch, task="tts", loss_weights={}, grad_clip=1.0)  # optimiser state exists
    before = {k: v.clone() for k, v in model.named_parameters()}  # (batch-norm statistics move in any forward pass)
    state_before = {k: v.clone() for k, v in opt.state[next(iter(model.parameters()))].items() if torch.is_tensor(v)}
    param = next(p for p in model.parameters() if p.requires_grad)
    handle = param.register_hook(lambda g: torch.full_like(g, float("nan")))
    with pytest.raises(NonFiniteLoss, match="non-finite gradient norm"):
        train_step(model, opt, sched, batch, task="tts", loss_weights={}, grad_clip=1.0)
    handle.remove()
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
    after = opt.state[next(iter(model.parameters()))]
    assert all(torch.equal(v, after[k]) for k, v in state_before.items())
    # and a non-finite loss says so
    with torch.no_grad():
        param.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="non-finite loss"):
        train_step(model, opt, sched, batch, task="tts", loss_weights={}, grad_clip=1.0)
