"""The Ray side of a replica's start-up: Ray and Python versions against the cluster's, GPU share.

Ray-free helpers (audio checks, devices, threads, memory) live in `deployments/core.py`.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
from typing import Mapping, Optional

import ray

logger = logging.getLogger(__name__)


class EnvironmentMismatchError(RuntimeError):
    """A replica's Ray or Python version differs from the cluster's."""


def local_versions() -> dict:
    """The Ray and Python versions of this process, as strings."""
    return {"ray_version": ray.__version__, "python_version": platform.python_version()}


def cluster_versions() -> Optional[dict]:
    """The Ray and Python versions the cluster's head was started with.

    Ray records them in the GCS when the head starts (the "cluster metadata"); they are what
    Ray itself compares against, but Ray only logs a warning on a mismatch.

    Returns:
        A dict with "ray_version" and "python_version", or None if the cluster has no record.
    """
    # Private Ray API: the key and namespace `ray._common.usage.usage_lib` writes at head start.
    from ray._common.usage.usage_constants import CLUSTER_METADATA_KEY
    from ray._private.ray_constants import KV_NAMESPACE_CLUSTER
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(CLUSTER_METADATA_KEY, namespace=KV_NAMESPACE_CLUSTER)
    if not raw:
        return None
    meta = json.loads(raw)
    return {"ray_version": meta.get("ray_version"), "python_version": meta.get("python_version")}


def compare_versions(local: Mapping[str, str], cluster: Mapping[str, str]) -> None:
    """Raises if the local Ray or Python version differs from the cluster's.

    Python is compared on major.minor.micro, as Ray pickles code across processes and a
    different interpreter can fail to unpickle it in ways that surface much later.

    Raises:
        EnvironmentMismatchError: The versions differ; the message names both.
    """
    problems = [
        f"{key.split('_')[0]} {local[key]} here but {cluster[key]} on the cluster"
        for key in ("ray_version", "python_version")
        if cluster.get(key) is not None and local.get(key) != cluster[key]
    ]
    if problems:
        raise EnvironmentMismatchError(
            f"This replica ({sys.executable}) does not match its Ray cluster: "
            + "; ".join(problems)
            + ". Rebuild its runtime env with the cluster's versions (runtime_envs/)."
        )


def check_environment() -> dict:
    """Fails loudly when this process's Ray or Python differs from the cluster's.

    Returns:
        The local versions, for logging and `info()`.

    Raises:
        EnvironmentMismatchError: The versions differ.
    """
    local = local_versions()
    cluster = cluster_versions()
    if cluster is None:
        logger.warning("The cluster has no version record; skipping the version check.")
    else:
        compare_versions(local, cluster)
    return local


def assigned_gpu_fraction() -> float:
    """The share of one GPU Ray scheduled this replica with (0 when it has none)."""
    ctx = ray.get_runtime_context()
    if not ctx.get_accelerator_ids().get("GPU"):
        return 0.0
    try:
        resources = ctx.get_assigned_resources()
    except Exception:  # outside an actor (e.g. a test calling this directly)
        return 0.0
    return float(resources.get("GPU", 0.0))




# -- model specs, published where the ingress reads them without queueing behind requests ---------

_SPEC_NAMESPACE = "klipnote"


def publish_spec(app_name: str, spec: Mapping) -> None:
    """Records a model app's spec (`ModelSpec.to_dict()`) in the cluster's key-value store.

    The ingress reads it from there rather than through the app's handle: a handle call waits in
    the replicas' request queue, so a busy model app would keep its spec from the very requests
    that need it to be routed.
    """
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(f"spec:{app_name}", json.dumps(dict(spec)), overwrite=True, namespace=_SPEC_NAMESPACE)


def read_spec(app_name: str) -> Optional[dict]:
    """The spec `publish_spec` recorded for `app_name`, or None."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(f"spec:{app_name}", namespace=_SPEC_NAMESPACE)
    return json.loads(raw) if raw else None
