"""Every stage of dvc.yaml lists the code it runs: the modules its script imports, followed through
meld/, pipeline/ and ray_jobs/ (imports inside functions included, since this codebase imports lazily),
are each covered by one of its deps. A module missing there is a change DVC would not rerun the
stage for: `dvc repro` would report it up to date and keep results the new code would not give.

Some import edges do not carry a stage's logic and are not followed (NOT_FOLLOWED, each with why).
Following them would put most of meld/ under the corpus stage, which costs hours on LibriSpeech."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("meld", "pipeline", "ray_jobs")
DAG = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

# (importing file, imported module): edges the closure does not follow.
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


def _module_file(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` anywhere in the file may load (for `from a import b`,
    both a and a.b: b may be a submodule)."""
    package = list(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
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


def code_closure(script: Path) -> dict[Path, list[str]]:
    """The repository's modules a script loads, each with the import chain that reaches it."""
    chains = {script: [script.relative_to(ROOT).as_posix()]}
    todo = [script]
    while todo:
        importer = todo.pop()
        importer_rel = importer.relative_to(ROOT).as_posix()
        for module in sorted(_imported_modules(importer)):
            if module.split(".")[0] not in PACKAGES or _not_followed(importer_rel, module):
                continue
            parts = module.split(".")
            for end in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                target = _module_file(".".join(parts[:end]))
                if target is not None and target not in chains:
                    chains[target] = [target.relative_to(ROOT).as_posix(), *chains[importer]]
                    todo.append(target)
    return chains


def _code_stages() -> list[tuple[str, dict]]:
    return [(name, stage.get("do", stage)) for name, stage in DAG.items()]


@pytest.mark.parametrize(("name", "stage"), _code_stages(), ids=[name for name, _ in _code_stages()])
def test_a_stage_lists_every_module_its_script_loads(name, stage):
    deps = [str(dep) for dep in stage["deps"]]
    script = ROOT / deps[0]
    assert script.suffix == ".py" and script.parts[-2] == "pipeline", f"{name}: first dep should be its script"
    assert script.stem in stage["cmd"], f"{name}: its first dep {deps[0]} is not the script its cmd runs"

    def covered(path: str) -> bool:
        return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)

    missing = [" <- ".join(chain) for path, chain in code_closure(script).items()
               if not covered(chain[0]) and path.read_text().strip()]  # an empty __init__.py runs nothing
    assert not missing, f"dvc.yaml stage {name!r} does not list these modules in its deps:\n" + "\n".join(missing)


def test_each_edge_left_unfollowed_still_exists():
    """An entry whose import is gone would quietly excuse a later, real one."""
    for importer, module in NOT_FOLLOWED:
        assert module in _imported_modules(ROOT / importer), f"{importer} no longer imports {module}"


def test_the_closure_finds_a_dependency_only_a_function_imports(tmp_path, monkeypatch):
    """The check can fail: a module reached only through an import inside a function, two files
    down, shows up with its chain."""
    pkg = tmp_path / "pipeline"
    pkg.mkdir()
    (tmp_path / "meld").mkdir()
    (pkg / "stage.py").write_text("from meld import helper\n")
    (tmp_path / "meld" / "helper.py").write_text("def f():\n    from meld.deep import g\n    return g()\n")
    (tmp_path / "meld" / "deep.py").write_text("def g():\n    return 1\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)  # the functions read the module's ROOT
    chains = code_closure(pkg / "stage.py")
    assert chains[tmp_path / "meld" / "deep.py"] == ["meld/deep.py", "meld/helper.py", "pipeline/stage.py"]
