"""The embedded default corpus: a seeded, synthetic, multi-speaker, LibriSpeech-shaped mini corpus.

Speech comes from Debian's offline synthesisers (flite, festival, espeak-ng); text comes from a
seeded sentence generator over a vocabulary of about 270 common English words, so that a tiny
model can learn the language side on a CPU in minutes.

Splits (``<out>/<split>/manifest.jsonl`` + ``<out>/<split>/audio/<id>.wav``, 16 kHz mono PCM-16):

- ``train``, ``dev``, ``test``: the training voices; dev/test sentences never occur in train.
- ``test_unseen``: voices held out of training entirely, for zero-shot evaluation.

Every sentence in the corpus is unique, so no sentence is shared between any two splits.
The same seed and arguments give the same text, the same ids and the same audio bytes
(all three synthesisers are deterministic).

Example::

    from meld.corpus.mini import build_mini_corpus
    build_mini_corpus("data/corpus", seed=0, train_voices=["flite-rms", "espeak-f3"],
                      held_out_voices=["festival-ked"],
                      utterances={"train": 20, "dev": 2, "test": 2, "test_unseen": 4})
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from meld.audio import SAMPLE_RATE, load_audio, write_audio
from meld.corpus import write_manifest
from meld.text import normalise_transcript

SPLITS = ("train", "dev", "test", "test_unseen")
SEEN_SPLITS = ("train", "dev", "test")  # splits the training voices speak
UNSEEN_SPLITS = ("test_unseen",)  # splits the held-out voices speak


# --------------------------------------------------------------------------------------------
# Voices
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker.

    ``family`` names the recorded person a voice was built from: flite's kal/kal16 and
    festival's kal_diphone are all Kevin Lenzo's diphones, flite slt and festival slt-hts
    are both CMU ARCTIC's SLT. Voices of one family are one speaker for held-out purposes.
    """

    engine: str  # "flite" | "festival" | "espeak-ng"
    name: str  # the engine's own name for the voice
    family: str
    package: str  # Debian package that provides it


VOICES: dict[str, Voice] = {
    "flite-kal": Voice("flite", "kal", "kal", "flite"),  # 8 kHz diphone: a narrow-band channel
    "flite-kal16": Voice("flite", "kal16", "kal", "flite"),
    "flite-awb": Voice("flite", "awb", "awb", "flite"),  # Scottish English male
    "flite-rms": Voice("flite", "rms", "rms", "flite"),
    "flite-slt": Voice("flite", "slt", "slt", "flite"),  # the only natural female voice
    "festival-kal": Voice("festival", "kal_diphone", "kal", "festvox-kallpc16k"),
    "festival-ked": Voice("festival", "ked_diphone", "ked", "festvox-kdlpc16k"),
    "festival-slt": Voice("festival", "cmu_us_slt_arctic_hts", "slt", "festvox-us-slt-hts"),
    # espeak-ng variants over one base voice (en-us): accents would not be distinct speakers.
    "espeak-f2": Voice("espeak-ng", "en-us+f2", "espeak-f2", "espeak-ng"),
    "espeak-f3": Voice("espeak-ng", "en-us+f3", "espeak-f3", "espeak-ng"),
    "espeak-f4": Voice("espeak-ng", "en-us+f4", "espeak-f4", "espeak-ng"),
    "espeak-m3": Voice("espeak-ng", "en-us+m3", "espeak-m3", "espeak-ng"),
    "espeak-m7": Voice("espeak-ng", "en-us+m7", "espeak-m7", "espeak-ng"),
    "espeak-klatt": Voice("espeak-ng", "en-us+klatt", "espeak-klatt", "espeak-ng"),
    "espeak-croak": Voice("espeak-ng", "en-us+croak", "espeak-croak", "espeak-ng"),
    "espeak-whisper": Voice("espeak-ng", "en-us+whisper", "espeak-whisper", "espeak-ng"),
}


class VoiceUnavailableError(RuntimeError):
    """A requested voice is unknown or its synthesiser/voice data is not installed."""


