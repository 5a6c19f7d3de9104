"""Properties of the Codec-LM system and the DAC codec: delay pattern, causality, KV cache, EOS, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import rel_error

from meld.config import ModelConfig
from meld.models.codec_lm import (
    DAC_FRAME_RATE,
    CodecLM,
    DACCodec,
    codec_lm_kwargs,
    delay_codes,
    undelay_codes,
)
from meld.training import build_optimizer, load_checkpoint, save_checkpoint

K, N = 4, 16  # tiny: 4 levels of 16 codes (the real system: 12 of 1024)
TINY = dict(n_levels=K, codebook_size=N, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0)


def tiny_codec_lm(n_text: int = 20, seed: int = 0, **over):
    torch.manual_seed(seed)
    kwargs = {**TINY, **over, "n_text": n_text}
    return CodecLM(**kwargs), kwargs


def code_batch(B: int = 3, T: int = 7, L: int = 5, seed: int = 1, n_text: int = 20):
    g = torch.Generator().manual_seed(seed)
    return {
        "codes": torch.randint(0, N, (B, T, K), generator=g),
        "codes_len": torch.tensor([T, T - 2, 2])[:B],
        "text": torch.randint(0, n_text, (B, L), generator=g),
        "text_len": torch.tensor([L, L - 1, 2])[:B],
    }


def test_delay_then_undelay_is_identity():
    batch = code_batch()
    codes, lens = batch["codes"], batch["codes_len"]
    delayed = delay_codes(codes, lens, eos=N, empty=N + 1)  # (B, T+K, K)
    T = codes.shape[1]
    assert delayed.shape == (3, T + K, K)
    back = undelay_codes(delayed, T)
    for b in range(3):
        n = int(lens[b])
        assert torch.equal(back[b, :n], codes[b, :n])
        assert (back[b, n:] == N).all()  # past the end: <EOS>
    for k in range(K):  # level k starts k steps late and ends with <EOS> at step len + k
        assert (delayed[:, :k, k] == N + 1).all()
        assert torch.equal(delayed[0, k : k + T, k], codes[0, :, k])
        assert int(delayed[1, int(lens[1]) + k, k]) == N


def test_logits_are_causal_by_gradient():
    model, _ = tiny_codec_lm()
    model.eval()
    batch = code_batch(B=1)
    captured = {}
    model.level_emb.register_forward_hook(lambda mod, inp, out: captured.setdefault("emb", out))
    out = model.forward_tts(batch["text"], batch["text_len"], batch["codes"], batch["codes_len"])
    emb = captured["emb"]  # (1, T+K-1, d) delayed inputs D_0 .. D_{T+K-2}
    for s in (1, 3, 8):
        (grad,) = torch.autograd.grad(out.logits[:, s].sum(), emb, retain_graph=True)
        assert grad[:, s:].abs().max() == 0, f"step {s} sees delayed steps at or after {s}"
        assert grad[:, :s].abs().sum() > 0


def test_kv_cached_generation_equals_full_pass():
    model, _ = tiny_codec_lm()
    with torch.no_grad():  # no <EOS> anywhere: every row runs to the guard
        model.head.bias.view(K, N + 1)[:, N] = -1e4
    batch = code_batch()
    prompt_len = torch.tensor([7, 3, 0])
    steps = []
    hook = model.head.register_forward_hook(lambda mod, inp, out: steps.append(out))
    M = 3
    gen = model.generate(batch["text"], batch["text_len"], batch["codes"], prompt_len, max_frames=M, top_k=1)
    hook.remove()
    assert gen.hit_max_length == [True] * 3
    assert all(f.shape == (M, K) and f.dtype == torch.long for f in gen.frames)
    assert len(steps) == M + K - 1  # the delay pattern's tail: K - 1 steps after the last level-0 code
    full = torch.zeros(3, 7 + M, K, dtype=torch.long)
    for b in range(3):
        p = int(prompt_len[b])
        full[b, :p] = batch["codes"][b, :p]
        full[b, p : p + M] = gen.frames[b]
    with torch.no_grad():
        out = model.forward_tts(batch["text"], batch["text_len"], full, prompt_len + M)
    for g, step in enumerate(steps):
        ref = out.logits[torch.arange(3), prompt_len + g].flatten(1)  # (3, K * (N+1))
        assert rel_error(step, ref) <= 1e-5, f"step {g}"


def test_eos_in_any_head_stops_and_the_tail_is_finished(monkeypatch):
    model, _ = tiny_codec_lm()
    batch = code_batch(B=2)
    calls = {"n": 0}

    def fake_logits(h):  # always code 3, except level 2 says <EOS> at generation step 5
        out = torch.full((h.shape[0], K, N + 1), -10.0)
        out[..., 3] = 10.0
        if calls["n"] == 5:
            out[:, 2, N] = 100.0
        calls["n"] += 1
        return out

    monkeypatch.setattr(model, "_logits", fake_logits)
    prompt_len = torch.tensor([4, 0])
    gen = model.generate(batch["text"], batch["text_len"], batch["codes"], prompt_len, max_frames=20, top_k=1)
    # at step 5 level 2 speaks for frame P + 5 - 2: the utterance ends there, 3 frames generated
    assert gen.hit_max_length == [False, False]
    for frames in gen.frames:
        assert frames.shape == (3, K) and (frames == 3).all()
    assert calls["n"] == 3 + K - 1  # the higher levels finished frames 0..2, then it stopped


def test_tiny_codec_lm_overfits_a_fixed_batch():
    model, _ = tiny_codec_lm()
    batch = code_batch(B=2)
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(150):
        loss = model.compute_losses(batch)["loss/ce_codes"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or float(loss.detach())
    assert float(loss.detach()) < first / 10
    with pytest.raises(ValueError):
        model.compute_losses(batch, "stt")


def test_checkpoint_round_trip_rebuilds_from_kwargs(tmp_path):
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=4, d_ff=64, dropout=0.0)
    kwargs = codec_lm_kwargs(cfg, n_text=20, n_levels=K, codebook_size=N)
    json.dumps(kwargs)
    torch.manual_seed(0)
    model = CodecLM(**kwargs).eval()
    save_checkpoint(tmp_path / "step-1.pt", system=CodecLM.system, model=model, model_kwargs=kwargs, step=1)
    state = load_checkpoint(tmp_path / "step-1.pt")
    assert state["system"] == "codec_lm"
    rebuilt = CodecLM(**state["model_kwargs"])
    rebuilt.load_state_dict(state["model"])
    rebuilt.eval()
    batch = code_batch()
    assert torch.equal(
        model.compute_losses(batch)["loss/ce_codes"], rebuilt.compute_losses(batch)["loss/ce_codes"]
    )


TINY_DAC = dict(encoder_dim=4, decoder_dim=32, n_codebooks=12, codebook_size=1024, codebook_dim=8)


def test_random_dac_encode_decode_shapes_and_weight_loading(tmp_path):
    torch.manual_seed(0)
    codec = DACCodec(**TINY_DAC).eval()  # DAC's 16 kHz strides, narrow channels
    assert codec.hop_length == 320 and codec.frame_rate == DAC_FRAME_RATE == 50.0
    wav = 0.1 * torch.randn(8000)  # 0.5 s at 16 kHz
    codes = codec.encode(wav)
    assert codes.shape == (25, 12) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 1024
    audio = codec.decode(codes)
    assert audio.ndim == 1 and abs(audio.shape[0] - 25 * 320) < 320 and audio.abs().max() <= 1.0
    # parameter layout of descript-audio-codec, so its released weights load
    names = set(codec.state_dict())
    for name in (
        "encoder.block.0.weight_g",
        "encoder.block.1.block.0.block.1.weight_v",
        "quantizer.quantizers.11.codebook.weight",
        "quantizer.quantizers.0.in_proj.weight_g",
        "decoder.model.1.block.1.weight_v",
        "decoder.model.5.alpha",
    ):
        assert name in names, name
    # DAC's file format: {"state_dict", "metadata": {"kwargs"}}; the architecture comes from the metadata
    torch.save(
        {"state_dict": codec.state_dict(), "metadata": {"kwargs": {**TINY_DAC, "sample_rate": 16000}}},
        tmp_path / "weights.pth",
    )
    loaded = DACCodec.load(tmp_path / "weights.pth")
    assert torch.equal(loaded.encode(wav), codes)



def test_code_continuation_decodes_over_the_cache_dtype_it_is_given(monkeypatch):
    """`evaluate.kv_cache_dtype` reaches Codec-LM's cache through `continue_codes` (it used to be
    dropped there, so a bf16 evaluation of a codec system decoded in fp32), and a bad name is refused."""
    import numpy as np

    from meld.codes import continue_codes

    model, _ = tiny_codec_lm()
    model.eval()
    seen = []
    prefill = model.backbone.prefill

    def recording_prefill(*args, **kwargs):
        h, cache, pos = prefill(*args, **kwargs)
        seen.append(cache.kv.dtype)
        return h, cache, pos

    monkeypatch.setattr(model.backbone, "prefill", recording_prefill)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, N, (n, K)) for n in (3, 0)]
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        seen.clear()
        out = continue_codes(model, [[1, 2, 3], [4, 5]], prompts, max_frames=3, temperature=1.0, top_k=1,
                             top_p=1.0, kv_cache_dtype=name)
        assert seen == [dtype] and all(c.codes.shape[1] == K for c in out)
    with pytest.raises(ValueError, match="KV cache dtype must be one of"):
        continue_codes(model, [[1]], prompts[:1], max_frames=2, temperature=1.0, top_k=1, top_p=1.0,
                       kv_cache_dtype="float16")


@pytest.mark.parametrize("bad_id", ["n_text", -1])
def test_code_continuation_refuses_a_bpe_id_outside_the_models_text_vocabulary(bad_id):
    """Codec-LM's union vocabulary puts its special tokens right around the BPE ids: an id past them
    (a tokenizer other than the checkpoint's) was embedded as a special token and spoken without a word."""
    import numpy as np

    from meld.codes import continue_codes

    model, _ = tiny_codec_lm()
    model.eval()
    bad = model.vocab.n_text if bad_id == "n_text" else -1
    prompts = [np.random.default_rng(0).integers(0, N, (3, K))] * 2
    with pytest.raises(ValueError, match=rf"continue_codes: text 1 holds BPE id {bad}, outside this model's "
                                         rf"vocabulary 0\.\.{model.vocab.n_text - 1}"):
        continue_codes(model, [[1, 2], [3, bad]], prompts, max_frames=2, temperature=1.0, top_k=1, top_p=1.0)


def test_a_batch_of_different_prompts_stops_each_row_where_it_stops_alone():
    """Code prompts of different lengths (one empty), each row ended by its own heads' <EOS> at its own
    step (greedy): every row gets exactly what it gets decoded alone, its delay-pattern tail included."""
    model, _ = tiny_codec_lm(seed=4)
    with torch.no_grad():  # sharp heads whose <EOS> wins after a few steps, at a different one per row
        model.head.weight.mul_(6.0)
        model.head.bias.view(K, N + 1)[:, N] = 2.0
    batch = code_batch(seed=4)
    prompt_len = torch.tensor([7, 3, 0])
    M = 10
    together = model.generate(batch["text"], batch["text_len"], batch["codes"], prompt_len, max_frames=M, top_k=1)
    lengths = [f.shape[0] for f in together.frames]
    assert len(set(lengths)) == 3 and 0 < max(lengths) < M, lengths  # rows end at three different frames
    assert together.hit_max_length == [False] * 3
    for i in range(3):
        p, n = int(prompt_len[i]), int(batch["text_len"][i])
        alone = model.generate(batch["text"][i : i + 1, :n], batch["text_len"][i : i + 1],
                               batch["codes"][i : i + 1, :p], prompt_len[i : i + 1], max_frames=M, top_k=1)
        assert torch.equal(together.frames[i], alone.frames[0]), f"row {i}"
        assert together.codes[i] == alone.codes[0] and alone.hit_max_length[0] == together.hit_max_length[i]


def test_lengths_that_do_not_fit_their_tensors_are_refused():
    """A code prompt length past its tensor, or a negative one, or a text length past the text, is
    refused before decoding, naming the input and the row (as for the mel systems)."""
    model, _ = tiny_codec_lm()
    model.eval()
    batch = code_batch(B=2, T=4)
    for name, text_len, prompt_len, row in (("prompt_len", [5, 4], [4, 5], 1), ("prompt_len", [5, 4], [-1, 2], 0),
                                            ("text_len", [6, 4], [4, 2], 0)):
        with pytest.raises(ValueError, match=rf"CodecLM.generate: {name}\[{row}\] = -?\d+ is outside \[0, \d+\]"):
            model.generate(batch["text"], torch.tensor(text_len), batch["codes"], torch.tensor(prompt_len),
                           max_frames=2)


@pytest.mark.parametrize("value", [N, N + 1, N + 2, 3 * (N + 2) + 1, -1])
def test_code_continuation_refuses_a_prompt_code_outside_the_codebook_naming_it(value):
    """Level k's token t is row k * (N + 2) + t of one embedding table: a prompt code N was read as
    <EOS>, N + 1 as <EMPTY>, larger ones as another level's codes (codes of another codec, say), all
    without a word, and -1 failed in embedding_bag naming no prompt. The bad prompt is the first of
    the second batch, so the message must give its index in the list, not its row in the batch."""
    import numpy as np

    from meld.codes import continue_codes

    model, _ = tiny_codec_lm()
    model.eval()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, N, (n, K)) for n in (3, 0, 4)]
    prompts[0][0] = [0, N - 1, 0, N - 1]  # the codebook's own ends are codes
    options = dict(max_frames=2, temperature=1.0, top_k=1, top_p=1.0, batch_size=2)
    assert len(continue_codes(model, [[1, 2], [3], [4, 5]], prompts, **options)) == 3
    prompts[2][1, 0] = value  # level 0: N + 2 and up are read as codes of levels 1..3, not out of the table
    with pytest.raises(ValueError, match=rf"continue_codes: prompt 2 holds code {value} at frame 1, level 0, "
                                         rf"outside this model's codebook 0\.\.{N - 1}"):
        continue_codes(model, [[1, 2], [3], [4, 5]], prompts, **options)
