"""The fixed-shape decoding step and its torch.compile'd form (backbone.configure_decoding).

The compiled step exists for GPUs (CUDA graphs), which CI lacks; here it is compiled for the CPU
by inductor, the same compiler, and must decode what the sliced eager step decodes.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_error, tiny_batch, tiny_meld

from meld.config import ConfigError, EvaluateConfig
from meld.generate import stt_beam_search
from meld.models.backbone import (
    FIXED_SHAPE_LENGTH_STEP,
    Backbone,
    configure_decoding,
    decoding_compile_seconds,
)
from meld.models.vocab import EOS


def _decode(bb: Backbone, x: torch.Tensor, valid: torch.Tensor, last: torch.Tensor, plan: dict[int, list[int]]):
    """Prefill the prompt, then step through x's remaining positions; before step t keep the rows
    ``plan[t]`` (indices into the rows alive then: fewer, reordered or repeated). Returns each
    step's hidden states and the cache."""
    P = valid.shape[1]
    rows = torch.arange(x.shape[0])
    with torch.no_grad():
        h, cache, pos = bb.prefill(x[:, :P], valid, last, x.shape[1] - P)
        outs = [h]
        for t in range(P, x.shape[1]):
            if t in plan:
                keep = torch.tensor(plan[t])
                cache.select(keep)
                rows, pos = rows[keep], pos[keep]
            outs.append(bb.step(x[rows, t], pos, cache))
            pos = pos + 1
    return outs, cache


def test_fixed_shape_step_decodes_what_the_sliced_step_does_through_shrinking_and_growing_batches():
    torch.manual_seed(0)
    bb = Backbone(d_model=32, n_layers=3, n_heads=4, d_ff=64, dropout=0.0).eval()
    B, P, N = 3, 7, 8
    x = torch.randn(B, P + N, 32)
    valid = torch.ones(B, P, dtype=torch.bool)
    valid[2, 4:] = False  # a right-padded prompt: the masked path
    last = torch.tensor([P - 1, P - 1, 3])
    plan = {P + 2: [2, 0], P + 4: [1, 1, 0, 0]}  # a row leaves and the rest reorder; then a beam-like repeat
    sliced, _ = _decode(bb, x, valid, last, plan)
    configure_decoding(bb, fixed_shape=True)
    fixed, cache = _decode(bb, x, valid, last, plan)
    assert len(fixed) == len(sliced) == N + 1
    for a, b in zip(fixed, sliced):
        assert a.shape == b.shape and rel_error(a, b) <= 1e-5
    assert cache.fixed_shape and cache.max_len % FIXED_SHAPE_LENGTH_STEP == 0 and cache.max_len >= P + N
    assert cache.kv.shape[2] == 4 and cache.batch_size == 4  # grown once, for the repeat

    # a shrinking select keeps the storage (what a compiled step and a CUDA graph are recorded on)
    h, cache, pos = bb.prefill(x[:, :P], valid, last, N)
    ptr = cache.kv.data_ptr()
    cache.select(torch.tensor([1, 0]))
    assert cache.kv.data_ptr() == ptr and cache.kv.shape[2] == B and cache.batch_size == 2
    configure_decoding(bb)
    assert bb.new_cache(2, 10).max_len == 10 and not bb.new_cache(2, 10).fixed_shape  # back to the default


def test_fixed_shape_beam_search_equals_the_sliced_one():
    model, _ = tiny_meld(reduction=2)
    model.eval()
    batch = tiny_batch(reduction=2, B=4, T=9)
    mels = [batch["mel"][b, : int(batch["mel_len"][b])].reshape(-1, 80).numpy() for b in range(4)]
    sliced = stt_beam_search(model, mels, reduction=2, beam_size=3, max_tokens=30, batch_size=4)
    configure_decoding(model, fixed_shape=True)
    assert stt_beam_search(model, mels, reduction=2, beam_size=3, max_tokens=30, batch_size=4) == sliced


def _generate(model, batch, seed):
    torch.manual_seed(seed)  # test-time dropout draws from the global generator
    return model.generate(batch["text"], batch["text_len"], batch["mel"], batch["mel_len"], max_frames=30,
                          generator=torch.Generator().manual_seed(seed), temperature=1.0, top_k=5)


