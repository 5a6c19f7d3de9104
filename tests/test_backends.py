"""Weight-loading paths of the vocoder, the judges and the DAC codec, on real files in a tmp folder.

Every broken file (truncated, empty, another model's, another size, NaN) must be one line naming it,
said when it loads (before any generation), while a missing backend still falls back with a warning.
All weights are tiny and random; nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
import yaml
from test_evaluation import tiny_whisper  # noqa: F401  (a fixture: a random Whisper in the transformers layout)

from meld.evaluation.asr import build_asr_judge
from meld.evaluation.speaker import build_speaker_embedder
from meld.features import N_MELS
from meld.vocoder import HiFiGANGenerator, HiFiGANVocoder, build_vocoder


def _one_line_naming(err: pytest.ExceptionInfo, path) -> None:
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    assert str(path) in message, message


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --------------------------------------------------------------------------- HiFi-GAN


def _hifigan(folder, channels: int = 32, scale: float = 1.0, fmt: str = "safetensors"):
    """A random SpeechT5-layout HiFi-GAN of ``channels`` whose config.json says 32 channels."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state = {k: (v * scale if k.endswith("weight") else v).contiguous()
             for k, v in HiFiGANGenerator(upsample_initial_channel=channels).state_dict().items()}
    (folder / "config.json").write_text(json.dumps({"model_type": "speecht5_hifigan", "upsample_initial_channel": 32}))
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


def _break_hifigan(folder, how: str):
    if how == "truncated safetensors":
        _truncate(_hifigan(folder) / "model.safetensors")
        return folder / "model.safetensors"
    if how == "truncated bin":
        _truncate(_hifigan(folder, fmt="bin") / "pytorch_model.bin")
        return folder / "pytorch_model.bin"
    if how == "empty safetensors":
        (_hifigan(folder) / "model.safetensors").write_bytes(b"")
        return folder / "model.safetensors"
    if how == "config not JSON":
        (_hifigan(folder) / "config.json").write_text("{not json")
        return folder / "config.json"
    if how == "another model size":
        return _hifigan(folder, channels=64) / "model.safetensors"
    if how == "NaN weights":
        from safetensors.torch import load_file, save_file

        state = load_file(str(_hifigan(folder) / "model.safetensors"))
        state["conv_post.weight"][0, 0, 0] = float("nan")
        save_file(state, str(folder / "model.safetensors"))
        return folder / "model.safetensors"
    if how == "overflowing weights":  # finite, but the output is NaN
        return _hifigan(folder, scale=1e3) / "model.safetensors"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated safetensors", "truncated bin", "empty safetensors", "config not JSON",
                                 "another model size", "NaN weights", "overflowing weights"])
def test_broken_hifigan_is_a_one_line_error_naming_the_file(tmp_path, how):
    named = _break_hifigan(tmp_path / "hifigan", how)
    with pytest.raises(ValueError) as err:
        build_vocoder("hifigan", tmp_path / "hifigan")  # an error, not a silent Griffin-Lim
    _one_line_naming(err, named)


def test_missing_hifigan_still_falls_back_with_a_warning(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with caplog.at_level(logging.WARNING, logger="meld.vocoder"):
        for path in ("empty", "a_file", "loop"):
            assert build_vocoder("hifigan", tmp_path / path).name == "griffin_lim"
    assert caplog.text.count("falling back to Griffin-Lim") == 3
    assert "a_file: is a file, not a folder" in caplog.text
    assert build_vocoder("hifigan", _hifigan(tmp_path / "good")).name == "hifigan"


def test_a_hifigan_for_another_number_of_mel_bands_is_refused_when_loaded(tmp_path):
    """Its config and weights agree, so it loaded, and every utterance then failed with a broadcasting
    RuntimeError naming no file."""
    from safetensors.torch import save_file

    folder = tmp_path / "hifigan"
    folder.mkdir()
    bands = N_MELS + 20
    torch.manual_seed(0)
    state = HiFiGANGenerator(model_in_dim=bands, upsample_initial_channel=32).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "speecht5_hifigan", "model_in_dim": bands,
                                                    "upsample_initial_channel": 32}))
    with pytest.raises(ValueError, match=f"model_in_dim is {bands} mel bands, the front end has {N_MELS}") as err:
        build_vocoder("hifigan", folder)
    _one_line_naming(err, folder / "config.json")


def test_hifigan_output_with_nan_is_an_error_not_audio():
    torch.manual_seed(0)
    vocoder = HiFiGANVocoder(HiFiGANGenerator(upsample_initial_channel=32))
    with torch.no_grad():
        for name, p in vocoder.generator.named_parameters():
            if name.endswith("weight"):
                p.mul_(1e3)
    with pytest.raises(ValueError, match="output holds NaN or infinite samples"):
        vocoder(np.full((5, N_MELS), -2.0, np.float32))


# --------------------------------------------------------------------------- judges


def _wavlm(folder, hidden: int = 32, head: bool = True):
    transformers = pytest.importorskip("transformers")
    kwargs = dict(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, num_buckets=16)
    torch.manual_seed(0)
    if head:
        config = transformers.WavLMConfig(**kwargs, tdnn_dim=(16, 16, 16, 16, 32), xvector_output_dim=24)
        transformers.WavLMForXVector(config).save_pretrained(folder)
    else:  # a plain WavLM (e.g. wavlm-base-plus): no x-vector head
        transformers.WavLMModel(transformers.WavLMConfig(**kwargs)).save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(folder)
    return folder


