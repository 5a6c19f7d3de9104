"""evaluate stage: zero-shot TTS continuation on held-out splits, scored like the paper (§9).

    python -m pipeline.evaluate --params params.yaml --system meld --model models/meld/model.pt \
        --features data/features --corpus data/corpus --out eval/meld --metrics metrics/meld.json

For each chosen utterance (min_seconds..max_seconds long): prompt = its first prompt_seconds
plus its full transcript; ``generations`` continuations each. Scores:

- judge WER (S/D/I) of [true prompt + continuation] through the vocoder against the full text,
  beside the judge WER of the whole ground truth through the same vocoder;
- SIM: speaker-embedding cosine between the real prompt and the continuation, beside the
  prompt against a different speaker's real utterance; only where both last at least 0.5 s
  (``sim_generations`` counts them: none with ``prompt_seconds: 0``);
- duration ratio (generated / true continuation), longest silence, max-length guard hits, RTF.

Speakers the judge cannot recognise (evaluate.judge_exclude_prefixes: espeak-ng voices for
pocketsphinx) are left out of the WER only, the MELD-STT judge's included (the same utterances for
both judges). STT WER is scored on up to stt_max_utterances utterances per split, spread over its
speakers. Results go to metrics/<system>.json, the MLflow training run (metrics, audio samples, mel
plots) and <out>/ (per-utterance rows, audio, plots).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from meld import tracking
from meld.audio import write_audio
from meld.codes import (
    codec_from_description,
    continue_codes,
    decode_codes,
    prompt_code_frames,
    read_codec_description,
)
from meld.config import STT_MAX_TOKENS, EvaluateConfig, mlflow_experiment, read_params, run_stage
from meld.corpus import read_manifest
from meld.devices import resolve_device
from meld.evaluation.metrics import duration_ratio, wer_details
from meld.evaluation.scoring import GenerationItem, ReferenceItem, ScorerSpec, ScoringPool
from meld.features import FRAME_RATE, HOP_LENGTH, N_MELS, NormStats, log_mel
from meld.generate import prompt_frames, stt_beam_search, tts_continue
from meld.models.backbone import configure_decoding, decoding_compile_seconds
from meld.progress import progress
from meld.store import CodeStore, FeatureStore
from meld.text import BPETokenizer, tokenizer_from_bytes
from meld.training import load_checkpoint, load_model, weight_sharing_copy

log = logging.getLogger("meld.evaluate")
SR = 16_000


class Decoding:
    """Where the evaluation decodes: here, with the models loaded in this process, or sharded over a
    :class:`ray_jobs.decode_pool.DecodePool` (``evaluate.decode_workers`` > 1), whose actors load the
    same checkpoints on their own devices. Either way the outputs are the same.

    ``checkpoint`` and ``compile`` are the evaluated model's (``compile_decoding`` applies to its TTS
    decoding only, as in this process); an STT model names its own checkpoint.
    """

    def __init__(self, pool=None, checkpoint: str = "", compile: bool = False):
        self.pool, self.checkpoint, self.compile = pool, str(checkpoint), compile

    def generate(self, decode, model, items: dict[str, list], *, batch_size: int, progress_desc: str | None = None,
                 **options) -> tuple[list, float, float]:
        """``decode`` (``tts_continue`` or ``continue_codes``) with the evaluated model; ``items``: its
        per-utterance arguments (texts, prompts, max_frames), ``options`` the rest.

        Returns the outputs, the device-seconds they took (the wall time here, the actors' decoding
        time summed in a pool, so that a real-time factor means one device's whatever the pool's size)
        and the part of those seconds ``compile_decoding`` spent compiling (0.0 without it).
        """
        if self.pool is None:
            compiled_before = decoding_compile_seconds(model)
            start = time.perf_counter()
            out = decode(model, **items, batch_size=batch_size, progress_desc=progress_desc, **options)
            return out, time.perf_counter() - start, decoding_compile_seconds(model) - compiled_before
        out = self.pool.map(decode.__name__, self.checkpoint, items, options, batch_size=batch_size,
                            compile=self.compile, progress_desc=progress_desc)
        return out, self.pool.device_seconds, self.pool.compile_seconds

    def transcribe(self, stt: STTModel, mels: list[np.ndarray], *, batch_size: int,
                   progress_desc: str | None = None, **options) -> list[list[int]]:
        """``stt_beam_search`` of normalised mels with ``stt``'s model."""
        if self.pool is None:
            return stt_beam_search(stt.model, mels, batch_size=batch_size, progress_desc=progress_desc, **options)
        return self.pool.map("stt_beam_search", stt.path, {"mels": mels}, options, batch_size=batch_size,
                             progress_desc=progress_desc)


IN_PROCESS = Decoding()  # no pool: decodes with the models of this process (holds no state)


def spread_over_speakers(index: list[dict], candidates: Iterable[int], n: int, last: tuple[str, ...] = ()) -> list[int]:
    """Up to ``n`` of ``candidates`` (rows of a store's ``index``), one per speaker in turn: as many
    speakers as ``n`` allows, each speaker's rows in id order, deterministic. A store's rows are grouped
    by speaker, so its first ``n`` rows would hold one or two speakers. Speaker ids of one recorded
    person (the mini corpus's flite-kal, flite-kal16 and festival-kal) take their turns after every
    other person's first: two utterances chosen from festival-kal and flite-kal left the split no
    other person to measure the SIM floor against.

    Args:
        last: speakers whose names start with one of these are taken after all the others.
    """
    from meld.corpus.mini import recorded_person

    by_speaker: dict[str, list[int]] = {}
    for i in sorted(candidates, key=lambda i: index[i]["id"]):
        by_speaker.setdefault(index[i]["speaker"], []).append(i)
    order: list[str] = []
    for late in (False, True):  # the judged speakers, then those in ``last``
        people: dict[str, list[str]] = {}
        for spk in sorted(s for s in by_speaker if s.startswith(last) == late):
            people.setdefault(recorded_person(spk), []).append(spk)
        rounds = max((len(ids) for ids in people.values()), default=0)
        order += [ids[k] for k in range(rounds) for ids in people.values() if k < len(ids)]
    chosen: list[int] = []
    while len(chosen) < n and any(by_speaker.values()):
        for spk in order:
            if by_speaker[spk] and len(chosen) < n:
                chosen.append(by_speaker[spk].pop(0))
    return chosen


