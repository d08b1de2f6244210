"""A site's own cohort end to end: a DICOM export that does not come from the generator (three tree
layouts, four vendors, compressed and uncompressed, identifying headers and folder names, pydicom's
own odd files) and a label file in another format (TSV, accession numbers as the key, yes/no
findings, unlabelled studies, labels without a study, a duplicate), through ``shiftguard data init``
and ``dvc repro`` to a registered model and a bundle ``shiftguard edge verify`` accepts; then every
file the run wrote under reports/, artifacts/ and the MLflow store is searched for the cohort's
patient names, IDs, accession numbers and dates."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian, RLELossless

from shiftguard.data.identifiers import Pseudonymizer
from shiftguard.dicom.testing import SeriesSpec, make_datasets, save_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow(seconds=270)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SURNAMES = ["Kowalczyk", "Okonkwo", "Lindqvist", "Haddad", "Marchetti", "Nakamura", "Oyelaran",
            "Fitzgerald", "Vasquez", "Abernathy"]  # fmt: skip
GIVEN = ["Agnieszka", "Chidi", "Sigrun", "Rami", "Ottavia", "Hiroshi", "Temitope", "Declan"]
#: (manufacturer, model, field strength, site, tree layout, transfer syntax)
VENDORS = [
    ("SIEMENS", "Prisma", 3.0, "St Brendan Infirmary", "by_name", None),
    ("GE MEDICAL SYSTEMS", "Discovery MR750", 3.0, "St Brendan Infirmary", "flat", ImplicitVRLittleEndian),
    ("Philips", "Ingenia", 1.5, "Lakeshore Clinic", "dicomdir", RLELossless),
    ("Canon Medical Systems", "Vantage Galan", 3.0, "Lakeshore Clinic", "by_accession", None),
]  # fmt: skip
EXTERNAL_MODEL = "Vantage Galan"
PATIENTS_PER_VENDOR = (6, 6, 6, 4)
ODD_FILES = ("CT_small.dcm", "rtplan.dcm", "MR_small_RLE.dcm", "no_meta.dcm")


def sh(
    cwd: Path, *args: str, env: dict[str, str], check: bool = True
) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if check and result.returncode:
        raise AssertionError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def write_export(root: Path, rng: np.random.Generator) -> tuple[list[dict[str, Any]], set[str]]:
    """The export: one T1 series per study, in each vendor's tree layout; the studies' identifiers,
    and every identifying string written (names, IDs, accession numbers, dates) for the PHI scan."""
    studies, secrets = [], set()
    n = 0
    for (maker, model, tesla, site, layout, syntax), count in zip(
        VENDORS, PATIENTS_PER_VENDOR, strict=True
    ):
        for _ in range(count):
            n += 1
            name = f"{SURNAMES[n % len(SURNAMES)]}^{GIVEN[n % len(GIVEN)]}{n:02d}"
            patient_id = f"MRN{7340000 + 37 * n}"
            accession = f"RAD{880000 + 11 * n}"
            study_date = f"202{n % 3 + 1}{(n % 12) + 1:02d}{(n % 27) + 1:02d}"
            birth = f"19{50 + n}0{n % 9 + 1}1{n % 9}"
            finding = int(rng.random() < 0.45)
            spec = SeriesSpec(
                rows=32, cols=32, n_slices=16, pixel_spacing=(6.0, 6.0), slice_spacing=10.0,
                origin=(-96.0, -96.0, -75.0), patient_id=patient_id, patient_sex="FM"[n % 2],
                patient_age=f"0{40 + n}Y", manufacturer=maker, model=model, institution=site,
            )  # fmt: skip
            stored = make_datasets(spec)
            volume = np.stack(
                [np.frombuffer(d.PixelData, np.uint16).reshape(32, 32) for d in stored]
            )
            volume = volume + rng.integers(0, 40, volume.shape).astype(np.uint16)
            if finding:  # a bright focal lesion
                k, r, c = rng.integers(3, 13), rng.integers(8, 24), rng.integers(8, 24)
                volume[k - 1 : k + 2, r - 3 : r + 3, c - 3 : c + 3] += 900
            folder = {
                "by_name": root / f"{name.replace('^', '_')}_{patient_id}" / study_date / "T1",
                "flat": root / "flat_export",
                "dicomdir": root / "DICOM" / f"PA{n:04d}" / "ST0000" / "SE0000",
                "by_accession": root / "incoming" / accession,
            }[layout]
            for k, ds in enumerate(make_datasets(spec, volume)):
                ds.PatientName = name
                ds.PatientBirthDate = birth
                ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = study_date
                ds.AccessionNumber = accession
                ds.MagneticFieldStrength = tesla
                ds.ReferringPhysicianName = "Whitcombe^Eleanor"
                ds.StationName = f"{maker.split()[0][:6]}MR1"
                file = {
                    "by_name": folder / f"IM{k + 1:04d}",
                    "flat": folder / f"{ds.SOPInstanceUID}.dcm",
                    "dicomdir": folder / f"IM{k:04d}",
                    "by_accession": folder / f"slice_{k + 1:03d}.dcm",
                }[layout]
                save_dataset(ds, file, syntax)
            studies.append({"study_uid": spec.study_uid, "patient_id": patient_id,
                            "accession": accession, "date": study_date, "finding": finding,
                            "model": model, "name": name})  # fmt: skip
            secrets |= {name, name.replace("^", " "), patient_id, accession, study_date, birth}
    odd = root / f"{SURNAMES[0]}_Misc_{studies[0]['patient_id']}"  # a folder named by the patient
    odd.mkdir()
    for name in ODD_FILES:  # real odd objects: a lone CT slice, an RT plan, a file without meta
        source = Path(get_testdata_file(name, download=False))
        shutil.copy2(source, odd / name)
        ds = pydicom.dcmread(source, force=True, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "StudyDate", "PatientBirthDate"):
            value = str(ds.get(keyword, "") or "").strip()
            if len(value) >= 6:
                secrets.add(value)
    (root / "README.txt").write_text("export notes\n")
    return studies, secrets


def write_labels(path: Path, studies: list[dict[str, Any]]) -> dict[str, Any]:
    """TSV keyed by accession number, yes/no findings; two studies left unlabelled, two labels for
    studies not in the export, one label repeated."""
    unlabelled = {studies[3]["accession"], studies[12]["accession"]}
    rows = [
        {"AccNo": s["accession"], "Exam date": f"{s['date'][:4]}-{s['date'][4:6]}-{s['date'][6:]}",
         "Lesion present": "yes" if s["finding"] else "no", "Reporting radiologist": "dr_b"}
        for s in studies if s["accession"] not in unlabelled
    ]  # fmt: skip
    orphans = [
        {"AccNo": "RAD999001", "Exam date": "2022-05-05", "Lesion present": "no",
         "Reporting radiologist": "dr_a"},
        {"AccNo": "RAD999002", "Exam date": "2022-06-06", "Lesion present": "yes",
         "Reporting radiologist": "dr_a"},
    ]  # fmt: skip
    rows = [*rows, dict(rows[5]), *orphans]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return {"unlabelled": unlabelled, "orphans": {"RAD999001", "RAD999002"}, "duplicate": rows[5]}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A project with the site's export, `data init` run on it, and `dvc repro export`."""
    root = tmp_path_factory.mktemp("site_project")
    home = tmp_path_factory.mktemp("site_home")
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "SHIFTGUARD_WORKERS": "2",
        "XDG_CONFIG_HOME": str(home),  # the pseudonym key and the signing key
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("SHIFTGUARD_PSEUDONYM_KEY", None)
    for item in ("conf", "pipelines", "src", "dvc.yaml"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, root / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / item)
    config = root / "conf" / "config.yaml"  # the test suite's small grid, few epochs, 2x2 shifts
    config.write_text(
        config.read_text().replace("- experiment: null", "- experiment: tiny")
        + "augment:\n  robustness:\n    profiles: [low_field, motion_prone]\n"
        "    severities: [0, 4]\n"
    )
    sh(root, "git", "init", "-q", env=env)
    sh(root, "git", "config", "user.email", "ci@example.org", env=env)
    sh(root, "git", "config", "user.name", "ci", env=env)
    sh(root, "dvc", "init", "-q", env=env)
    sh(root, "dvc", "config", "core.analytics", "false", env=env)
    rng = np.random.default_rng(19)
    studies, secrets = write_export(root / "exports" / "2024-q1", rng)
    truth = write_labels(root / "labels.tsv", studies)
    sh(root, "shiftguard", "keys", "generate", "--development", env=env)
    init = sh(
        root, "shiftguard", "data", "init", "--dicom", "exports/2024-q1", "--labels", "labels.tsv",
        "--name", "lakeshore", "--external", f"scanner_model={EXTERNAL_MODEL}", "--quiet", env=env,
    )  # fmt: skip
    sh(root, "git", "add", "-A", env=env)
    sh(root, "git", "commit", "-qm", "site data", env=env)
    repro = sh(root, "dvc", "repro", "export", env=env)
    return {"root": root, "env": env, "studies": studies, "secrets": secrets, "truth": truth,
            "init": init.stdout, "repro": repro.stdout + repro.stderr}  # fmt: skip


