"""The ``meld`` command: synthesise speech, transcribe audio, inspect checkpoints.

    meld synthesize --checkpoint models/meld/model.pt --prompt speaker.wav \\
        --text "the prompt's own words followed by the new words" --out out.wav
    meld synthesize --checkpoint models/meld/model.pt --list utterances.tsv   # out TAB prompt TAB text
    meld transcribe --checkpoint models/meld_stt/model.pt a.wav b.flac --beam 5 [--ctc-weight 0.3]
    meld info models/meld/model.pt

``synthesize`` follows the paper's continuation protocol: the first ``--prompt-seconds`` of
the prompt are the acoustic prompt, ``--text`` is the *full* transcript (the prompt's words
and then the new ones), and the output is the vocoded prompt followed by the continuation.
With ``--list`` it synthesises many utterances, ``--batch-size`` at a time through the batched,
KV-cached generation, writing each batch before the next is generated; a line it cannot use is
reported (file:line) and skipped, and the others are still written.
Inference checkpoints (``model.pt`` written by the train stage) carry everything needed:
weights, model kwargs, normalisation statistics, the BPE model and the reduction factor.

User errors (missing or corrupt checkpoint, unreadable audio, empty text or text with characters
the model's vocabulary lacks, an --out it cannot write, an option out of range) end with a one-line
message on stderr and exit code 2, and are found before any model work where they can be; runtime
failures exit with 1.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meld.config import EvaluateConfig
from meld.devices import DEVICE_HELP, resolve_device

PROG = "meld"
EXIT_USER_ERROR = 2
EXIT_FAILURE = 1

# Sampling defaults are the evaluation's (paper) settings, so the CLI and the evaluation agree.
_EVAL_DEFAULTS = EvaluateConfig()


class CLIError(Exception):
    """A user error: reported as one line, exit code 2."""


class CLIFailure(Exception):
    """The command ran but could not produce a result: reported as one line, exit code 1."""


# --------------------------------------------------------------------------- checkpoint loading


@dataclass
class LoadedCheckpoint:
    """An inference checkpoint, unpacked: model, tokenizer, normalisation and the raw state."""

    path: Path
    model: Any  # nn.Module
    state: dict
    reduction: int
    stats: Any  # NormStats
    tokenizer: Any  # BPETokenizer


def _to_numpy(value, name: str, path: Path) -> np.ndarray:
    try:
        arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        return np.asarray(arr, dtype=np.float32)
    except Exception as err:  # a wrong type in a hand-edited checkpoint
        raise CLIError(f"{path}: checkpoint field extra.{name} is not an array ({err})") from err


def _bpe_bytes(value) -> bytes:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy().astype(np.uint8).tobytes()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return np.asarray(value, dtype=np.uint8).tobytes()


def _tokenizer(state: dict, path: Path):
    from meld.text import tokenizer_from_bytes

    extra = state.get("extra") or {}
    if "bpe_model" not in extra:
        raise CLIError(f"{path}: checkpoint holds no BPE model (extra.bpe_model); use an exported model.pt")
    try:
        return tokenizer_from_bytes(_bpe_bytes(extra["bpe_model"]))
    except Exception as err:  # sentencepiece raises RuntimeError/OSError on corrupt protos
        raise CLIError(f"{path}: the embedded BPE model is corrupt ({err})") from err


def _checkpoint_error(path: Path, err: Exception) -> str:
    """One line for a checkpoint that won't load (torch.load's own messages run to many lines)."""
    if err.__cause__ is not None:  # torch.load itself failed: corrupt, truncated, or not a torch file
        return f"{path}: unreadable or partial checkpoint ({type(err.__cause__).__name__}; corrupt, truncated or not a checkpoint)"
    return _first_line(err)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    if "loading state_dict" in text:  # torch lists every mismatched tensor, one per line
        return "its weights do not match its model_kwargs"
    return text.splitlines()[0] if text else type(err).__name__


def load_inference_checkpoint(path: str | Path, device: str = "cpu") -> LoadedCheckpoint:
    """Load an exported inference checkpoint, turning every failure into a :class:`CLIError`.

    Args:
        path: ``model.pt`` as written by the train stage's export.
        device: torch device for the model.

    Returns:
        The model (eval mode, on ``device``), its state, reduction factor, stats and tokenizer.
    """
    from meld.features import N_MELS, NormStats
    from meld.training import CheckpointError, load_model

    path = Path(path)
    try:
        model, state = load_model(path, map_location="cpu")
    except CheckpointError as err:
        raise CLIError(_checkpoint_error(path, err)) from err
    except Exception as err:  # unknown system, wrong kwargs, weights that don't fit the model
        raise CLIError(
            f"{path}: checkpoint does not rebuild into a model ({type(err).__name__}: {_first_line(err)})"
        ) from err
    extra = state.get("extra") or {}
    if state["system"] == "codec_lm":  # speaks DAC codes: no mel normalisation, the codec is described instead
        missing = [k for k in ("codec", "bpe_model") if k not in extra]
        if missing:
            raise CLIError(f"{path}: not an inference checkpoint (extra lacks {', '.join(missing)}); "
                           "use the train stage's model.pt")
        return LoadedCheckpoint(path, model.to(device), state, 1, None, _tokenizer(state, path))
    missing = [k for k in ("reduction_factor", "norm_mean", "norm_std", "bpe_model") if k not in extra]
    if missing:
        raise CLIError(
            f"{path}: not an inference checkpoint (extra lacks {', '.join(missing)}); use the train stage's model.pt"
        )
    reduction = int(extra["reduction_factor"])
    mean = _to_numpy(extra["norm_mean"], "norm_mean", path)
    std = _to_numpy(extra["norm_std"], "norm_std", path)
    if mean.shape != (N_MELS,) or std.shape != (N_MELS,) or not (std > 0).all():
        raise CLIError(f"{path}: normalisation statistics must be two ({N_MELS},) arrays with std > 0")
    frame_dim = getattr(model, "frame_dim", N_MELS * reduction)
    if reduction < 1 or frame_dim != N_MELS * reduction:
        raise CLIError(
            f"{path}: reduction factor {reduction} does not match the model's frame size {frame_dim}"
        )
    tokenizer = _tokenizer(state, path)
    n_text = (state.get("model_kwargs") or {}).get("n_text")
    if n_text is not None and tokenizer.vocab_size > int(n_text):
        raise CLIError(f"{path}: the BPE model has {tokenizer.vocab_size} pieces, the model only {n_text}")
    model = model.to(device)
    return LoadedCheckpoint(path, model, state, reduction, NormStats(mean, std), tokenizer)


def _device(name: str) -> str:
    """``--device``, checked: a device torch has here, or a one-line :class:`CLIError`."""
    try:
        return resolve_device(name, "--device")
    except ValueError as err:
        raise CLIError(str(err)) from None


def _check_finite(args: argparse.Namespace, *options: str) -> None:
    """NaN and infinity pass every ``<``/``>`` range check: refuse them first, by option name."""
    for option in options:
        value = getattr(args, option.removeprefix("--").replace("-", "_"))
        if value is not None and not math.isfinite(value):
            raise CLIError(f"{option} must be a finite number, got {value}")


def _pcm16_extensions() -> list[str]:
    """Extensions soundfile writes as 16-bit PCM (what :func:`meld.audio.write_audio` writes)."""
    import soundfile as sf

    return sorted(f".{name.lower()}" for name in sf.available_formats() if sf.check_format(name, "PCM_16"))


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
    extensions = _pcm16_extensions()
    if path.suffix.lower() not in extensions:
        what = "has no file extension" if not path.suffix else f"{path.suffix} is not an audio format written here"
        others = ", ".join(e for e in extensions if e not in (".wav", ".flac"))
        raise CLIError(f"{where}: {what}; use .wav or .flac (written as 16-bit PCM; also {others})")
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


def _write_out(out: str, wav: np.ndarray, sample_rate: int, label: str = "--out") -> Path:
    """Write the synthesis to ``--out``; if that fails anyway (disk full, a race), save it elsewhere first."""
    from meld.audio import write_audio

    try:
        return write_audio(out, wav, sample_rate)
    except Exception as err:  # OSError, soundfile's LibsndfileError (a RuntimeError), ...
        try:
            fd, rescue = tempfile.mkstemp(prefix="meld-", suffix=".wav")
            os.close(fd)
            kept = f"the audio is saved in {write_audio(rescue, wav, sample_rate)} instead"
        except Exception as rescue_err:
            kept = f"saving it to {tempfile.gettempdir()} failed too ({_first_line(rescue_err)})"
        raise CLIError(f"{label} {out}: cannot write the audio ({type(err).__name__}: {_first_line(err)}); "
                       f"{kept}") from err


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


def _load_audio(path: str | Path) -> np.ndarray:
    from meld.audio import AudioError, load_audio

    try:
        return load_audio(path)
    except AudioError as err:
        raise CLIError(str(err)) from err


def _task(state: dict) -> str:
    return str((state.get("extra") or {}).get("task", "unknown"))


# --------------------------------------------------------------------------- synthesize


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


COMPILE_HELP = ("torch.compile the decoding step (CUDA graphs on a GPU): a one-off compile, then fewer kernel "
                "launches per step; for GPUs and long runs (no faster on a CPU, docs/results.md)")


def _configure_decoding(model, compile_step: bool) -> None:
    """``--compile``: decode through the compiled fixed-shape step (:func:`meld.models.backbone.configure_decoding`)."""
    from meld.models.backbone import configure_decoding

    if compile_step:
        logging.getLogger(PROG).warning("--compile: compiling the decoding step first (tens of seconds on a CPU)")
    configure_decoding(model, compile=compile_step)


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
    if not path.is_file():
        raise CLIError(f"--list {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM from a Windows editor is no text
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"--list {path}: unreadable ({_first_line(err)})") from err
    requests, errors, outs = [], [], {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
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


def _check_synthesis_options(args: argparse.Namespace) -> None:
    """Every option of ``synthesize`` that applies to all its utterances; no file is opened."""
    _check_finite(args, "--prompt-seconds", "--max-seconds", "--temperature", "--top-p", "--repetition-penalty")
    if args.prompt_seconds < 0:
        raise CLIError(f"--prompt-seconds must be >= 0, got {args.prompt_seconds}")
    if args.max_seconds <= 0:
        raise CLIError(f"--max-seconds must be > 0, got {args.max_seconds}")
    if args.temperature <= 0:
        raise CLIError(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")
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


def _check_text_present(req: SynthesisRequest) -> None:
    if not req.text or not req.text.strip():
        raise CLIError("--text is empty: give the full transcript (prompt words + new words)" if not req.where
                       else "the text is empty: give the full transcript (prompt words + new words)")


def _load_prompt(req: SynthesisRequest, prompt_seconds: float) -> None:
    """Read the request's prompt audio, kept only up to the prompt and a margin."""
    from meld.audio import SAMPLE_RATE

    if req.prompt:
        wav = _load_audio(req.prompt)
        req.prompt_wav = wav[: int(round((prompt_seconds + PROMPT_MARGIN_S) * SAMPLE_RATE))]


