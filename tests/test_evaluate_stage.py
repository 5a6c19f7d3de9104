"""The evaluate stage's checks before any work: every TTS split it is asked for must exist, its device, the
Ray cluster's room for its decoding pool, and the vocoder's and judges' weights."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from meld.config import EvaluateConfig
from meld.store import FeatureStore
from pipeline import evaluate

NO_CUDA = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")


def _run_stage(tmp_path, evaluate_params: dict, *extra: str) -> None:
    """The stage on an empty corpus that has a test split only, with no model file at all: an error
    about anything else shows that it is checked before the model loads. ``extra``: more arguments."""
    (tmp_path / "features" / "test").mkdir(parents=True, exist_ok=True)
    (tmp_path / "features" / "test" / "index.jsonl").write_text("")
    (tmp_path / "corpus" / "test").mkdir(parents=True, exist_ok=True)
    (tmp_path / "corpus" / "test" / "manifest.jsonl").write_text("")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": evaluate_params}))
    evaluate.main(["--params", str(params), "--system", "meld", "--model", str(tmp_path / "no-model.pt"),
                   "--features", str(tmp_path / "features"), "--corpus", str(tmp_path / "corpus"),
                   "--out", str(tmp_path / "eval"), "--metrics", str(tmp_path / "metrics.json"), *extra])


def test_a_split_missing_from_the_corpus_stops_before_any_generation(tmp_path):
    with pytest.raises(SystemExit, match=r"evaluate.splits: \['test_other'\] not in .*this corpus has \['test'\]"):
        _run_stage(tmp_path, {"splits": ["test", "test_other"]})
    assert not (tmp_path / "eval").exists()  # nothing started


def test_a_split_missing_from_the_code_store_stops_a_codec_evaluation_before_any_generation(tmp_path):
    """Codec-LM reads its prompts from --codes, not --features: the check of the splits was skipped for it,
    so a split missing there stopped the stage only when reached, after the earlier splits' generation and
    scoring (a codec evaluation saves nothing before its end)."""
    (tmp_path / "codes" / "test").mkdir(parents=True)
    (tmp_path / "codes" / "test" / "index.jsonl").write_text("")
    for split in ("test", "test_unseen"):
        (tmp_path / "corpus" / split).mkdir(parents=True)
        (tmp_path / "corpus" / split / "manifest.jsonl").write_text("")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": {"splits": ["test", "test_unseen"]}}))
    with pytest.raises(SystemExit, match=rf"^evaluate.splits: \['test_unseen'\] not in {tmp_path / 'codes'} / "
                                         rf"{tmp_path / 'corpus'} \(this corpus has \['test'\]\)"):
        evaluate.main(["--params", str(params), "--system", "codec_lm", "--model", str(tmp_path / "no-model.pt"),
                       "--codes", str(tmp_path / "codes"), "--corpus", str(tmp_path / "corpus"),
                       "--out", str(tmp_path / "eval"), "--metrics", str(tmp_path / "metrics.json")])
    assert not (tmp_path / "eval").exists()


@NO_CUDA
def test_a_device_this_machine_lacks_stops_before_the_model_loads(tmp_path):
    with pytest.raises(SystemExit, match="evaluate.device cuda: CUDA is not available on this machine"):
        _run_stage(tmp_path, {"splits": ["test"], "device": "cuda"})


@NO_CUDA
def test_judges_on_a_device_this_machine_lacks_stop_before_the_model_loads(tmp_path):
    with pytest.raises(SystemExit, match="evaluate.score_device cuda: CUDA is not available on this machine"):
        _run_stage(tmp_path, {"splits": ["test"], "score_device": "cuda"})


def test_a_decode_pool_the_cluster_cannot_hold_stops_before_the_model_loads(tmp_path):
    import ray
    from test_faults import ensure_ray

    ensure_ray()  # the session's cluster, which the stage joins (as under `ray job submit`)
    cpus = int(ray.cluster_resources()["CPU"])
    with pytest.raises(SystemExit, match=f"evaluate: decode_workers={cpus + 1} needs {cpus + 1} CPUs, one per "
                                         f"worker; the Ray cluster has {cpus}: lower evaluate.decode_workers"):
        _run_stage(tmp_path, {"splits": ["test"], "decode_workers": cpus + 1})
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("score_workers", [1, 2])
def test_a_vocoder_that_does_not_load_stops_a_joint_evaluation_before_its_stt_part(score_workers, tmp_path,
                                                                                     monkeypatch):
    """The scorer's backends load before the STT evaluation (on LibriSpeech, hours of beam search for a
    joint model), and weights that are there but broken end the stage in one line naming the file, whether
    the scorer is built in this process (one worker, or a one-core machine) or in worker processes."""
    model = _tiny_checkpoint(tmp_path, "joint")
    _feature_store(tmp_path / "features" / "test", [("flite-slt", SENTENCES[0], 40)])
    (tmp_path / "corpus" / "test").mkdir(parents=True)
    (tmp_path / "corpus" / "test" / "manifest.jsonl").write_text("")
    (tmp_path / "hifigan").mkdir()
    (tmp_path / "hifigan" / "config.json").write_text("{cut short")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": {"splits": ["test"], "stt_splits": ["test"], "vocoder": "hifigan",
                                                   "vocoder_path": str(tmp_path / "hifigan"),
                                                   "score_workers": score_workers}}))

    def stt_evaluated_first(*args, **kwargs):
        raise AssertionError("the STT evaluation ran before the vocoder loaded")

    monkeypatch.setattr(evaluate, "evaluate_stt", stt_evaluated_first)
    with pytest.raises(SystemExit, match=f"evaluate: the vocoder or a judge does not load: "
                                         f"{tmp_path / 'hifigan' / 'config.json'}: not a readable JSON file"):
        evaluate.main(["--params", str(params), "--system", "meld_joint", "--model", str(model),
                       "--features", str(tmp_path / "features"), "--corpus", str(tmp_path / "corpus"),
                       "--out", str(tmp_path / "eval"), "--metrics", str(tmp_path / "metrics.json")])
    assert not (tmp_path / "metrics.json").exists()


def test_device_names_resolve_or_say_which_option_named_them():
    import torch

    from meld.devices import resolve_device

    assert resolve_device("cpu", "evaluate.device") == "cpu"
    assert resolve_device("auto", "evaluate.device") == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", ""):
        with pytest.raises(ValueError, match=f"^evaluate.device {bad}: unknown device"):
            resolve_device(bad, "evaluate.device")
    with pytest.raises(ValueError, match=r"^--device cuda:\d+: "):
        resolve_device(f"cuda:{torch.cuda.device_count()}", "--device")  # one past the last GPU, or no CUDA


SENTENCES = ["the quick brown fox jumps over the lazy dog", "she wrote a long letter to her mother"]


def _tiny_checkpoint(folder: Path, task: str) -> Path:
    """A tiny random MELD (r = 2) saved as a finished model: its BPE model and statistics inside."""
    import numpy as np
    import torch
    from conftest import tiny_meld

    from meld.features import N_MELS
    from meld.text import BPETokenizer, train_bpe
    from meld.training import save_checkpoint

    bpe = train_bpe(SENTENCES, folder / "bpe", vocab_size=30)
    model, kwargs = tiny_meld(reduction=2, n_text=BPETokenizer(bpe).vocab_size, codebook_size=16)
    extra = {"reduction_factor": 2, "norm_mean": torch.zeros(N_MELS), "norm_std": torch.ones(N_MELS),
             "bpe_model": torch.from_numpy(np.frombuffer(bpe.read_bytes(), dtype=np.uint8).copy()), "task": task}
    return save_checkpoint(folder / "model.pt", system="meld", model=model, model_kwargs=kwargs, step=1, extra=extra)


def _feature_store(folder: Path, utterances: list[tuple[str, str, int]]) -> FeatureStore:
    """A feature store of random log-mels: (speaker, text, frames) per utterance, ids in that order."""
    import numpy as np

    from meld.features import FRAME_RATE, N_MELS
    from meld.store import write_store

    rng = np.random.default_rng(0)
    write_store(folder, [({"id": f"u{k:02d}", "speaker": spk, "text": text, "duration": n / FRAME_RATE},
                          rng.normal(-2.0, 1.0, (n, N_MELS))) for k, (spk, text, n) in enumerate(utterances)], [])
    return FeatureStore(folder)


@pytest.mark.parametrize("task, judged", [("tts", False), ("joint", True), ("stt", True)])
def test_a_tts_only_checkpoint_is_no_meld_stt_judge_and_a_missing_one_is_skipped(task, judged, tmp_path, caplog):
    """evaluate.stt_judge_model: a model trained for TTS only is no judge (how a config under dvc names
    none, DVC taking no null); any model that learned STT is one."""
    import logging

    path = _tiny_checkpoint(tmp_path, task)
    with caplog.at_level(logging.INFO, logger="meld.evaluate"):
        judge = evaluate.load_stt_judge(str(path), 0.0, "cpu")
    assert (judge is not None) == judged
    assert judged or "trained for TTS only: no MELD-STT judge" in caplog.text
    if judged:  # the evaluated model's own STT side is the judge when it is the same file, however named
        evaluated = evaluate.load_stt_model(path)
        assert evaluate.load_stt_judge(str(tmp_path / "." / "model.pt"), 0.0, "cpu", evaluated=evaluated) is evaluated
        other = Path(shutil.copyfile(path, tmp_path / "other.pt"))  # the same bytes, another file: loaded
        assert evaluate.load_stt_judge(str(other), 0.0, "cpu", evaluated=evaluated).path == str(other)
    assert evaluate.load_stt_judge(None, 0.0, "cpu") is None
    assert evaluate.load_stt_judge(str(tmp_path / "absent.pt"), 0.0, "cpu") is None
    assert "absent.pt does not exist" in caplog.text


def test_mel_plots_share_one_time_axis_and_say_where_the_prompt_ends(tmp_path, monkeypatch):
    """A generation three times too long must look three times too long beside its ground truth."""
    import matplotlib.pyplot as plt
    import numpy as np

    closed = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: closed.append(fig))
    path = evaluate.plot_mels(tmp_path / "m.png", [("ground truth", np.zeros((40, 80))), ("generated", np.zeros((120, 80)))],
                              prompt_frames_n=10)
    assert path.is_file()
    evaluate.plot_mels(tmp_path / "n.png", [("generated", np.zeros((120, 80)))], prompt_frames_n=0)
    (fig, no_prompt) = closed
    assert [ax.get_xlim() for ax in fig.axes] == [(-0.5, 119.5)] * 2
    # the line's label says where it is (10 frames of 16 ms), whatever evaluate.prompt_seconds is
    assert "end of the 0.16 s prompt" in fig.axes[-1].get_xlabel()
    assert "no prompt" in no_prompt.axes[-1].get_xlabel() and " s prompt" not in no_prompt.axes[-1].get_xlabel()
    real_close(fig)
    real_close(no_prompt)


@pytest.mark.parametrize("system", ["meld", "meld_joint", "melle", "mel_lm", "dmel", "codec_lm"])
def test_a_model_loaded_without_weights_is_the_same_model_holding_no_tensor(tmp_path, system):
    """What the evaluation's own process loads when a decoding pool runs the models: the same structure,
    attributes and extras as a full load, every parameter and buffer on the meta device (no memory)."""
    from test_faults import TINY_PARAMS

    from meld.config import ModelConfig
    from meld.models.builders import build_model, system_kwargs
    from meld.training import load_model, save_checkpoint

    kwargs = system_kwargs(system, ModelConfig.from_dict(TINY_PARAMS["model"], "model"), n_text=20, codebook_size=16)
    path = save_checkpoint(tmp_path / "model.pt", system=system, model=build_model(system, kwargs),
                           model_kwargs=kwargs, step=7, extra={"task": "tts", "norm_mean": __import__("torch").ones(80)})
    full, full_state = load_model(path)
    bare, bare_state = load_model(path, weights=False)
    assert type(bare) is type(full) and bare.system == full.system and not bare.training
    assert bare_state["system"] == system
    tensors = dict(bare.named_parameters()) | dict(bare.named_buffers())
    assert tensors and all(t.is_meta for t in tensors.values())
    assert {n: t.shape for n, t in tensors.items()} == {
        n: t.shape for n, t in (dict(full.named_parameters()) | dict(full.named_buffers())).items()}
    for attr in ("reduction_factor", "frame_dim", "stt_ctc", "n_levels"):
        assert getattr(bare, attr, None) == getattr(full, attr, None), attr
    assert bare_state["step"] == 7 and bare_state["model_kwargs"] == kwargs
    assert (bare_state["extra"]["norm_mean"].numpy() == full_state["extra"]["norm_mean"].numpy()).all()


@pytest.mark.parametrize("prompt_seconds", [0.0, 0.01])  # none, and one that rounds to no r = 2 step
def test_a_split_without_a_prompt_is_scored_with_no_sim(prompt_seconds, tmp_path):
    """evaluate.prompt_seconds 0 is documented as "no prompt" and passes the config checks; it used to fail
    in scoring after the split's generation (an empty prompt reached the speaker embedder). Now the split
    is scored, and SIM, with no speaker to compare to, is None over 0 generations."""
    import subprocess

    import numpy as np

    from meld.audio import SAMPLE_RATE, load_audio
    from meld.evaluation.scoring import ScorerSpec, ScoringPool
    from meld.features import NormStats, log_mel
    from meld.store import write_store
    from meld.text import BPETokenizer
    from meld.training import load_model

    if shutil.which("flite") is None:
        pytest.skip("flite is not installed")
    items, audio = [], {}
    for k, (voice, text) in enumerate(zip(("slt", "rms"), SENTENCES)):
        wav_path = tmp_path / f"{voice}.wav"
        subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(wav_path)], check=True)
        wav = load_audio(wav_path)
        items.append(({"id": f"u{k}", "speaker": f"flite-{voice}", "text": text, "duration": wav.size / SAMPLE_RATE},
                      log_mel(wav, SAMPLE_RATE)))
        audio[f"u{k}"] = str(wav_path)
    write_store(tmp_path / "test", items, [])
    model, state = load_model(_tiny_checkpoint(tmp_path, "tts"))
    cfg = EvaluateConfig.from_dict({"splits": ["test"], "utterances_per_split": 2, "generations": 1,
                                    "prompt_seconds": prompt_seconds, "min_seconds": 1.0, "max_length_factor": 0.5,
                                    "audio_samples": 1}, "evaluate")
    spec = ScorerSpec("griffin_lim", None, None, None, "resemblyzer", None)
    with ScoringPool(spec, 1) as scorer:
        summary, rows = evaluate.evaluate_split(
            model, state, NormStats(np.zeros(80), np.ones(80)), BPETokenizer(tmp_path / "bpe.model"),
            FeatureStore(tmp_path / "test"), audio, cfg, "test", scorer, (), tmp_path / "eval", {"name": "meld"}, {})
    assert summary["generations"] == len(rows) == 2
    assert summary["sim"] is None and summary["sim_generations"] == 0
    assert summary["sim_ground_truth_continuation"] is None  # not a too-short continuation: no prompt speaker
    assert all("sim" not in r for r in rows) and summary["duration_ratio"] is not None


def test_the_summary_counts_the_generations_sim_averages_over():
    """SIM leaves out generations under the 0.5 s floor; the summary says over how many it averaged."""
    rows = [{"id": f"u{k}", "text": "a b", "generated_seconds": 1.0, "true_continuation_seconds": 1.0,
             "duration_ratio": 1.0, "longest_silence_s": 0.0, "gt_longest_silence_s": 0.0, "hit_max_length": False,
             **({"sim": sim} if sim is not None else {})} for k, sim in enumerate([0.5, None, 0.7, None])]
    summary = evaluate.summarise(rows, 1.0, 4.0)
    assert summary["sim_generations"] == 2 and summary["generations"] == 4
    assert summary["sim"] == pytest.approx(0.6)


@pytest.mark.parametrize("n", [2, 4, 7])
def test_stt_wer_covers_as_many_speakers_as_its_utterances_allow(n, tmp_path):
    """A store's rows are grouped by speaker: the first N rows held one or two speakers, and the STT
    WER-by-speaker table silently left the others out. Now N utterances cover min(N, speakers)."""
    speakers = ["espeak-f2", "flite-kal", "flite-rms", "flite-slt"]
    utterances = [(spk, SENTENCES[k % 2], 8 + k) for spk in speakers for k in range(3)]
    _feature_store(tmp_path / "features" / "test", utterances)
    stt = evaluate.load_stt_model(_tiny_checkpoint(tmp_path, "joint"))
    cfg = EvaluateConfig.from_dict({"stt_splits": ["test"], "stt_max_utterances": n, "stt_beam_size": 1}, "evaluate")
    out = evaluate.evaluate_stt(stt, tmp_path / "features", cfg)["test"]
    assert out["utterances"] == n and len(out["per_speaker"]) == min(n, len(speakers))


def test_an_stt_split_with_no_utterance_is_kept_empty_not_a_crash(tmp_path, caplog):
    """A feature store with no rows (every utterance of the split rejected) made evaluate_stt call
    wer_details on nothing: a bare "WER of an empty set of utterances is undefined" traceback, after the
    other splits' beam search. It is now kept as {}, as an empty TTS split is, and the log names it."""
    import logging

    _feature_store(tmp_path / "features" / "dev", [("flite-slt", SENTENCES[0], 12)])
    (tmp_path / "features" / "test").mkdir(parents=True)
    (tmp_path / "features" / "test" / "index.jsonl").write_text("")
    stt = evaluate.load_stt_model(_tiny_checkpoint(tmp_path, "stt"))
    cfg = EvaluateConfig.from_dict({"stt_splits": ["dev", "test"], "stt_beam_size": 1}, "evaluate")
    with caplog.at_level(logging.WARNING, logger="meld.evaluate"):
        out = evaluate.evaluate_stt(stt, tmp_path / "features", cfg)
    assert out["test"] == {} and out["dev"]["utterances"] == 1
    assert "STT: split test has no utterance" in caplog.text


