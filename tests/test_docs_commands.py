"""The how-to docs (README, docs/scaling.md, bench/README.md) tell users what to type: each `python -m
<module>` or `meld <command>` they show accepts the flags shown with it, each params key they name
in backticks (`evaluate.decode_workers`) is a key of its section, each `make` target and `dvc repro`
stage they run exists, each MELD_*/BENCH_* variable they name is read by the code, and each file of
the repository they point to is there. A renamed flag, key, stage, variable or file would otherwise
leave the docs sending users into an error, or into setting a variable nothing reads. docs/results.md
is a record of what was run then, so its old commands are not checked."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meld import config

ROOT = Path(__file__).resolve().parents[1]
HOW_TO = [ROOT / "README.md", ROOT / "docs" / "scaling.md", ROOT / "bench" / "README.md"]
TEXTS = [p.read_text() for p in HOW_TO]
SECTIONS = {"corpus": config.CorpusConfig, "features": config.FeaturesConfig, "codebook": config.CodebookConfig,
            "bpe": config.BPEConfig, "model": config.ModelConfig, "train": config.TrainConfig,
            "evaluate": config.EvaluateConfig, "tune": config.TuneConfig, "codec_lm": config.CodecLMConfig}
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def documented_commands(texts: list[str]) -> dict[str, set[str]]:
    """{module, or 'meld.cli <command>': the flags shown with it anywhere}; a shell line continued with a
    backslash counts as one line, and a line ends at a backtick or a pipe."""
    found: dict[str, set[str]] = {}
    for text in texts:
        text = text.replace("\\\n", " ")
        for m in re.finditer(r"-m ((?:pipeline|ray_jobs|bench)\.[A-Za-z_]+)([ \t][^`|\n]*)?", text):
            found.setdefault(m.group(1), set()).update(FLAG.findall(m.group(2) or ""))
        for m in re.finditer(r"(?<![\w/.-])meld (synthesize|transcribe|info)([ \t][^`|\n]*)?", text):
            found.setdefault(f"meld.cli {m.group(1)}", set()).update(FLAG.findall(m.group(2) or ""))
    return found


def documented_params(texts: list[str]) -> set[tuple[str, str]]:
    """(section, key) of every `section.key` inside backticks, file names (model.pt) aside."""
    keys = set()
    pattern = re.compile(rf"(?<![\w./-])({'|'.join(SECTIONS)})\.([a-z_]+)\b")
    for text in texts:
        for span in re.findall(r"`[^`\n]*`", text):
            keys.update((s, k) for s, k in pattern.findall(span) if k not in ("pt", "py", "json", "jsonl", "yaml"))
    return keys


COMMANDS = documented_commands(TEXTS)


def test_the_docs_show_commands_and_keys_to_check():
    """The extraction itself finds what the README plainly shows (else every check below passes on nothing)."""
    assert "--list" in COMMANDS["meld.cli synthesize"] and "ray_jobs.train" in COMMANDS
    assert ("evaluate", "decode_workers") in documented_params(TEXTS)
    shown = documented_commands(["`python -m bench.kmeans --threads 1 \\\n  --no-such-flag` | `meld info x`"])
    assert shown == {"bench.kmeans": {"--threads", "--no-such-flag"}, "meld.cli info": set()}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_documented_command_accepts_the_flags_shown(command):
    helped = subprocess.run([sys.executable, "-m", *command.split(), "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr[-2000:]
    unknown = sorted(COMMANDS[command] - set(FLAG.findall(helped.stdout)))
    assert not unknown, f"the docs show `{command}` with {unknown}, which its --help does not list"


def test_every_params_key_the_docs_name_exists():
    named = documented_params(TEXTS)
    unknown = sorted(f"{s}.{k}" for s, k in named if k not in {f.name for f in dataclasses.fields(SECTIONS[s])})
    assert not unknown, f"the docs name params keys their sections do not have: {unknown}"


def code_spans(text: str) -> list[str]:
    """What the text shows as code: fenced blocks whole, then inline `spans` (a line continued with a
    backslash joined), so prose that happens to say "make" or "dvc repro" is not read as a command."""
    fence = re.compile(r"^```[^\n]*\n(.*?)^```", flags=re.S | re.M)
    return fence.findall(text) + re.findall(r"`[^`\n]*`", fence.sub("", text).replace("\\\n", " "))


def documented_runs(texts: list[str]) -> tuple[set[str], set[str]]:
    """(the `make` targets, the `dvc repro` stages, foreach keys dropped) that the texts' code runs."""
    targets, stages = set(), set()
    for span in (s for text in texts for s in code_spans(text)):
        targets.update(re.findall(r"(?<![\w.-])make ([a-z][\w-]*)", span))
        for m in re.finditer(r"\bdvc repro((?: +(?:-\S+|[a-z][\w@]*(?=[\s`]|$)))*)", span):
            stages.update(w.split("@")[0] for w in m.group(1).split() if not w.startswith("-"))
    return targets, stages


def test_every_make_target_and_dvc_stage_the_docs_run_exists():
    targets, stages = documented_runs(TEXTS)
    assert {"run", "test"} <= targets and "tune" in stages  # the extraction finds what the README plainly shows
    assert documented_runs(["`dvc repro -s corpus train@meld`, to make sure\n```\nmake bench  # b\n```"]) == (
        {"bench"}, {"corpus", "train"})
    made = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    dvc_stages = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert not targets - made, f"the docs run make targets the Makefile lacks: {sorted(targets - made)}"
    assert not stages - dvc_stages, f"the docs run dvc repro on stages dvc.yaml lacks: {sorted(stages - dvc_stages)}"


def test_every_meld_variable_the_docs_name_is_read_by_the_code():
    named = {v for text in TEXTS for v in re.findall(r"\b(?:MELD|BENCH)_[A-Z_]+\b", text)}
    assert {"MELD_OUT", "MELD_TUNE_WORK", "BENCH_CLOCK"} <= named
    code = "\n".join(p.read_text() for d in ("meld", "pipeline", "ray_jobs", "bench") for p in (ROOT / d).rglob("*.py"))
    unread = sorted(v for v in named if not re.search(rf"[\"']{v}[\"']", code))
    assert not unread, f"the docs name environment variables no code reads: {unread}"


def test_every_repository_file_the_docs_name_exists():
    pattern = r"(?<![\w/.-])(?:meld|pipeline|ray_jobs|tests|bench|configs|docs)/[a-z0-9_./-]*\.(?:py|yaml|md|json)"
    named = {m for text in TEXTS for m in re.findall(pattern, text)}
    assert {"meld/codedeps.py", "configs/paper.yaml", "bench/results/training.json"} <= named
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"the docs name files the repository does not have: {missing}"