def choose_utterances(store: FeatureStore, cfg: EvaluateConfig, split: str) -> list[int]:
    """Indices of up to N utterances of the allowed length, spread over speakers, deterministic.

    Speakers the ASR judge can recognise come first, so that WER rests on as many rows as possible.
    """
    ok = [i for i, r in enumerate(store.index) if cfg.min_seconds <= r["duration"] <= cfg.max_seconds]
    if not ok:
        log.warning("%s: no utterance between %.1f and %.1f s", split, cfg.min_seconds, cfg.max_seconds)
        return []
    return spread_over_speakers(store.index, ok, cfg.utterances_per_split, tuple(cfg.judge_exclude_prefixes))


def plot_mels(path: Path, panels: list[tuple[str, np.ndarray]], prompt_frames_n: int) -> Path:
    """The panels' mel spectrograms on one time axis, with a line where the prompt (``prompt_frames_n``
    mel frames) ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.2 * len(panels)), squeeze=False)
    longest = max(mel.shape[0] for _, mel in panels)
    for ax, (title, mel) in zip(axes[:, 0], panels):
        ax.imshow(mel.T, origin="lower", aspect="auto", cmap="magma", vmin=-5, vmax=1.5)
        ax.set_xlim(-0.5, longest - 0.5)  # one time axis for every panel: a too long generation looks too long
        ax.axvline(prompt_frames_n, color="cyan", lw=1)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("mel bin")
    prompt = (f"cyan line = end of the {prompt_frames_n / FRAME_RATE:.2f} s prompt" if prompt_frames_n
              else "no prompt")
    axes[-1, 0].set_xlabel(f"frame (16 ms); {prompt}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def other_person_utterances(chosen: list[int], speakers: list[str]) -> dict[int, int | None]:
    """For each chosen utterance, another chosen one spoken by a different person (None if there is
    none): the SIM floor's "other speaker". The next such one after it, cyclically, so the floor spreads
    over the split's speakers (the first other speaker's one utterance served almost every prompt), and
    people, not ids: flite-kal against festival-kal compared one person's voice with itself."""
    from meld.corpus.mini import recorded_person

    people = [recorded_person(s) for s in speakers]
    n = len(chosen)
    return {i: next((chosen[(k + step) % n] for step in range(1, n) if people[(k + step) % n] != people[k]), None)
            for k, i in enumerate(chosen)}


def generation_row(split: str, meta: dict, generation: int, *, gen_s: float, true_cont_s: float,
                   hit_max_length: bool, scores: dict, gt: dict) -> dict:
    """One continuation's row of generations.jsonl from its scores and its utterance's ground-truth scores."""
    row = {"split": split, "id": meta["id"], "speaker": meta["speaker"], "generation": generation,
           "text": meta["text"], "generated_seconds": gen_s, "true_continuation_seconds": true_cont_s,
           "duration_ratio": duration_ratio(gen_s, true_cont_s), "hit_max_length": hit_max_length,
           "longest_silence_s": scores["longest_silence_s"], "gt_longest_silence_s": gt["gt_longest_silence_s"]}
    if "hyp" in scores and "gt_hyp" in gt:
        row["hyp"], row["gt_hyp"] = scores["hyp"], gt["gt_hyp"]
    if "sim" in scores:  # the references beside the generations that have a SIM, so both average the same rows
        row["sim"] = scores["sim"]
        for key, name in (("sim_gt_cont", "sim_gt_continuation"), ("sim_other", "sim_other_speaker"),
                          ("sim_other_vocoded", "sim_other_speaker_vocoded")):
            if key in gt:
                row[name] = gt[key]
    return row


