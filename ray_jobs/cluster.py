"""Where this process's Ray cluster comes from: the one in RAY_ADDRESS, else a local one of its own.

Shared by every Ray driver of the toolkit (training, the sweep, the evaluation's sharded decoding).
"""

from __future__ import annotations

import os
from pathlib import Path

HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
LOCAL_HEALTH_CHECK_INTERVAL_S = "0.1"


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (as under ``ray job submit``), else start a local one on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # The dashboard (bound to localhost) serves the State API, which Train V2's placement-group cleaner
        # uses to notice a killed controller (e.g. a trial ASHA stopped); without it that run's worker CPUs
        # never return. Its URL goes to every worker through the environment, since auto-detection fails
        # when another Ray instance runs on the machine. Started when ray[default] is installed.
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # Train V2's controller takes each ray.train.report from a one-slot queue when it polls its
        # workers, every 2 s by default: a worker's second report in a poll interval blocks training
        # until then. A local cluster polls often (a few cheap actor calls a second); a user's own
        # setting wins.
        inherited = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
                     HEALTH_CHECK_ENV: os.environ.get(HEALTH_CHECK_ENV, LOCAL_HEALTH_CHECK_INTERVAL_S)}
        before = {name: os.environ.get(name) for name in inherited}
        os.environ.update(inherited)  # inherited by the raylet's workers
        try:
            # address="local": without it ray.init joins the last `ray start` cluster on this machine (and
            # refuses num_cpus there), so a researcher's own head would break or capture every stage
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=None, dashboard_host="127.0.0.1",
                     dashboard_port=port, log_to_driver=True, _node_ip_address="127.0.0.1", configure_logging=False)
        finally:  # not by this process's own subprocesses, which may talk to another cluster
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name)
                else:
                    os.environ[name] = value


def cluster_limit() -> tuple[dict[str, float], bool]:
    """What the joined cluster can hold: the most its autoscaler config allows (the bound Ray Train
    itself checks, when there is one), else the resources of its nodes now; and whether it can grow."""
    import ray

    try:  # Ray's own, as Train's worker group reads it; a check that cannot tell falls back to the nodes
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()
    except Exception:
        most = None
    if most:
        return {k: float(v) for k, v in most.items()}, True
    return ray.cluster_resources(), False


def check_cluster_can_hold(need: dict[str, float], cluster: dict[str, float], *, can_grow: bool, what: str,
                           why: str, remedy: str, wait: str) -> None:
    """Refuse work whose resources ``need`` the ``cluster`` (its resources, or with ``can_grow`` the most its
    autoscaler config allows: :func:`cluster_limit`) can never hold at once: Ray would keep it waiting for
    ever. A cluster that has them but not free (another job holds them) is waited for, as Ray does.

    Raises:
        ConfigError: "{what} needs {need} ({why}), but the Ray cluster has {what it has of each}: {remedy}
        ({wait})".
    """
    from meld.config import ConfigError

    if all(cluster.get(k, 0.0) + 1e-9 >= v for k, v in need.items()):
        return
    has = {k: cluster.get(k, 0.0) for k in need}
    raise ConfigError(f"{what} needs {need} ({why}), but the Ray cluster {'can grow to at most' if can_grow else 'has'} "
                      f"{has}: {remedy} ({wait})")


class NodeLocalStorage(ValueError):
    """A path the run writes (or every node reads) is not where the cluster's other processes can reach it."""


SHARED_MARKER = ".meld-shared-storage-check"


def ray_temp_root() -> Path | None:
    """This node's Ray temp folder (``/tmp/ray`` unless ``--temp-dir``): session logs, and the unpacked
    working dir of a ``ray job submit --working-dir`` job, where the job's relative paths land. None
    before Ray is initialised."""
    import ray

    try:
        return Path(ray._private.worker._global_node.get_session_dir_path()).resolve().parent
    except Exception:  # an API of Ray's own: a check that cannot tell, tells nothing
        return None


def _in_a_session(path: Path, temp: Path) -> bool:
    """Whether ``path`` lies in one of Ray's session folders under ``temp`` (``session_<date>`` or the
    ``session_latest`` link): its logs and a job's unpacked working dir, all deleted by Ray later. Other
    paths under ``temp`` are left alone (a cluster may have been started with ``--temp-dir /tmp``)."""
    try:
        parts = path.relative_to(temp).parts
    except ValueError:
        return False
    return bool(parts) and parts[0].startswith("session_")


def alive_nodes() -> list[str]:
    """Ids of the cluster's live nodes."""
    import ray

    return [n["NodeID"] for n in ray.nodes() if n.get("Alive")]


def _look(items: list[tuple[str, str, str | None, int | None]]) -> list[str]:
    """On one node: the paths of ``items`` ((label, path, marker token or None, size or None)) that this
    node does not see as the driver wrote them (the token's own marker file holding it, or a file of the
    size)."""
    missing = []
    for label, path, token, size in items:
        p = Path(path)
        try:
            if token is not None:
                ok = (p / f"{SHARED_MARKER}-{token}").read_text() == token
            else:
                ok = p.exists() and (size is None or p.stat().st_size == size)
        except OSError:
            ok = False
        if not ok:
            missing.append(f"{label} {path}")
    return missing


