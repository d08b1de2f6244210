"""The edge bundle: one versioned file holding a model and everything needed to run and judge it.

A bundle is a ZIP archive (``NAME.sgbundle``) with ``manifest.json`` at its root and the members
the manifest lists, each with its SHA-256 and size::

    manifest.json          name, version, members, input, preprocessing, threshold, selection rules,
                           class names, training-data fingerprint, the trained model file's SHA-256
    model.onnx             the network (ONNX; what the edge runner executes)
    model.torchscript.pt   the same network as TorchScript, for GPU sites that prefer it
    reference.csv          PHI-free feature statistics of the training series (drift baseline)
    model_card.md          intended use, data, per-segment and robustness results, limitations
    validation/...         the validation stage's tables the card quotes

:func:`open_bundle` verifies a bundle before anything in it is used: it must be a readable ZIP whose
member names stay inside the archive, whose manifest is signed by a key the site trusts
(``signature.json``, :mod:`shiftguard.edge.signing`) and has a known format version, whose members
are exactly those listed with matching hashes, and whose models are in formats the runner knows.
Nothing is ever unpickled: the manifest is JSON, the model ONNX, the tables CSV.

A bundle's ``version`` is :func:`content_version`: a digest of what decides its predictions, so the
same export gives the same bytes wherever it runs. The MLflow registry's version number and run id
are not in the bundle; MLflow tags the registered model version with the bundle's version, file
name and SHA-256 (``shiftguard.export``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import stat
import zipfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

from shiftguard.calibration import IDENTITY, Calibration
from shiftguard.edge.signing import (
    SIGNATURE,
    SigningKey,
    Trust,
    check_signature,
    default_signer,
    signature_document,
)
from shiftguard.errors import BundleError, MetricInputError

log = logging.getLogger(__name__)

FORMAT = "shiftguard-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: members the export stage writes and a site recalibration rewrites
CALIBRATION_MEMBER = "calibration.json"
CARD_MEMBER = "model_card.md"
SUFFIX = ".sgbundle"
#: model formats a bundle may declare; the edge runner executes ``onnx``
MODEL_FORMATS = ("onnx", "torchscript")
#: refuse archives that would expand beyond this (a ZIP bomb, or not a bundle at all)
MAX_TOTAL_BYTES = 4 * 2**30
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_member_name(bundle: Path, name: str) -> None:
    path = PurePosixPath(name)
    if (
        not name
        or "\\" in name
        or name.startswith("/")
        or path.is_absolute()
        or any(part in ("", ".", "..") for part in name.rstrip("/").split("/"))
        or re.match(r"^[A-Za-z]:", name)
    ):
        raise BundleError(
            f"{bundle}: member {name!r} has a path that escapes the bundle's folder; refusing the "
            "bundle (a bundle holds plain relative paths only)"
        )


def bundle_file_name(name: str, version: str | None = None) -> str:
    """``NAME.sgbundle`` (what the export stage writes), or ``NAME-vVERSION.sgbundle`` to keep
    several versions side by side.

    >>> bundle_file_name("shiftguard-classifier"), bundle_file_name("m", "3")
    ('shiftguard-classifier.sgbundle', 'm-v3.sgbundle')
    """
    for what, value in (("name", name), ("version", version)):
        if value is not None and not _NAME_RE.match(value):
            raise ValueError(f"bundle {what} {value!r}: use letters, digits, '.', '_' and '-'")
    return f"{name}{SUFFIX}" if version is None else f"{name}-v{version}{SUFFIX}"


#: the manifest's sections that decide what a bundle predicts (with its model members' bytes)
PREDICTIVE_SECTIONS = (
    "models",
    "input",
    "preprocessing",
    "output",
    "threshold",
    "series_selection",
)
VERSION_DIGITS = 12


def content_version(manifest: Mapping[str, Any], members: Mapping[str, bytes]) -> str:
    """A bundle version that is a digest of what decides its predictions: the SHA-256 of each model
    member and the manifest's :data:`PREDICTIVE_SECTIONS`; the first 12 hex digits.

    Two exports that predict alike get the same version (and so the same SR and key-image UIDs);
    a new network, threshold, preprocessing or selection rule gets a new one. The drift reference,
    model card and validation tables do not enter it: the bundle file's SHA-256 covers them.

    >>> m = {"models": [{"member": "model.onnx", "format": "onnx"}], "threshold": 0.5}
    >>> content_version(m, {"model.onnx": b"net"})
    '604430951f56'
    >>> content_version({**m, "threshold": 0.4}, {"model.onnx": b"net"})
    '83ab9d561494'
    """
    decisive = {key: manifest.get(key) for key in PREDICTIVE_SECTIONS}
    decisive["model_sha256"] = {
        str(entry["member"]): sha256_bytes(members[str(entry["member"])])
        for entry in manifest.get("models", [])
    }
    if manifest.get("calibration"):  # a bundle without one keeps the version it always had
        section = manifest["calibration"]
        decisive["calibration"] = section
        decisive["calibration_sha256"] = sha256_bytes(members[str(section["member"])])
    text = json.dumps(decisive, sort_keys=True, separators=(",", ":"))
    return sha256_bytes(text.encode())[:VERSION_DIGITS]


def runtime_digest(manifest: Mapping[str, Any]) -> str:
    """A digest of everything in a bundle that decides what its runner computes: the manifest
    without its documents (Markdown members: the model card, which names the signer), its smoke
    test's reference series and the manifest's free text. Re-signing a bundle, or signing it with another key, leaves it
    unchanged; a cache of the runner's outputs keyed by it stays valid (the drift scenarios'
    pools)."""
    members = {
        str(name): str(entry.get("sha256"))
        for name, entry in dict(manifest.get("members", {})).items()
        if not str(name).endswith(".md") and not str(name).startswith("smoke/")
    }
    decisive = {key: manifest.get(key) for key in (*PREDICTIVE_SECTIONS, "monitor")}
    text = json.dumps({"members": members, **decisive}, sort_keys=True, separators=(",", ":"))
    return sha256_bytes(text.encode())


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its manifest and members' bytes, read once, checked against their hashes."""

    path: Path
    manifest: dict[str, Any]
    members: dict[str, bytes]
    signer: str | None = None  # the key id that signed it; None: unsigned (development switch)
    trusted: bool = False  # whether a trusted key verified the signature

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def threshold(self) -> float:
        """The operating point, on the scale of :attr:`calibration`'s output."""
        return float(self.manifest["threshold"])

    @cached_property
    def calibration(self) -> Calibration:
        """The map from the network's probability to the reported one (the identity for a
        bundle exported without one); :func:`open_bundle` has checked that it reads."""
        section = self.manifest.get("calibration")
        if not section:
            return IDENTITY
        member = str(section["member"])
        return Calibration.from_json(json.loads(self.members[member]), member)

    def model(self, fmt: str = "onnx") -> bytes:
        """The bytes of the model in format ``fmt``.

        Raises:
            BundleError: the bundle holds no model in that format.
        """
        for entry in self.manifest["models"]:
            if entry["format"] == fmt:
                return self.members[entry["member"]]
        raise BundleError(
            f"{self.path}: holds no {fmt} model (it has: "
            f"{', '.join(m['format'] for m in self.manifest['models'])}); re-export it"
        )

    def text(self, member: str) -> str:
        return self.members[member].decode("utf-8")


