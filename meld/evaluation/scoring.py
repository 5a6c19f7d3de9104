"""Scoring TTS continuations: vocoder -> ASR judge, speaker similarity, silence, in worker processes.

The judges are the slow part of evaluation (PocketSphinx reads audio at roughly a third of real
time on one core, and an undertrained model runs to the max-length guard, so there is a lot of
audio to read). Every item is independent, so :class:`ScoringPool` spreads them over processes,
each holding its own vocoder, judge and speaker encoder (none of them is picklable or
thread-safe). With one worker everything runs in the calling process.

Two kinds of work items:

- :class:`ReferenceItem`: one real utterance: the ground truth through the vocoder (the judge's
  floor), the prompt's speaker embedding (none for a prompt under ``MIN_SIM_SAMPLES``), and SIM floors (ground-truth continuation, a
  different speaker's real utterance as recorded and through the same vocoder as the continuations:
  the vocoder moves every embedding, so the like-for-like floor is the vocoded one);
- :class:`GenerationItem`: one continuation: [true prompt + generated frames] through the vocoder,
  the judge's transcript, SIM to the prompt and the longest silence of the continuation.

Codec systems (Codec-LM) bring their own decoder: their items carry waveforms already decoded by the
codec (``resynthesised`` / ``wav``) and the codec's hop, and the vocoder is not used for them.

Example::

    with ScoringPool(ScorerSpec("griffin_lim", None, "pocketsphinx", None, "resemblyzer", None), workers=2) as pool:
        refs = pool.map_references([ReferenceItem(audio, mel, p, other_audio, judged=True)])
        gens = pool.map_generations([GenerationItem(full_mel, p, judged=True, prompt_emb=refs[0]["prompt_emb"])])
"""

from __future__ import annotations

import multiprocessing
import os
import queue
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from meld.audio import SAMPLE_RATE, load_audio
from meld.evaluation.metrics import longest_silence_seconds
from meld.features import HOP_LENGTH

# a speaker embedding of less than 0.5 s of audio means little (and of none fails): a prompt or
# continuation shorter than this gets no embedding, so its generation gets no SIM
MIN_SIM_SAMPLES = SAMPLE_RATE // 2


@dataclass(frozen=True)
class ScorerSpec:
    """What each worker builds: backend names and optional local weight paths (picklable)."""

    vocoder: str
    vocoder_path: str | None
    asr_judge: str | None
    asr_judge_path: str | None
    speaker_model: str | None
    speaker_model_path: str | None
    device: str = "cpu"  # of HiFi-GAN, Whisper and the speaker encoder: cpu, cuda (one GPU per worker, in turn) or cuda:N


@dataclass(frozen=True)
class ReferenceItem:
    audio_path: str  # the real recording
    mel: np.ndarray | None  # (T, 80) its raw log-mel frames (what the vocoder resynthesises)
    prompt_frames: int  # frames of the prompt (62.5 Hz mel frames, or code frames: see hop_length)
    other_audio_path: str | None  # a different speaker's real utterance (SIM floor), if any
    judged: bool  # the ASR judge can recognise this speaker
    resynthesised: np.ndarray | None = None  # codec systems: the ground truth through their codec (replaces the vocoder)
    hop_length: int = HOP_LENGTH  # samples per prompt frame
    other_mel: np.ndarray | None = None  # the other speaker's raw log-mel: the same floor through the vocoder


@dataclass(frozen=True)
class GenerationItem:
    full_mel: np.ndarray | None  # (P + G, 80) raw log-mel: the true prompt then the generated frames
    prompt_frames: int
    judged: bool
    prompt_emb: np.ndarray | None  # the prompt's speaker embedding, from the reference item
    wav: np.ndarray | None = None  # codec systems: [prompt + continuation] already decoded (replaces the vocoder)
    hop_length: int = HOP_LENGTH  # samples per prompt frame


