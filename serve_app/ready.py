"""Waits until the deployed applications run, then checks the HTTP health endpoint.

    python -m serve_app.ready --address http://127.0.0.1:8265 --url http://127.0.0.1:8000

Exits 1 with Serve's own message as soon as an application fails to deploy.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request
from typing import Callable, Dict, Iterable, Optional

FAILED = {"DEPLOY_FAILED", "UNHEALTHY"}


class DeployFailedError(RuntimeError):
    pass


def wait_for_apps(
    fetch_details: Callable[[], Dict],
    names: Optional[Iterable[str]] = None,
    *,
    timeout_s: float = 600,
    poll_s: float = 2,
) -> Dict[str, str]:
    """Polls Serve's details until every application is RUNNING.

    Args:
        fetch_details: Returns Serve's details dict (`ServeSubmissionClient.get_serve_details`).
        names: Applications to wait for (default: all deployed).
        timeout_s: Give up after this long.

    Returns:
        Each application's status.

    Raises:
        DeployFailedError: An application failed to deploy; the message is Serve's.
        TimeoutError: Not all running in time.
    """
    deadline = time.monotonic() + timeout_s
    statuses: Dict[str, str] = {}
    while True:
        apps = fetch_details().get("applications", {})
        wanted = list(names) if names is not None else list(apps)
        statuses = {n: apps.get(n, {}).get("status", "NOT_DEPLOYED") for n in wanted}
        failed = {n: _failure_message(apps[n]) for n, s in statuses.items() if s in FAILED}
        if failed:
            raise DeployFailedError("; ".join(f"{n}: {m}" for n, m in failed.items()))
        if wanted and all(s == "RUNNING" for s in statuses.values()):
            return statuses
        if time.monotonic() > deadline:
            raise TimeoutError(f"Applications not running after {timeout_s:.0f} s: {statuses}")
        time.sleep(poll_s)


def _failure_message(app: Dict) -> str:
    """The app's message plus each unhealthy deployment's (where Serve puts the traceback)."""
    parts = [app.get("message", "")]
    for name, dep in app.get("deployments", {}).items():
        if dep.get("status") != "HEALTHY" and dep.get("message"):
            parts.append(f"{name}: {dep['message']}")
    return "\n".join(p for p in parts if p)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="http://127.0.0.1:8265", help="Ray dashboard address.")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="The service's base URL.")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    client = ServeSubmissionClient(args.address)
    try:
        statuses = wait_for_apps(client.get_serve_details, timeout_s=args.timeout)
    except (DeployFailedError, TimeoutError) as e:
        print(f"KlipNote Serve did not come up: {e}", file=sys.stderr)
        return 1
    with urllib.request.urlopen(f"{args.url}/health", timeout=30) as r:
        health = r.read().decode()
    print("Applications: " + ", ".join(f"{n} {s}" for n, s in statuses.items()))
    print(f"Health: {health}")
    print(f"KlipNote Serve is up at {args.url}: open {args.url}/ in a browser (API docs: {args.url}/docs; `make status`, `make stop`).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