def write_bundle(
    path: Path,
    manifest: Mapping[str, Any],
    members: Mapping[str, bytes],
    signer: SigningKey | None = None,
    sign: bool = True,
    stored: Collection[str] = (),
) -> Path:
    """Write ``members``, a manifest listing them (with hashes and sizes) and the manifest's
    signature (``signature.json``) to ``path``.

    The archive is deterministic for the same inputs and key (Ed25519 signatures are): members in
    name order, fixed timestamps. ``manifest`` must not carry ``members`` or ``format`` keys; they
    are filled in here. The key is ``signer``, else :func:`~shiftguard.edge.signing.default_signer`
    (``$SHIFTGUARD_SIGNING_KEY`` or the development key); with none, or ``sign=False``, the bundle
    is unsigned (logged), and a site opens it only with the development switch. The manifest,
    ``signature.json`` and the members named in ``stored`` are stored uncompressed, so a bundle's size does not
    depend on which key signed it (compressed, the key id in a model card could change it).

    Returns:
        ``path``, verified by :func:`open_bundle` (trusting ``signer``'s key).
    """

    if sign and signer is None:
        signer = default_signer()
    if signer is None:
        log.warning("%s: written UNSIGNED (no signing key); sites refuse it", path)

    for name in members:
        _check_member_name(path, name)
        if name in (MANIFEST, SIGNATURE):
            raise ValueError(f"{name} is written by write_bundle; do not pass it as a member")
    full = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **manifest,
        "members": {
            name: {"sha256": sha256_bytes(data), "size": len(data)}
            for name, data in sorted(members.items())
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    manifest_bytes = json.dumps(full, indent=2, sort_keys=True).encode()
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        entries = [(MANIFEST, manifest_bytes)]
        if signer is not None:
            entries.append((SIGNATURE, signature_document(manifest_bytes, signer)))
        entries += sorted(members.items())
        plain = {MANIFEST, SIGNATURE, *stored}  # the manifest holds hashes that differ per key
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED if name in plain else zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            zf.writestr(info, data)
    tmp.replace(path)
    if signer is not None:
        open_bundle(path, Trust(extra=(signer.public,), environment=False))
    else:
        open_bundle(path, signature=False)
    return path


def _read_archive(path: Path) -> dict[str, bytes]:
    if not path.is_file():
        raise BundleError(f"{path}: no such bundle file")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            total = sum(i.file_size for i in infos)
            if total > MAX_TOTAL_BYTES:
                raise BundleError(
                    f"{path}: would expand to {total / 2**30:.1f} GiB, over the "
                    f"{MAX_TOTAL_BYTES / 2**30:.0f} GiB limit; not a ShiftGuard bundle"
                )
            out: dict[str, bytes] = {}
            for info in infos:
                _check_member_name(path, info.filename)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise BundleError(f"{path}: member {info.filename!r} is a symbolic link")
                if info.is_dir():
                    continue
                if info.filename in out:
                    raise BundleError(f"{path}: member {info.filename!r} appears twice")
                out[info.filename] = zf.read(info)
            return out
    except zipfile.BadZipFile as exc:
        raise BundleError(
            f"{path}: not a readable bundle ({exc}); the file is truncated or is not a "
            "ShiftGuard bundle: copy it again and check its SHA-256 with the exporting site"
        ) from exc
    except (EOFError, OSError, zipfile.LargeZipFile) as exc:  # truncated inside a member
        raise BundleError(
            f"{path}: cannot be read ({exc}); the file is truncated or damaged"
        ) from exc


def _check_manifest(path: Path, manifest: Any) -> dict[str, Any]:
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: {MANIFEST} is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise BundleError(
            f"{path}: {MANIFEST} format is {manifest.get('format')!r}, not {FORMAT!r}"
        )
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {version!r}; this runner reads version "
            f"{FORMAT_VERSION}: upgrade shiftguard or re-export the bundle"
        )
    required = ("name", "version", "members", "models", "input", "preprocessing", "threshold")
    missing = [key for key in required if key not in manifest]
    if missing:
        raise BundleError(f"{path}: {MANIFEST} lacks {', '.join(missing)}")
    if not isinstance(manifest["members"], dict) or not isinstance(manifest["models"], list):
        raise BundleError(f"{path}: {MANIFEST} 'members' must be an object, 'models' a list")
    for entry in manifest["models"]:
        fmt = entry.get("format") if isinstance(entry, dict) else None
        if fmt not in MODEL_FORMATS:
            raise BundleError(
                f"{path}: asks for model format {fmt!r}, which this runner does not know "
                f"(known: {', '.join(MODEL_FORMATS)})"
            )
        if entry.get("member") not in manifest["members"]:
            raise BundleError(f"{path}: model member {entry.get('member')!r} is not in the bundle")
    if not any(entry["format"] == "onnx" for entry in manifest["models"]):
        raise BundleError(f"{path}: holds no ONNX model, which the edge runner needs")
    threshold = manifest["threshold"]
    if not isinstance(threshold, int | float) or not 0.0 <= float(threshold) <= 1.0:
        raise BundleError(f"{path}: threshold {threshold!r} is not a probability in [0, 1]")
    return manifest


