"""The fast path: :class:`~shiftguard.augment.params.SimParams` applied by fused code that runs on
the CPU or, for a CUDA tensor, on the GPU.

It computes what :func:`shiftguard.augment.reference.apply_reference` (a plain chain of TorchIO
transforms) computes, in the same :data:`~shiftguard.augment.params.ORDER`, to float32 rounding
(about 1e-6 of the intensity range, noise included on CPU), with fewer and cheaper passes over the
volume:

- **motion, ghosting and spike share one trip through k-space.** Each is linear in the spectrum, and
  TorchIO keeps the real part of each inverse transform, which is the inverse transform of the
  spectrum's Hermitian part. So together they are a real, symmetric weight per k-space plane
  (motion: which pose fills which plane along the last axis; ghosting: every n-th plane along its
  axis) plus Hermitian pairs of spikes, applied to half spectra (``rfft``): a forward FFT of the input
  and of each moved pose along the last axis only, one FFT along the first axes of their weighted sum
  (only for a spike, or ghosting along axis 0 or 1), one inverse. TorchIO does a full complex FFT
  round trip per transform and per pose. The poses follow TorchIO's conventions exactly (rotation
  about the physical origin in LPS coordinates, SimpleITK's linear interpolation and border rules);
  they are resampled by SimpleITK for CPU tensors (multi-threaded C++, the reference's own
  interpolator) and by a trilinear gather in torch on other devices.
- **blur**: scipy's kernel (truncated at 4 sigma, normalised) on the reflect-padded volume, as a
  weighted sum of shifted views per axis (by FFT for kernels wider than 17 taps).
- **anisotropy**: two gathers of slices and one blend along the axis, at the slice positions
  TorchIO's ``Resample`` uses (read off it once per geometry, since SimpleITK's rounding picks the
  nearest slice when two are equally near).
- **bias field**: the exact polynomial, evaluated separably (a small matrix product), then ``exp``;
  TorchIO evaluates every monomial on the full grid in float64.
- **noise**: the reference's generator calls, so on CPU the same field; on a GPU another draw of the
  same distribution. **gamma** and **scale**: one elementwise pass.

Example:
    >>> import torch
    >>> from shiftguard.augment.params import SimParams
    >>> volume = torch.rand(1, 16, 16, 16)
    >>> apply_fast(volume, SimParams(gamma=0.8, scale=2.0), (1.0, 1.0, 1.0)).shape
    torch.Size([1, 16, 16, 16])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk  # noqa: N813 - SimpleITK's usual alias
import torch
import torchio as tio

from shiftguard.augment.params import (
    Anisotropy,
    BiasField,
    Ghosting,
    Noise,
    SimParams,
    Spike,
)
from shiftguard.errors import SimInputError

__all__ = ["FastScannerSim", "SimInputError", "apply_fast"]

Spacing = tuple[float, float, float]

_GAUSSIAN_TRUNCATE = 4.0
"""scipy's ``gaussian_filter`` default, which TorchIO's ``Blur`` uses."""

_QUANTILE_SAMPLES = 65536
"""The reference's robust maximum is the 99th percentile of about this many strided samples."""

_RESAMPLER: str | None = None
"""Which rigid resampler motion uses: ``None`` picks SimpleITK for CPU tensors and torch gathers
otherwise; tests set ``"torch"`` to check the GPU code path on the CPU."""

