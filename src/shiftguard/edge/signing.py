"""Signed bundles: Ed25519 keys, the signature a bundle carries, and the keys a site trusts.

A bundle's ``manifest.json`` lists every other member with its SHA-256, so a signature over the
manifest's exact bytes covers the whole bundle. Export signs it with the lab's private key and puts
the signature in the archive as ``signature.json`` (the one member the manifest does not list): the
algorithm, the key id and the signature. :func:`~shiftguard.edge.bundle.open_bundle` checks it
against the keys the site trusts before anything in the bundle is used, and refuses a bundle that
is unsigned, signed by a key it does not trust, or altered after signing (a member changed and the
manifest re-hashed: the manifest's bytes no longer match the signature).

Keys (``shiftguard keys generate``):

- a private key, ``NAME.key``: PKCS#8 PEM, readable by its owner only. It never belongs in git;
  export finds it at ``$SHIFTGUARD_SIGNING_KEY``, else at the development key's place
  (:func:`development_key_path`, which ``make demo`` fills).
- a public key, ``NAME.pub``: one line, ``shiftguard-ed25519 <base64 of the 32-byte key> NAME``.
  Its id is the first 16 hex digits of the SHA-256 of the 32 bytes.

The keys a site trusts (:class:`Trust`): the public key files its site file lists
(``trusted_keys``), plus those in ``$SHIFTGUARD_TRUSTED_KEYS`` (files or folders of ``.pub`` files,
separated by ``:``), else in the user's trust folder (:func:`trust_dir`, where
``shiftguard keys generate --development`` puts the development key's public half).
``allow_unsigned`` (a site file's development switch, or ``SHIFTGUARD_ALLOW_UNSIGNED=1``) accepts
an unsigned bundle or an unknown key with a warning on every load; an altered bundle is refused
regardless.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shiftguard.errors import KeyFileError, SignatureError
from shiftguard.utils import config_dir

log = logging.getLogger(__name__)

SIGNATURE = "signature.json"
SIGNATURE_FORMAT = "shiftguard-signature"
ALGORITHM = "ed25519"
PUBLIC_PREFIX = "shiftguard-ed25519"
SIGNING_KEY_ENV = "SHIFTGUARD_SIGNING_KEY"
TRUSTED_KEYS_ENV = "SHIFTGUARD_TRUSTED_KEYS"
ALLOW_UNSIGNED_ENV = "SHIFTGUARD_ALLOW_UNSIGNED"
DEVELOPMENT = "development"


def development_key_path() -> Path:
    """Where the development signing key lives: ``<config dir>/keys/development.key``."""
    return config_dir() / "keys" / f"{DEVELOPMENT}.key"


def trust_dir() -> Path:
    """The user's folder of trusted public keys: ``<config dir>/trusted``."""
    return config_dir() / "trusted"


