"""Which of the repository's files a script runs: its imports, followed through meld/, pipeline/ and
ray_jobs/ (imports inside functions included, since this codebase imports lazily), read from the
source, not by running it.

Two users, one definition: tests/test_dag_deps.py holds every dvc.yaml stage's deps to its script's
closure (so that DVC reruns a stage for any change to the code it runs), and the training fingerprint
(:func:`ray_jobs.train.build_config`) hashes the training driver's closure (so that an interrupted
training resumes after a change to code it does not run, such as the evaluation's, and restarts after
a change to code it does).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("meld", "pipeline", "ray_jobs")

# (importing file, imported module): edges the closure does not follow, each because it carries none of
# the importer's computation. Following them would put most of meld/ under the corpus stage (hours on
# LibriSpeech) and the evaluation's code under training's fingerprint.
NOT_FOLLOWED = {
    # meld.config validates a params file up front; the imports inside its validate methods fetch name
    # lists (systems, vocoders, judges, splits, voices) and argument checks, not what a stage computes
    ("meld/config.py", "meld.corpus.librispeech"): "split names and archive checksums, for validation",
    ("meld/config.py", "meld.corpus.mini"): "split and voice names, for validation",
    ("meld/config.py", "meld.evaluation.asr"): "ASR judge names, for validation",
    ("meld/config.py", "meld.evaluation.speaker"): "speaker-model names, for validation",
    ("meld/config.py", "meld.vocoder"): "vocoder names, for validation",
    ("meld/config.py", "meld.models.builders"): "which systems need a codebook, for validation",
    ("meld/config.py", "meld.models.codec_lm"): "Codec-LM argument checks, for validation",
    # training reads one file name of the code store; meld.codes' encoding and continuation code (and
    # what it imports) is the codes and evaluate stages' business
    ("ray_jobs/train.py", "meld.codes"): "the code store's codec file name (CODEC_FILE)",
    ("meld/codes.py", "meld.generate"): "batch seeds of continue_codes, which only the evaluate stages run",
}


def module_file(module: str, root: Path = REPO_ROOT) -> Path | None:
    """The file a dotted module name loads under ``root`` (a package's ``__init__.py``), or None."""
    path = root.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def imported_modules(path: Path, root: Path = REPO_ROOT) -> set[str]:
    """Every module an `import` or `from ... import` anywhere in the file may load (for `from a import b`,
    both a and a.b: b may be a submodule)."""
    # the package relative imports start from is the file's folder, for a package's __init__.py too
    # (its own name, meld.x, is that folder's, not meld.x.__init__)
    package = list(path.relative_to(root).parent.parts)
    found: set[str] = set()
    # bytes, as the interpreter reads source (UTF-8 or the file's coding line, whatever the locale);
    # the file name, so that a syntax error says which file
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _not_followed(importer: str, module: str) -> bool:
    return any(importer == source and (module == target or module.startswith(target + "."))
               for source, target in NOT_FOLLOWED)


def code_closure(script: Path, root: Path = REPO_ROOT) -> dict[Path, list[str]]:
    """The repository's modules a script loads (itself included), each with the import chain that
    reaches it (the module first, the script last)."""
    chains = {script: [script.relative_to(root).as_posix()]}
    todo = [script]
    while todo:
        importer = todo.pop()
        importer_rel = importer.relative_to(root).as_posix()
        for module in sorted(imported_modules(importer, root)):
            if module.split(".")[0] not in PACKAGES or _not_followed(importer_rel, module):
                continue
            parts = module.split(".")
            for end in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                target = module_file(".".join(parts[:end]), root)
                if target is not None and target not in chains:
                    chains[target] = [target.relative_to(root).as_posix(), *chains[importer]]
                    todo.append(target)
    return chains
