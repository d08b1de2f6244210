"""Local recalibration: a site whose scanner lowers the network's scores gets a threshold that
restores the validated sensitivity, as a new signed bundle registered for the promotion gate."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shiftguard.calibration import Calibration, logit
from shiftguard.cli import main
from shiftguard.edge.bundle import open_bundle, write_bundle
from shiftguard.edge.signing import default_signer
from shiftguard.errors import ShadowInputError
from shiftguard.metrics import sensitivity_specificity
from shiftguard.shadow.diagnoses import Diagnosis, write_diagnoses
from shiftguard.shadow.recalibrate import (
    recalibrate,
    reference_sensitivity,
    site_evidence,
    track,
    write_recalibrated,
)

BUNDLE_CAL = Calibration("platt", a=1.0, b=0.0, n=40, fitted_on="val")
THRESHOLD = 0.5


def _raw(rng: np.random.Generator, finding: np.ndarray, offset: float) -> np.ndarray:
    """The network's probabilities: class-conditional logits N(+-1.5, 1), shifted by ``offset``
    (a scanner that lowers every score)."""
    z = np.where(finding == 1, 1.5, -1.5) + rng.normal(0, 1, finding.size) + offset
    return 1 / (1 + np.exp(-z))


def _bundle(tmp_path: Path, calibration: Calibration = BUNDLE_CAL) -> Path:
    rng = np.random.default_rng(0)
    finding = (rng.random(80) < 0.4).astype(int)
    raw = _raw(rng, finding, 0.0)
    reference = pd.DataFrame(
        {
            "probability": calibration.apply(raw),
            "entropy": 0.5,
            "split": np.where(np.arange(80) < 20, "train", "test"),
            "finding": finding,
            "raw_probability": raw,
        }
    )
    manifest = {
        "name": "m",
        "version": "1",
        "models": [{"member": "model.onnx", "format": "onnx"}],
        "input": {"name": "image", "shape": [None, 1, 4, 4, 4]},
        "preprocessing": {},
        "threshold": THRESHOLD,
        "calibration": {"member": "calibration.json", "method": calibration.method},
        "monitor": {"reference": "reference.csv"},
    }
    members = {
        "model.onnx": b"the network",
        "calibration.json": json.dumps(calibration.to_json()).encode(),
        "reference.csv": reference.to_csv(index=False).encode(),
        "model_card.md": b"# Model card: m v1\n\nText.\n",
    }
    return write_bundle(tmp_path / "m-v1.sgbundle", manifest, members, signer=default_signer())


def _site(
    tmp_path: Path, n: int = 400, offset: float = -1.2, raw_column: bool = True
) -> tuple[Path, Path]:
    """A site's shadow log (an edge predict results table) and its verified diagnoses."""
    rng = np.random.default_rng(5)
    finding = (rng.random(n) < 0.4).astype(int)
    raw = _raw(rng, finding, offset)
    uids = [f"1.2.826.0.9.{i}" for i in range(n)]
    log = pd.DataFrame(
        {
            "study_uid": uids,
            "series_uid": [u + ".1" for u in uids],
            "probability": BUNDLE_CAL.apply(raw),
            "threshold": THRESHOLD,
            "model": "m",
            "model_version": "1",
            "institution": "North",
        }
    )
    if raw_column:
        log["raw_probability"] = raw
    log.to_csv(tmp_path / "results.csv", index=False)
    diagnoses = write_diagnoses(
        [
            Diagnosis(u, "2026-11-01T00:00:00Z", "dr", int(f))
            for u, f in zip(uids, finding, strict=True)
        ],
        tmp_path / "diagnoses.jsonl",
    )
    return tmp_path / "results.csv", diagnoses


def _book(path: Path):  # type: ignore[no-untyped-def]
    from shiftguard.shadow.diagnoses import DiagnosisBook

    book = DiagnosisBook()
    book.add_file(path)
    return book


def test_the_proposal_restores_the_reference_sensitivity_and_says_its_evidence(
    tmp_path: Path,
) -> None:
    bundle = open_bundle(_bundle(tmp_path))
    log, dx = _site(tmp_path)
    evidence = site_evidence(log, _book(dx), bundle, "North")
    assert len(evidence) == 400 and evidence["raw_probability"].notna().all()
    target = reference_sensitivity(bundle)
    assert target is not None and 0.7 < target < 1.0
    rec = recalibrate(evidence, bundle, "North", n_boot=200)
    assert rec.target_sensitivity == pytest.approx(target)
    # the scanner lowered the scores: the bundle's threshold misses findings here
    assert rec.previous_sensitivity["value"] < target - 0.1
    assert rec.sensitivity["value"] >= target
    assert rec.sensitivity["low"] <= rec.sensitivity["value"] <= rec.sensitivity["high"]
    assert rec.threshold_interval[0] <= rec.threshold <= rec.threshold_interval[1]
    assert rec.n == 400 and rec.n_positive == int(evidence["finding"].sum())
    # the new map applied to the network's probabilities, the threshold on its scale
    y = evidence["finding"].to_numpy()
    p = rec.calibration.apply(evidence["raw_probability"].to_numpy())
    assert sensitivity_specificity(y, p, rec.threshold)[0] == pytest.approx(
        rec.sensitivity["value"]
    )
    assert rec.calibration.b > 0.5  # it lifts the lowered scores back


