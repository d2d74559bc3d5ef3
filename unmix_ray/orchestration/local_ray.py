"""Connecting to Ray: a cluster named by ``RAY_ADDRESS`` (a Ray job, or a user pointing at one), or a
fresh embedded local Ray for a laptop run, isolated from any other Ray on the same machine.

Isolation: processes of a Ray cluster that look up "their" cluster without being told its address
(Ray Train's placement-group cleaner does, through the State API) fail when several Ray instances
run on one host, and that cleaner then takes a live trial for dead and removes its placement group.
Every process of the embedded Ray is therefore told its own address: the GCS port is chosen here
(``RAY_GCS_SERVER_PORT``) and ``RAY_ADDRESS`` is set before the head starts, so the raylet and every
worker it spawns inherit it. The embedded Ray listens on loopback only and starts without what a
laptop run does not use: the dashboard, usage stats, and Ray Train's preemption watcher and metrics
export (a process and a poll each per trial). A cluster keeps all of them.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import ray

HOST = "127.0.0.1"
TRIAL_DRIVER = "trial_driver"  # custom resource: slots for trial drivers (the cluster head offers them)


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_local(num_cpus: int | None = None, resources: dict[str, float] | None = None,
                runtime_env: dict[str, Any] | None = None, **init: Any) -> str:
    """A fresh embedded Ray on loopback whose processes all know its address; returns that address.
    ``init``: more of ``ray.init``'s arguments (``log_to_driver``, ``logging_level``)."""
    address = f"{HOST}:{free_port()}"
    os.environ["RAY_GCS_SERVER_PORT"] = address.rsplit(":", 1)[1]
    os.environ["RAY_ADDRESS"] = address  # inherited by the raylet and every worker process
    for name in ("RAY_USAGE_STATS_ENABLED", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_METRICS_ENABLED"):
        os.environ.setdefault(name, "0")
    try:
        ray.init(address="local", num_cpus=num_cpus, resources=resources, runtime_env=runtime_env,
                 include_dashboard=False, _node_ip_address=HOST, **init)
    except BaseException:
        os.environ.pop("RAY_ADDRESS", None)
        raise
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)
    return address


def stop_local() -> None:
    """Shut the embedded Ray down, and forget its address."""
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
