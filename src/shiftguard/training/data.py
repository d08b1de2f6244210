"""MONAI datasets and loaders built from rows of ``artifacts/split/dataset.csv``.

Deterministic preprocessing (load, channel first, percentile intensity scaling, robust to each vendor's
stored scale) is cached by :class:`monai.data.CacheDataset`; the training set adds the augmentation
arm (:mod:`shiftguard.augment.arms`) and a random left-right flip, drawn per sample when the loader
serves it. The arm runs on the ingest grid and on the volume's own intensities, before percentile
scaling, where the robustness test sets are simulated too and where the edge receives a study (one
intensity domain); the last transform area-resamples to ``train.input_shape`` when the network sees a
coarser grid. The label-driven arms also load each item's tissue label map onto its grid. With lesion masks
(``train.lesion_masks``) each training item also carries its mask, moved onto the volume's grid
through both affines and cached on the network's grid; the flip turns it with the image.

With ``augment.device`` set the cache lives on that device and the arm, scaling, flip and resampling
run there, in the training process (MONAI's recipe for fast GPU training: cache on the GPU, random
transforms on the GPU, no loader workers).

The random transforms are seeded per sample (:class:`SeededCacheDataset`): sample ``i`` in epoch ``e``
draws from a seed derived from ``train.seed``, ``e`` and ``i``, whichever process transforms it. A
loader worker's own seed (MONAI's ``worker_init_fn``) is overridden, so the draws, and the trained
network, do not depend on the number of loader workers, on which worker serves which batch, or on
the batch size.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import (
    Compose,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    RandFlipd,
    Resized,
    ToDeviced,
)
from torch.utils.data import DistributedSampler

from shiftguard.augment.arms import LABELS_KEY, arm_transforms
from shiftguard.config.schema import AugmentConfig, TrainConfig
from shiftguard.edge.preprocess import scale_percentiles
from shiftguard.training.distributed import DistContext
from shiftguard.utils import loader_workers

IMAGE, LABEL, KEY, MASK = "image", "label", "key", "mask"


def mask_file(masks_dir: Path, row: Mapping[str, Any], what: str = "lesion mask") -> Path:
    """The lesion mask (or another per-series map, ``what``) of a ``dataset.csv`` row:
    ``<series_key>.nii.gz`` in ``masks_dir``, else ``<patient_id>.nii.gz`` (one map per subject, in
    world coordinates, serves all its series).

    Raises:
        ValueError: when neither exists.
    """
    names = [str(row["series_key"])]
    if row.get("patient_id"):
        names.append(str(row["patient_id"]))
    for name in names:
        path = Path(masks_dir) / f"{name}.nii.gz"
        if path.is_file():
            return path
    hint = (
        "give every training series a mask (all zero without a lesion) or set "
        "train.lesion_masks=null"
        if what == "lesion mask"
        else "give every training series one, or train another augmentation arm"
    )
    raise ValueError(
        f"series {row['series_key']}: no {what} in {masks_dir} (looked for "
        + " or ".join(f"{n}.nii.gz" for n in names)
        + f"); {hint}"
    )


def items_from_rows(
    rows: Iterable[Mapping[str, Any]],
    ingest_dir: Path,
    split: str | None = None,
    masks_dir: Path | None = None,
    labels_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Dataset items ``{"image": path, "label": float, "key": series_key}`` for one split, with
    ``"mask": path`` (:func:`mask_file`) when ``masks_dir`` is given and ``"labels": path`` (the
    tissue label map) when ``labels_dir`` is given.

    Args:
        rows: rows of ``dataset.csv`` (``series_key``, ``volume_path``, ``finding``, ``split``).
        ingest_dir: the folder ``volume_path`` is relative to.
        split: keep only rows of this split; ``None`` keeps all.
        masks_dir: the folder of lesion masks (``train.lesion_masks``).
        labels_dir: the folder of tissue label maps (the label-driven augmentation arms).

    Raises:
        ValueError: when a kept row has no 0/1 ``finding``, or no mask in ``masks_dir`` or label
            map in ``labels_dir``.
    """
    items = []
    for row in rows:
        if split is not None and row["split"] != split:
            continue
        finding = str(row["finding"]).strip()
        if finding not in {"0", "1", "0.0", "1.0"}:
            raise ValueError(
                f"series {row['series_key']}: finding {row['finding']!r} is not 0/1; only labelled "
                "splits can be trained or validated on"
            )
        item: dict[str, Any] = {
            IMAGE: str(Path(ingest_dir) / str(row["volume_path"])),
            LABEL: float(finding),
            KEY: str(row["series_key"]),
        }
        if masks_dir is not None:
            item[MASK] = str(mask_file(masks_dir, row))
        if labels_dir is not None:
            item[LABELS_KEY] = str(mask_file(labels_dir, row, what="tissue label map"))
        items.append(item)
    return items