def batch_seed(seed: int, k: int) -> int:
    """Batch k's seed, ``seed + k`` wrapped into torch's seed range (``--seed`` may be 2**64 - 1)."""
    return seed + k if seed + k < 2**64 else seed + k - 2**64


class _Outcome:
    """Counts a list's refused and failed utterances; on the command line (one utterance) it raises instead."""

    def __init__(self, batch_mode: bool):
        self.batch_mode, self.refused, self.failed = batch_mode, 0, 0

    def refuse(self, req: SynthesisRequest, err: CLIError | CLIFailure) -> None:
        if not self.batch_mode:
            raise err
        from tqdm import tqdm

        kind = "error" if isinstance(err, CLIError) else "failed"
        tqdm.write(f"{PROG}: {kind}: {req.where}{err}", file=sys.stderr)  # above the progress bar, not through it
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
    if outcome.batch_mode:  # options first: they hold for every line
        _check_synthesis_options(args)
    requests = outcome.keep(requests, _check_text_present)
    if not outcome.batch_mode:
        _check_synthesis_options(args)
    requests = outcome.keep(requests, lambda req: _check_out(req.out, req.out_label))
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
    bar = progress(total=len(ready), desc="synthesize", unit="utt", disable=not outcome.batch_mode)
    for k, start in enumerate(range(0, len(ready), args.batch_size)):
        chunk = ready[start : start + args.batch_size]
        results, model_s, decoder_s, decoder_name = synthesise(chunk, batch_seed(args.seed, k))  # numpy out: synced
        totals["model"] += model_s
        totals["decoder"] += decoder_s
        for req, result in zip(chunk, results):
            if isinstance(result, CLIFailure):
                outcome.refuse(req, result)
                continue
            try:
                out = _write_out(req.out, result.wav, result.sample_rate, req.out_label)
            except CLIError as err:
                outcome.refuse(req, err)
                continue
            totals["generated"] += result.generated_seconds
            totals["written"] += 1
            _print_synthesis(out, result, args.max_seconds, one_line=outcome.batch_mode)
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


