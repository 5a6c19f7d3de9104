"""MLflow helpers: one tracking URI rule, stable run names, flat params, provenance tags."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
# A server that does not answer a connection in this time is taken as down. MLflow's own client retries a
# refused request 7 times with exponential backoff: setup() against a stopped server failed after ~4 minutes
# (measured, MLflow 3.17), and a training worker's setup again on each of Ray's retries.
SERVER_PROBE_TIMEOUT_S = 10


class TrackingStoreUnavailable(RuntimeError):
    """The MLflow tracking store cannot be used: a server that does not answer, an SQLite file held locked."""


def tracking_uri(project_root: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an embedded SQLite store in the project root.

    A local store given by a relative path (``sqlite:///mlflow.db``, ``file:./mlruns``, ``mlruns``) is
    made absolute against this process's working directory: the URI is handed to Ray workers and Tune
    trials, whose working directories are others (a trial's folder, the job's unpacked working dir on
    each node), and MLflow would resolve it there: every process its own store, runs scattered.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return absolute_uri(uri)
    root = Path(project_root or os.getcwd()).resolve()
    return f"sqlite:///{root / DEFAULT_DB}"


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def local_store_path(uri: str) -> Path | None:
    """The file or folder of a local MLflow store (``sqlite:///...``, ``file:...`` or a plain path),
    as written (maybe relative); None for a server or any other kind of store."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].split("?", 1)[0]
        return Path(path) if path and path != ":memory:" else None
    if uri.startswith("file:"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):  # file://host/...: another machine's folder
            return None
        return Path(url2pathname(parsed.path)) if parsed.path else None  # %20 is a space, as in as_uri()
    if _SCHEME.match(uri) or uri in ("databricks", "databricks-uc", "uc"):  # a server, Databricks, ...
        return None
    return Path(uri)


def local_store_folder(uri: str) -> Path | None:
    """The folder every process logging to a local MLflow store writes in (an SQLite file's folder, a file
    store itself); None for a server or any other kind of store."""
    path = local_store_path(uri)
    if path is None:
        return None
    return path.parent if uri.startswith("sqlite:") else path


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative local store path made absolute (against the current directory)."""
    path = local_store_path(uri)
    if path is None or path.is_absolute():
        return uri
    path = path.resolve()
    if uri.startswith("sqlite:///"):
        query = uri.partition("?")[2]
        return f"sqlite:///{path}" + (f"?{query}" if query else "")
    return path.as_uri()


def check_server(uri: str, timeout_s: float = SERVER_PROBE_TIMEOUT_S, named_by: str = "MLFLOW_TRACKING_URI") -> None:
    """Raise :class:`TrackingStoreUnavailable` when ``uri`` is an HTTP(S) tracking server that does not answer
    within ``timeout_s``. Any HTTP answer counts (a proxy's 401 too): only a server that is not there is refused.
    ``named_by``: where ``uri`` comes from, for the message."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
    except requests.exceptions.SSLError:  # a server is there; its certificate is MLflow's to judge (its TLS settings)
        return
    except requests.RequestException as err:
        raise TrackingStoreUnavailable(
            f"MLflow tracking server {uri} ({named_by}) does not answer: {type(err).__name__}. Start it "
            "(docs/scaling.md), point MLFLOW_TRACKING_URI at one that runs, or unset it to log to the project's "
            f"SQLite store ({DEFAULT_DB})") from None


def setup(experiment: str, project_root: str | Path | None = None, *, uri: str | None = None):
    """Point MLflow at the tracking store and make sure the experiment exists; returns the mlflow module.

    Args:
        uri: the store, if not :func:`tracking_uri`'s (evaluate: the training run's, :func:`run_store`).

    Raises:
        TrackingStoreUnavailable: a server that does not answer (in seconds, not after MLflow's minutes of
            retries), or an SQLite store another process holds locked (after SQLite's wait), naming the store.
    """
    import logging

    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = absolute_uri(uri) if uri else tracking_uri(project_root)
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    try:
        existing = mlflow.get_experiment_by_name(experiment)
    except Exception as err:  # MlflowException, or SQLAlchemy's own while the store is being opened
        if "database is locked" not in str(err):
            raise
        raise TrackingStoreUnavailable(
            f"MLflow store {local_store_path(uri)} stayed locked by another process (a transaction left open "
            "in a sqlite3 shell or another tool; or a filesystem without working locks): end it, or set "
            "MLFLOW_TRACKING_URI to another store") from None
    if existing is None:
        artifact_location = None
        # an SQLite store keeps its artifacts beside it (the project's: mlartifacts/ in the project root);
        # MLflow's default is ./mlruns of whichever process creates the experiment. (This asked whether
        # MLFLOW_TRACKING_URI was unset, which set_tracking_uri above had just set: never true.)
        if uri.startswith("sqlite:///"):
            artifact_location = (local_store_folder(uri) / DEFAULT_ARTIFACTS).as_uri()
        try:
            mlflow.create_experiment(experiment, artifact_location=artifact_location)
        except Exception:  # created concurrently by another process
            pass
    mlflow.set_experiment(experiment)
    return mlflow


TRACKING_URI_FILE = "mlflow_tracking_uri"


class RunStore(NamedTuple):
    """The store a training run is looked for in (:func:`run_store`)."""

    uri: str
    run_id: str | None  # None: no run-id file, or an empty one
    named_by: str  # where ``uri`` comes from, for messages
    recorded_uri: str | None  # the store the training recorded, if any (maybe not ``uri``)


def record_run(id_file: str | Path, run_id: str, uri: str) -> None:
    """Write ``run_id`` to ``id_file`` and the tracking store it lives in to :data:`TRACKING_URI_FILE` beside it
    (one run per checkpoint folder), each whole (temp file + rename). The store first: a reader that sees the new
    id sees its store. ``uri`` is recorded absolute and without a password (the folder is a DVC output, pushed)."""
    id_file = Path(id_file)
    id_file.parent.mkdir(parents=True, exist_ok=True)
    _write_whole(id_file.with_name(TRACKING_URI_FILE), _without_password(absolute_uri(uri)))
    _write_whole(id_file, run_id)


def recorded_run(id_file: str | Path | None) -> tuple[str | None, str] | None:
    """(the tracking URI the training recorded beside ``id_file``, its run id), or None without a run id. The URI
    is None for a checkpoint folder written before training recorded it."""
    if not id_file or not Path(id_file).is_file():
        return None
    run_id = Path(id_file).read_text().strip()
    if not run_id:
        return None
    uri_file = Path(id_file).with_name(TRACKING_URI_FILE)
    uri = uri_file.read_text().strip() if uri_file.is_file() else ""
    return (uri or None), run_id


def run_store(id_file: str | Path | None) -> RunStore:
    """Where the run named by ``id_file`` (a training's ``<checkpoint_dir>/mlflow_run_id``) is, by one rule:

    1. ``MLFLOW_TRACKING_URI``, if set: the user's explicit choice wins (a store moved to a server, a copy);
    2. else the store the training recorded beside the id file (:func:`record_run`), wherever this process runs:
       the training logged to the SQLite store of its ``--project-root``, which need not be this directory;
    3. else (a folder from before the store was recorded, or no id file) :func:`tracking_uri`: this
       directory's store, as before.

    Nothing is opened: a stage checks the run's presence itself, before its work (pipeline/evaluate.py).
    """
    recorded = recorded_run(id_file)
    recorded_uri, run_id = recorded if recorded else (None, None)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return RunStore(tracking_uri(), run_id, "MLFLOW_TRACKING_URI", recorded_uri)
    if recorded_uri:
        return RunStore(recorded_uri, run_id, f"recorded by the training in {Path(id_file).with_name(TRACKING_URI_FILE)}",
                        recorded_uri)
    return RunStore(tracking_uri(), run_id, "the working directory's store: the training recorded none", None)


def _without_password(uri: str) -> str:
    """``uri`` with the password of a ``user:password@host`` taken out (MLflow reads it from
    ``MLFLOW_TRACKING_PASSWORD`` as well)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{host}"))


def _write_whole(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run_tags(params: Mapping[str, Any], project_root: str | Path | None = None, *, prefix: str = "meld.",
             source: str | None = None) -> dict[str, str]:
    """Where a run comes from, as tags the MLflow UI filters on: the code's git commit (and whether tracked files
    differ from it, dvc.lock aside: DVC rewrites it after every stage of a repro), a digest of the whole params
    file (every stage of one ``dvc repro`` or ``dvc exp run`` reads the same file, so they share it), and the
    DVC stage and experiment that ran the command (DVC sets ``DVC_STAGE``, ``DVC_EXP_NAME``).

    Computed by the driver, in the project: a Ray worker's MLflow context names Ray's ``default_worker.py``,
    inside an ignored .venv or on another node, and so records no commit.

    Args:
        params: the whole params file.
        project_root: the git work tree (default: the current directory).
        prefix: of every key (``eval.`` for tags a stage sets on another stage's run).
        source: the stage's script; given, MLflow's own ``mlflow.source.name`` and ``mlflow.source.git.commit``
            are set too (shown on the run's page), for a run the stage itself starts.
    """
    root = str(Path(project_root or os.getcwd()).resolve())
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
    tags = {f"{prefix}params_sha256": digest}
    commit = _git(root, "rev-parse", "HEAD")
    if commit:
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock")
        tags[f"{prefix}git_commit"] = commit
        if dirty is not None:
            tags[f"{prefix}git_dirty"] = "true" if dirty else "false"
    for var, key in (("DVC_STAGE", "dvc_stage"), ("DVC_EXP_NAME", "dvc_exp")):
        if os.environ.get(var):
            tags[f"{prefix}{key}"] = os.environ[var]
    if source:
        tags["mlflow.source.name"] = source
        if commit:
            tags["mlflow.source.git.commit"] = commit
    return tags


def _git(root: str, *args: str) -> str | None:
    """``git -C root args`` stdout, stripped; None where there is no git or no repository."""
    try:
        done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}; lists become strings (MLflow params are strings)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def find_run(mlflow, experiment: str, run_name: str) -> str | None:
    """Id of the newest run with this name in the experiment, if any (so restarts resume one run)."""
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    return runs[0].info.run_id if runs else None
