"""The scored sets' network inputs, written once by prepare and read by every cell."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from shiftguard.config.schema import DesignConfig, TrainConfig
from shiftguard.experiment.inputs import INPUTS_DIR, InputCache, input_tag, preprocess, write_inputs
from shiftguard.experiment.prepare import prepare

TINY = ["experiment=tiny", "cohort.n_subjects=6"]
TRAIN = TrainConfig(intensity_percentiles=(1.0, 99.0), input_shape=(16, 20, 16))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[DesignConfig, list[str]]:
    root = tmp_path_factory.mktemp("cohorts")
    design = DesignConfig(name="t", epochs=1, cohorts=str(root), external_cohort="holdout")
    sets = prepare(design, workers=2, progress=False, overrides=TINY, train=TRAIN)
    assert sets[0].inputs == root / "holdout" / INPUTS_DIR / f"{input_tag(TRAIN)}.npy"
    with Path(design.holdout).open(newline="") as fh:
        paths = [str(Path(design.holdout_ingest) / r["volume_path"]) for r in csv.DictReader(fh)]
    return design, paths


def test_prepare_writes_what_validation_computes_once(prepared) -> None:
    design, paths = prepared
    folder = design.cohort_folder(design.holdout_cohort) / INPUTS_DIR
    npy = folder / f"{input_tag(TRAIN)}.npy"
    rows = np.load(npy)
    assert rows.shape == (len(paths), 1, 16, 20, 16) and rows.dtype == np.float32
    expected = preprocess(paths, TRAIN)  # two processes wrote it; one computes it here
    for i, tensor in enumerate(expected):
        assert np.array_equal(rows[i], tensor.numpy())
    stamp = npy.stat().st_mtime_ns
    again = prepare(design, workers=1, progress=False, overrides=TINY, train=TRAIN)
    assert again[0].inputs == npy and npy.stat().st_mtime_ns == stamp  # left alone


def test_the_cache_reads_the_file_and_computes_the_rest(prepared, tmp_path: Path) -> None:
    design, paths = prepared
    folder = design.cohort_folder(design.holdout_cohort) / INPUTS_DIR
    cache = InputCache()
    assert cache.attach(folder, TRAIN) == len(paths)
    assert cache.attach(folder, TRAIN) == 0  # attached once
    fresh = InputCache().inputs(paths, TRAIN)  # nothing attached: computed
    served = cache.inputs(paths, TRAIN)
    for a, b in zip(served, fresh, strict=True):
        assert torch.equal(a, b)
    assert not cache._store  # every one came from the file
    # another preprocessing never reads these inputs
    other = TRAIN.model_copy(update={"intensity_percentiles": (2.0, 98.0)})
    assert cache.attach(folder, other) == 0
    scaled = cache.inputs(paths[:2], other)
    assert not torch.equal(scaled[0], served[0]) and len(cache._store) == 2


def test_an_unfinished_or_inconsistent_file_is_not_used(prepared, tmp_path: Path) -> None:
    _, paths = prepared
    folder = tmp_path / INPUTS_DIR
    write_inputs(paths[:3], TRAIN, folder, workers=1)
    tag = input_tag(TRAIN)
    names = folder / f"{tag}.txt"
    names.write_text(names.read_text() + "/elsewhere/extra.nii.gz\n")  # 4 names, 3 rows
    assert InputCache().attach(folder, TRAIN) == 0
    names.unlink()  # an interrupted write: the marker is missing
    assert InputCache().attach(folder, TRAIN) == 0
    with pytest.raises(ValueError, match="no volumes"):
        write_inputs([], TRAIN, folder)
