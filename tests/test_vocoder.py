"""Vocoders: HiFi-GAN agrees with transformers' SpeechT5HifiGan; Griffin-Lim inverts the front end."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from meld.audio import SAMPLE_RATE, load_audio
from meld.features import HOP_LENGTH, N_MELS, log_mel
from meld.vocoder import (
    GriffinLimVocoder,
    HiFiGANGenerator,
    HiFiGANVocoder,
    _fold_weight_norm,
    build_vocoder,
    mel_to_linear,
)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """A real (synthetic) English sentence at 16 kHz."""
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed")
    path = tmp_path_factory.mktemp("speech") / "slt.wav"
    subprocess.run(
        ["flite", "-voice", "slt", "-t", "Please open the window before you leave.", "-o", str(path)],
        check=True,
    )
    return load_audio(path)


@pytest.fixture(scope="module")
def reference_hifigan():
    """transformers' SpeechT5HifiGan, randomly initialised so that its output is far from 0 and from ±1."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.SpeechT5HifiGan(transformers.SpeechT5HifiGanConfig()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.035)  # the default init (std 0.01) makes a near-silent output
        model.mean.normal_(-2.0, 1.0)  # exercise normalize_before
        model.scale.uniform_(0.5, 2.0)
    return model


def _mel(frames: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(-2.0, 1.0, (frames, N_MELS)).astype(np.float32)


def _check_equal(ours: HiFiGANVocoder, reference, mel: np.ndarray) -> None:
    with torch.no_grad():
        expected = reference(torch.from_numpy(mel)).numpy()
    got = ours(mel)
    assert got.shape == (mel.shape[0] * HOP_LENGTH,) == expected.shape
    assert got.dtype == np.float32
    assert 0.01 < expected.std() < 0.9  # a non-trivial signal is being compared
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_hifigan_matches_transformers_safetensors(reference_hifigan, tmp_path):
    reference_hifigan.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    _check_equal(HiFiGANVocoder.from_path(tmp_path), reference_hifigan, _mel())


@pytest.mark.parametrize("layout", ["parametrizations", "weight_g_v"])
def test_hifigan_loads_weight_norm_checkpoints(reference_hifigan, tmp_path, layout):
    """Checkpoints saved with weight norm (either torch layout) load into plain weights."""
    import copy

    model = copy.deepcopy(reference_hifigan)
    model.apply_weight_norm()  # parametrizations.weight.original0/1
    state = model.state_dict()
    assert any(k.endswith("parametrizations.weight.original0") for k in state)
    if layout == "weight_g_v":  # the older nn.utils.weight_norm names
        state = {
            k.replace(".parametrizations.weight.original0", ".weight_g").replace(
                ".parametrizations.weight.original1", ".weight_v"
            ): v
            for k, v in state.items()
        }
    model.config.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    _check_equal(HiFiGANVocoder.from_path(tmp_path), model, _mel(seed=1))


def test_fold_weight_norm_is_exact_for_transposed_conv():
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.ConvTranspose1d(6, 3, 8, stride=4))
    folded = _fold_weight_norm({f"c.{k}": v for k, v in conv.state_dict().items()})
    torch.testing.assert_close(folded["c.weight"], conv.weight.detach())
    assert set(folded) == {"c.weight", "c.bias"}


def test_hifigan_generator_output_length():
    generator = HiFiGANGenerator(upsample_initial_channel=32)
    with torch.no_grad():
        wav = generator(torch.randn(2, 7, N_MELS))
    assert wav.shape == (2, 7 * HOP_LENGTH)
    assert wav.abs().max() <= 1.0


def test_hifigan_rejects_mismatched_weights(reference_hifigan, tmp_path):
    reference_hifigan.config.save_pretrained(tmp_path)
    state = dict(reference_hifigan.state_dict())
    del state["conv_post.bias"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="do not match"):
        HiFiGANVocoder.from_path(tmp_path)


def test_build_vocoder_falls_back_to_griffin_lim(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="meld.vocoder"):
        assert build_vocoder("hifigan", None).name == "griffin_lim"
        assert build_vocoder("hifigan", tmp_path / "absent").name == "griffin_lim"
        (tmp_path / "config.json").write_text('{"model_type": "speecht5_hifigan"}')
        assert build_vocoder("hifigan", tmp_path).name == "griffin_lim"  # config but no weights
    assert caplog.text.count("falling back to Griffin-Lim") == 3
    assert "no HiFi-GAN weights" in caplog.text
    with pytest.raises(ValueError, match="unknown vocoder"):
        build_vocoder("wavenet")


