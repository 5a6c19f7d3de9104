"""LibriSpeech source: download (resume, checksum), safe extraction and manifests, all offline.

Fake LibriSpeech trees and archives are built here (a few short FLAC files); downloads are served
from ``file://`` URLs or a local HTTP server on 127.0.0.1 that honours ``Range``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from meld.corpus import librispeech as ls
from meld.corpus import read_manifest

SR = 16_000


def _make_subset(base: Path, subset: str, seed: int = 0) -> dict[str, dict]:
    """Write ``<base>/<subset>/<spk>/<ch>/`` with FLAC files and transcripts; returns rows by id.

    Two speakers (ids ``19``/``26`` plus 100 * seed, so subsets do not share ids), three chapters,
    two utterances per chapter.
    """
    rng = np.random.default_rng(seed)
    speakers = {str(19 + 100 * seed): ["198"], str(26 + 100 * seed): ["495", "496"]}
    expected = {}
    for speaker, chapters in speakers.items():
        for chapter in chapters:
            folder = base / subset / speaker / chapter
            folder.mkdir(parents=True)
            lines = []
            for n in range(2):
                utt = f"{speaker}-{chapter}-{n:04d}"
                samples = int(SR * rng.uniform(0.1, 0.3))
                t = np.arange(samples) / SR
                wav = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.01 * rng.standard_normal(
                    samples
                )
                sf.write(folder / f"{utt}.flac", wav.astype(np.float32), SR, format="FLAC")
                text = f"WORD{n} FROM SPEAKER {speaker} IN {subset.upper()}"
                lines.append(f"{utt} {text}")
                expected[utt] = {
                    "speaker": speaker,
                    "text": text,
                    "duration": samples / SR,
                    "path": folder / f"{utt}.flac",
                }
            (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return expected


def _make_archive(tmp: Path, subset: str, seed: int = 0) -> tuple[Path, str]:
    """An official-looking ``<subset>.tar.gz`` (``LibriSpeech/<subset>/...`` + SPEAKERS.TXT); (path, md5)."""
    build = tmp / f"build-{subset}"
    _make_subset(build / "LibriSpeech", subset, seed)
    (build / "LibriSpeech" / "SPEAKERS.TXT").write_text("; fake speakers\n")
    archive = tmp / "mirror" / f"{subset}.tar.gz"
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(build / "LibriSpeech", arcname="LibriSpeech")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


class _NoNetwork:
    """Opener that fails the test if anything tries to download."""

    def open(self, *args, **kwargs):
        raise AssertionError("network access attempted")


# --------------------------------------------------------------------------- local HTTP server


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        srv = self.server
        data = srv.files.get(self.path)
        srv.ranges.append(self.headers.get("Range"))
        if data is None:
            self.send_error(404)
            return
        start, status = 0, 200
        match = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        if match and srv.honour_range:
            start, status = int(match.group(1)), 206
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        if srv.window and status == 206:  # a server that answers a range in windows of this many bytes
            body = body[: srv.window]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        self.end_headers()
        if srv.truncate_next:
            # Announce the whole body, send a third, drop the connection (HTTP/1.0 closes it).
            srv.truncate_next = False
            self.wfile.write(body[: len(body) // 3])
            return
        self.wfile.write(body)


@pytest.fixture
def http_server():
    """A 127.0.0.1 server for ``server.files`` (path -> bytes); shut down after the test."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.files, server.ranges = {}, []
    server.honour_range, server.truncate_next, server.window = True, False, 0
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


PAYLOAD = np.random.default_rng(1).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


# --------------------------------------------------------------------------- download


def test_md5_table_is_complete():
    assert set(ls.LIBRISPEECH_MD5) == set(ls.SUBSET_SPLITS)
    assert all(re.fullmatch(r"[0-9a-f]{32}", v) for v in ls.LIBRISPEECH_MD5.values())
    assert len(set(ls.LIBRISPEECH_MD5.values())) == 7


def test_resume_partial_download_with_range(http_server, tmp_path):
    http_server.files["/a.tar.gz"] = PAYLOAD
    dest = tmp_path / "a.tar.gz"
    (tmp_path / "a.tar.gz.part").write_bytes(PAYLOAD[:100_000])
    out = ls.download_archive(
        f"{http_server.url}/a.tar.gz", dest, PAYLOAD_MD5, chunk_size=16_384, progress=False
    )
    assert out == dest and dest.read_bytes() == PAYLOAD
    assert http_server.ranges == ["bytes=100000-"]
    assert not (tmp_path / "a.tar.gz.part").exists()
    # A second call finds the verified file and does not download again.
    ls.download_archive(f"{http_server.url}/a.tar.gz", dest, PAYLOAD_MD5, progress=False)
    assert len(http_server.ranges) == 1


