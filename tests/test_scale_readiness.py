"""What breaks only at LibriSpeech scale or on a multi-node Ray cluster, checked on tiny inputs.

- A relative MLflow store (``MLFLOW_TRACKING_URI=sqlite:///mlflow.db``) is made absolute by the process that
  reads it, since the URI is handed to Ray workers and Tune trials whose working directories differ.
- Storage a multi-node run cannot use is refused before the work starts: paths inside Ray's temp folder (a
  relative ``--work-dir`` under ``ray job submit --working-dir`` lands in the job's unpacked code on one node),
  and on several nodes, folders and inputs some node does not see (probed from each node).
- A store's per-utterance lengths are built once: indexing them per utterance (the train driver's dev
  batching) was O(n^2) in the split's utterances.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from meld import tracking


def test_a_relative_mlflow_store_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for given, want in [
        ("sqlite:///mlflow.db", f"sqlite:///{tmp_path / 'mlflow.db'}"),
        ("sqlite:///runs/m.db?timeout=30", f"sqlite:///{tmp_path / 'runs' / 'm.db'}?timeout=30"),
        ("mlruns", (tmp_path / "mlruns").as_uri()),
        ("file:./mlruns", (tmp_path / "mlruns").as_uri()),
    ]:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", given)
        assert tracking.tracking_uri() == want, given
    for kept in ("sqlite:////abs/mlflow.db", "file:///abs/mlruns", "http://mlflow.internal:5000", "databricks"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", kept)
        assert tracking.tracking_uri() == kept
    # what a worker in another directory gets from the driver still names the driver's store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    uri = tracking.tracking_uri()
    monkeypatch.chdir(tmp_path.parent)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.local_store_path("http://x:5000") is None
    assert tracking.local_store_path(uri) == tmp_path / "mlflow.db"


def test_a_local_store_is_found_where_its_uri_says_and_keeps_its_artifacts_beside_it(tmp_path, monkeypatch):
    """The storage probe and the artifact location read a store's folder from its URI: percent-escapes are
    decoded (absolute_uri writes a space as %20), and an SQLite store's experiments keep their artifacts in
    mlartifacts/ beside it, not in ./mlruns of whichever process made the experiment."""
    spaced = tmp_path / "my runs"
    assert tracking.local_store_path(spaced.as_uri()) == spaced
    assert tracking.local_store_path("file://localhost" + str(spaced)) == spaced
    assert tracking.local_store_path("file://otherhost/srv/mlruns") is None
    monkeypatch.chdir(tmp_path.parent)
    for uri, folder in ((f"sqlite:///{tmp_path / 'db' / 'm.db'}", tmp_path / "db"), (None, tmp_path)):
        if uri is None:
            monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own store
        else:
            (tmp_path / "db").mkdir()
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow = tracking.setup(f"artifacts-{folder.name}", tmp_path)
        got = mlflow.get_experiment_by_name(f"artifacts-{folder.name}").artifact_location
        assert got == (folder / tracking.DEFAULT_ARTIFACTS).as_uri(), (uri, got)


def test_per_utterance_lengths_are_built_once(tmp_path):
    """The train driver's dev batching indexes ``data.lengths()[i]`` for every utterance (and sorts by it),
    as the evaluate stage indexes ``store.lengths[i]``; each access rebuilt the list from the index, so that
    was O(n^2) in a split's utterances (seconds at 6,000, hours at LibriSpeech's 100k). Every access now
    returns the one list made at load, with the index's values."""
    from meld.store import (
        CodeStore,
        CodeTrainingData,
        FeatureStore,
        TrainingData,
        delayed_lengths,
        grouped_lengths,
        write_code_store,
        write_store,
    )
    from meld.text import BPETokenizer, train_bpe

    lengths = np.random.default_rng(0).integers(1, 9, 40).tolist()

    def meta(i):
        return {"id": f"u{i}", "speaker": "s", "text": "a b", "duration": 0.1}

    write_store(tmp_path / "feats", ((meta(i), np.zeros((n, 80), np.float32)) for i, n in enumerate(lengths)), [])
    write_code_store(tmp_path / "codes", ((meta(i), np.zeros((n, 4), np.int16)) for i, n in enumerate(lengths)), [])
    tok = BPETokenizer(train_bpe(["a b c d e f g h", "a b"], tmp_path / "bpe", 12))
    store, code_store = FeatureStore(tmp_path / "feats"), CodeStore(tmp_path / "codes", 4)
    assert store.lengths == lengths and store.lengths is store.lengths
    assert code_store.lengths == lengths and code_store.lengths is code_store.lengths
    data = TrainingData(store, None, tok, 2)
    assert data.lengths() == grouped_lengths(lengths, 2) and data.lengths() is data.lengths()
    code_data = CodeTrainingData(code_store, tok)
    assert code_data.lengths() == delayed_lengths(lengths, 4) and code_data.lengths() is code_data.lengths()