def test_mel_inversion_fits_the_filterbank(speech):
    mel = log_mel(speech, SAMPLE_RATE)
    linear = mel_to_linear(mel)
    assert linear.min() >= 0.0
    from meld.features import mel_filterbank

    refit = linear @ mel_filterbank()
    error = np.linalg.norm(refit - 10.0**mel) / np.linalg.norm(10.0**mel)
    assert error < 0.01


def test_griffin_lim_round_trip(speech):
    """log_mel(vocoder(log_mel(x))) stays close to log_mel(x): spectral convergence on mel magnitudes."""
    mel = log_mel(speech, SAMPLE_RATE)
    vocoder = build_vocoder("griffin_lim", n_iter=32)
    wav = vocoder(mel)
    assert wav.dtype == np.float32 and wav.shape == (mel.shape[0] * HOP_LENGTH,)
    again = log_mel(wav, SAMPLE_RATE)[: mel.shape[0]]
    convergence = np.linalg.norm(10.0**again - 10.0**mel) / np.linalg.norm(10.0**mel)
    assert convergence < 0.15  # measured ~0.07-0.08 on flite speech
    np.testing.assert_array_equal(wav, vocoder(mel))  # seeded phase: deterministic


def test_griffin_lim_more_iterations_converge_further(speech):
    mel = log_mel(speech[:SAMPLE_RATE], SAMPLE_RATE)

    def convergence(n_iter: int) -> float:
        again = log_mel(GriffinLimVocoder(n_iter=n_iter)(mel), SAMPLE_RATE)[: mel.shape[0]]
        return float(np.linalg.norm(10.0**again - 10.0**mel) / np.linalg.norm(10.0**mel))

    assert convergence(32) < convergence(2)


@pytest.mark.parametrize(
    "bad,says",
    [(np.zeros((0, N_MELS)), "empty"), (np.zeros((5, 79)), "log-mel array"), (np.full((5, N_MELS), np.nan), "NaN")],
)
def test_vocoders_reject_bad_spectrograms(bad, says):
    torch.manual_seed(0)
    for vocoder in (GriffinLimVocoder(), HiFiGANVocoder(HiFiGANGenerator(upsample_initial_channel=32))):
        with pytest.raises(ValueError, match=says):
            vocoder(bad)


def test_griffin_lim_names_the_log_mel_that_overflows_it():
    """Frames far beyond any log-mel (a model's output denormalised with wrong statistics) overflow
    Griffin-Lim's float arithmetic: one ValueError naming the values, not numpy's warnings and then
    librosa's "Audio buffer is not finite everywhere"; loud frames short of that are still synthesised."""
    import warnings

    from meld.features import log_mel_ceiling

    ceiling = log_mel_ceiling()
    vocoder = GriffinLimVocoder(n_iter=4)
    assert np.isfinite(vocoder(np.full((5, N_MELS), ceiling))).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning on the way
        for peak in (2.1 * ceiling, 3 * ceiling, 1e6):  # overflow in librosa's STFT, in float32, in float64
            mel = _mel(5)
            mel[2, 7] = peak
            with pytest.raises(ValueError, match=re.escape(f"overflows on log-mel values up to {peak:.3g}; no log-mel exceeds")):
                vocoder(mel)


@pytest.mark.filterwarnings("ignore:n_fft=1024 is too large")  # librosa's, on any signal under 4 frames
@pytest.mark.parametrize("frames", [1, 2, 3])
def test_griffin_lim_gives_a_hop_per_frame_down_to_one_frame(frames):
    """The contract is T * hop samples for any T >= 1; a single frame used to fail inside Griffin-Lim
    (its inverse STFT has no samples to re-analyse), though the input check accepts it."""
    wav = GriffinLimVocoder(n_iter=4)(_mel(frames))
    assert wav.shape == (frames * HOP_LENGTH,) and wav.dtype == np.float32
    assert np.isfinite(wav).all() and np.abs(wav).max() > 0.0


def test_a_config_json_is_read_as_utf8_whatever_the_locale(tmp_path):
    """JSON is UTF-8 (RFC 8259), and transformers writes ``_name_or_path`` as the folder it saved from: a
    config naming /home/jürgen/... was "not a readable JSON file" under an ASCII or Latin-1 locale."""
    import os
    import sys

    config = tmp_path / "config.json"
    config.write_bytes('{"_name_or_path": "/home/jürgen/speecht5_hifigan", "model_type": "speecht5_hifigan"}'.encode())
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    code = ("import sys; from pathlib import Path; from meld.weights import read_json_object; "
            "print(read_json_object(Path(sys.argv[1]))['_name_or_path'].encode('unicode_escape').decode())")
    done = subprocess.run([sys.executable, "-c", code, str(config)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "/home/j\\xfcrgen/speecht5_hifigan"