def test_compiled_decoding_generates_what_eager_decoding_does_and_compiles_once():
    from torch._dynamo.utils import counters

    model, _ = tiny_meld(reduction=2)
    with torch.no_grad():
        model.head.bias[EOS] += 0.6  # an untrained model rarely stops: make rows leave the batch at different steps
    batch = tiny_batch(reduction=2, B=4, T=6)
    eager = [_generate(model, batch, seed) for seed in (0, 1)]
    lengths = [len(c) for g in eager for c in g.codes]
    assert len(set(lengths)) > 2 and 30 in lengths, "rows must finish at different steps, one at the guard"
    torch._dynamo.reset()
    counters.clear()
    assert decoding_compile_seconds(model) == 0.0  # eager decoding compiles nothing
    configure_decoding(model, compile=True)  # inductor, as on a GPU (there with CUDA graphs)
    compiled = [_generate(model, batch, seed) for seed in (0, 1)]
    # the first call of the one shape is timed apart as compile time (an evaluation's RTF leaves it
    # out); a later generation of the same shape adds none
    compiling = decoding_compile_seconds(model)
    assert compiling > 0.0
    _generate(model, batch, 2)
    assert decoding_compile_seconds(model) == compiling
    for e, c in zip(eager, compiled):
        assert c.codes == e.codes and c.hit_max_length == e.hit_max_length
        for a, b in zip(c.frames, e.frames):
            assert a.shape == b.shape and (a.numel() == 0 or rel_error(a, b) <= 1e-5)
    # one graph for every step of both generations, whatever rows had left: no re-specialising
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    configure_decoding(model)
    assert decoding_compile_seconds(model) == 0.0  # counted per setting
    torch._dynamo.reset()


def test_the_compiled_step_takes_more_shapes_than_torchs_default_limit():
    """An evaluation meets many (batch, length) shapes; with fullgraph=True torch's default limit of 8
    compiles per function ends the 9th in a hard error. Twelve batch sizes must all decode, each as
    the eager fixed-shape step does."""
    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    try:
        bb = Backbone(16, 1, 2, 32, 0.0).eval()
        configure_decoding(bb, compile=True, backend="eager")  # dynamo's tracing and guards, no codegen
        assert torch._dynamo.config.recompile_limit >= 12
        for B in range(1, 13):
            emb, pos = torch.randn(B, 16), torch.zeros(B, dtype=torch.long)
            outs = []
            for compiled in (True, False):
                configure_decoding(bb, compile=compiled, fixed_shape=True, backend="eager")
                cache = bb.new_cache(B, 10)
                cache.key_valid[:, :1], cache.length = True, 1
                with torch.no_grad():
                    outs.append(bb.step(emb, pos, cache))
            torch.testing.assert_close(outs[0], outs[1])
    finally:
        configure_decoding(bb)
        torch._dynamo.config.recompile_limit = limit
        torch._dynamo.reset()


def test_compile_decoding_param_is_checked():
    assert EvaluateConfig.from_dict({"compile_decoding": True}, "evaluate").compile_decoding is True
    with pytest.raises(ConfigError, match="evaluate.compile_decoding"):
        EvaluateConfig.from_dict({"compile_decoding": "yes"}, "evaluate")
    with pytest.raises(ValueError, match="has no Backbone"):
        configure_decoding(torch.nn.Linear(2, 2), compile=True)


