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


def test_a_training_run_records_the_store_it_logs_to_beside_its_id(tmp_path, no_tracking_uri):
    """Rank 0 of a training logs to the SQLite store of its --project-root, wherever it runs; the id file alone
    did not say which store, and evaluate (run elsewhere) looked in its own directory's. The store is written
    beside the id, absolute, each time the id is: on a new run and on a resumed one."""
    from mlflow.tracking import MlflowClient

    from meld.store import FrameBudgetSampler
    from ray_jobs.train import _open_mlflow_run

    monkeypatch = no_tracking_uri
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = {"experiment": "e", "project_root": str(project), "run_name": "train-meld", "system": "meld",
              "train": {"max_steps": 4}, "model_kwargs": {}, "reduction_factor": 1}
    ckpts, sampler = project / "models" / "meld" / "checkpoints", FrameBudgetSampler([3, 4], 8)
    mlflow = _open_mlflow_run(config, ckpts, resumed_at=None, sampler=sampler)
    run_id = mlflow.active_run().info.run_id
    mlflow.end_run()
    store = f"sqlite:///{project / 'mlflow.db'}"
    assert (ckpts / "mlflow_run_id").read_text() == run_id  # as before: tune.py and dvc.yaml read this file
    assert (ckpts / tracking.TRACKING_URI_FILE).read_text() == store
    assert tracking.recorded_run(ckpts / "mlflow_run_id") == (store, run_id)
    assert MlflowClient(store).get_run(run_id).info.status == "FINISHED"
    assert not (elsewhere / "mlflow.db").exists()

    # resumed, by a worker whose store is given by the driver (config["mlflow_tracking_uri"]): recorded again
    (ckpts / tracking.TRACKING_URI_FILE).unlink()  # as a checkpoint folder from before this was recorded
    assert tracking.recorded_run(ckpts / "mlflow_run_id") == (None, run_id)
    mlflow = _open_mlflow_run({**config, "mlflow_tracking_uri": store}, ckpts, resumed_at=2, sampler=sampler)
    assert mlflow.active_run().info.run_id == run_id
    mlflow.end_run()
    assert tracking.recorded_run(ckpts / "mlflow_run_id") == (store, run_id)


def test_a_runs_store_is_the_explicit_uri_else_the_recorded_one_else_this_directorys(tmp_path, no_tracking_uri):
    monkeypatch = no_tracking_uri
    monkeypatch.chdir(tmp_path)
    id_file = tmp_path / "ckpts" / "mlflow_run_id"
    here = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.recorded_run(id_file) is None and tracking.run_store(id_file).run_id is None
    assert tracking.run_store(None).uri == here  # no run-id file: this directory's, as before
    id_file.parent.mkdir()
    id_file.write_text("")
    assert tracking.recorded_run(id_file) is None  # an empty id names no run

    # a folder from before the store was recorded: this directory's store
    id_file.write_text("abc\n")
    assert tracking.run_store(id_file)[:2] == (here, "abc")
    # recorded: that store, from any directory; a relative one made absolute when recorded
    project = tmp_path / "project"
    tracking.record_run(id_file, "abc", "sqlite:///project/mlflow.db")
    recorded = f"sqlite:///{project / 'mlflow.db'}"
    assert tracking.run_store(id_file)[:2] == (recorded, "abc")
    assert tracking.run_store(id_file).named_by == f"recorded by the training in {id_file.parent / 'mlflow_tracking_uri'}"
    # an explicit MLFLOW_TRACKING_URI wins (a store moved to a server), the recorded one kept for messages
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking.run_store(id_file) == ("http://tracking.example:5000", "abc", "MLFLOW_TRACKING_URI", recorded)
    # a server's password is not written into the checkpoint folder (a DVC output, pushed to a remote)
    tracking.record_run(id_file, "abc", "https://alice:s3cret@tracking.example/mlflow")
    assert tracking.recorded_run(id_file) == ("https://alice@tracking.example/mlflow", "abc")
    assert sorted(p.name for p in id_file.parent.iterdir()) == ["mlflow_run_id", "mlflow_tracking_uri"]  # no temp file
