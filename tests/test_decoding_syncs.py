"""Every TTS system's decoding loop reads the device once per step: the stop check (issue 6).

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

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
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
