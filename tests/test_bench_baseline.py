"""bench.generation's full-recompute baseline decodes what the KV-cached path decodes.

The KV-vs-full ratio of issue 6 is only meaningful if the two paths do the same work: same sampling
draws, same early exit, same frames. Checked on a random tiny MELD, with padding (a batch of
different text and prompt lengths: the masked attention) and without (batch 1: the causal kernel the
baseline takes when nothing is padded). And the peak memory an extrapolated row reports is a real
generation's, not its measuring runs' own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_cached_attention_is_masked_softmax_attention_over_the_cache(cache_dtype):
    """The attention a decoding step runs (and bench.generation_ratios times alone): the new key and
    value are stored first, padded keys get no weight, and the output is in the queries' dtype."""
    from meld.models.backbone import Backbone, cached_attention

    B, H, Dh, S = 3, 2, 8, 5
    g = torch.Generator().manual_seed(0)
    cache = Backbone(d_model=H * Dh, n_layers=2, n_heads=H, d_ff=32, dropout=0.0).new_cache(B, S + 1, dtype=cache_dtype)
    cache.kv[:, :, :, :, :S] = torch.randn(2, 2, B, H, S, Dh, generator=g).to(cache_dtype)
    cache.length = S
    cache.key_valid[:, : S + 1] = True
    cache.key_valid[1, :2] = False  # row 1's first two keys are padding
    cache.all_valid = False
    mask = Backbone.attention_mask(1, None, cache)
    qkv = torch.randn(B, 1, 3, H, Dh, generator=g).permute(2, 0, 3, 1, 4)  # the QKV projection's layout
    y = cached_attention(qkv, mask, cache, layer=1)
    assert y.dtype == torch.float32 and y.shape == (B, H, 1, Dh)
    torch.testing.assert_close(cache.kv[1, :, :, :, S], qkv[1:, :, :, 0].to(cache_dtype))
    k, v = cache.kv[1, :, :, :, : S + 1].float()
    q = qkv[0].to(cache_dtype).float()  # a bf16 cache attends with bf16 queries
    scores = (q @ k.transpose(-1, -2)) / Dh**0.5
    expected = scores.masked_fill(~cache.key_valid[:, None, None, : S + 1], float("-inf")).softmax(-1) @ v
    tol = 1e-5 if cache_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)
    assert torch.equal(cache.kv[0, :, :, :, S], torch.zeros_like(cache.kv[0, :, :, :, S]))  # only its own layer


def test_attention_alone_times_every_layers_call_and_counts_the_bytes_it_reads():
    from bench.generation_ratios import attention_alone

    model, kwargs = tiny_meld()
    model.eval()
    b = tiny_batch(B=3, T=8, L=5)
    inputs = (b["text"], b["text_len"], b["mel"], b["mel_len"])
    frames = 4
    per_dtype = {dt: attention_alone(model, inputs, dt, frames=frames) for dt in (torch.float32, torch.bfloat16)}
    n_layers, d_model = kwargs["n_layers"], kwargs["d_model"]
    for out in per_dtype.values():
        assert out["calls"] == frames * n_layers
        assert out["us_per_call"] > 0
    # (keys + values) x rows x d_model x bytes x mean keys: the bf16 cache reads half the fp32 one
    assert per_dtype[torch.bfloat16]["bytes_per_call"] * 2 == per_dtype[torch.float32]["bytes_per_call"]
    mean_keys = per_dtype[torch.float32]["bytes_per_call"] / (2 * 3 * d_model * 4)
    assert mean_keys > (frames + 1) / 2  # the prompt's positions count too
    prompt_positions = model.tts_prompt(*inputs, test_time_dropout=False)[1].shape[1]
    assert mean_keys == prompt_positions + (frames + 1) / 2


PEAK_RUNNER = """
import json, sys
import torch
from bench import generation as G

KW = dict(n_text=64, codebook_size=64, d_model=256, n_layers=2, n_heads=4, d_ff=1024, dropout=0.0, frame_dim=160,
          encoder_hidden=256, encoder_dropout=0.0, postnet_channels=32, postnet_kernel=5, postnet_layers=2,
          postnet_dropout=0.0, recon_hidden=256, q_temperature=1.0)

def build(config):
    torch.manual_seed(0)
    return G.no_eos_meld(KW, torch.randn(64, 160)), KW

def inputs(batch, extra_prompt=0):  # as G.inputs: extra_prompt lengthens every prompt by that many frames
    g = torch.Generator().manual_seed(0)
    P = 50 + extra_prompt
    return (torch.randint(0, 64, (batch, 20), generator=g), torch.randint(10, 21, (batch,), generator=g),
            torch.randn(batch, P, 160, generator=g), torch.full((batch,), P))

G.build, G.inputs = build, inputs
torch.set_num_threads(1)
res = G.cell_gen("toy", "kv", 16, 400, sys.argv[1], 4, 1)
print("RESULT " + json.dumps(res))
"""


def test_an_extrapolated_rows_peak_memory_is_a_real_generations():
    """bench.generation times the paper rows' late steps with a prompt already `frames` longer, run in
    through one prefill: that prefill's activations are no part of a real generation, whose prompt is
    3 s. The peak once counted them (paper KV batch 16: 1,158 MB against 798 MB for a real 313-frame run;
    this toy: 3-4x). Each row runs in a fresh process, as the bench's cells do."""
    root = Path(__file__).resolve().parent.parent
    rows = {}
    for mode in ("measured", "extrapolated"):
        proc = subprocess.run([sys.executable, "-c", PEAK_RUNNER, mode], cwd=root, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[mode] = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    real, extrapolated = rows["measured"], rows["extrapolated"]
    assert real["kv_cache_mb"] == extrapolated["kv_cache_mb"] > 20
    # a real run ends holding its whole cache: so must the estimate, and not a long prefill besides
    assert real["peak_rss_delta_mb"] >= real["kv_cache_mb"]
    assert extrapolated["kv_cache_mb"] <= extrapolated["peak_rss_delta_mb"] <= 1.25 * real["peak_rss_delta_mb"]
