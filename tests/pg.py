"""A throwaway PostgreSQL cluster for tests: initdb in a temp folder, a free port, stopped after.

Debian's postgresql binaries refuse to run as root, so as root they run as the ``postgres``
system user (created by Debian's ``postgresql`` package). With ``password``, a login role
``mo`` owns the databases and must authenticate over TCP with SCRAM (a ``pg_hba.conf`` rule
ahead of the trust rules), so URLs carry a real password. Tests that need a cluster skip
where no PostgreSQL is installed, unless ``MO_REQUIRE_PG=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROLE = "mo"


def _bindir() -> Path | None:
    for candidate in (shutil.which("initdb"), shutil.which("pg_ctl")):
        if candidate:
            return Path(candidate).parent
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / "initdb").exists():
            return root
    return None


def available() -> bool:
    """Whether PostgreSQL's server binaries are installed (or required: ``MO_REQUIRE_PG=1``).

    CI sets ``MO_REQUIRE_PG=1`` so that a missing PostgreSQL fails the tests that need it
    instead of skipping them.
    """
    return _bindir() is not None or os.environ.get("MO_REQUIRE_PG") == "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_pg(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(cmd)]
    return cmd


class PgCluster(dict):
    """``{dbname: url}`` of a running cluster, plus ``create_database(name)`` for fresh ones."""

    def __init__(self, port: int, password: str | None) -> None:
        super().__init__()
        self.port = port
        self.password = password

    def url(self, name: str) -> str:
        user = f"{ROLE}:{self.password}" if self.password else "postgres"
        return f"postgresql+psycopg2://{user}@127.0.0.1:{self.port}/{name}"

    def admin_url(self, name: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

    def psql(self, sql: str) -> None:
        subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-v",
                        "ON_ERROR_STOP=1", "-c", sql], check=True, capture_output=True, timeout=60)

    def create_database(self, name: str) -> str:
        """A new empty database (owned by the password role if any); returns its URL."""
        owner = f" owner {ROLE}" if self.password else ""
        self.psql(f"create database {name}{owner};")
        self[name] = self.url(name)
        return self[name]


@contextmanager
def postgres_server(dbnames: tuple[str, ...] = ("optuna",), password: str | None = None) -> Iterator[PgCluster]:
    """Start a cluster; yield {dbname: url}; always stop and delete it."""
    bindir = _bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="mo-pg-"))
    os.chmod(root, 0o777)
    data, port = root / "data", free_port()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    def run(cmd: list[str]) -> None:
        subprocess.run(_as_pg(cmd), check=True, capture_output=True, text=True, timeout=120)

    try:
        run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        if password:  # SCRAM for the role over TCP; first matching rule wins
            hba = data / "pg_hba.conf"
            hba.write_text(f"host all {ROLE} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-o",
             f"'-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200'", "start"])
        cluster = PgCluster(port, password)
        if password:
            cluster.psql(f"create role {ROLE} login password '{password}';")
        for name in dbnames:
            cluster.create_database(name)
        yield cluster
    finally:
        subprocess.run(_as_pg([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
