"""A data stage's output folder, written whole or not at all (every data stage writes through it)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from pathlib import Path

STAGE_MARKER = "summary.json"  # every data stage writes it last: a folder without it is not a stage's output


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _discard(path: Path, discard: Path) -> None:
    """Deletes ``path`` by first renaming it to ``discard``: a kill part-way through the deletion then
    leaves a half-deleted ``discard``, which nothing restores, not a half-deleted ``path`` that a
    later run would take for a whole output (``<out>.previous`` is put back when ``out`` is missing,
    as it is when ``dvc repro`` has removed it)."""
    _remove(discard)
    if path.exists() or path.is_symlink():
        path.rename(discard)
    _remove(discard)


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


@contextlib.contextmanager
def staged_folder(out: str | Path, *, holds: str | None = None, inputs: Sequence[str | Path] = ()):
    """A data stage's output folder, written whole or not at all.

    Yields ``<out>.partial``, a fresh folder beside ``out``, to write into; when the block ends without
    an error it replaces ``out`` (the previous contents go, stale splits included). On an error
    ``out`` is left as it was and the partial folder is kept, so that its ``rejected.jsonl`` listings
    (which the error may point to) can be read; the next run clears it. Under ``dvc repro`` DVC removes
    ``out`` first anyway; this keeps a stage run by hand from leaving a new train split beside an old
    dev split and old statistics.

    ``out`` is resolved first, so a symlinked output folder is replaced where it really is (on its own
    disk). A run killed between the swap's two renames leaves the old output as ``<out>.previous``;
    the next run puts it back before anything else; the old output is renamed ``<out>.discard``
    before it is deleted, so a kill during the deletion leaves nothing that would be put back. A non-empty ``out`` without ``summary.json`` is
    refused: it is not a stage's output, and replacing it would delete whatever it holds.

    Every data stage writes a ``summary.json``, so that marker alone cannot tell one stage's output
    from another's: ``holds`` is a glob pattern that this stage's finished output matches (the
    features stage: ``stats.json``), and an ``out`` with a marker but no match is another stage's
    output, refused. ``inputs`` are the folders and files the stage reads: an ``out`` that is one of
    them, inside one or around one is refused before anything is written (``--out`` given the
    stage's own ``--features``, say, replaced the feature store with a codebook).
    """
    out = Path(out).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if _overlap(out, source):
            raise SystemExit(f"{out} is where the stage reads {given} from (or holds it, or lies in it), and the "
                             "stage replaces its output folder whole: give --out a folder of its own")
    staging = out.with_name(out.name + ".partial")
    previous = out.with_name(out.name + ".previous")
    discard = out.with_name(out.name + ".discard")  # being deleted: never put back
    if not out.exists() and previous.is_dir():  # killed mid-swap: the old output is the only whole one
        previous.rename(out)
    if out.is_dir() and any(out.iterdir()) and not (out / STAGE_MARKER).is_file():
        raise SystemExit(f"{out} holds files but no {STAGE_MARKER}, so it is not a finished output of this stage, "
                         "and the stage replaces its output folder whole: give --out a folder of its own (or delete "
                         "this one, if it is what an older, unfinished run of the stage left)")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"{out} is a file; the stage writes a folder there")
    if holds and (out / STAGE_MARKER).is_file() and not any(out.glob(holds)):
        raise SystemExit(f"{out} is the output of another stage (it has a {STAGE_MARKER} but no {holds}, which this "
                         "stage writes), and the stage replaces its output folder whole: give --out a folder of "
                         "its own")
    _remove(staging)  # from a run that failed
    _discard(previous, discard)  # from a run killed after its swap (``out`` is whole: checked above)
    staging.mkdir(parents=True)
    yield staging
    if out.exists():
        out.rename(previous)
    staging.rename(out)
    _discard(previous, discard)
