"""The augmentation arms: each composes from conf/ and trains one tiny step; all of them, the
robustness sets and inference share one intensity domain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from shiftguard.augment.arms import (
    RandApplyd,
    RandLabelsToImaged,
    RandPhysicsRenderd,
    arm_transforms,
    render_physics,
)
from shiftguard.augment.params import SimParams
from shiftguard.augment.robustness import simulate
from shiftguard.cohort.physics import LABELS
from shiftguard.config.loader import compose, validate_all
from shiftguard.config.schema import ARMS, AugmentConfig, ModelConfig, TrainConfig
from shiftguard.evaluation.validate import predict_paths
from shiftguard.models import SmallCNN3d
from shiftguard.training import build_dataset, build_loader, fit, items_from_rows
from shiftguard.training.data import LABELS_KEY
from shiftguard.training.stage import TrainingDataError
from shiftguard.training.stage import run as train_stage

SHAPE = (24, 28, 24)  # the rows fixture's volumes (7 mm voxels)


def write_labels(folder: Path, table: list[dict[str, str]]) -> Path:
    """A tissue label map per series on a finer grid than its volume: CSF, grey and white matter
    shells, and the lesion (the blob the positives carry)."""
    folder.mkdir(parents=True, exist_ok=True)
    shape = tuple(2 * n for n in SHAPE)
    x, y, z = np.mgrid[: shape[0], : shape[1], : shape[2]] / 2.0
    r = (x - 12) ** 2 / 100 + (y - 14) ** 2 / 140 + (z - 12) ** 2 / 100
    blob = ((x - 9) ** 2 + (y - 16) ** 2 + (z - 12) ** 2) < 9
    base = np.zeros(shape, np.uint8)
    base[r < 1] = LABELS["csf"]
    base[r < 0.8] = LABELS["gm"]
    base[r < 0.5] = LABELS["wm"]
    for row in table:
        labels = base.copy()
        if row["finding"] == "1":
            labels[blob & (r < 1)] = LABELS["lesion"]
        nib.Nifti1Image(labels, np.diag([3.5, 3.5, 3.5, 1.0])).to_filename(
            folder / f"{row['series_key']}.nii.gz"
        )
    return folder


@pytest.fixture(scope="module")
def labelled(rows, tmp_path_factory: pytest.TempPathFactory):
    root, table = rows
    return root, table, write_labels(tmp_path_factory.mktemp("labels"), table)


def arm_config(arm: str) -> tuple[TrainConfig, AugmentConfig]:
    sections = validate_all(compose([f"augment={arm}", "experiment=tiny"]))
    train = sections["train"]
    assert isinstance(train, TrainConfig)
    augment = sections["augment"]
    assert isinstance(augment, AugmentConfig)
    return train, augment


@pytest.mark.parametrize("arm", ARMS)
def test_every_arm_composes_and_trains_one_step(arm: str, labelled, tmp_path: Path) -> None:
    root, table, labels_dir = labelled
    train_cfg, augment = arm_config(arm)
    assert augment.training_arm == arm
    train_cfg = train_cfg.model_copy(
        update={"epochs": 1, "batch_size": 4, "num_workers": 0, "seed": 1, "input_shape": None}
    )
    needs = arm in ("labels", "physics")
    items = items_from_rows(table, root, "train", labels_dir=labels_dir if needs else None)
    dataset = build_dataset(items, train_cfg, train=True, augment=augment, spacing=(7.0, 7.0, 7.0))
    sample = dataset[0]
    assert sample["image"].shape == (1, *SHAPE) and sample["image"].dtype == torch.float32
    assert torch.isfinite(sample["image"]).all()
    assert LABELS_KEY not in sample  # the label map never reaches the network
    net = SmallCNN3d(channels=(2, 4))
    before = [p.detach().clone() for p in net.parameters()]
    val = build_dataset(items_from_rows(table, root, "val"), train_cfg)
    result = fit(
        net,
        build_loader(dataset, train_cfg, shuffle=True),
        build_loader(val, train_cfg, shuffle=False),
        train_cfg,
        checkpoint_dir=tmp_path / "ckpt",
    )
    assert len(result.history) == 1 and np.isfinite(result.history[0].train_loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


@pytest.mark.parametrize("arm", ["intensity", "labels", "physics"])
def test_an_arm_changes_the_image_only_on_its_share_of_samples(arm: str, labelled) -> None:
    """``augment.probability`` gates every arm: at 0 the training input is the clean one, at 1 it
    differs on every sample, and the same seed draws the same image."""
    root, table, labels_dir = labelled
    train_cfg, augment = arm_config(arm)
    train_cfg = train_cfg.model_copy(
        update={"num_workers": 0, "input_shape": None, "flip_probability": 0.0, "cache_rate": 0.0}
    )
    items = items_from_rows(
        table, root, "train", labels_dir=labels_dir if arm != "intensity" else None
    )[:4]
    clean = build_dataset(items, train_cfg)
    # ... a histogram shift or a gamma can draw an identity, so force every part on
    intensity = augment.intensity.model_copy(
        update={"gamma_probability": 1.0, "histogram_probability": 1.0, "randconv_probability": 1.0}
    )
    for probability, differs in ((0.0, False), (1.0, True)):
        cfg = augment.model_copy(update={"probability": probability, "intensity": intensity})
        ds = build_dataset(items, train_cfg, train=True, augment=cfg, spacing=(7.0, 7.0, 7.0))
        for i in range(len(items)):
            changed = not torch.allclose(ds[i]["image"], clean[i]["image"], atol=1e-5)
            assert changed is differs, (arm, probability, i)
    cfg = augment.model_copy(update={"probability": 1.0})
    one = build_dataset(items, train_cfg, train=True, augment=cfg, spacing=(7.0, 7.0, 7.0))
    two = build_dataset(items, train_cfg, train=True, augment=cfg, spacing=(7.0, 7.0, 7.0))
    assert torch.equal(one[2]["image"], two[2]["image"])
    one.set_epoch(1)
    assert not torch.equal(one[2]["image"], two[2]["image"])


def test_one_intensity_domain_for_training_robustness_and_inference(rows, tmp_path: Path) -> None:
    """The same volume through the training path at severity 0 and through the validation path
    (the robustness sets' severity 0 is the clean file, as inference reads it) gives the same
    network input; and with the same drawn acquisition, the training path equals the robustness
    set's volume scaled as inference scales it (the simulation runs before scaling in both)."""
    root, table = rows
    train_cfg = TrainConfig(
        seed=0, num_workers=0, flip_probability=0.0, cache_rate=0.0, input_shape=None
    )
    augment = AugmentConfig.model_validate(
        {**compose([])["augment"], "severity": (0, 0), "probability": 1.0}
    )
    items = items_from_rows(table, root, "train")[:3]
    training = build_dataset(items, train_cfg, train=True, augment=augment, spacing=(7.0,) * 3)
    net_inputs = build_dataset(items, train_cfg)  # what predict_paths feeds the network
    for i in range(len(items)):
        assert torch.equal(training[i]["image"], net_inputs[i]["image"])

    # a drawn acquisition whose gamma does not commute with percentile scaling
    params = SimParams(gamma=0.6, scale=3.0)
    volume = np.asarray(nib.load(items[0]["image"]).dataobj, dtype=np.float32)
    from shiftguard.augment.transforms import ScannerSimd
    from shiftguard.training.data import intensity_scaling, preprocessing

    chain = [
        *preprocessing(train_cfg, scale=False),
        ScannerSimd("image", params, spacing=(7.0,) * 3),
        *intensity_scaling(train_cfg),
    ]
    from monai.transforms import Compose

    trained_on = Compose(chain)({"image": items[0]["image"]})["image"]
    robust, _ = simulate(volume, (7.0,) * 3, augment, "low_field", 0, np.random.default_rng(0))
    assert np.array_equal(robust, volume)  # severity 0 is the clean volume
    from shiftguard.augment.fast import apply_fast

    shifted = apply_fast(torch.from_numpy(volume[None]), params, (7.0,) * 3)[0].numpy()
    path = tmp_path / "shifted.nii"
    nib.Nifti1Image(shifted, np.diag([7.0, 7.0, 7.0, 1.0])).to_filename(path)
    scored_on = build_dataset([{"image": str(path), "label": 0.0, "key": "x"}], train_cfg)[0]
    torch.testing.assert_close(trained_on, scored_on["image"], atol=1e-5, rtol=1e-5)
    # scaling first, then simulating (the old training path), is another domain
    scaled_first = Compose(
        [*preprocessing(train_cfg), ScannerSimd("image", params, spacing=(7.0,) * 3)]
    )({"image": items[0]["image"]})["image"]
    assert not torch.allclose(scaled_first, scored_on["image"], atol=1e-2)
    # and the network sees the two the same way
    net = SmallCNN3d(channels=(2, 4)).eval()
    with torch.no_grad():
        direct = torch.sigmoid(net(trained_on[None].float())).item()
    assert predict_paths(net, [str(path)], train_cfg)[0] == pytest.approx(direct, abs=1e-5)


def test_render_physics_follows_the_signal_equations() -> None:
    """White matter renders at 1 (the reference); on an inversion-prepared T1-weighted sequence
    CSF is darker than grey matter, darker than white matter; an unknown label value is named."""
    cfg = validate_all(compose(["augment=physics"]))["augment"]
    assert isinstance(cfg, AugmentConfig) and cfg.physics is not None
    physics = cfg.physics.model_copy(update={"sequences": ["ir_gre"]})
    labels = np.array([[[0, LABELS["csf"], LABELS["gm"], LABELS["wm"]]]])
    image, drawn = render_physics(labels, physics, np.random.default_rng(0))
    assert drawn["sequence"] == "ir_gre" and 0.5 <= drawn["field_strength"] <= 3.0
    air, csf, gm, wm = image.ravel()
    assert air == 0 and wm == pytest.approx(1.0) and csf < gm < wm
    with pytest.raises(ValueError, match="label values"):
        render_physics(np.array([[[40]]]), physics, np.random.default_rng(0))


def test_label_driven_arms_need_their_label_maps(rows, tmp_path: Path, conf_dir: Path) -> None:
    root, table = rows
    csv_path = tmp_path / "dataset.csv"
    import csv

    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    sections: dict[str, Any] = validate_all(
        compose(["augment=labels", "experiment=tiny", "train.lesion_masks=null"])
    )
    augment = sections["augment"].model_copy(
        update={"labels": sections["augment"].labels.model_copy(update={"labels_dir": "nowhere"})}
    )
    with pytest.raises(TrainingDataError, match=r"nowhere.*tissue label maps"):
        train_stage(
            sections["train"],
            ModelConfig.model_validate(sections["model"].model_dump()),
            augment,
            csv_path,
            root,
            tmp_path / "out",
            track=False,
            root=tmp_path,
        )
    empty = tmp_path / "labels"
    empty.mkdir()
    with pytest.raises(ValueError, match="no tissue label map"):
        items_from_rows(table, root, "train", labels_dir=empty)


def test_the_arm_gate_seeds_what_it_wraps() -> None:
    """:class:`RandApplyd` passes its seed on, so one seed fixes the wrapped draws too."""
    labels = torch.zeros((1, 6, 6, 6), dtype=torch.uint8)
    labels[0, 1:5, 1:5, 1:5] = LABELS["wm"]
    cfg = AugmentConfig.model_validate(compose(["augment=labels"])["augment"])
    make = lambda: RandApplyd([RandLabelsToImaged("image", cfg.labels, (2.0, 2.0, 2.0))], 1.0)  # noqa: E731
    a, b = make(), make()
    a.set_random_state(5)
    b.set_random_state(5)
    data = {"image": torch.zeros((1, 6, 6, 6)), "labels": labels}
    assert torch.equal(a(data)["image"], b(data)["image"])
    b.set_random_state(6)
    assert not torch.equal(a(data)["image"], b(data)["image"])
    physics = AugmentConfig.model_validate(compose(["augment=physics"])["augment"]).physics
    assert physics is not None
    gate = RandApplyd([RandPhysicsRenderd("image", physics, (2.0, 2.0, 2.0))], 0.0)
    gate.set_random_state(0)
    assert torch.equal(gate(data)["image"], data["image"])  # closed gate: untouched


def test_arm_none_adds_no_transform_and_artifact_keeps_the_profiles() -> None:
    none = AugmentConfig.model_validate(compose(["augment=none"])["augment"])
    assert none.training_arm == "none" and arm_transforms(none, (2.0,) * 3) == []
    assert none.seen_profiles() == []
    artifact = AugmentConfig.model_validate(compose(["augment=artifact"])["augment"])
    assert artifact.seen_profiles() == ["legacy_vendor", "low_field", "motion_prone", "thick_slice"]
    off = artifact.model_copy(update={"enabled": False})
    assert off.training_arm == "none" and off.seen_profiles() == []
