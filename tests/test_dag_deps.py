"""Every stage of dvc.yaml lists the code it runs: the modules its script imports, followed through
meld/, pipeline/ and ray_jobs/ (imports inside functions included, since this codebase imports lazily),
are each covered by one of its deps. A module missing there is a change DVC would not rerun the
stage for: `dvc repro` would report it up to date and keep results the new code would not give.

Some import edges do not carry a stage's logic and are not followed (meld.codedeps.NOT_FOLLOWED, each
with why). Following them would put most of meld/ under the corpus stage, which costs hours on
LibriSpeech."""

from __future__ import annotations

import os
import subprocess
import sys
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


def test_relative_imports_in_a_package_init_reach_the_packages_modules(tmp_path):
    """In meld/sub/__init__.py, `from . import helper` loads meld.sub.helper; it was read as
    meld.sub.__init__.helper, a file that does not exist, so everything a package's __init__ imported
    relatively was left out of the closure (and out of the stage's deps and the training fingerprint)."""
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "meld" / "sub").mkdir(parents=True)
    (tmp_path / "pipeline" / "stage.py").write_text("import meld.sub\n")
    (tmp_path / "meld" / "__init__.py").write_text("")
    (tmp_path / "meld" / "sub" / "__init__.py").write_text("from . import helper\nfrom .other import f\nfrom .. import top\n")
    for name in ("sub/helper.py", "sub/other.py", "top.py"):
        (tmp_path / "meld" / name).write_text("def f():\n    return 1\n")
    chains = code_closure(tmp_path / "pipeline" / "stage.py", root=tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in chains) == [
        "meld/__init__.py", "meld/sub/__init__.py", "meld/sub/helper.py", "meld/sub/other.py", "meld/top.py",
        "pipeline/stage.py"]
    assert chains[tmp_path / "meld" / "top.py"] == ["meld/top.py", "meld/sub/__init__.py", "pipeline/stage.py"]


def test_a_file_that_does_not_parse_is_named(tmp_path):
    (tmp_path / "meld").mkdir()
    (tmp_path / "meld" / "broken.py").write_text("def f(:\n")
    with pytest.raises(SyntaxError) as err:
        imported_modules(tmp_path / "meld" / "broken.py", root=tmp_path)
    assert err.value.filename == str(tmp_path / "meld" / "broken.py")  # was "<unknown>"


def test_the_closure_reads_utf8_source_under_an_ascii_locale(tmp_path):
    """The interpreter reads source as UTF-8 whatever the locale; the closure read it in the locale's
    encoding, so under an ASCII one (C, locale coercion off) the training fingerprint failed on the
    first file with a non-ASCII character."""
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "meld").mkdir()
    (tmp_path / "pipeline" / "stage.py").write_text("# 62.5 Hz \u2192 16 kHz\nfrom meld import helper\n", "utf-8")
    (tmp_path / "meld" / "helper.py").write_text("x = 1\n")
    script = (f"from pathlib import Path; from meld.codedeps import code_closure; "
              f"print(len(code_closure(Path({str(tmp_path / 'pipeline' / 'stage.py')!r}), Path({str(tmp_path)!r}))))")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "2"