def key_id(raw_public: bytes) -> str:
    """The first 16 hex digits of the SHA-256 of a raw 32-byte public key."""
    return hashlib.sha256(raw_public).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    """A trusted Ed25519 public key: its raw 32 bytes, id, name and where it was read from."""

    raw: bytes
    name: str = ""
    source: str = ""

    @property
    def key_id(self) -> str:
        return key_id(self.raw)

    def line(self) -> str:
        """The ``.pub`` file's line."""
        return f"{PUBLIC_PREFIX} {base64.b64encode(self.raw).decode()} {self.name}".rstrip() + "\n"

    def verify(self, signature: bytes, data: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except InvalidSignature:
            return False
        return True


def read_public_key(path: Path | str) -> PublicKey:
    """A ``.pub`` file (see the module docstring).

    Raises:
        KeyFileError: the file is missing or is not one ShiftGuard public key.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the public key ({exc.strerror or exc})") from None
    parts = text.split()
    raw = b""
    if len(parts) >= 2 and parts[0] == PUBLIC_PREFIX:
        try:
            raw = base64.b64decode(parts[1], validate=True)
        except (binascii.Error, ValueError):
            raw = b""
    if len(raw) != 32:
        raise KeyFileError(
            f"{path}: not a ShiftGuard public key (one line: '{PUBLIC_PREFIX} <base64 of 32 "
            "bytes> NAME', as `shiftguard keys generate` writes it)"
        )
    return PublicKey(raw, " ".join(parts[2:]), str(path))


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key read from its file."""

    path: Path
    pem: bytes = field(repr=False)

    @property
    def public(self) -> PublicKey:
        from cryptography.hazmat.primitives import serialization

        raw = (
            self._key()
            .public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )
        return PublicKey(raw, self.path.stem, str(self.path))

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def _key(self):  # type: ignore[no-untyped-def]
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = serialization.load_pem_private_key(self.pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{self.path}: not an Ed25519 private key")
        return key

    def sign(self, data: bytes) -> bytes:
        return bytes(self._key().sign(data))


def read_signing_key(path: Path | str) -> SigningKey:
    """A private key file (PKCS#8 PEM, Ed25519).

    Raises:
        KeyFileError: the file is missing, unreadable or not an unencrypted Ed25519 private key.
    """
    path = Path(path).expanduser()
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the signing key ({exc.strerror or exc})") from None
    key = SigningKey(path, pem)
    try:
        key.public  # noqa: B018 - parses it
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            f"{path}: not an unencrypted Ed25519 private key in PEM ({exc}); make one with "
            "`shiftguard keys generate`"
        ) from None
    return key


def generate(folder: Path, name: str, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new key pair ``folder/NAME.key`` (mode 0600) and ``folder/NAME.pub``.

    Raises:
        FileExistsError: the key exists and ``overwrite`` is false.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    if private.exists() and not overwrite:
        raise FileExistsError(f"{private}: a key is already there; keep it, or pass --overwrite")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = private.with_name(f".{private.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    tmp.replace(private)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    public.write_text(PublicKey(raw, name).line(), encoding="utf-8")
    return private, public


def default_signer() -> SigningKey | None:
    """The key export signs with: ``$SHIFTGUARD_SIGNING_KEY``, else the development key when it
    exists, else ``None``.

    Raises:
        KeyFileError: ``$SHIFTGUARD_SIGNING_KEY`` names a file that is not a signing key.
    """
    named = os.environ.get(SIGNING_KEY_ENV, "").strip()
    if named:
        return read_signing_key(named)
    dev = development_key_path()
    return read_signing_key(dev) if dev.is_file() else None


def _key_files(entry: str) -> list[Path]:
    path = Path(entry).expanduser()
    return sorted(path.glob("*.pub")) if path.is_dir() else [path]


@dataclass(frozen=True)
class Trust:
    """The public keys a bundle may be signed by, and whether unsigned bundles are let through.

    Args:
        keys: explicit public key files (a site file's ``trusted_keys``, a ``--trusted-key``).
        allow_unsigned: the development switch: an unsigned bundle, or one signed by an unknown
            key, is accepted with a warning on every load.
        environment: also read ``$SHIFTGUARD_TRUSTED_KEYS`` (else the user's trust folder) and
            ``$SHIFTGUARD_ALLOW_UNSIGNED``.
        extra: keys already read (the one export just signed with).
    """

    keys: Sequence[str] = ()
    allow_unsigned: bool = False
    environment: bool = True
    extra: Sequence[PublicKey] = ()

    def public_keys(self) -> dict[str, PublicKey]:
        """The trusted keys by id.

        Raises:
            KeyFileError: a listed file is missing or not a public key.
        """
        entries = list(self.keys)
        if self.environment:
            named = os.environ.get(TRUSTED_KEYS_ENV, "").strip()
            if named:
                entries += [e for e in named.split(os.pathsep) if e]
            elif trust_dir().is_dir():
                entries.append(str(trust_dir()))
        out: dict[str, PublicKey] = {key.key_id: key for key in self.extra}
        for entry in entries:
            for path in _key_files(entry):
                key = read_public_key(path)
                out[key.key_id] = key
        return out

    def unsigned_allowed(self) -> bool:
        if self.allow_unsigned:
            return True
        return self.environment and os.environ.get(ALLOW_UNSIGNED_ENV, "") not in ("", "0")


def signature_document(manifest_bytes: bytes, signer: SigningKey) -> bytes:
    """``signature.json`` for a manifest's exact bytes."""
    doc = {
        "format": SIGNATURE_FORMAT,
        "algorithm": ALGORITHM,
        "key_id": signer.key_id,
        "signed": "manifest.json",
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "signature": base64.b64encode(signer.sign(manifest_bytes)).decode(),
    }
    return json.dumps(doc, indent=2, sort_keys=True).encode()


@dataclass(frozen=True)
class Verdict:
    """What checking a bundle's signature found: the signer's key id (``None`` unsigned) and
    whether a trusted key verified it."""

    key_id: str | None
    trusted: bool


def check_signature(
    bundle: Path, manifest_bytes: bytes, signature: bytes | None, trust: Trust
) -> Verdict:
    """Check ``signature.json`` against the manifest's bytes and the trusted keys.

    Raises:
        SignatureError: unsigned, signed by a key not trusted, or altered after signing (the
            development switch lets the first two through with a warning, never the third).
    """
    if signature is None:
        if trust.unsigned_allowed():
            log.warning(
                "%s: UNSIGNED bundle loaded (the development switch allow_unsigned is on; a "
                "clinical site must not run unsigned bundles)",
                bundle,
            )
            return Verdict(None, False)
        raise SignatureError(
            f"{bundle}: the bundle is not signed; re-export it with a signing key "
            "(shiftguard keys generate; export signs with $SHIFTGUARD_SIGNING_KEY), or for "
            "development only set allow_unsigned"
        )
    try:
        doc = json.loads(signature.decode("utf-8"))
        if doc.get("format") != SIGNATURE_FORMAT or doc.get("algorithm") != ALGORITHM:
            raise ValueError(f"format {doc.get('format')!r}, algorithm {doc.get('algorithm')!r}")
        kid, sig = str(doc["key_id"]), base64.b64decode(doc["signature"], validate=True)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise SignatureError(f"{bundle}: {SIGNATURE} is malformed ({exc}); do not use it") from None
    keys = trust.public_keys()
    key = keys.get(kid)
    if key is None:
        if trust.unsigned_allowed():
            log.warning(
                "%s: signed by key %s, which this site does not trust; loaded because the "
                "development switch allow_unsigned is on",
                bundle,
                kid,
            )
            return Verdict(kid, False)
        known = ", ".join(sorted(keys)) or "none"
        raise SignatureError(
            f"{bundle}: signed by key {kid}, which this site does not trust (trusted: {known}); "
            "add the exporting lab's public key to trusted_keys if you trust it"
        )
    if not key.verify(sig, manifest_bytes):
        raise SignatureError(
            f"{bundle}: the signature by key {kid} does not match the manifest; the bundle was "
            "altered after it was signed: do not use it"
        )
    return Verdict(kid, True)


def trusted_from(entries: Iterable[str]) -> list[str]:
    """Key file entries with ``~`` expanded (what a site file or flag gives)."""
    return [str(Path(e).expanduser()) for e in entries]
