"""``meld synthesize``: zero-shot TTS continuation, one utterance or a ``--list`` of them in batches."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meld.cli.checkpoint import LoadedCheckpoint, load_inference_checkpoint
from meld.cli.common import (
    _EVAL_DEFAULTS,
    EXIT_FAILURE,
    EXIT_USER_ERROR,
    PROG,
    CLIError,
    CLIFailure,
    _check_finite,
    _configure_decoding,
    _device,
    _first_line,
    _task,
    read_audio,
    read_list_lines,
    write_line,
)
from meld.config import SAMPLING_FLOOR


def _check_out(out: str, label: str = "--out") -> Path:
    """``--out``, checked before any model work: an audio file that can be written where it points.

    A missing parent folder is fine (``write_audio`` creates it), as long as the nearest folder
    that exists takes new entries.
    """
    path = Path(out)
    where = f"{label} {out}"
    try:
        return _check_out_path(path, where)
    except (OSError, ValueError) as err:  # a name too long for the file system, a NUL byte
        raise CLIError(f"{where}: not a usable path ({_first_line(err)})") from err


def _check_out_path(path: Path, where: str) -> Path:
    if path.is_dir():
        raise CLIError(f"{where}: is a folder; give a file name such as {path / 'out.wav'}")
    from meld.audio import LOSSY_FORMATS, audio_extensions

    extensions = audio_extensions()  # what write_audio writes, .ogg and .mp3 included
    if path.suffix.lower() not in extensions:
        what = "has no file extension" if not path.suffix else f"{path.suffix} is not an audio format written here"
        lossy = tuple(f".{f.lower()}" for f in LOSSY_FORMATS)
        others = ", ".join(e for e in extensions if e not in (".wav", ".flac", *lossy))
        raise CLIError(f"{where}: {what}; use .wav or .flac (16-bit PCM), {' or '.join(lossy)} (lossy), or {others}")
    folder = path.parent
    while not folder.exists():  # Path("x/file.wav/y").exists() is False too: the loop stops at the file
        folder = folder.parent
    if not folder.is_dir():
        raise CLIError(f"{where}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"{where}: cannot write in folder {folder} (permission denied)")
    if path.exists() and not os.access(path, os.W_OK):
        raise CLIError(f"{where}: the file exists and is not writable")
    return path


def _file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of an existing file, links followed, so that two spellings of one file compare equal;
    None where no file is (or the path is one the file system refuses). ``new/../x.wav`` is ``x.wav`` even
    while ``new`` does not exist: writing it creates ``new`` first."""
    try:
        st = os.stat(os.path.realpath(path))
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _out_is_no_prompt(requests: list[SynthesisRequest]):
    """A check that no request's out is a prompt file, its own or another line's: writing it would replace
    a recording the user gave as input. Every prompt counts, also one of a line refused for another reason."""
    prompts: dict[tuple[int, int], SynthesisRequest] = {}
    for req in requests:
        identity = _file_identity(req.prompt) if req.prompt else None
        if identity is not None:
            prompts.setdefault(identity, req)

    def check(req: SynthesisRequest) -> None:
        owner = prompts.get(_file_identity(req.out))
        if owner is None:
            return
        whose = ("the --prompt file" if not req.where else "this line's prompt" if owner is req
                 else f"the prompt of {owner.where.rstrip(': ')}")
        raise CLIError(f"{req.out_label} {req.out}: is {whose}; writing there would replace that recording "
                       "(give another output name)")

    return check


def _write_out(out: str, wav: np.ndarray, sample_rate: int, label: str = "--out") -> Path:
    """Write the synthesis to ``--out``; if that fails anyway (disk full, a file size limit, a race), save it
    elsewhere. A failed write leaves a file already at ``--out`` as it was (:func:`meld.audio.write_audio`)."""
    from meld.audio import write_audio

    try:
        return write_audio(out, wav, sample_rate)
    except Exception as err:  # OSError, soundfile's LibsndfileError (a RuntimeError), ...
        raise CLIError(f"{label} {out}: cannot write the audio ({_write_failure(err)}); "
                       f"{_save_elsewhere(wav, sample_rate)}") from err


