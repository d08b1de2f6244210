"""``shiftguard edge predict`` on real DICOM: SR and key images validated by dciodvfy, skip reasons
for what is not a model input, deterministic outputs, and no torch/MONAI/MLflow/DVC imported."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from dciodvfy_check import assert_dciodvfy_clean
from pydicom.data import get_testdata_file

from shiftguard.cli import main
from shiftguard.config.deploy import SeriesSelection
from shiftguard.edge.bundle import open_bundle
from shiftguard.edge.dicom_out import (
    SHADOW_BANNER,
    SeriesResult,
    derived_uid,
    describe_sr,
    render_key_image,
)
from shiftguard.edge.predict import Predictor

NON_IMAGES = {
    "rtstruct.dcm": "RT Structure Set",
    "rtplan.dcm": "RT Plan",
    "waveform_ecg.dcm": "Waveform",
    "test-SR.dcm": "Structured Report",
    "rtdose.dcm": "frames",  # an image, but one with no per-frame geometry
}
UNSUPPORTED_SERIES = {"CT_small.dcm": "modality"}
#: the IOD dciodvfy checks each output as, by the file name's suffix
DCIODVFY_IODS = {"SR": "Comprehensive3DSR", "SC": "SCImage"}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def mixed_input(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny cohort's studies plus non-image objects and a file that is not DICOM at all."""
    root = tmp_path_factory.mktemp("input")
    shutil.copytree(cohort, root / "studies")
    other = root / "other"
    other.mkdir()
    for name in (*NON_IMAGES, *UNSUPPORTED_SERIES):
        path = get_testdata_file(name, download=False)
        if path is not None:
            shutil.copy(path, other / name)
    (other / "notes.txt").write_text("not DICOM")
    return root


@pytest.fixture(scope="module")
def predicted(bundle_path: Path, mixed_input: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("out")
    summary = Predictor(open_bundle(bundle_path), shadow=True).predict_folder(mixed_input, out)
    return summary, out


def test_every_series_gets_an_sr_and_a_key_image(predicted: Any, cohort: Path) -> None:
    summary, out = predicted
    results = _rows(out / "results.csv")
    assert len(results) == summary.n_predicted == 3
    for row in results:
        assert 0.0 <= float(row["probability"]) <= 1.0
        assert row["result"] in ("finding present", "no finding")
        sr = pydicom.dcmread(out / row["sr_file"])
        sc = pydicom.dcmread(out / row["sc_file"])
        # both join the source study as new series
        assert sr.StudyInstanceUID == sc.StudyInstanceUID == row["study_uid"]
        assert sr.SeriesInstanceUID != row["series_uid"] != sc.SeriesInstanceUID
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
        source = pydicom.dcmread(
            next((cohort / sr.PatientID).rglob("*.dcm")), stop_before_pixels=True
        )
        assert (sc.PatientID, sc.AccessionNumber) == (source.PatientID, source.AccessionNumber)
        content = describe_sr(sr)
        assert content["Probability"] == pytest.approx(float(row["probability"]), abs=1e-6)
        assert content["Threshold Value"] == pytest.approx(0.5)
        assert content["finding"] == ("Present" if row["result"] == "finding present" else "Absent")
        # every source image referenced
        refs = {
            item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for item in _walk(sr.ContentSequence)
            if item.ValueType == "IMAGE"
        }
        assert len(refs) == int(row["n_slices"])
        assert "SHADOW" in sr.SeriesDescription and "SHADOW" in sc.SeriesDescription
        assert "NOT FOR CLINICAL USE" in sc.ImageComments
        assert sc.pixel_array.ndim == 3 and sc.pixel_array.shape[2] == 3


def _walk(items: Any) -> Any:
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


@pytest.mark.peers("dciodvfy")
def test_outputs_pass_dciodvfy_without_errors_or_warnings(
    predicted: Any, bundle_path: Path, cohort: Path, tmp_path: Path
) -> None:
    """Every SR and key image, in shadow mode and not, as the README promises: no error, no
    warning, exit status 0, checked as the IOD it claims to be."""
    _, shadow_out = predicted
    Predictor(open_bundle(bundle_path)).predict_folder(cohort, tmp_path / "clinical")
    for out in (shadow_out, tmp_path / "clinical"):
        files = sorted(out.glob("*.dcm"))
        assert len(files) == 6
        for path in files:
            assert_dciodvfy_clean(path, iod=DCIODVFY_IODS[path.stem.rsplit("_", 1)[1]])


def test_non_images_and_foreign_files_are_skipped_with_reasons(predicted: Any) -> None:
    _, out = predicted
    skipped = _rows(out / "skipped.csv")
    by_file = {Path(r["path"]).name: r for r in skipped}
    assert "notes.txt" in by_file and by_file["notes.txt"]["reason"]
    for name, kind in NON_IMAGES.items():
        if get_testdata_file(name, download=False) is None:
            continue
        assert name in by_file, f"{name} not reported"
        assert kind.lower() in by_file[name]["reason"].lower(), by_file[name]
    series_codes = {r["code"] for r in skipped if r["series_uid"]}
    assert set(UNSUPPORTED_SERIES.values()) <= series_codes  # the CT series: not this model's input


def test_rerunning_writes_identical_objects(
    bundle_path: Path, cohort: Path, tmp_path: Path
) -> None:
    """The SRs, key images and tables are the same bytes run after run; the seconds each step took
    are in ``timings.csv``, beside them or wherever the caller wants it (the DVC stage keeps it
    out of its outputs)."""
    predictor = Predictor(open_bundle(bundle_path))
    a = predictor.predict_folder(cohort, tmp_path / "a")
    b = predictor.predict_folder(cohort, tmp_path / "b", timings_csv=tmp_path / "t" / "b.csv")
    assert [r["sr_file"] for r in a.results] == [r["sr_file"] for r in b.results]
    written = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert {"results.csv", "skipped.csv", "timings.csv"} <= set(written)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        n for n in written if n != "timings.csv"
    ]
    for name in written:
        if name != "timings.csv":
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), (
                name
            )
    results = _rows(tmp_path / "a" / "results.csv")
    assert not {"read_s", "infer_s", "write_s"} & set(results[0])
    timings = _rows(tmp_path / "t" / "b.csv")
    assert [t["series_uid"] for t in timings] == [r["series_uid"] for r in results]
    assert all(float(t["infer_s"]) > 0 for t in timings)
    assert float(a.results[0]["infer_s"]) > 0  # the returned rows still carry them
    first = a.results[0]
    sr = pydicom.dcmread(tmp_path / "a" / first["sr_file"])
    assert sr.SOPInstanceUID == derived_uid(first["series_uid"], "test-model", "7", "sr")
    assert "SHADOW" not in sr.SeriesDescription  # not shadow mode here


