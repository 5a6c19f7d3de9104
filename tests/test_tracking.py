"""MLflow tracking on real stores: a server that is down or an SQLite file held locked stops a stage in seconds
with an error naming the store (MLflow's own client retried a refused request for ~4 minutes), and runs
carry the tags a researcher filters and groups them by in the MLflow UI (git commit, params digest, DVC stage),
which a Ray worker's MLflow context does not record."""

from __future__ import annotations

import http.server
import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from meld import tracking

ROOT = Path(__file__).resolve().parents[1]
# a fresh process, as a stage or a Ray worker opens the store (nothing cached from this test process)
SETUP = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from meld import tracking; tracking.setup('exp')"


def _free_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_that_does_not_answer_stops_setup_in_seconds_naming_it(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    # MLflow alone retried the first request with backoff and failed after ~4 minutes: this timed out
    done = subprocess.run([sys.executable, "-c", SETUP], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("meld.tracking.TrackingStoreUnavailable") and uri in last, done.stderr[-2000:]


def test_server_probe_accepts_any_http_answer(tmp_path):
    """Only a server that is not there is refused: one that answers, even with an error status, passes."""

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_error(401)

        def log_message(self, *args):
            pass

    for scheme in ("http", "https"):  # https: a self-signed certificate, which MLflow may be told to accept
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
        if scheme == "https":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*_self_signed(tmp_path))
            server.socket = context.wrap_socket(server.socket, server_side=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            tracking.check_server(f"{scheme}://127.0.0.1:{server.server_address[1]}")
        finally:
            server.shutdown()
            server.server_close()
    with pytest.raises(tracking.TrackingStoreUnavailable):
        tracking.check_server(f"http://127.0.0.1:{_free_port()}", timeout_s=5)


def _self_signed(folder: Path) -> tuple[str, str]:
    """(certificate, key) files of a self-signed certificate for 127.0.0.1."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def test_locked_sqlite_store_is_named(tmp_path):
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    subprocess.run([sys.executable, "-c", SETUP], env=env, cwd=tmp_path, check=True, capture_output=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sqlite3, sys; c = sqlite3.connect({str(db)!r}, isolation_level=None); "
                               "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        done = subprocess.run([sys.executable, "-c", SETUP], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
    finally:
        holder.stdin.close()  # the holder reads to EOF, then exits and lets go of the lock
        holder.wait(timeout=30)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("meld.tracking.TrackingStoreUnavailable") and str(db) in last, done.stderr[-2000:]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_run_tags_let_runs_of_one_repro_be_found_together(tmp_path, monkeypatch):
    repo = tmp_path / "project"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "model.py").write_text("x = 1\n")
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    _git(repo, "add", "model.py", "dvc.lock")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    head = _git(repo, "rev-parse", "HEAD")
    params = {"train": {"lr": 0.001, "loss_weights": {"ce": 1.0, "slowness": 0.2}}, "mlflow": {"experiment": "e"}}
    monkeypatch.setenv("DVC_STAGE", "train@meld")  # what DVC sets for a stage's command
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow = tracking.setup("e")

    # this test's own process is pytest, outside the project (as a Ray worker is): MLflow records no commit
    ids = []
    with mlflow.start_run(run_name="train-meld", tags=tracking.run_tags(params, repo, source="ray_jobs/train.py")) as r:
        ids.append(r.info.run_id)
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # a repro rewrites it after every stage
    with mlflow.start_run(run_name="tune-meld", tags=tracking.run_tags(params, repo)) as r:
        ids.append(r.info.run_id)
    other = {**params, "train": {**params["train"], "lr": 0.002}}
    (repo / "model.py").write_text("x = 2\n")
    with mlflow.start_run(run_name="train-meld", tags=tracking.run_tags(other, repo)) as r:
        ids.append(r.info.run_id)

    client = mlflow.tracking.MlflowClient()
    first, second, third = runs = [client.get_run(i) for i in ids]
    assert first.data.tags["mlflow.source.git.commit"] == head
    assert first.data.tags["mlflow.source.name"] == "ray_jobs/train.py"
    assert all(r.data.tags["meld.git_commit"] == head for r in runs)
    assert all(r.data.tags["meld.dvc_stage"] == "train@meld" for r in runs)
    assert [r.data.tags["meld.git_dirty"] for r in runs] == ["false", "false", "true"]
    digest = first.data.tags["meld.params_sha256"]
    together = mlflow.search_runs(filter_string=f"tags.`meld.params_sha256` = '{digest}'", output_format="list")
    assert {r.info.run_id for r in together} == {first.info.run_id, second.info.run_id}
    assert third.data.tags["meld.params_sha256"] != digest
    # the digest is of the content, not of the order the file lists it in
    reordered = {"mlflow": params["mlflow"], "train": dict(reversed(list(params["train"].items())))}
    assert tracking.run_tags(reordered, repo)["meld.params_sha256"] == digest
    # tags a stage sets on another stage's run (evaluate on the training run) keep to their own prefix
    evaluate = tracking.run_tags(params, repo, prefix="eval.")
    assert evaluate["eval.git_commit"] == head and all(k.startswith("eval.") for k in evaluate)
    # outside a repository no commit is claimed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert "meld.git_commit" not in tracking.run_tags(params, elsewhere)
