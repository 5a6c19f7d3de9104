"""The embedded mini corpus: determinism, split hygiene, audio format, config checking, the stage script."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import soundfile as sf

from meld.audio import SAMPLE_RATE
from meld.config import ConfigError, CorpusConfig
from meld.corpus import ManifestError, read_manifest
from meld.corpus.mini import (
    VoiceUnavailableError,
    build_mini_corpus,
    plan_mini_corpus,
    vocabulary,
    voice_problem,
)

# One voice per engine, the festival one held out (as in the default corpus).
TRAIN_VOICES = ["flite-rms", "espeak-f3"]
HELD_OUT_VOICES = ["festival-kal", "espeak-m7"]
UTTERANCES = {"train": 3, "dev": 1, "test": 1, "test_unseen": 2}
TINY = dict(
    seed=3,
    train_voices=TRAIN_VOICES,
    held_out_voices=HELD_OUT_VOICES,
    utterances=UTTERANCES,
    min_words=6,
    max_words=10,
)

_missing = [p for v in TRAIN_VOICES + HELD_OUT_VOICES if (p := voice_problem(v))]
needs_voices = pytest.mark.skipif(bool(_missing), reason="; ".join(_missing))


def _manifests(root: Path) -> dict[str, list[dict]]:
    out = {}
    for split in ("train", "dev", "test", "test_unseen"):
        rows = read_manifest(root / split / "manifest.jsonl")
        for r in rows:
            r.pop("audio_path")  # absolute, so it differs between folders
        out[split] = rows
    return out


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mini")
    counts = build_mini_corpus(root, **TINY, num_workers=2, progress=False)
    assert counts == {"train": 6, "dev": 2, "test": 2, "test_unseen": 4}
    return root


@needs_voices
def test_same_seed_same_corpus(tiny_corpus, tmp_path):
    # a different worker count must not change anything either
    build_mini_corpus(tmp_path, **TINY, num_workers=1, progress=False)
    assert _manifests(tmp_path) == _manifests(tiny_corpus)
    for wav in sorted(tiny_corpus.glob("*/audio/*.wav")):
        assert wav.read_bytes() == (tmp_path / wav.relative_to(tiny_corpus)).read_bytes(), wav.name


def test_plan_is_seeded():
    a = plan_mini_corpus(**TINY)
    assert a == plan_mini_corpus(**TINY)
    b = plan_mini_corpus(**{**TINY, "seed": 4})
    assert [r["text"] for r in a["train"]] != [r["text"] for r in b["train"]]
    assert [r["id"] for r in a["train"]] == [r["id"] for r in b["train"]]
    assert a["train"][0]["id"] == "flite-rms-train-00000"


def test_sentences_in_range_and_vocabulary():
    plan = plan_mini_corpus(**{**TINY, "utterances": {"train": 200, "dev": 20}})
    vocab = set(vocabulary())
    for rows in plan.values():
        for r in rows:
            words = r["text"].split()
            assert 6 <= len(words) <= 10
            assert set(words) <= vocab



def test_a_word_range_too_narrow_for_the_corpus_is_refused_not_drawn_forever():
    with pytest.raises(ValueError, match=r"corpus.min_words..max_words = 2..2: .* distinct ones, and \d+ more"):
        plan_mini_corpus(**{**TINY, "min_words": 2, "max_words": 2, "utterances": {"train": 600}})

@needs_voices
def test_splits_share_no_sentence(tiny_corpus):
    texts = {split: {r["text"] for r in rows} for split, rows in _manifests(tiny_corpus).items()}
    splits = list(texts)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not texts[a] & texts[b], (a, b)


@needs_voices
def test_unseen_speakers_never_in_training(tiny_corpus):
    m = _manifests(tiny_corpus)
    seen = {r["speaker"] for split in ("train", "dev", "test") for r in m[split]}
    unseen = {r["speaker"] for r in m["test_unseen"]}
    assert seen == set(TRAIN_VOICES)
    assert unseen == set(HELD_OUT_VOICES)
    assert all(r["id"].startswith(f"{r['speaker']}-{split}-") for split, rows in m.items() for r in rows)


@needs_voices
def test_audio_is_16k_mono_and_durations_match(tiny_corpus):
    for split in ("train", "test_unseen"):  # includes a flite, an espeak-ng and a festival voice
        for row in read_manifest(tiny_corpus / split / "manifest.jsonl"):
            info = sf.info(row["audio_path"])
            assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
            assert row["duration"] == pytest.approx(info.frames / info.samplerate, abs=1e-3)
            assert 1.0 < row["duration"] < 10.0
            assert row["audio"] == f"audio/{row['id']}.wav"


def test_voice_checks():
    with pytest.raises(VoiceUnavailableError, match="unknown voice 'flite-nobody'"):
        build_mini_corpus("/nonexistent", **{**TINY, "train_voices": ["flite-nobody"]}, progress=False)


_kal_missing = [p for v in ("flite-kal", "festival-kal") if (p := voice_problem(v))]


@pytest.mark.skipif(bool(_kal_missing), reason="; ".join(_kal_missing))
def test_one_recorded_speaker_cannot_be_both_trained_on_and_unseen():
    with pytest.raises(ValueError, match="same recorded speaker"):
        build_mini_corpus(
            "/nonexistent",
            **{**TINY, "train_voices": ["flite-kal"], "held_out_voices": ["festival-kal"]},
            progress=False,
        )


def test_config_rejects_unknown_keys_and_wrong_types():
    assert CorpusConfig.from_dict({}) == CorpusConfig()
    with pytest.raises(ConfigError, match="num_utts"):
        CorpusConfig.from_dict({"name": "mini", "num_utts": 3})
    with pytest.raises(ConfigError, match="corpus.seed"):
        CorpusConfig.from_dict({"seed": "0"})
    with pytest.raises(ConfigError, match="corpus.num_workers"):
        CorpusConfig.from_dict({"num_workers": True})
    with pytest.raises(ConfigError, match=r"corpus.train_voices\[1\]"):
        CorpusConfig.from_dict({"train_voices": ["flite-rms", 3]})
    with pytest.raises(ConfigError, match="corpus.utterances_per_voice.dev"):
        CorpusConfig.from_dict({"utterances_per_voice": {"dev": 1.5}})
    with pytest.raises(ConfigError, match="corpus.name"):
        CorpusConfig.from_dict({"name": "timit"})
    with pytest.raises(ConfigError, match="also listed"):
        CorpusConfig.from_dict({"train_voices": ["flite-rms"], "held_out_voices": ["flite-rms"]})


@needs_voices
def test_stage_script_end_to_end(tmp_path, tiny_corpus):
    from pipeline.corpus import main

    params = {
        "corpus": {
            "name": "mini",
            "seed": TINY["seed"],
            "train_voices": TRAIN_VOICES,
            "held_out_voices": HELD_OUT_VOICES,
            "utterances_per_voice": UTTERANCES,
            "min_words": TINY["min_words"],
            "max_words": TINY["max_words"],
            "num_workers": 2,
        },
        "unrelated_section": {"x": 1},
    }
    (tmp_path / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    out = tmp_path / "data" / "corpus"
    assert main(["--params", str(tmp_path / "params.yaml"), "--out", str(out)]) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["corpus"] == "mini"
    assert {s: v["utterances"] for s, v in summary["splits"].items()} == {
        "dev": 2,
        "test": 2,
        "test_unseen": 4,
        "train": 6,
    }
    assert summary["splits"]["test_unseen"]["speakers"] == {v: 2 for v in HELD_OUT_VOICES}
    assert summary["total_hours"] > 0
    assert _manifests(out) == _manifests(tiny_corpus)  # the stage is the library, nothing more


def test_stage_script_librispeech_branch(tmp_path, monkeypatch):
    """name: librispeech hands its settings to prepare_librispeech (stubbed: no network here), which
    writes into a staging folder: a run that fails leaves the last whole corpus as it was, and a run
    with fewer subsets leaves no split of the one before."""
    import meld.corpus.librispeech as librispeech
    from meld.corpus import write_manifest
    from meld.corpus.librispeech import LibriSpeechError
    from pipeline.corpus import main

    calls = []

    def fake_prepare(root, out_dir, subsets, download, max_rejected_fraction):
        calls.append((root, out_dir, subsets, download, max_rejected_fraction))
        row = {"id": "19-198-0001", "speaker": "19", "text": "HELLO", "audio": "a.flac", "duration": 3600.0}
        counts = {}
        for subset in subsets:
            split = subset.replace("-clean", "")
            counts[split] = write_manifest([row], out_dir / split / "manifest.jsonl")
        if "fail" in str(root):
            raise LibriSpeechError("split 'test': 3 of 4 utterances rejected")
        return counts

    monkeypatch.setattr(librispeech, "prepare_librispeech", fake_prepare)

    def run(root, subsets):
        params = {"corpus": {"name": "librispeech", "librispeech_root": str(tmp_path / root),
                             "librispeech_subsets": subsets},
                  "features": {"max_rejected_fraction": 0.02}}
        (tmp_path / "params.yaml").write_text(json.dumps(params))
        return main(["--params", str(tmp_path / "params.yaml"), "--out", str(out)])

    out = tmp_path / "corpus"
    assert run("ls", ["dev-clean", "test-clean"]) == 0
    staging = out.resolve().with_name("corpus.partial")
    assert calls == [(tmp_path / "ls", staging, ["dev-clean", "test-clean"], False, 0.02)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["corpus"] == "librispeech" and summary["total_hours"] == 2.0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    with pytest.raises(LibriSpeechError):  # fails after writing a new dev manifest
        run("fail", ["dev-clean", "test-clean"])
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    assert run("ls", ["dev-clean"]) == 0
    assert sorted(p.parent.name for p in out.glob("*/manifest.jsonl")) == ["dev"]  # test/ went with the old run
    assert list(json.loads((out / "summary.json").read_text())["splits"]) == ["dev"]


def test_the_stage_refuses_a_params_file_without_a_corpus_section(tmp_path):
    from meld.config import ConfigError
    from pipeline.corpus import main

    (tmp_path / "params.yaml").write_text(json.dumps({"copus": {"name": "mini"}}))
    with pytest.raises(ConfigError, match="no 'corpus' section"):
        main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "corpus")])
    assert not (tmp_path / "corpus").exists()


def test_a_manifest_row_without_audio_names_the_file_and_line(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"id": "a", "audio": "audio/a.wav", "text": "x"}\n\n{"id": "b", "text": "y"}\n')
    with pytest.raises(ValueError, match=r"manifest.jsonl:3: a manifest row needs an \"audio\" path"):
        read_manifest(manifest)
    manifest.write_text('["not", "a", "row"]\n')
    with pytest.raises(ValueError, match=r"manifest.jsonl:1: a manifest row needs"):
        read_manifest(manifest)


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
def test_every_plan_keeps_its_splits_apart(seed):
    """DESIGN §11 for any seed and voice set: no sentence in two splits (dev/test never in train), test_unseen
    spoken only by voices whose recorded person never speaks in train/dev/test, ids unique."""
    from meld.corpus.mini import VOICES, recorded_person

    rng = random.Random(seed)
    voices = sorted(VOICES)
    rng.shuffle(voices)
    train, held_out = voices[:5], [v for v in voices[5:] if recorded_person(v) not in {recorded_person(t) for t in
                                                                                       voices[:5]}][:3]
    plan = plan_mini_corpus(seed=seed, train_voices=train, held_out_voices=held_out, min_words=4, max_words=12,
                            utterances={"train": 30, "dev": 3, "test": 3, "test_unseen": 4})
    texts = {split: [r["text"] for r in rows] for split, rows in plan.items()}
    every = [t for ts in texts.values() for t in ts]
    assert len(every) == len(set(every)) == 5 * 36 + len(held_out) * 4
    people = {split: {recorded_person(r["speaker"]) for r in rows} for split, rows in plan.items()}
    assert people["test_unseen"] and not people["test_unseen"] & (people["train"] | people["dev"] | people["test"])
    assert {r["speaker"] for r in plan["dev"]} == {r["speaker"] for r in plan["test"]} == set(train)
    ids = [r["id"] for rows in plan.values() for r in rows]
    assert len(ids) == len(set(ids))


def test_a_manifest_line_that_is_not_utf8_is_named(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_bytes(b'{"id": "a", "speaker": "s", "text": "x", "audio": "a.wav"}\n'
                         b'{"id": "b", "speaker": "s", "text": "caf\xe9", "audio": "b.wav"}\n')
    with pytest.raises(ManifestError, match=r"manifest.jsonl:2: not UTF-8 .*caf\\xe9"):
        read_manifest(manifest)


def test_a_manifest_id_given_twice_or_unusable_as_a_file_name_is_refused(tmp_path):
    """The evaluate stage keys audio paths by id and names its samples after it: a repeated id gave the first
    utterance the second's reference audio, and an id such as '../x' wrote outside the samples folder."""
    manifest = tmp_path / "manifest.jsonl"

    def rows(*ids):
        manifest.write_text("".join(json.dumps({"id": i, "speaker": "s", "text": "x", "audio": f"{n}.wav"}) + "\n"
                                    for n, i in enumerate(ids)))

    rows("a", "b", "a")
    with pytest.raises(ManifestError, match=r"manifest.jsonl:3: id 'a' is already the id of line 1"):
        read_manifest(manifest)
    for bad in (None, "", 3, "../x", "a\\b"):
        rows("a", bad)
        with pytest.raises(ManifestError, match=r"manifest.jsonl:2: a manifest row needs an \"id\""):
            read_manifest(manifest)
    rows("a", "b")
    assert [r["id"] for r in read_manifest(manifest)] == ["a", "b"]