def test_a_fixed_shape_cache_reuses_the_last_calls_tensors_only_once_that_cache_is_gone():
    """A CUDA graph is recorded on its inputs' addresses: a new cache per generation call would have
    every batch recorded again. The store hands the same tensors back, zeroed, never to two live caches."""
    torch.manual_seed(0)
    bb = Backbone(d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0).eval()
    configure_decoding(bb, fixed_shape=True)
    x, valid, last = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool), torch.tensor([4, 4])
    with torch.no_grad():
        _, first, _ = bb.prefill(x, valid, last, 4)
        _, second, _ = bb.prefill(x, valid, last, 4)  # the first is alive: its tensors are not shared
        assert second.kv.data_ptr() != first.kv.data_ptr()
        ptr = second.kv.data_ptr()
        fresh = bb.step(torch.randn(2, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([5, 5]), second)
        second.kv.fill_(float("nan"))  # stale contents must not reach the next call (NaN x 0 weight is NaN)
        del first, second
        _, third, _ = bb.prefill(x, valid, last, 4)
        assert third.kv.data_ptr() == ptr  # the latest slot of that shape: the second cache's
        again = bb.step(torch.randn(2, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([5, 5]), third)
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)
    configure_decoding(bb)
    assert len(bb._cache_store) == 0  # a new setting drops the kept tensors


def test_a_grown_beam_cache_is_reused_by_the_next_search_and_few_shapes_are_kept():
    model, _ = tiny_meld(reduction=2)
    model.eval()
    batch = tiny_batch(reduction=2, B=2, T=9)
    mels = [batch["mel"][b, : int(batch["mel_len"][b])].reshape(-1, 80).numpy() for b in range(2)]
    configure_decoding(model, fixed_shape=True)
    bb = model.backbone
    first = stt_beam_search(model, mels, reduction=2, beam_size=3, max_tokens=12, batch_size=2)
    kept = {slot[0].data_ptr() for slot in bb._cache_store._slots.values()}
    assert any(key[0][2] == 6 for key in bb._cache_store._slots), "the grown (2 x 3 beams) cache is kept"
    assert stt_beam_search(model, mels, reduction=2, beam_size=3, max_tokens=12, batch_size=2) == first
    assert {slot[0].data_ptr() for slot in bb._cache_store._slots.values()} == kept  # nothing new allocated
    with torch.no_grad():
        for B in range(1, 8):
            bb.new_cache(B, 10)
    assert len(bb._cache_store) == bb._cache_store.keep
    configure_decoding(model)


def test_the_cache_store_serves_inference_mode_and_no_grad_calls_and_is_not_copied():
    import copy
    import pickle

    bb = Backbone(d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0).eval()
    configure_decoding(bb, fixed_shape=True)
    with torch.inference_mode():
        bb.new_cache(2, 10)
    with torch.no_grad():  # an inference tensor cannot be zeroed here: this mode gets its own
        cache = bb.new_cache(2, 10)
        cache.kv.add_(1.0)
    assert not cache.kv.is_inference() and len(bb._cache_store) == 2
    assert len(copy.deepcopy(bb)._cache_store) == 0 and len(pickle.loads(pickle.dumps(bb))._cache_store) == 0
    configure_decoding(bb)


def test_an_evaluations_rtf_leaves_the_compile_out():
    """With evaluate.compile_decoding the first batch of each shape compiles (seconds on a CPU, more
    than the decoding itself at the mini corpus's size), and the RTF was that compile over a few
    seconds of speech. The evaluation's decoding reports the compile apart; its RTF leaves it out."""
    import numpy as np

    from meld.generate import tts_continue
    from pipeline.evaluate import IN_PROCESS, summarise

    model, _ = tiny_meld()
    model.eval()
    rng = np.random.default_rng(0)
    items = {"texts": [[1, 2, 3], [4, 5]], "prompts": [rng.standard_normal((6, 80)).astype(np.float32)] * 2,
             "max_frames": [12, 12]}
    options = {"reduction": 1, "temperature": 1.0, "top_k": 5, "top_p": 1.0, "repetition_penalty": 1.0}
    torch._dynamo.reset()
    configure_decoding(model, compile=True)
    try:
        _, first_s, first_compile_s = IN_PROCESS.generate(tts_continue, model, items, batch_size=2, **options)
        _, again_s, again_compile_s = IN_PROCESS.generate(tts_continue, model, items, batch_size=2, **options)
    finally:
        configure_decoding(model)
        torch._dynamo.reset()
    assert 0.0 < first_compile_s < first_s and again_compile_s == 0.0  # the same shape compiles once
    rows = [{"id": "u", "generated_seconds": 2.0, "true_continuation_seconds": 2.0, "duration_ratio": 1.0,
             "longest_silence_s": 0.0, "gt_longest_silence_s": 0.0, "hit_max_length": False}]
    summary = summarise(rows, first_s, 2.0, first_compile_s)
    assert summary["decode_compile_s"] == first_compile_s
    assert summary["rtf"] == pytest.approx((first_s - first_compile_s) / 2.0)