def test_tts_utterances_spread_over_speakers_judged_ones_first(tmp_path):
    """The same spreading for TTS (evaluate.utterances_per_split), the ASR judge's speakers first."""
    speakers = ["espeak-f2", "espeak-m3", "flite-kal", "flite-rms", "flite-slt"]
    store = _feature_store(tmp_path / "test", [(spk, SENTENCES[0], 300) for spk in speakers for _ in range(2)])
    for n in (2, 3, 5, 8):
        cfg = EvaluateConfig.from_dict({"utterances_per_split": n}, "evaluate")
        chosen = [store.index[i]["speaker"] for i in evaluate.choose_utterances(store, cfg, "test")]
        assert len(chosen) == n and len(set(chosen)) == min(n, len(speakers))
        judged_first = [s for s in chosen[:3] if not s.startswith("espeak-")]
        assert len(judged_first) == min(n, 3)


def test_the_first_utterances_chosen_are_different_people_not_only_different_ids(tmp_path):
    """festival-kal and flite-kal are one recorded person: the default test split's two utterances
    were theirs, which left the SIM floor no other person. Each person's first id comes first."""
    speakers = ["espeak-f2", "festival-kal", "flite-kal", "flite-kal16", "flite-rms"]
    store = _feature_store(tmp_path / "test", [(spk, SENTENCES[0], 300) for spk in speakers for _ in range(2)])
    pick = [store.index[i]["speaker"] for i in evaluate.spread_over_speakers(store.index, range(len(store)), 10,
                                                                            ("espeak-",))]
    assert pick[:2] == ["festival-kal", "flite-rms"]  # two people, judged ones first
    assert pick[:4] == ["festival-kal", "flite-rms", "flite-kal", "flite-kal16"] and pick[4] == "espeak-f2"
    assert sorted(pick) == sorted(speakers * 2)  # everything, in the end, each once per row