def _save_elsewhere(wav: np.ndarray, sample_rate: int) -> str:
    """Save audio that could not be written where asked in the temporary folder; says where, or why not."""
    from meld.audio import write_audio

    rescue = None
    try:
        fd, rescue = tempfile.mkstemp(prefix="meld-", suffix=".wav")  # a name no other file has
        os.close(fd)
        return f"the audio is saved in {write_audio(rescue, wav, sample_rate)} instead"
    except Exception as err:
        if rescue is not None:  # the empty file that held the name
            Path(rescue).unlink(missing_ok=True)
        return f"saving it to {tempfile.gettempdir()} failed too ({_write_failure(err)})"


def _write_failure(err: Exception) -> str:
    """Why a write failed, in one line: the system's errno and reason where there is one."""
    if isinstance(err, OSError) and err.errno is not None:
        return f"errno {err.errno}, {errno.errorcode.get(err.errno, '?')}: {err.strerror}"
    return f"{type(err).__name__}: {_first_line(err)}"


def _encode_text(tokenizer, text: str, label: str = "--text") -> list[int]:
    """``--text`` as BPE ids; refuses characters the model has no piece for instead of speaking <unk>."""
    unknown = tokenizer.unknown_characters(text)
    if unknown:
        from meld.text import normalise_transcript

        words = [w for w in text.split() if any(c in w or c in normalise_transcript(w) for c in unknown)]
        raise CLIError(
            f"{label}: characters not in the model's vocabulary: {', '.join(map(repr, unknown))} "
            f"(in {', '.join(map(repr, words))}); spell numbers out (\"twenty\", not \"20\") and "
            "write other words in the letters it was trained on"
        )
    try:
        return tokenizer.encode(text)
    except ValueError as err:
        raise CLIError(f"{label}: {err}") from err


def _check_vocoder_path(args: argparse.Namespace) -> None:
    """An explicit ``--vocoder-path`` must hold a HiFi-GAN: only ``--vocoder hifigan`` alone falls back."""
    if args.vocoder_path is None:
        return
    if args.vocoder != "hifigan":
        logging.getLogger(PROG).warning("--vocoder-path %s is ignored: only --vocoder hifigan uses it",
                                        args.vocoder_path)
        return
    folder = Path(args.vocoder_path)
    if not folder.is_dir():
        raise CLIError(f"--vocoder-path {folder}: no such folder (a SpeechT5 HiFi-GAN folder: config.json + weights)")
    if not (folder / "config.json").is_file():
        raise CLIError(f"--vocoder-path {folder}: no config.json (expected a SpeechT5 HiFi-GAN folder)")


def _build_vocoder(args: argparse.Namespace, device: str):
    """The vocoder, built before generation: an explicit ``--vocoder-path`` that won't load is an error."""
    from meld.vocoder import HiFiGANVocoder, build_vocoder

    if args.vocoder != "hifigan" or args.vocoder_path is None:  # the evaluation's folder, with its fallback
        try:
            return build_vocoder(args.vocoder, _EVAL_DEFAULTS.vocoder_path, n_iter=args.griffin_lim_iters,
                                 device=device)
        except ValueError as err:  # a folder there that holds something else than a SpeechT5 HiFi-GAN
            raise CLIError(f"evaluate.vocoder_path {_EVAL_DEFAULTS.vocoder_path}: {_first_line(err)}") from err
    try:
        return HiFiGANVocoder.from_path(args.vocoder_path, device=device)
    except Exception as err:  # missing weights, a foreign config, weights that don't fit, a corrupt file
        raise CLIError(f"--vocoder-path {args.vocoder_path}: the HiFi-GAN does not load "
                       f"({type(err).__name__}: {_first_line(err)})") from err