class Scorer:
    """The vocoder and judges of one process."""

    def __init__(self, spec: ScorerSpec, device: str | None = None):
        """``device``: this scorer's own (one of :func:`worker_devices`); default ``spec.device``."""
        from meld.evaluation.asr import build_asr_judge
        from meld.evaluation.speaker import build_speaker_embedder
        from meld.vocoder import build_vocoder

        self.device = device or spec.device
        self.vocoder = build_vocoder(spec.vocoder, spec.vocoder_path, device=self.device)
        self.judge = build_asr_judge(spec.asr_judge, spec.asr_judge_path, device=self.device) if spec.asr_judge else None
        self.embedder = (
            build_speaker_embedder(spec.speaker_model, spec.speaker_model_path, device=self.device)
            if spec.speaker_model else None
        )

    def describe(self) -> dict:
        """What was actually built (a missing backend leaves its judge out, with a logged message)."""
        return {"vocoder": self.vocoder.name, "asr_judge": self.judge.name if self.judge else None,
                "speaker_model": self.embedder.name if self.embedder else None, "device": self.device}

    def reference(self, item: ReferenceItem) -> dict:
        """Ground-truth scores of one utterance (keys present only where the backend exists)."""
        from meld.evaluation.speaker import cosine_similarity

        wav = load_audio(item.audio_path)
        gt_voc = item.resynthesised if item.resynthesised is not None else self.vocoder(item.mel)
        cut = item.prompt_frames * item.hop_length
        out = {"prompt_wav": wav[:cut], "gt_vocoded": gt_voc, "gt_cont_vocoded": gt_voc[cut:]}
        # against the loudest frame of the whole vocoded utterance, as a generation's (below)
        out["gt_longest_silence_s"] = longest_silence_seconds(out["gt_cont_vocoded"], SAMPLE_RATE, reference=gt_voc)
        if self.judge is not None and item.judged:
            out["gt_hyp"] = self.judge.transcribe(gt_voc, SAMPLE_RATE)
        # a prompt under the floor (none at all with evaluate.prompt_seconds 0, or one that rounds to no
        # model step) gives no speaker to compare to: no embedding, so none of its generations gets a SIM
        if self.embedder is not None and out["prompt_wav"].size >= MIN_SIM_SAMPLES:
            emb = self.embedder.embed(out["prompt_wav"], SAMPLE_RATE)
            out["prompt_emb"] = emb
            if out["gt_cont_vocoded"].size >= MIN_SIM_SAMPLES:
                out["sim_gt_cont"] = cosine_similarity(emb, self.embedder.embed(out["gt_cont_vocoded"], SAMPLE_RATE))
            if item.other_audio_path is not None:
                other = load_audio(item.other_audio_path)
                out["sim_other"] = cosine_similarity(emb, self.embedder.embed(other, SAMPLE_RATE))
            if item.other_mel is not None:
                other_voc = self.vocoder(item.other_mel)
                out["sim_other_vocoded"] = cosine_similarity(emb, self.embedder.embed(other_voc, SAMPLE_RATE))
        return out

    def generation(self, item: GenerationItem) -> dict:
        """Scores of one continuation; ``wav`` is the vocoded [prompt + continuation]."""
        from meld.evaluation.speaker import cosine_similarity

        wav = item.wav if item.wav is not None else self.vocoder(item.full_mel)
        cont = wav[item.prompt_frames * item.hop_length :]
        # the 0 dB level is the loudest frame of prompt and continuation: a continuation quiet throughout
        # (a model that only hisses) is silence, where against its own loudest frame it had none
        out = {"wav": wav,
               "longest_silence_s": longest_silence_seconds(cont, SAMPLE_RATE, reference=wav) if cont.size else 0.0}
        if self.judge is not None and item.judged:
            out["hyp"] = self.judge.transcribe(wav, SAMPLE_RATE)
        if self.embedder is not None and item.prompt_emb is not None and cont.size >= MIN_SIM_SAMPLES:
            out["sim"] = cosine_similarity(item.prompt_emb, self.embedder.embed(cont, SAMPLE_RATE))
        return out


