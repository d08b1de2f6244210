"""The training-time augmentation arms (``augment.arm``): what training does to an image before it is
scaled for the network.

Every arm works on the ingested volume's own intensities, before percentile scaling, exactly where the
robustness sets are simulated (:mod:`shiftguard.augment.robustness`) and where the edge receives a
study: one intensity domain for training, the robustness sets and inference.

- ``none``: nothing.
- ``artifact``: :class:`~shiftguard.augment.transforms.RandScannerSimd` over the scanner profiles.
- ``intensity``: MONAI's random gamma (``RandAdjustContrastd``) and histogram shift
  (``RandHistogramShiftd``), then a random convolution (:class:`~shiftguard.augment.randconv.RandConvd`).
- ``labels``: :class:`RandLabelsToImaged`, a new image from the tissue label map (TorchIO's
  ``RandomLabelsToImage``, as SynthSeg draws one), then :func:`acquisition_effects`.
- ``physics``: :class:`RandPhysicsRenderd`, the tissue label map re-rendered through the cohort's
  signal equations with a random field strength and sequence, then :func:`acquisition_effects`.

The arm is applied to ``augment.probability`` of the training samples (:class:`RandApplyd`); every
random number comes from the transforms' own generators, which the training dataset seeds per sample.

Where the arm runs is ``augment.device``: unset, in the loader's worker processes on the CPU (numpy,
SimpleITK and TorchIO); a torch device (``cuda``), in the training process on that device, where the
label-driven arms and their acquisition effects have torch implementations
(:func:`labels_to_image_torch`, :func:`acquisition_effects_torch`). Both draw every parameter from the
same seeded generators; the full-volume noise fields come from the device's generator, so they are
the same distribution, not the same numbers.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    MapTransform,
    Randomizable,
    RandomizableTransform,
)
from numpy.typing import NDArray

from shiftguard.augment.randconv import RandConvd
from shiftguard.augment.transforms import RandScannerSimd
from shiftguard.config.schema import (
    AcquisitionEffectsConfig,
    AugmentConfig,
    LabelsArmConfig,
    PhysicsArmConfig,
)

__all__ = [
    "LABELS_KEY",
    "RandApplyd",
    "RandLabelsToImaged",
    "RandPhysicsRenderd",
    "acquisition_effects",
    "acquisition_effects_torch",
    "arm_transforms",
    "labels_dir",
    "labels_to_image_torch",
    "physics_lut",
    "render_physics",
]

LABELS_KEY = "labels"
"""Where a training item carries its tissue label map ``(1, X, Y, Z)`` on the volume's grid."""

_SEED_BOUND = 2**31


def labels_dir(cfg: AugmentConfig) -> str | None:
    """The folder of tissue label maps the training arm reads (``labels`` and ``physics``), else
    ``None``."""
    arm = cfg.training_arm
    if arm == "labels":
        return cfg.labels.labels_dir
    if arm == "physics" and cfg.physics is not None:
        return cfg.physics.labels_dir
    return None


class RandApplyd(RandomizableTransform):
    """With probability ``prob`` per call, apply ``transforms`` in order; otherwise nothing.

    Seeding it (``set_random_state``, as :meth:`monai.transforms.Compose.set_random_state` does for
    every randomizable member) seeds the wrapped transforms from its own generator, so one seed
    fixes every draw. A call draws the gate and then runs the wrapped transforms only when open.
    """

    def __init__(self, transforms: Sequence[Any], prob: float) -> None:
        RandomizableTransform.__init__(self, prob)
        self.transforms = Compose(list(transforms))

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandApplyd:
        super().set_random_state(seed, state)
        self.transforms.set_random_state(seed=int(self.R.randint(_SEED_BOUND)))
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        self.randomize(None)
        return self.transforms(data) if self._do_transform else dict(data)