def test_the_meld_stt_judge_reads_the_utterances_the_external_judge_reads(tmp_path, monkeypatch):
    """The report puts "WER MELD-STT judge" beside the external judge's "WER", which leaves out the
    judge_exclude_prefixes speakers; the MELD-STT columns used to read every row, so the two compared
    different utterances. Both now read the same ones."""
    store = _feature_store(tmp_path / "test", [("flite-slt", SENTENCES[0], 10), ("espeak-f2", SENTENCES[1], 12),
                                                ("flite-rms", SENTENCES[1], 14)])
    stt = evaluate.load_stt_model(_tiny_checkpoint(tmp_path, "joint"))
    rows = [{"speaker": r["speaker"], "text": r["text"], "_mel": store[i]} for i, r in enumerate(store.index)]
    read = []
    transcribe = evaluate.transcribe_mels

    beams = []

    def recording(stt, mels, **kwargs):
        read.append(sorted(m.shape[0] for m in mels))
        beams.append((kwargs["beam"], kwargs["batch_size"]))
        return transcribe(stt, mels, **kwargs)

    monkeypatch.setattr(evaluate, "transcribe_mels", recording)
    scores = evaluate.score_with_stt_judge(stt, rows, store, [0, 1, 2], 10.0, ("espeak-",))
    assert set(scores) == {"wer_meld_stt_judge", "wer_ground_truth_meld_stt_judge"}
    assert read == [[10, 14], [10, 14]]  # generations, then ground truth: the flite speakers only
    assert beams == [(5, 8), (5, 8)]
    # the stage's evaluate.stt_beam_size and batch_size reach the judge (a fixed beam of 5 ignored them)
    read.clear()
    beams.clear()
    evaluate.score_with_stt_judge(stt, rows, store, [0, 1, 2], 10.0, ("espeak-",), beam=2, batch_size=1)
    assert beams == [(2, 1), (2, 1)]
    assert ["stt_judge_hyp" in r for r in rows] == [True, False, True]
    read.clear()
    assert evaluate.score_with_stt_judge(stt, rows[1:2], store, [1], 10.0, ("espeak-",)) == {} and read == []