def open_bundle(path: Path | str, trust: Trust | None = None, signature: bool = True) -> Bundle:
    """Read and verify a bundle.

    Args:
        path: the ``.sgbundle`` file.
        trust: the keys it may be signed by (:class:`~shiftguard.edge.signing.Trust`; default:
            ``$SHIFTGUARD_TRUSTED_KEYS``, else the user's trust folder).
        signature: check the signature (``False`` only where the caller just wrote the bundle).

    Raises:
        BundleError: the file is missing, truncated or not a ZIP; a member path escapes the
            archive; the manifest is missing, malformed or of an unknown format version; a member
            is missing, unlisted or does not match its SHA-256 or size; a model format is unknown.
        SignatureError: the bundle is unsigned, signed by a key not trusted, or altered after it
            was signed (:func:`~shiftguard.edge.signing.check_signature`).
    """
    path = Path(path)
    files = _read_archive(path)
    if MANIFEST not in files:
        raise BundleError(f"{path}: has no {MANIFEST}; not a ShiftGuard bundle")
    manifest_bytes = files.pop(MANIFEST)
    signed = files.pop(SIGNATURE, None)
    verdict = (
        check_signature(path, manifest_bytes, signed, trust if trust is not None else Trust())
        if signature
        else None
    )
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: {MANIFEST} is not valid JSON ({exc})") from exc
    manifest = _check_manifest(path, manifest)
    listed = manifest["members"]
    unlisted = sorted(set(files) - set(listed))
    if unlisted:
        raise BundleError(
            f"{path}: holds members the manifest does not list: {', '.join(unlisted)}; "
            "the bundle was altered after export"
        )
    for name, entry in listed.items():
        _check_member_name(path, name)
        if name not in files:
            raise BundleError(f"{path}: member {name!r} listed in the manifest is missing")
        data = files[name]
        if len(data) != entry.get("size") or sha256_bytes(data) != entry.get("sha256"):
            raise BundleError(
                f"{path}: member {name!r} does not match its SHA-256 in the manifest; the bundle "
                "was altered or damaged after export: do not use it"
            )
    bundle = Bundle(
        path=path,
        manifest=manifest,
        members=files,
        signer=verdict.key_id if verdict else None,
        trusted=bool(verdict and verdict.trusted),
    )
    _check_calibration(bundle)
    return bundle