def test_a_row_without_a_speaker_is_rejected_like_other_bad_rows(tmp_path):
    """The evaluation chooses, groups and judges utterances by speaker (a None speaker failed there, after
    training); the data stages reject such a row, counted and listed, as they do a row without text."""
    import numpy as np

    from meld.corpus import load_utterance

    wav = tmp_path / "a.wav"
    sf.write(str(wav), 0.1 * np.sin(np.arange(SAMPLE_RATE) / 10.0), SAMPLE_RATE)
    row = {"id": "a", "text": "some words", "audio_path": str(wav)}
    for speaker in ({}, {"speaker": None}, {"speaker": " "}):
        meta, audio, reason = load_utterance({**row, **speaker}, 0.3, 20.0)
        assert audio is None and reason.startswith("no speaker"), speaker
    meta, audio, reason = load_utterance({**row, "speaker": "s"}, 0.3, 20.0)
    assert reason is None and audio.size == SAMPLE_RATE


_shim_voices = ["flite-rms", "espeak-f3", "espeak-m7"]
_shim_missing = [p for v in _shim_voices if (p := voice_problem(v))]


@pytest.mark.skipif(bool(_shim_missing), reason="; ".join(_shim_missing))
def test_a_voice_that_fails_part_way_is_named_in_one_line_and_the_last_corpus_stays_whole(tmp_path, monkeypatch,
                                                                                          capsys):
    """A synthesiser that crashes on its third sentence (a flite that exits 139 in front of the real one) ends
    the stage with one line naming the voice and its package; the previous corpus is untouched, nothing the
    failed run wrote passes for a manifest, and a rerun with the voice mended builds the same corpus again."""
    import shutil

    from meld.config import run_stage
    from pipeline.corpus import main

    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"corpus": {
        "name": "mini", "seed": 5, "train_voices": _shim_voices[:2], "held_out_voices": _shim_voices[2:],
        "utterances_per_voice": {"train": 4, "dev": 1, "test": 1, "test_unseen": 1},
        "min_words": 6, "max_words": 10, "num_workers": 2}}))
    out = tmp_path / "corpus"
    argv = ["--params", str(params), "--out", str(out)]
    assert main(argv) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    shim = tmp_path / "bin" / "flite"
    shim.parent.mkdir()
    shim.write_text(f"""#!/bin/sh
case "$*" in *-lv*) exec {shutil.which("flite")} "$@";; esac
n=$(cat {tmp_path}/calls 2>/dev/null || echo 0); n=$((n+1)); echo $n > {tmp_path}/calls
if [ "$n" -ge 3 ]; then echo "Segmentation fault" >&2; exit 139; fi
exec {shutil.which("flite")} "$@"
""")
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim.parent}:{__import__('os').environ['PATH']}")
    assert run_stage("corpus", lambda: main(argv)) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("corpus: voice 'flite-rms' (flite rms) failed: exit status 139 on '")
    assert "Segmentation fault" in message and "apt-get install --reinstall flite" in message
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob("corpus.partial/*/manifest.jsonl"))

    monkeypatch.undo()
    assert main(argv) == 0
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "corpus.partial").exists()


def test_a_stage_reading_a_bad_manifest_ends_in_one_line(tmp_path, capsys):
    from meld.config import run_stage

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"id": "a", "audio": "a.wav"}\n{"id": "a", "audio": "b.wav"}\n')
    assert run_stage("features", lambda: read_manifest(manifest) and 0) == 1
    assert capsys.readouterr().err.strip() == (f"features: {manifest}:2: id 'a' is already the id of line 1; "
                                               "ids must be unique within a split")
