"""Where this process's Ray cluster comes from: the one in RAY_ADDRESS, else a local one of its own.

Shared by every Ray driver of the toolkit (training, the sweep, the evaluation's sharded decoding).
"""

from __future__ import annotations

import os


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
        before = os.environ.get("RAY_API_SERVER_ADDRESS")
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # inherited by the raylet's workers
        try:
            # address="local": without it ray.init joins the last `ray start` cluster on this machine (and
            # refuses num_cpus there), so a researcher's own head would break or capture every stage
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=None, dashboard_host="127.0.0.1",
                     dashboard_port=port, log_to_driver=True, _node_ip_address="127.0.0.1", configure_logging=False)
        finally:  # not by this process's own subprocesses, which may talk to another cluster
            if before is None:
                os.environ.pop("RAY_API_SERVER_ADDRESS")
            else:
                os.environ["RAY_API_SERVER_ADDRESS"] = before
