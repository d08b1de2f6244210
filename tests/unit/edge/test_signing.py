"""Signed bundles: what a site refuses (unsigned, an unknown key, altered after signing), what the
development switch lets through, and the keys command."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from shiftguard.cli import main
from shiftguard.edge.bundle import MANIFEST, describe, open_bundle, write_bundle
from shiftguard.edge.signing import (
    SIGNATURE,
    SignatureError,
    Trust,
    generate,
    read_public_key,
    read_signing_key,
)

from .conftest import make_manifest


def _members(onnx_model: bytes) -> dict[str, bytes]:
    return {"model.onnx": onnx_model, "reference.csv": b"mean\n1.0\n"}


def _rehashed(src: Path, dst: Path, member: str, data: bytes, **manifest_edits: Any) -> Path:
    """The attack a hash alone does not stop: change a member (and manifest fields), recompute
    the manifest's hashes, keep the old signature."""
    with zipfile.ZipFile(src) as zin:
        files = {info.filename: zin.read(info) for info in zin.infolist()}
    manifest = json.loads(files[MANIFEST])
    files[member] = data
    manifest["members"][member] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest.update(manifest_edits)
    files[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True).encode()
    with zipfile.ZipFile(dst, "w") as zout:
        for name, value in files.items():
            zout.writestr(name, value)
    return dst


@pytest.fixture
def signed(tmp_path: Path, tiny: dict[str, Any], onnx_model: bytes) -> Path:
    """A bundle signed with this test process's key, which the environment trusts."""
    return write_bundle(tmp_path / "m.sgbundle", make_manifest(tiny), _members(onnx_model))


def test_a_signed_bundle_opens_and_says_who_signed_it(signed: Path) -> None:
    bundle = open_bundle(signed)
    key = read_signing_key(os.environ["SHIFTGUARD_SIGNING_KEY"])
    assert bundle.signer == key.key_id and bundle.trusted
    assert f"signed by trusted key {key.key_id}" in describe(bundle)
    assert SIGNATURE not in bundle.members and SIGNATURE not in bundle.manifest["members"]


@pytest.mark.parametrize(
    ("member", "data", "edits"),
    [
        ("reference.csv", b"mean\n9.0\n", {}),
        ("model.onnx", b"not the network", {}),
        ("reference.csv", b"mean\n1.0\n", {"threshold": 0.01}),  # the threshold alone
    ],
)
def test_a_bundle_altered_after_signing_is_refused_even_rehashed(
    signed: Path, tmp_path: Path, member: str, data: bytes, edits: dict[str, Any]
) -> None:
    bad = _rehashed(signed, tmp_path / "bad.sgbundle", member, data, **edits)
    with pytest.raises(SignatureError, match=r"bad.sgbundle: the signature .* altered after"):
        open_bundle(bad)
    # the development switch never lets an altered bundle through
    with pytest.raises(SignatureError, match="altered after"):
        open_bundle(bad, Trust(allow_unsigned=True))


def test_an_unsigned_bundle_is_refused_unless_the_development_switch_is_on(
    tmp_path: Path, tiny: dict[str, Any], onnx_model: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_bundle(
        tmp_path / "u.sgbundle", make_manifest(tiny), _members(onnx_model), sign=False
    )
    with zipfile.ZipFile(path) as zf:
        assert SIGNATURE not in zf.namelist()
    with pytest.raises(SignatureError, match=r"u.sgbundle: the bundle is not signed"):
        open_bundle(path)
    with caplog.at_level(logging.WARNING, logger="shiftguard.edge.signing"):
        for _ in range(2):  # a warning on every load
            bundle = open_bundle(path, Trust(allow_unsigned=True))
    assert bundle.signer is None and "UNSIGNED" in describe(bundle)
    assert sum("UNSIGNED bundle loaded" in r.getMessage() for r in caplog.records) == 2


def test_a_bundle_signed_by_a_key_the_site_does_not_trust_is_refused(
    tmp_path: Path, tiny: dict[str, Any], onnx_model: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    private, public = generate(tmp_path / "lab", "other-lab")
    other = read_signing_key(private)
    path = write_bundle(
        tmp_path / "o.sgbundle", make_manifest(tiny), _members(onnx_model), signer=other
    )
    with pytest.raises(SignatureError, match=rf"signed by key {other.key_id}, which this site"):
        open_bundle(path)
    # the site file's trusted_keys (or --trusted-key) name the lab's public key
    assert open_bundle(path, Trust(keys=[str(public)])).signer == other.key_id
    # a folder of keys in $SHIFTGUARD_TRUSTED_KEYS
    monkeypatch.setenv("SHIFTGUARD_TRUSTED_KEYS", str(public.parent))
    assert open_bundle(path).trusted
    # a site that ignores the environment trusts only what it lists
    with pytest.raises(SignatureError, match="does not trust"):
        open_bundle(path, Trust(environment=False))


def test_malformed_keys_and_signatures_are_named(
    signed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    junk = tmp_path / "junk.pub"
    junk.write_text("ssh-ed25519 AAAA nobody\n")
    with pytest.raises(ValueError, match=r"junk.pub: not a ShiftGuard public key"):
        read_public_key(junk)
    with pytest.raises(ValueError, match=r"missing.key: cannot read the signing key"):
        read_signing_key(tmp_path / "missing.key")
    pem = tmp_path / "rsa.key"
    pem.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match=r"rsa.key: not an unencrypted Ed25519 private key"):
        read_signing_key(pem)
    with zipfile.ZipFile(signed) as zin:
        files = {i.filename: zin.read(i) for i in zin.infolist()}
    files[SIGNATURE] = b"{not json"
    bad = tmp_path / "sig.sgbundle"
    with zipfile.ZipFile(bad, "w") as zout:
        for name, value in files.items():
            zout.writestr(name, value)
    with pytest.raises(SignatureError, match=r"signature.json is malformed"):
        open_bundle(bad)


def test_keys_generate_writes_a_private_key_only_its_owner_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "generate", "--out", str(tmp_path / "k"), "--name", "release"]) == 0
    private, public = tmp_path / "k" / "release.key", tmp_path / "k" / "release.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = read_signing_key(private)
    assert read_public_key(public).key_id == key.key_id and key.key_id in capsys.readouterr().out
    assert main(["keys", "generate", "--out", str(tmp_path / "k"), "--name", "release"]) == 2
    assert read_signing_key(private).key_id == key.key_id  # not replaced
    assert main(["keys", "generate"]) == 2  # neither --out nor --development


