"""A stage's output folder under kills: whatever point a run dies at, the next run finds either a
whole output (old or new) or none, never a half-deleted one that reads as finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from meld.staging import STAGE_MARKER, staged_folder

ROOT = Path(__file__).resolve().parents[1]


def _write_output(folder: Path, tag: str) -> None:
    for split in ("train", "dev"):
        (folder / split).mkdir(parents=True)
        (folder / split / "manifest.jsonl").write_text(tag)
    (folder / STAGE_MARKER).write_text(tag)


def test_a_run_killed_while_deleting_the_old_output_leaves_no_half_output_for_the_next_run(tmp_path):
    out = tmp_path / "corpus"
    _write_output(out, "old")
    # a real SIGKILL part-way through deleting the replaced output: the dev split gone, train and the
    # marker still there
    script = textwrap.dedent(f"""
        import os, signal, shutil
        from pathlib import Path
        import meld.staging as staging

        real_rmtree = shutil.rmtree

        def rmtree_then_die(path, *args, **kwargs):
            path = Path(path)
            if (path / "dev").is_dir():
                real_rmtree(path / "dev")
                os.kill(os.getpid(), signal.SIGKILL)
            real_rmtree(path, *args, **kwargs)

        staging.shutil.rmtree = rmtree_then_die
        with staging.staged_folder({str(out)!r}, holds="*/manifest.jsonl") as work:
            for split in ("train", "dev"):
                (work / split).mkdir()
                (work / split / "manifest.jsonl").write_text("new")
            (work / {STAGE_MARKER!r}).write_text("new")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == -signal.SIGKILL
    assert (out / "dev" / "manifest.jsonl").read_text() == "new"  # the swap itself was done
    import shutil
    shutil.rmtree(out)  # as `dvc repro` removes a stage's outputs before running it
    with pytest.raises(RuntimeError, match="stopped"), staged_folder(out, holds="*/manifest.jsonl"):
        raise RuntimeError("stopped")
    # the half-deleted old output must not come back as the stage's output
    assert not (out / STAGE_MARKER).exists()
    assert not (tmp_path / "corpus.previous").exists()
    with staged_folder(out, holds="*/manifest.jsonl") as work:  # and a rerun goes through
        _write_output(work, "rerun")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
    assert (out / "dev" / "manifest.jsonl").read_text() == "rerun"
