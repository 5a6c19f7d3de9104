"""LibriSpeech (openslr resource 12): download, verify, extract safely, and write manifests.

Usage (from a pipeline script; paths and flags come from its command line)::

    from meld.corpus.librispeech import prepare_librispeech
    counts = prepare_librispeech(Path("data/raw"), Path("data/corpus"),
                                 ["train-clean-100", "dev-clean", "test-clean"], download=True)
    # -> {"train": 28539, "dev": 2703, "test": 2620}

Each archive is fetched with a resumable HTTP download (``<name>.tar.gz.part`` grows until it is
complete), checked against the MD5 sum openslr publishes, and extracted so that no member can land
outside the target folder. A subset that is already extracted under ``root`` is used as it is, without
touching the network (with a warning when it holds fewer utterances than the official subset). Manifests
point at the FLAC files where they lie: by an absolute path when ``root`` was given absolute (shared storage,
so that the corpus folder can be copied or pulled into a checkout anywhere), else relative to the manifest.
"""

from __future__ import annotations

import codecs
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from meld.audio import count_frames, length_unknown
from meld.corpus import write_manifest
from meld.progress import progress as progress_bar
from meld.text import normalise_transcript

LIBRISPEECH_BASE_URL = "https://www.openslr.org/resources/12"

# MD5 sums of the archives as published in https://www.openslr.org/resources/12/md5sum.txt
# (cross-checked against several independent public LibriSpeech download scripts).
LIBRISPEECH_MD5 = {
    "train-clean-100": "2a93770f6d5c6c964bc36631d331a522",
    "train-clean-360": "c0e676e450a7ff2f54aeade5171606fa",
    "train-other-500": "d1a0fd59409feb2c614ce4d30c387708",
    "dev-clean": "42e2234ba48799c1f50f24a7926300a1",
    "dev-other": "c8d0bcc9cca99d4f8b62fcc847357931",
    "test-clean": "32fa31d27d2e1cad72775fee3f4849a9",
    "test-other": "fb5a50374b501bb3bac4815ee91d3135",
}

# Manifest split each subset feeds; the training subsets are concatenated (in this order).
SUBSET_SPLITS = {
    "train-clean-100": "train",
    "train-clean-360": "train",
    "train-other-500": "train",
    "dev-clean": "dev",
    "test-clean": "test",
    "dev-other": "dev_other",
    "test-other": "test_other",
}

# Utterances per official subset (each FLAC has one transcript line): a subset found already extracted
# with fewer is an extraction that stopped part-way, or one pruned on purpose.
LIBRISPEECH_UTTERANCES = {
    "train-clean-100": 28539,
    "train-clean-360": 104014,
    "train-other-500": 148688,
    "dev-clean": 2703,
    "dev-other": 2864,
    "test-clean": 2620,
    "test-other": 2939,
}

_UTTERANCE_ID = re.compile(r"^(\d+)-(\d+)-(\d+)$")
_MD5_HEX = re.compile(r"^[0-9a-f]{32}$")

logger = logging.getLogger(__name__)


class LibriSpeechError(RuntimeError):
    """Base class of the errors raised while preparing LibriSpeech."""


class DownloadError(LibriSpeechError):
    """A download failed (network, HTTP status, or a truncated answer)."""


class ChecksumError(DownloadError):
    """A file's MD5 sum differs from the published one."""


class UnsafeArchiveError(LibriSpeechError):
    """An archive member would be written outside the extraction folder, or is of a forbidden type."""


# --------------------------------------------------------------------------- download


