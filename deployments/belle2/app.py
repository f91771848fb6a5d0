"""The BELLE-2 application: the shared model replica around `Belle2Core` (deployments/belle2/core.py).

Runs in the belle2 runtime env; the module's top level imports only what every env has, so the
ingress env can validate its settings.
"""

from __future__ import annotations

from typing import Any, Dict

from ray.serve import Application

from deployments.belle2.core import Belle2Args, Belle2Core
from deployments.replica import ModelReplica, model_app

__all__ = ["Belle2Args", "Belle2Replica", "build_app"]


class Belle2Replica(ModelReplica):
    """A BELLE-2 replica: the shared handle methods plus `speedup_counts`."""

    def speedup_counts(self) -> Dict[str, int]:
        """How often each decoding shortcut has applied since start, and how many linear layers
        run on oneDNN. All stay 0 with `decoding_shortcuts: false` and `onednn_linears: false`,
        or when a guard turned them off (`info()["warnings"]` says why)."""
        return self.core.speedup_counts()


def build_app(args: Dict[str, Any]) -> Application:
    """The BELLE-2 application: one `Belle2Transcriber` deployment.

    Args:
        args: The Serve config's `args:` (see `Belle2Args`).
    """
    return model_app(Belle2Core, args, name="Belle2Transcriber", replica=Belle2Replica)