def test_selection_rules_skip_with_the_rule_that_failed(
    bundle_path: Path, cohort: Path, tmp_path: Path
) -> None:
    predictor = Predictor(open_bundle(bundle_path))
    predictor.selection = SeriesSelection(series_description="FLAIR", min_slices=1)
    summary = predictor.predict_folder(cohort, tmp_path)
    assert summary.n_predicted == 0 and len(summary.skipped) == 3
    assert {r["code"] for r in summary.skipped} == {"series_description"}
    predictor.selection = SeriesSelection(min_slices=500)
    summary = predictor.predict_folder(cohort, tmp_path)
    assert {r["code"] for r in summary.skipped} == {"too_few_slices"}
    predictor.selection = SeriesSelection(orientations=["coronal"], min_slices=1)
    summary = predictor.predict_folder(cohort, tmp_path)
    assert {r["code"] for r in summary.skipped} == {"orientation"}


def test_key_image_banner_and_overlay() -> None:
    volume = np.zeros((20, 24, 10), dtype=np.float32)
    volume[5:15, 5:19, :] = 1.0
    saliency = np.zeros_like(volume)
    saliency[12, 6, 7] = 5.0  # strongest evidence on slice 7, patient's right-anterior
    result = SeriesResult("1.2.3", 0.9, 0.5, "m", "1", shadow=True)
    image, z = render_key_image(volume, saliency, result, scale=1)
    assert z == 7
    banner = image.shape[0] - volume.shape[1]
    assert image.shape[1] == volume.shape[0] and banner > 0
    assert image[:banner].any()  # text drawn
    body = image[banner:].astype(int)
    # radiological view: column = X mirrored, row = Y mirrored; the hot spot is red
    r, c = volume.shape[1] - 1 - 6, volume.shape[0] - 1 - 12
    assert body[r, c, 0] > body[r, c, 1] + 50
    plain, _ = render_key_image(
        volume, saliency, SeriesResult("1.2.3", 0.9, 0.5, "m", "1", False), 1
    )

    def red_text(img: np.ndarray) -> bool:  # the shadow warning is the only red line
        top = img[:banner].astype(int)
        return bool(((top[..., 0] > 200) & (top[..., 1] < 120)).any())

    assert red_text(image) and not red_text(plain)
    assert SHADOW_BANNER.startswith("SHADOW")