def volume_geometry(
    paths: Sequence[str | Path],
) -> tuple[tuple[float, float, float], tuple[int, ...]]:
    """Voxel spacing (mm) and grid shape ``(X, Y, Z)`` shared by every volume (headers only).

    Raises:
        ValueError: when there are no volumes or they disagree.
    """
    if not paths:
        raise ValueError("no volumes to read the input geometry from")
    geometry: set[tuple[tuple[float, float, float], tuple[int, ...]]] = set()
    for path in paths:
        header: Any = nib.load(str(path)).header
        zooms = tuple(round(float(z), 4) for z in header.get_zooms()[:3])
        geometry.add(
            ((zooms[0], zooms[1], zooms[2]), tuple(int(s) for s in header.get_data_shape()[:3]))
        )
    if len(geometry) > 1:
        raise ValueError(
            f"volumes differ in spacing/shape {sorted(geometry)}; re-run ingest so every volume "
            "is on the same grid"
        )
    return geometry.pop()


class ScalePercentilesd(MapTransform):
    """Map each volume's ``lower`` and ``upper`` intensity percentiles to 0 and 1, without clipping:
    :func:`shiftguard.edge.preprocess.scale_percentiles`, the very function the edge runs, so
    training and the deployed bundle scale alike.

    It replaces MONAI's ``ScaleIntensityRangePercentilesd`` (the same definition: linear
    interpolation between order statistics), whose ``torch.quantile`` sorts the whole volume once
    per percentile: 0.09 s per call on a 2 mm grid, most of the validation stage's time, against
    numpy's partial sort.
    """

    def __init__(self, keys: Any, lower: float, upper: float) -> None:
        super().__init__(keys)
        self.lower, self.upper = float(lower), float(upper)

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            value = out[key]
            if torch.is_tensor(value) and value.device.type != "cpu":
                out[key] = scale_percentiles_torch(value, self.lower, self.upper)
                continue
            array = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
            out[key] = torch.from_numpy(scale_percentiles(array, self.lower, self.upper))
        return out


def scale_percentiles_torch(volume: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """:func:`~shiftguard.edge.preprocess.scale_percentiles` on ``volume``'s device, for volumes
    that live on a GPU (``augment.device``): the same definition (linear interpolation between
    order statistics, :func:`torch.quantile`), equal to float32 rounding; a constant volume becomes
    all zeros.

    >>> x = torch.arange(101.0)
    >>> scale_percentiles_torch(x, 1.0, 99.0)[[1, 99]].tolist()
    [0.0, 1.0]
    """
    values = volume.to(torch.float32)
    q = torch.tensor([lower / 100.0, upper / 100.0], dtype=torch.float64, device=values.device)
    lo, hi = torch.quantile(values.reshape(-1).double(), q).tolist()
    if hi - lo == 0:
        return values - float(lo)
    return ((values.double() - lo) / (hi - lo)).to(torch.float32)


class LesionMaskOnGridd(MapTransform):
    """Load ``data["mask"]`` (a file path) onto the grid of the volume ``data["image"]`` (still a
    file path: place it before :class:`~monai.transforms.LoadImaged`) through both files' affines,
    trilinearly: ``(1, X, Y, Z)`` float32, each voxel's lesion fraction in ``[0, 1]``.

    Masks written on the acquired series grid (any orientation, spacing or tilt) thereby land on
    the lesion in the ingest volume, which is on its own grid.
    """

    def __init__(self, mask_key: str = MASK, image_key: str = IMAGE, order: int = 1) -> None:
        super().__init__([mask_key])
        self.mask_key, self.image_key, self.order = mask_key, image_key, order

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        from nibabel.processing import resample_from_to

        out = dict(data)
        reference: Any = nib.load(str(out[self.image_key]))
        mask: Any = nib.load(str(out[self.mask_key]))
        if mask.ndim != 3:
            raise ValueError(f"{out[self.mask_key]}: a lesion mask must be 3D, got {mask.shape}")
        source = nib.Nifti1Image(np.asarray(mask.dataobj, dtype=np.float32), mask.affine)
        grid = (tuple(reference.shape[:3]), reference.affine)
        moved = resample_from_to(source, grid, order=self.order, mode="constant", cval=0.0)
        array = np.asarray(moved.dataobj, dtype=np.float32)
        if self.order == 0:  # label values stay labels
            tensor = torch.from_numpy(np.ascontiguousarray(np.rint(array)[None].astype(np.uint8)))
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(np.clip(array, 0.0, 1.0)[None]))
        out[self.mask_key] = tensor
        return out


