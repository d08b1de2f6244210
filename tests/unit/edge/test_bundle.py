from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest

from shiftguard.cli import main
from shiftguard.edge.bundle import (
    MANIFEST,
    BundleError,
    bundle_file_name,
    content_version,
    describe,
    open_bundle,
    write_bundle,
)
from shiftguard.edge.signing import SIGNATURE, SigningKey, default_signer, signature_document

from .conftest import make_manifest


def _rewrite(src: Path, dst: Path, change: Any) -> Path:
    """Copy bundle ``src`` to ``dst`` with ``change(name, data) -> (name, data) | None`` applied
    to every member (``None`` drops it); extra members can be appended by ``change.extra``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            out = change(info.filename, zin.read(info))
            if out is not None:
                zout.writestr(out[0], out[1])
        for name, data in getattr(change, "extra", []):
            zout.writestr(name, data)
    return dst


def test_round_trip_keeps_members_manifest_and_hashes(bundle_path: Path, onnx_model: bytes) -> None:
    bundle = open_bundle(bundle_path)
    assert bundle_path.name == "test-model-v7.sgbundle"
    assert bundle.name == "test-model" and bundle.version == "7" and bundle.threshold == 0.5
    assert bundle.model("onnx") == onnx_model
    assert set(bundle.members) == {"model.onnx", "reference.csv"}
    assert bundle.manifest["members"]["model.onnx"]["size"] == len(onnx_model)
    text = describe(bundle)
    assert (
        "test-model version 7" in text
        and bundle.manifest["members"]["model.onnx"]["sha256"] in text
    )
    with pytest.raises(BundleError, match="no torchscript model"):
        bundle.model("torchscript")


def test_writing_is_deterministic(tmp_path: Path, tiny: dict[str, Any], onnx_model: bytes) -> None:
    members = {"model.onnx": onnx_model, "b.txt": b"x"}
    a = write_bundle(tmp_path / "a.sgbundle", make_manifest(tiny), members)
    b = write_bundle(tmp_path / "b.sgbundle", make_manifest(tiny), dict(reversed(members.items())))
    assert a.read_bytes() == b.read_bytes()


def test_the_version_is_a_digest_of_what_decides_the_predictions(
    tiny: dict[str, Any], onnx_model: bytes
) -> None:
    """No registry counter: the same model, preprocessing, threshold and selection rules give the
    same version wherever they are exported; any of them changed gives another."""
    manifest = make_manifest(tiny)
    members = {"model.onnx": onnx_model, "reference.csv": b"a\n1\n"}
    version = content_version(manifest, members)
    assert len(version) == 12 and bundle_file_name("test-model", version)  # a valid name part
    assert content_version(dict(reversed(manifest.items())), members) == version
    # the drift reference, card and validation tables do not decide a prediction
    assert content_version(manifest, {**members, "reference.csv": b"a\n2\n"}) == version
    assert content_version({**manifest, "version": "99"}, members) == version
    changed = [
        content_version({**manifest, "threshold": 0.4}, members),
        content_version(manifest, {**members, "model.onnx": onnx_model + b"\0"}),
        content_version({**manifest, "series_selection": {"modalities": ["CT"]}}, members),
        content_version(
            {**manifest, "preprocessing": {**manifest["preprocessing"], "input_shape": [1, 2, 3]}},
            members,
        ),
    ]
    assert version not in changed and len(set(changed)) == len(changed)
    # the export stage's file name carries no version at all
    assert bundle_file_name("shiftguard-classifier") == "shiftguard-classifier.sgbundle"


def test_a_changed_member_is_refused(bundle_path: Path, tmp_path: Path) -> None:
    def flip(name: str, data: bytes) -> tuple[str, bytes]:
        if name == "reference.csv":
            data = data.replace(b"1.0", b"9.0")
        return name, data

    bad = _rewrite(bundle_path, tmp_path / "bad.sgbundle", flip)
    with pytest.raises(BundleError, match=r"'reference.csv' does not match its SHA-256"):
        open_bundle(bad)


def test_truncated_and_non_zip_files_are_refused(bundle_path: Path, tmp_path: Path) -> None:
    data = bundle_path.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 10):
        truncated = tmp_path / f"cut{cut}.sgbundle"
        truncated.write_bytes(data[:cut])
        with pytest.raises(BundleError, match=str(truncated.name)):
            open_bundle(truncated)
    with pytest.raises(BundleError, match="no such bundle file"):
        open_bundle(tmp_path / "missing.sgbundle")


@pytest.mark.parametrize("evil", ["../escape.txt", "/etc/passwd", "a/../../b", "c:/x", "a\\..\\b"])
def test_member_paths_escaping_the_bundle_are_refused(
    bundle_path: Path, tmp_path: Path, evil: str
) -> None:
    def keep(name: str, data: bytes) -> tuple[str, bytes]:
        return name, data

    keep.extra = [(evil, b"payload")]  # type: ignore[attr-defined]
    bad = _rewrite(bundle_path, tmp_path / "evil.sgbundle", keep)
    with pytest.raises(BundleError, match="escapes the bundle's folder"):
        open_bundle(bad)
    with pytest.raises(ValueError, match="escapes"):
        write_bundle(tmp_path / "w.sgbundle", {}, {evil: b"x"})


def _with_manifest(src: Path, dst: Path, edit: Any, signer: SigningKey | None = None) -> Path:
    """``src`` with its manifest edited and, with ``signer``, signed again by it (a signer's own
    bad manifest); without, the old signature stays (an attacker's edit)."""
    with zipfile.ZipFile(src) as zf:
        manifest = json.loads(zf.read(MANIFEST))
    edit(manifest)
    text = json.dumps(manifest).encode()

    def change(name: str, data: bytes) -> tuple[str, bytes]:
        if name == MANIFEST:
            return name, text
        if name == SIGNATURE and signer is not None:
            return name, signature_document(text, signer)
        return name, data

    return _rewrite(src, dst, change)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m["models"].append({"member": "model.onnx", "format": "pickle"}),
            "model format 'pickle'",
        ),
        (lambda m: m.update(format_version=99), "format version 99"),
        (lambda m: m.update(format="zip"), "not 'shiftguard-bundle'"),
        (lambda m: m.pop("threshold"), "lacks threshold"),
        (lambda m: m.update(threshold=1.5), "not a probability"),
        (lambda m: m["members"].pop("reference.csv"), "does not list: reference.csv"),
        (
            lambda m: m["members"].update({"gone.bin": {"sha256": "0", "size": 1}}),
            "'gone.bin' listed",
        ),
        (lambda m: m.update(models=[]), "no ONNX model"),
    ],
)
def test_bad_manifests_are_refused_with_the_reason(
    bundle_path: Path, tmp_path: Path, edit: Any, message: str
) -> None:
    """Even signed by a trusted key, a manifest that breaks the format is refused."""
    signer = default_signer()
    assert signer is not None  # the test process's key (tests/conftest.py)
    with pytest.raises(BundleError, match=message):
        open_bundle(_with_manifest(bundle_path, tmp_path / "m.sgbundle", edit, signer))


