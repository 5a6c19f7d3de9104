"""bench.generation's full-recompute baseline decodes what the KV-cached path decodes.

The KV-vs-full ratio of issue 6 is only meaningful if the two paths do the same work: same sampling
draws, same early exit, same frames. Checked on a random tiny MELD, with padding (a batch of
different text and prompt lengths: the masked attention) and without (batch 1: the causal kernel the
baseline takes when nothing is padded).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_meld

from bench.generation import generate_full_recompute

SAMPLING = dict(temperature=1.0, top_k=5, top_p=1.0, repetition_penalty_value=1.2)


@pytest.mark.parametrize("batch", [1, 3])
def test_full_recompute_decodes_the_kv_paths_codes_and_frames(batch):
    model, _ = tiny_meld()
    model.eval()
    b = tiny_batch(B=batch, T=8, L=5)
    prompt_len = b["mel_len"].clamp_max(6)
    prompt = b["mel"][:, : int(prompt_len.max())]
    if batch > 1:
        assert len(set(prompt_len.tolist())) > 1 and len(set(b["text_len"].tolist())) > 1  # padded rows
    args = (b["text"], b["text_len"], prompt, prompt_len)
    kv = model.generate(*args, max_frames=12, test_time_dropout=False,
                        generator=torch.Generator().manual_seed(7), **SAMPLING)
    full = generate_full_recompute(model, *args, max_frames=12, test_time_dropout=False,
                                   generator=torch.Generator().manual_seed(7), **SAMPLING)
    assert full.codes == kv.codes
    assert full.hit_max_length == kv.hit_max_length
    assert sum(len(c) for c in kv.codes) > 0
    for a, f in zip(kv.frames, full.frames):
        assert a.shape == f.shape
        torch.testing.assert_close(f, a, rtol=1e-4, atol=1e-4)
