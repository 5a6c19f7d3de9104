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


def test_a_codec_guard_of_zero_gives_no_frame_and_says_it_hit_it_as_tts_continue_does():
    """``continue_codes`` raised every guard to at least 1 (left from before ``generate`` took a guard
    of 0), so a guard of 0 gave one frame past it; a guard is exact, alone, with others or for all."""
    from test_codec_lm import K, N, tiny_codec_lm

    from meld.codes import continue_codes

    model, _ = tiny_codec_lm()
    with torch.no_grad():  # no head ever says <EOS>: only the guards end an utterance
        model.head.bias.view(K, N + 1)[:, N] = -1e4
    model.eval()
    rng = np.random.default_rng(0)
    texts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    prompts = [rng.integers(0, N, (n, K)) for n in (3, 5, 0)]
    options = dict(temperature=1.0, top_k=1, top_p=1.0)
    for guards, batch_size in (([0, 2, 0], 3), ([0, 2, 0], 1), (0, 3)):
        out = continue_codes(model, texts, prompts, max_frames=guards, batch_size=batch_size, **options)
        expected = guards if isinstance(guards, list) else [guards] * 3
        assert [c.codes.shape for c in out] == [(g, K) for g in expected], (guards, batch_size)
        assert [c.hit_max_length for c in out] == [True] * 3
    mel_model = _never_stopping("mel_lm")
    mel_texts, mel_prompts = _tts_inputs()
    same = tts_continue(mel_model, mel_texts, mel_prompts, reduction=REDUCTION, max_frames=0, temperature=1.0,
                        top_k=1, top_p=1.0, repetition_penalty=1.0, test_time_dropout=False)
    assert [(c.frames.shape[0], c.hit_max_length) for c in same] == [(0, True)] * 3


TTS_OPTIONS = dict(reduction=REDUCTION, temperature=1.0, top_k=4, top_p=0.9, repetition_penalty=1.2, seed=1)


def _tts_inputs():
    rng = np.random.default_rng(0)
    texts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    prompts = [rng.standard_normal((n, 80)).astype(np.float32) for n in (4, 2, 0)]
    return texts, prompts


@pytest.mark.parametrize("case", ["short guards", "long guards", "short prompts", "short texts", "empty text",
                                  "40-dim prompt", "1-d prompt", "batch 0", "batch -1"])
def test_tts_continue_refuses_inputs_it_cannot_pair_up_and_names_them(case):
    """Lists of different lengths used to fail inside a batch naming max_frames (or, at batch size 1,
    drop the extra items silently), a negative batch size returned no continuation at all, and an
    empty transcript was spoken anyway."""
    model, _ = tiny_meld(reduction=REDUCTION)
    model.eval()
    texts, prompts = _tts_inputs()
    args = {"texts": texts, "prompts": prompts, "max_frames": [6, 6, 6], "batch_size": 1}
    bad, names = {
        "short guards": ({"max_frames": [6, 6]}, "max_frames"),
        "long guards": ({"max_frames": [6, 6, 6, 6]}, "max_frames"),
        "short prompts": ({"prompts": prompts[:2]}, "prompts"),
        "short texts": ({"texts": texts[:2]}, "texts"),
        "empty text": ({"texts": [[1], [], [2]]}, "text 1 is empty"),
        "40-dim prompt": ({"prompts": [prompts[0], prompts[1][:, :40], prompts[2]]}, r"prompt 1 .*\(2, 40\)"),
        "1-d prompt": ({"prompts": [np.zeros(4, np.float32)] * 3}, r"prompt 0 .*\(4,\)"),
        "batch 0": ({"batch_size": 0}, "batch_size"),
        "batch -1": ({"batch_size": -1}, "batch_size"),
    }[case]
    args |= bad
    with pytest.raises(ValueError, match=f"tts_continue: .*{names}"):
        tts_continue(model, args.pop("texts"), args.pop("prompts"), **args, **TTS_OPTIONS)


def test_a_prompt_speaks_only_its_whole_frame_groups_and_a_numpy_guard_is_one_for_all():
    """A prompt's frames past its last whole group of r are dropped (an empty prompt is P = 0), and a
    guard given as a numpy integer is every utterance's guard, as a Python int is."""
    model, _ = tiny_meld(reduction=REDUCTION, encoder_dropout=0.5)
    model.eval()
    texts, prompts = _tts_inputs()
    ragged = [np.concatenate([p, np.full((1, 80), 7.0, np.float32)]) for p in prompts]  # one frame more each
    whole = tts_continue(model, texts, prompts, max_frames=9, batch_size=2, **TTS_OPTIONS)
    trimmed = tts_continue(model, texts, ragged, max_frames=np.int64(9), batch_size=2, **TTS_OPTIONS)
    for a, b in zip(whole, trimmed):
        assert a.codes == b.codes and a.hit_max_length == b.hit_max_length
        np.testing.assert_array_equal(a.frames, b.frames)
    assert all(c.frames.shape[0] <= 9 for c in whole)