def _codec_setup(tmp_path: Path, random_codec: bool):
    """A code store of one 0.2 s utterance (codec weights, or a random codec), its corpus manifest, and a
    state whose codec and BPE model are those: what evaluate_codec_system reads."""
    import json

    import numpy as np
    import torch

    from meld.codes import CODEC_FILE, build_codec
    from meld.models.codec_lm import DACCodec
    from meld.store import write_code_store
    from meld.text import train_bpe

    levels, size = 4, 16
    weights = None
    if not random_codec:
        kwargs = dict(encoder_dim=4, decoder_dim=32, n_codebooks=levels, codebook_size=size, codebook_dim=8)
        torch.manual_seed(0)
        weights = tmp_path / "weights.pth"
        torch.save({"state_dict": DACCodec(**kwargs).state_dict(),
                    "metadata": {"kwargs": {**kwargs, "sample_rate": 16000}}}, weights)
    _, desc = build_codec(weights, n_levels=levels, codebook_size=size, random_width=4, seed=0)
    codes = tmp_path / "codes"
    codes.mkdir()
    (codes / CODEC_FILE).write_text(json.dumps(desc))
    write_code_store(codes / "test", [({"id": "u0", "speaker": "flite-slt", "text": SENTENCES[0], "duration": 0.2},
                                       np.zeros((10, levels), np.int16))], [])
    (tmp_path / "corpus" / "test").mkdir(parents=True)
    (tmp_path / "corpus" / "test" / "manifest.jsonl").write_text(json.dumps({"id": "u0", "audio": "u0.wav"}) + "\n")
    bpe = train_bpe(SENTENCES, tmp_path / "bpe", vocab_size=30)
    state = {"step": 1, "extra": {"codec": desc, "bpe_model": torch.from_numpy(
        np.frombuffer(bpe.read_bytes(), dtype=np.uint8).copy())}}
    return codes, state


