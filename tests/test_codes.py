"""Codec-LM through the DAG, for real: the codes stage, the code store, training, evaluation, the CLI.

One tiny project (the shared debug corpus of test_faults, plus a corrupt file and an empty transcript)
is encoded by a narrow random DAC of 4 levels x 64 codes; a Codec-LM trains 3 steps on it through the
real training entry point (local Ray, 2 DDP workers, MLflow), and is evaluated and synthesised from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from test_faults import TINY_PARAMS, ensure_ray, make_tiny_data

from meld.audio import load_audio
from meld.codes import CODEC_FILE, codec_from_description, encode_waveform
from meld.store import CodeStore, CodeTrainingData, FeatureStore, StoreError, collate_codes, write_code_store

K, N = 4, 64  # tiny codec: 4 levels of 64 codes (DAC 16 kHz: 12 of 1024)

CODEC_PARAMS = {
    **TINY_PARAMS,
    "codec_systems": ["codec_lm"],
    "features": {**TINY_PARAMS["features"], "max_rejected_fraction": 0.2},
    "codec_lm": {
        "args": {"n_levels": K, "codebook_size": N},
        "codec_weights": None,
        "random_codec_width": 2,
        "random_codec_seed": 0,
        "encode_workers": 1,
        "model": {},
        # one Ray Train worker (~12 s less on a slow 2-core machine): codec_lm under DDP is covered by
        # tests/test_ddp_parameters.py, and DDP fault handling by tests/test_faults.py
        "train": {"task": "tts", "num_workers": 1, "max_steps": 3, "checkpoint_every": 3, "frames_per_batch": 800,
                  "loss_weights": {"ce_codes": 1.0}},
    },
    "evaluate": {"splits": ["dev"], "utterances_per_split": 1, "generations": 1, "prompt_seconds": 1.0,
                 "min_seconds": 1.5, "max_seconds": 12.0, "max_length_factor": 1.0, "audio_samples": 1,
                 "ablations": False, "batch_size": 2, "score_workers": 1, "stt_judge_model": None},
    "mlflow": {"experiment": "codes"},
}


def _params(folder: Path, **codec_lm) -> Path:
    params = {**CODEC_PARAMS, "codec_lm": {**CODEC_PARAMS["codec_lm"], **codec_lm}}
    path = folder / f"params-{len(list(folder.glob('params-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _copy_corpus(src: Path, dst: Path, extra_train_rows: list[dict]) -> Path:
    """The corpus's manifests with absolute audio paths (the WAVs stay where they are), plus extra rows."""
    from meld.corpus import read_manifest

    for manifest in sorted(src.glob("*/manifest.jsonl")):
        rows = [{**{k: v for k, v in r.items() if k != "audio_path"}, "audio": r["audio_path"]}
                for r in read_manifest(manifest)]
        if manifest.parent.name == "train":
            rows += extra_train_rows
        (dst / manifest.parent.name).mkdir(parents=True, exist_ok=True)
        (dst / manifest.parent.name / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The debug corpus with two bad rows, its BPE model, and the codes stage's output for a random codec."""
    from pipeline import codes

    data = make_tiny_data(tmp_path_factory)
    root = tmp_path_factory.mktemp("codec-project")
    (root / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVE not really audio")
    first = json.loads((data / "corpus" / "train" / "manifest.jsonl").read_text().splitlines()[0])
    corpus = _copy_corpus(data / "corpus", root / "corpus", [
        {"id": "corrupt-audio", "speaker": "flite-rms", "text": "this file is broken", "audio": str(root / "bad.wav"),
         "duration": 1.0},
        {"id": "empty-transcript", "speaker": "flite-rms", "text": "  ", "audio": str(data / "corpus" / "train" /
                                                                               first["audio"]), "duration": 1.0},
    ])
    params = _params(root)
    assert codes.main(["--params", str(params), "--corpus", str(corpus), "--out", str(root / "codes")]) == 0
    return {"data": data, "root": root, "corpus": corpus, "params": params, "codes": root / "codes"}


# ----------------------------------------------------------------------------- the code store


def test_code_store_round_trip_and_clear_errors(tmp_path):
    rng = np.random.default_rng(0)
    items = [({"id": f"u{i}", "speaker": "s", "text": f"words {i}", "duration": n / 50},
              rng.integers(0, 1024, (n, 12))) for i, n in enumerate((7, 1, 30))]
    summary = write_code_store(tmp_path / "split", iter(items), [{"id": "bad", "reason": "unreadable audio"}])
    assert summary == {"kept": 3, "rejected": 1, "frames": 38}
    store = CodeStore(tmp_path / "split", 12)
    assert store.lengths == [7, 1, 30] and store[0].dtype == np.int16
    for i, (meta, codes) in enumerate(items):
        np.testing.assert_array_equal(store[i], codes)
        assert {k: store.index[i][k] for k in meta} == meta
    with pytest.raises(ValueError, match="written with another width"):
        CodeStore(tmp_path / "split", 8)  # 12-level codes read as 8 levels would be garbage
    with pytest.raises(FileNotFoundError, match="not a code store.*codes stage"):
        CodeStore(tmp_path / "nowhere", 12)

    class Words:  # a tokenizer stand-in: one id per word
        def encode(self, text):
            return [len(w) for w in text.split()]

    data = CodeTrainingData(store, Words())
    assert data.lengths() == [7 + 11, 1 + 11, 30 + 11]  # code frames + the delay pattern's tail
    batch = data.batch([0, 2])
    assert batch["codes"].shape == (2, 30, 12) and batch["codes"].dtype == torch.long
    assert batch["codes_len"].tolist() == [7, 30] and batch["text_len"].tolist() == [2, 2]
    assert torch.equal(batch["codes"][0, :7], torch.from_numpy(items[0][1]))
    assert collate_codes([items[1][1]], [[5]])["codes"].shape == (1, 1, 12)


def test_no_samples_encode_to_no_codes_and_codes_the_codec_cannot_decode_are_named(tmp_path):
    """A prompt cut to no sample (``meld synthesize --prompt-seconds 0.00001``) reached the encoder's first
    convolution, a RuntimeError; codes outside the codec's levels or codebooks (a code store overwritten
    with other bytes of the right size) were an IndexError "index out of range in self", or dropped."""
    from meld.codes import build_codec, decode_codes

    codec, _ = build_codec(None, n_levels=K, codebook_size=N, random_width=2, seed=0)
    none = encode_waveform(codec, np.zeros(0, np.float32))
    assert none.shape == (0, K) and none.dtype == np.int16
    assert decode_codes(codec, none).size == 0
    with pytest.raises(ValueError, match="mono"):
        encode_waveform(codec, np.zeros((2, 16_000), np.float32))  # read as one 2 s signal before

    codes = encode_waveform(codec, np.random.default_rng(0).normal(0, 0.1, 16_000).astype(np.float32))
    assert len(decode_codes(codec, codes)) > 0
    for wrong in (codes[:, : K - 1], np.concatenate([codes, codes[:, :1]], axis=1), codes[:, 0]):
        with pytest.raises(ValueError, match=f"{K} levels decodes"):
            decode_codes(codec, wrong)
    write_code_store(tmp_path / "split", iter([({"id": "u", "speaker": "s", "text": "t", "duration": 1.0}, codes)]), [])
    data = tmp_path / "split" / "codes.i16"
    data.write_bytes(b"\xff\x7f" * (data.stat().st_size // 2))  # the right size, so the store opens
    with pytest.raises(ValueError, match=f"codes 32767..32767 outside the DAC's codebooks of {N}"):
        decode_codes(codec, CodeStore(tmp_path / "split", K)[0])
    with pytest.raises(ValueError, match=r"codes -1\.\.\d+ outside"):
        decode_codes(codec, np.where(np.arange(len(codes))[:, None] == 3, -1, codes))


def _set_code(store_dir: Path, utterance: int, frame: int, level: int, value: int) -> str:
    """Overwrite one code of a written store in place (as a hand edit or a bad disk would); returns its id."""
    store = CodeStore(store_dir, K)
    row = store.index[utterance]
    data = np.memmap(store_dir / "codes.i16", dtype=np.int16, mode="r+", shape=(sum(store.lengths), K))
    data[row["offset"] + frame, level] = value
    data.flush()
    del data
    return row["id"]


@pytest.mark.parametrize("value", [-5, N, N + 1, 3 * N])
def test_codes_outside_the_codebook_are_named_with_their_utterance_level_and_value(tmp_path, value):
    """Codes outside [0, N) reached Codec-LM as an IndexError or a CUDA device assert naming nothing,
    or trained without a word (N is <EOS> to the model). A store opened with the codebook size names
    the file, utterance, level and value on any read, and check_codes finds the first in one scan."""
    rng = np.random.default_rng(0)
    items = [({"id": f"u{i}", "speaker": "s", "text": f"words {i}", "duration": n / 50},
              rng.integers(0, N, (n, K))) for i, n in enumerate((7, 5, 30))]
    write_code_store(tmp_path / "split", iter(items), [])
    CodeStore(tmp_path / "split", K, N).check_codes()  # every code in range: no error

    uid = _set_code(tmp_path / "split", 1, 2, 3, value)
    says = (rf"{tmp_path / 'split' / 'codes.i16'}: utterance {uid} \(entry 2 of index.jsonl\) holds code {value} "
            rf"at level 3, frame 2, outside the codebook's 0..{N - 1} \({N} codes")
    store = CodeStore(tmp_path / "split", K, N)
    with pytest.raises(StoreError, match=says):
        store.check_codes()
    np.testing.assert_array_equal(store[0], items[0][1])  # the other utterances still read
    with pytest.raises(StoreError, match=says):
        store[1]

    class Words:
        def encode(self, text):
            return [len(w) for w in text.split()]

    with pytest.raises(StoreError, match=says):  # the training worker's batches
        CodeTrainingData(store, Words()).batch([0, 1])
    assert CodeStore(tmp_path / "split", K)[1][2, 3] == value  # without a codebook size: read as written


def test_codes_int16_cannot_hold_are_refused_not_wrapped(tmp_path):
    """The store's int16 cast wrapped a code of 40000 into -25536 without a word, and wrote a negative
    one that no codebook holds; the writer now refuses both, naming the utterance (the codes stage's own
    codec cannot make them: codec_lm.args.codebook_size is at most 32767)."""
    meta = {"id": "big", "speaker": "s", "text": "t", "duration": 0.1}
    for wrong in (np.full((5, K), 40_000), np.full((5, K), -1)):
        with pytest.raises(ValueError, match=r"big: codes -?\d+\.\.-?\d+ do not fit the code store's int16 \(0\.\.32767\)"):
            write_code_store(tmp_path / "split", iter([(meta, wrong)]), [])


# ----------------------------------------------------------------------------- the codes stage


def test_codes_stage_encodes_every_split_and_rejects_bad_input(project):
    codes = project["codes"]
    desc = json.loads((codes / CODEC_FILE).read_text())
    assert desc["weights"] is None and desc["random"] is True and (desc["n_levels"], desc["codebook_size"]) == (K, N)
    rejected = {r["id"]: r["reason"] for r in map(json.loads, (codes / "train" / "rejected.jsonl").read_text().splitlines())}
    assert set(rejected) == {"corrupt-audio", "empty-transcript"}
    assert "unreadable audio" in rejected["corrupt-audio"] and "empty" in rejected["empty-transcript"]
    for split in ("train", "dev"):
        store = CodeStore(codes / split, K)
        # the same utterances as the feature store (one set of checks for both stages)
        assert [r["id"] for r in store.index] == [r["id"] for r in FeatureStore(project["data"] / "features" / split).index]
        for i in range(len(store)):
            assert store.lengths[i] == math.ceil(store.index[i]["duration"] * 16_000 / 320)  # 50 Hz
            assert 0 <= store[i].min() and store[i].max() < N
    # the codes are what the described codec gives for the audio
    codec = codec_from_description(desc)
    row = json.loads((project["corpus"] / "dev" / "manifest.jsonl").read_text().splitlines()[0])
    np.testing.assert_array_equal(CodeStore(codes / "dev", K)[0], encode_waveform(codec, load_audio(row["audio"])))


def test_the_worker_count_changes_how_fast_not_the_codes(project, tmp_path):
    """dvc.yaml leaves ``encode_workers`` out of the codes stage's params, so that a new worker count
    does not re-encode the corpus (hours on LibriSpeech): every worker encodes one utterance at a time
    in one torch thread, so two processes write the same bytes as one."""
    from pipeline import codes

    params = _params(tmp_path, encode_workers=2)
    assert codes.main(["--params", str(params), "--corpus", str(project["corpus"]), "--out", str(tmp_path / "codes")]) == 0
    one, two = project["codes"], tmp_path / "codes"
    written = sorted(p.relative_to(one).as_posix() for p in one.rglob("*") if p.is_file())
    assert written == sorted(p.relative_to(two).as_posix() for p in two.rglob("*") if p.is_file())
    assert "train/codes.i16" in written
    for name in written:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


@pytest.fixture(scope="module")
def weights_codes(project, tmp_path_factory) -> Path:
    """The codes stage with ``codec_weights`` = the random codec saved in DAC's release format."""
    from pipeline import codes

    root = tmp_path_factory.mktemp("weights")
    desc = json.loads((project["codes"] / CODEC_FILE).read_text())
    codec = codec_from_description(desc)
    weights = root / "weights_16khz.pth"
    torch.save({"state_dict": codec.state_dict(), "metadata": {"kwargs": desc["random_kwargs"]}}, weights)
    params = _params(root, codec_weights=str(weights))
    assert codes.main(["--params", str(params), "--corpus", str(project["corpus"]), "--out", str(root / "codes")]) == 0
    return root / "codes"


@pytest.mark.parametrize("prompt_seconds", [1.0, 1.01])
def test_a_prompt_cut_with_its_margin_encodes_to_the_evaluations_prompt_codes(project, prompt_seconds):
    """``meld synthesize`` encoded only the prompt's samples: its last frames differed from the
    evaluation's (the codes stage encodes whole utterances, and the encoder sees past the cut), and
    1.01 s gave 51 frames where the evaluation takes 50. The CLI's prompt (the prompt and a 1 s
    margin, :data:`meld.cli.synthesize.PROMPT_MARGIN_S`) now gives the evaluation's codes exactly."""
    from meld.cli.synthesize import PROMPT_MARGIN_S
    from meld.codes import prompt_code_frames, prompt_codes

    codec = codec_from_description(json.loads((project["codes"] / CODEC_FILE).read_text()))
    store = CodeStore(project["codes"] / "dev", codec.n_codebooks)
    manifest = {r["id"]: r for r in map(json.loads, (project["corpus"] / "dev" / "manifest.jsonl").read_text().splitlines())}
    i = max(range(len(store)), key=lambda k: store.lengths[k])  # one long enough for prompt and margin
    wav = load_audio(project["corpus"] / "dev" / manifest[store.index[i]["id"]]["audio"])
    assert len(wav) > (prompt_seconds + PROMPT_MARGIN_S) * codec.sample_rate
    whole = store[i]
    expected = whole[: prompt_code_frames(len(whole), prompt_seconds, codec.frame_rate)]
    got = prompt_codes(codec, wav[: int(round((prompt_seconds + PROMPT_MARGIN_S) * codec.sample_rate))], prompt_seconds)
    np.testing.assert_array_equal(got, expected)


def test_weights_file_makes_the_same_codes_and_wrong_shapes_fail(project, weights_codes, tmp_path):
    """A weights file goes through DACCodec.load; the codes stage records it, and checks its shape."""
    from pipeline import codes

    random_desc = json.loads((project["codes"] / CODEC_FILE).read_text())
    real = json.loads((weights_codes / CODEC_FILE).read_text())
    assert real["random"] is False and real["weights"].endswith("weights_16khz.pth")
    assert real["state_sha256"] == random_desc["state_sha256"]
    for split in ("train", "dev"):
        assert (weights_codes / split / "codes.i16").read_bytes() == (project["codes"] / split / "codes.i16").read_bytes()

    wrong = _params(tmp_path, codec_weights=real["weights"], args={"n_levels": K + 1, "codebook_size": N})
    with pytest.raises(SystemExit, match=f"codec has {K} levels of {N} codes.*asks for {K + 1}"):
        codes.main(["--params", str(wrong), "--corpus", str(project["corpus"]), "--out", str(tmp_path / "x")])
    missing = _params(tmp_path, codec_weights=str(tmp_path / "nowhere.pth"))
    with pytest.raises(SystemExit, match="nowhere.pth not found.*nothing is downloaded"):
        codes.main(["--params", str(missing), "--corpus", str(project["corpus"]), "--out", str(tmp_path / "x")])


def test_a_rebuilt_codec_must_be_the_one_that_made_the_codes(tmp_path):
    from meld.codes import CodecMismatch, build_codec
    from meld.models.codec_lm import DACCodec

    codec, desc = build_codec(None, n_levels=K, codebook_size=N, random_width=2, seed=3)
    assert codec_from_description(desc).state_dict().keys() == codec.state_dict().keys()
    with pytest.raises(CodecMismatch, match="hash"):  # the same architecture, another seed
        codec_from_description({**desc, "seed": 4})
    kwargs = {**desc["random_kwargs"], "sample_rate": 24_000}
    torch.save({"state_dict": DACCodec(**kwargs).state_dict(), "metadata": {"kwargs": kwargs}}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="24000 Hz codec.*16 kHz"):
        build_codec(tmp_path / "w.pth", n_levels=K, codebook_size=N, random_width=2, seed=0)


def test_a_split_of_mostly_bad_audio_fails_the_stage(project, tmp_path):
    from pipeline import codes

    corpus = tmp_path / "corpus"
    (corpus / "train").mkdir(parents=True)
    (corpus / "train" / "manifest.jsonl").write_text(json.dumps(
        {"id": "only-bad", "speaker": "s", "text": "broken", "audio": str(project["root"] / "bad.wav"), "duration": 1}) + "\n")
    with pytest.raises(SystemExit, match="rejected 1/1 utterances.*only-bad: .*unreadable audio"):
        codes.main(["--params", str(project["params"]), "--corpus", str(corpus), "--out", str(tmp_path / "codes")])


def test_a_train_split_of_no_utterance_fails_the_stage(project, tmp_path):
    """It wrote an empty code store and exited 0; training then stopped on "no utterances to batch",
    pointing at the features stage's summary."""
    from pipeline import codes

    (tmp_path / "corpus" / "train").mkdir(parents=True)
    (tmp_path / "corpus" / "train" / "manifest.jsonl").write_text("")
    with pytest.raises(SystemExit, match="train split of .* kept no utterance of 0: nothing for codec_lm to train on"):
        codes.main(["--params", str(project["params"]), "--corpus", str(tmp_path / "corpus"), "--out", str(tmp_path / "codes")])
    assert not (tmp_path / "codes").exists()  # nothing half-written


def test_manifest_durations_out_of_range_stop_the_codes_stage_before_encoding(project, tmp_path):
    """As in the features stage: the manifest's durations alone over features.max_rejected_fraction stop
    the stage before any audio is encoded (the full DAC runs at about real time on a CPU)."""
    from pipeline import codes

    corpus = tmp_path / "corpus"
    (corpus / "train").mkdir(parents=True)
    (corpus / "train" / "manifest.jsonl").write_text(json.dumps(
        {"id": "long", "speaker": "s", "text": "words", "audio": "nowhere.wav", "duration": 99.0}) + "\n")
    with pytest.raises(SystemExit, match=r"codes: split 'train' has 1/1 utterances \(100.0%\) outside "):
        codes.main(["--params", str(project["params"]), "--corpus", str(corpus), "--out", str(tmp_path / "codes")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


# ----------------------------------------------------------------------------- training, evaluation, CLI


@pytest.fixture(scope="module")
def trained(project):
    """codec_lm trained 3 steps on the code store through the train stage's entry point (1 Ray Train worker)."""
    import mlflow

    from ray_jobs.train import main as train_main

    ensure_ray()
    root = project["root"]
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)  # build_config passes it on to the workers
        mlflow.set_tracking_uri(uri)
        mlflow.create_experiment("codes", artifact_location=(root / "mlartifacts").as_uri())
        assert train_main(["--params", str(project["params"]), "--system", "codec_lm", "--codes", str(project["codes"]),
                           "--bpe", str(project["data"] / "bpe" / "bpe.model"), "--out", str(root / "model"),
                           "--project-root", str(root), "--ray-storage", str(root / "ray"), "--max-failures", "0"]) == 0
    return {**project, "model": root / "model" / "model.pt", "uri": uri}


def test_codec_lm_trains_from_the_code_store(trained):
    from mlflow.tracking import MlflowClient

    from meld.training import load_model

    model, state = load_model(trained["model"])
    assert state["system"] == "codec_lm" and state["step"] == 3
    assert (model.n_levels, model.codebook_size) == (K, N)
    assert state["extra"]["codec"] == json.loads((trained["codes"] / CODEC_FILE).read_text())
    run_id = (trained["root"] / "model" / "checkpoints" / "mlflow_run_id").read_text().strip()
    losses = MlflowClient(trained["uri"]).get_metric_history(run_id, "loss/ce_codes")
    assert [m.step for m in losses] == [1, 2, 3] and all(0 < m.value < 10 for m in losses)


def test_training_driver_needs_a_code_store_for_codec_lm(trained):
    from ray_jobs.train import build_config

    params = yaml.safe_load(trained["params"].read_text())
    kwargs = dict(system="codec_lm", features=trained["data"] / "features", bpe=trained["data"] / "bpe" / "bpe.model",
                  codebook=trained["data"] / "codebook", out=trained["root"] / "x")
    with pytest.raises(ValueError, match="give --codes.*codec_systems"):
        build_config(params, **kwargs)
    params["codec_lm"]["args"]["n_levels"] = K + 2
    with pytest.raises(ValueError, match=f"codes of {K} levels.*asks for {K + 2}"):
        build_config(params, codes=trained["codes"], **kwargs)


def _train_argv(project, codes: Path, params: Path, out: Path) -> list[str]:
    return ["--params", str(params), "--system", "codec_lm", "--codes", str(codes),
            "--bpe", str(project["data"] / "bpe" / "bpe.model"), "--out", str(out / "model"),
            "--project-root", str(out), "--ray-storage", str(out / "ray"), "--max-failures", "0"]


@pytest.mark.parametrize("case", ["code N", "negative code", "codec.json edited"])
def test_training_refuses_codes_outside_the_codebook_in_one_line_before_ray(project, tmp_path, case, capsys):
    """A code store with codes outside the model's codebook trained (a code of N is <EOS> to the model)
    or failed inside a Ray worker, an IndexError / CUDA device assert in a WorkerGroupError traceback
    after max_failures retries. The train stage's driver now scans the codes before Ray starts and
    stops with one line naming the file, utterance, level, value and codebook size."""
    import shutil

    from meld.config import run_stage
    from ray_jobs.train import main as train_main

    codes = tmp_path / "codes"
    shutil.copytree(project["codes"], codes)
    params, size = project["params"], N
    if case == "codec.json edited":  # another codec's store, its description edited to the model's shape
        size = N // 2
        desc = json.loads((codes / CODEC_FILE).read_text())
        (codes / CODEC_FILE).write_text(json.dumps({**desc, "codebook_size": size}))
        params = _params(tmp_path, args={"n_levels": K, "codebook_size": size})
        store = CodeStore(codes / "train", K)
        i = next(i for i in range(len(store)) if (store[i] >= size).any())
        frame, level = (int(x) for x in np.argwhere(store[i] >= size)[0])
        uid, value = store.index[i]["id"], int(store[i][frame, level])
    else:
        value, (frame, level) = (N if case == "code N" else -3), (4, K - 1)
        uid = _set_code(codes / "train", 1, frame, level, value)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert run_stage("train", lambda: train_main(_train_argv(project, codes, params, tmp_path))) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"train: {codes / 'train' / 'codes.i16'}: utterance {uid} "), err
    assert f"holds code {value} at level {level}, frame {frame}, outside the codebook's 0..{size - 1} ({size} codes" in err[0]
    assert not (tmp_path / "ray").exists() and not (tmp_path / "model").exists()  # stopped before Ray


def test_a_store_changed_after_the_drivers_scan_is_named_by_the_training_worker(project, tmp_path):
    """The worker checks every utterance it batches (microseconds): codes overwritten after the driver's
    scan are named there (file, utterance, level, value) instead of an embedding IndexError or a loss
    target out of bounds, in a real Ray Train run of one worker."""
    import shutil

    from ray_jobs.train import build_config, run_training

    ensure_ray()
    codes = tmp_path / "codes"
    shutil.copytree(project["codes"], codes)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        config = build_config(yaml.safe_load(project["params"].read_text()), system="codec_lm",
                              features=project["data"] / "features", bpe=project["data"] / "bpe" / "bpe.model",
                              codebook=project["data"] / "codebook", out=tmp_path / "model", project_root=tmp_path,
                              codes=codes, threads_per_worker=1)
        for i in range(len(CodeStore(codes / "train", K))):  # whichever utterance the first batch reads
            _set_code(codes / "train", i, 0, K - 1, N + 5)
        # the worker's own StoreError, which run_stage prints as one line, not Ray's WorkerGroupError around it
        with pytest.raises(StoreError, match=rf"^{codes / 'train' / 'codes.i16'}: utterance \S+ \(entry \d+ of "
                                             rf"index.jsonl\) holds code {N + 5} at level {K - 1}, frame 0, outside "
                                             rf"the codebook's 0..{N - 1} \({N} codes") as raised:
            run_training(config, num_workers=1, use_gpu=False, storage_path=str(tmp_path / "ray"), max_failures=0)
        assert type(raised.value.__cause__).__name__ == "WorkerGroupError"


def test_a_run_ends_in_the_workers_input_error_only_when_every_failed_worker_raised_one():
    """A worker's bug next to another's input error keeps Ray's error (and its tracebacks): the input
    error alone would hide it."""
    from ray.train import WorkerGroupError

    from meld.config import ConfigError
    from ray_jobs.train import workers_input_error

    store, config = StoreError("codes.i16: bad code"), ConfigError("train.lr: bad")
    assert workers_input_error(WorkerGroupError("x", {1: config, 0: store})) is store  # lowest rank first
    assert workers_input_error(WorkerGroupError("x", {0: store, 1: KeyError("bug")})) is None
    assert workers_input_error(WorkerGroupError("x", {})) is None
    assert workers_input_error(RuntimeError("not Ray's")) is None


def _evaluate(trained, codes: Path, out: Path) -> dict:
    from pipeline import evaluate

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", trained["uri"])
        assert evaluate.main(["--params", str(trained["params"]), "--system", "codec_lm", "--model",
                              str(trained["model"]), "--codes", str(codes), "--corpus", str(trained["corpus"]),
                              "--run-id-file", str(trained["root"] / "model" / "checkpoints" / "mlflow_run_id"),
                              "--out", str(out / "eval"), "--metrics", str(out / "metrics" / "codec_lm.json")]) == 0
    return json.loads((out / "metrics" / "codec_lm.json").read_text())


def test_evaluate_with_a_random_codec_reports_no_numbers(trained, tmp_path):
    from pipeline import report

    metrics = _evaluate(trained, trained["codes"], tmp_path)
    assert metrics["codec_weights"] == "unavailable" and metrics["unavailable"].startswith("codec weights unavailable")
    assert metrics["splits"] == {} and "wer" not in json.dumps(metrics)  # no numbers to mistake for results
    assert metrics["pipeline_check"]["dev"]["generations"] == 1  # but the path ran: generated and decoded
    (sample,) = [p for p in (tmp_path / "eval" / "samples" / "dev").glob("*.wav") if "ground_truth" not in p.name]
    wav, sr = sf.read(str(sample))
    assert sr == 16_000 and wav.size > 16_000  # at least the 1 s prompt, decoded
    report_params = tmp_path / "report.yaml"
    report_params.write_text(yaml.safe_dump({"systems": [], "codec_systems": ["codec_lm"]}))
    assert report.main(["--params", str(report_params), "--metrics", str(tmp_path / "metrics"),
                        "--out", str(tmp_path / "reports")]) == 0
    summary = (tmp_path / "reports" / "summary.md").read_text()
    assert "| codec_lm | – | codec weights unavailable" in summary


def test_evaluate_with_codec_weights_scores_like_the_other_systems(trained, weights_codes, tmp_path):
    """The same codec loaded from a weights file (identical codes, so the trained model fits it) is scored."""
    metrics = _evaluate(trained, weights_codes, tmp_path)
    assert metrics["codec_weights"].endswith("weights_16khz.pth") and "unavailable" not in metrics
    dev = metrics["splits"]["dev"]
    assert dev["generations"] == 1 and dev["duration_ratio"] > 0 and dev["max_length_hits"] in (0, 1)
    assert dev["longest_silence_s"] is not None and dev["ground_truth_minutes"] > 0
    assert "wer" in dev and "wer_ground_truth_vocoded" in dev  # flite voices: the judge reads them
    # SIM needs 0.5 s of continuation; an untrained model may say <EOS> sooner
    assert dev["sim"] is not None or dev["generated_minutes"] * 60 < 0.5


def test_cli_synthesizes_with_the_recorded_codec_and_asks_for_missing_weights(trained, tmp_path, capsys):
    from meld.cli import main

    prompt = trained["corpus"] / "dev" / "manifest.jsonl"
    audio = json.loads(prompt.read_text().splitlines()[0])["audio"]
    out = tmp_path / "out.wav"
    argv = ["synthesize", "--checkpoint", str(trained["model"]), "--prompt", audio, "--prompt-seconds", "1",
            "--text", "the words of the prompt and more", "--out", str(out), "--max-seconds", "0.5", "--device", "cpu"]
    assert main(argv) == 0
    wav, sr = sf.read(str(out))
    assert sr == 16_000 and 0.9 * 16_000 < wav.size <= 1.6 * 16_000  # 1 s prompt + at most 0.5 s generated
    assert "prompt 1.00 s" in capsys.readouterr().out

    # --list: the same utterance batched with one without a prompt; batch 0 draws from the same seed
    listing = tmp_path / "utts.tsv"
    listing.write_text(f"{tmp_path / 'a.wav'}\t{audio}\tthe words of the prompt and more\n"
                       f"{tmp_path / 'b.wav'}\t-\tthe words of the prompt and more\n")
    list_argv = ["synthesize", "--checkpoint", str(trained["model"]), "--list", str(listing), "--prompt-seconds", "1",
                 "--max-seconds", "0.5", "--device", "cpu"]
    assert main([*list_argv, "--batch-size", "1"]) == 0
    assert "wrote 2 of 2 utterances" in capsys.readouterr().out
    np.testing.assert_allclose(sf.read(str(tmp_path / "a.wav"))[0], wav, rtol=0, atol=1.5 / 32768)
    assert sf.info(str(tmp_path / "b.wav")).frames <= 0.6 * 16_000  # no prompt: at most 0.5 s generated
    for name in ("a.wav", "b.wav"):
        (tmp_path / name).unlink()
    assert main([*list_argv, "--batch-size", "2"]) == 0  # both in one batch of the code generation
    assert "wrote 2 of 2 utterances" in capsys.readouterr().out
    assert sf.info(str(tmp_path / "a.wav")).frames >= 0.9 * 16_000 and (tmp_path / "b.wav").is_file()

    # a checkpoint whose codes came from weights that are not on this machine: say what to give
    state = torch.load(trained["model"], weights_only=True)
    state["extra"]["codec"] = {**state["extra"]["codec"], "random": False, "weights": str(tmp_path / "gone.pth")}
    moved = tmp_path / "moved.pt"
    torch.save(state, moved)
    assert main([*argv[:2], str(moved), *argv[3:]]) == 2
    assert "--codec-weights" in capsys.readouterr().err
    # weights that are there but cut short: one line naming the file, not a traceback
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(b"PK\x03\x04" + bytes(100))
    assert main([*argv[:2], str(moved), *argv[3:], "--codec-weights", str(truncated)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{truncated}: not a readable DAC weights file" in err[0], err


@pytest.mark.parametrize("content, says", [
    ('{"n_levels": 12', "not a readable JSON file"),
    ("[1, 2]", "holds a JSON list"),
    ('{"n_levels": 12, "codebook_size": 1024}', "not a codec description (no weights, random, seed"),
])
def test_a_broken_codec_description_is_named_by_training_and_evaluation(project, tmp_path, content, says, capsys):
    """A truncated or hand-edited codec.json was a JSONDecodeError or KeyError traceback in training and
    evaluation, naming no file; both now read it through one check, a one-line error under run_stage."""
    import shutil

    from meld.codes import read_codec_description
    from meld.config import run_stage

    codes = tmp_path / "codes"
    shutil.copytree(project["codes"], codes)
    assert read_codec_description(codes) == json.loads((project["codes"] / CODEC_FILE).read_text())
    (codes / CODEC_FILE).write_text(content)
    assert run_stage("train", lambda: read_codec_description(codes) and 0) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"train: {codes / CODEC_FILE}: ") and says in err and len(err.splitlines()) == 1
