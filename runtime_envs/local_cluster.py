"""A Ray cluster that this process starts and stops, with Serve applications deployed through the
dashboard's REST API (what `serve deploy` uses).

The tests (`tests/conftest.py`) and `bench/gpu_speed.py` run on one: `ray.init(address="local")`
on free ports, so it never attaches to the cluster that `make serve` runs.
"""

from __future__ import annotations

import socket
import time
from typing import Iterable


# Ray's fixed defaults: a free port that the OS hands out could be one of them, and Ray refuses
# to start when two of its components would share a port.
_RAY_DEFAULT_PORTS = {6379, 8265, 8000, 10001, 52365}


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _RAY_DEFAULT_PORTS:
            return port


class LocalServeCluster:
    """Owns a local Ray cluster: `with LocalServeCluster() as cluster:` starts it and stops it."""

    def __init__(self, *, log_to_driver: bool = True):
        self.http_port, self.dashboard_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.client = None
        self._log_to_driver = log_to_driver

    def start(self, timeout_s: float = 120) -> "LocalServeCluster":
        """Starts Ray with its dashboard and returns once the dashboard answers."""
        import ray
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        ray.init(
            address="local",
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=self.dashboard_port,
            logging_level="WARNING",
            configure_logging=False,
            log_to_driver=self._log_to_driver,
        )
        self.client = ServeSubmissionClient(self.dashboard_url)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.details()
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()  # `with` calls no __exit__ when __enter__ raises
                    raise
                time.sleep(1)

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()

    def __enter__(self) -> "LocalServeCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def deploy_applications(self, config: dict) -> None:
        """Declares `config`'s applications; like `serve deploy`, this replaces the whole set."""
        self.client.deploy_applications(config)

    def details(self) -> dict:
        return self.client.get_serve_details()

    def wait(self, names: Iterable[str], timeout_s: float = 600) -> None:
        """Returns when the applications run; raises `serve_app.ready.DeployFailedError` if one fails."""
        from serve_app.ready import wait_for_apps

        wait_for_apps(self.details, list(names), timeout_s=timeout_s)

    def wait_gone(self, name: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while name in self.details().get("applications", {}):
            if time.monotonic() > deadline:
                raise TimeoutError(f"application {name} still present after {timeout_s} s")
            time.sleep(1)
