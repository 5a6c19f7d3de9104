"""Every stage of dvc.yaml lists the code it runs: the modules its script imports, followed through
meld/, pipeline/ and ray_jobs/ (imports inside functions included, since this codebase imports lazily),
are each covered by one of its deps. A module missing there is a change DVC would not rerun the
stage for: `dvc repro` would report it up to date and keep results the new code would not give.

Some import edges do not carry a stage's logic and are not followed (meld.codedeps.NOT_FOLLOWED, each
with why). Following them would put most of meld/ under the corpus stage, which costs hours on
LibriSpeech."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from meld.codedeps import NOT_FOLLOWED, code_closure, imported_modules

ROOT = Path(__file__).resolve().parents[1]
DAG = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


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
        assert module in imported_modules(ROOT / importer), f"{importer} no longer imports {module}"


def test_the_closure_finds_a_dependency_only_a_function_imports(tmp_path):
    """The check can fail: a module reached only through an import inside a function, two files
    down, shows up with its chain."""
    pkg = tmp_path / "pipeline"
    pkg.mkdir()
    (tmp_path / "meld").mkdir()
    (pkg / "stage.py").write_text("from meld import helper\n")
    (tmp_path / "meld" / "helper.py").write_text("def f():\n    from meld.deep import g\n    return g()\n")
    (tmp_path / "meld" / "deep.py").write_text("def g():\n    return 1\n")
    chains = code_closure(pkg / "stage.py", root=tmp_path)
    assert chains[tmp_path / "meld" / "deep.py"] == ["meld/deep.py", "meld/helper.py", "pipeline/stage.py"]
