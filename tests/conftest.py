"""Shared fixtures: paths to real recordings, and one real Serve cluster per test session.

The cluster is started here with `ray.init(address="local")` (never attaching to a cluster
that `make serve` runs) and stopped here. The three applications are deployed from the same
generated local config that `make serve` deploys, through the dashboard's REST API, which is
what `serve deploy` uses.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional

import pytest
import yaml

from runtime_envs.local_cluster import LocalServeCluster
from runtime_envs.make_local_config import local_config

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
APP_NAMES = ("transcription", "belle2", "whisperx")


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


class ServeCluster(LocalServeCluster):
    """A Ray cluster with KlipNote's applications (the generated local config), owned by the test session."""

    def __init__(self):
        super().__init__()
        # An app whose replica cannot start is failed at its first try, not its third (Serve's
        # default, for a start that may work again): the tests that deploy one wait for Serve's
        # verdict and its reason, and each try imports a model stack anew. A deployment that has
        # run once is unaffected: its replicas are replaced however often they fail.
        os.environ.setdefault("RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT", "1")
        production = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
        overlay = yaml.safe_load((ROOT / "runtime_envs" / "local.yaml").read_text())
        self.config = local_config(production, overlay, http_port=self.http_port)
        # The session's own job database and media, and a webhook key the tests verify with.
        self.jobs_dir = Path(tempfile.mkdtemp(prefix="klipnote-jobs-"))
        self.webhook_secret = secrets.token_hex(16)
        jobs = next(a for a in self.config["applications"] if a["name"] == "transcription")["args"]["jobs"]
        jobs.update(data_dir=str(self.jobs_dir), webhook_secret=self.webhook_secret)

    def app_config(self, name: str, *, jobs: bool = False) -> dict:
        """An application's config, to deploy a variant of it beside it. A copy of the ingress app
        has no job runner unless `jobs`: one would claim the session's jobs from the same database."""
        app = copy.deepcopy(next(a for a in self.config["applications"] if a["name"] == name))
        if name == "transcription" and not jobs:
            app["args"]["jobs"]["enabled"] = False
            app["deployments"] = [d for d in app["deployments"] if d["name"] != "JobRunner"]
        return app

    def deploy(self, *, without: Iterable[str] = (), extra: Optional[List[dict]] = None) -> None:
        """Declares the applications: the local config's, less `without`, plus `extra`.

        Like `serve deploy`, this replaces the whole set: unchanged applications keep running.
        """
        config = copy.deepcopy(self.config)
        config["applications"] = [a for a in config["applications"] if a["name"] not in set(without)]
        config["applications"] += extra or []
        self.deploy_applications(config)

    def wait(self, names: Iterable[str] = APP_NAMES, timeout_s: float = 600) -> None:
        super().wait(names, timeout_s=timeout_s)

    def ingress_variant(self, name: str, *, route_prefix: Optional[str] = None, **args: Any) -> dict:
        """The ingress app's config as `name` at `route_prefix` (default `/<name>`), with `args`
        changed, on no CPU of its own (the three apps already hold this machine's two)."""
        ingress = self.app_config("transcription")
        ingress.update(name=name, route_prefix=route_prefix or f"/{name}")
        ingress["args"].update(args)
        ingress["deployments"][0]["ray_actor_options"] = {"num_cpus": 0}
        return ingress

    @contextmanager
    def beside(self, *apps: dict, timeout_s: float = 600) -> Iterator[str]:
        """`apps` deployed beside the session's three while the block runs, then removed; gives
        the URL of the first one's route prefix."""
        names = [app["name"] for app in apps]
        self.deploy(extra=list(apps))
        try:
            self.wait(names, timeout_s=timeout_s)
            yield f"{self.url}{apps[0]['route_prefix']}"
        finally:
            self.deploy()
            for name in names:
                self.wait_gone(name)


SMALL_PIECES = {"seconds": 20, "first_seconds_streaming": 6, "cut_search_seconds": 4}
"""Pieces for `probe-pieces`: short real recordings are cut where a sentence pauses."""


def small_pieces_ingress(cluster: ServeCluster, name: str = "probe-pieces") -> dict:
    """An ingress app beside the real one, at /<name>, with `SMALL_PIECES`, one language per
    recording, heard at several points of recordings from 60 s on (the defaults: 240 s pieces,
    a language per stretch of speech, 600 s). Its uploads
    may stall for 5 s (the default: 30 s), so a streamed answer longer than that shows that the
    idle limit ends with the upload."""
    ingress = cluster.ingress_variant(name, pieces=dict(SMALL_PIECES), upload_idle_timeout_s=5)
    # One language per recording, as a deployment that turns per-stretch routing off.
    ingress["args"]["language_id"].update(listen_points_min_seconds=60, per_stretch=False)
    return ingress


def pytest_collection_modifyitems(session, config, items):
    """Tests that change the cluster's replicas (autoscaling), then those that kill replicas, run
    after every other test, so no other test meets a restart."""
    items.sort(key=lambda item: 2 if item.get_closest_marker("chaos") else 1 if item.get_closest_marker("disruptive") else 0)


@pytest.fixture(scope="session")
def serve_cluster():
    cluster = ServeCluster()
    try:
        with cluster:
            cluster.deploy()
            cluster.wait()
            yield cluster
    finally:
        shutil.rmtree(cluster.jobs_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def base_url(serve_cluster) -> str:
    return serve_cluster.url