def test_the_new_bundle_keeps_the_network_and_carries_the_change(tmp_path: Path) -> None:
    path = _bundle(tmp_path)
    bundle = open_bundle(path)
    log, dx = _site(tmp_path)
    rec = recalibrate(site_evidence(log, _book(dx), bundle), bundle, "North", n_boot=100)
    new = open_bundle(write_recalibrated(bundle, rec, tmp_path / "out", default_signer()))
    assert new.version != bundle.version and new.trusted
    assert new.model("onnx") == bundle.model("onnx")
    assert new.threshold == pytest.approx(rec.threshold) and new.calibration == rec.calibration
    assert new.manifest["recalibration"]["from_version"] == "1"
    card = new.text("model_card.md")
    assert card.startswith(f"# Model card: m v{new.version}") and "## Site recalibration" in card
    ref = pd.read_csv(io.BytesIO(new.members["reference.csv"]))
    assert ref["probability"].to_numpy() == pytest.approx(
        rec.calibration.apply(ref["raw_probability"].to_numpy())
    )


def test_too_little_evidence_is_refused_with_the_counts(tmp_path: Path) -> None:
    bundle = open_bundle(_bundle(tmp_path))
    log, dx = _site(tmp_path, n=60)
    with pytest.raises(
        ShadowInputError, match=r"60 studies with a verified diagnosis .* at least 100"
    ):
        recalibrate(site_evidence(log, _book(dx), bundle), bundle, "North")


def test_a_log_without_network_probabilities_inverts_a_parametric_map_only(tmp_path: Path) -> None:
    log, dx = _site(tmp_path, raw_column=False)
    bundle = open_bundle(_bundle(tmp_path))
    evidence = site_evidence(log, _book(dx), bundle)
    logged = pd.read_csv(tmp_path / "results.csv").set_index("study_uid")["probability"]
    expected = logged.loc[evidence["study_uid"]].to_numpy()  # the map is a=1, b=0: the identity
    assert evidence["raw_probability"].to_numpy() == pytest.approx(expected, abs=1e-9)
    iso = Calibration("isotonic", x=(float(logit([0.2])[0]), float(logit([0.8])[0])), y=(0.1, 0.9))
    (tmp_path / "iso").mkdir()
    other = open_bundle(_bundle(tmp_path / "iso", iso))
    with pytest.raises(ShadowInputError, match="cannot be inverted"):
        site_evidence(log, _book(dx), other)
    with pytest.raises(ShadowInputError, match="no study predicted by m-v1 at site South"):
        site_evidence(log, _book(dx), bundle, "South")


def test_cli_writes_the_bundle_and_registers_it_as_the_challenger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    from shiftguard.tracking import BUNDLE_VERSION_TAG, CHALLENGER

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(uri)
    experiment = client.create_experiment("shiftguard", (tmp_path / "mlruns").as_uri())
    run = client.create_run(experiment).info.run_id
    client.create_registered_model("m")
    client.create_model_version(
        "m", (tmp_path / "model").as_uri(), run, tags={BUNDLE_VERSION_TAG: "1"}
    )
    path = _bundle(tmp_path)
    log, dx = _site(tmp_path)
    code = main(["shadow", "recalibrate", "--log", str(log), "--diagnoses", str(dx),
                 "--bundle", str(path), "--site", "North", "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "Proposed threshold" in out and "registered as m version 2 (@challenger)" in out
    version = client.get_model_version("m", "2")
    new = open_bundle(next((tmp_path / "out").glob("*.sgbundle")))
    assert version.tags[BUNDLE_VERSION_TAG] == new.version and version.run_id == run
    assert version.tags["recalibration_site"] == "North"
    assert str(client.get_model_version_by_alias("m", CHALLENGER).version) == "2"
    assert "## Site recalibration" in version.description
    # bad input: a clear error, exit 2
    assert main(["shadow", "recalibrate", "--log", str(tmp_path / "none.csv"), "--diagnoses",
                 str(dx), "--bundle", str(path), "--no-mlflow"]) == 2  # fmt: skip
    assert "no such shadow log" in capsys.readouterr().err


def test_track_without_a_registered_source_logs_but_does_not_register(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    bundle = open_bundle(_bundle(tmp_path))
    log, dx = _site(tmp_path)
    rec = recalibrate(site_evidence(log, _book(dx), bundle), bundle, "North", n_boot=50)
    path = write_recalibrated(bundle, rec, tmp_path / "out", default_signer())
    assert track(rec, path, bundle, tmp_path) is None