_WORKER_SCORER: Scorer | None = None
# what building the worker's Scorer raised: kept and raised again by every task, so that the parent gets the
# backend's own one-line error (an exception out of the initializer only breaks the pool: BrokenProcessPool)
_WORKER_ERROR: BaseException | None = None


def worker_devices(device: str, workers: int, gpus: int) -> list[str]:
    """Each scoring worker's device: ``cuda`` spreads the workers over the node's ``gpus`` GPUs in turn
    (worker k on ``cuda:k mod gpus``); any other device (``cpu``, ``cuda:N``) is every worker's."""
    if device != "cuda":
        return [device] * workers
    if gpus < 1:
        raise ValueError("scoring on cuda, but this machine has no CUDA device")
    return [f"cuda:{k % gpus}" for k in range(workers)]


def _init_worker(spec: ScorerSpec, devices) -> None:
    global _WORKER_SCORER, _WORKER_ERROR
    import torch

    torch.set_num_threads(1)  # one core per worker: the pool is the parallelism
    try:  # each worker takes the next device of the queue (filled before any worker starts)
        device = devices.get(timeout=60)
    except queue.Empty:  # more workers than devices queued (never, unless one was replaced): spec's own
        device = spec.device
    try:
        _WORKER_SCORER = Scorer(spec, device)
    except Exception as err:
        _WORKER_ERROR = err


def _worker_scorer() -> Scorer:
    if _WORKER_ERROR is not None:
        raise _WORKER_ERROR
    return _WORKER_SCORER


def _describe() -> dict:
    return _worker_scorer().describe()


def _score_reference(item: ReferenceItem) -> dict:
    return _worker_scorer().reference(item)


def _score_generation(item: GenerationItem) -> dict:
    return _worker_scorer().generation(item)


class ScoringPool:
    """``workers`` processes (spawned, so no torch/OpenMP state is forked), or the calling process when 1.
    The backends are built when the pool is: one that does not load raises from the constructor.

    With ``spec.device`` ``cuda`` the workers take the machine's GPUs in turn (:func:`worker_devices`).
    Results come back in input order. Use as a context manager so the workers are shut down.
    """

    def __init__(self, spec: ScorerSpec, workers: int = 1):
        if workers < 1:
            raise ValueError(f"scoring workers must be >= 1, got {workers}")
        self.spec, self.workers = spec, min(workers, os.cpu_count() or 1)
        self._local: Scorer | None = None
        self._pool: ProcessPoolExecutor | None = None
        gpus = 0
        if spec.device == "cuda":
            import torch

            gpus = torch.cuda.device_count()
        devices = worker_devices(spec.device, self.workers, gpus)
        if self.workers == 1:
            self._local = Scorer(spec, devices[0])
            self._built = self._local.describe()
        else:
            context = multiprocessing.get_context("spawn")
            handed_out = context.Queue()
            for device in devices:
                handed_out.put(device)
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_init_worker,
                                             initargs=(spec, handed_out))
            try:  # a worker's load error (a backend's one-line ValueError) raised here, as in-process
                self._built = self._pool.submit(_describe).result()
            except BaseException:
                self.close()
                raise

    def describe(self) -> dict:
        """The backends a worker built: {vocoder, asr_judge, speaker_model} names (None when missing)."""
        return self._built

    def map_references(self, items: Sequence[ReferenceItem]) -> Iterator[dict]:
        if self._local is not None:
            return map(self._local.reference, items)
        return self._pool.map(_score_reference, items)

    def map_generations(self, items: Sequence[GenerationItem]) -> Iterator[dict]:
        if self._local is not None:
            return map(self._local.generation, items)
        return self._pool.map(_score_generation, items)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