def _check_calibration(bundle: Bundle) -> None:
    section = bundle.manifest.get("calibration")
    if not section:
        return
    if not isinstance(section, dict) or section.get("member") not in bundle.members:
        raise BundleError(
            f"{bundle.path}: {MANIFEST} 'calibration' must name a member of the bundle; "
            "re-export it"
        )
    try:
        _ = bundle.calibration
    except (MetricInputError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(
            f"{bundle.path}: its calibration map {section['member']} is unusable ({exc}); "
            "re-export the bundle"
        ) from None


def describe(bundle: Bundle) -> str:
    """A human-readable summary of a verified bundle (what ``shiftguard edge verify`` prints)."""
    m = bundle.manifest
    lines = [
        f"bundle   {bundle.path}",
        f"model    {m['name']} version {m['version']}",
        f"formats  {', '.join(e['format'] for e in m['models'])}",
        f"input    {m['input'].get('name', 'image')} {m['input'].get('shape')} "
        f"{m['input'].get('dtype', 'float32')}",
        f"threshold {m['threshold']:.4f} (chosen on the validation split)",
    ]
    cal = bundle.calibration
    if cal.method != "none":
        params = ", ".join(f"{k} {v}" for k, v in cal.parameters.items())
        lines.append(
            f"calibration {cal.method} ({params}; fitted on {cal.n} {cal.fitted_on} series)"
        )
    for key in ("training_data", "trained_model", "mlflow"):
        if m.get(key):
            lines.append(f"{key:<8} {json.dumps(m[key], sort_keys=True)}")
    lines.append("members")
    for name, entry in sorted(m["members"].items()):
        lines.append(f"  {name:<28} {entry['size']:>10} B  sha256 {entry['sha256']}")
    if bundle.signer is None:
        lines.append("verified: every member matches its SHA-256; UNSIGNED (development switch)")
    elif bundle.trusted:
        lines.append(
            f"verified: every member matches its SHA-256; signed by trusted key {bundle.signer}"
        )
    else:
        lines.append(
            f"verified: every member matches its SHA-256; signed by key {bundle.signer}, NOT "
            "trusted here (development switch)"
        )
    return "\n".join(lines)
