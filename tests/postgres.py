"""A real PostgreSQL server for the test session, from Debian's `postgresql` package.

`start_postgres()` creates a throwaway cluster in a temporary directory, starts it on a free
local port and creates the database `klipnote_jobs`; `.stop()` stops it and removes the
directory. The session fixture `postgres_url` wraps the two; a test module takes it with
`from tests.postgres import postgres_url  # noqa: F401`.

PostgreSQL refuses to run as root, so as root its programs run as the `postgres` user (which
the Debian package creates). Without the package the fixture fails rather than skips: CI
installs it (`make system-packages`).
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

DATABASE = "klipnote_jobs"
SUPERUSER = "postgres"
START_TIMEOUT_S = 60
START_ATTEMPTS = 3


class PostgresMissing(RuntimeError):
    """PostgreSQL's programs are not installed."""


def postgres_bin_dir() -> Path:
    """The directory of PostgreSQL's server programs (pg_ctl, initdb, postgres).

    Raises:
        PostgresMissing: neither pg_ctl on PATH nor /usr/lib/postgresql/<version>/bin exists.
    """
    on_path = shutil.which("pg_ctl")
    # Debian links a few programs into PATH; the link's target directory has all of them.
    if on_path and (Path(on_path).resolve().parent / "initdb").exists():
        return Path(on_path).resolve().parent
    versions = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "pg_ctl").exists()]
    if not versions:
        raise PostgresMissing("PostgreSQL is not installed: install the Debian package `postgresql` "
                              "(`make system-packages`), which the job store's tests need")
    return max(versions, key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)] or [0])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """A PostgreSQL cluster of our own in a temporary directory, listening on 127.0.0.1 only."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="klipnote-postgres-"))
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "log"
        self.port: Optional[int] = None
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            user = pwd.getpwnam(SUPERUSER)
            os.chown(self.dir, user.pw_uid, user.pw_gid)

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the database `klipnote_jobs`."""
        return self.database_url(DATABASE)

    def database_url(self, database: str) -> str:
        """The SQLAlchemy URL (psycopg 3) of a database of this server."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """Creates the cluster, starts the server and creates `klipnote_jobs`."""
        self._run("initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-locale")
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = free_port()
            options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
            try:
                self._run("pg_ctl", "-D", str(self.data_dir), "-o", options, "-l", str(self.log_path), "-w",
                          "-t", str(START_TIMEOUT_S), "start")
                break
            except RuntimeError:
                # The free port may have been taken between finding it and binding it.
                if attempt == START_ATTEMPTS or self._pid_file.exists():
                    raise
        self.create_database(DATABASE)

    def create_database(self, database: str) -> str:
        """Creates a database on this server; returns its URL."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, database)
        return self.database_url(database)

    def stop(self) -> None:
        """Stops the server (fast: open connections are cut) and removes its directory. Idempotent."""
        if self._pid_file.exists():
            # Left in place if the server will not stop, so that its log can be read.
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def _pid_file(self) -> Path:
        return self.data_dir / "postmaster.pid"

    def _run(self, program: str, *args: str) -> None:
        command: List[str] = [str(self.bin_dir / program), *args]
        if self._as_postgres:
            command = ["runuser", "-u", SUPERUSER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S + 30,
                              cwd=self.dir, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            log = self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                               f"\nserver log:\n{log}")


def start_postgres() -> PostgresServer:
    """Starts a PostgreSQL server of our own; the caller stops it with `.stop()`.

    Raises:
        PostgresMissing: PostgreSQL is not installed.
        RuntimeError: it would not start (the message has its output and log).
    """
    server = PostgresServer(postgres_bin_dir())
    # A session killed before its teardown still stops the server on the way out.
    atexit.register(server.stop)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of database `klipnote_jobs` on a real PostgreSQL server that lives for the session."""
    try:
        server = start_postgres()
    except PostgresMissing as e:
        missing = str(e)
    else:
        missing = None
    if missing is not None:
        # Outside the except block, so the report is the message alone, not a chain of tracebacks.
        pytest.fail(missing, pytrace=False)
    try:
        yield server.url
    finally:
        server.stop()