_DIRECT_BLUR_RADIUS = 8
"""Gaussian kernels up to this radius (17 taps) are applied directly, wider ones by FFT."""


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _as_volume(volume: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``volume`` as a float32 ``(C, X, Y, Z)`` tensor on its device (numpy arrays go to the CPU)."""
    if isinstance(volume, torch.Tensor):
        tensor = volume.detach().to(torch.float32).contiguous()
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(np.asarray(volume), dtype=np.float32))
    if tensor.ndim != 4 or tensor.numel() == 0:
        raise SimInputError(
            f"volume must be a non-empty (C, X, Y, Z) array, got shape {tuple(tensor.shape)}; "
            "add a channel axis with volume[None] for a single 3-D image"
        )
    return tensor


def _as_spacing(spacing: Sequence[float]) -> Spacing:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise SimInputError(
            f"spacing must be 3 positive voxel sizes in mm (X, Y, Z), got {spacing!r}"
        )
    return (values[0], values[1], values[2])


def _check_params(params: SimParams, shape: Sequence[int]) -> None:
    """Raise :class:`SimInputError` for a field of ``params`` that cannot be applied to a volume of
    spatial ``shape``, before any work is done (the reference fails late, or silently)."""

    def fail(message: str) -> None:
        raise SimInputError(f"{message}; fix the SimParams (see shiftguard.augment.params)")

    def finite(*values: float) -> bool:
        return all(math.isfinite(float(v)) for v in values)

    if (m := params.motion) is not None:
        n = len(m.times)
        if len(m.degrees) != n or len(m.translation) != n:
            fail(
                "motion needs one degrees triple, one translation triple and one time per "
                f"movement, got {len(m.degrees)}, {len(m.translation)} and {n}"
            )
        if any(len(v) != 3 or not finite(*v) for v in (*m.degrees, *m.translation)):
            fail("motion degrees and translation must be finite (x, y, z) triples")
        if any(not 0 < t < 1 for t in m.times) or list(m.times) != sorted(m.times):
            fail(f"motion times must be sorted and in (0, 1), got {m.times}")
    if (g := params.ghosting) is not None:
        if g.axis not in (0, 1, 2):
            fail(f"ghosting axis must be 0, 1 or 2, got {g.axis!r}")
        if g.num_ghosts < 0 or not finite(g.intensity) or not 0 <= g.restore <= 1:
            fail(
                "ghosting needs num_ghosts >= 0, a finite intensity and restore in [0, 1], got "
                f"{g.num_ghosts}, {g.intensity} and {g.restore}"
            )
    if (sp := params.spike) is not None:
        if any(len(p) != 3 or not all(0 <= v < 1 for v in p) for p in sp.positions):
            fail(f"spike positions must be (x, y, z) triples in [0, 1), got {sp.positions}")
        if not finite(sp.intensity):
            fail(f"spike intensity must be finite, got {sp.intensity}")
    if (b := params.blur) is not None and (
        len(b.std_mm) != 3 or not finite(*b.std_mm) or min(b.std_mm) < 0
    ):
        fail(f"blur std_mm must be 3 non-negative numbers (mm), got {b.std_mm!r}")
    if (a := params.anisotropy) is not None:
        if a.axis not in (0, 1, 2):
            fail(f"anisotropy axis must be 0, 1 or 2, got {a.axis!r}")
        factor = float(a.downsampling)
        if not finite(factor) or factor <= 0:
            fail(f"anisotropy downsampling must be positive, got {a.downsampling!r}")
        n = shape[a.axis]
        if n > 1 and math.floor(n / factor) < 1:
            fail(
                f"anisotropy downsampling {factor} leaves no slice along axis {a.axis} of length {n}"
            )
    if (bf := params.bias_field) is not None:
        if bf.order < 0:
            fail(f"bias field order must be >= 0, got {bf.order}")
        expected = (bf.order + 1) * (bf.order + 2) * (bf.order + 3) // 6
        if len(bf.coefficients) != expected or not finite(*bf.coefficients):
            fail(
                f"a bias field of order {bf.order} needs {expected} finite coefficients in "
                f"TorchIO's order, got {len(bf.coefficients)}"
            )
    if (no := params.noise) is not None and (not finite(no.std) or no.std < 0):
        fail(f"noise std must be a non-negative number, got {no.std!r}")
    for name in ("gamma", "scale"):
        value = getattr(params, name)
        if value is not None and not finite(value):
            fail(f"{name} must be a finite number, got {value!r}")


# --------------------------------------------------------------------------------------------------
# k-space: motion, ghosting, spike
# --------------------------------------------------------------------------------------------------


def _unshift_symmetrise(weights_shifted: np.ndarray) -> np.ndarray:
    """Weights ``(..., n)`` over a centred (``fftshift``-ed) axis, as weights over the unshifted
    axis, symmetrised: ``(w(k) + w(-k)) / 2``, the weight that keeping the real part of the inverse
    transform applies to a real image's spectrum."""
    n = weights_shifted.shape[-1]
    u = np.arange(n)
    unshifted = weights_shifted[..., (u + n // 2) % n]
    return (unshifted + unshifted[..., (-u) % n]) / 2


def _euler_zxy(degrees: Sequence[float]) -> np.ndarray:
    """SimpleITK's ``Euler3DTransform`` rotation matrix (default ``Z @ X @ Y`` order)."""
    ax, ay, az = np.radians(np.asarray(degrees, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return np.asarray(rz @ rx @ ry, dtype=float)


def _voxel_map(
    degrees: Sequence[float], translation: Sequence[float], spacing: Spacing
) -> tuple[np.ndarray, np.ndarray]:
    """``(A, b)``: output voxel ``o`` samples the input at continuous index ``A @ o + b``.

    TorchIO's ``Motion`` builds each pose as a SimpleITK ``Euler3DTransform`` about the image centre,
    but then copies only its matrix and translation into a new transform, whose centre is the origin:
    the pose rotates about the physical origin (voxel 0 of an image with affine ``diag(spacing)``), in
    LPS coordinates (x and y negated), and SimpleITK resampling maps each output point ``p`` to
    ``R p + t``.
    """
    lps = np.diag([-spacing[0], -spacing[1], spacing[2]])
    inv = np.linalg.inv(lps)
    matrix = inv @ _euler_zxy(degrees) @ lps
    offset = inv @ np.asarray(translation, dtype=float)
    return matrix, offset


class _RigidResampler:
    """Trilinear resampling of one volume under rigid poses, as SimpleITK's linear interpolator
    does it: output voxel ``o`` reads the input at continuous index ``matrix @ o + offset``; samples
    within half a voxel outside the grid take the border value, samples further out ``default``.

    Written for few passes over memory and no allocation per pose (the buffers are reused): the
    coordinates in one broadcast addition, then per channel 8 neighbour gathers blended pairwise.

    Args:
        x: ``(C, X, Y, Z)`` float32 volume.
        default: ``(C,)`` value outside the image (the reference uses each channel's minimum).
    """

    def __init__(self, x: torch.Tensor, default: torch.Tensor) -> None:
        self.x = x
        self.default = default
        _, nx, ny, nz = x.shape
        dev = x.device
        self.grid = tuple(np.arange(n, dtype=float) for n in (nx, ny, nz))
        self.size = torch.tensor((nx, ny, nz), dtype=torch.float32, device=dev).reshape(3, 1, 1, 1)
        self.low_bound = torch.zeros_like(self.size)
        self.high_bound = self.size - 1
        self.high_index = (self.size - 2).clamp(min=0).to(torch.int32)
        self.strides = torch.tensor((ny * nz, nz, 1), dtype=torch.int32, device=dev).reshape(
            3, 1, 1, 1
        )
        self.steps = (ny * nz if nx > 1 else 0, nz if ny > 1 else 0, 1 if nz > 1 else 0)
        n = nx * ny * nz
        self.q = torch.empty((3, nx, ny, nz), dtype=torch.float32, device=dev)
        self.low = torch.empty((3, nx, ny, nz), dtype=torch.int32, device=dev)
        self.base = torch.empty(n, dtype=torch.int32, device=dev)
        self.index = torch.empty(n, dtype=torch.int32, device=dev)
        self.inside = torch.empty(n, dtype=torch.bool, device=dev)
        self.buffers = [torch.empty(n, dtype=torch.float32, device=dev) for _ in range(4)]
        self.out = torch.empty_like(x)

    def __call__(self, matrix: np.ndarray, offset: np.ndarray) -> torch.Tensor:
        """``(C, X, Y, Z)`` resampled volume (a buffer overwritten by the next call)."""
        dev = self.x.device
        ix, iy, iz = self.grid
        # q[axis] = plane[axis, x, y] + line[axis, z]
        plane = (
            matrix[:, 0, None, None] * ix[None, :, None]
            + matrix[:, 1, None, None] * iy[None, None, :]
        )
        plane += offset[:, None, None]
        line = matrix[:, 2, None] * iz[None, :]
        q = torch.add(
            torch.as_tensor(plane, dtype=torch.float32, device=dev)[..., None],
            torch.as_tensor(line, dtype=torch.float32, device=dev)[:, None, None, :],
            out=self.q,
        )
        ok = (q >= -0.5).logical_and_(q < self.size - 0.5)
        torch.all(ok, dim=0, out=self.inside.view(q.shape[1:]))
        q.clamp_(self.low_bound, self.high_bound)
        low = self.low.copy_(q)  # q >= 0: truncation is floor
        low.clamp_(max=self.high_index)
        weight = q.sub_(low).reshape(3, -1)
        wx, wy, wz = weight[0], weight[1], weight[2]
        torch.sum(low.mul_(self.strides), dim=0, dtype=torch.int32, out=self.base.view(q.shape[1:]))
        sx, sy, sz = self.steps
        a, b, c, d = self.buffers

        for channel in range(self.x.shape[0]):
            flat = self.x[channel].reshape(-1)

            def gather(step: int, out: torch.Tensor, flat: torch.Tensor = flat) -> torch.Tensor:
                index = torch.add(self.base, step, out=self.index) if step else self.base
                return torch.index_select(flat, 0, index, out=out)

            gather(0, a).lerp_(gather(sz, b), wz)  # (x0, y0)
            gather(sy, b).lerp_(gather(sy + sz, c), wz)  # (x0, y1)
            a.lerp_(b, wy)  # x0
            gather(sx, b).lerp_(gather(sx + sz, c), wz)  # (x1, y0)
            gather(sx + sy, c).lerp_(gather(sx + sy + sz, d), wz)  # (x1, y1)
            b.lerp_(c, wy)  # x1
            a.lerp_(b, wx)
            torch.where(self.inside, a, self.default[channel], out=self.out[channel].view(-1))
        return self.out


class _SitkResampler:
    """The same resampling as :class:`_RigidResampler` by SimpleITK's linear resampler, for CPU
    tensors: the very interpolator the reference uses, multi-threaded C++ (several times faster than
    gathers in torch on a CPU). It works in index space on the array as it lies in memory (SimpleITK
    sees ``(X, Y, Z)`` C-order data as an image of size ``(Z, Y, X)``), so nothing is transposed.

    Args:
        x: ``(C, X, Y, Z)`` float32 CPU volume.
        default: ``(C,)`` value outside the image.
    """

    def __init__(self, x: torch.Tensor, default: torch.Tensor) -> None:
        self.images = [sitk.GetImageFromArray(channel.numpy()) for channel in x]
        self.default = default.tolist()
        self.out = torch.empty_like(x)

    def __call__(self, matrix: np.ndarray, offset: np.ndarray) -> torch.Tensor:
        """``(C, X, Y, Z)`` resampled volume (a buffer overwritten by the next call)."""
        transform = sitk.AffineTransform(3)
        # SimpleITK's index (k, j, i) is ours reversed.
        transform.SetMatrix(matrix[::-1, ::-1].flatten().tolist())
        transform.SetTranslation(offset[::-1].tolist())
        resampler = sitk.ResampleImageFilter()
        resampler.SetInterpolator(sitk.sitkLinear)
        resampler.SetOutputPixelType(sitk.sitkFloat32)
        resampler.SetTransform(transform)
        resampler.SetNumberOfThreads(torch.get_num_threads())
        for channel, image in enumerate(self.images):
            resampler.SetReferenceImage(image)
            resampler.SetDefaultPixelValue(self.default[channel])
            moved = resampler.Execute(image)
            np.copyto(self.out[channel].numpy(), sitk.GetArrayViewFromImage(moved))
        return self.out


def _pose_resampler(
    x: torch.Tensor, default: torch.Tensor, backend: str | None = None
) -> _RigidResampler | _SitkResampler:
    """SimpleITK on the CPU, torch gathers elsewhere (``backend`` forces one: ``"sitk"``, ``"torch"``)."""
    choice = backend or ("sitk" if x.device.type == "cpu" else "torch")
    if choice == "sitk":
        return _SitkResampler(x, default)
    return _RigidResampler(x, default)


def _motion_weights(times: Sequence[float], n_last: int) -> np.ndarray:
    """``(S, n_last // 2 + 1)`` half-spectrum weights of the ``S = len(times) + 1`` images (input,
    then each pose), following TorchIO's ``Motion``: k-space is split along the last axis at
    ``int(n * time)``, the input image's spectrum moved to the segment that holds the centre."""
    count = len(times) + 1
    order = list(range(count))
    late = [i for i, t in enumerate(times) if t > 0.5]
    index = min(late) if late else count - 1
    order[0], order[index] = order[index], order[0]
    bounds = [int(n_last * t) for t in times] + [n_last]
    masks = np.zeros((count, n_last))
    start = 0
    for image, stop in zip(order, bounds, strict=True):
        masks[image, start:stop] = 1.0
        start = stop
    return _unshift_symmetrise(masks)[:, : n_last // 2 + 1]


def _ghost_weights(ghosting: Ghosting, n: int) -> np.ndarray:
    """``(n,)`` unshifted, symmetrised weights of TorchIO's ``Ghosting`` along its axis: every
    ``num_ghosts``-th centred plane times ``1 - intensity``, the central ``restore`` fraction kept."""
    shifted = np.ones(n)
    shifted[:: ghosting.num_ghosts] = 1.0 - ghosting.intensity
    mid = n // 2
    size = int(np.round(ghosting.restore * n))
    shifted[mid - size // 2 : mid + size // 2] = 1.0
    return _unshift_symmetrise(shifted)


def _spike_indices(spike: Spike, shape: Sequence[int]) -> list[tuple[int, int, int]]:
    """Unshifted spectrum indices of TorchIO's spikes (``floor(position * shape)`` in the centred
    spectrum)."""
    size = np.asarray(shape)
    positions = np.asarray(spike.positions, dtype=float).reshape(-1, 3)
    centred = np.floor(positions * size).astype(int)
    unshifted = (centred - size // 2) % size
    return [(int(i), int(j), int(k)) for i, j, k in unshifted]


def _spike_amplitudes(
    spectrum: torch.Tensor, indices: list[tuple[int, int, int]], intensity: float, n_last: int
) -> list[float]:
    """The value TorchIO's ``Spike`` adds at each index, for one channel.

    TorchIO adds ``intensity * max|spectrum|`` at each index in turn, on the full spectrum, so a
    spike can raise the maximum that the next one uses. This tracks that exactly from the half
    spectrum: the maximum over the untouched coefficients (the largest half-spectrum entry that
    still stands for an untouched coefficient) and over the touched ones.

    Args:
        spectrum: ``(X, Y, n_last // 2 + 1)`` half spectrum before the spikes.
        indices: unshifted full-spectrum indices, in order.
        intensity: TorchIO's intensity factor.
        n_last: length of the last axis.
    """
    shape = (spectrum.shape[0], spectrum.shape[1], n_last)
    half = n_last // 2

    def stored(index: tuple[int, int, int]) -> tuple[int, int, int]:
        if index[2] <= half:
            return index
        return ((-index[0]) % shape[0], (-index[1]) % shape[1], (-index[2]) % shape[2])

    def represented(index: tuple[int, int, int]) -> set[tuple[int, int, int]]:
        mirror = ((-index[0]) % shape[0], (-index[1]) % shape[1], (-index[2]) % shape[2])
        return {index} if mirror[2] <= half else {index, mirror}

    magnitude = spectrum.abs().reshape(-1)

    def ranked(count: int) -> list[tuple[float, tuple[int, int, int]]]:
        if count == 1:
            value, flat = magnitude.max(dim=0)
            values, flats = [float(value)], [int(flat)]
        else:
            top = magnitude.topk(min(count, magnitude.numel()))
            values, flats = top.values.tolist(), top.indices.tolist()
        ny, nh = spectrum.shape[1], spectrum.shape[2]
        return [
            (v, (f // (ny * nh), (f // nh) % ny, f % nh))
            for v, f in zip(values, flats, strict=True)
        ]

    top = ranked(1)  # enough unless a spike hits the largest coefficient
    values = {index: complex(spectrum[stored(index)].item()) for index in set(indices)}
    added: dict[tuple[int, int, int], float] = {}
    amplitudes: list[float] = []
    for index in indices:
        untouched = next((v for v, h in top if not represented(h) <= added.keys()), None)
        if untouched is None:  # the largest coefficients so far are all spiked: rank more
            top = ranked(len(indices) + 1)
            untouched = next((v for v, h in top if not represented(h) <= added.keys()), 0.0)
        touched = [abs(values[i] + a) for i, a in added.items()]
        amplitude = max([untouched, *touched]) * intensity
        added[index] = added.get(index, 0.0) + amplitude
        amplitudes.append(amplitude)
    return amplitudes


def _kspace_artifacts(x: torch.Tensor, params: SimParams, spacing: Spacing) -> torch.Tensor:
    """Motion, ghosting and spike of ``params`` in one trip through k-space.

    Args:
        x: ``(C, X, Y, Z)`` float32.
        params: the acquisition (only ``motion``, ``ghosting`` and ``spike`` are used).
        spacing: voxel size in mm.

    Returns:
        ``(C, X, Y, Z)`` float32, the real part of the modified spectrum's inverse transform.
    """
    c, nx, ny, nz = x.shape
    dev = x.device
    motion, ghosting, spike = params.motion, params.ghosting, params.spike
    if motion is not None and len(motion.times) == 0:
        motion = None
    if ghosting is not None and (ghosting.num_ghosts == 0 or ghosting.intensity == 0):
        ghosting = None
    if spike is not None and (spike.intensity == 0 or len(spike.positions) == 0):
        spike = None
    if motion is None and ghosting is None and spike is None:
        return x

    if motion is None:
        spectrum = torch.fft.rfft(x, dim=-1)
    else:
        weights = torch.as_tensor(
            _motion_weights(motion.times, nz), dtype=torch.float32, device=dev
        )
        default = x.reshape(c, -1).amin(dim=1)
        resample = _pose_resampler(x, default, _RESAMPLER)
        spectrum = torch.fft.rfft(x, dim=-1).mul_(weights[0])
        for s, (degrees, translation) in enumerate(
            zip(motion.degrees, motion.translation, strict=True), start=1
        ):
            matrix, offset = _voxel_map(degrees, translation, spacing)
            moved = resample(matrix, offset)
            spectrum.add_(torch.fft.rfft(moved, dim=-1).mul_(weights[s]))

    # Which of the first two axes need a transform: all for a spike, the ghost axis for ghosting.
    axes: list[int] = []
    if spike is not None:
        axes = [-3, -2]
    elif ghosting is not None and ghosting.axis in (0, 1):
        axes = [ghosting.axis - 3]
    if axes:
        spectrum = torch.fft.fftn(spectrum, dim=axes)
    if ghosting is not None:
        n = x.shape[1 + ghosting.axis]
        gw = _ghost_weights(ghosting, n)
        if ghosting.axis == 2:
            gw = gw[: nz // 2 + 1]
        view = [1, 1, 1, 1]
        view[1 + ghosting.axis] = gw.shape[0]
        spectrum.mul_(torch.as_tensor(gw, dtype=torch.float32, device=dev).reshape(view))
    if spike is not None:
        indices = _spike_indices(spike, (nx, ny, nz))
        mirror = [((-i) % nx, (-j) % ny, (-k) % nz) for i, j, k in indices]
        for channel in range(c):
            amplitudes = _spike_amplitudes(spectrum[channel], indices, spike.intensity, nz)
            # The Hermitian part of a spike a at u is a/2 at u and a/2 at -u (a real); the half
            # spectrum stores the entries whose last index is <= nz // 2, the others are implicit.
            for amplitude, u, v in zip(amplitudes, indices, mirror, strict=True):
                for i, j, k in (u, v):
                    if k <= nz // 2:
                        spectrum[channel, i, j, k] += amplitude / 2
    if axes:
        spectrum = torch.fft.ifftn(spectrum, dim=axes)
    return torch.fft.irfft(spectrum, n=nz, dim=-1)


# --------------------------------------------------------------------------------------------------
# Blur, anisotropy, bias field
# --------------------------------------------------------------------------------------------------


def gaussian_along(
    x: torch.Tensor, dim: int, sigma: float, mode: Literal["reflect", "nearest"] = "reflect"
) -> torch.Tensor:
    """scipy's ``gaussian_filter1d`` (``truncate=4``, ``mode`` ``"reflect"`` or ``"nearest"``)
    along ``dim`` of ``x``: the same normalised kernel on the padded signal, applied directly (a
    weighted sum of shifted views) for narrow kernels and by FFT for wide ones; exact either way."""
    n = x.shape[dim]
    radius = int(_GAUSSIAN_TRUNCATE * sigma + 0.5)
    if radius == 0:
        return x
    taps = np.arange(-radius, radius + 1, dtype=float)
    kernel = np.exp(-0.5 / (sigma * sigma) * taps**2)
    kernel /= kernel.sum()
    if mode == "nearest":  # the edge value repeated
        source = np.clip(np.arange(-radius, n + radius), 0, n - 1)
    else:  # half-sample symmetric extension, periodic with period 2n (scipy's "reflect")
        p = np.arange(-radius, n + radius) % (2 * n)
        source = np.where(p < n, p, 2 * n - 1 - p)
    padded = x.index_select(dim, torch.as_tensor(source, device=x.device))
    if radius <= _DIRECT_BLUR_RADIUS:
        out = padded.narrow(dim, radius, n).mul(float(kernel[radius]))
        for m in range(1, radius + 1):
            out.add_(padded.narrow(dim, radius - m, n), alpha=float(kernel[radius - m]))
            out.add_(padded.narrow(dim, radius + m, n), alpha=float(kernel[radius + m]))
        return out
    length = n + 2 * radius
    freqs = np.arange(length // 2 + 1)
    # The kernel's DFT (it is symmetric, so real); the wrap-around only touches the padding.
    response = kernel[radius] + 2 * np.sum(
        kernel[radius + 1 :, None]
        * np.cos(2 * np.pi * np.outer(taps[radius + 1 :], freqs) / length),
        axis=0,
    )
    view = [1] * x.ndim
    view[dim] = freqs.size
    spectrum = torch.fft.rfft(padded, dim=dim)
    spectrum.mul_(torch.as_tensor(response, dtype=torch.float32, device=x.device).reshape(view))
    return torch.fft.irfft(spectrum, n=length, dim=dim).narrow(dim, radius, n)


def _blur(x: torch.Tensor, std_mm: Sequence[float], spacing: Spacing) -> torch.Tensor:
    """TorchIO's ``Blur``: a Gaussian with standard deviation ``std_mm / spacing`` voxels."""
    for axis in range(3):
        sigma = float(std_mm[axis]) / spacing[axis]
        if sigma > 1e-15:  # scipy skips the axes it would not change
            x = gaussian_along(x, axis + 1, sigma)
    return x.contiguous()


@functools.lru_cache(maxsize=256)
def _anisotropy_tables(
    n: int, spacing: Spacing, axis: int, factor: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where TorchIO's down- and up-sampling read along ``axis`` (of length ``n``).

    The coarse grid has ``floor(n / factor)`` slices centred on the fine one; a coarse slice takes the
    nearest fine slice, and each fine slice interpolates linearly between coarse slices (samples
    more than half a coarse slice outside the coarse grid are 0). The coarse slices sit exactly
    half-way between fine slices for many factors, so which neighbour "nearest" picks depends on
    SimpleITK's rounding; the tables are therefore read off TorchIO's own ``Resample`` applied to a
    one-voxel-thick ramp along ``axis`` (tiny; cached). TorchIO's transforms draw from torch's
    global generator (their probability check), so they run on a fork of it: whether the tables
    were cached must not change what dropout or any other caller draws next.

    Returns:
        ``(nearest, position, inside)``: ``(m,)`` fine slice of each coarse slice; ``(n,)`` coarse
        continuous index of each fine slice, clamped to the coarse grid; ``(n,)`` whether it is
        within half a coarse slice of the grid.
    """
    probe_shape = [1, 1, 1]
    probe_shape[axis] = n
    affine = np.diag([*spacing, 1.0])
    ramp = torch.arange(1, n + 1, dtype=torch.float32).reshape(1, *probe_shape)
    with torch.random.fork_rng(devices=[]):
        image = tio.ScalarImage(tensor=ramp, affine=affine)
        target = list(image.spacing)
        target[axis] *= factor
        coarse_spacing = (float(target[0]), float(target[1]), float(target[2]))
        down = tio.Resample(target=coarse_spacing, image_interpolation="nearest")(image)
        nearest = down.data.reshape(-1).numpy().astype(np.int64) - 1
        m = nearest.size
        coarse_ramp = torch.arange(1, m + 1, dtype=torch.float32).reshape(down.data.shape)
        coarse = tio.ScalarImage(tensor=coarse_ramp, affine=down.affine)
        up = tio.Resample(target=(tuple(probe_shape), affine), image_interpolation="linear")(coarse)
    values = up.data.reshape(-1).numpy().astype(float)
    inside = values > 0  # the ramp starts at 1; SimpleITK writes 0 outside
    return nearest, np.where(inside, values - 1, 0.0), inside


def _anisotropy(x: torch.Tensor, anisotropy: Anisotropy, spacing: Spacing) -> torch.Tensor:
    """Thick slices: nearest down-sampling along one axis and linear back, as TorchIO's
    ``Resample`` twice, done as two 1-D gathers and a blend along that axis."""
    axis, factor = anisotropy.axis, float(anisotropy.downsampling)
    dim = axis + 1
    n = x.shape[dim]
    nearest, position, inside = _anisotropy_tables(n, spacing, axis, factor)
    m = nearest.size
    low = np.minimum(np.floor(position), max(m - 2, 0)).astype(np.int64)
    high = np.minimum(low + 1, m - 1)
    dev = x.device
    view = [1, 1, 1, 1]
    view[dim] = n
    lo = x.index_select(dim, torch.as_tensor(nearest[low], device=dev))
    hi = x.index_select(dim, torch.as_tensor(nearest[high], device=dev))
    weight = torch.as_tensor(position - low, dtype=torch.float32, device=dev).reshape(view)
    out = torch.lerp(lo, hi, weight)
    if not inside.all():
        keep = torch.as_tensor(inside, dtype=torch.float32, device=dev).reshape(view)
        out.mul_(keep)
    return out


def _bias_coordinates(n: int) -> np.ndarray:
    """TorchIO's normalised coordinates: voxel centres, symmetric about 0, largest = 1."""
    half = n / 2
    values = np.arange(-half, half) + 0.5
    top = values.max()
    return values / top if top > 0 else values


def _bias_field(bias: BiasField, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """TorchIO's ``BiasField``: ``exp(sum c_ijk x^i y^j z^k)`` on normalised coordinates.

    The polynomial is evaluated separably: ``(X, order + 1)`` powers of x times an
    ``(order + 1, Y * Z)`` table of the y-z polynomials, then ``exp``.

    Returns:
        ``(X, Y, Z)`` float32 field.
    """
    order = bias.order
    nx, ny, nz = shape
    px, py, pz = (
        _bias_coordinates(n)[:, None] ** np.arange(order + 1)[None, :] for n in (nx, ny, nz)
    )
    table = np.zeros((order + 1, ny, nz))
    i = 0
    for xo in range(order + 1):
        for yo in range(order + 1 - xo):
            for zo in range(order + 1 - (xo + yo)):
                table[xo] += bias.coefficients[i] * np.outer(py[:, yo], pz[:, zo])
                i += 1
    # float64: immune to TF32 / reduced-precision matmul settings (the inner dimension is tiny)
    powers = torch.as_tensor(px, dtype=torch.float64, device=device)
    rows = torch.as_tensor(table.reshape(order + 1, ny * nz), dtype=torch.float64, device=device)
    return torch.mm(powers, rows).to(torch.float32).exp_().reshape(nx, ny, nz)


# --------------------------------------------------------------------------------------------------
# Noise, gamma, scale
# --------------------------------------------------------------------------------------------------


def _robust_max(x: torch.Tensor) -> float:
    """The reference's robust maximum: ``torch.quantile(sample, 0.99)`` of a strided subsample of
    the input, computed the same way (float32 rank, linear interpolation) from a partial sort."""
    sample = x.reshape(-1)[:: max(1, x.numel() // _QUANTILE_SAMPLES)]
    rank = torch.tensor(0.99, dtype=torch.float32) * (sample.numel() - 1)
    below = int(rank.floor())
    above = int(rank.ceil())
    # The sample.numel() - below largest values, ascending from position ``below``.
    largest = sample.topk(sample.numel() - below, sorted=True).values.flip(0)
    low, high = largest[0], largest[above - below]
    return float(torch.lerp(low, high, (rank - below).to(x.device)))


def _add_noise(x: torch.Tensor, noise: Noise, reference_max: float) -> torch.Tensor:
    """Gaussian noise (TorchIO's ``Noise``) or Rician magnitude noise, std relative to
    ``reference_max`` (a new tensor). The generator calls are the reference's, so on CPU the field
    is the same; on a GPU it is another draw of the same distribution."""
    std = noise.std * reference_max
    gen = torch.Generator(device=x.device).manual_seed(int(noise.seed))
    real = torch.empty_like(x).normal_(0.0, std, generator=gen)
    if not noise.rician:
        return real.add_(x)
    imag = torch.empty_like(x).normal_(0.0, std, generator=gen)
    return torch.hypot(real.add_(x), imag, out=imag)


def _gamma_scale(x: torch.Tensor, gamma: float | None, scale: float | None) -> torch.Tensor:
    """The reference's gamma (on intensities clamped at 0 and divided by the volume's maximum ``m``,
    then multiplied back: ``m * (x / m) ** gamma = m ** (1 - gamma) * x ** gamma``) and scaling, in
    place on ``x``."""
    factor = 1.0 if scale is None else float(scale)
    if gamma is not None:
        top = float(x.max())
        if top > 0:
            g = float(gamma)
            return x.clamp_(min=0).pow_(g).mul_(top ** (1 - g) * factor)
    return x.mul_(factor) if scale is not None else x


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def apply_fast(
    volume: np.ndarray | torch.Tensor, params: SimParams, spacing: tuple[float, float, float]
) -> torch.Tensor:
    """Apply ``params`` with the fused fast path (same result as
    :func:`~shiftguard.augment.reference.apply_reference`, see the module's notes).

    Args:
        volume: ``(C, X, Y, Z)`` intensities; a numpy array or a tensor on any device (the work runs
            on that device). It is not modified.
        params: the drawn acquisition; ``None`` fields are skipped.
        spacing: voxel size in mm ``(X, Y, Z)``.

    Returns:
        ``(C, X, Y, Z)`` float32 tensor on the input's device (the CPU for a numpy array).

    Raises:
        SimInputError: when the volume is not 4-D, the spacing is not 3 positive numbers, or a field
            of ``params`` cannot be applied (the message says which).

    Example:
        >>> import numpy as np
        >>> from shiftguard.augment.params import BiasField, SimParams
        >>> volume = np.ones((2, 8, 8, 8))
        >>> out = apply_fast(volume, SimParams(bias_field=BiasField((0.5,), 0)), (1.0, 1.0, 1.0))
        >>> out.dtype, tuple(out.shape), round(float(out[0, 0, 0, 0]), 4)
        (torch.float32, (2, 8, 8, 8), 1.6487)
    """
    x = _as_volume(volume)
    sp = _as_spacing(spacing)
    _check_params(params, x.shape[1:])
    reference_max = _robust_max(x) if params.noise is not None else 0.0
    out = _kspace_artifacts(x, params, sp)
    if params.blur is not None:
        out = _blur(out, params.blur.std_mm, sp)
    if params.anisotropy is not None:
        out = _anisotropy(out, params.anisotropy, sp)
    if out is x:  # from here on, work in place on a tensor of our own
        out = x.clone()
    if params.bias_field is not None:
        out.mul_(_bias_field(params.bias_field, x.shape[1:], x.device))
    if params.noise is not None:
        out = _add_noise(out, params.noise, reference_max)
    return _gamma_scale(out, params.gamma, params.scale)


class FastScannerSim(tio.transforms.IntensityTransform):
    """:func:`apply_fast` as a TorchIO transform, for a ``tio.Compose``.

    Each intensity image of the subject gets ``params`` with its own voxel size (from its affine);
    the voxel grid is treated as axis-aligned, as :func:`apply_fast` does.

    Args:
        params: the acquisition to simulate.
        **kwargs: TorchIO's transform arguments (``include``, ``exclude``, ``p``, ...).

    Example:
        >>> import torch, torchio as tio
        >>> from shiftguard.augment.params import SimParams
        >>> image = tio.ScalarImage(tensor=torch.rand(1, 8, 8, 8))
        >>> transform = tio.Compose([FastScannerSim(SimParams(scale=2.0))])
        >>> bool(torch.allclose(transform(image).data, 2 * image.data))
        True
    """

    def __init__(self, params: SimParams, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.params = params
        self.args_names = ["params"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            spacing = tuple(float(s) for s in image.spacing)
            image.set_data(
                apply_fast(image.data, self.params, (spacing[0], spacing[1], spacing[2]))
            )
        return subject