@pytest.fixture(scope="module")
def own_ray():
    """The test session's local Ray cluster (tests/test_faults.py starts it once; Ray allows one per process)
    and its temp folder."""
    from test_faults import ensure_ray

    from ray_jobs.cluster import ray_temp_root

    ensure_ray()
    return ray_temp_root()


def test_paths_inside_rays_temp_folder_are_refused(own_ray, tmp_path, capsys):
    """A relative --work-dir / --out under ``ray job submit --working-dir`` resolves into the job's unpacked
    copy of the code: on the head node only, deleted by Ray later. Refused, naming the flag."""
    from ray_jobs.cluster import NodeLocalStorage, check_shared_storage, ray_temp_root

    temp = ray_temp_root()
    assert temp == own_ray and (temp / "session_latest").exists()
    job_copy = temp / "session_latest" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0"
    with pytest.raises(NodeLocalStorage, match=r"--work-dir .*_ray_pkg_0/ray_results/tune: inside a session folder of Ray's temp folder"):
        check_shared_storage({"--work-dir": job_copy / "ray_results" / "tune"})
    with pytest.raises(NodeLocalStorage, match=r"--out .*reports/tune.json"):
        check_shared_storage({"--work-dir": tmp_path}, driver_only={"--out": job_copy / "reports" / "tune.json"})
    with pytest.raises(NodeLocalStorage, match=r"the MLflow store \(MLFLOW_TRACKING_URI\) .*_ray_pkg_0: inside"):
        check_shared_storage({"--work-dir": tmp_path}, tracking_uri=f"sqlite:///{job_copy / 'mlflow.db'}")
    check_shared_storage({"--work-dir": tmp_path / "work"}, read={"--bpe": tmp_path}, driver_only={"--out": tmp_path})
    # a stage (the training driver, the sweep) ends in that one line, not a traceback
    from meld.config import run_stage

    assert run_stage("train", lambda: check_shared_storage({"--work-dir": job_copy / "ray_results"}) or 0) == 1
    assert capsys.readouterr().err.startswith(f"train: --work-dir {job_copy / 'ray_results'}: inside a session folder")
    # under the temp folder but in no session of Ray's (a cluster started with --temp-dir on a shared disk)
    check_shared_storage({"--work-dir": temp / "meld-work"})
    assert not (temp / "meld-work").exists()  # one node: nothing is probed, nothing written


def test_each_node_is_probed_for_the_folders_and_files_it_must_see(own_ray, tmp_path):
    """The probe runs on the node it names and reports what that node does not see as the driver wrote it."""
    from ray_jobs.cluster import SHARED_MARKER, alive_nodes, unseen_by_nodes

    (tmp_path / "work").mkdir()
    (tmp_path / "work" / f"{SHARED_MARKER}-token-1").write_text("token-1")
    (tmp_path / "work" / f"{SHARED_MARKER}-token-3").write_text("token-3")  # another run probing at the same time
    (tmp_path / "bpe.model").write_bytes(b"12345")
    nodes = alive_nodes()
    assert len(nodes) == 1
    good = [("--work-dir", str(tmp_path / "work"), "token-1", None), ("--bpe", str(tmp_path / "bpe.model"), None, 5)]
    assert unseen_by_nodes(good, nodes) == {}
    assert unseen_by_nodes([("--ray-storage", str(tmp_path / "work"), "token-3", None)], nodes) == {}
    bad = [("--work-dir", str(tmp_path / "work"), "token-2", None),  # another node's disk: another marker, or none
           ("--bpe", str(tmp_path / "bpe.model"), None, 6),  # another copy of the file
           ("--features", str(tmp_path / "nowhere"), None, None)]
    assert unseen_by_nodes(bad, nodes) == {nodes[0]: [f"--work-dir {tmp_path / 'work'}",
                                                      f"--bpe {tmp_path / 'bpe.model'}",
                                                      f"--features {tmp_path / 'nowhere'}"]}


