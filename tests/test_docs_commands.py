"""The how-to docs (README, docs/scaling.md, bench/README.md) tell users what to type: each `python -m
<module>` or `meld <command>` they show accepts the flags shown with it, and each params key they name
in backticks (`evaluate.decode_workers`) is a key of its section. A renamed flag or key would
otherwise leave the docs sending users into an argparse or config error. docs/results.md is a record
of what was run then, so its old commands are not checked."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from meld import config

ROOT = Path(__file__).resolve().parents[1]
HOW_TO = [ROOT / "README.md", ROOT / "docs" / "scaling.md", ROOT / "bench" / "README.md"]
TEXTS = [p.read_text() for p in HOW_TO]
SECTIONS = {"corpus": config.CorpusConfig, "features": config.FeaturesConfig, "codebook": config.CodebookConfig,
            "bpe": config.BPEConfig, "model": config.ModelConfig, "train": config.TrainConfig,
            "evaluate": config.EvaluateConfig, "tune": config.TuneConfig}
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
