"""Properties of the dMel system: binning, causality, KV cache, overfitting, checkpoints, STT beam search."""

from __future__ import annotations

import json

import torch
from conftest import batch_and_each_row_alone, rel_error, tiny_batch

from meld.config import ModelConfig
from meld.generate import stt_beam_search
from meld.models.dmel import DMel, bin_centres, discretise, dmel_kwargs
from meld.training import build_optimizer, build_scheduler, load_checkpoint, save_checkpoint, train_step

TINY = dict(n_bins=16, lo=-3.0, hi=3.0, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0)


def tiny_dmel(reduction: int = 1, n_text: int = 20, seed: int = 0, **over):
    torch.manual_seed(seed)
    kwargs = {**TINY, **over, "n_text": n_text, "frame_dim": 80 * reduction}
    return DMel(**kwargs), kwargs


def test_discretise_then_decode_is_within_half_a_bin():
    lo, hi, n = -3.0, 3.0, 16
    x = torch.linspace(lo, hi, 1001)[None]
    err = (bin_centres(discretise(x, n, lo, hi), n, lo, hi) - x).abs()
    assert float(err.max()) <= (hi - lo) / n / 2 + 1e-6
    outside = discretise(torch.tensor([[-100.0, lo - 1e-3, hi + 1e-3, 100.0]]), n, lo, hi)
    assert outside.tolist() == [[0, 0, n - 1, n - 1]]


def test_tts_logits_are_causal_by_gradient():
    model, _ = tiny_dmel()
    model.eval()
    batch = tiny_batch(B=1, T=10)
    captured = {}
    model.frame_emb.register_forward_hook(lambda mod, inp, out: captured.setdefault("emb", out))
    out = model.forward_tts(batch["text"], batch["text_len"], batch["mel"], batch["mel_len"])
    emb = captured["emb"]  # (1, T, d) frame embeddings, in the graph
    for k in (1, 4, 8):
        for logit in (out.bin_logits[:, k], out.eos_logits[:, k]):
            (grad,) = torch.autograd.grad(logit.sum(), emb, retain_graph=True)
            assert grad[:, k:].abs().max() == 0, f"step {k} sees frames at or after {k}"
            assert grad[:, :k].abs().sum() > 0, f"step {k} ignores its past"


def test_kv_cached_generation_equals_full_pass():
    model, _ = tiny_dmel(reduction=2)
    with torch.no_grad():
        model.eos_head.bias.fill_(-20.0)  # nobody stops: every row makes max_frames frames
    batch = tiny_batch(reduction=2, B=3, T=6)
    prompt_len = torch.tensor([6, 2, 0])
    steps = []
    hook = model.bin_head.register_forward_hook(lambda mod, inp, out: steps.append(out))
    N = 4
    gen = model.generate(batch["text"], batch["text_len"], batch["mel"], prompt_len, max_frames=N, top_k=1)
    hook.remove()
    assert gen.hit_max_length == [True] * 3 and all(f.shape == (N, 160) for f in gen.frames)
    full_mel = torch.zeros(3, 6 + N, 160)
    for b in range(3):
        p = int(prompt_len[b])
        full_mel[b, :p] = batch["mel"][b, :p]
        full_mel[b, p : p + N] = gen.frames[b]
    with torch.no_grad():
        out = model.forward_tts(batch["text"], batch["text_len"], full_mel, prompt_len + N)
    for j in range(N):
        full = out.bin_logits[torch.arange(3), prompt_len + j].flatten(1)  # (3, C * n_bins)
        assert rel_error(steps[j], full) <= 1e-5, f"step {j}"
        # greedy choice = argmax of the full pass
        bins = model.discretise(gen.frames[0][j])
        assert torch.equal(bins, out.bin_logits[0, 6 + j].argmax(-1))


def test_stt_cache_equals_full_pass():
    model, _ = tiny_dmel()
    batch = tiny_batch(B=2, T=7, L=4)
    with torch.no_grad():
        full = model.forward_stt(batch["mel"], batch["mel_len"], batch["text"], batch["text_len"]).logits
        h, cache, pos = model.stt_prefix(batch["mel"], batch["mel_len"], max_new=4)
        inc = [model.text_head(h)]
        for i in range(3):  # both rows have >= 3 real text tokens
            h = model.stt_step(batch["text"][:, i] + model.vocab.text_offset, pos + i, cache)
            inc.append(model.text_head(h))
    assert rel_error(torch.stack(inc, 1), full[:, :4]) <= 1e-5


def test_stt_beam_search_returns_text_ids():
    model, _ = tiny_dmel(n_text=12)
    mels = [torch.randn(9, 80).numpy(), torch.randn(5, 80).numpy()]
    for beam in (1, 3):
        out = stt_beam_search(model, mels, reduction=1, beam_size=beam, max_tokens=6)
        assert len(out) == 2
        assert all(isinstance(t, int) and 0 <= t < 12 for ids in out for t in ids)
        assert all(len(ids) <= 6 for ids in out)