@pytest.mark.parametrize("system", ["meld", "mel_lm", "melle", "dmel"])
def test_a_batch_whose_every_row_stops_at_its_first_step_returns_empty_continuations(system):
    """Every row says stop before its first frame: nothing is generated, no guard was hit, and a row
    whose own guard is 0 reports its guard (as it would alone)."""
    model = _never_stopping(system)
    with torch.no_grad():  # now the opposite: every stop decision fires
        if system == "meld":
            model.head.bias[EOS] = 1e4
        elif system == "dmel":
            model.eos_head.bias.fill_(1e4)
        else:
            model.stop_head.bias.fill_(1e4)
    texts, prompts = _tts_inputs()
    out = tts_continue(model, texts, prompts, reduction=REDUCTION, max_frames=[5, 0, 3], temperature=1.0, top_k=1,
                       top_p=1.0, repetition_penalty=1.0, test_time_dropout=False, zero_latent=system == "melle",
                       batch_size=3)
    assert [c.frames.shape for c in out] == [(0, 80)] * 3
    assert [c.hit_max_length for c in out] == [False, True, False]


def test_a_numpy_integer_guard_is_one_guard_for_every_row():
    """What a model's ``generate`` is given for max_frames may be a numpy integer (a guard computed
    with numpy): it is one guard for all rows, as an int is (it used to be iterated: TypeError)."""
    from meld.models.leaving_rows import row_guards

    for guard in (-2, 0, 3, 17):
        assert row_guards(np.int64(guard), 3) == row_guards(guard, 3) == (max(guard, 0), [max(guard, 0)] * 3, set())


@pytest.mark.parametrize("bad, says", [
    ({"max_frames": [4, 4, 4]}, "max_frames"),
    ({"texts": [[1], []]}, "text 1 is empty"),
    ({"prompts": [np.zeros((3, 2), np.int64)] * 2}, r"prompt 0 must be \(P, 4\) integer codes, got shape \(3, 2\)"),
    ({"batch_size": 0}, "batch_size"),
])
def test_continue_codes_checks_its_inputs_as_tts_continue_does(bad, says):
    """Codec-LM's continuation had the same gaps (lists paired up wrongly, a batch size < 1 lost every
    utterance, an empty text spoken): it runs the same checks before its first batch."""
    from test_codec_lm import tiny_codec_lm

    from meld.codes import continue_codes

    model, _ = tiny_codec_lm()
    model.eval()
    good = {"texts": [[1, 2], [3]], "prompts": [np.zeros((3, model.n_levels), np.int64)] * 2, "max_frames": 4,
            "batch_size": 2}
    options = {"temperature": 1.0, "top_k": 5, "top_p": 1.0}
    assert [len(c.codes) <= 4 for c in continue_codes(model, **good, **options)] == [True, True]
    with pytest.raises(ValueError, match=f"continue_codes: .*{says}"):
        continue_codes(model, **(good | bad), **options)


@pytest.mark.parametrize("seconds", [-0.5, float("nan"), float("inf")])
def test_a_negative_or_non_finite_prompt_length_is_refused(seconds):
    """``mel[:p]`` with a negative p kept all but the last frames as the prompt, without a word."""
    from meld.generate import prompt_frames

    mel = np.zeros((100, 80), np.float32)
    assert prompt_frames(mel, 0.5) == 31 and prompt_frames(mel, 10.0) == 100
    with pytest.raises(ValueError, match="prompt_seconds must be a finite number >= 0"):
        prompt_frames(mel, seconds)


def test_hybrid_ctc_search_of_an_utterance_without_frames_alone_matches_it_in_a_batch():
    """A zero-frame utterance decoded alone (the batch's frame axis of length 0) made the CTC prefix
    scorer read frame 0 of an empty tensor: IndexError. In a batch with longer utterances it got
    the empty transcript (no frames: the CTC probability of anything but the empty text is 0)."""
    from meld.generate import stt_beam_search

    model, _ = tiny_meld(reduction=REDUCTION, stt_ctc=True)
    model.eval()
    mels = [np.zeros((0, 80), np.float32), np.random.default_rng(0).standard_normal((6, 80)).astype(np.float32)]
    options = dict(reduction=REDUCTION, beam_size=2, max_tokens=5, ctc_weight=0.5)
    together = stt_beam_search(model, mels, batch_size=2, **options)
    alone = [stt_beam_search(model, [m], batch_size=1, **options)[0] for m in mels]
    assert alone == together and together[0] == []


