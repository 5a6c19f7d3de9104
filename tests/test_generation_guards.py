"""Per-utterance length guards: every TTS system's batched generation stops each utterance at its
own guard, so what an utterance gets does not depend on which utterances share its batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ScheduledStop, tiny_batch, tiny_meld
from test_dmel import tiny_dmel
from test_mel_lm import tiny_mel_lm
from test_melle import tiny_melle

from meld.generate import tts_continue
from meld.models.vocab import EOS

REDUCTION = 2


def _never_stopping(system: str):
    """A tiny model of ``system`` whose stop decision never fires: only the guards end an utterance."""
    build = {"meld": tiny_meld, "mel_lm": tiny_mel_lm, "melle": tiny_melle, "dmel": tiny_dmel}[system]
    model, _ = build(reduction=REDUCTION)
    with torch.no_grad():
        if system == "meld":
            model.head.bias[EOS] = -1e4
        elif system == "dmel":
            model.eos_head.bias.fill_(-1e4)
        else:
            model.stop_head.bias.fill_(-1e4)
    return model.eval()


@pytest.mark.parametrize("system", ["meld", "mel_lm", "melle", "dmel"])
def test_each_utterance_stops_at_its_own_guard_whatever_its_batch(system):
    model = _never_stopping(system)
    rng = np.random.default_rng(0)
    texts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    prompts = [rng.standard_normal((n, 80)).astype(np.float32) for n in (4, 6, 2)]
    guards = [9, 40, 0]  # 80-dim frames; 9 is not a whole number of r=2 groups
    # deterministic decoding (greedy codes and bins, MELLE's latent mean, no dropout): nothing but
    # the batch can make the runs differ
    runs = {
        batch_size: tts_continue(model, texts, prompts, reduction=REDUCTION, max_frames=guards, temperature=1.0,
                                 top_k=1, top_p=1.0, repetition_penalty=1.0, test_time_dropout=False,
                                 zero_latent=system == "melle", batch_size=batch_size)
        for batch_size in (1, 3)
    }
    for alone, together in zip(runs[1], runs[3]):
        np.testing.assert_allclose(together.frames, alone.frames, rtol=0, atol=1e-5)
        assert together.codes == alone.codes
    assert [c.frames.shape[0] for c in runs[3]] == guards  # each its own guard, to the 80-dim frame
    assert [c.hit_max_length for c in runs[3]] == [True, True, True]
    if system == "meld":
        assert [len(c.codes) for c in runs[3]] == [5, 20, 0]  # grouped frames: ceil(guard / r)



@pytest.mark.parametrize("system", ["mel_lm", "melle", "dmel"])
def test_an_own_guard_after_the_longest_guarded_row_has_stopped(system):
    """The row with the batch's longest guard says stop first; a later step is another row's own
    guard. That row stops there, and the loop ends with no row left (dMel used to assume the
    longest-guarded row was still in the batch and crashed)."""
    build = {"mel_lm": tiny_mel_lm, "melle": tiny_melle, "dmel": tiny_dmel}[system]
    model, _ = build()
    stop = ScheduledStop({1})  # the batch's first row (guard 10) stops at its second step
    if system == "dmel":
        model.eos_head = stop
    else:
        model.stop_head = stop
    model.eval()
    b = tiny_batch(B=2, T=4)
    out = model.generate(b["text"], b["text_len"], b["mel"], b["mel_len"], max_frames=[10, 3], top_k=1,
                         zero_latent=system == "melle")
    assert [f.shape[0] for f in out.frames] == [1, 3]
    assert out.hit_max_length == [False, True]


def test_each_codec_continuation_stops_at_its_own_guard_whatever_its_batch():
    from test_codec_lm import K, N, tiny_codec_lm

    from meld.codes import continue_codes

    model, _ = tiny_codec_lm()
    with torch.no_grad():  # no head ever says <EOS> (class N of each level): only the guards end it
        model.head.bias.view(K, N + 1)[:, N] = -1e4
    model.eval()
    rng = np.random.default_rng(0)
    texts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    prompts = [rng.integers(0, N, (n, K)) for n in (3, 5, 0)]
    guards = [4, 11, 1]
    runs = {
        batch_size: continue_codes(model, texts, prompts, max_frames=guards, temperature=1.0, top_k=1, top_p=1.0,
                                   batch_size=batch_size)
        for batch_size in (1, 3)
    }
    for alone, together in zip(runs[1], runs[3]):
        np.testing.assert_array_equal(together.codes, alone.codes)
    assert [c.codes.shape for c in runs[3]] == [(g, K) for g in guards]
    assert [c.hit_max_length for c in runs[3]] == [True, True, True]
