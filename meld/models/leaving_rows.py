"""Per-row outputs of a batched decoding loop whose rows leave the batch as they finish.

Every TTS system's ``generate`` keeps its rows' outputs the same way: preallocated (B, steps, ...)
buffers in the rows' current order, written for the whole batch with one slice write per step, read
out (as views) only for the rows that finish, and compacted to the rows that stay. Rows are touched
only on a step where some finish, so a step needs no per-row work and no host read beyond the
loop's own stop check (tests/test_host_reads.py).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch


class LeavingRows:
    """Named (B, steps, ...) output buffers of a decoding loop, and which original row each batch row is.

    Args:
        buffers: one preallocated tensor per output, all with the batch first and the step second.

    Attributes:
        rows_of: original index of each row still in the batch, in batch order.
        outputs: per name, each original row's (steps_done, ...) outputs; empty until it finishes.
    """

    def __init__(self, **buffers: torch.Tensor):
        self.buffers = buffers
        batch = next(iter(buffers.values())).shape[0]
        self.rows_of = list(range(batch))
        self.outputs = {name: [buf.new_zeros(0, *buf.shape[2:])] * batch for name, buf in buffers.items()}

    def write(self, step: int, **values: torch.Tensor) -> None:
        """This step's (b, ...) outputs of every row still in the batch (a row finishing now writes
        values that are never read)."""
        for name, value in values.items():
            self.buffers[name][:, step] = value

    def leave(self, finished: list[bool], steps_done: int) -> torch.Tensor | None:
        """Finished rows keep their first ``steps_done`` outputs and leave the batch.

        Returns:
            the (b',) batch indices of the rows that stay, on the buffers' device, for the caller to
            select its own per-row state (cache, positions) with; None when no row stays.
        """
        for row, (i, done) in enumerate(zip(self.rows_of, finished)):
            if done:
                for name, buf in self.buffers.items():
                    self.outputs[name][i] = buf[row, :steps_done]
        keep = [row for row, done in enumerate(finished) if not done]
        if not keep:
            return None
        idx = torch.tensor(keep, device=next(iter(self.buffers.values())).device)
        self.rows_of = [self.rows_of[row] for row in keep]
        self.buffers = {name: buf[idx] for name, buf in self.buffers.items()}
        return idx


def row_guards(max_frames: int | Sequence[int], batch: int) -> tuple[int, list[int], set[int]]:
    """A decoding loop's length guards: one for every row, or one per row (an evaluation's
    guard is a multiple of each utterance's own reference length).

    Returns:
        the batch's guard (the largest), each row's (a negative one counts as 0), and the steps at which some row's own guard
        falls before the batch's: the loop stops those rows there, as it would stop them alone.
    """
    one_for_all = isinstance(max_frames, numbers.Integral)  # a numpy integer too
    limits = [max(0, int(max_frames))] * batch if one_for_all else [max(0, int(m)) for m in max_frames]
    if len(limits) != batch:
        raise ValueError(f"max_frames: {len(limits)} guards for a batch of {batch}")
    top = max(limits, default=0)
    return top, limits, set(limits) - {top}