def test_a_node_whose_probe_does_not_answer_is_named(own_ray, tmp_path):
    """A node too busy to start the probe's worker in time, or unreachable, cannot say what it sees: the
    run is refused naming that node and the paths, not with Ray's bare "Get timed out"."""
    from ray_jobs.cluster import NodeLocalStorage, alive_nodes, unseen_by_nodes

    (tmp_path / "bpe.model").write_bytes(b"12345")
    nodes = alive_nodes()
    items = [("--bpe", str(tmp_path / "bpe.model"), None, 5)]
    with pytest.raises(NodeLocalStorage, match=rf"no answer within 0 s from node {nodes[0][:12]} \(\S+\) .*whether "
                                               rf"it sees --bpe {tmp_path / 'bpe.model'} cannot be told"):
        unseen_by_nodes(items, nodes, timeout_s=0)  # no task finishes in no time
    assert unseen_by_nodes(items, nodes) == {} and unseen_by_nodes(items, []) == {}


def test_a_sweep_under_a_jobs_working_dir_copy_is_refused_before_any_trial(own_ray, tmp_path_factory, tmp_path,
                                                                          monkeypatch):
    """The sweep's default --work-dir (ray_results/tune) and --out (reports/tune.json) are relative: under
    ``ray job submit --working-dir .`` they land in the job's copy of the code on the head node, where the
    trials' rank 0 on other nodes cannot write their checkpoints and the report is lost."""
    from test_faults import TINY_PARAMS, make_tiny_data

    from ray_jobs.cluster import NodeLocalStorage, ray_temp_root
    from ray_jobs.tune import run_sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = make_tiny_data(tmp_path_factory)
    job_copy = ray_temp_root() / "session_latest" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    try:
        with pytest.raises(NodeLocalStorage, match="--work-dir .*_ray_pkg_1/ray_results/tune"):
            run_sweep(TINY_PARAMS, features=str(data / "features"), bpe=str(data / "bpe" / "bpe.model"),
                      codebook=str(data / "codebook"), out=job_copy / "reports" / "tune.json",
                      plot=job_copy / "reports" / "tune.png", work_dir=job_copy / "ray_results" / "tune",
                      project_root=str(tmp_path))
        assert not (job_copy / "ray_results" / "tune").exists()  # refused before anything was written
    finally:
        shutil.rmtree(job_copy, ignore_errors=True)


def test_a_training_run_checks_its_checkpoints_store_and_inputs(tmp_path_factory, tmp_path, monkeypatch):
    """The train driver hands its workers an absolute MLflow URI and checks, before Ray Train starts, the
    folders workers on any node write (checkpoints, Ray's run storage unless a URI, a local MLflow store)
    and the inputs every worker reads."""
    from test_faults import make_tiny_data, tiny_config

    from ray_jobs.train import training_storage

    data = make_tiny_data(tmp_path_factory)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/mlflow.db")
    config = tiny_config(data, tmp_path / "model")
    assert config["mlflow_tracking_uri"] == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    got = training_storage(config, "ray_results")
    assert got["written"] == {"--out (checkpoints)": tmp_path / "model" / "checkpoints",
                              "--ray-storage": Path("ray_results")}
    # the store's folder: check_shared_storage adds it to what is written, from the URI
    assert tracking.local_store_folder(got["tracking_uri"]) == tmp_path / "runs"
    assert got["read"] == {"--features": data.resolve() / "features" / "train" / "index.jsonl",
                           "--bpe": (data / "bpe" / "bpe.model").resolve(),
                           "--codebook": Path(config["codebook"])}
    assert got["read"]["--codebook"].parent == (data / "codebook").resolve()
    assert all(p.is_file() for p in got["read"].values())
    assert "--ray-storage" not in training_storage(config, "s3://bucket/ray")["written"]


def test_each_worker_counts_torch_threads_on_its_own_node(tmp_path_factory, tmp_path):
    """The driver may run on a small head node while the workers train on large ones: a worker's default
    thread count is its own node's cores shared among the run's workers there, not the driver's."""
    from test_faults import TINY_PARAMS, make_tiny_data

    from ray_jobs.train import build_config, node_threads

    data = make_tiny_data(tmp_path_factory)
    config = build_config(TINY_PARAMS, system="meld", features=data / "features", bpe=data / "bpe" / "bpe.model",
                          codebook=data / "codebook", out=tmp_path / "out", project_root=tmp_path)
    assert config["threads_per_worker"] is None  # left to each worker
    assert [node_threads(64, n) for n in (1, 4, 64, 128)] == [64, 16, 1, 1]  # never 0
    assert node_threads(None, 2) == 1  # os.cpu_count() may not know
