"""The union vocabulary's index layout and the two input layouts every system builds on it."""

import torch

from meld.models.vocab import EOS, PAD, STT, TTS, UnionEmbedding, UnionVocab


def _table(n_text=7, n_codes=5, d=6):
    torch.manual_seed(0)
    return UnionEmbedding(UnionVocab(n_text=n_text, n_codes=n_codes), d)


def test_text_ids_round_trip_through_the_union_and_stop_at_eos():
    vocab = UnionVocab(n_text=7, n_codes=5)
    union = vocab.text_to_union([0, 3, 6])
    assert all(vocab.text_offset <= i < vocab.code_offset for i in union)
    assert vocab.union_to_text(union + [vocab.code_offset, EOS, union[0]]) == [0, 3, 6]  # codes skipped, EOS ends
    assert vocab.size == vocab.code_offset + 5


def test_tts_sequence_is_text_then_tts_then_the_frames_given():
    table = _table()
    text = torch.tensor([[1, 2, 3], [4, 0, 0]])
    text_len = torch.tensor([3, 1])
    frames = torch.randn(2, 4, 6)
    frame_valid = torch.tensor([[True, True, False, False], [True, True, True, True]])
    x, valid = table.tts_sequence(text, text_len, frames, frame_valid)
    L = text.shape[1]
    assert x.shape == (2, L + 1 + 4, 6) and valid.shape == (2, L + 1 + 4)
    assert torch.equal(x[:, L], table.weight[TTS].expand(2, -1))  # <TTS> at index L of every row
    assert torch.equal(x[:, L + 1:], frames)  # the system's frame embeddings, untouched
    assert torch.equal(x[1, 0], table.weight[4 + table.vocab.text_offset])
    assert torch.equal(x[1, 1], table.weight[PAD])  # beyond text_len: PAD, not the id that sat there
    assert valid.tolist() == [[True] * 4 + [True, True, False, False], [True, False, False, True] + [True] * 4]


def test_tts_sequence_with_an_empty_prompt_ends_at_tts():
    table = _table()
    x, valid = table.tts_sequence(torch.tensor([[1, 2]]), torch.tensor([2]), torch.zeros(1, 0, 6),
                                  torch.zeros(1, 0, dtype=torch.bool))
    assert x.shape == (1, 3, 6) and bool(valid.all())
    assert torch.equal(x[0, -1], table.weight[TTS])


def test_stt_sequence_is_frames_then_stt_then_text_or_stops_at_stt():
    table = _table()
    frames = torch.randn(2, 3, 6)
    frame_valid = torch.tensor([[True, True, True], [True, False, False]])
    text = torch.tensor([[5, 6], [1, 0]])
    text_len = torch.tensor([2, 1])
    prefill, prefill_valid = table.stt_sequence(frames, frame_valid)
    full, full_valid = table.stt_sequence(frames, frame_valid, text, text_len)
    assert prefill.shape == (2, 4, 6) and full.shape == (2, 6, 6)
    assert torch.equal(full[:, :4], prefill) and torch.equal(full_valid[:, :4], prefill_valid)  # training extends the prefill
    assert torch.equal(prefill[:, 3], table.weight[STT].expand(2, -1))  # <STT> at index T
    text_emb, text_valid = table.text_block(text, text_len)
    assert torch.equal(full[:, 4:], text_emb) and torch.equal(full_valid[:, 4:], text_valid)
    assert full_valid[1].tolist() == [True, False, False, True, True, False]