class LabelMapOnGridd(LesionMaskOnGridd):
    """A tissue label map (``data["labels"]``, a file path) onto the volume's grid by nearest
    neighbour: ``(1, X, Y, Z)`` uint8 label values. Place it before
    :class:`~monai.transforms.LoadImaged`, like :class:`LesionMaskOnGridd`."""

    def __init__(self, labels_key: str = LABELS_KEY, image_key: str = IMAGE) -> None:
        super().__init__(labels_key, image_key, order=0)


def preprocessing(
    cfg: TrainConfig, masks: bool = False, labels: bool = False, scale: bool = True
) -> list[Any]:
    """The deterministic transforms: file to a ``(1, X, Y, Z)`` float tensor scaled by percentiles;
    with ``masks``, the item's lesion mask on the same grid (:class:`LesionMaskOnGridd`), already
    area-resampled to the network's grid (the cache keeps it there: a flip commutes with it); with
    ``labels``, its tissue label map on the volume's grid (:class:`LabelMapOnGridd`). ``scale=False``
    leaves the percentile scaling out (:func:`intensity_scaling`), for a training set whose
    augmentation runs on the volume's own intensities first."""
    mask_steps: list[Any] = []
    if masks:
        mask_steps = [LesionMaskOnGridd(), *to_input_grid(cfg, (MASK,))]
    if labels:
        mask_steps.append(LabelMapOnGridd())
    steps = [*mask_steps, LoadImaged(IMAGE, image_only=True), EnsureChannelFirstd(IMAGE)]
    if not scale:
        return [*steps, EnsureTyped(IMAGE, dtype=torch.float32, track_meta=False)]
    return [*steps, *intensity_scaling(cfg)]


def intensity_scaling(cfg: TrainConfig) -> list[Any]:
    """Percentile scaling to the network's intensities (:class:`ScalePercentilesd`), a float32
    tensor."""
    lo, hi = cfg.intensity_percentiles
    return [
        ScalePercentilesd(IMAGE, lo, hi),
        EnsureTyped(IMAGE, dtype=torch.float32, track_meta=False),
    ]


def workers_for(cfg: TrainConfig) -> int:
    """``cfg.num_workers``, or the runtime default of :func:`shiftguard.utils.loader_workers`."""
    return loader_workers() if cfg.num_workers is None else cfg.num_workers


def to_input_grid(cfg: TrainConfig, keys: Sequence[str] = (IMAGE,)) -> list[Any]:
    """The transform to the network's grid: area resampling of ``keys`` to ``cfg.input_shape``
    (none if unset)."""
    if cfg.input_shape is None:
        return []
    return [Resized(list(keys), spatial_size=tuple(cfg.input_shape), mode="area")]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s random transforms in ``epoch``: a 32-bit value mixed from the
    three by :class:`numpy.random.SeedSequence` (neighbouring indices or epochs give unrelated seeds).

    >>> sample_seed(0, 0, 0) == sample_seed(0, 0, 0) != sample_seed(0, 0, 1)
    True
    """
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class SeededCacheDataset(CacheDataset):
    """A :class:`~monai.data.CacheDataset` that seeds its random transforms per sample.

    Before transforming sample ``i`` it calls ``transform.set_random_state`` with
    :func:`sample_seed` ``(seed, epoch, i)``, so a sample's draws are the same in the main process and
    in any loader worker, in any order. :func:`shiftguard.training.fit` calls :meth:`set_epoch` before
    each epoch; the loader copies the dataset into its workers when an epoch's iteration starts,
    which needs ``persistent_workers=False`` (persistent workers would keep the first epoch).

    Args:
        data: the items, as for :class:`~monai.data.CacheDataset`.
        transform: a :class:`~monai.transforms.Compose`.
        seed: ``train.seed``.
        **kwargs: :class:`~monai.data.CacheDataset`'s other arguments.
    """

    def __init__(self, data: Sequence[Any], transform: Compose, seed: int, **kwargs: Any) -> None:
        self.seed = int(seed)
        self.epoch = 0
        self.device: torch.device | None = None  # where the random transforms run (augment.device)
        super().__init__(data=data, transform=transform, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch ``epoch``'s random numbers from now on."""
        self.epoch = int(epoch)

    def _transform(self, index: int) -> Any:
        self.transform.set_random_state(seed=sample_seed(self.seed, self.epoch, index % len(self)))
        return super()._transform(index)


