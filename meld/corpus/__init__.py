"""Corpus sources. Each writes ``<out>/<split>/manifest.jsonl`` rows ``{id, speaker, text, audio, duration}``.

``audio`` is relative to the manifest's folder, so a corpus folder can be moved or shared.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

MANIFEST_KEYS = ("id", "speaker", "text", "audio", "duration")


def write_manifest(rows: Iterable[dict], path: str | Path) -> int:
    """Write manifest rows as JSON lines (atomically); returns the number of rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            missing = [k for k in MANIFEST_KEYS if k not in row]
            if missing:
                raise ValueError(f"manifest row {row.get('id', '?')} lacks {missing}")
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def read_manifest(path: str | Path) -> list[dict]:
    """Read a manifest; each row gains ``audio_path``, the absolute path of its audio file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest (did the corpus stage run?)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from err
            row["audio_path"] = str((path.parent / row["audio"]).resolve())
            rows.append(row)
    return rows