class SynthesisError(VoiceUnavailableError):
    """An installed voice failed part-way: its synthesiser crashed, hung or wrote nothing usable.

    A kind of unavailable voice, so that the stage reports it in one line (``meld.config.run_stage``)
    rather than as a traceback: a crashing synthesiser is the machine's to mend, not the code's.
    """


def _synthesis_failure(voice_id: str, detail: str) -> SynthesisError:
    voice = VOICES[voice_id]
    return SynthesisError(
        f"voice {voice_id!r} ({voice.engine} {voice.name}) failed: {detail}; try the synthesiser by hand, "
        f"reinstall it (apt-get install --reinstall {voice.package}) or leave the voice out of the corpus"
    )


def recorded_person(speaker: str) -> str:
    """The person behind a corpus speaker id: a mini voice's family (flite-kal, flite-kal16 and
    festival-kal are one person), any other id (a LibriSpeech reader) itself."""
    voice = VOICES.get(speaker)
    return voice.family if voice is not None else speaker


def _run(cmd: Sequence[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)


@cache
def _installed(engine: str) -> frozenset[str]:
    """Voice names an engine reports as installed (empty when the engine is missing).

    Asked explicitly because all three engines silently fall back to a default voice when
    given an unknown one, which would quietly merge two "speakers".
    """
    exe = {"flite": "flite", "festival": "festival", "espeak-ng": "espeak-ng"}[engine]
    if shutil.which(exe) is None:
        return frozenset()
    if engine == "flite":  # "Voices available: kal awb_time kal16 awb rms slt"
        out = _run(["flite", "-lv"]).stdout
        return frozenset(out.split(":", 1)[-1].split())
    if engine == "festival":  # "(cmu_us_slt_arctic_hts ked_diphone kal_diphone)"
        out = _run(["festival", "--batch", "(print (voice.list))"]).stdout
        return frozenset(out.strip().strip("()").split())
    # espeak-ng: base voices by language code, variants by file name ("!v/f3" -> "f3")
    names: set[str] = set()
    for line in _run(["espeak-ng", "--voices"]).stdout.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 2:
            names.add(cols[1])
    for line in _run(["espeak-ng", "--voices=variant"]).stdout.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 5 and cols[4].startswith("!v/"):
            names.add("+" + cols[4][3:])
    return frozenset(names)


def voice_problem(voice_id: str) -> str | None:
    """Why ``voice_id`` cannot be synthesised here, or ``None`` when it can."""
    voice = VOICES.get(voice_id)
    if voice is None:
        return f"unknown voice {voice_id!r}; known voices: {', '.join(sorted(VOICES))}"
    installed = _installed(voice.engine)
    if voice.engine == "espeak-ng":
        base, _, variant = voice.name.partition("+")
        ok = base in installed and (not variant or "+" + variant in installed)
    else:
        ok = voice.name in installed
    if not ok:
        return f"voice {voice_id!r} ({voice.engine} {voice.name}) is not installed: apt-get install {voice.package}"
    return None


def available_voices() -> list[str]:
    """The ids of the registered voices that work on this machine."""
    return [v for v in VOICES if voice_problem(v) is None]


def _check_voices(train_voices: Sequence[str], held_out_voices: Sequence[str]) -> None:
    problems = [p for v in [*train_voices, *held_out_voices] if (p := voice_problem(v))]
    if problems:
        raise VoiceUnavailableError("mini corpus voices unavailable:\n  " + "\n  ".join(problems))
    for group, name in ((train_voices, "train_voices"), (held_out_voices, "held_out_voices")):
        if len(set(group)) != len(group):
            raise ValueError(f"{name} lists a voice twice: {list(group)}")
    train_families = {VOICES[v].family: v for v in train_voices}
    for v in held_out_voices:
        if VOICES[v].family in train_families:
            raise ValueError(
                f"held-out voice {v!r} is built from the same recorded speaker ({VOICES[v].family}) "
                f"as training voice {train_families[VOICES[v].family]!r}, so it would not be unseen"
            )


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

# Words chosen to be common, unambiguous to pronounce for all three synthesisers, and mostly
# free of homophones (no "red"/"read", "blue"/"blew", "sun"/"son"), which would blur WER.
NAMES = (
    "john mary peter anna james lucy thomas emma david sarah george alice robert helen henry clara".split()
)
DETERMINERS = "the the the a this that every my his her our their your one".split()
# Adjectives by what they can describe, so phrases stay plausible ("a wooden box", not "a wooden woman").
AGENT_ADJECTIVES = (
    "old young small little happy tired quiet busy strange gentle lucky famous friendly careful hungry "
    "sleepy wild rich poor kind brave clever"
).split()
THING_ADJECTIVES = (
    "old small large little green yellow brown white black dark bright warm cold heavy empty clean tiny "
    "round wooden silver golden strange simple"
).split()
PLACE_ADJECTIVES = (
    "old small large quiet dark bright warm cold busy empty clean narrow green famous strange wild".split()
)
AGENTS = (
    "man woman boy girl child farmer teacher doctor sailor baker king queen soldier student stranger "
    "captain driver painter dog cat horse bird fox rabbit cow goat mouse bear"
).split()
THINGS = (
    "letter book basket bottle box hat coat lamp clock bell flower apple cake stone key ring cup plate "
    "rope ball map candle blanket chair table picture bag pencil coin shoe"
).split()
PLACES = (
    "house garden river forest village city bridge window door field hill mountain lake street market "
    "church school kitchen castle island station tower farm shop wall gate"
).split()
TRANSITIVE = (
    "saw found carried painted lost opened closed pushed pulled watched dropped bought sold cleaned "
    "washed brought took held followed helped kept lifted moved noticed packed hid wanted liked "
    "visited remembered"
).split()
INTRANSITIVE = (
    "walked ran slept laughed waited stopped danced smiled jumped rested listened shouted sang worked "
    "played stood sat stayed cried hurried"
).split()
ADVERBS = "slowly quickly quietly softly happily suddenly carefully gently calmly loudly early again alone together twice".split()
PREPOSITIONS = "near under behind beside across into over through along past around toward inside outside above below".split()
CONJUNCTIONS = "and but because while when after before".split()
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
SEASONS = "spring summer autumn winter".split()
MEALS = "breakfast lunch dinner".split()
PARTS_OF_DAY = "morning afternoon evening".split()


def vocabulary() -> list[str]:
    """Every word the sentence generator can emit (sorted)."""
    fixed = "a an in on at with last yesterday week night".split()
    groups = [
        NAMES,
        DETERMINERS,
        AGENT_ADJECTIVES,
        THING_ADJECTIVES,
        PLACE_ADJECTIVES,
        AGENTS,
        THINGS,
        PLACES,
        TRANSITIVE,
        INTRANSITIVE,
        ADVERBS,
    ]
    groups += [PREPOSITIONS, CONJUNCTIONS, DAYS, SEASONS, MEALS, PARTS_OF_DAY, fixed]
    return sorted({w for g in groups for w in g})


def _noun_phrase(rng: random.Random, nouns: list[str], adjectives: list[str], allow_name: bool) -> list[str]:
    if allow_name and rng.random() < 0.25:
        return [rng.choice(NAMES)]
    words = [rng.choice(adjectives)] if rng.random() < 0.55 else []
    words.append(rng.choice(nouns))
    det = rng.choice(DETERMINERS)
    if det == "a" and words[0][0] in "aeiou":
        det = "an"
    return [det, *words]


def _clause(rng: random.Random) -> list[str]:
    words = _noun_phrase(rng, AGENTS, AGENT_ADJECTIVES, allow_name=True)
    if rng.random() < 0.6:
        words.append(rng.choice(TRANSITIVE))
        if rng.random() < 0.75:
            words += _noun_phrase(rng, THINGS, THING_ADJECTIVES, allow_name=False)
        else:
            words += _noun_phrase(rng, AGENTS, AGENT_ADJECTIVES, allow_name=True)
    else:
        words.append(rng.choice(INTRANSITIVE))
    if rng.random() < 0.35:
        words.append(rng.choice(ADVERBS))
    if rng.random() < 0.6:
        words += [rng.choice(PREPOSITIONS), *_noun_phrase(rng, PLACES, PLACE_ADJECTIVES, allow_name=False)]
    return words


def _time_phrase(rng: random.Random) -> list[str]:
    kind = rng.randrange(6)
    if kind == 0:
        return ["in", "the", rng.choice(PARTS_OF_DAY)]
    if kind == 1:
        return ["on", rng.choice(DAYS)]
    if kind == 2:
        return ["in", "the", rng.choice(SEASONS)]
    if kind == 3:
        return [rng.choice(["after", "before"]), rng.choice(MEALS)]
    if kind == 4:
        return ["last", rng.choice(["night", "week", *DAYS])]
    return ["yesterday"]


def make_sentence(rng: random.Random, min_words: int, max_words: int) -> str:
    """One sentence of ``min_words``..``max_words`` words, lower case, no punctuation.

    Draws clauses (optionally joined by a conjunction, optionally with a time phrase) until
    the length fits, so the result depends only on the state of ``rng``.
    """
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    for _ in range(10_000):
        words = _clause(rng)
        if rng.random() < 0.5:
            words += [rng.choice(CONJUNCTIONS), *_clause(rng)]
        if rng.random() < 0.4:
            words += _time_phrase(rng)
        if min_words <= len(words) <= max_words:
            return " ".join(words)
    raise ValueError(f"cannot generate sentences of {min_words}..{max_words} words with this grammar")


MAX_REPEATED_DRAWS = 2000  # draws in a row that only repeat taken sentences before giving up


def generate_sentences(
    rng: random.Random, n: int, min_words: int, max_words: int, taken: set[str]
) -> list[str]:
    """``n`` new sentences that are not in ``taken`` (which is updated in place).

    Raises:
        ValueError: the word range allows too few distinct sentences (a run of draws found nothing new);
            without this a narrow range such as 2..2 words drew forever.
    """
    out: list[str] = []
    misses = 0
    while len(out) < n:
        s = make_sentence(rng, min_words, max_words)
        if s not in taken:
            taken.add(s)
            out.append(s)
            misses = 0
            continue
        misses += 1
        if misses > MAX_REPEATED_DRAWS:
            raise ValueError(
                f"corpus.min_words..max_words = {min_words}..{max_words}: the grammar gave no new sentence in "
                f"{MAX_REPEATED_DRAWS} draws after {len(taken)} distinct ones, and {n - len(out)} more are needed: "
                "widen the word range or ask for fewer utterances"
            )
    return out


# --------------------------------------------------------------------------------------------
# Synthesis
# --------------------------------------------------------------------------------------------


def _scheme_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _synthesise_raw(voice_id: str, texts: Sequence[str], raw_paths: Sequence[Path]) -> None:
    """Write each text as a WAV at the engine's native rate.

    Raises:
        SynthesisError: the synthesiser failed, timed out or wrote no file (names the voice and its package).
    """
    voice = VOICES[voice_id]
    if voice.engine == "festival":
        # One festival process per batch: its start-up (voice loading) costs more than synthesis.
        lines = [f"(voice_{voice.name})", "(Parameter.set 'Audio_Method 'none)"]
        for text, path in zip(texts, raw_paths):
            lines.append(
                f"(utt.save.wave (utt.synth (Utterance Text {_scheme_string(text + '.')})) "
                f"{_scheme_string(str(path))} 'riff)"
            )
        script = raw_paths[0].parent / "batch.scm"
        script.write_text("\n".join(lines) + "\n", encoding="utf-8")
        timeout = 60 + 10 * len(texts)
        try:
            result = _run(["festival", "--batch", str(script)], timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise _synthesis_failure(voice_id, f"no end after {timeout} s on {len(texts)} sentences") from err
        missing = [str(p) for p in raw_paths if not p.is_file()]
        if result.returncode != 0 or missing or "SIOD ERROR" in result.stderr:
            raise _synthesis_failure(
                voice_id, f"exit status {result.returncode} on {len(texts)} sentences, {len(missing)} not written: "
                f"{result.stderr.strip()[-500:]}"
            )
        return
    for text, path in zip(texts, raw_paths):
        if voice.engine == "flite":
            cmd = ["flite", "-voice", voice.name, "-t", text + ".", "-o", str(path)]
        else:
            cmd = ["espeak-ng", "-v", voice.name, "-w", str(path), text + "."]
        try:
            result = _run(cmd)
        except subprocess.TimeoutExpired as err:
            raise _synthesis_failure(voice_id, f"no end after {err.timeout:g} s on {text!r}") from err
        if result.returncode != 0 or not path.is_file():
            raise _synthesis_failure(
                voice_id, f"exit status {result.returncode} on {text!r}: {result.stderr.strip()[-500:]}"
            )


def synthesise_batch(voice_id: str, texts: Sequence[str], out_paths: Sequence[Path]) -> list[float]:
    """Synthesise ``texts`` with one voice into 16 kHz mono PCM-16 WAVs.

    Args:
        voice_id: a key of :data:`VOICES`.
        texts: sentences to speak (one per output file).
        out_paths: destination WAV paths (parent folders are created).

    Returns:
        The duration in seconds of each written file.

    Raises:
        SynthesisError: the voice failed on one of the texts.
    """
    durations = []
    with tempfile.TemporaryDirectory(prefix="meld-mini-") as tmp:
        raw_paths = [Path(tmp) / f"{i:05d}.wav" for i in range(len(texts))]
        _synthesise_raw(voice_id, texts, raw_paths)
        for text, raw, out in zip(texts, raw_paths, out_paths):
            wav = load_audio(raw, target_sr=SAMPLE_RATE)  # resamples 8 kHz / 32 kHz voices
            if float(np.abs(wav).max()) < 1e-3:
                raise _synthesis_failure(voice_id, f"it spoke silence for {text!r}")
            write_audio(out, wav, SAMPLE_RATE)
            durations.append(len(wav) / SAMPLE_RATE)
    return durations


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


def plan_mini_corpus(
    *,
    seed: int,
    train_voices: Sequence[str],
    held_out_voices: Sequence[str],
    utterances: dict[str, int],
    min_words: int,
    max_words: int,
) -> dict[str, list[dict]]:
    """The corpus's text and ids, without audio: ``{split: [{id, speaker, text}, ...]}``.

    Sentences are drawn from one seeded stream, evaluation splits first, into one set of
    used sentences, so no sentence appears twice anywhere in the corpus.
    """
    unknown = set(utterances) - set(SPLITS)
    if unknown:
        raise ValueError(f"utterances has unknown splits {sorted(unknown)}; known: {list(SPLITS)}")
    bad = {k: n for k, n in utterances.items() if isinstance(n, bool) or not isinstance(n, int) or n < 0}
    if bad:
        raise ValueError(f"utterances per voice must be non-negative integers, got {bad}")
    rng = random.Random(seed)
    taken: set[str] = set()
    plan: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for split in ("dev", "test", "test_unseen", "train"):
        voices = held_out_voices if split in UNSEEN_SPLITS else train_voices
        for voice_id in voices:
            texts = generate_sentences(rng, utterances.get(split, 0), min_words, max_words, taken)
            for i, text in enumerate(texts):
                plan[split].append({"id": f"{voice_id}-{split}-{i:05d}", "speaker": voice_id, "text": text})
    return {s: rows for s, rows in plan.items() if rows}


def _chunks(rows: list[dict], size: int) -> list[list[dict]]:
    """Consecutive runs of at most ``size`` rows of one speaker."""
    out: list[list[dict]] = []
    for row in rows:
        if out and len(out[-1]) < size and out[-1][0]["speaker"] == row["speaker"]:
            out[-1].append(row)
        else:
            out.append([row])
    return out


def build_mini_corpus(
    out_dir: str | Path,
    *,
    seed: int,
    train_voices: Sequence[str],
    held_out_voices: Sequence[str],
    utterances: dict[str, int],
    min_words: int = 10,
    max_words: int = 20,
    num_workers: int = 2,
    chunk_size: int = 16,
    progress: bool = True,
) -> dict[str, int]:
    """Synthesise the mini corpus into ``out_dir``.

    Args:
        out_dir: corpus folder; ``<out_dir>/<split>/`` folders are replaced.
        seed: seeds the sentence generator (the synthesisers themselves are deterministic).
        train_voices: voice ids (keys of :data:`VOICES`) for train/dev/test.
        held_out_voices: voice ids for test_unseen only; none may share a recorded speaker
            with a training voice.
        utterances: utterances per voice per split, e.g.
            ``{"train": 80, "dev": 5, "test": 5, "test_unseen": 8}``; missing splits get 0.
        min_words, max_words: sentence length range in words.
        num_workers: synthesis threads (each drives one synthesiser process at a time).
        chunk_size: utterances per synthesis job (festival loads its voice once per job).
        progress: show a tqdm progress bar.

    Returns:
        Number of rows written per split.

    Raises:
        VoiceUnavailableError: a voice is unknown or not installed (message names the package).
        SynthesisError: an installed voice failed part-way (its ``<split>/`` folders then hold audio
            but no manifest; the corpus stage keeps its previous output whole).
        ValueError: bad arguments (a held-out voice sharing a speaker with training, ...).
    """
    from meld.progress import progress as progress_bar

    if num_workers < 1 or chunk_size < 1:
        raise ValueError(f"num_workers and chunk_size must be >= 1, got {num_workers}, {chunk_size}")
    if set(train_voices) & set(held_out_voices):
        raise ValueError(
            f"voices both trained on and held out: {sorted(set(train_voices) & set(held_out_voices))}"
        )
    _check_voices(train_voices, held_out_voices)
    plan = plan_mini_corpus(
        seed=seed,
        train_voices=train_voices,
        held_out_voices=held_out_voices,
        utterances=utterances,
        min_words=min_words,
        max_words=max_words,
    )

    out_dir = Path(out_dir)
    for split in SPLITS:  # stale audio from an earlier, larger corpus must not linger
        if (out_dir / split).is_dir():
            shutil.rmtree(out_dir / split)

    jobs = [(split, chunk) for split, rows in plan.items() for chunk in _chunks(rows, chunk_size)]
    # festival jobs are slowest: start them first so they do not trail at the end
    jobs.sort(key=lambda job: VOICES[job[1][0]["speaker"]].engine != "festival")
    total = sum(len(rows) for rows in plan.values())
    with (
        ThreadPoolExecutor(max_workers=num_workers) as pool,
        progress_bar(total=total, desc="mini corpus", unit="utt", disable=not progress) as bar,
    ):
        futures = {}
        for split, chunk in jobs:
            paths = [out_dir / split / "audio" / f"{row['id']}.wav" for row in chunk]
            fut = pool.submit(synthesise_batch, chunk[0]["speaker"], [r["text"] for r in chunk], paths)
            futures[fut] = chunk
        try:
            for fut in as_completed(futures):
                chunk = futures[fut]
                for row, duration in zip(chunk, fut.result()):
                    row["duration"] = round(duration, 4)
                bar.update(len(chunk))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # fail fast: drop the queued jobs
            raise

    counts = {}
    for split, rows in plan.items():
        manifest_rows = [
            {
                "id": r["id"],
                "speaker": r["speaker"],
                "text": normalise_transcript(r["text"]),
                "audio": f"audio/{r['id']}.wav",
                "duration": r["duration"],
            }
            for r in rows
        ]
        counts[split] = write_manifest(manifest_rows, out_dir / split / "manifest.jsonl")
    return counts