def test_interrupted_transfer_is_resumed(http_server, tmp_path):
    http_server.files["/a.tar.gz"] = PAYLOAD
    http_server.truncate_next = True
    dest = tmp_path / "a.tar.gz"
    ls.download_archive(f"{http_server.url}/a.tar.gz", dest, PAYLOAD_MD5, chunk_size=8192, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert http_server.ranges[0] is None and http_server.ranges[1] == f"bytes={len(PAYLOAD) // 3}-"


def test_a_range_answered_in_windows_is_resumed_not_deleted(http_server, tmp_path):
    """A 206 carrying less than the rest of the file (Content-Range's end below its total) used to end
    the download: the checksum failed and a partial file that was right so far was deleted."""
    http_server.files["/a.tar.gz"] = PAYLOAD
    http_server.window = 50_000
    dest = tmp_path / "a.tar.gz"
    (tmp_path / "a.tar.gz.part").write_bytes(PAYLOAD[:200_000])
    ls.download_archive(f"{http_server.url}/a.tar.gz", dest, PAYLOAD_MD5, chunk_size=16_384, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert http_server.ranges == ["bytes=200000-", "bytes=250000-"]


def test_interrupted_without_retries_keeps_partial(http_server, tmp_path):
    http_server.files["/a.tar.gz"] = PAYLOAD
    http_server.truncate_next = True
    dest = tmp_path / "a.tar.gz"
    with pytest.raises(ls.DownloadError, match="resume"):
        ls.download_archive(f"{http_server.url}/a.tar.gz", dest, PAYLOAD_MD5, retries=0, progress=False)
    assert (tmp_path / "a.tar.gz.part").stat().st_size == len(PAYLOAD) // 3
    ls.download_archive(f"{http_server.url}/a.tar.gz", dest, PAYLOAD_MD5, retries=0, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts(http_server, tmp_path):
    http_server.files["/a.tar.gz"] = PAYLOAD
    http_server.honour_range = False
    dest = tmp_path / "a.tar.gz"
    (tmp_path / "a.tar.gz.part").write_bytes(b"x" * 5000)  # would corrupt the file if appended to
    ls.download_archive(f"{http_server.url}/a.tar.gz", dest, PAYLOAD_MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert http_server.ranges == ["bytes=5000-"]  # it asked to resume, got the whole file, kept that


def test_complete_partial_file_416(http_server, tmp_path):
    http_server.files["/a.tar.gz"] = PAYLOAD
    dest = tmp_path / "a.tar.gz"
    (tmp_path / "a.tar.gz.part").write_bytes(PAYLOAD)
    ls.download_archive(f"{http_server.url}/a.tar.gz", dest, PAYLOAD_MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert http_server.ranges == [f"bytes={len(PAYLOAD)}-"]  # one request, answered 416: nothing re-sent


def test_corrupt_partial_fails_checksum_and_is_removed(http_server, tmp_path):
    http_server.files["/a.tar.gz"] = PAYLOAD
    dest = tmp_path / "a.tar.gz"
    part = tmp_path / "a.tar.gz.part"
    part.write_bytes(b"\0" * 1000)
    with pytest.raises(ls.ChecksumError, match=f"expected {PAYLOAD_MD5}"):
        ls.download_archive(f"{http_server.url}/a.tar.gz", dest, PAYLOAD_MD5, progress=False)
    assert not dest.exists() and not part.exists()


def test_http_error_is_clear(http_server, tmp_path):
    with pytest.raises(ls.DownloadError, match="HTTP 404"):
        ls.download_archive(
            f"{http_server.url}/missing.tar.gz", tmp_path / "m.tar.gz", PAYLOAD_MD5, progress=False
        )


def test_bad_checksum_rejected_file_url(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    dest = tmp_path / "dl" / "a.tar.gz"
    wrong = "0" * 32
    with pytest.raises(
        ls.ChecksumError, match=f"MD5 of the downloaded file is {PAYLOAD_MD5}, expected {wrong}"
    ):
        ls.download_archive(src.as_uri(), dest, wrong, progress=False)
    assert not dest.exists() and not dest.with_name("a.tar.gz.part").exists()
    # The right sum works over file:// as well.
    ls.download_archive(src.as_uri(), dest, PAYLOAD_MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_existing_file_with_wrong_checksum_is_left_alone(tmp_path):
    dest = tmp_path / "a.tar.gz"
    dest.write_bytes(b"not the archive")
    with pytest.raises(ls.ChecksumError, match="delete it"):
        ls.download_archive(
            "http://127.0.0.1:9/a.tar.gz", dest, PAYLOAD_MD5, opener=_NoNetwork(), progress=False
        )
    assert dest.read_bytes() == b"not the archive"


# --------------------------------------------------------------------------- safe extraction


def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _file(name: str, data: bytes = b"payload") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _device(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info, None


def _evil_members(outside: Path) -> dict[str, tuple[str, list]]:
    """case -> (offending member name, members)."""
    absolute = str(outside / "abs.txt")
    return {
        "dotdot": ("../evil.txt", [_file("ok.txt"), _file("../evil.txt")]),
        "nested_dotdot": ("a/../../evil.txt", [_file("a/../../evil.txt")]),
        "absolute": (absolute, [_file(absolute)]),
        "symlink_escape": ("esc", [_link("esc", "../outside"), _file("esc/evil.txt")]),
        "symlink_absolute": ("esc", [_link("esc", str(outside)), _file("esc/evil.txt")]),
        "hardlink_escape": ("hard", [_link("hard", "../outside/secret.txt", tarfile.LNKTYPE)]),
        "device": ("dev/null", [_device("dev/null")]),
    }


@pytest.mark.parametrize(
    "case",
    [
        "dotdot",
        "nested_dotdot",
        "absolute",
        "symlink_escape",
        "symlink_absolute",
        "hardlink_escape",
        "device",
    ],
)
def test_malicious_member_is_rejected(tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    dest = tmp_path / "dest"
    name, members = _evil_members(outside)[case]
    archive = _tar_with(tmp_path / "evil.tar.gz", members)
    with pytest.raises(ls.UnsafeArchiveError, match=re.escape(repr(name))):
        ls.safe_extract(archive, dest)
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert not (tmp_path / "evil.txt").exists()
    assert not any(p.is_symlink() for p in dest.rglob("*"))


def test_member_through_existing_outside_link_is_rejected(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)  # planted before extraction
    archive = _tar_with(tmp_path / "a.tar.gz", [_file("sub/evil.txt")])
    with pytest.raises(ls.UnsafeArchiveError, match="'sub/evil.txt'"):
        ls.safe_extract(archive, dest)
    assert list(outside.iterdir()) == []


def test_internal_links_become_copies_of_the_file_they_name(tmp_path):
    archive = _tar_with(
        tmp_path / "a.tar.gz",
        [
            _file("b/file.txt", b"hello"),
            _link("a/link.txt", "../b/file.txt"),
            _link("a/hard.txt", "b/file.txt", tarfile.LNKTYPE),
        ],
    )
    dest = tmp_path / "dest"
    assert ls.safe_extract(archive, dest) == 3
    for name in ("link.txt", "hard.txt"):
        assert not (dest / "a" / name).is_symlink() and (dest / "a" / name).read_text() == "hello"


@pytest.mark.parametrize("chain", ["dot", "folder"])
def test_a_chain_of_links_redirected_by_a_later_member_cannot_reach_outside(tmp_path, chain):
    """A link was judged once, when made: with its path's parts not there yet it resolved inside, and a
    later member (a link to ".", a folder where a link was) then sent it outside. No link is made now."""
    members = {"dot": [_link("x/c", "d/../../.."), _link("x/d", ".")],
               "folder": [_link("x/y", "z/w"), _link("x/c", "y/../.."), ("dir", "x/y")]}[chain]
    built = []
    for m in members:
        if m == ("dir", "x/y"):
            info = tarfile.TarInfo("x/y")
            info.type = tarfile.DIRTYPE
            built.append((info, None))
        else:
            built.append(m)
    archive = _tar_with(tmp_path / "a.tar.gz", built)
    with pytest.raises(ls.UnsafeArchiveError, match="not a file extracted inside the target folder before it"):
        ls.safe_extract(archive, tmp_path / "dest")
    assert not any(p.is_symlink() for p in (tmp_path / "dest").rglob("*"))


# --------------------------------------------------------------------------- reading and preparing


@pytest.mark.parametrize("direct", [False, True])
def test_read_librispeech_folder(tmp_path, direct):
    expected = _make_subset(tmp_path / "LibriSpeech", "dev-clean")
    root = tmp_path / "LibriSpeech" if direct else tmp_path
    rows = list(ls.read_librispeech_folder(root, "dev-clean"))
    assert [r["id"] for r in rows] == sorted(expected)
    for row in rows:
        want = expected[row["id"]]
        assert set(row) == {"id", "speaker", "text", "audio", "duration"}
        assert row["speaker"] == want["speaker"] and row["text"] == want["text"]
        assert Path(row["audio"]) == want["path"].absolute()
        assert row["duration"] == pytest.approx(want["duration"], abs=1e-3)


def test_prepare_from_extracted_folder(tmp_path):
    root = tmp_path / "raw"
    expected = {}
    for i, subset in enumerate(["train-clean-360", "train-clean-100", "dev-clean", "test-other"]):
        expected[subset] = _make_subset(root / "LibriSpeech", subset, seed=i)
    out = tmp_path / "corpus"
    counts = ls.prepare_librispeech(
        root,
        out,
        ["train-clean-360", "train-clean-100", "dev-clean", "test-other"],
        download=True,  # present folders are used as they are: no download happens
        opener=_NoNetwork(),
        progress=False,
    )
    assert counts == {"train": 12, "dev": 6, "test_other": 6}
    assert sorted(p.name for p in out.iterdir()) == ["dev", "test_other", "train"]
    train = read_manifest(out / "train" / "manifest.jsonl")
    # train-clean-100 comes first whatever the order asked for
    assert [r["audio"].split("/")[-4] for r in train] == ["train-clean-100"] * 6 + ["train-clean-360"] * 6
    for split, subsets in {
        "train": ["train-clean-100", "train-clean-360"],
        "test_other": ["test-other"],
    }.items():
        for row in read_manifest(out / split / "manifest.jsonl"):
            want = next(e[row["id"]] for s, e in expected.items() if s in subsets and row["id"] in e)
            assert Path(row["audio"]) == want["path"].absolute()  # an absolute root: absolute paths
            assert Path(row["audio_path"]) == want["path"].resolve()
            assert row["text"] == want["text"] and row["speaker"] == want["speaker"]
            assert row["duration"] == pytest.approx(want["duration"], abs=1e-3)
    assert (out / "dev" / "rejected.jsonl").read_text() == ""

    # root pointing straight at the folder that holds the subsets
    counts = ls.prepare_librispeech(
        root / "LibriSpeech", tmp_path / "c2", ["dev-clean"], download=False, progress=False
    )
    assert counts == {"dev": 6}


def test_prepare_downloads_verifies_and_extracts(tmp_path, monkeypatch, caplog):
    for i, subset in enumerate(["dev-clean", "test-clean"]):
        archive, md5 = _make_archive(tmp_path, subset, seed=i)
        monkeypatch.setitem(ls.LIBRISPEECH_MD5, subset, md5)
    root, out = tmp_path / "raw", tmp_path / "corpus"
    mirror = (tmp_path / "mirror").as_uri()
    with caplog.at_level("WARNING", logger="meld.corpus.librispeech"):
        counts = ls.prepare_librispeech(
            root, out, ["dev-clean", "test-clean"], download=True, base_url=mirror, progress=False
        )
    assert counts == {"dev": 6, "test": 6}
    assert caplog.records == []  # extracted here from a checked archive: whole, not compared with the count
    assert (root / "LibriSpeech" / "dev-clean" / "19" / "198" / "19-198.trans.txt").is_file()
    assert (root / "LibriSpeech" / "SPEAKERS.TXT").is_file()
    assert (root / "dev-clean.tar.gz").is_file()
    assert not list(root.glob(".extract-*")) and not list(root.glob("*.part"))
    rows = read_manifest(out / "test" / "manifest.jsonl")
    assert all(Path(r["audio_path"]).is_file() for r in rows)
    assert {r["speaker"] for r in rows} == {"119", "126"}  # test-clean was built with seed 1

    # Once extracted, the mirror is no longer needed.
    for f in (tmp_path / "mirror").iterdir():
        f.unlink()
    assert ls.prepare_librispeech(
        root, out, ["dev-clean"], download=True, base_url=mirror, progress=False
    ) == {"dev": 6}


def test_prepare_rejects_bad_checksum(tmp_path, monkeypatch):
    _make_archive(tmp_path, "dev-clean")
    monkeypatch.setitem(ls.LIBRISPEECH_MD5, "dev-clean", "f" * 32)
    root = tmp_path / "raw"
    with pytest.raises(ls.ChecksumError, match="expected f{32}"):
        ls.prepare_librispeech(
            root,
            tmp_path / "corpus",
            ["dev-clean"],
            download=True,
            base_url=(tmp_path / "mirror").as_uri(),
            progress=False,
        )
    assert not (root / "LibriSpeech").exists() and not (tmp_path / "corpus").exists()
    assert not (root / "dev-clean.tar.gz").exists() and not (root / "dev-clean.tar.gz.part").exists()


def test_prepare_malicious_archive_leaves_nothing(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "raw"
    root.mkdir()
    archive = _tar_with(
        root / "dev-clean.tar.gz", [_file("LibriSpeech/dev-clean/x.txt"), _file("../../outside/evil.txt")]
    )
    monkeypatch.setitem(ls.LIBRISPEECH_MD5, "dev-clean", hashlib.md5(archive.read_bytes()).hexdigest())
    with pytest.raises(ls.UnsafeArchiveError, match="../../outside/evil.txt"):
        ls.prepare_librispeech(root, tmp_path / "corpus", ["dev-clean"], download=False, progress=False)
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in root.iterdir()) == ["dev-clean.tar.gz"]


def test_prepare_missing_subset_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="'dev-other'.*enable downloading"):
        ls.prepare_librispeech(tmp_path, tmp_path / "corpus", ["dev-other"], download=False, progress=False)
    with pytest.raises(ValueError, match="unknown LibriSpeech subsets"):
        ls.prepare_librispeech(tmp_path, tmp_path / "corpus", ["dev-cleam"], download=False, progress=False)
    with pytest.raises(FileNotFoundError, match="dev-clean"):
        list(ls.read_librispeech_folder(tmp_path, "dev-clean"))


def test_bad_utterances_are_listed_and_bounded(tmp_path):
    expected = _make_subset(tmp_path / "LibriSpeech", "dev-clean")
    broken = sorted(expected)[1]
    expected[broken]["path"].write_bytes(b"not a flac file")
    counts = ls.prepare_librispeech(
        tmp_path,
        tmp_path / "corpus",
        ["dev-clean"],
        download=False,
        max_rejected_fraction=0.5,
        progress=False,
    )
    assert counts == {"dev": 5}
    rejected = [
        json.loads(line) for line in (tmp_path / "corpus" / "dev" / "rejected.jsonl").read_text().splitlines()
    ]
    assert [r["id"] for r in rejected] == [broken] and "unreadable audio" in rejected[0]["reason"]
    with pytest.raises(ls.LibriSpeechError, match="1 of 6 utterances rejected"):
        ls.prepare_librispeech(tmp_path, tmp_path / "c2", ["dev-clean"], download=False, progress=False)


def _read_listing(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_flac_without_transcript_line_is_rejected(tmp_path):
    expected = _make_subset(tmp_path / "LibriSpeech", "dev-clean")
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "26" / "495"
    trans = chapter / "26-495.trans.txt"
    orphan, kept = "26-495-0001", "26-495-0000"
    # The orphan's line goes; a line for a clip that is not there comes in its place: one utterance
    # lost, listed once, under the FLAC file, with the line it may have been meant by.
    trans.write_text(f"{kept} {expected[kept]['text']}\n26-495-0007 NO AUDIO FOR THIS LINE\n")
    # Elsewhere, a line alone whose clip is missing is a lost utterance of its own.
    other = tmp_path / "LibriSpeech" / "dev-clean" / "19" / "198" / "19-198.trans.txt"
    other.write_text(other.read_text() + "19-198-0009 ITS CLIP IS MISSING\n")
    assert ls.prepare_librispeech(tmp_path, tmp_path / "corpus", ["dev-clean"], download=False,
                                  max_rejected_fraction=0.5, progress=False) == {"dev": 5}
    assert orphan not in {r["id"] for r in read_manifest(tmp_path / "corpus" / "dev" / "manifest.jsonl")}
    reasons = {r["id"]: r for r in _read_listing(tmp_path / "corpus" / "dev" / "rejected.jsonl")}
    assert sorted(reasons) == ["19-198-0009", "26-495-0001"]
    assert reasons[orphan]["reason"] == ("no line in transcript 26-495.trans.txt (a mistyped id? lines there "
                                         "name no FLAC file here: '26-495-0007': audio file missing)")
    assert Path(reasons[orphan]["audio"]) == chapter / f"{orphan}.flac"
    assert reasons["19-198-0009"]["reason"] == "audio file missing"
    other.write_text("".join(f"{u} {expected[u]['text']}\n" for u in ("19-198-0000", "19-198-0001")))
    # Without a list to collect them, the orphan stops the reading and is named.
    trans.write_text(f"{kept} {expected[kept]['text']}\n")
    with pytest.raises(ls.LibriSpeechError, match=f"{orphan} .*no line in transcript 26-495.trans.txt"):
        list(ls.read_librispeech_folder(tmp_path, "dev-clean"))


def test_transcript_lines_that_are_not_text_or_repeat_are_rejected_not_fatal(tmp_path):
    """DESIGN §10: a non-UTF-8 line stopped the stage with a bare UnicodeDecodeError, a repeated id with
    "occurs twice", and a line of punctuation alone went into the manifest with no word to train on;
    each is now one listed rejection."""
    expected = _make_subset(tmp_path / "LibriSpeech", "dev-clean")
    speaker = tmp_path / "LibriSpeech" / "dev-clean" / "26"
    bad, dup, punct = "26-495-0000", "26-495-0001", "26-496-0000"
    (speaker / "495" / "26-495.trans.txt").write_bytes(
        f"{bad} CAF".encode() + b"\xe9 AU LAIT\n"  # Latin-1, not UTF-8
        + f"{dup} {expected[dup]['text']}\n{dup} A SECOND LINE FOR THE SAME CLIP\n".encode())
    (speaker / "496" / "26-496.trans.txt").write_text(
        f"{punct} ... ?!\n26-496-0001 {expected['26-496-0001']['text']}\n")
    assert ls.prepare_librispeech(tmp_path, tmp_path / "corpus", ["dev-clean"], download=False,
                                  max_rejected_fraction=0.9, progress=False) == {"dev": len(expected) - 2}
    reasons = {r["id"]: r["reason"] for r in _read_listing(tmp_path / "corpus" / "dev" / "rejected.jsonl")}
    assert reasons[bad] == "transcript line in 26-495.trans.txt is not UTF-8 text"
    assert reasons[punct] == "transcript has no words ('... ?!')"
    assert reasons[dup] == "listed twice in 26-495.trans.txt (its first line is kept)"
    manifest = {r["id"]: r["text"] for r in read_manifest(tmp_path / "corpus" / "dev" / "manifest.jsonl")}
    assert manifest[dup] == expected[dup]["text"] and bad not in manifest and punct not in manifest


def test_rejection_limit_comes_from_the_argument(tmp_path):
    expected = _make_subset(tmp_path / "LibriSpeech", "dev-clean")
    expected[sorted(expected)[1]]["path"].write_bytes(b"not a flac file")  # 1 of 6 rejected: 16.7 %

    def prepare(out: str, fraction: float) -> dict[str, int]:
        return ls.prepare_librispeech(
            tmp_path,
            tmp_path / out,
            ["dev-clean"],
            download=False,
            max_rejected_fraction=fraction,
            progress=False,
        )

    assert prepare("c1", 0.2) == {"dev": 5}
    tripped = r"1 of 6 utterances rejected \(16.7%\), more than max_rejected_fraction=10.0%"
    with pytest.raises(ls.LibriSpeechError, match=tripped):
        prepare("c2", 0.1)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="max_rejected_fraction must lie in"):
            prepare("c3", bad)
    assert not (tmp_path / "c3").exists()


def test_tripped_limit_writes_the_full_listing(tmp_path):
    expected = _make_subset(tmp_path / "LibriSpeech", "dev-clean")
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "19" / "198"
    # Six clips the transcript does not name: more than the five an error message shows.
    orphans = [f"19-198-{n:04d}" for n in range(10, 16)]
    for utt in orphans:
        (chapter / f"{utt}.flac").write_bytes(expected["19-198-0000"]["path"].read_bytes())
    out = tmp_path / "corpus"
    with pytest.raises(ls.LibriSpeechError) as caught:
        ls.prepare_librispeech(tmp_path, out, ["dev-clean"], download=False, progress=False)
    listing = out / "dev" / "rejected.jsonl"
    message = str(caught.value)
    assert "6 of 12 utterances rejected" in message and "max_rejected_fraction=1.0%" in message
    assert f"all 6 listed in {listing}" in message
    rows = _read_listing(listing)
    assert [r["id"] for r in rows] == orphans
    assert all(set(r) == {"id", "audio", "reason"} and Path(r["audio"]).is_file() for r in rows)
    assert not (out / "dev" / "manifest.jsonl").exists()

    # A split with nothing usable names its listing too.
    for want in expected.values():
        want["path"].write_bytes(b"not a flac file")
    empty = f"no usable utterances \\(12 rejected, listed in {re.escape(str(listing))}\\)"
    with pytest.raises(ls.LibriSpeechError, match=empty):
        ls.prepare_librispeech(tmp_path, out, ["dev-clean"], download=False, progress=False)
    assert len(_read_listing(listing)) == 12


def _flac_without_length(path: Path, seconds: float) -> np.ndarray:
    """A 16-bit FLAC whose STREAMINFO gives the total sample count as 0, "unknown", as an encoder
    streaming to a pipe leaves it (``ffmpeg ... -f flac pipe:``); returns its int16 samples."""
    samples = (0.3 * np.sin(np.arange(int(SR * seconds)) * 0.05) * 32767).astype(np.int16)
    sf.write(path, samples, SR, format="FLAC", subtype="PCM_16")
    raw = bytearray(path.read_bytes())
    # "fLaC", a 4-byte block header, then STREAMINFO: the 36-bit count ends its bytes 10..17
    field = int.from_bytes(raw[18:26], "big") & ~((1 << 36) - 1)
    raw[18:26] = field.to_bytes(8, "big")
    path.write_bytes(bytes(raw))
    return samples


def _chapter(base: Path, subset: str, speaker: str, chapter: str, n: int) -> Path:
    """``n`` copies of one short FLAC file in ``<base>/<subset>/<speaker>/<chapter>/``, no transcript."""
    folder = base / subset / speaker / chapter
    folder.mkdir(parents=True)
    sf.write(folder / "clip.flac", np.full(1600, 0.1, np.float32), SR, format="FLAC")
    clip = (folder / "clip.flac").read_bytes()
    (folder / "clip.flac").unlink()
    for i in range(n):
        (folder / f"{speaker}-{chapter}-{i:04d}.flac").write_bytes(clip)
    return folder


# --------------------------------------------------------------------------- review 36d


def test_a_corpus_of_an_absolute_root_reads_from_any_checkout(tmp_path, monkeypatch):
    """An absolute librispeech_root (the paper config's /shared/librispeech) was written into the manifest
    relative to the workspace where the stage ran (../../../shared/...): copied or pulled into a checkout
    at another depth, no audio path led to a file. A root given absolute stays absolute now; a relative
    root stays relative, so that root and corpus can move together."""
    shared = tmp_path / "shared" / "librispeech"
    expected = _make_subset(shared / "LibriSpeech", "dev-clean")
    ran_in = tmp_path / "home" / "alice" / "meld" / "data" / "corpus"
    ls.prepare_librispeech(shared, ran_in, ["dev-clean"], download=False, progress=False)
    pulled = tmp_path / "meld" / "data" / "corpus"  # another checkout, another depth
    shutil.copytree(ran_in, pulled)
    rows = read_manifest(pulled / "dev" / "manifest.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(expected)
    for row in rows:
        assert Path(row["audio_path"]).is_file() and Path(row["audio"]) == expected[row["id"]]["path"]

    monkeypatch.chdir(tmp_path)
    ls.prepare_librispeech(Path("shared/librispeech"), Path("ws/corpus"), ["dev-clean"], download=False,
                           progress=False)
    manifest = tmp_path / "ws" / "corpus" / "dev" / "manifest.jsonl"
    assert str(tmp_path) not in manifest.read_text()  # the bytes do not depend on where the checkout is
    rows = read_manifest(manifest)
    assert all(not os.path.isabs(r["audio"]) and Path(r["audio_path"]).is_file() for r in rows)


def test_a_bom_or_other_white_space_after_the_id_loses_no_line(tmp_path):
    """A transcript saved with a UTF-8 BOM lost its first line ("utterance id does not match its folder",
    with the BOM unseen in the message), and so did a line whose id a tab or a no-break space ends; each
    then counted twice, once more as a FLAC file with "no line in transcript"."""
    folder = _chapter(tmp_path / "LibriSpeech", "dev-clean", "19", "198", 4)
    (folder / "19-198.trans.txt").write_bytes(
        "\ufeff19-198-0000 A LINE AFTER A BOM\n19-198-0001\tA TAB\n19-198-0002\u00a0A NO BREAK SPACE\n"
        "19-198-0003  TWO SPACES \r\n".encode())
    rejected: list[dict] = []
    rows = list(ls.read_librispeech_folder(tmp_path, "dev-clean", rejected=rejected))
    assert rejected == []
    assert [(r["id"], r["text"]) for r in rows] == [
        ("19-198-0000", "A LINE AFTER A BOM"), ("19-198-0001", "A TAB"), ("19-198-0002", "A NO BREAK SPACE"),
        ("19-198-0003", "TWO SPACES")]


def test_one_lost_utterance_counts_once_against_the_limit(tmp_path):
    """A mistyped id ("19-198-000") lost one FLAC file but was counted twice ("audio file missing" and "no
    line in transcript"): 2 of 101 broke the paper's 1 % limit where 1 of 100 meets it. A line that is not
    UTF-8 followed by a corrected one was said to be "listed twice ... (its first line is kept)" though
    nothing was kept, and counted twice too."""
    folder = _chapter(tmp_path / "LibriSpeech", "dev-clean", "19", "198", 100)
    trans = folder / "19-198.trans.txt"
    good = [f"19-198-{i:04d} WORDS OF LINE {i}\n".encode() for i in range(1, 100)]
    out = tmp_path / "corpus"
    cases = {
        "typo": (b"19-198-000 WORDS OF LINE ZERO\n", "no line in transcript 19-198.trans.txt (a mistyped id? "
                 "lines there name no FLAC file here: '19-198-000': audio file missing)"),
        "latin1 then corrected": (b"19-198-0000 CAF\xc9\n19-198-0000 CAFE\n",
                                  "transcript line in 19-198.trans.txt is not UTF-8 text"),
    }
    for case, (first, reason) in cases.items():
        trans.write_bytes(first + b"".join(good))
        assert ls.prepare_librispeech(tmp_path, out, ["dev-clean"], download=False, max_rejected_fraction=0.01,
                                      progress=False) == {"dev": 99}, case
        listing = _read_listing(out / "dev" / "rejected.jsonl")
        assert {r["id"] for r in listing} == {"19-198-0000"} and listing[0]["reason"] == reason, case
        if case == "latin1 then corrected":  # the second line is listed, and says what became of the first
            assert [r["reason"] for r in listing[1:]] == [
                "listed twice in 19-198.trans.txt (its first line was rejected: transcript line in "
                "19-198.trans.txt is not UTF-8 text)"]
        with pytest.raises(ls.LibriSpeechError, match=r"split 'dev': 1 of 100 utterances rejected \(1.0%\)"):
            ls.prepare_librispeech(tmp_path, out, ["dev-clean"], download=False, max_rejected_fraction=0.005,
                                   progress=False)


def test_a_flac_without_its_length_gets_its_decoded_duration(tmp_path):
    """A FLAC whose header leaves the length "unknown" (libsndfile says 2**63 - 1 frames) went into the
    manifest as 576460752303423.5 s; its duration is measured by decoding it now."""
    folder = tmp_path / "LibriSpeech" / "dev-clean" / "19" / "198"
    folder.mkdir(parents=True)
    samples = _flac_without_length(folder / "19-198-0000.flac", 0.7)
    assert sf.info(str(folder / "19-198-0000.flac")).frames >= 1 << 62  # the premise: libsndfile's "unknown"
    (folder / "19-198.trans.txt").write_text("19-198-0000 STREAMED TO A PIPE\n")
    rejected: list[dict] = []
    rows = list(ls.read_librispeech_folder(tmp_path, "dev-clean", rejected=rejected))
    assert rejected == [] and [r["duration"] for r in rows] == [round(len(samples) / SR, 4)]


def test_a_subset_found_short_of_its_official_count_is_warned_about(tmp_path, monkeypatch, caplog):
    """A hand extraction (the route the stage's own error suggests) that died part-way was used as the
    whole subset: the chapters it never reached were missing from every manifest and listing, unsaid."""
    _make_subset(tmp_path / "LibriSpeech", "dev-clean")  # 6 utterances, taken here for the official count
    monkeypatch.setitem(ls.LIBRISPEECH_UTTERANCES, "dev-clean", 6)
    subset_dir = tmp_path / "LibriSpeech" / "dev-clean"

    def prepare(out: str) -> dict[str, int]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="meld.corpus.librispeech"):
            return ls.prepare_librispeech(tmp_path, tmp_path / out, ["dev-clean"], download=False,
                                          max_rejected_fraction=0.5, progress=False)

    assert prepare("whole") == {"dev": 6} and caplog.records == []
    (subset_dir / "26" / "496" / "26-496-0001.flac").write_bytes(b"not a flac file")
    assert prepare("one_rejected") == {"dev": 5} and caplog.records == []  # a rejected one was there
    shutil.rmtree(subset_dir / "26")  # the extraction never reached speaker 26
    assert prepare("cut") == {"dev": 2}
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    message = record.getMessage()
    for said in ("LibriSpeech dev-clean", str(subset_dir), "holds 2 utterances", "the official subset has 6",
                 f"delete {subset_dir} and rerun", "checked archive"):
        assert said in message, said


def test_the_official_utterance_counts_cover_every_subset():
    assert set(ls.LIBRISPEECH_UTTERANCES) == set(ls.LIBRISPEECH_MD5)
    # openslr's figures; the module docstring's example adds up the same
    assert [ls.LIBRISPEECH_UTTERANCES[s] for s in ("train-clean-100", "dev-clean", "test-clean")] == [28539, 2703, 2620]


def test_gnu_tars_self_links_are_skipped(tmp_path):
    """GNU tar stores a file named twice (``tar cf t.tar d d/a``) as a hard link to itself: the extraction
    removed the file, then copied from it (a bare FileNotFoundError, the file gone). A symbolic link to
    itself did the same. The file is already there: the link is skipped."""
    archive = _tar_with(tmp_path / "a.tar.gz", [
        _file("d/a", b"hello"), _link("d/a", "d/a", tarfile.LNKTYPE), _link("d/a", "a"), _link("d/b", "./a")])
    assert ls.safe_extract(archive, tmp_path / "dest") == 4
    for name in ("a", "b"):
        assert (tmp_path / "dest" / "d" / name).read_text() == "hello"
    assert not any(p.is_symlink() for p in (tmp_path / "dest").rglob("*"))

    tar = shutil.which("tar")
    if tar is None:
        pytest.skip("no tar program here to make the archive the way users do")
    (tmp_path / "src" / "d").mkdir(parents=True)
    (tmp_path / "src" / "d" / "a").write_text("hi")
    subprocess.run([tar, "cf", str(tmp_path / "t.tar"), "d", "d/a"], cwd=tmp_path / "src", check=True)
    ls.safe_extract(tmp_path / "t.tar", tmp_path / "dest2")
    assert (tmp_path / "dest2" / "d" / "a").read_text() == "hi"


def _folder(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info, None


@pytest.mark.parametrize("case", ["folder over a file", "file over a folder", "file named .", "file under a file"])
def test_members_that_clash_are_refused_by_name(tmp_path, case):
    """These crashed with a bare FileExistsError or IsADirectoryError, naming no member."""
    name, members = {
        "folder over a file": ("a", [_file("a"), _folder("a")]),
        "file over a folder": ("a", [_folder("a"), _file("a")]),
        "file named .": (".", [_file(".")]),
        "file under a file": ("a/b", [_file("a"), _file("a/b")]),
    }[case]
    with pytest.raises(ls.UnsafeArchiveError, match=re.escape(f"archive member {name!r} clashes")):
        ls.safe_extract(_tar_with(tmp_path / "a.tar.gz", members), tmp_path / "dest")
