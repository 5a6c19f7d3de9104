"""The ``meld`` command: synthesise speech, transcribe audio, inspect checkpoints.

    meld synthesize --checkpoint models/meld/model.pt --prompt speaker.wav \\
        --text "the prompt's own words followed by the new words" --out out.wav
    meld synthesize --checkpoint models/meld/model.pt --list utterances.tsv   # out TAB prompt TAB text
    meld transcribe --checkpoint models/meld_stt/model.pt a.wav b.flac --beam 5 [--ctc-weight 0.3]
    meld transcribe --checkpoint models/meld_stt/model.pt --list audio_paths.txt   # one path per line
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
import os
import re
import sys

from meld.cli.common import (
    _EVAL_DEFAULTS,
    COMPILE_HELP,
    EXIT_FAILURE,
    EXIT_USER_ERROR,
    PROG,
    CLIError,
    CLIFailure,
    _first_line,
)
from meld.cli.info import cmd_info
from meld.cli.synthesize import GRIFFIN_LIM_ITERS, cmd_synthesize
from meld.cli.transcribe import cmd_transcribe
from meld.config import STT_MAX_TOKENS
from meld.devices import DEVICE_HELP


def _add_decoding_options(parser: argparse.ArgumentParser) -> None:
    """Where and how a subcommand that runs a model decodes: ``--device`` and ``--compile``."""
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default %(default)s)")
    parser.add_argument("--compile", action="store_true", help=COMPILE_HELP)


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
    s.add_argument("--out", default=None, help="output audio at 16 kHz, by extension: .wav, .flac, ... (16-bit PCM), .ogg, .mp3 (lossy); "
                   "a missing folder is made, a file already there is replaced (and said to be), a prompt file is refused")
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
        help="SpeechT5 HiFi-GAN folder (config.json + weights); one that won't load is an error. Without it, "
        "hifigan falls back to Griffin-Lim with a warning (params.yaml's evaluate.vocoder_path is not read)",
    )
    s.add_argument("--griffin-lim-iters", type=int, default=GRIFFIN_LIM_ITERS, help=">= 1 (default %(default)s)")
    s.add_argument(
        "--codec-weights",
        default=None,
        help="codec_lm checkpoints: DAC weights file, when not at the path recorded in the checkpoint",
    )
    _add_decoding_options(s)
    s.set_defaults(func=cmd_synthesize)

    t = sub.add_parser(
        "transcribe",
        help="STT: transcribe audio files with beam search",
        description="Transcribe audio files with beam search. stdout gets one line per file, path TAB transcript, "
        "batch by batch; an unreadable file is reported on stderr and skipped (exit code 2); several files get a "
        "progress bar and a count on stderr.",
    )
    t.add_argument("--checkpoint", required=True, help="inference checkpoint (model.pt)")
    t.add_argument("audio", nargs="*", help="audio files (any format libsndfile reads, any rate)")
    t.add_argument("--list", default=None, metavar="FILE",
                   help="more audio files, one path per line ('#' comments), transcribed after those given above")
    t.add_argument("--beam", type=int, default=5, help="beam size; 1 is greedy (default %(default)s)")
    # the evaluation's guards, so that a checkpoint transcribes here as its STT table says
    t.add_argument("--max-tokens", type=int, default=STT_MAX_TOKENS, help="BPE tokens per transcript at most (default %(default)s)")
    t.add_argument("--max-tokens-per-second", type=float, default=_EVAL_DEFAULTS.stt_max_tokens_per_second,
                   help="and at most 10 + this many per second of audio, as the evaluation (default %(default)s): "
                        "a model that never says <EOS> stops there instead of at --max-tokens")
    t.add_argument(
        "--ctc-weight",
        type=float,
        default=None,
        help="weight of the CTC prefix score in a hybrid CTC/attention beam search, in [0, 1]; 0: the decoder "
        f"alone (default {_EVAL_DEFAULTS.stt_ctc_weight:g} for a checkpoint trained with a CTC head, else 0)",
    )
    t.add_argument("--batch-size", type=int, default=8, help="files decoded together, >= 1 (default %(default)s)")
    _add_decoding_options(t)
    t.set_defaults(func=cmd_transcribe)

    i = sub.add_parser("info", help="describe a checkpoint")
    i.add_argument("checkpoint", help="an inference checkpoint (models/<system>/model.pt)")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the ``meld`` command; returns the exit code (0 ok, 1 failure (out of memory among them: one
    line, no traceback), 2 user error, 130 interrupted, 141 stdout closed by its reader)."""
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
    except BrokenPipeError:  # stdout's reader left (`meld transcribe ... | head`): no traceback, as a shell tool
        _silence_stdout()  # else Python reports the pipe again when it flushes stdout at exit
        return 128 + 13  # what a shell reports for a tool ended by SIGPIPE
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        # what was written before is kept (a --list writes each batch before the next is generated)
        print(f"{PROG}: failed: out of memory ({_allocation_message(err)}); ask for less at once: a smaller "
              "--batch-size, or a shorter --max-seconds (generation sets memory aside for that many frames "
              "per utterance)", file=sys.stderr)
        return EXIT_FAILURE


def _out_of_memory(err: BaseException) -> bool:
    """An allocation refused on any device: MemoryError, torch's OutOfMemoryError (CUDA, MPS) or its CPU
    allocator's RuntimeError."""
    torch = sys.modules.get("torch")
    if isinstance(err, MemoryError) or (torch is not None and isinstance(err, torch.OutOfMemoryError)):
        return True
    text = str(err)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def _allocation_message(err: BaseException) -> str:
    """A refused allocation's first line, without the C++ assertion torch's CPU allocator puts before it."""
    return re.sub(r"^\[enforce fail at [^\]]*\]\s*err == 0\.\s*", "", _first_line(err))[:300]


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (a test's capture): nothing is left to flush
        pass


if __name__ == "__main__":
    sys.exit(main())