def test_a_folder_of_the_other_judge_is_an_error(tmp_path, tiny_whisper):  # noqa: F811
    wavlm = _wavlm(tmp_path / "wavlm")
    with pytest.raises(ValueError, match="model_type is 'wavlm', expected 'whisper'") as err:
        build_asr_judge("whisper", wavlm)
    _one_line_naming(err, wavlm / "config.json")
    # a Whisper folder loaded as WavLM used to give an embedder of random weights, silently
    with pytest.raises(ValueError, match="model_type is 'whisper', expected 'wavlm'") as err:
        build_speaker_embedder("wavlm", tiny_whisper)
    _one_line_naming(err, tiny_whisper / "config.json")


def test_broken_whisper_weights_are_an_error(tmp_path, tiny_whisper):  # noqa: F811
    folder = shutil.copytree(tiny_whisper, tmp_path / "whisper")
    _truncate(folder / "model.safetensors")
    with pytest.raises(ValueError, match="Whisper weights do not load") as err:
        build_asr_judge("whisper", folder)
    _one_line_naming(err, folder)


@pytest.mark.parametrize("how", ["truncated", "another model size", "no x-vector head", "NaN weights"])
def test_broken_wavlm_weights_are_an_error(tmp_path, how):
    folder = _wavlm(tmp_path / "wavlm", head=how != "no x-vector head")
    if how == "truncated":
        _truncate(folder / "model.safetensors")
    elif how == "another model size":
        shutil.copy(_wavlm(tmp_path / "wider", hidden=48) / "model.safetensors", folder / "model.safetensors")
    elif how == "NaN weights":
        from safetensors.torch import load_file, save_file

        state = load_file(str(folder / "model.safetensors"))
        state["wavlm.feature_projection.projection.weight"][0, 0] = float("nan")
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        build_speaker_embedder("wavlm", folder)
    _one_line_naming(err, folder)


def test_wavlm_says_how_short_is_too_short(tmp_path):
    embedder = build_speaker_embedder("wavlm", _wavlm(tmp_path / "wavlm"))
    assert embedder.min_samples == 5200  # the TDNN's 15 frames + 1 for the pooled std, back through the convs
    rng = np.random.default_rng(0)
    assert embedder.embed(rng.normal(0, 0.1, 5200).astype(np.float32), 16000).shape == (24,)
    with pytest.raises(ValueError, match="at least 5200 samples at 16000 Hz .* got 5199"):
        embedder.embed(rng.normal(0, 0.1, 5199).astype(np.float32), 16000)
    with pytest.raises(ValueError, match=r"at least 5200 samples .* got \d+$"):  # was a conv's RuntimeError
        embedder.embed(rng.normal(0, 0.1, 10).astype(np.float32), 8000)


def test_a_ctranslate2_whisper_without_its_tokenizer_is_refused_before_faster_whisper(tmp_path, caplog):
    """faster-whisper fetches openai/whisper-tiny's tokenizer from the hub when the folder has none."""
    (tmp_path / "ct2").mkdir()
    (tmp_path / "ct2" / "model.bin").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="meld.evaluation.asr"):
        assert build_asr_judge("whisper", tmp_path / "ct2") is None
    assert "without tokenizer.json" in caplog.text


def test_a_missing_pocketsphinx_model_folder_is_a_message(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="meld.evaluation.asr"):
        assert build_asr_judge("pocketsphinx", tmp_path / "nowhere") is None
    assert f"{tmp_path / 'nowhere'}: not a PocketSphinx model folder" in caplog.text


# --------------------------------------------------------------------------- DAC


def _dac(path, nan: bool = False, bare: bool = False, **over):
    from meld.codes import random_codec_kwargs
    from meld.models.codec_lm import DACCodec

    kwargs = {**random_codec_kwargs(2, 4, 64), **over}
    torch.manual_seed(0)
    state = DACCodec(**kwargs).state_dict()
    if nan:
        state["quantizer.quantizers.0.codebook.weight"][0, 0] = float("nan")
    torch.save(state if bare else {"state_dict": state, "metadata": {"kwargs": random_codec_kwargs(2, 4, 64)}}, path)
    return path


@pytest.mark.parametrize("how", ["truncated", "empty", "NaN weights", "no metadata", "fewer levels than its metadata"])
def test_broken_dac_weights_are_a_one_line_error_naming_the_file(tmp_path, how):
    from meld.codes import build_codec

    path = tmp_path / "weights_16khz.pth"
    if how in ("truncated", "empty"):
        _dac(path)
        _truncate(path) if how == "truncated" else path.write_bytes(b"")
    elif how == "NaN weights":  # encoded every frame as code 0, silently
        _dac(path, nan=True)
    elif how == "no metadata":  # a bare state dict: the full-size DAC is expected
        _dac(path, bare=True)
    else:
        _dac(path, n_codebooks=3)
    with pytest.raises(ValueError) as err:
        build_codec(path, n_levels=4, codebook_size=64, random_width=2, seed=0)
    _one_line_naming(err, path)


def test_the_codes_stage_refuses_a_truncated_dac_file_in_one_line(tmp_path):
    from pipeline import codes

    (tmp_path / "corpus" / "train").mkdir(parents=True)
    (tmp_path / "corpus" / "train" / "manifest.jsonl").write_text("")
    weights = _dac(tmp_path / "weights_16khz.pth")
    _truncate(weights)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"features": {}, "codec_lm": {"codec_weights": str(weights),
                                                                    "args": {"n_levels": 4, "codebook_size": 64}}}))
    with pytest.raises(SystemExit) as err:  # was: a RuntimeError traceback from torch.load, no path
        codes.main(["--params", str(params), "--corpus", str(tmp_path / "corpus"), "--out", str(tmp_path / "out")])
    assert isinstance(err.value.code, str) and "not a readable DAC weights file" in err.value.code
    _one_line_naming(err, weights)