@pytest.mark.parametrize("bad, says", [
    ({"batch_size": -1}, "batch_size must be a positive integer"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"beam_size": 0}, "beam_size must be a positive integer"),
    ({"max_tokens": -3}, "max_tokens must be a positive integer"),
    ({"max_tokens_per_second": 0.0}, "max_tokens_per_second must be a finite number > 0"),
    ({"mels": [np.zeros((5, 80), np.float32), np.zeros((5, 40), np.float32)]}, r"mel 1 must be \(T, 80\)"),
    ({"reduction": 1}, r"reduction=1 .* 80-dim .* takes 160"),
])
def test_stt_beam_search_refuses_bad_arguments_in_one_line(bad, says):
    """A negative batch size returned no transcript at all, without a word; the others failed deep
    inside (range(), an IndexError, a KV cache overflow, numpy broadcasting, a matmul's shapes)."""
    from meld.generate import stt_beam_search

    model, _ = tiny_meld(reduction=REDUCTION)
    model.eval()
    args = {"mels": [np.zeros((5, 80), np.float32)] * 2, "reduction": REDUCTION, "max_tokens": 3} | bad
    with pytest.raises(ValueError, match=f"stt_beam_search: {says}"):
        stt_beam_search(model, args.pop("mels"), **args)


def test_tts_continue_refuses_a_reduction_its_model_was_not_trained_with():
    """Frames grouped r at a time must match the model's own frame size; a wrong r was a matmul error."""
    model, _ = tiny_meld(reduction=REDUCTION)
    model.eval()
    texts, prompts = _tts_inputs()
    with pytest.raises(ValueError, match=r"tts_continue: reduction=3 .* 240-dim .* takes 160"):
        tts_continue(model, texts, prompts, max_frames=4, **(TTS_OPTIONS | {"reduction": 3}))


def test_a_bfloat16_cache_leaves_one_position_table_in_the_steps_dtype():
    """``new_cache`` computes the position rows its decoding steps will read. With a bf16 cache it
    computed them in bf16, which no step reads (they add them to activations in the weights' dtype),
    and kept that table for good beside the one the steps did compute."""
    model, _ = tiny_meld(reduction=REDUCTION)
    model.eval()
    texts, prompts = _tts_inputs()
    tts_continue(model, texts, prompts, max_frames=4, kv_cache_dtype="bfloat16", **TTS_OPTIONS)
    assert [dtype for _, dtype in model.backbone._position_tables] == [torch.float32]


@pytest.mark.parametrize("bad_id", [20, -1])
def test_tts_continue_refuses_a_bpe_id_outside_the_models_text_vocabulary(bad_id):
    """MELD's union vocabulary puts its codes right after the BPE ids and its specials right before:
    id n_text was embedded as code 0 and id -1 as a special token, and the transcript was spoken
    anyway (a tokenizer that is not the checkpoint's would go unnoticed)."""
    model, _ = tiny_meld(reduction=REDUCTION)  # 20 BPE ids
    model.eval()
    texts, prompts = _tts_inputs()
    texts[1] = [4, bad_id, 6]
    with pytest.raises(ValueError, match=f"tts_continue: text 1 holds BPE id {bad_id}, outside .* 0..19"):
        tts_continue(model, texts, prompts, max_frames=4, **TTS_OPTIONS)


@pytest.mark.parametrize("system", ["meld", "mel_lm", "melle", "dmel"])
def test_tts_continue_names_a_non_finite_prompt_by_its_index_in_the_list(system):
    """The models' own check named a NaN prompt by its row in one batch: with batch_size=4, prompt 9
    of 10 was "row(s) [1] of the batch", and prompt 1 was clean. A NaN in a frame past the prompt's
    last whole group of r is dropped before the model, so it is no reason to refuse."""
    model = _never_stopping(system)
    rng = np.random.default_rng(0)
    prompts = [rng.standard_normal((4, 80)).astype(np.float32) for _ in range(10)]
    prompts[3] = np.concatenate([prompts[3], np.full((1, 80), np.nan, np.float32)])  # 5 frames: the 5th is dropped
    options = dict(reduction=REDUCTION, max_frames=2, temperature=1.0, top_k=1, top_p=1.0, repetition_penalty=1.0,
                   test_time_dropout=False, zero_latent=system == "melle", batch_size=4)
    assert len(tts_continue(model, [[1, 2]] * 10, prompts, **options)) == 10
    for value, shown in ((np.nan, "nan"), (-np.inf, "-inf")):
        bad = [p.copy() for p in prompts]
        bad[9][2, 7] = value
        with pytest.raises(ValueError, match=f"tts_continue: prompt 9 holds {shown} at frame 2, channel 7"):
            tts_continue(model, [[1, 2]] * 10, bad, **options)

