"""MLflow helpers: one tracking URI rule, stable run names, flat params."""

from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


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


def setup(experiment: str, project_root: str | Path | None = None):
    """Point MLflow at the tracking store and make sure the experiment exists; returns the mlflow module."""
    import logging

    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri(project_root)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
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
