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
    acquisition_effects,
    acquisition_effects_torch,
    arm_transforms,
    labels_to_image_torch,
    render_physics,
)
from shiftguard.augment.params import SimParams
from shiftguard.augment.robustness import simulate
from shiftguard.cohort.physics import LABELS
from shiftguard.config.loader import compose, validate_all
from shiftguard.config.schema import (
    ARMS,
    AcquisitionEffectsConfig,
    AugmentConfig,
    LabelsArmConfig,
    ModelConfig,
    TrainConfig,
)
from shiftguard.edge.preprocess import scale_percentiles
from shiftguard.evaluation.validate import predict_paths
from shiftguard.models import SmallCNN3d
from shiftguard.training import build_dataset, build_loader, fit, items_from_rows
from shiftguard.training.data import LABELS_KEY, scale_percentiles_torch
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


@pytest.mark.parametrize("device", [None, "cpu"], ids=["loader", "on-device"])
@pytest.mark.parametrize("arm", ARMS)
def test_every_arm_composes_and_trains_one_step(
    arm: str, device: str | None, labelled, tmp_path: Path
) -> None:
    """Each arm trains a step in the loader's workers (``augment.device`` unset) and in the
    training process on a device (``cpu`` here: the path a GPU takes, minus the GPU)."""
    root, table, labels_dir = labelled
    train_cfg, augment = arm_config(arm)
    assert augment.training_arm == arm
    augment = augment.model_copy(update={"device": device})
    train_cfg = train_cfg.model_copy(
        update={"epochs": 1, "batch_size": 4, "num_workers": 0, "seed": 1, "input_shape": None}
    )
    needs = arm in ("labels", "physics")
    items = items_from_rows(table, root, "train", labels_dir=labels_dir if needs else None)
    dataset = build_dataset(items, train_cfg, train=True, augment=augment, spacing=(7.0, 7.0, 7.0))
    on_device = device is not None and arm != "none"
    assert (dataset.device is not None) is on_device
    loader = build_loader(dataset, train_cfg.model_copy(update={"num_workers": 2}), shuffle=True)
    assert loader.num_workers == (0 if on_device else 2)  # on a device: the training process
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


@pytest.mark.parametrize("device", [None, "cpu"], ids=["loader", "on-device"])
@pytest.mark.parametrize("arm", ["intensity", "labels", "physics"])
def test_an_arm_changes_the_image_only_on_its_share_of_samples(
    arm: str, device: str | None, labelled
) -> None:
    """``augment.probability`` gates every arm: at 0 the training input is the clean one, at 1 it
    differs on every sample, and the same seed draws the same image."""
    root, table, labels_dir = labelled
    train_cfg, augment = arm_config(arm)
    augment = augment.model_copy(update={"device": device})
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


def test_label_driven_arms_need_their_label_maps(
    rows, dataset_csv: Path, tmp_path: Path, conf_dir: Path
) -> None:
    root, table = rows
    csv_path = dataset_csv
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


