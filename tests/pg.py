"""A throwaway PostgreSQL cluster for tests: initdb in a temp folder, a free port, stopped after.

Debian's postgresql binaries refuse to run as root, so as root they run as the ``postgres``
user. Skips (with the reason) only where no PostgreSQL is installed at all.
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


def _bindir() -> Path | None:
    for candidate in (shutil.which("initdb"), shutil.which("pg_ctl")):
        if candidate:
            return Path(candidate).parent
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / "initdb").exists():
            return root
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_pg(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(cmd)]
    return cmd


@contextmanager
def postgres_server(dbnames: tuple[str, ...] = ("optuna",)) -> Iterator[dict[str, str]]:
    """Start a cluster; yield {dbname: url}; always stop and delete it."""
    bindir = _bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="mo-pg-"))
    os.chmod(root, 0o777)
    data, port = root / "data", _free_port()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    run = lambda cmd: subprocess.run(_as_pg(cmd), check=True, capture_output=True, text=True, timeout=120)  # noqa: E731
    try:
        run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-o",
             f"'-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200'", "start"])
        for name in dbnames:
            subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c",
                            f"create database {name};"], check=True, capture_output=True, timeout=60)
        yield {name: f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{name}" for name in dbnames}
    finally:
        subprocess.run(_as_pg([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
