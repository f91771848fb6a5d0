"""Shared fixtures: paths to real recordings, and one real Serve cluster per test session.

The cluster is started here with `ray.init(address="local")` (never attaching to a cluster
that `make serve` runs) and stopped here. The three applications are deployed from the same
generated local config that `make serve` deploys, through the dashboard's REST API, which is
what `serve deploy` uses.
"""

from __future__ import annotations

import copy
import json
import socket
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
APP_NAMES = ("transcription", "belle2", "whisperx")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_manifest() -> Dict[str, dict]:
    """The corpus manifest rows of the recordings copied into tests/data, by file name."""
    rows = [json.loads(line) for line in (DATA / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return {r["file"]: r for r in rows}


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def manifest() -> Dict[str, dict]:
    return load_manifest()


class ServeCluster:
    """A Ray cluster with KlipNote's applications, owned by the test session."""

    def __init__(self, config: dict, dashboard_url: str, http_url: str):
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        self.config = config
        self.dashboard_url = dashboard_url
        self.url = http_url
        self.client = ServeSubmissionClient(dashboard_url)

    def app_config(self, name: str) -> dict:
        return copy.deepcopy(next(a for a in self.config["applications"] if a["name"] == name))

    def deploy(self, *, without: Iterable[str] = (), extra: Optional[List[dict]] = None) -> None:
        """Declares the applications: the local config's, less `without`, plus `extra`.

        Like `serve deploy`, this replaces the whole set: unchanged applications keep running.
        """
        config = copy.deepcopy(self.config)
        config["applications"] = [a for a in config["applications"] if a["name"] not in set(without)]
        config["applications"] += extra or []
        self.client.deploy_applications(config)

    def details(self) -> dict:
        return self.client.get_serve_details()

    def wait(self, names: Iterable[str] = APP_NAMES, timeout_s: float = 600) -> None:
        from serve_app.ready import wait_for_apps

        wait_for_apps(self.details, list(names), timeout_s=timeout_s)

    def wait_gone(self, name: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while name in self.details().get("applications", {}):
            if time.monotonic() > deadline:
                raise TimeoutError(f"application {name} still present after {timeout_s} s")
            time.sleep(1)


@pytest.fixture(scope="session")
def serve_cluster():
    import ray
    from ray import serve

    from runtime_envs.make_local_config import local_config

    http_port, dashboard_port = _free_port(), _free_port()
    production = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    overlay = yaml.safe_load((ROOT / "runtime_envs" / "local.yaml").read_text())
    config = local_config(production, overlay, http_port=http_port)
    ray.init(
        address="local",
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        logging_level="WARNING",
        configure_logging=False,
    )
    cluster = ServeCluster(config, f"http://127.0.0.1:{dashboard_port}", f"http://127.0.0.1:{http_port}")
    try:
        _wait_for_dashboard(cluster)
        cluster.deploy()
        cluster.wait()
        yield cluster
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _wait_for_dashboard(cluster: ServeCluster, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cluster.details()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture(scope="session")
def base_url(serve_cluster) -> str:
    return serve_cluster.url
