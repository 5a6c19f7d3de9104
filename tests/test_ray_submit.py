"""``ray job submit`` against a real Ray head, as on a GPU cluster (docs/scaling.md), on 127.0.0.1.

Starts a head with its dashboard (the job server), submits the training driver with a small working
directory, data paths and the MLflow store given through the job's runtime environment, waits for it,
and finds the run's metrics in MLflow. The head is stopped by its own process id: ``ray stop`` would stop
every Ray instance on the machine, including ones this test didn't start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_faults import TINY_PARAMS, make_tiny_data

from ray_jobs.cluster import HEALTH_CHECK_ENV, LOCAL_HEALTH_CHECK_INTERVAL_S

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict:
    """This process's environment without anything that points Ray clients at another cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    # Ray >= 2.59 protects local clusters with a token (~/.ray/auth_token); the job CLI only sends it when told to
    env["RAY_AUTH_MODE"] = "token"
    return env


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head (``ray start --head --block``) on free localhost ports, shared by this module's tests;
    yields {"dashboard": its URL, "gcs": its GCS address}."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    port, dash, client, agent = (_free_port() for _ in range(4))
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log = open(Path(temp_dir) / "head.log", "w")
    # polls training reports as often as a local cluster does (docs/scaling.md), or each report waits ~2 s
    head = subprocess.Popen(
        cmd, env={**_clean_env(), HEALTH_CHECK_ENV: LOCAL_HEALTH_CHECK_INTERVAL_S}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while True:  # the job server answers once the dashboard is up
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited: {(Path(temp_dir) / 'head.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                    break
            except urllib.error.HTTPError:
                break  # it answers (401: Ray's token authentication, which the CLI handles)
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the Ray head's dashboard did not come up")
            time.sleep(0.5)
        yield {"dashboard": url, "gcs": f"127.0.0.1:{port}"}
    finally:
        # SIGTERM to `ray start --block` makes it stop every process of this head; then the process
        # group this test created, for anything left over
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_job_submit_trains_and_logs_to_mlflow(ray_head, tmp_path_factory, tmp_path):
    data = make_tiny_data(tmp_path_factory)
    project = tmp_path / "project"  # the uploaded working dir: code and params only, data stays outside
    for name in ("meld", "pipeline", "ray_jobs"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = {
        **TINY_PARAMS,
        "mlflow": {"experiment": "submit"},
        "train": {**TINY_PARAMS["train"], "num_workers": 1, "max_steps": 2, "checkpoint_every": 2},
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "models" / "meld"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = {
        "env_vars": {
            "MLFLOW_TRACKING_URI": tracking_uri,
            "MELD_FEATURES": str(data / "features"),
            "MELD_BPE": str(data / "bpe" / "bpe.model"),
            "MELD_CODEBOOK": str(data / "codebook"),
            "MELD_OUT": str(out),
            "MELD_RAY_STORAGE": str(tmp_path / "ray_results"),
            "MELD_PROJECT_ROOT": str(tmp_path),
        }
    }
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        ray_head["dashboard"],
        "--working-dir",
        str(project),
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        "-m",
        "ray_jobs.train",
        "--params",
        "params.yaml",
        "--system",
        "meld",
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=420)
    log = proc.stdout + proc.stderr
    print(f"job submit -> finished in {time.time() - t0:.1f} s")
    assert proc.returncode == 0, log[-5000:]
    assert "succeeded" in log, log[-3000:]
    assert (out / "model.pt").is_file()

    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=["submit"], output_format="list")
    run = next(r for r in runs if r.info.run_name == "train-meld")
    assert run.info.status == "FINISHED"
    assert "loss/total" in run.data.metrics and "dev/mse_post_greedy" in run.data.metrics
    history = mlflow.tracking.MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "loss/total")
    assert sorted(m.step for m in history) == [1, 2]


@pytest.mark.slow
def test_a_stage_without_ray_address_starts_its_own_cluster_beside_a_ray_start_head(ray_head):
    """`ray start` records its head as the machine's current cluster, which a bare ``ray.init()`` joins
    (and where it refuses ``num_cpus``): a stage run without RAY_ADDRESS must start a cluster of its own.
    Its workers (Train's controllers among them) poll training reports often; the driver's own
    environment, which its subprocesses inherit, is left as it was."""
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    try:
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text(ray_head["gcs"])  # as `ray start` writes it
        code = (
            "import ray\n"
            "import os\n"
            "from ray_jobs.cluster import HEALTH_CHECK_ENV, init_ray\n"
            "init_ray(num_cpus=1)\n"
            "def env(name): return os.environ.get(name)\n"
            "seen = ray.get(ray.remote(num_cpus=0)(env).remote(HEALTH_CHECK_ENV))\n"
            "print('cluster', ray.get_runtime_context().gcs_address, ray.cluster_resources()['CPU'],\n"
            "      seen, os.environ.get(HEALTH_CHECK_ENV))\n"
        )
        env = {**_clean_env(), "RAY_TMPDIR": str(temp), "PYTHONPATH": str(ROOT)}
        env.pop(HEALTH_CHECK_ENV, None)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        _, gcs, cpus, workers_poll, driver_env = proc.stdout.strip().splitlines()[-1].split()
        assert gcs != ray_head["gcs"] and float(cpus) == 1.0  # its own 1-CPU cluster, not the 2-CPU head
        assert workers_poll == LOCAL_HEALTH_CHECK_INTERVAL_S and driver_env == "None"
    finally:
        shutil.rmtree(temp, ignore_errors=True)