def test_tiny_dmel_overfits_a_fixed_batch():
    model, _ = tiny_dmel()
    batch = tiny_batch(B=2, T=8)
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.0)
    sched = build_scheduler(opt, warmup=1, hold=10_000, decay=0)
    first = last = None
    for _ in range(150):
        m = train_step(model, opt, sched, batch, task="tts", loss_weights={}, grad_clip=10.0)
        first = first or m
        last = m
    assert last["loss/ce_channels"] < first["loss/ce_channels"] / 5
    assert last["loss/eos"] < first["loss/eos"] / 5
    model.train()  # SpecAugment on the STT rows
    stt = model.compute_losses(batch, "stt", generator=torch.Generator().manual_seed(0))
    assert set(stt) == {"loss/stt_ce"} and torch.isfinite(stt["loss/stt_ce"])
    joint = model.compute_losses(tiny_batch(B=4, T=8), "joint")
    assert set(joint) == {"loss/ce_channels", "loss/eos", "loss/stt_ce"}


def test_checkpoint_round_trip_rebuilds_from_kwargs(tmp_path):
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=4, d_ff=64, dropout=0.0, reduction_factor=2)
    kwargs = dmel_kwargs(cfg, n_text=20, n_bins=8, lo=-2.0, hi=2.0)
    json.dumps(kwargs)  # JSON-able
    torch.manual_seed(0)
    model = DMel(**kwargs).eval()
    save_checkpoint(tmp_path / "step-1.pt", system=DMel.system, model=model, model_kwargs=kwargs, step=1)
    state = load_checkpoint(tmp_path / "step-1.pt")
    assert state["system"] == "dmel"
    rebuilt = DMel(**state["model_kwargs"])
    rebuilt.load_state_dict(state["model"])
    rebuilt.eval()
    batch = tiny_batch(reduction=2, B=2, T=5)
    a = model.compute_losses(batch)
    b = rebuilt.compute_losses(batch)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_frames_holding_nan_are_refused_naming_their_row():
    """NaN frames have no bin: their indices fell outside the embedding table (an obscure index error,
    a device-side assert on a GPU). Generation and STT refuse them first, naming the row, padding included."""
    import pytest

    model, _ = tiny_dmel()
    batch = tiny_batch(B=2, T=5)  # row 1 has 2 real frames
    for frame in (1, 4):  # a real frame, then padding
        bad = batch["mel"].clone()
        bad[1, frame, 3] = float("nan")
        with pytest.raises(ValueError, match=r"DMel.generate: prompt: row\(s\) \[1\] .*NaN or infinite"):
            model.generate(batch["text"], batch["text_len"], bad, batch["mel_len"], max_frames=2)
        with pytest.raises(ValueError, match=r"DMel.stt_prefix: mel: row\(s\) \[1\] .*NaN or infinite"):
            model.stt_prefix(bad, batch["mel_len"], max_new=2)


def test_a_bin_range_with_an_infinite_end_is_refused():
    """An infinite end makes every bin infinitely wide: all values would fall in one bin, silently."""
    import pytest

    for lo, hi in ((-3.0, float("inf")), (float("-inf"), 3.0), (3.0, -3.0), (0.0, float("nan"))):
        with pytest.raises(ValueError, match="finite lo < hi"):
            tiny_dmel(lo=lo, hi=hi)


def test_a_batch_of_different_prompts_stops_each_row_where_it_stops_alone():
    """Prompts of different lengths (one empty), each row ended by the <EOS> head at its own step (greedy
    bins and stops): every row gets exactly what it gets decoded alone."""
    model, _ = tiny_dmel(seed=0)
    with torch.no_grad():  # a sharp <EOS> head that fires after a few steps, at a different one per row
        model.eos_head.weight.mul_(8.0)
        model.eos_head.bias.fill_(-3.0)
    batch = tiny_batch(B=3, T=7, seed=0)
    prompt_len = torch.tensor([7, 3, 0])
    together, alone = batch_and_each_row_alone(model, batch, prompt_len, max_frames=12, top_k=1)
    for i, one in enumerate(alone):
        assert torch.equal(together.frames[i], one.frames[0]), f"row {i}"


def test_lengths_that_do_not_fit_their_tensors_are_refused():
    """A prompt length past the prompt tensor was an IndexError deep in the backbone's prefill, a negative
    one silently continued from a text token's hidden state, and a frame length past the STT input read
    its padding as speech. Each is refused before decoding, naming the input and the row."""
    import pytest

    model, _ = tiny_dmel()
    batch = tiny_batch(B=2, T=4, L=5)
    for name, text_len, prompt_len, row in (("prompt_len", [5, 4], [4, 5], 1), ("prompt_len", [5, 4], [-1, 2], 0),
                                            ("text_len", [6, 4], [4, 2], 0)):
        with pytest.raises(ValueError, match=rf"DMel.generate: {name}\[{row}\] = -?\d+ is outside \[0, \d+\]"):
            model.generate(batch["text"], torch.tensor(text_len), batch["mel"], torch.tensor(prompt_len), max_frames=2)
    with pytest.raises(ValueError, match=r"DMel.stt_prefix: mel_len\[0\] = 9 is outside \[0, 4\]"):
        model.stt_prefix(batch["mel"], torch.tensor([9, 2]), max_new=2)