def test_the_development_key_is_made_once_and_trusted_on_this_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: dict[str, Any], onnx_model: bytes
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("SHIFTGUARD_SIGNING_KEY")
    monkeypatch.delenv("SHIFTGUARD_TRUSTED_KEYS")
    assert main(["keys", "generate", "--development"]) == 0
    dev = tmp_path / "config" / "shiftguard" / "keys" / "development.key"
    first = read_signing_key(dev).key_id
    assert main(["keys", "generate", "--development"]) == 0
    assert read_signing_key(dev).key_id == first  # kept
    path = write_bundle(tmp_path / "d.sgbundle", make_manifest(tiny), _members(onnx_model))
    bundle = open_bundle(path)  # signed with the development key, trusted via the trust folder
    assert bundle.signer == first and bundle.trusted


def test_edge_verify_refuses_an_altered_bundle_with_a_message_not_a_traceback(
    signed: Path, tmp_path: Path, tiny: dict[str, Any], onnx_model: bytes
) -> None:
    bad = _rehashed(signed, tmp_path / "bad.sgbundle", "reference.csv", b"mean\n9.0\n")
    cli = [sys.executable, "-m", "shiftguard.cli", "edge", "verify"]
    ok = subprocess.run([*cli, str(signed)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "signed by trusted key" in ok.stdout
    out = subprocess.run([*cli, str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "bad.sgbundle" in out.stderr and "altered after it was signed" in out.stderr
    unsigned = write_bundle(
        tmp_path / "u.sgbundle", make_manifest(tiny), _members(onnx_model), sign=False
    )
    refused = subprocess.run([*cli, str(unsigned)], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "is not signed" in refused.stderr
    allowed = subprocess.run(
        [*cli, "--allow-unsigned", str(unsigned)], capture_output=True, text=True, timeout=120
    )
    assert allowed.returncode == 0 and "UNSIGNED" in allowed.stdout
    assert "UNSIGNED bundle loaded" in allowed.stdout + allowed.stderr  # the warning


def test_the_service_trusts_what_its_site_file_lists(
    tmp_path: Path, tiny: dict[str, Any], onnx_model: bytes
) -> None:
    """``edge serve`` opens its bundle against the site file's ``trusted_keys``; a bundle signed
    by another key is refused before the service takes a study; ``allow_unsigned`` is the
    development switch."""
    from shiftguard.config import EdgeConfig
    from shiftguard.edge.service import Service

    private, public = generate(tmp_path / "lab", "release")
    path = write_bundle(
        tmp_path / "site" / "m.sgbundle",
        make_manifest(tiny),
        _members(onnx_model),
        signer=read_signing_key(private),
    )
    base = {"bundle": str(path), "storage": str(tmp_path / "store"), "http_port": 0}
    with pytest.raises(SignatureError, match="does not trust"):
        Service(EdgeConfig.model_validate(base))
    trusted = EdgeConfig.model_validate({**base, "trusted_keys": [str(public)]})
    service = Service(trusted)
    assert service.champion.bundle.signer == read_public_key(public).key_id
    unsigned = write_bundle(
        tmp_path / "u" / "u.sgbundle", make_manifest(tiny), _members(onnx_model), sign=False
    )
    dev = EdgeConfig.model_validate({**base, "bundle": str(unsigned), "allow_unsigned": True})
    assert Service(dev).champion.bundle.signer is None


def test_another_key_changes_the_signature_not_the_size_or_what_the_runner_computes(
    tmp_path: Path, tiny: dict[str, Any], onnx_model: bytes
) -> None:
    """Each machine's demo signs with its own development key: the bundle's bytes differ, its
    size (signature and card stored uncompressed) and its runtime digest (what caches of its
    outputs are keyed by) do not."""
    from shiftguard.edge.bundle import runtime_digest

    sizes, digests, payloads = set(), set(), set()
    for i in range(3):
        private, public = generate(tmp_path / f"k{i}", "lab")
        key = read_signing_key(private)
        members = {**_members(onnx_model), "card.md": f"Signed by key {key.key_id}\n".encode()}
        path = write_bundle(
            tmp_path / f"b{i}.sgbundle",
            make_manifest(tiny),
            members,
            signer=key,
            stored=("card.md",),
        )
        bundle = open_bundle(path, Trust(keys=[str(public)], environment=False))
        sizes.add(path.stat().st_size)
        digests.add(runtime_digest(bundle.manifest))
        payloads.add(path.read_bytes())
    assert len(payloads) == 3 and len(sizes) == 1 and len(digests) == 1
    changed = make_manifest(tiny, threshold=0.3)
    assert runtime_digest(changed) not in digests  # what the runner computes does change it