def rows_of(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_data_init_inspects_both_and_writes_a_tracked_source(site: dict[str, Any]) -> None:
    root, out = site["root"], site["init"]
    assert "accession_number='AccNo'" in out and "finding='Lesion present'" in out
    assert "positive ['yes'], negative ['no']" in out
    assert "not de-identified" in out and "patient name (PatientName)" in out
    n = len(site["studies"])
    assert f"{n - 2} studies labelled, 2 unlabelled, 2 label rows without a study" in out
    text = (root / "conf/data/lakeshore.yaml").read_text()
    assert text.startswith("# @package _global_")
    assert "data: lakeshore" in (root / "conf/config.yaml").read_text()
    params = (root / "params.yaml").read_text()
    assert "name: lakeshore" in params and "identifiers: pseudonymize" in params
    assert (root / "exports/2024-q1.dvc").is_file() and (root / "labels.tsv.dvc").is_file()
    key = Path(site["env"]["XDG_CONFIG_HOME"]) / "shiftguard/pseudonym/lakeshore.key"
    assert key.is_file() and key.stat().st_mode & 0o077 == 0


def test_the_labels_report_accounts_for_every_study_and_label_row(site: dict[str, Any]) -> None:
    root, studies = site["root"], site["studies"]
    report = rows_of(root / "reports/split/labels.csv")
    status = {s: [r for r in report if r["status"] == s] for s in {r["status"] for r in report}}
    assert len(status["labelled"]) == len(studies) - 2
    assert len(status["unlabelled"]) == 2 and all(r["study_uid"] for r in status["unlabelled"])
    assert {r["label_row"] for r in status["label_without_study"]} == {
        f"labels.tsv:{len(studies) + 1}",
        f"labels.tsv:{len(studies) + 2}",
    }
    [duplicate] = status["duplicate_label"]
    assert duplicate["label_row"] == f"labels.tsv:{len(studies)}"
    excluded = status["excluded_by_ingest"]
    assert len(excluded) >= 3 and all(r["action"] for r in excluded)
    assert all(r["action"] for rows in status.values() for r in rows if r["status"] != "labelled")
    metrics = json.loads((root / "reports/split/metrics.json").read_text())
    assert metrics["labels"]["labelled"] == len(studies) - 2
    assert "2 unlabelled, 2 label rows without a study" in site["repro"]


def pseudonyms(site: dict[str, Any]) -> Pseudonymizer:
    key = Path(site["env"]["XDG_CONFIG_HOME"]) / "shiftguard/pseudonym/lakeshore.key"
    return Pseudonymizer(bytes.fromhex(key.read_text().strip()))


def test_the_split_is_patient_level_with_the_chosen_external_scanner(site: dict[str, Any]) -> None:
    root, studies, ids = site["root"], site["studies"], pseudonyms(site)
    dataset = rows_of(root / "artifacts/split/dataset.csv")
    assert len(dataset) == len(studies)
    by_uid = {ids.uid(s["study_uid"]): s for s in studies}
    for row in dataset:
        study = by_uid[row["study_uid"]]
        assert (row["split"] == "external") == (study["model"] == EXTERNAL_MODEL)
        assert row["patient_id"] == ids.patient(study["patient_id"])
        assert row["accession_number"] == ids.accession(study["accession"])
        assert row["study_date"] == study["date"][:6]
        if row["split"] in {"train", "val", "test", "external"}:
            assert row["finding"] == str(study["finding"])
    unlabelled = {
        ids.uid(s["study_uid"]) for s in studies if s["accession"] in site["truth"]["unlabelled"]
    }
    assert {r["study_uid"] for r in dataset if r["finding"] == ""} == unlabelled
    assert {r["split"] for r in dataset} >= {"train", "val", "test", "external"}


def test_data_lookup_turns_report_pseudonyms_back_on_site(site: dict[str, Any]) -> None:
    root, studies = site["root"], site["studies"]
    row = rows_of(root / "artifacts/split/dataset.csv")[0]
    [quarantined] = [q for q in rows_of(root / "artifacts/ingest/quarantine.csv")
                     if q["code"] == "not_image"]  # fmt: skip
    out = sh(root, "shiftguard", "data", "lookup", row["patient_id"], quarantined["path"],
             env=site["env"]).stdout  # fmt: skip
    patient = next(
        s for s in studies if pseudonyms(site).patient(s["patient_id"]) == row["patient_id"]
    )
    assert f"PatientID {patient['patient_id']}" in out
    assert "rtplan.dcm" in out


def test_the_model_is_registered_and_the_bundle_verifies(site: dict[str, Any]) -> None:
    root, env = site["root"], site["env"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    [model] = client.search_registered_models()
    version = client.get_model_version_by_alias(model.name, "challenger")
    run = client.get_run(version.run_id)
    assert run.data.params["data.name"] == "lakeshore"
    assert not any(k.startswith("cohort.") for k in run.data.params)
    [bundle] = sorted((root / "artifacts/export").glob("*.sgbundle"))
    verified = sh(root, "shiftguard", "edge", "verify", str(bundle), env=env)
    assert "signed by trusted key" in verified.stdout
    assert json.loads((root / "reports/export/metrics.json").read_text())["parity_series"] > 0


WRITTEN = ("reports", "artifacts", "mlruns", "mlflow.db", "params.yaml", "dvc.lock")


def leaks(site: dict[str, Any], skip: tuple[str, ...] = ()) -> tuple[int, list[tuple[str, str]]]:
    """How many files the run wrote (under :data:`WRITTEN`, less ``skip``), and every (file, secret)
    where one of the cohort's names, IDs, accession numbers or dates stands in a file."""
    root = site["root"]
    written = [
        p
        for top in WRITTEN
        for p in ([root / top] if (root / top).is_file() else sorted((root / top).rglob("*")))
        if p.is_file() and not str(p.relative_to(root)).startswith(skip)
    ]
    needles = sorted(s.encode() for s in site["secrets"])
    found = [
        (str(p.relative_to(root)), n.decode())
        for p in written
        for n in needles
        if n in p.read_bytes()
    ]
    return len(written), found


def test_no_patient_name_id_accession_or_date_is_written(site: dict[str, Any]) -> None:
    n, found = leaks(site)
    assert n > 20
    assert found == []


def test_the_held_out_studies_go_through_edge_monitor_and_shadow(site: dict[str, Any]) -> None:
    root, env = site["root"], site["env"]
    run = sh(root, "dvc", "repro", env=env)
    assert "scenarios: skipped" in run.stdout + run.stderr
    assert "skipped" in json.loads((root / "reports/monitor/scenarios.json").read_text())
    external = [s for s in site["studies"] if s["model"] == EXTERNAL_MODEL]
    assert json.loads((root / "reports/edge/metrics.json").read_text())["series_predicted"] == len(
        external
    )
    shadow = json.loads((root / "reports/shadow/metrics.json").read_text())
    assert shadow["studies"] == shadow["judged"] == len(external)
    assert json.loads((root / "reports/monitor/metrics.json").read_text())
    # what the edge returns to PACS carries the patient, as results must; nothing else does
    n, found = leaks(site, skip=("artifacts/edge",))
    assert n > 30
    assert found == []