def test_missing_input_folder_is_a_clear_error(
    bundle_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "edge",
            "predict",
            "--bundle",
            str(bundle_path),
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 2 and "nope: no such DICOM folder" in capsys.readouterr().err


BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {"torch", "monai", "mlflow", "dvc", "torchio", "hydra", "evidently"}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"the edge runner imported {name}")
    sys.meta_path.insert(0, Block())
    """
)


def test_edge_commands_never_import_the_lab_stack(
    bundle_path: Path, cohort: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    cli = [sys.executable, "-m", "shiftguard.cli"]
    for args in (
        ["edge", "verify", str(bundle_path)],
        [
            "edge",
            "predict",
            "--bundle",
            str(bundle_path),
            str(cohort),
            "--out",
            str(tmp_path / "o"),
        ],
    ):
        proc = subprocess.run(cli + args, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(_rows(tmp_path / "o" / "results.csv")) == 3
    probe = subprocess.run(
        [sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True
    )
    assert "the edge runner imported torch" in probe.stderr  # the blocker itself works


def test_the_fast_sr_is_the_document_highdicom_writes_with_every_image(
    tmp_path: Path, cohort: Path
) -> None:
    from shiftguard.dicom.scan import list_files, scan_files
    from shiftguard.dicom.series import group_series
    from shiftguard.edge.dicom_out import SeriesResult, _fix_dates, build_sr, write_sr

    headers, _ = scan_files(list_files(next(cohort.iterdir())))
    group = group_series(headers)[0]
    slices = sorted(group.headers, key=lambda h: h.instance_number or 0)
    assert len(slices) > 10
    ref = pydicom.dcmread(slices[0].path, stop_before_pixels=True)
    result = SeriesResult(
        series_uid=str(ref.SeriesInstanceUID), probability=0.8, threshold=0.5,
        model_name="m", model_version="3", shadow=True,
    )  # fmt: skip
    write_sr(ref, slices, result, tmp_path / "fast.dcm")
    reference = build_sr(ref, slices, result)  # highdicom given every image
    _fix_dates(reference, ref)
    reference.save_as(tmp_path / "highdicom.dcm", enforce_file_format=True)
    assert (tmp_path / "fast.dcm").read_bytes() == (tmp_path / "highdicom.dcm").read_bytes()


@pytest.mark.peers("dciodvfy")
def test_a_source_without_type_2_study_attributes_still_gets_a_clean_sr(
    tmp_path: Path, cohort: Path
) -> None:
    """Some senders leave out Study ID, Accession Number or the referring physician; the SR
    needs them present (empty is allowed), so their absence must not cost the study its result."""
    from shiftguard.dicom.scan import list_files, scan_files
    from shiftguard.dicom.series import group_series
    from shiftguard.edge.dicom_out import STUDY_TYPE2, SeriesResult, write_sr

    headers, _ = scan_files(list_files(next(cohort.iterdir())))
    slices = sorted(group_series(headers)[0].headers, key=lambda h: h.instance_number or 0)
    ref = pydicom.dcmread(slices[0].path, stop_before_pixels=True)
    for keyword in STUDY_TYPE2:
        if keyword in ref:
            delattr(ref, keyword)
    result = SeriesResult(
        series_uid=str(ref.SeriesInstanceUID), probability=0.8, threshold=0.5,
        model_name="m", model_version="3", shadow=False,
    )  # fmt: skip
    sr = write_sr(ref, slices, result, tmp_path / "sr.dcm")
    assert sr.StudyID == "" and sr.AccessionNumber == ""
    assert "StudyID" not in ref  # the caller's dataset is left as it was
    # valid DICOM; dciodvfy only notes that a DICOMDIR needs the values the source did not have
    no_values = {
        f"Warning - Missing attribute or value that would be needed to build DICOMDIR - {name}"
        for name in ("Patient ID", "Study Date", "Study Time", "Study ID")
    }
    report = assert_dciodvfy_clean(
        tmp_path / "sr.dcm", iod="Comprehensive3DSR", allowed_warnings=no_values
    )
    assert set(report.warnings) == no_values


def test_the_reported_probability_is_the_calibrated_one(
    tmp_path: Path, cohort: Path, tiny: dict[str, Any], onnx_model: bytes
) -> None:
    """The same network with and without a calibration map: the raw probability is the same, the
    reported one is the map applied to it, and the SR says the reported one."""
    import json

    from shiftguard.calibration import Calibration
    from shiftguard.edge.bundle import write_bundle

    from .conftest import make_manifest

    cal = Calibration("platt", a=0.3, b=1.5, n=20, fitted_on="val")
    paths = {
        "plain": write_bundle(
            tmp_path / "plain.sgbundle", make_manifest(tiny), {"model.onnx": onnx_model}
        ),
        "calibrated": write_bundle(
            tmp_path / "cal.sgbundle",
            make_manifest(tiny, calibration={"member": "calibration.json", "method": "platt"}),
            {"model.onnx": onnx_model, "calibration.json": json.dumps(cal.to_json()).encode()},
        ),
    }
    rows = {}
    for name, path in paths.items():
        Predictor(open_bundle(path)).predict_folder(cohort, tmp_path / name)
        rows[name] = {r["series_uid"]: r for r in _rows(tmp_path / name / "results.csv")}
    assert rows["plain"].keys() == rows["calibrated"].keys() and rows["plain"]
    for uid, plain in rows["plain"].items():
        got = rows["calibrated"][uid]
        assert float(plain["probability"]) == float(plain["raw_probability"])
        assert float(got["raw_probability"]) == pytest.approx(float(plain["raw_probability"]))
        expected = cal.apply_one(float(got["raw_probability"]))
        assert float(got["probability"]) == pytest.approx(expected, abs=2e-6)
        assert float(got["probability"]) != pytest.approx(float(got["raw_probability"]), abs=1e-3)
        sr = pydicom.dcmread(tmp_path / "calibrated" / got["sr_file"])
        assert describe_sr(sr)["Probability"] == pytest.approx(float(got["probability"]), abs=1e-5)