def build_dataset(
    items: Sequence[Mapping[str, Any]],
    cfg: TrainConfig,
    train: bool = False,
    augment: AugmentConfig | None = None,
    spacing: Sequence[float] | None = None,
) -> SeededCacheDataset:
    """A cached dataset; a training set adds a random left-right flip and the scanner simulation.

    Args:
        items: from :func:`items_from_rows`.
        cfg: the ``train`` section (cache rate, workers, percentiles, flip probability).
        train: add the random transforms (flip; the augmentation arm when ``augment`` is given).
        augment: the ``augment`` section (its :attr:`~shiftguard.config.schema.AugmentConfig.training_arm`);
            ``None`` trains without augmentation.
        spacing: voxel size in mm for the arm; read from the volumes when omitted.

    Each sample is ``{"image": (1, X, Y, Z) float32, "label": float, "key": str}`` with ``(X, Y, Z)``
    the ``cfg.input_shape`` (the ingest grid when unset), plus ``"mask"`` (the lesion fraction per
    voxel on the same grid, flipped with the image, never simulated) when the items have one. Random
    transforms are seeded per sample from ``cfg.seed``, the epoch (set by
    :func:`shiftguard.training.fit`) and the sample's index (see :class:`SeededCacheDataset`).
    """
    masks = bool(items) and all(MASK in item for item in items)
    labels = bool(items) and all(LABELS_KEY in item for item in items)
    arm: list[Any] = []
    device = None
    if train and augment is not None and augment.training_arm != "none":
        if spacing is None:
            spacing = volume_geometry([item[IMAGE] for item in items])[0]
        device = augment.device
        arm = arm_transforms(augment, spacing, IMAGE, device=device)
    if arm:  # the arm sees the volume's own intensities; scaling follows, per sample
        transforms = preprocessing(cfg, masks=masks, labels=labels, scale=False)
        if device is not None:  # the cache on the device; what follows runs there
            keys = [IMAGE] + ([MASK] if masks else []) + ([LABELS_KEY] if labels else [])
            transforms.append(ToDeviced(keys, device=device))
        transforms += [*arm, *intensity_scaling(cfg)]
        if labels:
            transforms.append(DeleteItemsd(LABELS_KEY))
    else:
        transforms = preprocessing(cfg, masks=masks)
    if train:
        transforms.append(
            RandFlipd([IMAGE, MASK] if masks else IMAGE, prob=cfg.flip_probability, spatial_axis=0)
        )
    transforms += to_input_grid(cfg)
    dataset = SeededCacheDataset(
        data=[dict(item) for item in items],
        transform=Compose(transforms),
        seed=cfg.seed,
        cache_rate=cfg.cache_rate,
        num_workers=max(workers_for(cfg), 1) if cfg.cache_rate > 0 else 0,
        progress=False,
    )
    dataset.device = None if device is None else torch.device(device)
    return dataset


def build_loader(
    dataset: CacheDataset,
    cfg: TrainConfig,
    shuffle: bool,
    ctx: DistContext | None = None,
    batch_size: int | None = None,
) -> DataLoader:
    """A loader whose shuffling comes from a generator seeded with ``cfg.seed``.

    Under ``torchrun`` (``ctx`` with several processes) a
    :class:`~torch.utils.data.DistributedSampler` gives each rank its shard instead.
    Batches are ``{"image": (B, 1, X, Y, Z), "label": (B,) float, "key": list[str]}``. A dataset
    whose random transforms run on a device (``dataset.device``, from ``augment.device``) is served
    by the training process itself: no worker processes, nothing to pin.
    """
    on_device = getattr(dataset, "device", None) is not None
    generator = torch.Generator()
    generator.manual_seed(cfg.seed)
    sampler: DistributedSampler[Any] | None = None
    if ctx is not None and ctx.distributed:
        sampler = DistributedSampler(
            dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=cfg.seed
        )
    return DataLoader(
        dataset,
        batch_size=batch_size or cfg.batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=0 if on_device else workers_for(cfg),
        generator=generator,
        pin_memory=torch.cuda.is_available() and not on_device,
        persistent_workers=False,
    )


def labels_of(items: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Labels ``(N,)`` of dataset items."""
    return np.asarray([float(item[LABEL]) for item in items], dtype=np.float64)