@pytest.mark.parametrize("random_codec", [False, True])
def test_a_codec_split_without_eligible_utterances_is_kept_empty(random_codec, tmp_path):
    """As for the mel systems, a split with no utterance within min_seconds..max_seconds stays in the
    metrics as {}, so that the report names it instead of dropping it."""
    from test_codec_lm import tiny_codec_lm

    codes, state = _codec_setup(tmp_path, random_codec)
    cfg = EvaluateConfig.from_dict({"splits": ["test"], "prompt_seconds": 0.5, "min_seconds": 1.0, "score_workers": 1},
                                   "evaluate")
    metrics, rows = evaluate.evaluate_codec_system(tiny_codec_lm(n_text=30)[0], state, cfg, "codec_lm", codes,
                                                   tmp_path / "corpus", tmp_path / "eval")
    assert metrics["pipeline_check" if random_codec else "splits"] == {"test": {}} and rows == []


@pytest.mark.parametrize("speaker_model, built", [("resemblyzer", "resemblyzer"), ("wavlm", None)])
def test_the_metrics_name_the_speaker_model_that_was_built(speaker_model, built, tmp_path):
    """The metrics named the vocoder and ASR judge actually built, but not the speaker encoder: SIM of
    resemblyzer and of WavLM (whose scales differ) read alike, and a WavLM folder missing (SIM disabled, a
    log line only) left no trace in the file. It now says which encoder SIM comes from, or None."""
    from test_codec_lm import tiny_codec_lm

    codes, state = _codec_setup(tmp_path, random_codec=False)
    cfg = EvaluateConfig.from_dict({"splits": ["test"], "prompt_seconds": 0.5, "min_seconds": 1.0, "speaker_model": speaker_model,
                                    "score_workers": 1}, "evaluate")
    metrics, _ = evaluate.evaluate_codec_system(tiny_codec_lm(n_text=30)[0], state, cfg, "codec_lm", codes,
                                                tmp_path / "corpus", tmp_path / "eval")
    assert "speaker_model" in metrics and metrics["speaker_model"] == built


