"""The MLflow model registry as a site sees it: plain HTTP(S) to the tracking server's REST API
and artifact proxy, no MLflow package at the edge.

* :meth:`RegistryClient.resolve`: the model version a channel points at: an alias
  (``GET /api/2.0/mlflow/registered-models/alias``) or a pinned version number
  (``GET /api/2.0/mlflow/model-versions/get``), with its tags;
* :meth:`RegistryClient.download`: the version's bundle, found by the ``bundle_uri`` tag the
  export stage set (``runs:/<run>/bundle/<file>``), fetched through the server's artifact proxy
  (``/api/2.0/mlflow-artifacts/artifacts/...``, or ``/get-artifact`` for a server that does not
  proxy), streamed to a temporary file, checked against the ``bundle_sha256`` tag and only then
  renamed into place.

Every failure is a :class:`~shiftguard.errors.RegistryError` naming the request; the caller (the
edge service's follower) keeps serving what it has.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from shiftguard.errors import RegistryError
from shiftguard.tls import url_context

log = logging.getLogger(__name__)

BUNDLE_URI_TAG = "bundle_uri"
BUNDLE_SHA256_TAG = "bundle_sha256"
#: tags the fleet rollout sets on a model version (``shiftguard fleet rollout``)
ROLLOUT_WAVE_TAG = "rollout.wave"
ROLLOUT_HALTED_TAG = "rollout.halted"
_CHUNK = 1 << 20
MAX_ANSWER_BYTES = 8 << 20


@dataclass(frozen=True)
class ModelVersion:
    """One registered model version: its number, run and tags."""

    name: str
    version: str
    run_id: str
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def bundle_uri(self) -> str | None:
        return self.tags.get(BUNDLE_URI_TAG)

    @property
    def open_wave(self) -> int | None:
        """The highest rollout wave this version may go to (None: no staged rollout, every wave);
        -1 when the rollout is halted."""
        if self.tags.get(ROLLOUT_HALTED_TAG):
            return -1
        text = self.tags.get(ROLLOUT_WAVE_TAG)
        try:
            return None if text is None else int(text)
        except ValueError:
            return -1  # unreadable: safer to wait than to take it everywhere


class RegistryClient:
    """The registry's REST API (see the module docstring).

    Args:
        url: the tracking server, ``https://host:port`` (``http://`` on loopback only).
        token: a bearer token (None: no ``Authorization`` header).
        ca: PEM CA bundle the server's certificate must chain to.
        timeout_s: per request.

    Raises:
        CollectorAddressError: ``url`` is not http(s), or plain HTTP across the network.
    """

    def __init__(
        self, url: str, token: str | None = None, ca: str | None = None, timeout_s: float = 60.0
    ) -> None:
        self.url = url.rstrip("/")
        self._tls: ssl.SSLContext | None = url_context(url, ca, None, None, "edge.follow.url")
        self._token = token
        self.timeout_s = timeout_s

    @classmethod
    def from_settings(cls, settings: Any) -> RegistryClient:
        """From the ``edge.follow`` section (the token from its ``token_env`` variable)."""
        return cls(
            settings.url,
            token=os.environ.get(settings.token_env) or None,
            ca=settings.ca,
            timeout_s=settings.timeout_s,
        )

    def _open(self, route: str, params: dict[str, str] | None = None) -> Any:
        target = f"{self.url}{route}" + (f"?{urlencode(params)}" if params else "")
        headers = {"Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(target, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s, context=self._tls)
        except urllib.error.HTTPError as exc:
            with exc:
                detail = exc.read(2000).decode("utf-8", "replace").strip()
            raise RegistryError(
                f"registry {self.url}: GET {route} answered {exc.code}: {detail[:300]}"
            ) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise RegistryError(f"registry {self.url}: cannot reach it ({reason})") from None

    def _json(self, route: str, params: dict[str, str]) -> dict[str, Any]:
        with self._open(route, params) as answer:
            body = answer.read(MAX_ANSWER_BYTES)
        try:
            value = json.loads(body)
        except ValueError:
            raise RegistryError(f"registry {self.url}: GET {route} did not answer JSON") from None
        if not isinstance(value, dict):
            raise RegistryError(f"registry {self.url}: GET {route} answered {str(value)[:100]}")
        return value

    def resolve(self, model: str, channel: str) -> ModelVersion:
        """The version ``channel`` names: a version number, or an alias of ``model``.

        Raises:
            RegistryError: unreachable, or no such model, alias or version.
        """
        if channel.isdigit():
            route, params = (
                "/api/2.0/mlflow/model-versions/get",
                {"name": model, "version": channel},
            )
        else:
            route, params = "/api/2.0/mlflow/registered-models/alias", {"name": model, "alias": channel}  # fmt: skip
        entry = self._json(route, params).get("model_version")
        if not isinstance(entry, dict) or "version" not in entry:
            raise RegistryError(f"registry {self.url}: {model}@{channel}: no model version")
        tags = {str(t.get("key")): str(t.get("value", "")) for t in entry.get("tags") or []}
        return ModelVersion(
            name=str(entry.get("name", model)),
            version=str(entry["version"]),
            run_id=str(entry.get("run_id") or ""),
            tags=tags,
        )

    def _artifact_route(self, run_id: str, path: str) -> tuple[str, dict[str, str] | None]:
        """Where the server serves ``path`` of ``run_id``'s artifacts."""
        run = self._json("/api/2.0/mlflow/runs/get", {"run_id": run_id}).get("run") or {}
        root = str((run.get("info") or {}).get("artifact_uri") or "")
        if root.startswith("mlflow-artifacts:"):
            rest = root.removeprefix("mlflow-artifacts:")
            if rest.startswith("//"):  # mlflow-artifacts://host:port/path: the path after it
                rest = rest[2:].partition("/")[2]
            tail = rest.strip("/")
            return f"/api/2.0/mlflow-artifacts/artifacts/{quote(tail)}/{quote(path)}", None
        return "/get-artifact", {"path": path, "run_uuid": run_id}

    def download(self, version: ModelVersion, folder: Path) -> Path:
        """The version's bundle in ``folder`` (its file name from the URI), checked against its
        ``bundle_sha256`` tag.

        Raises:
            RegistryError: no ``bundle_uri`` tag, the transfer fails, or the hash differs.
        """
        uri = version.bundle_uri
        if not uri or not uri.startswith("runs:/"):
            raise RegistryError(
                f"registry {self.url}: {version.name} version {version.version} has no "
                f"{BUNDLE_URI_TAG} tag (runs:/<run>/bundle/<file>); export it with tracking on"
            )
        run_id, _, path = uri.removeprefix("runs:/").partition("/")
        expected = version.tags.get(BUNDLE_SHA256_TAG)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{version.version}-{Path(path).name}"
        route, params = self._artifact_route(run_id, path)
        partial = target.with_suffix(target.suffix + ".part")
        digest = hashlib.sha256()
        try:
            with self._open(route, params) as answer, partial.open("wb") as out:
                while chunk := answer.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except RegistryError:
            partial.unlink(missing_ok=True)
            raise
        except (OSError, http.client.HTTPException) as exc:
            partial.unlink(missing_ok=True)
            raise RegistryError(f"registry {self.url}: downloading {uri} failed ({exc})") from None
        if expected and digest.hexdigest() != expected:
            partial.unlink(missing_ok=True)
            raise RegistryError(
                f"registry {self.url}: {uri} has SHA-256 {digest.hexdigest()[:16]}..., the "
                f"version's {BUNDLE_SHA256_TAG} tag says {expected[:16]}...; not used"
            )
        partial.replace(target)
        log.info("registry: fetched %s version %s (%s)", version.name, version.version, uri)
        return target
