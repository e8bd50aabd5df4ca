"""A throw-away PostgreSQL server for tests, from Debian's package.

``initdb`` into a fresh temporary directory, then ``postgres`` listening on a unix
socket in that directory only (no TCP port at all: nothing to collide with, nothing
reachable from outside). PostgreSQL refuses to run as root, so when the tests run as
root both commands run as the ``postgres`` user through ``setpriv`` (which execs, so
the process we hold is the server itself). ``fsync=off``: a test database needs no
durability. :func:`find_bindir` is None when PostgreSQL is not installed (tests skip;
``make test`` installs it).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from itertools import count

import pytest

__all__ = ["PostgresServer", "find_bindir", "pg_server"]


def find_bindir() -> str | None:
    """The newest ``/usr/lib/postgresql/<n>/bin`` holding initdb and postgres."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    for initdb in reversed(found):
        bindir = os.path.dirname(initdb)
        if os.access(os.path.join(bindir, "postgres"), os.X_OK):
            return bindir
    return None


class PostgresServer:
    """One PostgreSQL server; :meth:`new_database` gives each test its own database."""

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.dir = tempfile.mkdtemp(prefix="pacs-pg-")
        self.data = os.path.join(self.dir, "data")
        self.user = "pacs"
        self._seq = count(1)
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._prefix = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                            "--init-groups", "--"]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        subprocess.run(
            [*self._prefix, os.path.join(self.bindir, "initdb"), "-D", self.data,
             "-U", self.user, "-A", "trust", "-E", "UTF8", "--no-sync"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout,
        )  # fmt: skip
        self.proc = subprocess.Popen(
            [*self._prefix, os.path.join(self.bindir, "postgres"), "-D", self.data,
             "-h", "", "-k", self.dir, "-c", "fsync=off", "-c", "full_page_writes=off",
             "-c", "synchronous_commit=off", "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            ready = subprocess.run(
                [os.path.join(self.bindir, "pg_isready"), "-q", "-h", self.dir, "-U", self.user,
                 "-d", "postgres"],
                check=False,
            )  # fmt: skip
            if ready.returncode == 0:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("PostgreSQL did not start")
            time.sleep(0.1)

    def url(self, database: str = "postgres") -> str:
        """A libpq URL for ``database`` over the unix socket."""
        return f"postgresql://{self.user}@/{database}?host={self.dir}"

    def new_database(self) -> str:
        """Create an empty database; returns its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._seq)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown: disconnect clients, stop
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (import this fixture into a conftest or
    test module to use it); skips when PostgreSQL or psycopg is not installed."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (make test installs it)")
    if importlib.util.find_spec("psycopg") is None:
        pytest.skip("psycopg is not installed (the postgresql extra)")
    server = PostgresServer(bindir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