def test_a_judge_that_does_not_load_stops_a_codec_evaluation_in_one_line(tmp_path):
    """The mel systems turn a vocoder's or judge's broken weights into one SystemExit line naming the file;
    Codec-LM's evaluation builds the same scorer and let the ValueError out as a traceback."""
    from test_codec_lm import tiny_codec_lm

    codes, state = _codec_setup(tmp_path, random_codec=False)
    (tmp_path / "whisper").mkdir()
    (tmp_path / "whisper" / "config.json").write_text("{cut short")
    cfg = EvaluateConfig.from_dict({"splits": ["test"], "asr_judge": "whisper", "asr_judge_path": str(tmp_path / "whisper"),
                                    "score_workers": 1}, "evaluate")
    with pytest.raises(SystemExit, match=f"^evaluate: the vocoder or a judge does not load: "
                                         f"{tmp_path / 'whisper' / 'config.json'}: not a readable JSON file"):
        evaluate.evaluate_codec_system(tiny_codec_lm(n_text=30)[0], state, cfg, "codec_lm", codes,
                                       tmp_path / "corpus", tmp_path / "eval")


def test_the_sim_floor_compares_each_prompt_with_another_person_spread_over_the_split():
    """The "other speaker" of each prompt was the first chosen utterance of any other speaker id: one
    utterance served almost every prompt, and on the mini corpus it could be the same person
    (festival-kal for a flite-kal prompt: cosine ~0.88, a same-voice level)."""
    chosen = [10, 11, 12, 13, 14, 15]
    speakers = ["festival-kal", "flite-kal", "flite-kal16", "flite-rms", "flite-slt", "festival-kal"]
    others = evaluate.other_person_utterances(chosen, speakers)
    from meld.corpus.mini import recorded_person

    for k, i in enumerate(chosen):
        j = others[i]
        assert recorded_person(speakers[chosen.index(j)]) != recorded_person(speakers[k]), (i, j)
    assert others[11] == 13 and others[12] == 13 and others[13] == 14 and others[14] == 15 and others[15] == 13
    assert len(set(others.values())) > 2  # spread, not one utterance for every prompt
    assert evaluate.other_person_utterances([1, 2], ["flite-kal", "flite-kal16"]) == {1: None, 2: None}
    # LibriSpeech readers are people by id
    assert evaluate.other_person_utterances([1, 2], ["1089", "121"]) == {1: 2, 2: 1}