def test_nothing_in_a_bundle_is_unpickled(
    tmp_path: Path, tiny: dict[str, Any], onnx_model: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    manifest = make_manifest(tiny)
    manifest["models"].append({"member": "model.torchscript.pt", "format": "torchscript"})
    path = write_bundle(
        tmp_path / bundle_file_name("trap", "1"),
        manifest,
        {"model.onnx": onnx_model, "model.torchscript.pt": pickle.dumps(Trap())},
    )
    bundle = open_bundle(path)
    assert bundle.model("torchscript").startswith(b"\x80")  # raw bytes, never loaded
    assert main(["edge", "verify", str(path)]) == 0
    assert "torchscript" in capsys.readouterr().out
    assert not marker.exists()


def test_cli_verify_prints_the_manifest_or_the_error(
    bundle_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["edge", "verify", str(bundle_path)]) == 0
    out = capsys.readouterr().out
    assert "verified: every member matches its SHA-256" in out and "threshold 0.5000" in out
    bad = tmp_path / "bad.sgbundle"
    bad.write_bytes(bundle_path.read_bytes()[:200])
    assert main(["edge", "verify", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "edge: error:" in err and "bad.sgbundle" in err and "truncated" in err


def _calibrated(tmp_path: Path, tiny: dict[str, Any], onnx_model: bytes, cal: bytes) -> Path:
    manifest = make_manifest(
        tiny, calibration={"member": "calibration.json", "method": "platt", "n": 25}
    )
    return write_bundle(
        tmp_path / "calibrated.sgbundle",
        manifest,
        {"model.onnx": onnx_model, "calibration.json": cal},
    )


def test_a_calibration_map_travels_decides_the_version_and_is_checked(
    tmp_path: Path, tiny: dict[str, Any], onnx_model: bytes
) -> None:
    from shiftguard.calibration import IDENTITY, Calibration

    cal = Calibration("platt", a=0.5, b=-1.0, n=25, n_positive=10, fitted_on="val")
    data = json.dumps(cal.to_json()).encode()
    bundle = open_bundle(_calibrated(tmp_path, tiny, onnx_model, data))
    assert bundle.calibration == cal
    assert "calibration platt (a 0.5, b -1.0; fitted on 25 val series)" in describe(bundle)
    # a bundle exported before calibration existed reads as the identity, version unchanged
    plain = make_manifest(tiny)
    assert open_bundle(write_bundle(tmp_path / "p.sgbundle", plain, {"model.onnx": onnx_model}))
    assert Calibration() == IDENTITY
    # the map decides what is reported: another map, another version
    section = {"calibration": {"member": "calibration.json", "method": "platt", "n": 25}}
    other = json.dumps(Calibration("platt", a=0.6, b=-1.0).to_json()).encode()
    versions = {
        content_version({**plain, **section}, {"model.onnx": onnx_model, "calibration.json": d})
        for d in (data, other)
    }
    assert len(versions) == 2
    assert content_version(plain, {"model.onnx": onnx_model}) not in versions
    # an unreadable map is refused when the bundle is opened, not at the first study
    with pytest.raises(BundleError, match=r"calibration map calibration.json is unusable"):
        open_bundle(_calibrated(tmp_path, tiny, onnx_model, b'{"format": "x"}'))
