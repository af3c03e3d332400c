"""The MLflow store: where it is, whether it can be reached, and where artifacts go.

A local store (the default ``sqlite:///<runs_dir>/mlflow.db``) keeps its artifacts in
``<runs_dir>/mlartifacts`` under ``mlflow-artifacts:/`` URIs, never absolute paths: the tracking
server started by ``python -m orchestrator ui`` (``mlflow server --artifacts-destination
<runs_dir>/mlartifacts``) serves them, so ``runs/`` can be moved or copied to another machine
and every artifact still shows. Without a server, MLflow's client cannot write such URIs, so
``LocalArtifacts`` writes the files where that server will look for them.

A remote store (``tracking.uri=http://host:port``) is written through the client, and its
server decides where artifacts live.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError, redact_text

ARTIFACTS_DIR = "mlartifacts"
PROXY_SCHEME = "mlflow-artifacts:"


def tracking_uri(uri: str | None, runs_dir: Path) -> str:
    """The tracking URI (default: ``sqlite:///<runs_dir>/mlflow.db``)."""
    return uri or f"sqlite:///{(runs_dir / 'mlflow.db').resolve()}"


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def check_tracking(uri: str | None, runs_dir: Path) -> None:
    """Fail in one line if the tracking store cannot be reached; creates nothing."""
    from orchestrator.study.storage import check_storage

    uri = tracking_uri(uri, runs_dir)
    try:
        if uri.startswith(("http://", "https://")):
            import urllib.request

            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as reply:  # noqa: S310
                reply.read()
        elif uri.startswith("sqlite:///"):
            folder = Path(uri.removeprefix("sqlite:///")).parent
            if not folder.is_dir():
                raise OSError(f"folder {folder} does not exist")
        elif "://" in uri and not uri.startswith(("file:", "databricks")):
            check_storage(uri)
    except UserError as err:
        raise UserError(f"cannot reach MLflow tracking store {redact_text(uri)}: "
                        f"{str(err).split(': ', 1)[-1]}") from None
    except Exception as err:  # noqa: BLE001 - unreachable server, refused connection, ...
        raise UserError(f"cannot reach MLflow tracking store {redact_text(uri)}: "
                        f"{redact_text(' '.join(str(err).split()))[:200]}") from None


def artifact_location(experiment: str) -> str:
    """The movable artifact location of a local store's experiment."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", experiment).strip("-") or "experiment"
    return f"{PROXY_SCHEME}/{slug}"


class LocalArtifacts:
    """Writes a run's artifacts where ``mlflow server --artifacts-destination`` serves them.

    ``root``: ``<runs_dir>/mlartifacts``; an artifact URI ``mlflow-artifacts:/a/b`` is the
    file ``root/a/b``. Files are written to a temporary name and renamed into place.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, artifact_uri: str, name: str = "") -> Path:
        if not artifact_uri.startswith(PROXY_SCHEME):
            raise ValueError(f"not a proxied artifact URI: {artifact_uri}")
        path = self.root / artifact_uri[len(PROXY_SCHEME):].lstrip("/")
        return path / name if name else path

    def write_text(self, artifact_uri: str, name: str, text: str) -> None:
        self._write(self.folder(artifact_uri, name), text.encode())

    def write_json(self, artifact_uri: str, name: str, data: Any) -> None:
        self.write_text(artifact_uri, name, json.dumps(data, indent=2, default=str))

    def write_figure(self, artifact_uri: str, name: str, figure: Any) -> None:
        path = self.folder(artifact_uri, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=path.suffix, delete=False) as tmp:
            figure.savefig(tmp.name, bbox_inches="tight", dpi=110)  # nothing cut off at the edges
        Path(tmp.name).replace(path)

    def copy(self, artifact_uri: str, name: str, source: Path) -> None:
        """Copy a file or a folder (a model) under the run's artifacts."""
        target = self.folder(artifact_uri, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            stage = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
            shutil.rmtree(stage)
            shutil.copytree(source, stage)
            if target.exists():
                shutil.rmtree(target)
            stage.replace(target)
        else:
            self._write(target, source.read_bytes())

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            tmp.write(data)
        Path(tmp.name).replace(path)