def _print_synthesis(out: Path, result: Synthesis, max_seconds: float, *, one_line: bool) -> None:
    total = result.wav.shape[0] / result.sample_rate
    stop = f"max-length guard hit ({max_seconds:g} s)" if result.hit_max_length else "<EOS>"
    parts = f"prompt {result.prompt_seconds:.2f} s + generated {result.generated_seconds:.2f} s"
    if one_line:
        from tqdm import tqdm

        tqdm.write(f"wrote {out}: {total:.2f} s ({parts}; stopped by {stop})", file=sys.stdout)
    else:
        print(f"wrote {out}: {total:.2f} s at {result.sample_rate} Hz ({parts})")
        print(f"stopped by: {stop}")


def _vocode_all(vocoder, mels: list[np.ndarray]) -> list[np.ndarray]:
    """Vocode a batch's mels. Griffin-Lim is numpy FFTs, which release the GIL, and seeds each call
    itself: threads give the same audio as one after another, on every core. A torch vocoder already
    spreads one call over the cores, so it runs them in turn."""
    from concurrent.futures import ThreadPoolExecutor

    from meld.vocoder import GriffinLimVocoder

    workers = min(len(mels), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if not isinstance(vocoder, GriffinLimVocoder) or workers < 2:
        return [vocoder(m) for m in mels]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(vocoder, mels))