def test_an_arm_on_cuda_without_a_gpu_is_a_named_error(
    rows, dataset_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``augment.device=cuda`` on a machine without CUDA stops before training with the setting
    and the way out, not a torch traceback from inside the cache."""

    root = rows[0]
    csv_path = dataset_csv
    sections: dict[str, Any] = validate_all(
        compose(["augment=intensity", "experiment=tiny", "train.lesion_masks=null"])
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TrainingDataError, match=r"augment.device=cuda: no CUDA device.*=null"):
        train_stage(
            sections["train"],
            ModelConfig.model_validate(sections["model"].model_dump()),
            sections["augment"].model_copy(update={"device": "cuda"}),
            csv_path,
            root,
            tmp_path / "out",
            track=False,
            root=tmp_path,
            device="cpu",
        )
    with pytest.raises(ValueError, match=r"device\n.*should match pattern"):
        AugmentConfig.model_validate({**compose([])["augment"], "device": "gpu0"})


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


def _head(shape: tuple[int, int, int] = (30, 34, 26)) -> tuple[np.ndarray, np.ndarray]:
    """A label map (air, CSF, grey and white matter, a lesion) and a smooth positive image."""
    x, y, z = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    r = (x - 15) ** 2 / 150 + (y - 17) ** 2 / 220 + (z - 13) ** 2 / 120
    labels = np.zeros(shape, np.int64)
    labels[r < 1] = LABELS["csf"]
    labels[r < 0.8] = LABELS["gm"]
    labels[r < 0.5] = LABELS["wm"]
    labels[(x - 12) ** 2 + (y - 15) ** 2 + (z - 13) ** 2 < 10] = LABELS["lesion"]
    image = (1.0 + labels + 0.01 * x * y).astype(np.float32)
    return labels, image


@pytest.mark.parametrize("seed", range(4))
def test_torch_acquisition_effects_are_the_numpy_blur_and_bias(seed: int) -> None:
    """With noise off, the torch chain is scipy's blur (edges held) and the same bias field drawn
    from the same generator, to float32 rounding, on anisotropic voxels."""
    _, image = _head()
    cfg = AcquisitionEffectsConfig(blur_mm=(0.3, 4.0), bias=0.6, noise=(0.0, 0.0))
    spacing = (1.5, 2.0, 3.0)
    expected = acquisition_effects(image, spacing, cfg, np.random.default_rng(seed))
    got = acquisition_effects_torch(
        torch.from_numpy(image), spacing, cfg, np.random.default_rng(seed)
    )
    assert got.dtype == torch.float32 and got.shape == image.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=2e-6, atol=2e-6 * float(expected.max()))
    assert not np.allclose(expected, image, rtol=1e-3)  # blur and bias did something


def test_torch_acquisition_noise_is_the_numpy_rician_distribution() -> None:
    """The noise field is another draw of the numpy path's distribution: on a constant image the
    Rician magnitude's mean and spread agree (std relative to the 99th percentile, as drawn)."""
    image = np.full((40, 40, 40), 100.0, np.float32)
    cfg = AcquisitionEffectsConfig(blur_mm=(0.0, 0.0), bias=0.0, noise=(0.2, 0.2))
    a = acquisition_effects(image, (1, 1, 1), cfg, np.random.default_rng(3))
    b = acquisition_effects_torch(torch.from_numpy(image), (1, 1, 1), cfg, np.random.default_rng(3))
    b_np = b.numpy()
    assert not np.allclose(a, b_np)  # not the same numbers
    # 64,000 voxels: mean and std within a few standard errors of each other
    assert b_np.mean() == pytest.approx(a.mean(), abs=0.3)
    assert b_np.std() == pytest.approx(a.std(), rel=0.03)
    assert a.std() == pytest.approx(20.0, rel=0.03)  # sigma = 0.2 x the 99th percentile (100)
    again = acquisition_effects_torch(
        torch.from_numpy(image), (1, 1, 1), cfg, np.random.default_rng(3)
    )
    assert torch.equal(b, again)


def test_torch_label_synthesis_draws_a_gaussian_per_label() -> None:
    """Every voxel of a label follows that label's drawn mean and standard deviation (within
    ``cfg.mean`` and ``cfg.std``); labels draw different values; the seed fixes the image."""
    labels, _ = _head((40, 44, 36))
    t = torch.from_numpy(labels)
    cfg = LabelsArmConfig(mean=(0.1, 0.9), std=(0.01, 0.05))
    image = labels_to_image_torch(t, cfg, np.random.default_rng(7))
    means = []
    for value in np.unique(labels):
        part = image[t == value]
        means.append(float(part.mean()))
        assert 0.1 - 0.01 <= means[-1] <= 0.9 + 0.01
        assert 0.01 * 0.8 <= float(part.std()) <= 0.05 * 1.2
    assert len(set(np.round(means, 3))) == len(means)
    assert torch.equal(image, labels_to_image_torch(t, cfg, np.random.default_rng(7)))
    assert not torch.equal(image, labels_to_image_torch(t, cfg, np.random.default_rng(8)))


def test_the_physics_arm_renders_the_same_acquisition_on_a_device() -> None:
    """The torch path draws the numpy path's field strength and sequence and renders the same
    signal per tissue (noise off: the images agree)."""
    cfg = validate_all(compose(["augment=physics"]))["augment"]
    assert isinstance(cfg, AugmentConfig) and cfg.physics is not None
    effects = cfg.physics.effects.model_copy(update={"noise": (0.0, 0.0)})
    physics = cfg.physics.model_copy(update={"effects": effects})
    labels, _ = _head()
    data = {"image": torch.zeros((1, *labels.shape)), "labels": torch.from_numpy(labels[None])}
    for seed in range(3):
        cpu = RandPhysicsRenderd("image", physics, (2.0, 2.0, 2.0))
        dev = RandPhysicsRenderd("image", physics, (2.0, 2.0, 2.0), device="cpu")
        cpu.set_random_state(seed)
        dev.set_random_state(seed)
        a, b = cpu(data)["image"], dev(data)["image"]
        assert a.shape == b.shape == (1, *labels.shape)
        torch.testing.assert_close(b, a, rtol=2e-6, atol=2e-6)
    with pytest.raises(ValueError, match="label values"):
        dev({"image": data["image"], "labels": torch.full((1, 2, 2, 2), 40)})


@pytest.mark.parametrize("kind", ["gamma", "background", "ties", "constant"])
def test_scaling_on_a_device_is_the_edge_scaling(kind: str) -> None:
    """The percentile scaling a device runs equals the edge's numpy scaling to float32 rounding,
    on skewed volumes, empty backgrounds, heavy ties and a constant volume."""
    rng = np.random.default_rng(11)
    shape = (32, 36, 30)
    volume = {
        "gamma": rng.gamma(2.0, 300.0, shape),
        "background": np.where(rng.random(shape) < 0.6, 0.0, rng.normal(800, 90, shape)),
        "ties": rng.integers(0, 5, shape) * 250.0,
        "constant": np.full(shape, 42.0),
    }[kind].astype(np.float32)
    expected = scale_percentiles(volume, 1.0, 99.0)
    got = scale_percentiles_torch(torch.from_numpy(volume), 1.0, 99.0)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