def unseen_by_nodes(items: list[tuple[str, str, str | None, int | None]], node_ids: list[str],
                    timeout_s: float = 300.0) -> dict[str, list[str]]:
    """Runs :func:`_look` on each of ``node_ids`` (a zero-CPU task pinned to the node); returns
    {node id: paths it does not see} for the nodes that miss any.

    Raises:
        NodeLocalStorage: naming the nodes whose probe had no answer within ``timeout_s`` (a node too
            busy to start a worker, or unreachable), whose storage then cannot be told.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not node_ids:
        return {}
    look = ray.remote(num_cpus=0, max_retries=0)(_look)
    refs = {node: look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(items)
            for node in node_ids}
    answered, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    silent = [node for node, ref in refs.items() if ref not in answered]
    if silent:
        for node in silent:
            ray.cancel(refs[node])
        addresses = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes()}
        nodes = ", ".join(f"{node[:12]} ({addresses.get(node, '?')})" for node in silent)
        paths = ", ".join(f"{label} {path}" for label, path, _, _ in items)
        raise NodeLocalStorage(
            f"the storage probe had no answer within {timeout_s:g} s from node {nodes} (too busy to start a "
            f"worker, or unreachable): whether it sees {paths} cannot be told; retry once it answers, or take it "
            "out of the cluster")
    found = dict(zip(refs, ray.get(list(refs.values()))))
    return {node: miss for node, miss in found.items() if miss}


def check_shared_storage(written: dict[str, Path], read: dict[str, Path] | None = None,
                         driver_only: dict[str, Path] | None = None, tracking_uri: str | None = None) -> None:
    """Refuse, before any work starts, storage a multi-node run cannot use (call it after :func:`init_ray`).

    Args:
        written: {label: folder} that processes on any node write and others read (checkpoints, Ray's
            run storage, a local MLflow store's folder): on several nodes, every node must see the same
            folder; it is probed from each with a marker file (removed again).
        read: {label: file} every node reads (the feature store's index, the BPE model): each node must
            see it with the driver's size.
        driver_only: {label: path} only this process writes (reports).
        tracking_uri: the MLflow store the run's workers log to; a local one's folder is written too.

    Any of these inside Ray's own temp folder (a relative path under ``ray job submit --working-dir``
    lands in the job's unpacked copy of the code, on the head node only, which Ray deletes later) is
    refused whatever the number of nodes.

    Raises:
        NodeLocalStorage: naming each path and the nodes that do not see it.
    """
    import secrets

    from meld.tracking import local_store_folder

    written, read, driver_only = dict(written), dict(read or {}), dict(driver_only or {})
    store = local_store_folder(tracking_uri) if tracking_uri else None
    if store is not None:  # an SQLite file's folder or a file store: every worker's rank 0 writes there
        written["the MLflow store (MLFLOW_TRACKING_URI)"] = store
    temp = ray_temp_root()
    if temp is not None:
        inside = [f"{label} {p}" for label, p in {**written, **read, **driver_only}.items()
                  if _in_a_session(Path(p).absolute(), temp) or _in_a_session(Path(p).resolve(), temp)]
        if inside:
            raise NodeLocalStorage(
                f"{'; '.join(inside)}: inside a session folder of Ray's temp folder {temp} (a relative path under `ray job submit "
                "--working-dir` resolves into the job's unpacked copy of the code, on one node, deleted by Ray "
                "later): give absolute paths on storage every node mounts (docs/scaling.md: the MELD_* variables)")
    nodes = alive_nodes()
    if len(nodes) < 2:
        return
    token = secrets.token_hex(16)
    items: list[tuple[str, str, str | None, int | None]] = []
    markers = []
    try:
        for label, folder in written.items():
            folder = Path(folder).resolve()
            folder.mkdir(parents=True, exist_ok=True)
            # a marker of this probe's own: two runs probing one folder at once (the default ray_results,
            # the project root of an SQLite store) must not overwrite or delete each other's
            marker = folder / f"{SHARED_MARKER}-{token}"
            marker.write_text(token)
            markers.append(marker)
            items.append((label, str(folder), token, None))
        for label, path in read.items():
            path = Path(path).resolve()
            items.append((label, str(path), None, path.stat().st_size if path.is_file() else None))
        unseen = unseen_by_nodes(items, nodes)
    finally:
        for marker in markers:
            marker.unlink(missing_ok=True)
    if unseen:
        lines = "; ".join(f"node {node[:12]} does not see {', '.join(miss)}" for node, miss in unseen.items())
        raise NodeLocalStorage(
            f"the cluster has {len(nodes)} nodes, and {lines}: on several nodes these must lie on storage every node "
            "mounts at the same path (NFS, Lustre, ...; Ray's run storage may be s3://...), not on one node's disk "
            "(docs/scaling.md, section 2)")
