"""The reference implementation: :class:`~shiftguard.augment.params.SimParams` as a plain chain of
TorchIO's deterministic transforms, the way a TorchIO user would write it. The fast path is measured
against it and must match it statistically."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torchio as tio

from shiftguard.augment.params import SimParams


class _Rician(tio.transforms.IntensityTransform):
    """Rician noise: the magnitude of the image plus complex Gaussian noise (absolute std)."""

    def __init__(self, std: float, seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.std = std
        self.seed = seed

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            gen = torch.Generator().manual_seed(self.seed)
            real = torch.randn(image.data.shape, generator=gen) * self.std
            imag = torch.randn(image.data.shape, generator=gen) * self.std
            image.set_data(torch.sqrt((image.data + real) ** 2 + imag**2))
        return subject


class _Scale(tio.transforms.IntensityTransform):
    """Multiply intensities by ``factor`` (vendor scaling)."""

    def __init__(self, factor: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factor = factor

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            image.set_data(image.data * self.factor)
        return subject


class _Gamma(tio.transforms.IntensityTransform):
    """TorchIO's ``Gamma`` on intensities rescaled to [0, 1] by the input's max, then scaled back
    (``Gamma`` alone is meant for [0, 1] images)."""

    def __init__(self, gamma: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gamma = gamma

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            top = float(image.data.max())
            if top <= 0:
                continue
            scaled = tio.ScalarImage(tensor=image.data.clamp(min=0) / top, affine=image.affine)
            out = tio.Gamma(self.gamma)(scaled)
            image.set_data(out.data * top)
        return subject


def torchio_transforms(params: SimParams, reference_max: float) -> list[tio.Transform]:
    """The TorchIO transforms for ``params``, in :data:`~shiftguard.augment.params.ORDER`.

    Args:
        params: the drawn acquisition.
        reference_max: the input's 99th percentile; noise std is relative to it.
    """
    chain: list[tio.Transform] = []
    if params.motion is not None:
        chain.append(
            tio.Motion(
                degrees=np.asarray(params.motion.degrees, dtype=float),
                translation=np.asarray(params.motion.translation, dtype=float),
                times=np.asarray(params.motion.times, dtype=float),
                image_interpolation="linear",
            )
        )
    if params.ghosting is not None:
        g = params.ghosting
        chain.append(tio.Ghosting(g.num_ghosts, g.axis, g.intensity, g.restore))
    if params.spike is not None:
        chain.append(tio.Spike(np.asarray(params.spike.positions), params.spike.intensity))
    if params.blur is not None:
        chain.append(tio.Blur(std=params.blur.std_mm))
    if params.anisotropy is not None:
        chain.append(_AnisotropyReference(params.anisotropy.axis, params.anisotropy.downsampling))
    if params.bias_field is not None:
        chain.append(tio.BiasField(list(params.bias_field.coefficients), params.bias_field.order))
    if params.noise is not None:
        std = params.noise.std * reference_max
        if params.noise.rician:
            chain.append(_Rician(std, params.noise.seed))
        else:
            chain.append(tio.Noise(mean=0.0, std=std, seed=params.noise.seed))
    if params.gamma is not None:
        chain.append(_Gamma(params.gamma))
    if params.scale is not None:
        chain.append(_Scale(params.scale))
    return chain


class _AnisotropyReference(tio.transforms.SpatialTransform):
    """``RandomAnisotropy`` with its draw fixed: nearest down-sampling along ``axis``, linear back."""

    def __init__(self, axis: int, downsampling: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.axis = axis
        self.downsampling = downsampling

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        image = subject.get_first_image()
        shape, affine = image.spatial_shape, image.affine.copy()
        sx, sy, sz = (float(s) for s in image.spacing)
        target = [sx, sy, sz]
        target[self.axis] *= self.downsampling
        down = tio.Resample(target=(target[0], target[1], target[2]), image_interpolation="nearest")
        up = tio.Resample(target=(shape, affine), image_interpolation="linear")
        return up(down(subject))


def apply_reference(
    volume: np.ndarray | torch.Tensor, params: SimParams, spacing: tuple[float, float, float]
) -> torch.Tensor:
    """Apply ``params`` with the plain TorchIO chain.

    Args:
        volume: ``(C, X, Y, Z)`` intensities.
        params: the drawn acquisition.
        spacing: voxel size in mm ``(X, Y, Z)``.

    Returns:
        ``(C, X, Y, Z)`` float32 tensor.
    """
    tensor = torch.as_tensor(np.asarray(volume), dtype=torch.float32)
    affine = np.diag([*spacing, 1.0])
    image = tio.ScalarImage(tensor=tensor.clone(), affine=affine)
    reference_max = float(
        torch.quantile(tensor.flatten()[:: max(1, tensor.numel() // 65536)], 0.99)
    )
    subject = tio.Subject(image=image)
    # TorchIO's transforms draw from torch's global generator (their probability check): run them on
    # a fork of it, so simulating a scanner leaves what the caller draws next (dropout) unchanged
    with torch.random.fork_rng(devices=[]):
        for transform in torchio_transforms(params, reference_max):
            subject = transform(subject)
    result: torch.Tensor = subject.get_first_image().data
    return result.float()