def _uniform(rng: np.random.Generator, bounds: Sequence[float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def acquisition_effects(
    image: NDArray[np.float32],
    spacing: Sequence[float],
    cfg: AcquisitionEffectsConfig,
    rng: np.random.Generator,
) -> NDArray[np.float32]:
    """Blur, bias field and Rician noise on a synthetic ``(X, Y, Z)`` image (SynthSeg's chain).

    The blur's standard deviation is drawn per axis from ``cfg.blur_mm`` (mm); the bias field is a
    4x4x4 grid of normal log-amplitudes scaled to at most ``cfg.bias``, interpolated to the grid and
    exponentiated; the noise's standard deviation, relative to the image's 99th percentile, is drawn
    from ``cfg.noise``, and the image becomes the magnitude of image plus complex noise.

    >>> x = np.ones((8, 8, 8), np.float32)
    >>> cfg = AcquisitionEffectsConfig(blur_mm=(0, 0), bias=0.0, noise=(0, 0))
    >>> bool(np.allclose(acquisition_effects(x, (1, 1, 1), cfg, np.random.default_rng(0)), x))
    True
    """
    from scipy import ndimage as ndi

    out = np.asarray(image, dtype=np.float32)
    sigma = [_uniform(rng, cfg.blur_mm) / float(s) for s in spacing]
    if max(sigma) > 0:
        out = ndi.gaussian_filter(out, sigma=sigma, mode="nearest").astype(np.float32)
    coarse = rng.normal(0.0, 1.0, size=(4, 4, 4))
    if cfg.bias > 0:
        coarse *= cfg.bias * rng.uniform(0.0, 1.0) / max(float(np.abs(coarse).max()), 1e-6)
        zoom = [n / 4.0 for n in out.shape]
        field = ndi.zoom(coarse, zoom, order=1, mode="nearest", grid_mode=True)
        out = out * np.exp(field[tuple(slice(0, n) for n in out.shape)]).astype(np.float32)
    std = _uniform(rng, cfg.noise) * float(np.percentile(out, 99))
    if std > 0:
        real = out + rng.normal(0.0, std, size=out.shape).astype(np.float32)
        imag = rng.normal(0.0, std, size=out.shape).astype(np.float32)
        out = np.sqrt(real * real + imag * imag)
    return np.ascontiguousarray(out, dtype=np.float32)


def acquisition_effects_torch(
    image: torch.Tensor,
    spacing: Sequence[float],
    cfg: AcquisitionEffectsConfig,
    rng: np.random.Generator,
) -> torch.Tensor:
    """:func:`acquisition_effects` in torch, on ``image``'s device (an ``(X, Y, Z)`` tensor).

    The draws from ``rng`` are the numpy path's, in its order (blur widths, bias grid and strength,
    noise level), so the blur and the bias field are the same to float32 precision (scipy's
    ``gaussian_filter`` with ``mode="nearest"`` and its order-1 ``zoom`` on the grid are trilinear
    interpolation with the edges held, which :func:`torch.nn.functional.interpolate` computes).
    The noise field comes from a torch generator on the device, seeded from ``rng``: another draw
    of the same distribution, not the numpy path's numbers.

    >>> x = torch.ones(8, 8, 8)
    >>> cfg = AcquisitionEffectsConfig(blur_mm=(0, 0), bias=0.0, noise=(0, 0))
    >>> bool(torch.allclose(acquisition_effects_torch(x, (1, 1, 1), cfg, np.random.default_rng(0)), x))
    True
    """
    # deferred: augment.fast loads SimpleITK and TorchIO, which only the artifact arm needs
    from shiftguard.augment.fast import gaussian_along

    out = image.to(torch.float32)
    sigma = [_uniform(rng, cfg.blur_mm) / float(s) for s in spacing]
    for axis, s in enumerate(sigma):
        if s > 1e-15:  # scipy leaves such an axis alone
            out = gaussian_along(out, axis, s, mode="nearest")
    coarse = rng.normal(0.0, 1.0, size=(4, 4, 4))
    if cfg.bias > 0:
        coarse *= cfg.bias * rng.uniform(0.0, 1.0) / max(float(np.abs(coarse).max()), 1e-6)
        grid = torch.as_tensor(coarse, dtype=torch.float64, device=out.device)[None, None]
        field = torch.nn.functional.interpolate(
            grid, size=tuple(out.shape), mode="trilinear", align_corners=False
        )[0, 0]
        out = out * torch.exp(field).to(torch.float32)
    level = _uniform(rng, cfg.noise)
    std = level * float(torch.quantile(out.reshape(-1), 0.99)) if level > 0 else 0.0
    if std > 0:
        gen = torch.Generator(device=out.device).manual_seed(int(rng.integers(2**62)))
        real = torch.empty_like(out).normal_(0.0, std, generator=gen).add_(out)
        imag = torch.empty_like(out).normal_(0.0, std, generator=gen)
        out = torch.hypot(real, imag)
    return out.contiguous()


def _spacing(value: Sequence[float]) -> tuple[float, float, float]:
    s = [float(v) for v in value]
    if len(s) != 3 or min(s) <= 0:
        raise ValueError(f"spacing must be three positive millimetre values, got {value}")
    return (s[0], s[1], s[2])


_ArmConfig = TypeVar("_ArmConfig", LabelsArmConfig, PhysicsArmConfig)


class _FromLabelsd(RandomizableTransform, MapTransform, Generic[_ArmConfig]):
    """Shared by the label-driven arms: replace ``keys`` by an image made from ``label_key``, as
    the arm's section ``cfg`` says.

    With ``device`` ``None`` the image is made in numpy (TorchIO for the label arm) on the CPU and
    returned as a CPU tensor; with a torch device, in torch on that device
    (:meth:`synthesise_torch`), from the label map wherever it is.
    """

    def __init__(
        self,
        keys: KeysCollection,
        cfg: _ArmConfig,
        spacing: Sequence[float],
        label_key: str = LABELS_KEY,
        prob: float = 1.0,
        device: str | torch.device | None = None,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.cfg: _ArmConfig = cfg
        self.spacing = _spacing(spacing)
        self.label_key = label_key
        self.device = None if device is None else torch.device(device)
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._seed = int(self.R.randint(_SEED_BOUND))

    def synthesise(self, labels: NDArray[np.integer], seed: int) -> NDArray[np.float32]:
        raise NotImplementedError

    def synthesise_torch(self, labels: torch.Tensor, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        if self.label_key not in d:
            raise KeyError(
                f"{type(self).__name__}: the item has no {self.label_key!r} (its tissue label map)"
            )
        value = d[self.label_key]
        if self.device is not None:
            labels_t = torch.as_tensor(value, device=self.device)
            image_t = self.synthesise_torch(
                labels_t.reshape(labels_t.shape[-3:]).long(), self._seed
            )
            for key in self.key_iterator(d):
                d[key] = image_t[None]
            return d
        labels = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
        image = self.synthesise(labels.reshape(labels.shape[-3:]).astype(np.int64), self._seed)
        for key in self.key_iterator(d):
            d[key] = torch.from_numpy(image[None])
        return d


def labels_to_image_torch(
    labels: torch.Tensor, cfg: LabelsArmConfig, rng: np.random.Generator
) -> torch.Tensor:
    """SynthSeg's Gaussian mixture in torch, on ``labels``' device: each label value present
    (ascending) draws a mean from ``cfg.mean`` and a standard deviation from ``cfg.std`` (uniform,
    from ``rng``), and every voxel is its label's mean plus its standard deviation times a normal
    draw. TorchIO's ``RandomLabelsToImage`` makes the same distribution with one full-volume draw per
    label; this makes one in all.

    >>> labels = torch.tensor([[[0, 1], [1, 2]]])
    >>> cfg = LabelsArmConfig(mean=(0.5, 0.5), std=(0.0, 0.0))
    >>> labels_to_image_torch(labels, cfg, np.random.default_rng(0)).unique().tolist()
    [0.5]
    """
    present = torch.unique(labels)
    n = int(present.numel())
    means = rng.uniform(cfg.mean[0], cfg.mean[1], size=n)
    stds = rng.uniform(cfg.std[0], cfg.std[1], size=n)
    size = int(present.max()) + 1 if n else 1
    lut = torch.zeros((2, size), dtype=torch.float32, device=labels.device)
    lut[:, present] = torch.as_tensor(
        np.stack([means, stds]), dtype=torch.float32, device=labels.device
    )
    gen = torch.Generator(device=labels.device).manual_seed(int(rng.integers(2**62)))
    noise = torch.empty(labels.shape, dtype=torch.float32, device=labels.device)
    noise.normal_(0.0, 1.0, generator=gen)
    return noise.mul_(lut[1][labels]).add_(lut[0][labels])


class RandLabelsToImaged(_FromLabelsd[LabelsArmConfig]):
    """SynthSeg's generator on a tissue label map: each label value a Gaussian whose mean and
    standard deviation are drawn from ``cfg.mean`` and ``cfg.std`` (TorchIO's
    ``RandomLabelsToImage``), then :func:`acquisition_effects`.

    Args:
        keys: the image key(s) to replace.
        cfg: the ``augment.labels`` section.
        spacing: voxel size (mm) of the label map's grid.
        label_key: the item's tissue label map ``(1, X, Y, Z)``.
        prob: chance per call (the arm's gate is :class:`RandApplyd`; 1 here).
        device: ``None``: TorchIO and numpy on the CPU; a torch device:
            :func:`labels_to_image_torch` and :func:`acquisition_effects_torch` there.
    """

    def synthesise_torch(self, labels: torch.Tensor, seed: int) -> torch.Tensor:
        rng = np.random.default_rng([seed, 1])
        image = labels_to_image_torch(labels, self.cfg, rng)
        return acquisition_effects_torch(image, self.spacing, self.cfg.effects, rng)

    def synthesise(self, labels: NDArray[np.integer], seed: int) -> NDArray[np.float32]:
        import torchio as tio

        transform = tio.RandomLabelsToImage(
            label_key="labels",
            image_key="synthetic",
            default_mean=(self.cfg.mean[0], self.cfg.mean[1]),
            default_std=(self.cfg.std[0], self.cfg.std[1]),
        )
        subject = tio.Subject(labels=tio.LabelMap(tensor=torch.from_numpy(labels[None])))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            synthetic: Any = transform(subject)["synthetic"]
            image = synthetic.data[0].numpy().astype(np.float32)
        rng = np.random.default_rng([seed, 1])
        return acquisition_effects(image, self.spacing, self.cfg.effects, rng)


def _sequence_signal(
    pd: NDArray[np.float64],
    t1: NDArray[np.float64],
    t2: NDArray[np.float64],
    t2s: NDArray[np.float64],
    cfg: PhysicsArmConfig,
    rng: np.random.Generator,
) -> tuple[NDArray[np.float64], dict[str, Any]]:
    from shiftguard.cohort import physics

    r = cfg.ranges
    family = cfg.sequences[int(rng.integers(len(cfg.sequences)))]
    if family == "spgr":
        p = {"tr": _uniform(rng, r.spgr_tr), "flip_deg": _uniform(rng, r.spgr_flip)}
        p["te"] = min(_uniform(rng, r.spgr_te), 0.8 * p["tr"])
        return physics.spgr(pd, t1, t2s, **p), {"sequence": family, **p}
    if family == "ir_gre":
        readout_tr = _uniform(rng, r.ir_readout_tr)
        centre = r.ir_readouts // 2
        # TI at least the first half of the train after the inversion
        ti = max(_uniform(rng, r.ir_ti), (centre + 1) * readout_tr)
        shot = ti + (r.ir_readouts - centre) * readout_tr + _uniform(rng, r.ir_recovery)
        p = {
            "ti": ti,
            "te": min(3.0, 0.5 * readout_tr),
            "flip_deg": _uniform(rng, r.ir_flip),
            "readout_tr": readout_tr,
            "shot_interval": shot,
        }
        signal = physics.ir_gre(pd, t1, t2s, **p, readouts=r.ir_readouts)
        return signal, {"sequence": family, **p, "readouts": r.ir_readouts}
    p = {"tr": _uniform(rng, r.se_tr), "te": _uniform(rng, r.se_te)}
    return physics.spin_echo(pd, t1, t2, **p), {"sequence": family, **p}


def physics_lut(
    cfg: PhysicsArmConfig, rng: np.random.Generator
) -> tuple[NDArray[np.float32], dict[str, Any]]:
    """One random acquisition's signal per label value: ``lut[v]`` is the magnitude of label value
    ``v`` (:data:`shiftguard.cohort.physics.LABELS`) relative to white matter, and the drawn field
    and sequence. :func:`render_physics` indexes it with a label map."""
    from shiftguard.cohort import physics

    b0 = _uniform(rng, cfg.field_strength)
    tissues = physics.relaxation_at(cfg.tissue_model, b0)
    wm = tissues.index("wm")
    tissues = tissues.append(
        "lesion",
        float(tissues.pd[wm] * _uniform(rng, cfg.lesion_pd_factor)),
        float(tissues.t1[wm] * _uniform(rng, cfg.lesion_t1_factor)),
        float(tissues.t2[wm] * (t2f := _uniform(rng, cfg.lesion_t2_factor))),
        float(tissues.t2s[wm] * t2f),
    )
    signal, params = _sequence_signal(tissues.pd, tissues.t1, tissues.t2, tissues.t2s, cfg, rng)
    magnitude = np.abs(signal)
    reference = magnitude[wm] if magnitude[wm] > 0 else max(float(magnitude.max()), 1e-6)
    lut = np.zeros(max(physics.LABELS.values()) + 1, dtype=np.float32)
    for name, value in physics.LABELS.items():
        if name != "background" and name in tissues.names:
            lut[value] = magnitude[tissues.index(name)] / reference
    return lut, {"field_strength": b0, **params}


def _check_label_values(low: int, high: int, size: int) -> None:
    if low < 0 or high >= size:
        raise ValueError(
            f"tissue label values must be 0..{size - 1} (shiftguard.cohort.physics.LABELS), "
            f"got {low}..{high}"
        )


def render_physics(
    labels: NDArray[np.integer], cfg: PhysicsArmConfig, rng: np.random.Generator
) -> tuple[NDArray[np.float32], dict[str, Any]]:
    """One random acquisition of a tissue label map: ``(X, Y, Z)`` magnitude relative to white
    matter, before :func:`acquisition_effects`, and the drawn field and sequence.

    Label values are :data:`shiftguard.cohort.physics.LABELS` (0 air, one per tissue, then the lesion);
    each tissue's PD, T1, T2 and T2* at the drawn field come from ``cfg.tissue_model``; the lesion's are
    white matter's times factors drawn from ``cfg.lesion_*`` (:func:`physics_lut`).
    """
    lut, params = physics_lut(cfg, rng)
    if labels.size:
        _check_label_values(int(labels.min()), int(labels.max()), lut.size)
    return lut[labels], params


class RandPhysicsRenderd(_FromLabelsd[PhysicsArmConfig]):
    """The tissue label map re-rendered with a random field strength and sequence
    (:func:`render_physics`), then :func:`acquisition_effects`.

    Args:
        keys: the image key(s) to replace.
        cfg: the ``augment.physics`` section.
        spacing: voxel size (mm) of the label map's grid.
        label_key: the item's tissue label map ``(1, X, Y, Z)``.
        prob: chance per call (the arm's gate is :class:`RandApplyd`; 1 here).
        device: ``None``: numpy on the CPU; a torch device: the same acquisition drawn, rendered
            there with :func:`acquisition_effects_torch`.
    """

    def synthesise_torch(self, labels: torch.Tensor, seed: int) -> torch.Tensor:
        rng = np.random.default_rng([seed, 2])
        lut, _ = physics_lut(self.cfg, rng)
        if labels.numel():
            _check_label_values(int(labels.min()), int(labels.max()), lut.size)
        image = torch.as_tensor(lut, device=labels.device)[labels]
        return acquisition_effects_torch(image, self.spacing, self.cfg.effects, rng)

    def synthesise(self, labels: NDArray[np.integer], seed: int) -> NDArray[np.float32]:
        rng = np.random.default_rng([seed, 2])
        image, _ = render_physics(labels, self.cfg, rng)
        return acquisition_effects(image, self.spacing, self.cfg.effects, rng)


def arm_transforms(
    cfg: AugmentConfig,
    spacing: Sequence[float],
    image_key: str = "image",
    device: str | torch.device | None = None,
) -> list[Randomizable]:
    """The random transforms of ``cfg.training_arm`` (empty for ``none``), for a training item
    ``{image_key: (1, X, Y, Z)}`` on the ingest grid (``spacing`` mm) in the volume's own
    intensities, with ``"labels"`` (:data:`LABELS_KEY`) for the label-driven arms.

    ``device`` (``augment.device``): ``None`` for the CPU implementations (numpy, SimpleITK,
    TorchIO: what a loader worker runs); a torch device for torch implementations that run on the
    item's tensors there. The artifact and intensity arms are the same transforms either way (they
    work on the tensor's device); the label-driven arms switch to :meth:`_FromLabelsd.synthesise_torch`.

    Raises:
        ValueError: the physics arm without its ``augment.physics`` section.
    """
    arm = cfg.training_arm
    if arm == "none":
        return []
    if arm == "artifact":
        return [RandScannerSimd.from_config(image_key, cfg, spacing=spacing, record_key=None)]
    inner: list[Any]
    if arm == "intensity":
        from monai.transforms import RandAdjustContrastd, RandHistogramShiftd

        c = cfg.intensity
        inner = [
            RandAdjustContrastd(
                image_key, prob=c.gamma_probability, gamma=(c.gamma[0], c.gamma[1])
            ),
            RandHistogramShiftd(
                image_key,
                num_control_points=(c.histogram_control_points[0], c.histogram_control_points[1]),
                prob=c.histogram_probability,
            ),
            RandConvd(image_key, prob=c.randconv_probability, kernel_sizes=c.randconv_kernel_sizes),
        ]
    elif arm == "labels":
        inner = [RandLabelsToImaged(image_key, cfg.labels, spacing, device=device)]
    else:
        if cfg.physics is None:
            raise ValueError("augment.physics is not set; compose with augment=physics")
        inner = [RandPhysicsRenderd(image_key, cfg.physics, spacing, device=device)]
    return [RandApplyd(inner, prob=cfg.probability)]