def _mel_synthesiser(args: argparse.Namespace, ckpt: LoadedCheckpoint, vocoder):
    """Synthesis for the mel systems: ``(requests, seed) -> (results, model s, vocoder s, vocoder name)``,
    each result a :class:`Synthesis` or the :class:`CLIFailure` that request met."""
    import torch

    from meld.features import FRAME_RATE, N_MELS
    from meld.generate import tts_continue

    r = ckpt.reduction
    max_frames = max(1, int(round(args.max_seconds * FRAME_RATE)))

    def synthesise(requests: list[SynthesisRequest], seed: int):
        prompts = []
        for req in requests:
            raw = np.zeros((0, N_MELS), np.float32)
            if req.prompt_wav is not None:
                raw = prompt_log_mel(req.prompt_wav, args.prompt_seconds)
                raw = raw[: (raw.shape[0] // r) * r]  # whole groups of r frames
                if raw.shape[0] == 0 and args.prompt_seconds > 0:
                    logging.getLogger(PROG).warning(
                        "%s%s: prompt shorter than one frame group; generating without it", req.where, req.prompt
                    )
            prompts.append(raw)
        torch.manual_seed(seed)  # the mel encoder's test-time dropout draws from the global generator
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
            results.append(None)
            mels[i] = full_mel
        t1 = time.perf_counter()
        wavs = _vocode_all(vocoder, list(mels.values()))
        vocoder_s = time.perf_counter() - t1
        for (i, full_mel), wav in zip(mels.items(), wavs):
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
        encode_waveform,
    )

    desc = ckpt.state["extra"]["codec"]
    try:
        codec = codec_from_description(desc, args.codec_weights).to(device)
    except FileNotFoundError as err:
        raise CLIError(f"{ckpt.path} speaks codes of DAC weights that are not here ({err}); "
                       "give their local path with --codec-weights") from err
    except CodecMismatch as err:
        raise CLIError(f"{ckpt.path}: {err}") from err
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
                wav = resample(req.prompt_wav, SAMPLE_RATE, codec.sample_rate)
                codes = encode_waveform(codec, wav[: int(round(args.prompt_seconds * codec.sample_rate))])
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


# --------------------------------------------------------------------------- transcribe


def cmd_transcribe(args: argparse.Namespace) -> int:
    from meld.audio import SAMPLE_RATE, AudioError, load_audio
    from meld.features import log_mel
    from meld.generate import stt_beam_search

    if args.beam < 1:
        raise CLIError(f"--beam must be >= 1, got {args.beam}")
    if args.max_tokens < 1:
        raise CLIError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_finite(args, "--ctc-weight")
    if args.ctc_weight is not None and not 0.0 <= args.ctc_weight <= 1.0:
        raise CLIError(f"--ctc-weight must be in [0, 1], got {args.ctc_weight}")
    device = _device(args.device)
    ckpt = load_inference_checkpoint(args.checkpoint, device)
    if not all(hasattr(ckpt.model, m) for m in ("stt_prefix", "stt_step", "text_logprobs")):
        raise CLIError(f"{ckpt.path}: system {ckpt.state['system']!r} cannot transcribe (no STT decoder)")
    has_ctc = bool(getattr(ckpt.model, "stt_ctc", False))
    ctc_weight = args.ctc_weight if args.ctc_weight is not None else (_EVAL_DEFAULTS.stt_ctc_weight if has_ctc else 0.0)
    if ctc_weight > 0 and not has_ctc:
        raise CLIError(f"--ctc-weight {ctc_weight:g}: {ckpt.path} was trained without a CTC head (args.stt_ctc); "
                       "use --ctc-weight 0")
    _configure_decoding(ckpt.model, args.compile)
    log = logging.getLogger(PROG)
    if _task(ckpt.state) == "tts":
        log.warning("%s was trained for TTS only: its transcripts are not meaningful", ckpt.path)

    def decode_and_print(paths: list[str], mels: list[np.ndarray]) -> None:
        ids = stt_beam_search(
            ckpt.model,
            mels,
            reduction=ckpt.reduction,
            beam_size=args.beam,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            ctc_weight=ctc_weight,
        )
        for p, hyp in zip(paths, ids):
            print(f"{p}\t{ckpt.tokenizer.decode(hyp)}", flush=True)

    # Each batch is printed as soon as it is decoded, so a crash late in a long list keeps what was
    # done. Batches are the readable files taken batch_size at a time, as one call over them all would form.
    paths, mels, failed = [], [], 0
    for p in args.audio:
        try:
            wav = load_audio(p)
        except AudioError as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            failed += 1
            continue
        paths.append(p)
        mels.append(ckpt.stats.normalise(log_mel(wav, SAMPLE_RATE)))
        if len(mels) == args.batch_size:
            decode_and_print(paths, mels)
            paths, mels = [], []
    if mels:
        decode_and_print(paths, mels)
    return EXIT_USER_ERROR if failed else 0


# --------------------------------------------------------------------------- info


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


def cmd_info(args: argparse.Namespace) -> int:
    from meld.models.builders import build_model, count_parameters
    from meld.training import CheckpointError, load_checkpoint

    path = Path(args.checkpoint)
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise CLIError(_checkpoint_error(path, err)) from err
    kwargs = state.get("model_kwargs") or {}
    try:
        model = build_model(state["system"], kwargs)
        model.load_state_dict(state["model"])
    except Exception as err:
        raise CLIError(
            f"{path}: checkpoint does not rebuild into a model ({type(err).__name__}: {_first_line(err)})"
        ) from err
    extra = state.get("extra") or {}
    n_text = kwargs.get("n_text")
    n_codes = kwargs.get("codebook_size", 0)
    vocab = getattr(model, "vocab", None)
    rows: list[tuple[str, Any]] = [
        ("file", f"{path} ({_human_size(path.stat().st_size)})"),
        ("system", state["system"]),
        ("task", extra.get("task", "n/a")),
        ("step", state.get("step", "n/a")),
        ("parameters", f"{count_parameters(model):,}"),
        ("reduction factor", extra.get("reduction_factor", "n/a")),
        ("vocab: BPE (model)", n_text if n_text is not None else "n/a"),
    ]
    if "bpe_model" in extra:
        try:
            rows.append(("vocab: BPE (tokenizer)", _tokenizer(state, path).vocab_size))
        except CLIError as err:
            rows.append(("vocab: BPE (tokenizer)", f"unreadable ({err})"))
    else:
        rows.append(("vocab: BPE (tokenizer)", "n/a (no embedded BPE model: not an inference checkpoint)"))
    rows.append(("vocab: codebook", n_codes))
    if vocab is not None:
        rows.append(("vocab: union", vocab.size))
    rows.append(("normalisation stats", "yes" if "norm_mean" in extra and "norm_std" in extra else "no"))
    if "codec" in extra:  # codec_lm: which codec its codes came from
        codec = extra["codec"]
        rows.append(("codec", f"random DAC (seed {codec.get('seed')}): codes carry no speech" if codec.get("random")
                     else f"DAC weights {codec.get('weights')}"))
    rows.append(("fingerprint", extra.get("fingerprint", "n/a")))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("model kwargs:")
    for k in sorted(kwargs):
        print(f"  {k} = {kwargs[k]}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{synthesize,transcribe,info}")

    s = sub.add_parser("synthesize", help="zero-shot TTS: continue an acoustic prompt speaking a text")
    s.add_argument("--checkpoint", required=True, help="inference checkpoint (model.pt)")
    s.add_argument("--text", default=None, help="full transcript: the prompt's words, then the new words")
    s.add_argument("--prompt", default=None, help="audio file whose start is the acoustic prompt (any rate); "
                   "without it the model speaks the text from nothing, in whatever voice it draws")
    s.add_argument("--out", default=None, help="output audio, 16 kHz 16-bit PCM: .wav, .flac, ... (by extension)")
    s.add_argument(
        "--list",
        default=None,
        metavar="FILE",
        help="many utterances instead of --text/--prompt/--out: one per line, out TAB prompt TAB text "
        "(prompt '-' for none; '#' comments); generated --batch-size at a time, a bad line reported and skipped",
    )
    s.add_argument("--batch-size", type=int, default=8,
                   help="--list: utterances generated together, >= 1 (default %(default)s)")
    s.add_argument(
        "--prompt-seconds",
        type=float,
        default=_EVAL_DEFAULTS.prompt_seconds,
        help="seconds of the prompt file to use (default %(default)s)",
    )
    s.add_argument("--temperature", type=float, default=_EVAL_DEFAULTS.temperature,
                   help="> 0: sampling temperature over the codes (default %(default)s, as the evaluation)")
    s.add_argument("--top-k", type=int, default=_EVAL_DEFAULTS.top_k, help="0 disables (default %(default)s)")
    s.add_argument("--top-p", type=float, default=_EVAL_DEFAULTS.top_p,
                   help="nucleus sampling mass in (0, 1] (default %(default)s)")
    s.add_argument(
        "--repetition-penalty",
        type=float,
        default=_EVAL_DEFAULTS.repetition_penalty,
        help=">= 1; 1 disables (default %(default)s)",
    )
    s.add_argument(
        "--max-seconds",
        type=float,
        default=20.0,
        help="guard on the generated speech after the prompt (default %(default)s)",
    )
    s.add_argument("--seed", type=int, default=_EVAL_DEFAULTS.seed,
                   help="sampling seed: the same seed, text and prompt give the same speech (with --list: the same list, "
                   "seed and --batch-size; batch k draws from seed + k) (default %(default)s)")
    s.add_argument(
        "--no-test-time-dropout",
        action="store_true",
        help="turn off the mel encoder's dropout at inference (the paper keeps it on)",
    )
    s.add_argument("--vocoder", choices=("griffin_lim", "hifigan"), default=_EVAL_DEFAULTS.vocoder,
                   help="mel -> waveform (default %(default)s; hifigan needs --vocoder-path)")
    s.add_argument(
        "--vocoder-path",
        default=None,
        help="SpeechT5 HiFi-GAN folder; one that won't load is an error (without it, hifigan uses "
        "evaluate.vocoder_path if set, else falls back to Griffin-Lim with a warning)",
    )
    s.add_argument("--griffin-lim-iters", type=int, default=32, help=">= 1 (default %(default)s)")
    s.add_argument(
        "--codec-weights",
        default=None,
        help="codec_lm checkpoints: DAC weights file, when not at the path recorded in the checkpoint",
    )
    s.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default %(default)s)")
    s.add_argument(
        "--compile",
        action="store_true",
        help=COMPILE_HELP,
    )
    s.set_defaults(func=cmd_synthesize)

    t = sub.add_parser("transcribe", help="STT: transcribe audio files with beam search")
    t.add_argument("--checkpoint", required=True, help="inference checkpoint (model.pt)")
    t.add_argument("audio", nargs="+", help="audio files (any format libsndfile reads, any rate)")
    t.add_argument("--beam", type=int, default=5, help="beam size; 1 is greedy (default %(default)s)")
    t.add_argument("--max-tokens", type=int, default=200, help="BPE tokens per transcript at most (default %(default)s)")
    t.add_argument(
        "--ctc-weight",
        type=float,
        default=None,
        help="weight of the CTC prefix score in a hybrid CTC/attention beam search, in [0, 1]; 0: the decoder "
        f"alone (default {_EVAL_DEFAULTS.stt_ctc_weight:g} for a checkpoint trained with a CTC head, else 0)",
    )
    t.add_argument("--batch-size", type=int, default=8, help="files decoded together, >= 1 (default %(default)s)")
    t.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default %(default)s)")
    t.add_argument(
        "--compile",
        action="store_true",
        help=COMPILE_HELP,
    )
    t.set_defaults(func=cmd_transcribe)

    i = sub.add_parser("info", help="describe a checkpoint")
    i.add_argument("checkpoint", help="an inference checkpoint (models/<system>/model.pt)")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the ``meld`` command; returns the exit code (0 ok, 1 failure, 2 user error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    try:
        return int(args.func(args))
    except CLIError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except CLIFailure as err:
        print(f"{PROG}: failed: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