def evaluate_split(model, state, stats: NormStats, tok, store: FeatureStore, audio_paths: dict, cfg: EvaluateConfig,
                   split: str, scorer: ScoringPool, judge_exclude: tuple[str, ...], out: Path,
                   variant: dict, references: dict[int, dict], stt_judge=None,
                   decoding: Decoding = IN_PROCESS) -> tuple[dict, list[dict]]:
    """One split under one decoding variant. ``references`` caches the ground-truth scores per utterance
    index across variants (they do not depend on the variant); missing ones are scored and added."""
    r = int(state["extra"]["reduction_factor"])
    chosen = choose_utterances(store, cfg, split)
    rows = []
    if not chosen:
        return {}, rows
    texts, prompts, guards, refs = [], [], [], []
    prompt_of: dict[int, int] = {}
    for i in chosen:
        mel = store[i]
        p = prompt_frames(mel, cfg.prompt_seconds)
        p = prompt_of[i] = (p // r) * r
        for _ in range(cfg.generations):
            texts.append(tok.encode(store.index[i]["text"]))
            prompts.append(stats.normalise(mel[:p]))
            guards.append(int(math.ceil(cfg.max_length_factor * (mel.shape[0] - p))))
            refs.append((i, p))
    conts, compute_s, compile_s = decoding.generate(
        tts_continue, model, {"texts": texts, "prompts": prompts, "max_frames": guards}, reduction=r,
        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
        repetition_penalty=variant.get("repetition_penalty", cfg.repetition_penalty),
        zero_latent=variant.get("zero_latent", False), batch_size=cfg.batch_size, seed=cfg.seed,
        kv_cache_dtype=cfg.kv_cache_dtype, progress_desc=f"generate {split}")

    # a different person's real utterance for each prompt: the SIM floor
    others = other_person_utterances(chosen, [store.index[i]["speaker"] for i in chosen])
    judged = {i: not store.index[i]["speaker"].startswith(judge_exclude) for i in chosen}
    missing = [i for i in chosen if i not in references]
    ref_items = []
    for i in missing:
        other = others[i]
        ref_items.append(ReferenceItem(audio_paths[store.index[i]["id"]], store[i], prompt_of[i],
                                       audio_paths[store.index[other]["id"]] if other is not None else None, judged[i],
                                       other_mel=store[other] if other is not None else None))
    references.update(zip(missing, progress(scorer.map_references(ref_items), total=len(ref_items),
                                        desc=f"ground truth {split}", unit="utt")))
    gt_of = references
    full_mels = [np.concatenate([store[i][:p], stats.denormalise(c.frames)]) for c, (i, p) in zip(conts, refs)]
    gen_items = [GenerationItem(m, p, judged[i], gt_of[i].get("prompt_emb")) for m, (i, p) in zip(full_mels, refs)]
    scored = progress(scorer.map_generations(gen_items), total=len(gen_items), desc=f"score {split}", unit="gen")
    for n, (cont, (i, p), full_mel, sc) in enumerate(zip(conts, refs, full_mels, scored)):
        meta, mel, gt = store.index[i], store[i], gt_of[i]
        row = generation_row(split, meta, n % cfg.generations, gen_s=cont.frames.shape[0] / FRAME_RATE,
                             true_cont_s=(mel.shape[0] - p) / FRAME_RATE, hit_max_length=cont.hit_max_length,
                             scores=sc, gt=gt)
        if stt_judge is not None:
            row["_mel"] = full_mel
        rows.append(row)
        if n // cfg.generations < cfg.audio_samples and n % cfg.generations == 0:
            sample_dir = out / "samples" / split
            write_audio(sample_dir / f"{meta['id']}{variant.get('suffix', '')}.wav", sc["wav"])
            write_audio(sample_dir / f"{meta['id']}.ground_truth_vocoded.wav", gt["gt_vocoded"])
            plot_mels(out / "plots" / split / f"{meta['id']}{variant.get('suffix', '')}.png",
                      [(f"ground truth ({meta['speaker']})", mel), (f"prompt + {model.system} continuation", full_mel)], p)
    gen_audio_s = sum(r["generated_seconds"] for r in rows)
    summary = summarise(rows, compute_s, gen_audio_s, compile_s)
    if stt_judge is not None:
        summary.update(score_with_stt_judge(stt_judge, rows, store, chosen, cfg.stt_max_tokens_per_second,
                                            judge_exclude, decoding, beam=cfg.stt_beam_size,
                                            batch_size=cfg.batch_size))
    for r in rows:
        r.pop("_mel", None)
    return summary, rows


def open_scorer(spec: ScorerSpec, workers: int) -> ScoringPool:
    """The scoring pool, or one line naming the file when a vocoder's or judge's weights are there but do not
    load (every system's evaluation builds one: the codec systems' used to end in a ValueError traceback)."""
    try:
        return ScoringPool(spec, workers)
    except ValueError as err:
        log.debug("scorer construction failed", exc_info=True)
        raise SystemExit(f"evaluate: the vocoder or a judge does not load: {err}") from None


RANDOM_CODEC_NOTE = ("codec weights unavailable: the codes come from a randomly initialised DAC and carry no "
                     "speech, so no quality numbers are reported (set codec_lm.codec_weights to DAC's weights_16khz.pth)")


def evaluate_codec_system(model, state: dict, cfg: EvaluateConfig, system: str, codes_dir: Path, corpus: Path,
                          out: Path, decoding: Decoding = IN_PROCESS) -> tuple[dict, list[dict]]:
    """Codec-LM: TTS continuation of code prompts, decoded by the codec that made the codes, scored like the rest.

    Prompt = the first ``prompt_seconds`` of an utterance's codes + its full transcript; the codec decodes
    [true prompt codes + generated codes] and the same judges score the audio (the ground truth goes
    through the codec too: the "vocoded" reference). With a random codec (``codec.json`` says
    ``"random": true``) the continuations are still generated and decoded, as a check that the path runs
    (audio in ``<out>/samples``), but nothing is scored: the metrics say ``"codec_weights": "unavailable"``.

    Returns:
        (metrics, per-generation rows).
    """
    desc = read_codec_description(codes_dir)
    trained_on = (state["extra"].get("codec") or {}).get("state_sha256")
    if trained_on != desc["state_sha256"]:
        raise SystemExit(f"evaluate: {system} was trained on codes of another codec than the one in {codes_dir} "
                         "(codec weights hash differs): retrain, or point --codes at its code store")
    codec = codec_from_description(desc)
    tok = tokenizer_from_bytes(bytes(state["extra"]["bpe_model"].numpy().tobytes()))
    random_codec = bool(desc["random"])
    metrics: dict = {"system": system, "task": "tts", "step": int(state["step"]),
                     "vocoder": f"DAC codec ({'random, seed ' + str(desc['seed']) if random_codec else desc['weights']})",
                     "asr_judge": None, "speaker_model": None,
                     "codec_weights": "unavailable" if random_codec else desc["weights"],
                     "splits": {}, "ablations": {}}
    if random_codec:
        metrics["unavailable"] = RANDOM_CODEC_NOTE
        metrics["pipeline_check"] = {}  # what ran, not how good it is
        log.warning("%s: %s", system, RANDOM_CODEC_NOTE)
    spec = ScorerSpec(cfg.vocoder, cfg.vocoder_path, cfg.asr_judge, cfg.asr_judge_path, cfg.speaker_model,
                      cfg.speaker_model_path, cfg.score_device)
    all_rows: list[dict] = []
    hop, rate = codec.hop_length, float(desc["frame_rate"])
    judge_exclude = tuple(cfg.judge_exclude_prefixes)
    with contextlib.nullcontext() if random_codec else open_scorer(spec, cfg.score_workers) as scorer:
        if scorer is not None:
            built = scorer.describe()  # what loaded: a missing judge or encoder is None, not its config name
            metrics["asr_judge"], metrics["speaker_model"] = built["asr_judge"], built["speaker_model"]
            metrics["score_device"] = cfg.score_device
        for split in cfg.splits:
            # each prompt read is checked against the codebook: a bad code is named, not an IndexError in the model
            store = CodeStore(codes_dir / split, desc["n_levels"], desc["codebook_size"])
            audio = {r["id"]: r["audio_path"] for r in read_manifest(corpus / split / "manifest.jsonl")}
            chosen = choose_utterances(store, cfg, split)
            if not chosen:  # kept, as the mel systems keep it: the report names the split instead of dropping it
                metrics["pipeline_check" if random_codec else "splits"][split] = {}
                continue
            texts, prompts, guards, refs = [], [], [], []
            prompt_of: dict[int, int] = {}
            for i in chosen:
                codes = store[i]
                p = prompt_of[i] = prompt_code_frames(len(codes), cfg.prompt_seconds, rate)
                for _ in range(cfg.generations):
                    texts.append(tok.encode(store.index[i]["text"]))
                    prompts.append(codes[:p])
                    guards.append(int(math.ceil(cfg.max_length_factor * (len(codes) - p))))
                    refs.append((i, p))
            conts, compute_s, compile_s = decoding.generate(
                continue_codes, model, {"texts": texts, "prompts": prompts, "max_frames": guards},
                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, batch_size=cfg.batch_size,
                seed=cfg.seed, kv_cache_dtype=cfg.kv_cache_dtype, progress_desc=f"generate {split}")
            wavs = [decode_codes(codec, np.concatenate([store[i][:p], c.codes])) for c, (i, p) in zip(conts, refs)]
            if random_codec:
                gt_of = {i: {"gt_vocoded": decode_codes(codec, store[i])} for i in chosen}
                scored = [{"wav": w} for w in wavs]
            else:
                speakers = {i: store.index[i]["speaker"] for i in chosen}
                others = other_person_utterances(chosen, [speakers[i] for i in chosen])
                ref_items = []
                for i in chosen:
                    other = others[i]
                    ref_items.append(ReferenceItem(audio[store.index[i]["id"]], None, prompt_of[i],
                                                   audio[store.index[other]["id"]] if other is not None else None,
                                                   not speakers[i].startswith(judge_exclude),
                                                   resynthesised=decode_codes(codec, store[i]), hop_length=hop))
                gt_of = dict(zip(chosen, progress(scorer.map_references(ref_items), total=len(ref_items),
                                              desc=f"ground truth {split}", unit="utt")))
                gen_items = [GenerationItem(None, p, not speakers[i].startswith(judge_exclude),
                                            gt_of[i].get("prompt_emb"), wav=w, hop_length=hop)
                             for w, (i, p) in zip(wavs, refs)]
                scored = list(progress(scorer.map_generations(gen_items), total=len(gen_items), desc=f"score {split}",
                                   unit="gen"))
            rows = []
            for n, (cont, (i, p), sc) in enumerate(zip(conts, refs, scored)):
                meta = store.index[i]
                gen_s, true_cont_s = len(cont.codes) / rate, (store.lengths[i] - p) / rate
                if random_codec:  # no judge ran: only what was generated
                    row = {"split": split, "id": meta["id"], "speaker": meta["speaker"],
                           "generation": n % cfg.generations, "generated_seconds": gen_s,
                           "hit_max_length": cont.hit_max_length}
                else:
                    row = generation_row(split, meta, n % cfg.generations, gen_s=gen_s, true_cont_s=true_cont_s,
                                         hit_max_length=cont.hit_max_length, scores=sc, gt=gt_of[i])
                rows.append(row)
                if n // cfg.generations < cfg.audio_samples and n % cfg.generations == 0:
                    sample_dir = out / "samples" / split
                    write_audio(sample_dir / f"{meta['id']}.wav", sc["wav"])
                    write_audio(sample_dir / f"{meta['id']}.ground_truth_codec.wav", gt_of[i]["gt_vocoded"])
                    plot_mels(out / "plots" / split / f"{meta['id']}.png",
                              [(f"ground truth through the codec ({meta['speaker']})",
                                log_mel(gt_of[i]["gt_vocoded"], SR)),
                               (f"prompt + {system} continuation, decoded", log_mel(sc["wav"], SR))],
                              int(round(p * hop / HOP_LENGTH)))
            for r in rows:
                r["variant"] = system
            all_rows += rows
            if random_codec:
                metrics["pipeline_check"][split] = {"generations": len(rows),
                                                    "decoded_minutes": sum(len(w) for w in wavs) / SR / 60}
            else:
                metrics["splits"][split] = summary = summarise(
                    rows, compute_s, sum(r["generated_seconds"] for r in rows), compile_s)
                print(f"{system} / {split}: " + ", ".join(
                    f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return metrics, all_rows


class STTModel(NamedTuple):
    """A loaded STT checkpoint and how it decodes."""

    model: torch.nn.Module
    path: str  # its checkpoint, which a sharded decoding's actors load
    stats: NormStats
    tokenizer: BPETokenizer
    reduction: int
    ctc_weight: float  # of hybrid CTC/attention decoding: evaluate.stt_ctc_weight, 0 without a CTC head


def load_stt_model(path: str | Path, ctc_weight: float = 0.0, stats: NormStats | None = None,
                   tokenizer: BPETokenizer | None = None, device: str = "cpu", *, weights: bool = True) -> STTModel:
    """An STT-capable checkpoint, ready for :func:`transcribe_mels`.

    Args:
        ctc_weight: evaluate.stt_ctc_weight; applied only when the model was trained with a CTC head
            (``args.stt_ctc``), else decoding uses the attention decoder alone (logged here, once).
        stats, tokenizer: for a training checkpoint (``checkpoints/step-N.pt``), which carries
            neither: the features' normalisation and the BPE model it was trained with. A finished
            ``model.pt`` carries its own, and they win.
        device: where the model decodes (a resolved torch device, :func:`meld.devices.resolve_device`).
        weights: False when a :class:`Decoding` pool decodes (it loads ``path`` itself): the model's
            structure only (``load_model(weights=False)``), no weights read or held here.
    """
    model, state = load_model(path, weights=weights)
    if weights:
        model.to(device)
    return stt_model(model, state, path, ctc_weight, stats, tokenizer)


def stt_model(model: torch.nn.Module, state: dict, path: str | Path, ctc_weight: float = 0.0,
              stats: NormStats | None = None, tokenizer: BPETokenizer | None = None) -> STTModel:
    """:func:`load_stt_model` for a model already loaded (with its ``state``) from ``path``."""
    if not hasattr(model, "stt_prefix"):
        raise SystemExit(f"evaluate: {path} is a {model.system} model, which cannot transcribe")
    if ctc_weight > 0 and not getattr(model, "stt_ctc", False):
        log.info("%s has no CTC head (args.stt_ctc): STT decodes with the attention decoder alone "
                 "(evaluate.stt_ctc_weight=%g not applied)", path, ctc_weight)
        ctc_weight = 0.0
    extra = state["extra"]
    if "norm_mean" in extra:
        stats = NormStats(extra["norm_mean"].numpy(), extra["norm_std"].numpy())
    if "bpe_model" in extra:
        tokenizer = tokenizer_from_bytes(bytes(extra["bpe_model"].numpy().tobytes()))
    if stats is None or tokenizer is None:
        raise SystemExit(f"evaluate: {path} carries no normalisation statistics or BPE model (a training "
                         "checkpoint?): pass the features' stats.json and the BPE model it was trained with")
    reduction = (int(extra["reduction_factor"]) if "reduction_factor" in extra
                 else int(state["model_kwargs"]["frame_dim"]) // N_MELS)
    return STTModel(model, str(path), stats, tokenizer, reduction, ctc_weight)


def load_stt_judge(path: str | None, ctc_weight: float, device: str, *, weights: bool = True,
                   evaluated: STTModel | None = None) -> STTModel | None:
    """``evaluate.stt_judge_model``: the MELD-STT judge, or None (logged) when there is none to use.

    A checkpoint trained for TTS only is not a judge; it is also how a config run under ``dvc repro``
    names no judge, since dvc.yaml lists the key as a dependency and DVC takes no null (the paper
    config points it at ``models/meld/model.pt``, which the stage depends on anyway).

    ``evaluated``: the evaluated model's STT side (a joint model's), which is the judge, not loaded
    again, when ``path`` is its checkpoint: it decodes as the judge would (the same file, the same
    ``ctc_weight``), and a second copy of the paper model's weights is 0.72 GB.
    """
    if not path:
        return None
    if not Path(path).is_file():
        log.warning("evaluate.stt_judge_model %s does not exist: MELD-STT judge skipped", path)
        return None
    if evaluated is not None and Path(evaluated.path).is_file() and os.path.samefile(path, evaluated.path):
        return evaluated
    # mapped, not read: only the task is wanted here (the paper model's checkpoint is ~0.7 GB); a
    # checkpoint without one is a TTS model, as main() reads the evaluated model's
    task = (load_checkpoint(path, mmap=True).get("extra") or {}).get("task", "tts")
    if task == "tts":
        log.info("evaluate.stt_judge_model %s was trained for TTS only: no MELD-STT judge", path)
        return None
    return load_stt_model(path, ctc_weight, device=device, weights=weights)


def transcribe_mels(stt: STTModel, mels: list[np.ndarray], beam: int, batch_size: int,
                    tokens_per_second: float, progress_desc: str | None = None,
                    decoding: Decoding = IN_PROCESS) -> list[str]:
    """Raw (denormalised) log-mel arrays -> text, through a MELD STT model (no vocoder)."""
    ids = decoding.transcribe(
        stt, [stt.stats.normalise(m) for m in mels], reduction=stt.reduction, beam_size=beam, max_tokens=STT_MAX_TOKENS,
        max_tokens_per_second=tokens_per_second, batch_size=batch_size, ctc_weight=stt.ctc_weight,
        progress_desc=progress_desc)
    return [stt.tokenizer.decode(i) for i in ids]


def score_with_stt_judge(stt, rows: list[dict], store: FeatureStore, chosen: list[int], tokens_per_second: float,
                         judge_exclude: tuple[str, ...] = (), decoding: Decoding = IN_PROCESS, *, beam: int = 5,
                         batch_size: int = 8) -> dict:
    """WER of the generated mel frames (and of the ground truth) read by MELD's own STT model.

    ``beam`` and ``batch_size``: the stage passes ``evaluate.stt_beam_size`` and ``evaluate.batch_size``,
    as for the STT evaluation (a fixed beam of 5 ignored the setting, and the metrics did not say it).

    Only speakers outside ``judge_exclude`` (evaluate.judge_exclude_prefixes) are read: the same rows
    as the external judge's WER, so the report's two WER columns compare the judges on the same
    utterances. Returns nothing when every speaker is excluded.
    """
    rows = [r for r in rows if not r["speaker"].startswith(judge_exclude)]
    chosen = [i for i in chosen if not store.index[i]["speaker"].startswith(judge_exclude)]
    if not rows:
        return {}
    hyps = transcribe_mels(stt, [r["_mel"] for r in rows], beam=beam, batch_size=batch_size,
                           tokens_per_second=tokens_per_second, progress_desc="STT judge: generations", decoding=decoding)
    gt_hyps = transcribe_mels(stt, [store[i] for i in chosen], beam=beam, batch_size=batch_size,
                              tokens_per_second=tokens_per_second, progress_desc="STT judge: ground truth",
                              decoding=decoding)
    w = wer_details([r["text"] for r in rows], hyps)
    g = wer_details([store.index[i]["text"] for i in chosen], gt_hyps)
    for r, h in zip(rows, hyps):
        r["stt_judge_hyp"] = h
    return {"wer_meld_stt_judge": w["wer"], "wer_ground_truth_meld_stt_judge": g["wer"]}


def evaluate_stt(stt, features: Path, cfg: EvaluateConfig, decoding: Decoding = IN_PROCESS) -> dict:
    """STT WER (beam search) per split, on up to stt_max_utterances utterances each, spread over its speakers."""
    out = {}
    for split in cfg.stt_splits:
        if not (features / split / "index.jsonl").is_file():
            log.warning("STT: no feature store for split %s", split)
            continue
        store = FeatureStore(features / split)
        idx = spread_over_speakers(store.index, range(len(store)), cfg.stt_max_utterances)
        if not idx:  # a WER of nothing is undefined; kept as {} so the report names the split, as for TTS
            log.warning("STT: split %s has no utterance in %s", split, features / split)
            out[split] = {}
            continue
        hyps = transcribe_mels(stt, [store[i] for i in idx], beam=cfg.stt_beam_size, batch_size=cfg.batch_size,
                               tokens_per_second=cfg.stt_max_tokens_per_second, progress_desc=f"STT {split}",
                               decoding=decoding)
        refs = [store.index[i]["text"] for i in idx]
        speakers = [store.index[i]["speaker"] for i in idx]
        per_speaker = {s: wer_details([r for r, k in zip(refs, speakers) if k == s],
                                      [h for h, k in zip(hyps, speakers) if k == s])["wer"]
                       for s in sorted(set(speakers))}
        out[split] = wer_details(refs, hyps) | {"per_speaker": per_speaker,
                                                "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:5]]}
        print(f"STT {split}: WER {out[split]['wer']:.1%} over {len(idx)} utterances ("
              + ", ".join(f"{s} {w:.1%}" for s, w in per_speaker.items()) + ")")
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else None


def summarise(rows: list[dict], compute_s: float, gen_audio_s: float, compile_s: float = 0.0) -> dict:
    """A split's metrics from its generation ``rows``; ``compute_s`` device-seconds of decoding made
    ``gen_audio_s`` seconds of speech, ``compile_s`` of them spent compiling (``compile_decoding``)."""
    judged = [r for r in rows if "hyp" in r]
    m: dict = {"utterances": len({r["id"] for r in rows}), "generations": len(rows)}
    if judged:
        w = wer_details([r["text"] for r in judged], [r["hyp"] for r in judged])
        gt_rows = {r["id"]: r for r in judged}.values()
        g = wer_details([r["text"] for r in gt_rows], [r["gt_hyp"] for r in gt_rows])
        m.update({"wer": w["wer"], "substitutions": w["substitutions"], "deletions": w["deletions"],
                  "insertions": w["insertions"], "wer_ground_truth_vocoded": g["wer"], "judged_generations": len(judged)})
    m.update({
        "sim": _mean([r.get("sim") for r in rows]),
        # SIM leaves out generations whose prompt or continuation is under 0.5 s (scoring.MIN_SIM_SAMPLES)
        "sim_generations": sum(r.get("sim") is not None for r in rows),
        "sim_ground_truth_continuation": _mean([r.get("sim_gt_continuation") for r in rows]),
        "sim_other_speaker": _mean([r.get("sim_other_speaker") for r in rows]),
        "sim_other_speaker_vocoded": _mean([r.get("sim_other_speaker_vocoded") for r in rows]),
        "duration_ratio": _mean([r["duration_ratio"] for r in rows]),
        "generated_minutes": sum(r["generated_seconds"] for r in rows) / 60,
        "ground_truth_minutes": sum(r["true_continuation_seconds"] for r in rows) / 60,
        "longest_silence_s": _mean([r["longest_silence_s"] for r in rows]),
        "ground_truth_longest_silence_s": _mean([r["gt_longest_silence_s"] for r in rows]),
        "max_length_hits": sum(bool(r["hit_max_length"]) for r in rows),
        # device-seconds per second generated, torch.compile's first call of each shape left out: a
        # one-off cost that would make a compiled model's RTF depend on how many shapes a split meets
        "rtf": (compute_s - compile_s) / gen_audio_s if gen_audio_s else None,
        "decode_compile_s": compile_s,
    })
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--system", default="meld")
    p.add_argument("--model", required=True)
    p.add_argument("--features", default="data/features")
    p.add_argument("--corpus", default="data/corpus")
    p.add_argument("--codes", default=None, help="DAC code store of the codes stage (codec_lm only)")
    p.add_argument("--run-id-file", default=None, help="file holding the MLflow run id of the training run (looked "
                   "for in MLFLOW_TRACKING_URI if set, else in the store the training recorded beside the file)")
    p.add_argument("--out", required=True)
    p.add_argument("--metrics", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = read_params(args.params)
    cfg = EvaluateConfig.from_dict(params.get("evaluate", {}), "evaluate")
    mlflow_experiment(params)  # the mlflow section checked now, not after hours of decoding
    check_training_run(args.run_id_file)  # and the store write_results logs to, and the run in it
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(2)
    # every TTS split must be there before hours of generation on the earlier ones; Codec-LM's prompts
    # come from its code store, which the check used to skip (a missing split stopped it when reached)
    stores = Path(args.codes or args.features)
    missing = [s for s in cfg.splits if not (stores / s / "index.jsonl").is_file()
               or not (Path(args.corpus) / s / "manifest.jsonl").is_file()]
    if missing:
        have = sorted(p.parent.name for p in stores.glob("*/index.jsonl"))
        raise SystemExit(f"evaluate.splits: {missing} not in {stores} / {args.corpus} (this corpus has {have})")
    try:  # the judges' device: auto resolved, a missing one refused before any work
        cfg = dataclasses.replace(cfg, score_device=resolve_device(cfg.score_device, "evaluate.score_device"))
    except ValueError as err:
        raise SystemExit(f"evaluate: {err}") from None
    if cfg.decode_workers > 1:  # the actors decode on the cluster's devices; this process needs none
        from ray_jobs.decode_pool import DecodePool, PoolRefused

        try:
            pool = DecodePool(cfg.decode_workers, cfg.device)
        except PoolRefused as err:  # too few GPUs or cores in the cluster: said before any model loads
            raise SystemExit(f"evaluate: {err}") from None
        with pool:  # (an error in the evaluation itself keeps its traceback)
            return evaluate(args, params, cfg, "cpu", Decoding(pool, args.model, cfg.compile_decoding))
    try:  # before the model loads: a GPU-less node fails in a second, not after loading
        device = resolve_device(cfg.device, "evaluate.device")
    except ValueError as err:
        raise SystemExit(f"evaluate: {err}") from None
    return evaluate(args, params, cfg, device, IN_PROCESS)


def evaluate(args: argparse.Namespace, params: dict, cfg: EvaluateConfig, device: str, decoding: Decoding) -> int:
    """The stage's work once its inputs are checked: ``device`` holds this process's models, ``decoding``
    says where they decode."""
    # with a pool the actors load and run the models; here only their structure and extras are needed,
    # so no weights are read (~0.75 GB per model at the paper's size, three models with the judges)
    weights = decoding.pool is None
    model, state = load_model(args.model, weights=weights)
    task = state["extra"].get("task", "tts")
    if weights:
        model.to(device)
        configure_decoding(model, compile=cfg.compile_decoding)
    # a joint or STT model's STT side decodes with the default step whatever the TTS side's settings,
    # which are kept per module: the same weights under modules of their own, settings reset, not a
    # second load of the checkpoint (made after the move to the device, which replaces buffers)
    stt_side = weight_sharing_copy(model) if task in ("stt", "joint") else None
    log.info("evaluating on %s", device if weights else f"{cfg.decode_workers} Ray actors ({cfg.device})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if model.system == "codec_lm":  # scored on DAC codes through its own codec, not on mel frames
        if not args.codes:
            raise SystemExit("evaluate: codec_lm is scored on DAC codes: give --codes (the codes stage's output)")
        metrics, all_rows = evaluate_codec_system(model, state, cfg, args.system, Path(args.codes),
                                                  Path(args.corpus), out, decoding)
        return write_results(args, params, metrics, all_rows, out)
    extra = state["extra"]
    stats = NormStats(extra["norm_mean"].numpy(), extra["norm_std"].numpy())
    tok = tokenizer_from_bytes(bytes(extra["bpe_model"].numpy().tobytes()))

    variants = [{"name": args.system}] if task in ("tts", "joint") else []
    if model.system == "meld" and task == "tts":  # the paper's Table-5 ablations are of the TTS model
        variants += [{"name": f"{args.system} (no repetition penalty)", "repetition_penalty": 1.0, "suffix": ".no_rep"},
                     {"name": f"{args.system} (latent zeroed)", "zero_latent": True, "suffix": ".zero_latent"}]
        variants = variants if cfg.ablations else variants[:1]
    metrics: dict = {"system": args.system, "task": task, "step": int(state["step"]), "vocoder": None,
                     "asr_judge": None, "speaker_model": None, "splits": {}, "ablations": {}}
    all_rows = []
    spec = ScorerSpec(cfg.vocoder, cfg.vocoder_path, cfg.asr_judge, cfg.asr_judge_path, cfg.speaker_model,
                      cfg.speaker_model_path, cfg.score_device)
    # the vocoder and judges load first: a path that does not load stops the stage before the STT evaluation
    scoring = open_scorer(spec, cfg.score_workers) if variants else contextlib.nullcontext()
    with scoring as scorer:
        if scorer is not None:
            built = scorer.describe()
            metrics["vocoder"], metrics["asr_judge"] = built["vocoder"], built["asr_judge"]
            metrics["speaker_model"] = built["speaker_model"]  # which encoder SIM comes from (scales differ)
            metrics["score_device"] = cfg.score_device  # resolved: the workers' devices are this, or its GPUs in turn
        stt = stt_model(stt_side, state, args.model, cfg.stt_ctc_weight) if stt_side is not None else None
        if stt is not None:
            metrics["stt"] = evaluate_stt(stt, Path(args.features), cfg, decoding)
            metrics["stt_ctc_weight"], metrics["stt_beam_size"] = stt.ctc_weight, cfg.stt_beam_size
        stt_judge = (load_stt_judge(cfg.stt_judge_model, cfg.stt_ctc_weight, device, weights=weights, evaluated=stt)
                     if variants else None)
        if stt_judge is not None:
            metrics["stt_judge_model"] = cfg.stt_judge_model
            metrics["stt_judge_ctc_weight"] = stt_judge.ctc_weight
            metrics["stt_judge_beam_size"] = cfg.stt_beam_size  # how it decodes, as the STT evaluation does
        references: dict[str, dict[int, dict]] = {split: {} for split in cfg.splits}  # shared by the variants
        for variant in variants:
            for split in cfg.splits:
                store = FeatureStore(Path(args.features) / split)
                audio = {r["id"]: r["audio_path"] for r in read_manifest(Path(args.corpus) / split / "manifest.jsonl")}
                summary, rows = evaluate_split(model, state, stats, tok, store, audio, cfg, split, scorer,
                                               tuple(cfg.judge_exclude_prefixes), out, variant, references[split],
                                               stt_judge if variant["name"] == args.system else None, decoding)
                for r in rows:
                    r["variant"] = variant["name"]
                all_rows += rows
                if variant["name"] == args.system:
                    metrics["splits"][split] = summary
                else:
                    metrics["ablations"].setdefault(variant["name"], {})[split] = summary
                print(f"{variant['name']} / {split}: " + ", ".join(
                    f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
                save_progress(args, metrics, all_rows, out)  # a later failure keeps what is done
    return write_results(args, params, metrics, all_rows, out)


def save_progress(args, metrics: dict, all_rows: list[dict], out: Path, *, complete: bool = False) -> None:
    """generations.jsonl and the metrics file as they stand, each written whole (temp file + rename):
    after every split, so that a failure in a later one (hours into a LibriSpeech evaluation) leaves
    the finished splits' numbers on disk, marked ``"complete": false``."""
    _write_atomically(out / "generations.jsonl", "".join(json.dumps(r) + "\n" for r in all_rows))
    Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(Path(args.metrics), json.dumps({**metrics, "complete": complete}, indent=2))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def check_training_run(run_id_file: str | None) -> tracking.RunStore:
    """The store :func:`write_results` logs to (:func:`meld.tracking.run_store`: ``MLFLOW_TRACKING_URI`` if set,
    else the one the training recorded beside the run-id file, else this directory's), checked before any model
    loads: a server that does not answer, and a training run that is not in the store, stop the stage in one
    line. (The run was looked for only at the end, in this directory's store: evaluate run from another
    directory than the training's project root decoded for hours, then failed with "Run '…' not found".)
    Without a run id the evaluation gets a run of its own at the end: nothing to look for.
    """
    store = tracking.run_store(run_id_file)  # reads the file: run_id None when it is missing or empty
    if run_id_file is not None and store.run_id is None:
        # named but missing or empty (a typo, a training that never opened its run): the metrics would go to a
        # run of their own, leaving the training run without them, and nothing said so
        raise SystemExit(f"evaluate: --run-id-file {run_id_file}: "
                         f"{'empty' if Path(run_id_file).is_file() else 'no such file'}; the train stage writes it "
                         "(<checkpoint_dir>/mlflow_run_id); leave the option out to log to a run of the evaluation's own")
    tracking.check_server(store.uri, named_by=store.named_by)
    if store.run_id is None:
        return store
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
    from mlflow.tracking import MlflowClient

    where = f"MLflow run {store.run_id} (named by {run_id_file}) is not in the tracking store {store.uri} ({store.named_by})"
    if store.recorded_uri and store.recorded_uri != store.uri:
        todo = (f"the training recorded {store.recorded_uri}: unset MLFLOW_TRACKING_URI, or set it to the store "
                "that holds the run")
    elif store.recorded_uri:
        todo = ("the run was deleted for good, or the store moved (another machine, a copied project): set "
                "MLFLOW_TRACKING_URI to the store that holds the run")
    else:
        todo = "set MLFLOW_TRACKING_URI to the training's store, or run from the training's project root"
    path = tracking.local_store_path(store.uri)
    if path is not None and not path.exists():  # opened, an SQLite store would be created empty, wherever it is
        raise SystemExit(f"evaluate: {where}: there is no such store; {todo}")
    try:
        run = MlflowClient(store.uri).get_run(store.run_id)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        raise SystemExit(f"evaluate: {where}; {todo}") from None
    if run.info.lifecycle_stage == "deleted":  # MLflow refuses to log to it
        raise SystemExit(f"evaluate: MLflow run {store.run_id} (named by {run_id_file}) is deleted in {store.uri}: "
                         f"restore it (mlflow runs restore --run-id {store.run_id}) or give another --run-id-file")
    return store


def write_results(args, params: dict, metrics: dict, all_rows: list[dict], out: Path) -> int:
    """generations.jsonl, the metrics file, and the metrics, samples and plots in the training run's
    MLflow run, with the evaluation's settings as ``eval.*`` tags (tags, not params: a rerun with
    other settings updates them, where MLflow refuses to change a logged param).

    The training run is written to through a client, not reopened with ``start_run``: reopened, an
    error while logging (a refused key, a full artifact store) ended the finished training run FAILED,
    and every evaluation moved its end time. Without a run-id file the evaluation gets a run of its own.

    The store is the one :func:`check_training_run` checked at the start (the same rule, the same files).
    """
    from mlflow.tracking import MlflowClient

    save_progress(args, metrics, all_rows, out, complete=True)
    store = tracking.run_store(args.run_id_file)
    mlflow = tracking.setup(mlflow_experiment(params), uri=store.uri)
    client = MlflowClient(mlflow.get_tracking_uri())
    run_id = store.run_id
    if run_id is not None:
        _log_evaluation(client, run_id, args, params, metrics, out)
        return 0
    experiment = client.get_experiment_by_name(mlflow_experiment(params))
    run_id = client.create_run(experiment.experiment_id, run_name=f"evaluate-{args.system}").info.run_id
    try:
        _log_evaluation(client, run_id, args, params, metrics, out)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return 0


def _metric_key_part(name: str) -> str:
    """A name as part of an MLflow metric key, which takes letters, digits, ``_ - . / `` and spaces only:
    "meld (latent zeroed)" -> "meld latent zeroed"; a speaker id holding "(" or "+" was refused."""
    return re.sub(r"[^\w./ -]", "", name).strip()


def _log_evaluation(client, run_id: str, args, params: dict, metrics: dict, out: Path) -> None:
    from mlflow.entities import Metric, RunTag

    tags = {**tracking.flatten({"eval": params.get("evaluate", {})}), **tracking.run_tags(params, prefix="eval.")}
    step = int(metrics.get("step", 0))  # the evaluated checkpoint's: beside the dev metrics of that step
    values: dict[str, float] = {}

    def add(prefix: str, s: dict) -> None:
        values.update({f"{prefix}/{k}": float(v) for k, v in s.items() if isinstance(v, (int, float))})

    for split, s in metrics["splits"].items():
        add(f"eval/{split}", s)
    for name, splits in metrics.get("ablations", {}).items():
        for split, s in splits.items():
            add(f"eval/ablation/{_metric_key_part(name)}/{split}", s)
    for split, s in metrics.get("stt", {}).items():
        add(f"eval/stt/{split}", s)
        add(f"eval/stt/{split}/wer_by_speaker", {_metric_key_part(spk): w for spk, w in s.get("per_speaker", {}).items()})
    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, step) for k, v in values.items()]
    tag_list = [RunTag(k, v) for k, v in tags.items()]
    for i in range(0, max(len(batch), len(tag_list)), 100):  # within MLflow's per-request limits
        client.log_batch(run_id, metrics=batch[i : i + 100], tags=tag_list[i : i + 100])
    for folder in ("samples", "plots"):
        if (out / folder).is_dir():
            client.log_artifacts(run_id, str(out / folder), f"eval/{folder}")
    client.log_artifact(run_id, args.metrics, "eval")

if __name__ == "__main__":
    sys.exit(run_stage("evaluate", main))