def test_logging_the_evaluation_leaves_the_finished_training_run_finished(tmp_path, monkeypatch):
    """The stage reopened the training run with ``start_run(run_id=...)``: an error while logging (here
    a speaker id MLflow refuses in a metric key) ended that finished run FAILED, and every evaluation
    moved its end time. It now writes through a client; speaker ids are cleaned like ablation names."""
    import argparse
    import json

    from mlflow.tracking import MlflowClient

    from meld import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = {"mlflow": {"experiment": "eval-logging"}, "evaluate": {"seed": 3}}
    mlflow = tracking.setup(evaluate.mlflow_experiment(params))
    with mlflow.start_run(run_name="train-meld") as run:  # the training run, finished normally
        mlflow.log_metric("train/loss", 1.0, step=1)
    client = MlflowClient(mlflow.get_tracking_uri())
    before = client.get_run(run.info.run_id).info
    (tmp_path / "run_id").write_text(run.info.run_id)
    out = tmp_path / "out"
    (out / "samples" / "test").mkdir(parents=True)
    (out / "samples" / "test" / "a.wav").write_bytes(b"RIFF")
    metrics_file = tmp_path / "metrics.json"
    args = argparse.Namespace(run_id_file=str(tmp_path / "run_id"), metrics=str(metrics_file), system="meld")
    metrics = {"step": 10, "splits": {"test": {"wer": 0.25, "generations": 2}},
               "ablations": {"meld (latent zeroed)": {"test": {"wer": 0.5}}},
               "stt": {"dev": {"wer": 0.5, "per_speaker": {"spk(a)+1": 0.75}}}}
    assert evaluate.write_results(args, params, metrics, [], out) == 0
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == before.end_time
    assert after.data.metrics["eval/stt/dev/wer_by_speaker/spka1"] == 0.75
    assert after.data.metrics["eval/ablation/meld latent zeroed/test/wer"] == 0.5
    history = client.get_metric_history(run.info.run_id, "eval/test/wer")
    assert [(m.step, m.value) for m in history] == [(10, 0.25)]
    assert after.data.tags["eval.seed"] == "3"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert artifacts >= {"eval/samples", "eval/metrics.json"}
    assert json.loads(metrics_file.read_text())["complete"] is True

    # without a run-id file the evaluation gets a run of its own, ended FINISHED
    args.run_id_file = None
    evaluate.write_results(args, params, metrics, [], out)
    (own,) = mlflow.search_runs(experiment_names=["eval-logging"], filter_string="tags.mlflow.runName = 'evaluate-meld'",
                                output_format="list")
    assert own.info.status == "FINISHED" and own.data.metrics["eval/test/wer"] == 0.25


def _train_run(project: Path, ckpts: Path, monkeypatch) -> str:
    """A training run as rank 0 of ray_jobs/train.py opens it, for the project ``project`` (its ``--project-root``),
    its id written to ``ckpts``/mlflow_run_id; ended FINISHED. Returns its id. In a process of its own: the
    MLFLOW_TRACKING_URI that MLflow's ``set_tracking_uri`` sets in this one is taken out again."""
    from meld.store import FrameBudgetSampler
    from ray_jobs.train import _open_mlflow_run

    config = {"experiment": "eval-elsewhere", "project_root": str(project), "run_name": "train-meld",
              "system": "meld", "train": {"max_steps": 4}, "model_kwargs": {}, "reduction_factor": 1}
    mlflow = _open_mlflow_run(config, ckpts, resumed_at=None, sampler=FrameBudgetSampler([3, 4], 8))
    run_id = mlflow.active_run().info.run_id
    mlflow.end_run()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return run_id


def test_an_evaluation_run_from_another_directory_logs_to_the_training_runs_store(tmp_path, no_tracking_uri):
    """With MLFLOW_TRACKING_URI unset, training logs to the SQLite store of its --project-root; evaluate looked
    for the run in its own working directory's store, and after hours of decoding failed with MLflow's
    "Run '…' not found". The training now records its store beside the run id, and evaluate logs there."""
    import argparse

    from mlflow.tracking import MlflowClient

    monkeypatch = no_tracking_uri
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # neither the training nor the evaluation runs in the project root
    ckpts = project / "models" / "meld" / "checkpoints"
    run_id = _train_run(project, ckpts, monkeypatch)
    assert (project / "mlflow.db").is_file()

    params = {"mlflow": {"experiment": "eval-elsewhere"}, "evaluate": {"seed": 3}}
    out = tmp_path / "out"
    out.mkdir()
    args = argparse.Namespace(run_id_file=str(ckpts / "mlflow_run_id"), metrics=str(tmp_path / "metrics.json"),
                              system="meld")
    metrics = {"step": 4, "splits": {"test": {"wer": 0.25}}}
    assert evaluate.write_results(args, params, metrics, [], out) == 0
    run = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(run_id)
    assert run.data.metrics["eval/test/wer"] == 0.25 and run.data.tags["eval.seed"] == "3"
    assert not (elsewhere / "mlflow.db").exists()  # no stray store in the working directory
    # the check at the start looks where write_results logs
    checked = evaluate.check_training_run(args.run_id_file)
    assert checked.uri == f"sqlite:///{project / 'mlflow.db'}" and checked.named_by.startswith("recorded by")


