"""The mel front end agrees with transformers' SpeechT5 feature extractor; normalisation statistics are exact."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from meld.audio import SAMPLE_RATE, resample
from meld.features import HOP_LENGTH, N_MELS, NormStats, RunningStats, log_mel, num_frames

TOLERANCE = 1e-4  # max abs difference in log10 units
SENTENCE = "The quick brown fox jumps over the lazy dog, while five wizards box quietly."


@pytest.fixture(scope="module")
def reference():
    """SpeechT5's extractor, configured as the front end (its audio_target path returns log10 mel)."""
    transformers = pytest.importorskip("transformers")
    return transformers.SpeechT5FeatureExtractor(
        feature_size=80,
        sampling_rate=SAMPLE_RATE,
        hop_length=16,
        win_length=64,
        num_mel_bins=80,
        fmin=80,
        fmax=7600,
        mel_floor=1e-10,
        do_normalize=False,
    )


def reference_mel(extractor, wav: np.ndarray) -> np.ndarray:
    return extractor(audio_target=wav, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_values"][0]


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """A few seconds of real (synthetic-voice) speech at 16 kHz, from flite."""
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed")
    path = tmp_path_factory.mktemp("flite") / "speech.wav"
    subprocess.run(
        ["flite", "-voice", "slt", "-t", SENTENCE, "-o", str(path)], check=True, capture_output=True
    )
    wav, sr = sf.read(str(path), dtype="float32")
    if sr != SAMPLE_RATE:
        wav = resample(wav, sr, SAMPLE_RATE)
    assert wav.ndim == 1 and wav.size > SAMPLE_RATE
    return wav


def test_matches_speecht5_on_speech(reference, speech):
    ours = log_mel(speech, SAMPLE_RATE)
    ref = reference_mel(reference, speech)
    assert ours.shape == ref.shape == (1 + speech.size // HOP_LENGTH, N_MELS)
    assert np.abs(ours - ref).max() <= TOLERANCE


def test_matches_speecht5_on_upsampled_8khz_speech(reference, speech):
    """Telephone-band audio leaves the bands above 4 kHz near-empty: the log floor is where precision shows."""
    wav8 = resample(speech, SAMPLE_RATE, 8000)
    ours = log_mel(wav8, 8000)  # resampled inside
    ref = reference_mel(reference, resample(wav8, 8000, SAMPLE_RATE))
    assert ours.shape == ref.shape
    assert ref.min() < -6, "expected near-empty high bands in upsampled 8 kHz audio"
    assert np.abs(ours - ref).max() <= TOLERANCE


@pytest.mark.parametrize("gain", [1e-3, 1e-5, 1e-7])
def test_matches_speecht5_on_quiet_speech(reference, speech, gain):
    """Quiet input puts most bands at or near the 1e-10 floor, where an FFT's rounding shows first."""
    quiet = speech * np.float32(gain)
    ref = reference_mel(reference, quiet)
    assert np.abs(log_mel(quiet, SAMPLE_RATE) - ref).max() <= TOLERANCE


def test_matches_speecht5_on_a_pure_tone(reference):
    """One loud partial: the other bands hold only the window's sidelobes, 7-8 decades below it."""
    n = np.arange(2 * SAMPLE_RATE)
    tone = (0.9 * np.sin(2 * np.pi * 440.0 * n / SAMPLE_RATE)).astype(np.float32)
    ref = reference_mel(reference, tone)
    assert ref.max() - ref.min() > 7
    assert np.abs(log_mel(tone, SAMPLE_RATE) - ref).max() <= TOLERANCE


def test_silence_sits_exactly_on_the_floor():
    mel = log_mel(np.zeros(4000, np.float32), SAMPLE_RATE)
    assert (mel == np.float32(-10.0)).all()


def test_input_layout_and_dtype_do_not_matter(speech):
    strided = np.repeat(speech[:8000], 2)[::2]  # a non-contiguous view of the same samples
    expected = log_mel(np.ascontiguousarray(strided), SAMPLE_RATE)
    np.testing.assert_array_equal(log_mel(strided, SAMPLE_RATE), expected)
    np.testing.assert_array_equal(log_mel(strided.astype(np.float64), SAMPLE_RATE), expected)


@pytest.mark.parametrize("n", [513, 1000, 1024, 4096 + 17, 16_000])
def test_shape_and_dtype(n):
    wav = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
    mel = log_mel(wav, SAMPLE_RATE)
    assert mel.shape == (1 + n // HOP_LENGTH, N_MELS) == (num_frames(n), N_MELS)
    assert mel.dtype == np.float32
    assert np.isfinite(mel).all()


@pytest.mark.parametrize("n", [1, 300, 512])
def test_very_short_clips_match_speecht5(reference, n):
    wav = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
    ours = log_mel(wav, SAMPLE_RATE)
    assert ours.shape == (num_frames(n), N_MELS)
    assert np.abs(ours - reference_mel(reference, wav)).max() <= TOLERANCE


def test_other_rates_give_the_frames_of_their_16khz_resample(speech):
    wav22 = resample(speech, SAMPLE_RATE, 22_050)
    ours = log_mel(wav22, 22_050)
    np.testing.assert_array_equal(ours, log_mel(resample(wav22, 22_050, SAMPLE_RATE), SAMPLE_RATE))
    # and the round trip through 22.05 kHz barely changes the spectrum of the speech
    original = log_mel(speech, SAMPLE_RATE)
    n = min(len(ours), len(original))
    assert abs(len(ours) - len(original)) <= 1
    loud = original[:n] > original.max() - 3  # bands within 30 dB of the peak
    assert np.abs(ours[:n] - original[:n])[loud].mean() < 0.05


def test_rejects_empty_stereo_and_non_finite():
    with pytest.raises(ValueError, match="empty"):
        log_mel(np.zeros(0, np.float32), SAMPLE_RATE)
    with pytest.raises(ValueError, match="mono"):
        log_mel(np.zeros((1000, 2), np.float32), SAMPLE_RATE)
    wav = np.random.default_rng(0).standard_normal(4000).astype(np.float32) * 0.1
    for bad in (np.nan, np.inf):  # one bad sample would come out as frames of silence
        wav[1234] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            log_mel(wav, SAMPLE_RATE)


@pytest.mark.parametrize("gain", [1e3, 1e15])
def test_loud_float_audio_is_analysed_as_the_same_spectrum_shifted(gain):
    """Samples beyond full scale are kept (a float file may hold them): the log-mel is the full-scale
    one shifted by log10(gain) wherever it is above the floor, and stays under the front end's ceiling."""
    from meld.features import log_mel_ceiling

    wav = np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1
    quiet, loud = log_mel(wav, SAMPLE_RATE), log_mel(wav * np.float32(gain), SAMPLE_RATE)
    np.testing.assert_allclose(loud, quiet + np.log10(gain), atol=1e-3)
    assert loud.max() <= log_mel_ceiling()


@pytest.mark.parametrize("peak", [1e18, 1e30, float(np.finfo(np.float32).max)])
def test_samples_that_overflow_the_spectrum_are_refused_naming_their_peak(peak):
    """Finite samples whose spectrum overflows float32 would come out as log-mels of inf."""
    wav = np.random.default_rng(0).uniform(-1, 1, 8000).astype(np.float32)
    wav[100] = 1.0
    with pytest.raises(ValueError, match=re.escape(f"samples up to {peak:.3g} overflow the spectrum")):
        log_mel(wav * np.float32(peak), SAMPLE_RATE)


def test_an_utterance_too_long_by_its_header_is_rejected_without_decoding(tmp_path):
    """load_utterance (the features and codes stages' reader) refuses a clip far beyond
    features.max_seconds from its header; one just over the limit is decoded and refused by its
    decoded length, with the same reason."""
    import soundfile as sf

    from meld.audio import AudioTooLong, load_audio
    from meld.corpus import load_utterance

    long = tmp_path / "long.wav"
    sf.write(str(long), np.zeros(16_000 * 30, np.float32), 16_000)  # 30 s of silence
    with pytest.raises(AudioTooLong, match="long.wav: too long \\(30.0 s > 20 s\\), not decoded") as err:
        load_audio(long, max_seconds=20.0)
    assert err.value.seconds == pytest.approx(30.0)
    row = {"id": "u1", "speaker": "s", "text": "a long one", "audio_path": str(long)}
    for limit in (20.0, 29.5):  # far beyond (header) and just beyond (decoded)
        meta, wav, reason = load_utterance(row, min_seconds=0.3, max_seconds=limit)
        assert wav is None and reason == f"too long: 30.0 s > features.max_seconds={limit}"
    meta, wav, reason = load_utterance(row, min_seconds=0.3, max_seconds=31.0)
    assert reason is None and wav.size == 16_000 * 30


# --------------------------------------------------------------------------- normalisation statistics


def _chunks(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 3.0, N_MELS)
    offset = rng.uniform(-8.0, 0.0, N_MELS)
    return [
        (rng.standard_normal((n, N_MELS)) * scale + offset).astype(np.float32)
        for n in (1, 37, 0, 250, 3, 120)
    ]


def test_running_stats_equal_numpy_over_concatenated_frames():
    chunks = _chunks()
    stats = RunningStats()
    for c in chunks:
        stats.update(c)
    result = stats.finalise()
    everything = np.concatenate(chunks).astype(np.float64)
    assert stats.count == everything.shape[0]
    np.testing.assert_allclose(result.mean, everything.mean(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(result.std, everything.std(axis=0, ddof=1), rtol=1e-6, atol=1e-6)
    assert result.mean.dtype == result.std.dtype == np.float32


def test_running_stats_floor_and_minimum_count():
    frames = np.zeros((10, N_MELS), np.float32)
    frames[:, 1] = np.arange(10)
    running = RunningStats()
    running.update(frames)
    stats = running.finalise(min_std=1e-3)
    assert stats.std[0] == pytest.approx(1e-3)  # a constant channel is floored, never divided by zero
    assert stats.std[1] == pytest.approx(np.std(np.arange(10), ddof=1), rel=1e-6)
    one = RunningStats()
    one.update(frames[:1])
    with pytest.raises(ValueError, match="two frames"):
        one.finalise()


def test_norm_stats_round_trip():
    chunks = _chunks(1)
    stats = RunningStats()
    for c in chunks:
        stats.update(c)
    norm = stats.finalise()
    frames = np.concatenate(chunks)
    z = norm.normalise(frames)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=0, ddof=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(norm.denormalise(z), frames, atol=1e-4)
    again = NormStats.from_dict(norm.to_dict())
    np.testing.assert_array_equal(again.mean, norm.mean)
    np.testing.assert_array_equal(again.std, norm.std)


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT"])
@pytest.mark.parametrize("channels", [1, 2])
def test_load_audio_gives_libsndfiles_float_samples_for_every_subtype(tmp_path, subtype, channels):
    """16-bit files are read as int16 and scaled (the fast path); the samples must be exactly what
    libsndfile's own float conversion gives, downmixed to mono."""
    import soundfile as sf

    from meld.audio import load_audio

    rng = np.random.default_rng(0)
    wav = (rng.uniform(-1, 1, size=(4000, channels)) * 0.9).astype(np.float32)
    path = tmp_path / f"x_{subtype}_{channels}.wav"
    sf.write(str(path), wav, 16_000, subtype=subtype)
    expected = sf.read(str(path), dtype="float32", always_2d=True)[0].mean(axis=1)
    got = load_audio(path)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def _wav_with_chunk_before_data(path, wav: np.ndarray) -> bytes:
    """A 16-bit WAV with a LIST chunk of odd size (padded) between "fmt " and "data", as some editors write."""
    from meld.audio import write_audio

    plain = write_audio(path, wav).read_bytes()
    data_at = plain.index(b"data")
    info = b"INFOISFT\x03\x00\x00\x00me\x00"  # 15 bytes: one pad byte follows
    chunk = b"LIST" + len(info).to_bytes(4, "little") + info + b"\x00"
    body = plain[12:data_at] + chunk + plain[data_at:]
    return b"RIFF" + (4 + len(body)).to_bytes(4, "little") + b"WAVE" + body


@pytest.mark.parametrize("extension", [".wav", ".flac", ".w64"])
def test_files_write_audio_writes_load_whole(tmp_path, extension):
    from meld.audio import load_audio, write_audio

    wav = np.random.default_rng(0).uniform(-0.5, 0.5, 4001).astype(np.float32)  # odd: a padded data chunk
    got = load_audio(write_audio(tmp_path / f"x{extension}", wav))
    np.testing.assert_allclose(got, wav, atol=1 / 32768)


@pytest.mark.parametrize("extension", [".ogg", ".mp3"])
def test_write_audio_encodes_formats_without_16_bit_pcm_in_their_own_codec(tmp_path, extension):
    """OGG and MP3 hold no 16-bit PCM: write_audio asked soundfile for it anyway and failed with
    "Invalid combination of format, subtype and endian", naming neither file nor format."""
    from meld.audio import load_audio, write_audio

    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(SAMPLE_RATE) / SAMPLE_RATE).astype(np.float32)
    got = load_audio(write_audio(tmp_path / f"x{extension}", tone))
    assert abs(got.size - tone.size) < 0.1 * tone.size  # a lossy codec may pad the ends
    rms = float(np.sqrt(np.mean(got[2000:-2000] ** 2)))
    assert rms == pytest.approx(0.5 / np.sqrt(2), rel=0.1)


def test_write_audio_writes_what_audio_extensions_lists_and_refuses_the_rest(tmp_path):
    """One rule for write_audio and the CLI's check of --out: every listed extension writes a file that
    reads back; others (no format, RAW without a header to say its rate) are refused naming the file."""
    from meld.audio import audio_extensions, load_audio, write_audio

    extensions = audio_extensions()
    assert {".wav", ".flac", ".ogg", ".mp3"} <= set(extensions) and ".raw" not in extensions
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(SAMPLE_RATE // 4) / SAMPLE_RATE).astype(np.float32)
    for extension in (".wav", ".flac", ".ogg", ".mp3"):
        assert load_audio(write_audio(tmp_path / f"x{extension}", tone)).size > 0
    for extension in (".raw", ".m4a", ""):
        with pytest.raises(ValueError, match=f"x{extension}: the extension names no audio format written here"):
            write_audio(tmp_path / f"x{extension}", tone)
        assert not (tmp_path / f"x{extension}").exists()


def test_a_truncated_wav_is_refused_and_a_whole_one_with_other_chunks_is_read(tmp_path):
    """libsndfile reads a WAV cut short as the samples left, without a word; the header says how many
    bytes there should be. Chunks before "data" (LIST, fact) are walked over, padding included."""
    from meld.audio import AudioError, load_audio

    wav = np.random.default_rng(0).uniform(-0.5, 0.5, 4000).astype(np.float32)
    whole = _wav_with_chunk_before_data(tmp_path / "plain.wav", wav)
    path = tmp_path / "edited.wav"
    path.write_bytes(whole)
    np.testing.assert_allclose(load_audio(path), wav, atol=1 / 32768)
    data_start = whole.index(b"data") + 8
    for held in (0, 1, 7999):  # bytes of samples left of 8000
        path.write_bytes(whole[: data_start + held])
        with pytest.raises(AudioError, match=f"edited.wav: truncated: header promises 8000 bytes of samples, "
                                             f"the file holds {held}$"):
            load_audio(path)


def test_a_wav_whose_header_does_not_know_its_length_is_read(tmp_path):
    """A writer streaming to a pipe puts 0xFFFFFFFF where the sizes go and never comes back: no promise."""
    from meld.audio import load_audio, write_audio

    wav = np.random.default_rng(0).uniform(-0.5, 0.5, 4000).astype(np.float32)
    raw = bytearray(write_audio(tmp_path / "x.wav", wav).read_bytes())
    size_at = raw.index(b"data") + 4
    raw[size_at : size_at + 4] = raw[4:8] = b"\xff" * 4
    streamed = tmp_path / "streamed.wav"
    streamed.write_bytes(bytes(raw))
    np.testing.assert_allclose(load_audio(streamed), wav, atol=1 / 32768)


def test_a_flac_whose_header_does_not_give_its_length_is_read(tmp_path):
    """A FLAC streamed to a pipe leaves STREAMINFO's sample count at 0, "unknown", and libsndfile reports
    2**63 - 1 frames: load_audio refused a 0.5 s clip as too long with a limit and failed with "array is too
    big" without one. Such a file is read to its end now, and one truly too long stops being decoded soon
    after the limit, not at its end."""
    from meld import audio
    from meld.audio import AudioTooLong, load_audio
    from meld.corpus import load_utterance

    def streamed(name: str, samples: np.ndarray) -> str:
        path = tmp_path / name
        sf.write(str(path), samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        raw = bytearray(path.read_bytes())
        # "fLaC", a 4-byte block header, then STREAMINFO: its 36-bit sample count ends at byte 26
        raw[18:26] = (int.from_bytes(raw[18:26], "big") & ~((1 << 36) - 1)).to_bytes(8, "big")
        path.write_bytes(bytes(raw))
        assert sf.info(str(path)).frames >= 1 << 62  # the premise: libsndfile's "unknown"
        return str(path)

    clip = (0.3 * np.sin(np.arange(8000) * 0.05) * 32767).astype(np.int16)  # 0.5 s
    short = streamed("short.flac", clip)
    for limit in (None, 20.0):
        np.testing.assert_array_equal(load_audio(short, max_seconds=limit), clip.astype(np.float32) / 32768)
    assert audio.count_frames(short) == clip.size  # what the corpus stage's manifest takes
    row = {"id": "u1", "speaker": "s", "text": "a streamed one", "audio_path": short}
    meta, wav, reason = load_utterance(row, min_seconds=0.3, max_seconds=20.0)
    assert reason is None and meta["duration"] == 0.5

    long = streamed("long.flac", np.zeros(SAMPLE_RATE * 60, np.int16))  # 60 s
    with pytest.raises(AudioTooLong, match="long.flac: too long \\(at least [0-9.]+ s > 5 s\\), its header does not") as err:
        load_audio(long, max_seconds=5.0)
    assert 6.0 < err.value.seconds < 6.0 + 5.0  # stopped within a block of the limit, not at the 60 s end
    meta, wav, reason = load_utterance({**row, "audio_path": long}, min_seconds=0.3, max_seconds=5.0)
    assert wav is None and reason.startswith("too long: ")
    assert audio.count_frames(long) == SAMPLE_RATE * 60


@pytest.mark.parametrize("tool", ["flite", "espeak-ng"])
def test_the_mini_corpus_voices_files_load_whole(tool, tmp_path):
    """The mini corpus reads what these voices write (meld/corpus/mini.py) before write_audio rewrites it."""
    from meld.audio import load_audio

    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    path = tmp_path / "voice.wav"
    option = "-o" if tool == "flite" else "-w"
    subprocess.run([tool, option, str(path), "-t" if tool == "flite" else "--", "a short sentence."],
                   check=True, capture_output=True)
    assert load_audio(path).size > SAMPLE_RATE // 2


def test_a_folder_is_said_to_be_one(tmp_path):
    from meld.audio import AudioError, load_audio

    with pytest.raises(AudioError, match=f"{tmp_path}: is a folder, not an audio file"):
        load_audio(tmp_path)


def test_float_samples_beyond_full_scale_are_read_with_a_warning(tmp_path, caplog):
    import soundfile as sf

    from meld.audio import load_audio

    path = tmp_path / "hot.wav"
    wav = np.sin(np.linspace(0, 200, 8000)).astype(np.float32) * 4.0  # peak ~4: 12 dB over full scale
    sf.write(str(path), wav, 16_000, subtype="FLOAT")
    with caplog.at_level("WARNING", logger="meld.audio"):
        got = load_audio(path)
    np.testing.assert_array_equal(got, sf.read(str(path), dtype="float32")[0])  # kept as is
    assert "hot.wav: float samples reach 4, outside [-1, 1]" in caplog.text and "12.0 dB louder" in caplog.text


def test_the_stage_says_when_the_corpus_has_no_train_split(tmp_path):
    from pipeline import features

    (tmp_path / "corpus" / "test").mkdir(parents=True)
    (tmp_path / "corpus" / "test" / "manifest.jsonl").write_text("")
    (tmp_path / "params.yaml").write_text("features: {}\n")
    with pytest.raises(SystemExit, match=r"no train/manifest.jsonl, which the normalisation statistics come from; "
                                         r"it has \['test'\]"):
        features.main(["--params", str(tmp_path / "params.yaml"), "--corpus", str(tmp_path / "corpus"),
                       "--out", str(tmp_path / "features")])
    with pytest.raises(SystemExit, match="no split at all"):
        features.main(["--params", str(tmp_path / "params.yaml"), "--corpus", str(tmp_path / "nothing"),
                       "--out", str(tmp_path / "features")])


def _corpus_split(root, split: str, n: int, corrupt: int = 0) -> None:
    """A split of n short tones (the last ``corrupt`` files are not audio) with its manifest."""
    folder = root / split / "audio"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = folder / f"{split}-{i}.wav"
        if i >= n - corrupt:
            path.write_bytes(b"not audio")
        else:
            t = np.arange(int(0.6 * SAMPLE_RATE)) / SAMPLE_RATE
            sf.write(str(path), (0.1 * np.sin(2 * np.pi * (150 + 40 * i) * t)).astype(np.float32), SAMPLE_RATE)
        rows.append({"id": f"{split}-{i}", "speaker": "s", "text": "a tone", "audio": f"audio/{path.name}",
                     "duration": 0.6})
    (root / split / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_failed_features_run_leaves_the_previous_output_whole(tmp_path):
    """Every split and the statistics come from one run: a run that stops part-way (here: a dev split
    over the rejection limit, after train was rewritten) keeps the previous output as it was, and
    keeps its own rejection listing to read; a run that succeeds leaves no stale split behind."""
    from pipeline import features

    corpus, out = tmp_path / "corpus", tmp_path / "features"
    _corpus_split(corpus, "train", 4)
    _corpus_split(corpus, "dev", 2)
    (tmp_path / "params.yaml").write_text("features: {num_workers: 1, max_rejected_fraction: 0.0}\n")
    argv = ["--params", str(tmp_path / "params.yaml"), "--corpus", str(corpus), "--out", str(out)]
    assert features.main(argv) == 0
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {"train", "dev"} <= {p.parts[0] for p in first}

    _corpus_split(corpus, "train", 3)  # another train split: other statistics
    _corpus_split(corpus, "dev", 2, corrupt=1)
    with pytest.raises(SystemExit, match=r"split 'dev' rejected 1/2") as stopped:
        features.main(argv)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == first
    listing = tmp_path / "features.partial" / "dev" / "rejected.jsonl"
    assert str(listing) in str(stopped.value) and "dev-1" in listing.read_text()

    shutil.rmtree(corpus / "dev")
    assert features.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "summary.json", "train"]  # no stale dev
    assert len((out / "train" / "index.jsonl").read_text().splitlines()) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "features", "params.yaml"]  # nothing left over


def test_the_features_stage_lists_audio_too_loud_for_the_front_end_and_goes_on(tmp_path):
    """log_mel refuses samples that overflow the spectrum; the stage lists such a file as rejected, with
    the peak, like any other unusable audio, instead of stopping."""
    from pipeline import features

    corpus, out = tmp_path / "corpus", tmp_path / "features"
    _corpus_split(corpus, "train", 4)
    loud = corpus / "train" / "audio" / "train-3.wav"
    noise = np.random.default_rng(0).standard_normal(int(0.6 * SAMPLE_RATE)).astype(np.float32)
    sf.write(str(loud), noise * np.float32(1e30), SAMPLE_RATE, subtype="FLOAT")  # finite, but its power is not
    (tmp_path / "params.yaml").write_text("features: {num_workers: 1, max_rejected_fraction: 0.5}\n")
    assert features.main(["--params", str(tmp_path / "params.yaml"), "--corpus", str(corpus), "--out", str(out)]) == 0
    rejected = [json.loads(line) for line in (out / "train" / "rejected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejected] == ["train-3"] and "overflow the spectrum" in rejected[0]["reason"]
    assert len((out / "train" / "index.jsonl").read_text().splitlines()) == 3


def test_writing_audio_through_a_symlink_replaces_what_it_points_to(tmp_path):
    from meld.audio import load_audio, write_audio

    (tmp_path / "store").mkdir()
    real = tmp_path / "store" / "a.wav"
    write_audio(real, np.zeros(1600, np.float32))
    link = tmp_path / "a.wav"
    link.symlink_to(real)
    write_audio(link, np.full(3200, 0.5, np.float32))
    assert link.is_symlink() and load_audio(real).shape == (3200,)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["a.wav"]  # no temporary file left


def test_feature_worker_processes_compute_in_one_thread_each():
    """The stage's processes are its parallelism (features.num_workers, one per core): each must run its FFTs in
    one thread, where torch would start a thread per core in every process."""
    from multiprocessing import get_context

    import torch

    from pipeline.features import one_thread

    with get_context("spawn").Pool(2, initializer=one_thread) as pool:
        assert [pool.apply(torch.get_num_threads) for _ in range(2)] == [1, 1]


def test_durations_the_manifest_already_rules_out_stop_the_stage_before_any_audio_is_read(tmp_path):
    """On LibriSpeech the features pass takes hours; when the manifest's durations (read from each file's header
    by the corpus stage) already put more of a split outside min..max seconds than max_rejected_fraction
    allows, the stage stops at once, naming the range and the extremes, and writes nothing. Rows within the
    limit are left to the pass, which lists them as rejected."""
    from pipeline import features

    corpus, out = tmp_path / "corpus", tmp_path / "features"
    _corpus_split(corpus, "train", 4)
    manifest = corpus / "train" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[1]["duration"], rows[2]["duration"] = 31.5, 24.0  # as the manifest says; the files are never opened
    for r in rows[1:3]:
        (corpus / "train" / r["audio"]).unlink()
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = tmp_path / "params.yaml"
    params.write_text("features: {num_workers: 1, max_seconds: 20.0, max_rejected_fraction: 0.25}\n")
    argv = ["--params", str(params), "--corpus", str(corpus), "--out", str(out)]
    with pytest.raises(SystemExit, match=r"features: split 'train' has 2/4 utterances \(50.0%\) outside "
                                         r"features.min_seconds..features.max_seconds = .*\.\.20 s .* to 31.5 s, "
                                         r"train-1\), more than features.max_rejected_fraction=25.0%"):
        features.main(argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "params.yaml"]  # nothing started

    params.write_text("features: {num_workers: 1, max_seconds: 20.0, max_rejected_fraction: 0.5}\n")
    assert features.main(argv) == 0  # within the limit: the pass runs and lists them
    rejected = [json.loads(line)["id"] for line in (out / "train" / "rejected.jsonl").read_text().splitlines()]
    assert rejected == ["train-1", "train-2"]


@pytest.mark.parametrize("case", ["empty manifest", "every utterance rejected"])
def test_a_train_split_that_keeps_no_frames_ends_the_stage_saying_the_statistics_have_nothing(tmp_path, case):
    """The normalisation statistics come from the train split alone: a split that keeps nothing (an empty
    manifest, or every file unreadable under a rejection limit of 100 %) used to end in a ValueError
    traceback from the statistics, naming no split and no file."""
    from pipeline import features

    corpus, out = tmp_path / "corpus", tmp_path / "features"
    if case == "empty manifest":
        (corpus / "train").mkdir(parents=True)
        (corpus / "train" / "manifest.jsonl").write_text("")
    else:
        _corpus_split(corpus, "train", 2, corrupt=2)
    (tmp_path / "params.yaml").write_text("features: {num_workers: 1, max_rejected_fraction: 1.0}\n")
    kept = "0 of 0 utterances" if case == "empty manifest" else "0 of 2 utterances"
    with pytest.raises(SystemExit, match=rf"features: the train split of {corpus} kept {kept} \(0 frames\); "
                                         r"the normalisation statistics need at least two frames"):
        features.main(["--params", str(tmp_path / "params.yaml"), "--corpus", str(corpus), "--out", str(out)])
    assert not out.exists()
