"""Our log lines in Serve's logs, each with the id of the request it is about.

Serve writes what reaches its "ray.serve" logger to the replica's log file (JSON lines with
`request_id`, `application`, `deployment`, `replica` and `route` under `logging_config:
encoding: JSON`) and to stderr, stamped with the request context of the thread that logged.
Records of any other logger go to the worker's stderr only, without a request id. So each
replica sends its own packages' loggers to Serve's: one request can then be followed from the
ingress into the model app in the Ray dashboard's log view, or with grep.

Worker threads see the request context when they were started from the request's task
(`asyncio.to_thread` copies it); the batch runner serves many requests at once and lists their
ids in its own lines (`deployments/batching.py`).
"""

from __future__ import annotations

import logging

SERVE_LOGGER = "ray.serve"


class _ToServeLogger(logging.Handler):
    """Hands each record to Serve's logger, whose handlers are looked up at each record: Serve
    replaces them when the logging config changes."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(SERVE_LOGGER).handle(record)


def send_to_serve_logs(*packages: str) -> None:
    """Sends the loggers of `packages` (and their children) to Serve's, at Serve's level, and no
    longer to the root logger (Serve's own stderr handler prints them, with the request id)."""
    serve_logger = logging.getLogger(SERVE_LOGGER)
    for package in packages:
        package_logger = logging.getLogger(package)
        if not any(isinstance(h, _ToServeLogger) for h in package_logger.handlers):
            package_logger.addHandler(_ToServeLogger())
        package_logger.setLevel(serve_logger.getEffectiveLevel())
        package_logger.propagate = False