def prompt_log_mel(wav: np.ndarray, prompt_seconds: float) -> np.ndarray:
    """Log-mel frames of the first ``prompt_seconds`` of a 16 kHz waveform.

    Only the samples those frames see are analysed (a frame spans +-n_fft/2 around its
    centre), so the frames equal those of the whole file while a long file costs nothing extra.

    Returns:
        (P, 80) float32 raw log-mel, P = round(prompt_seconds * 62.5) at most.
    """
    from meld.audio import SAMPLE_RATE
    from meld.features import FRAME_RATE, HOP_LENGTH, N_FFT, N_MELS, log_mel

    want = int(round(prompt_seconds * FRAME_RATE))
    if want <= 0:
        return np.zeros((0, N_MELS), np.float32)
    mel = log_mel(wav[: want * HOP_LENGTH + N_FFT // 2], SAMPLE_RATE)
    return mel[:want]



@dataclass
class SynthesisRequest:
    """One utterance to synthesise, and where it was asked for (``where``: "" on the command line,
    "list.tsv:3: " for a line of ``--list``), so every message can name it."""

    where: str
    text: str
    prompt: str | None
    out: str
    out_label: str = "--out"
    prompt_wav: np.ndarray | None = None  # 16 kHz, cut to what the prompt needs
    prompt_mel: np.ndarray | None = None  # (P, 80) raw log-mel of the prompt's first --prompt-seconds
    text_ids: list[int] | None = None


@dataclass
class Synthesis:
    """What one request produced: the audio and how it came about."""

    wav: np.ndarray
    sample_rate: int
    prompt_seconds: float
    generated_seconds: float
    hit_max_length: bool


LIST_FIELDS = ("out", "prompt", "text")


def read_synthesis_list(path: str | Path) -> tuple[list[SynthesisRequest], list[str]]:
    """``--list``: one utterance per line, ``out<TAB>prompt<TAB>text`` (``-`` or nothing for no prompt;
    blank lines and lines starting with ``#`` are skipped).

    Returns:
        The well-formed requests, and one message per malformed line (which is left out).
    """
    path = Path(path)
    requests, errors, outs = [], [], {}
    for number, line in read_list_lines(path):
        where = f"{path}:{number}: "
        fields = line.split("\t")
        if len(fields) != len(LIST_FIELDS):
            errors.append(f"{where}expected {len(LIST_FIELDS)} tab-separated fields ({', '.join(LIST_FIELDS)}), "
                          f"got {len(fields)}")
            continue
        out, prompt, text = (f.strip() for f in fields)
        if not out:
            errors.append(f"{where}no output file in the first field")
            continue
        try:
            key = str(Path(out).resolve())
        except (OSError, ValueError) as err:  # a NUL byte, a name too long for the file system
            errors.append(f"{where}out {out!r}: not a usable path ({_first_line(err)})")
            continue
        if key in outs:
            errors.append(f"{where}out {out} is line {outs[key]}'s output too")
            continue
        outs[key] = number
        requests.append(SynthesisRequest(where, text, None if prompt in ("", "-") else prompt, out, "out"))
    if not requests and not errors:
        raise CLIError(f"--list {path}: no utterances (each line: {' TAB '.join(LIST_FIELDS)})")
    return requests, errors


def _check_synthesis_mode(args: argparse.Namespace) -> None:
    """One utterance (``--text`` and ``--out``) or a list (``--list``), not both."""
    if args.list is None and (args.text is None or args.out is None):
        raise CLIError("give --text and --out (one utterance), or --list FILE (many)")
    if args.list is not None and (args.text is not None or args.out is not None or args.prompt is not None):
        raise CLIError("--list gives each utterance's out, prompt and text: drop --text, --out and --prompt")
    if args.prompt is not None and not args.prompt.strip():  # `--prompt "$PROMPT"` with the variable unset
        raise CLIError("--prompt is empty: give an audio file, or leave --prompt out to synthesise without one")


def _check_synthesis_options(args: argparse.Namespace) -> None:
    """Every option of ``synthesize`` that applies to all its utterances; no file is opened."""
    from meld.features import FRAME_RATE

    _check_finite(args, "--prompt-seconds", "--max-seconds", "--temperature", "--top-p", "--repetition-penalty")
    if args.prompt_seconds < 0:
        raise CLIError(f"--prompt-seconds must be >= 0, got {args.prompt_seconds}")
    if args.max_seconds <= 0:
        raise CLIError(f"--max-seconds must be > 0, got {args.max_seconds}")
    if args.max_seconds * FRAME_RATE > MAX_GUARD_FRAMES:
        raise CLIError(f"--max-seconds must be at most {MAX_GUARD_FRAMES / FRAME_RATE:g} ({MAX_GUARD_FRAMES} frames, "
                       f"the most positions the model tells apart), got {args.max_seconds:g}")
    if args.temperature < SAMPLING_FLOOR:
        raise CLIError(f"--temperature must be >= {SAMPLING_FLOOR:g}, got {args.temperature} (smaller ones break "
                       "float32 sampling; use --top-k 1 for greedy decoding)")
    if not SAMPLING_FLOOR <= args.top_p <= 1:
        raise CLIError(f"--top-p must be in [{SAMPLING_FLOOR:g}, 1], got {args.top_p} (smaller ones break float32 "
                       "sampling; use --top-k 1 for greedy decoding)")
    if args.top_k < 0:
        raise CLIError(f"--top-k must be >= 0 (0 disables it), got {args.top_k}")
    if args.repetition_penalty < 1:
        raise CLIError(f"--repetition-penalty must be >= 1, got {args.repetition_penalty}")
    if args.griffin_lim_iters < 1:
        raise CLIError(f"--griffin-lim-iters must be >= 1, got {args.griffin_lim_iters}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not -(2**63) <= args.seed < 2**64:  # torch's seed range
        raise CLIError(f"--seed must fit in 64 bits, got {args.seed}")


# a prompt file is cut to the prompt and this much more before it is kept: far beyond what the mel
# frames (n_fft / 2) or a resampler's filter (milliseconds) see, and a long list holds no long files
PROMPT_MARGIN_S = 1.0
# a prompt whose samples all stay below one step of 16-bit audio is digital silence (a muted input, an
# empty channel): it holds no voice to continue, and the model would only continue the silence
SILENT_PEAK = 1 / 32768
# the guard reserves a position per frame, and positions are float32 in the sinusoidal table: past 2^24
# they are no longer distinct (and far sooner the reserved cache no longer fits in memory)
MAX_GUARD_FRAMES = 2**24


def _check_text_present(req: SynthesisRequest) -> None:
    if not req.text or not req.text.strip():
        raise CLIError("--text is empty: give the full transcript (prompt words + new words)" if not req.where
                       else "the text is empty: give the full transcript (prompt words + new words)")


def _load_prompt(req: SynthesisRequest, prompt_seconds: float) -> None:
    """Read the request's prompt audio, kept only up to the prompt and a margin, and analyse it: audio
    the front end refuses (samples so large that its spectrum overflows) is refused before any model work."""
    from meld.audio import SAMPLE_RATE

    if req.prompt:
        wav = read_audio(req.prompt)
        req.prompt_wav = wav[: int(round((prompt_seconds + PROMPT_MARGIN_S) * SAMPLE_RATE))]
        used = req.prompt_wav[: int(round(prompt_seconds * SAMPLE_RATE))]
        if used.size and float(np.abs(used).max()) < SILENT_PEAK:
            raise CLIError(f"{req.prompt}: its first {used.size / SAMPLE_RATE:.2f} s (the prompt) are silent: no "
                           "sample reaches one 16-bit step, so there is no voice to continue; trim the leading "
                           "silence, or synthesise without a prompt")
        try:
            req.prompt_mel = prompt_log_mel(req.prompt_wav, prompt_seconds)
        except ValueError as err:
            raise CLIError(f"{req.prompt}: {err}") from err


class _Outcome:
    """Counts a list's refused and failed utterances; on the command line (one utterance) it raises instead."""

    def __init__(self, batch_mode: bool):
        self.batch_mode, self.refused, self.failed = batch_mode, 0, 0

    def refuse(self, req: SynthesisRequest, err: CLIError | CLIFailure) -> None:
        if not self.batch_mode:
            raise err
        kind = "error" if isinstance(err, CLIError) else "failed"
        write_line(f"{PROG}: {kind}: {req.where}{err}", sys.stderr)  # above the progress bar, not through it
        if isinstance(err, CLIError):
            self.refused += 1
        else:
            self.failed += 1

    def exit_code(self) -> int:
        return EXIT_USER_ERROR if self.refused else EXIT_FAILURE if self.failed else 0

    def keep(self, requests: list[SynthesisRequest], check) -> list[SynthesisRequest]:
        """The requests that pass ``check`` (which raises :class:`CLIError`); the others are refused."""
        kept = []
        for req in requests:
            try:
                check(req)
                kept.append(req)
            except CLIError as err:
                self.refuse(req, err)
        return kept


def cmd_synthesize(args: argparse.Namespace) -> int:
    from meld.progress import progress

    # every check that needs no model comes first, so a typo costs no model load and no synthesis; one
    # utterance is checked in the order the command always had: text, options, --out, vocoder, device, audio
    _check_synthesis_mode(args)
    outcome = _Outcome(batch_mode=args.list is not None)
    if args.list is None:
        requests = [SynthesisRequest("", args.text, args.prompt, args.out)]
        asked = 1
    else:
        requests, malformed = read_synthesis_list(args.list)
        asked = len(requests) + len(malformed)
        for message in malformed:
            print(f"{PROG}: error: {message}", file=sys.stderr)
        outcome.refused += len(malformed)
    everything_asked = list(requests)  # every prompt is an input that no output may replace
    if outcome.batch_mode:  # options first: they hold for every line
        _check_synthesis_options(args)
    requests = outcome.keep(requests, _check_text_present)
    if not outcome.batch_mode:
        _check_synthesis_options(args)
    requests = outcome.keep(requests, lambda req: _check_out(req.out, req.out_label))
    requests = outcome.keep(requests, _out_is_no_prompt(everything_asked))
    _check_vocoder_path(args)
    device = _device(args.device)
    requests = outcome.keep(requests, lambda req: _load_prompt(req, args.prompt_seconds))
    if not requests:
        print(f"wrote 0 of {asked} utterances ({outcome.refused} refused, 0 failed)")
        raise CLIError(f"--list {args.list}: no utterance left to synthesise")
    ckpt = load_inference_checkpoint(args.checkpoint, device)
    if not hasattr(ckpt.model, "generate"):
        raise CLIError(f"{ckpt.path}: system {ckpt.state['system']!r} cannot synthesise speech")

    def encode(req: SynthesisRequest) -> None:
        req.text_ids = _encode_text(ckpt.tokenizer, req.text, "--text" if not req.where else "text")

    _warn_unused_options(args, ckpt)
    ready = outcome.keep(requests, encode)
    if _task(ckpt.state) == "stt":
        logging.getLogger(PROG).warning("%s was trained for STT only: its speech will be noise", ckpt.path)
    if not ready:
        print(f"wrote 0 of {asked} utterances ({outcome.refused} refused, 0 failed)")
        return outcome.exit_code()

    if ckpt.state["system"] == "codec_lm":
        synthesise = _codec_synthesiser(args, ckpt, device)
    else:  # the vocoder is built before generation: one that won't load wastes no synthesis
        synthesise = _mel_synthesiser(args, ckpt, _build_vocoder(args, device))
    _configure_decoding(ckpt.model, args.compile)

    # One batch at a time, each written before the next is generated: a crash late in a long list keeps
    # what was done. Batch k is seeded with seed + k, so it speaks the same whatever batches came before.
    totals = {"model": 0.0, "decoder": 0.0, "generated": 0.0, "written": 0}
    decoder_name = ""
    from meld.generate import batch_seed

    bar = progress(total=len(ready), desc="synthesize", unit="utt", disable=not outcome.batch_mode)
    for k, start in enumerate(range(0, len(ready), args.batch_size)):
        chunk = ready[start : start + args.batch_size]
        results, model_s, decoder_s, decoder_name = synthesise(chunk, batch_seed(args.seed, k))  # numpy out: synced
        totals["model"] += model_s
        totals["decoder"] += decoder_s
        for req, result in zip(chunk, results):
            if isinstance(result, Synthesis) and not np.isfinite(result.wav).all():  # NaN has no 16-bit sample
                result = CLIFailure(f"{decoder_name} produced NaN or infinite samples: nothing to write")
            if isinstance(result, CLIFailure):
                outcome.refuse(req, result)
                continue
            replaced = os.path.lexists(req.out)
            try:
                out = _write_out(req.out, result.wav, result.sample_rate, req.out_label)
            except CLIError as err:
                outcome.refuse(req, err)
                continue
            totals["generated"] += result.generated_seconds
            totals["written"] += 1
            _print_synthesis(out, result, args.max_seconds, one_line=outcome.batch_mode, replaced=replaced)
        bar.update(len(chunk))
    bar.close()
    if outcome.batch_mode:
        print(f"wrote {totals['written']} of {asked} utterances ({outcome.refused} refused, {outcome.failed} failed)")
    if totals["generated"] > 0:
        rtf = (totals["model"] + totals["decoder"]) / totals["generated"]
        print(f"real-time factor: {rtf:.3f} (model {totals['model']:.2f} s + {decoder_name} {totals['decoder']:.2f} s "
              f"for {totals['generated']:.2f} s generated, on {device})")
    else:
        print("real-time factor: n/a (nothing generated after the prompt)")
    return outcome.exit_code()


# --griffin-lim-iters' default, here so that an option left at it can be told from one given
GRIFFIN_LIM_ITERS = 32


def _warn_unused_options(args: argparse.Namespace, ckpt: LoadedCheckpoint) -> None:
    """Say which options given on the command line this checkpoint's synthesis does not use: dropped without a
    word, a run "with" one would be compared with a run "without" that was the very same."""
    if ckpt.state["system"] == "codec_lm":  # the DAC decoder makes the audio; code sampling has no penalty
        given = {
            "--repetition-penalty": args.repetition_penalty != _EVAL_DEFAULTS.repetition_penalty,
            "--no-test-time-dropout": args.no_test_time_dropout,
            "--vocoder": args.vocoder != _EVAL_DEFAULTS.vocoder,
            "--vocoder-path": args.vocoder_path is not None,
            "--griffin-lim-iters": args.griffin_lim_iters != GRIFFIN_LIM_ITERS,
        }
        why = "its DAC decoder makes the audio, and code sampling has no repetition penalty and no mel encoder"
    else:
        given = {"--codec-weights": args.codec_weights is not None}
        why = "only a codec_lm checkpoint decodes codes with a DAC"
    unused = [option for option, set_ in given.items() if set_]
    if unused:
        logging.getLogger(PROG).warning("%s: %s %s not used by this %s checkpoint (%s)", ckpt.path, ", ".join(unused),
                                        "is" if len(unused) == 1 else "are", ckpt.state["system"], why)


def _print_synthesis(out: Path, result: Synthesis, max_seconds: float, *, one_line: bool, replaced: bool) -> None:
    """What was written; an output that replaced a file already there says so (nothing is replaced unsaid)."""
    total = result.wav.shape[0] / result.sample_rate
    stop = f"max-length guard hit ({max_seconds:g} s)" if result.hit_max_length else "<EOS>"
    parts = f"prompt {result.prompt_seconds:.2f} s + generated {result.generated_seconds:.2f} s"
    wrote = f"wrote {out}{' (replacing the file that was there)' if replaced else ''}"
    clipped = _clipping(result.wav)
    if one_line:
        write_line(f"{wrote}: {total:.2f} s ({parts}; stopped by {stop}){'; ' + clipped if clipped else ''}",
                   sys.stdout)
    else:
        print(f"{wrote}: {total:.2f} s at {result.sample_rate} Hz ({parts})")
        print(f"stopped by: {stop}")
        if clipped:
            print(clipped)


def _clipping(wav: np.ndarray) -> str:
    """What 16-bit PCM's [-1, 1] cut off (:func:`meld.audio.write_audio` clips), or "" if nothing. Griffin-Lim
    brings a loud prompt back louder than it was (its phase is not the recording's), and a hard-clipped file
    would otherwise pass for the model's own sound in a listening test or a similarity score."""
    magnitude = np.abs(wav)
    peak = float(magnitude.max()) if wav.size else 0.0
    if peak <= 1.0:
        return ""
    n = int(np.count_nonzero(magnitude > 1.0))
    return (f"clipped {n} samples ({100 * n / wav.size:.3f}%) at full scale (peak {peak:.3f}): the audio "
            "is louder than 16-bit PCM holds (a loud prompt comes back louder through Griffin-Lim)")


def _vocode_all(vocoder, mels: list[np.ndarray]) -> list[np.ndarray | CLIFailure]:
    """Vocode a batch's mels; a mel the vocoder refuses (HiFi-GAN's output not finite) is that request's
    :class:`CLIFailure`, and the others are still written. Griffin-Lim is numpy FFTs, which release the
    GIL, and seeds each call itself: threads give the same audio as one after another, on every core. A
    torch vocoder already spreads one call over the cores, so it runs them in turn."""
    from concurrent.futures import ThreadPoolExecutor

    from meld.vocoder import GriffinLimVocoder

    def vocode(mel: np.ndarray) -> np.ndarray | CLIFailure:
        try:
            return vocoder(mel)
        except ValueError as err:
            return CLIFailure(f"{vocoder.name}: {err}")

    workers = min(len(mels), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if not isinstance(vocoder, GriffinLimVocoder) or workers < 2:
        return [vocode(m) for m in mels]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(vocode, mels))


def _mel_synthesiser(args: argparse.Namespace, ckpt: LoadedCheckpoint, vocoder):
    """Synthesis for the mel systems: ``(requests, seed) -> (results, model s, vocoder s, vocoder name)``,
    each result a :class:`Synthesis` or the :class:`CLIFailure` that request met."""
    from meld.features import FRAME_RATE, N_MELS, log_mel_ceiling
    from meld.generate import tts_continue

    r = ckpt.reduction
    max_frames = max(1, int(round(args.max_seconds * FRAME_RATE)))
    ceiling = log_mel_ceiling()

    def synthesise(requests: list[SynthesisRequest], seed: int):
        prompts = []
        for req in requests:
            raw = np.zeros((0, N_MELS), np.float32)
            if req.prompt_mel is not None:
                raw = req.prompt_mel[: (req.prompt_mel.shape[0] // r) * r]  # whole groups of r frames
                if raw.shape[0] == 0 and args.prompt_seconds > 0:
                    logging.getLogger(PROG).warning(
                        "%s%s: prompt shorter than one frame group; generating without it", req.where, req.prompt
                    )
            prompts.append(raw)
        t0 = time.perf_counter()
        conts = tts_continue(
            ckpt.model,
            [req.text_ids for req in requests],
            [ckpt.stats.normalise(p) for p in prompts],
            reduction=r,
            max_frames=max_frames,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            test_time_dropout=not args.no_test_time_dropout,
            batch_size=len(requests),
            seed=seed,
        )
        model_s = time.perf_counter() - t0
        results, mels = [], {}
        for i, (raw, cont) in enumerate(zip(prompts, conts)):
            if not np.isfinite(cont.frames).all():
                results.append(CLIFailure("the model produced non-finite frames"))
                continue
            full_mel = np.concatenate([raw, ckpt.stats.denormalise(cont.frames)])  # (P + T, 80) raw log-mel
            if full_mel.shape[0] == 0:
                results.append(CLIFailure(
                    "the model stopped before producing any frame and there is no prompt: nothing to write"))
                continue
            loudest = float(full_mel.max())
            if loudest > ceiling:  # an inf too: frames * norm_std can overflow float32
                results.append(CLIFailure(
                    f"the model's frames, denormalised by the checkpoint's norm_mean and norm_std, reach {loudest:.3g}, "
                    f"beyond any log-mel ({ceiling:.1f} at most): no vocoder can turn them into audio"))
                continue
            results.append(None)
            mels[i] = full_mel
        t1 = time.perf_counter()
        wavs = _vocode_all(vocoder, list(mels.values()))
        vocoder_s = time.perf_counter() - t1
        for (i, full_mel), wav in zip(mels.items(), wavs):
            if isinstance(wav, CLIFailure):
                results[i] = wav
                continue
            cont = conts[i]
            results[i] = Synthesis(wav, vocoder.sample_rate, (full_mel.shape[0] - cont.frames.shape[0]) / FRAME_RATE,
                                   cont.frames.shape[0] / FRAME_RATE, cont.hit_max_length)
        return results, model_s, vocoder_s, vocoder.name

    return synthesise


def _codec_synthesiser(args: argparse.Namespace, ckpt: LoadedCheckpoint, device: str):
    """Codec-LM: the prompt is encoded, and the generated codes decoded, by the codec its training codes
    came from. The same contract as :func:`_mel_synthesiser`."""
    from meld.audio import SAMPLE_RATE, resample
    from meld.codes import (
        CodecMismatch,
        codec_from_description,
        continue_codes,
        decode_codes,
        prompt_codes,
    )

    desc = ckpt.state["extra"]["codec"]
    try:
        codec = codec_from_description(desc, args.codec_weights).to(device)
    except FileNotFoundError as err:
        raise CLIError(f"{ckpt.path} speaks codes of DAC weights that are not here ({err}); "
                       "give their local path with --codec-weights") from err
    except CodecMismatch as err:
        raise CLIError(f"{ckpt.path}: {err}") from err
    except ValueError as err:  # weights that are there but do not load (truncated, NaN): the message names the file
        raise CLIError(f"{ckpt.path} speaks codes of a DAC whose weights do not load: {err}") from err
    if desc.get("random"):
        logging.getLogger(PROG).warning(
            "%s was trained on codes of a random DAC (codec_lm.codec_weights was null): its speech is noise", ckpt.path
        )
    max_frames = max(1, int(round(args.max_seconds * codec.frame_rate)))

    def synthesise(requests: list[SynthesisRequest], seed: int):
        prompts = []
        for req in requests:
            codes = np.zeros((0, codec.n_codebooks), np.int16)
            if req.prompt_wav is not None and args.prompt_seconds > 0:
                # the prompt with its margin, encoded whole and cut in codes, as the evaluation does
                codes = prompt_codes(codec, resample(req.prompt_wav, SAMPLE_RATE, codec.sample_rate),
                                     args.prompt_seconds)
            prompts.append(codes)
        t0 = time.perf_counter()
        conts = continue_codes(ckpt.model, [req.text_ids for req in requests], prompts, max_frames=max_frames,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               batch_size=len(requests), seed=seed)
        model_s = time.perf_counter() - t0
        results, decoder_s = [], 0.0
        for prompt, cont in zip(prompts, conts):
            codes = np.concatenate([prompt.astype(np.int64), cont.codes])
            if len(codes) == 0:
                results.append(CLIFailure(
                    "the model stopped before producing any frame and there is no prompt: nothing to write"))
                continue
            t1 = time.perf_counter()
            wav = decode_codes(codec, codes)
            decoder_s += time.perf_counter() - t1
            results.append(Synthesis(wav, codec.sample_rate, len(prompt) / codec.frame_rate,
                                     len(cont.codes) / codec.frame_rate, cont.hit_max_length))
        return results, model_s, decoder_s, "DAC decoder"

    return synthesise