def md5sum(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 digest of a file, read in chunks."""
    digest = hashlib.md5()  # publisher's integrity checksum, not a security measure
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


class _Truncated(Exception):
    """The server closed the connection before sending everything it announced."""


def _parse_content_range(value: str | None) -> tuple[int, int | None]:
    """``bytes START-END/TOTAL`` -> (START, TOTAL or None)."""
    match = re.match(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", value or "")
    if not match:
        raise DownloadError(f"server answered 206 with an unreadable Content-Range: {value!r}")
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), total


class _Partial:
    """A ``.part`` file and the MD5 state of what it holds so far (so resuming never re-reads it)."""

    def __init__(self, path: Path, chunk_size: int) -> None:
        self.path = path
        self.digest = hashlib.md5()
        if path.exists():
            with open(path, "rb") as f:
                while block := f.read(chunk_size):
                    self.digest.update(block)

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0


def _fetch_once(
    url: str,
    partial: _Partial,
    opener: urllib.request.OpenerDirector,
    chunk_size: int,
    timeout: float,
    progress: bool,
) -> None:
    """Append the rest of ``url`` to the partial file, starting at its current size.

    A server that ignores the Range request (or a file:// URL) makes the partial file start over.
    """
    part = partial.path
    offset = partial.size()
    request = urllib.request.Request(url, headers={"User-Agent": "meld-toolkit"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            # Range not satisfiable: the partial file already holds the whole archive (or more);
            # the checksum decides.
            err.close()
            return
        raise
    with response:
        status = getattr(response, "status", None) or response.getcode()
        length = response.headers.get("Content-Length")
        length = int(length) if length is not None and length.isdigit() else None
        if offset and status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                raise DownloadError(f"{url}: asked for bytes from {offset}, the server sent from {start}")
            mode = "ab"
        else:
            # A full answer (status 200, or file:// which knows no Range): start from scratch.
            offset, total, mode = 0, length, "wb"
            partial.digest = hashlib.md5()
        received = 0
        with (
            open(part, mode) as out,
            progress_bar(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                disable=not progress,
            ) as bar,
        ):
            while block := response.read(chunk_size):
                out.write(block)
                partial.digest.update(block)
                received += len(block)
                bar.update(len(block))
        # http.client returns b"" (no error) when the connection drops early: compare with what
        # the server announced.
        if length is not None and received < length:
            raise _Truncated(f"received {received} of {length} bytes")
        # a 206 without Content-Length whose connection dropped, or a server that answers a range in
        # windows: the file is short of the total Content-Range gave, so resume rather than let the
        # checksum fail and delete a partial file that was right so far
        if total is not None and offset + received < total:
            raise _Truncated(f"have {offset + received} of {total} bytes")


def download_archive(
    url: str,
    dest: str | Path,
    md5: str,
    *,
    chunk_size: int = 1 << 20,
    progress: bool = True,
    retries: int = 2,
    timeout: float = 60.0,
    opener: urllib.request.OpenerDirector | None = None,
) -> Path:
    """Download ``url`` to ``dest`` resumably and verify its MD5 sum.

    Bytes go to ``<dest>.part``; a ``.part`` left by an interrupted run is continued with an HTTP
    ``Range`` request (a server that ignores Range makes the download start over). Only a file
    whose checksum matches is renamed to ``dest``. An existing ``dest`` with the right checksum is
    returned without touching the network.

    Args:
        url: ``http://``, ``https://`` or ``file://`` address.
        dest: where the verified file ends up.
        md5: expected hex MD5 digest.
        chunk_size: bytes read per network read.
        progress: show a tqdm progress bar.
        retries: how many times an interrupted transfer is resumed before giving up.
        timeout: socket timeout in seconds.
        opener: urllib opener to use (default: ``urllib.request.build_opener()``).

    Returns:
        ``dest`` as a Path.

    Raises:
        ChecksumError: the downloaded (or existing) file has another MD5 sum. A downloaded one is
            deleted, since resuming it could never give the right file; an existing ``dest`` is
            left alone.
        DownloadError: HTTP error or a connection that kept failing; the ``.part`` file is kept so
            that the next call resumes it.
    """
    dest = Path(dest)
    md5 = md5.strip().lower()
    if not _MD5_HEX.match(md5):
        raise ValueError(f"not an MD5 hex digest: {md5!r}")
    scheme = url.split(":", 1)[0].lower()
    if scheme not in ("http", "https", "file"):
        raise ValueError(f"{url}: only http, https and file URLs are supported")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")

    if dest.exists():
        actual = md5sum(dest)
        if actual == md5:
            return dest
        raise ChecksumError(
            f"{dest} exists but its MD5 is {actual}, expected {md5} (from {url}); delete it to download it again"
        )

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    opener = opener or urllib.request.build_opener()
    partial = _Partial(part, chunk_size)

    for attempt in range(retries + 1):
        try:
            _fetch_once(url, partial, opener, chunk_size, timeout, progress)
            break
        except urllib.error.HTTPError as err:
            raise DownloadError(
                f"{url}: HTTP {err.code} {err.reason}"
                + (f"; the partial download {part} is kept for a later resume" if part.exists() else "")
            ) from err
        except (urllib.error.URLError, http.client.HTTPException, OSError, _Truncated) as err:
            if attempt == retries:
                size = partial.size()
                raise DownloadError(
                    f"{url}: download interrupted after {size} bytes ({err}) and {retries} retries; "
                    f"{part} is kept: run again to resume"
                ) from err
            # Re-read what reached the disk rather than trust the in-memory state after an error.
            partial = _Partial(part, chunk_size)

    actual = partial.digest.hexdigest()
    if actual != md5:
        part.unlink(missing_ok=True)
        raise ChecksumError(
            f"{url}: MD5 of the downloaded file is {actual}, expected {md5}; the corrupt partial file "
            f"{part} was deleted, run again to download from scratch (or check the mirror)"
        )
    part.replace(dest)
    return dest


# --------------------------------------------------------------------------- extraction


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class _ProgressReader:
    """File wrapper that advances a tqdm bar by the compressed bytes read."""

    def __init__(self, f, bar: tqdm) -> None:
        self._f, self._bar = f, bar

    def read(self, size: int = -1) -> bytes:
        block = self._f.read(size)
        self._bar.update(len(block))
        return block


def _checked_location(dest_real: str, name: str) -> str:
    """Where member ``name`` lands, after checking that it cannot escape ``dest_real``.

    The final component is not resolved (a member never writes *through* an existing link: the
    link is replaced), every parent folder is resolved on disk, so links extracted earlier count.
    """
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path")
    if ".." in re.split(r"[/\\]", name):
        raise UnsafeArchiveError(f"archive member {name!r} contains '..'")
    norm = os.path.normpath(name)
    if norm in (".", ""):
        return dest_real
    parent = os.path.realpath(os.path.join(dest_real, os.path.dirname(norm)))
    if not _within(parent, dest_real):
        raise UnsafeArchiveError(
            f"archive member {name!r} would be written outside the target folder (via a link)"
        )
    return os.path.join(parent, os.path.basename(norm))


def _remove_existing(location: str) -> None:
    if os.path.islink(location) or os.path.isfile(location):
        os.unlink(location)


def safe_extract(tar_path: str | Path, dest: str | Path, *, progress: bool = False) -> int:
    """Extract a (gzipped) tar archive into ``dest`` so that nothing lands outside it.

    Rejected, with an :class:`UnsafeArchiveError` naming the member: absolute paths, ``..``
    components, paths that go through a link already in ``dest`` to outside it, symbolic or hard
    links to anything but a file extracted inside ``dest`` before them, and device files, FIFOs or
    other special members. Links are materialised as copies of that file, so the extraction creates
    no link that a later member could redirect; set-uid bits and group/other write bits are dropped.
    A link to its own location is skipped: the file is already there (GNU tar stores a file named
    twice on its command line as a hard link to itself). A member that clashes with an earlier one (a
    folder over a file, a file over a folder, a file named ``.``) is refused with the same error.

    The archive is read in one streaming pass (LibriSpeech archives reach 30 GB), so members before
    a rejected one are already extracted: extract into a fresh folder and delete it on failure, as
    :func:`prepare_librispeech` does.

    Args:
        tar_path: the archive (.tar, .tar.gz, .tar.bz2, .tar.xz).
        dest: target folder, created if missing.
        progress: show a tqdm bar over the archive's bytes.

    Returns:
        Number of members extracted.

    Raises:
        UnsafeArchiveError: a member as above, named.
    """
    tar_path = Path(tar_path)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dest_real = os.path.realpath(dest)
    count = 0
    with (
        open(tar_path, "rb") as raw,
        progress_bar(
            total=tar_path.stat().st_size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"extract {tar_path.name}",
            disable=not progress,
        ) as bar,
        tarfile.open(fileobj=_ProgressReader(raw, bar), mode="r|*") as tar,
    ):
        for member in tar:
            location = _checked_location(dest_real, member.name)
            try:
                _extract_member(tar, member, location, dest_real)
            except (IsADirectoryError, NotADirectoryError, FileExistsError) as err:
                # a folder over a file, a file over a folder or the target folder itself (a file named
                # "."): refused and named like any member that cannot be placed, not a bare OSError
                raise UnsafeArchiveError(
                    f"archive member {member.name!r} clashes with an earlier member or the target folder: "
                    f"{err.strerror} ({err.filename})"
                ) from err
            count += 1
    return count


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, location: str, dest_real: str) -> None:
    """Write one member of :func:`safe_extract`'s archive at ``location`` (checked by the caller)."""
    if member.isdir():
        if os.path.islink(location):
            os.unlink(location)
        os.makedirs(location, exist_ok=True)
    elif member.isfile():
        os.makedirs(os.path.dirname(location), exist_ok=True)
        _remove_existing(location)
        source = tar.extractfile(member)
        assert source is not None  # regular members always have data
        with source, open(location, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
        os.chmod(location, (member.mode & 0o755) | 0o600)
        os.utime(location, (member.mtime, member.mtime))
    elif member.issym():
        # Copied, never created: a link's target was judged when it was made, and a later member
        # (a link to ".", a folder replacing a link) could change what a chain of links resolves
        # to without being checked again. A copy of a file already extracted cannot change.
        link = member.linkname
        if not link or os.path.isabs(link) or re.match(r"^[A-Za-z]:", link):
            raise UnsafeArchiveError(
                f"archive member {member.name!r} is a link to an absolute path {link!r}"
            )
        target = os.path.realpath(os.path.join(os.path.dirname(location), link))
        if not _within(target, dest_real) or not os.path.isfile(target):
            raise UnsafeArchiveError(
                f"archive member {member.name!r} is a link to {link!r}, which is not a file extracted "
                "inside the target folder before it"
            )
        if target == location:  # a link to itself (as GNU tar may write): the file is already there
            return
        os.makedirs(os.path.dirname(location), exist_ok=True)
        if os.path.isdir(location) and not os.path.islink(location):
            raise UnsafeArchiveError(f"archive member {member.name!r} is a link replacing a folder")
        _remove_existing(location)
        shutil.copyfile(target, location)
    elif member.islnk():
        # Hard link names are relative to the archive root and refer to a member already extracted.
        try:
            source_location = _checked_location(dest_real, member.linkname)
        except UnsafeArchiveError as err:
            raise UnsafeArchiveError(f"archive member {member.name!r} is a hard link: {err}") from err
        source_real = os.path.realpath(source_location)
        if not _within(source_real, dest_real) or not os.path.isfile(source_real):
            raise UnsafeArchiveError(
                f"archive member {member.name!r} is a hard link to {member.linkname!r}, "
                "which is not a file extracted inside the target folder"
            )
        if source_real == location:  # GNU tar's record of a file named twice (`tar cf t.tar d d/a`)
            return
        os.makedirs(os.path.dirname(location), exist_ok=True)
        _remove_existing(location)
        shutil.copyfile(source_real, location)
    else:
        kind = (
            "device file"
            if (member.ischr() or member.isblk())
            else "FIFO"
            if member.isfifo()
            else "special member"
        )
        raise UnsafeArchiveError(
            f"archive member {member.name!r} is a {kind}; refusing to extract it"
        )


# --------------------------------------------------------------------------- reading the corpus


def find_subset_dir(root: str | Path, subset: str) -> Path:
    """The folder of ``subset``: ``<root>/LibriSpeech/<subset>`` or ``<root>/<subset>``.

    Raises:
        FileNotFoundError: neither exists (the message names both places).
    """
    root = Path(root)
    candidates = [root / "LibriSpeech" / subset, root / subset]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"LibriSpeech subset {subset!r} not found: looked for {candidates[0]} and {candidates[1]}"
    )


def read_librispeech_folder(
    root: str | Path,
    subset: str,
    *,
    manifest_dir: str | Path | None = None,
    rejected: list[dict] | None = None,
) -> Iterator[dict]:
    """Yield manifest rows for one extracted subset, in sorted speaker/chapter/utterance order.

    Layout: ``<root>/LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`` with one
    ``<speaker>-<chapter>-<n> TEXT`` line per ``<speaker>-<chapter>-<n>.flac`` beside it; ``root`` may
    also be the folder that holds the subset folders directly.

    Args:
        root: corpus root (see above).
        subset: e.g. ``"dev-clean"``.
        manifest_dir: rows' ``audio`` is made relative to this folder, unless ``root`` is absolute (then,
            as without a ``manifest_dir``, the path is absolute: a relative one would climb from wherever
            the manifest was written, and break when the corpus folder is copied or pulled elsewhere).
        rejected: when a list is given, utterances with missing or unreadable audio, empty text, a
            malformed id, or a FLAC file that no transcript line names are appended to it as
            ``{id, audio, reason}`` and skipped; when None they raise :class:`LibriSpeechError`. Each
            lost utterance is listed once (see :func:`rejected_utterances` for the count): a line whose id
            names no FLAC file of its chapter and a FLAC file no line names (a mistyped id) are one entry
            naming both; a second line for an id is listed too, though it loses no utterance of its own.

    Yields:
        ``{id, speaker, text, audio, duration}`` rows (duration in seconds, from the FLAC header, or by
        decoding the file where the header does not give its length).

    Raises:
        FileNotFoundError: the subset folder does not exist.
        LibriSpeechError: the folder holds no transcripts, or a bad utterance when ``rejected`` is None.
    """
    subset_dir = find_subset_dir(root, subset)
    base = os.path.abspath(manifest_dir) if manifest_dir is not None and not Path(root).is_absolute() else None

    def reject(utt_id: str, audio: Path, reason: str) -> None:
        if rejected is None:
            raise LibriSpeechError(f"{subset} utterance {utt_id} ({audio}): {reason}")
        rejected.append({"id": utt_id, "audio": str(audio), "reason": reason})

    n_transcripts = 0
    for speaker_dir in sorted(p for p in subset_dir.iterdir() if p.is_dir()):
        for chapter_dir in sorted(p for p in speaker_dir.iterdir() if p.is_dir()):
            trans = chapter_dir / f"{speaker_dir.name}-{chapter_dir.name}.trans.txt"
            if not trans.is_file():
                for flac in sorted(chapter_dir.glob("*.flac")):
                    reject(flac.stem, flac, f"no transcript file {trans.name}")
                continue
            n_transcripts += 1
            fate: dict[str, str | None] = {}  # id -> why its first line was rejected; None: the line is kept
            stray: dict[str, list] = {}  # id -> [audio, why] of lines whose id names no FLAC file here
            for lineno, raw in enumerate(trans.read_bytes().splitlines(), 1):
                if lineno == 1:  # a UTF-8 BOM (Windows editors) would be part of the first id, unseen
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                try:  # line by line: one bad byte costs its utterance, not the stage
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    utt_id, text, reason = raw.split(None, 1)[0].decode("ascii", "replace"), "", (
                        f"transcript line in {trans.name} is not UTF-8 text")
                else:
                    words = line.split(None, 1)  # any white space after the id: a tab, a no-break space
                    if not words:
                        continue
                    utt_id, text = words[0], words[1].strip() if len(words) > 1 else ""
                    reason = None
                audio = chapter_dir / f"{utt_id}.flac"
                if utt_id in stray:  # a line already waiting below; a second one loses nothing more
                    stray[utt_id][1] += f"; listed again on line {lineno}"
                    continue
                if utt_id in fate:  # the first line decided; this one is listed, its utterance not counted again
                    first = ("its first line is kept" if fate[utt_id] is None
                             else f"its first line was rejected: {fate[utt_id]}")
                    reject(utt_id, audio, f"listed twice in {trans.name} ({first})")
                    continue
                if reason is None:
                    match = _UTTERANCE_ID.match(utt_id)
                    if not match or match.group(1) != speaker_dir.name or match.group(2) != chapter_dir.name:
                        reason = f"utterance id does not match its folder {speaker_dir.name}/{chapter_dir.name}"
                    elif not text:
                        reason = "empty transcript"
                    elif not normalise_transcript(text):  # punctuation or symbols alone: no word to train on
                        reason = f"transcript has no words ({text[:40]!r})"
                    elif not audio.is_file():
                        reason = "audio file missing"
                if reason is None:
                    try:
                        info = sf.info(str(audio))
                        # a FLAC streamed to a pipe leaves its length out: decoded to measure it
                        frames = count_frames(audio) if length_unknown(info.frames) else info.frames
                    except Exception as err:  # libsndfile raises several types for corrupt data
                        reason = f"unreadable audio ({err})"
                    else:
                        reason = "audio holds no samples" if frames <= 0 else None
                fate[utt_id] = reason
                if reason is None:
                    path = os.path.abspath(audio)
                    yield {
                        "id": utt_id,
                        "speaker": speaker_dir.name,
                        "text": text,
                        "audio": os.path.relpath(path, base) if base is not None else path,
                        "duration": round(frames / info.samplerate, 4),
                    }
                elif audio.is_file():
                    reject(utt_id, audio, reason)
                else:  # listed with the FLAC files no line names, below: one of each may be one utterance
                    stray[utt_id] = [audio, reason]
            # A clip its transcript does not name has no text to train on; listing it keeps a truncated
            # or mismatched transcript from shrinking the corpus unnoticed.
            orphans = [flac for flac in sorted(chapter_dir.glob("*.flac")) if flac.stem not in fate]
            _reject_unmatched(orphans, [(i, a, r) for i, (a, r) in stray.items()], trans.name, reject)
    if n_transcripts == 0:
        raise LibriSpeechError(
            f"{subset_dir} holds no <speaker>/<chapter>/<speaker>-<chapter>.trans.txt files: not a LibriSpeech subset folder"
        )


def _reject_unmatched(orphans: list[Path], stray: list[tuple[str, Path, str]], trans_name: str,
                      reject: Callable[[str, Path, str], None]) -> None:
    """List a chapter's FLAC files that no line names and its lines that name no FLAC file, as one
    entry per lost utterance: a line with a mistyped id and the FLAC file it meant are one utterance,
    not two (which would count twice against the rejection limit). So the longer of the two lists gets
    an entry each, and each of its entries names the shorter list's items."""
    if len(orphans) >= len(stray):
        note = "; ".join(f"{utt_id!r}: {reason}" for utt_id, _, reason in stray)
        for flac in orphans:
            reject(flac.stem, flac, f"no line in transcript {trans_name}"
                   + (f" (a mistyped id? lines there name no FLAC file here: {note})" if note else ""))
    else:
        note = ", ".join(flac.name for flac in orphans)
        for utt_id, audio, reason in stray:
            reject(utt_id, audio, reason + (f" (a mistyped id? no line names {note})" if note else ""))


def rejected_utterances(rejected: list[dict], kept_ids: set[str]) -> int:
    """How many utterances a list :func:`read_librispeech_folder` filled stands for: its distinct ids
    less those kept in the manifest (a second transcript line for an id is listed, not lost)."""
    return len({r["id"] for r in rejected} - kept_ids)


# --------------------------------------------------------------------------- preparation


def _warn_if_incomplete(subset: str, folder: Path, kept: int, lost: int) -> None:
    """Warn when a subset found already extracted holds fewer utterances than the official one: a hand
    extraction (``tar xzf``) that died part-way drops whole chapters, and nothing else would say so. Not
    an error: a subset may be pruned on purpose. One this module extracted came whole from a checked
    archive."""
    expected = LIBRISPEECH_UTTERANCES[subset]
    if kept + lost < expected:
        logger.warning(
            "LibriSpeech %s at %s holds %d utterances (%d in the manifest, %d rejected), the official subset has "
            "%d: an extraction that stopped part-way? The missing ones are in no manifest and no rejected.jsonl. "
            "Unless it was pruned on purpose, delete %s and rerun to extract it again from the checked archive "
            "(%s.tar.gz under the corpus root, downloaded again where librispeech_download is on)",
            subset, folder, kept + lost, kept, lost, expected, folder, subset,
        )


def _install_subset(archive: Path, root: Path, subset: str, progress: bool) -> Path:
    """Extract ``archive`` into a staging folder, then move ``LibriSpeech/<subset>`` into place.

    The subset folder only appears once it is complete, so an interrupted extraction is redone
    rather than mistaken for a finished one.
    """
    staging = root / f".extract-{subset}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        safe_extract(archive, staging, progress=progress)
        extracted = staging / "LibriSpeech" / subset
        if not extracted.is_dir():
            raise LibriSpeechError(f"{archive} does not hold LibriSpeech/{subset}/ (wrong archive?)")
        target = root / "LibriSpeech" / subset
        target.parent.mkdir(parents=True, exist_ok=True)
        # The corpus-wide files (SPEAKERS.TXT, CHAPTERS.TXT, LICENSE.TXT, ...) come with every archive.
        for item in (staging / "LibriSpeech").iterdir():
            if item.is_file() and not (target.parent / item.name).exists():
                shutil.move(str(item), str(target.parent / item.name))
        os.replace(extracted, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def prepare_librispeech(
    root: Path,
    out_dir: Path,
    subsets: list[str],
    download: bool,
    base_url: str = LIBRISPEECH_BASE_URL,
    *,
    keep_archives: bool = True,
    max_rejected_fraction: float = 0.01,
    chunk_size: int = 1 << 20,
    progress: bool = True,
    opener: urllib.request.OpenerDirector | None = None,
) -> dict[str, int]:
    """Make LibriSpeech subsets available under ``root`` and write their manifests.

    For each subset: an extracted folder under ``root`` (``LibriSpeech/<subset>`` or ``<subset>``)
    is used as it is (a WARNING is logged when it holds fewer utterances than the official subset: an
    extraction that stopped part-way loses whole chapters); otherwise ``<root>/<subset>.tar.gz`` is verified and extracted if present, or,
    with ``download``, fetched from ``base_url`` first. Then ``<out_dir>/<split>/manifest.jsonl`` is
    written per split (train-* -> ``train``, concatenated; dev-clean -> ``dev``; test-clean -> ``test``;
    dev-other -> ``dev_other``; test-other -> ``test_other``), with the FLAC files left where they
    are (``audio`` absolute when ``root`` is, else relative to the manifest), and
    ``<out_dir>/<split>/rejected.jsonl`` lists skipped utterances with the reason.

    Args:
        root: folder holding (or receiving) the archives and the extracted corpus.
        out_dir: folder receiving one sub-folder per split.
        subsets: LibriSpeech subset names, e.g. ``["train-clean-100", "dev-clean", "test-clean"]``.
        download: fetch missing archives from ``base_url``.
        base_url: mirror of openslr resource 12 (``<base_url>/<subset>.tar.gz``).
        keep_archives: keep the .tar.gz after extraction (else it is deleted).
        max_rejected_fraction: fail when a split rejects more than this fraction of its utterances,
            each counted once (``rejected.jsonl`` is written first, so it lists them all).
        chunk_size: download read size in bytes.
        progress: show tqdm progress bars.
        opener: urllib opener for the downloads.

    Returns:
        Number of manifest rows per split written.

    Raises:
        ValueError: unknown or no subsets, or ``max_rejected_fraction`` outside [0, 1].
        FileNotFoundError: a subset is neither extracted nor archived under ``root`` and ``download`` is off.
        DownloadError / ChecksumError / UnsafeArchiveError: from fetching and extracting.
        LibriSpeechError: too many rejected utterances or an empty split (the message names the
            split's ``rejected.jsonl``), or duplicate ids.
    """
    root, out_dir = Path(root), Path(out_dir)
    if not subsets:
        raise ValueError("no LibriSpeech subsets requested")
    unknown = [s for s in subsets if s not in LIBRISPEECH_MD5]
    if unknown:
        raise ValueError(f"unknown LibriSpeech subsets {unknown}; known: {sorted(LIBRISPEECH_MD5)}")
    # Checked before any download, which can take hours; NaN fails the comparison too.
    if not 0.0 <= max_rejected_fraction <= 1.0:
        raise ValueError(f"max_rejected_fraction must lie in [0, 1], got {max_rejected_fraction}")
    # Canonical order, so that the concatenated training manifest does not depend on the list order.
    wanted = [s for s in LIBRISPEECH_MD5 if s in set(subsets)]

    found: dict[str, Path] = {}  # subsets already extracted (by hand, or by an earlier run)
    for subset in wanted:
        try:
            found[subset] = find_subset_dir(root, subset)
            continue
        except FileNotFoundError:
            pass
        archive = root / f"{subset}.tar.gz"
        if not archive.exists():
            if not download:
                raise FileNotFoundError(
                    f"LibriSpeech subset {subset!r} is not under {root} (neither {root / 'LibriSpeech' / subset} "
                    f"nor {root / subset} nor {archive}); enable downloading or extract the official archive there"
                )
            url = f"{base_url.rstrip('/')}/{subset}.tar.gz"
            download_archive(
                url, archive, LIBRISPEECH_MD5[subset], chunk_size=chunk_size, progress=progress, opener=opener
            )
        else:
            actual = md5sum(archive)
            if actual != LIBRISPEECH_MD5[subset]:
                raise ChecksumError(
                    f"{archive}: MD5 is {actual}, expected {LIBRISPEECH_MD5[subset]}; delete it to download it again"
                )
        _install_subset(archive, root, subset, progress)
        if not keep_archives:
            archive.unlink()

    counts: dict[str, int] = {}
    for split in dict.fromkeys(SUBSET_SPLITS[s] for s in wanted):
        split_dir = out_dir / split
        rejected: list[dict] = []
        rows: list[dict] = []
        seen: set[str] = set()
        for subset in (s for s in wanted if SUBSET_SPLITS[s] == split):
            rows_before, rejected_before = len(rows), len(rejected)
            utterances = read_librispeech_folder(root, subset, manifest_dir=split_dir, rejected=rejected)
            for row in progress_bar(utterances, desc=f"{subset} -> {split}", unit="utt", disable=not progress):
                if row["id"] in seen:
                    raise LibriSpeechError(f"utterance id {row['id']} occurs twice in split {split!r}")
                seen.add(row["id"])
                rows.append(row)
            if subset in found:
                kept = len(rows) - rows_before
                _warn_if_incomplete(subset, found[subset], kept, rejected_utterances(rejected[rejected_before:], seen))
        # The listing is written before the checks below, so that a split they stop still shows every
        # rejected utterance and why, not only the few an error message can name.
        listing = split_dir / "rejected.jsonl"
        split_dir.mkdir(parents=True, exist_ok=True)
        with open(listing, "w", encoding="utf-8") as f:
            for item in rejected:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        lost = rejected_utterances(rejected, seen)  # an utterance counts once, however many lines list it
        total = len(rows) + lost
        if not rows:
            raise LibriSpeechError(
                f"split {split!r} has no usable utterances ({lost} rejected, listed in {listing})"
            )
        if lost > max_rejected_fraction * total:
            examples = "; ".join(f"{r['id']}: {r['reason']}" for r in rejected[:5])
            raise LibriSpeechError(
                f"split {split!r}: {lost} of {total} utterances rejected "
                f"({lost / total:.1%}), more than max_rejected_fraction={max_rejected_fraction:.1%}; first: {examples}; "
                f"all {len(rejected)} listed in {listing}"
            )
        counts[split] = write_manifest(rows, split_dir / "manifest.jsonl")
    return counts