def test_a_training_run_missing_from_the_store_stops_the_evaluation_before_the_model_loads(tmp_path, no_tracking_uri):
    """The run named by --run-id-file is looked for at the start, in the store write_results would log to;
    missing, the stage stops in one line naming the run, the file, the store and what to do (it failed
    at the very end, after the decoding). No model file exists: an error about it would show the check
    came later."""
    monkeypatch = no_tracking_uri
    project, elsewhere, other = tmp_path / "project", tmp_path / "elsewhere", tmp_path / "other"
    for folder in (project, elsewhere, other):
        folder.mkdir()
    monkeypatch.chdir(elsewhere)
    ckpts = project / "models" / "meld" / "checkpoints"
    run_id = _train_run(project, ckpts, monkeypatch)
    id_file = ckpts / "mlflow_run_id"
    recorded = f"sqlite:///{project / 'mlflow.db'}"

    # an explicit MLFLOW_TRACKING_URI wins over the recorded store: there the run is not, and the message
    # names the recorded store the training logged to
    _train_run(other, other / "checkpoints", monkeypatch)  # a real store that holds other runs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other / 'mlflow.db'}")
    with pytest.raises(SystemExit, match=(
            rf"^evaluate: MLflow run {run_id} \(named by {re.escape(str(id_file))}\) is not in the tracking store "
            rf"{re.escape(f'sqlite:///{other}/mlflow.db')} \(MLFLOW_TRACKING_URI\); the training recorded "
            rf"{re.escape(recorded)}: unset MLFLOW_TRACKING_URI, or set it to the store that holds the run$")):
        _run_stage(tmp_path, {"splits": ["test"]}, "--run-id-file", str(id_file))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    # a checkpoint folder from before the store was recorded, evaluated outside the project root: this
    # directory has no store, and none is created there by looking
    (ckpts / "mlflow_tracking_uri").unlink()
    with pytest.raises(SystemExit, match=(
            rf"^evaluate: MLflow run {run_id} \(named by .*mlflow_run_id\) is not in the tracking store "
            rf"{re.escape(f'sqlite:///{elsewhere}/mlflow.db')} \(the working directory's store: the training "
            r"recorded none\): there is no such store; set MLFLOW_TRACKING_URI to the training's store, or run "
            r"from the training's project root$")):
        _run_stage(tmp_path, {"splits": ["test"]}, "--run-id-file", str(id_file))
    assert not (elsewhere / "mlflow.db").exists()
    # ... and from the project root it is found (the rule as before: that directory's store)
    monkeypatch.chdir(project)
    assert evaluate.check_training_run(str(id_file)).uri == recorded

    # the recorded store, which does not hold the run (a run id of another store copied in)
    stranger = _train_run(other, other / "checkpoints", monkeypatch)
    id_file.write_text(stranger)
    tracking_file = ckpts / "mlflow_tracking_uri"
    tracking_file.write_text(recorded)
    monkeypatch.chdir(other)  # whose own store holds it: the recorded store is the one looked in
    with pytest.raises(SystemExit, match=(
            rf"^evaluate: MLflow run {stranger} .* is not in the tracking store {re.escape(recorded)} \(recorded by "
            rf"the training in {re.escape(str(tracking_file))}\); the run was deleted for good, or the store moved")):
        _run_stage(tmp_path, {"splits": ["test"]}, "--run-id-file", str(id_file))
    assert not (tmp_path / "eval").exists()  # nothing started

    # named but missing or empty: the metrics would have gone to a run of their own, silently
    for content in (None, " \n"):
        named = tmp_path / "typo" / "mlflow_run_id"
        if content is not None:
            named.parent.mkdir(exist_ok=True)
            named.write_text(content)
        with pytest.raises(SystemExit, match=rf"^evaluate: --run-id-file {re.escape(str(named))}: "
                                             rf"{'no such file' if content is None else 'empty'}; the train stage writes it"):
            _run_stage(tmp_path, {"splits": ["test"]}, "--run-id-file", str(named))

    # found, but deleted: MLflow would refuse the evaluation's metrics at the end
    from mlflow.tracking import MlflowClient

    id_file.write_text(run_id)
    MlflowClient(recorded).delete_run(run_id)
    with pytest.raises(SystemExit, match=rf"^evaluate: MLflow run {run_id} .* is deleted in {re.escape(recorded)}: "
                                         rf"restore it \(mlflow runs restore --run-id {run_id}\)"):
        evaluate.check_training_run(str(id_file))
