"""Acquisition and reconstruction in k-space: what a scanner does between the object and the image.

:func:`acquire` takes the object's signed transverse magnetisation on a grid ``oversampling`` times
finer in-plane than the reconstructed matrix (same field of view, voxel 0 at the same place) and,
slice by slice:

1. Fourier transforms it and keeps the central ``acquisition_matrix`` of k-space: everything the
   object holds above the acquisition's Nyquist frequency is lost, so sharp edges ring (Gibbs);
2. drops the first ``1 - partial_fourier`` of the phase-encoding lines (zero-filled partial Fourier:
   blurring and ringing along the phase-encoding axis, a complex image);
3. adds complex white Gaussian noise to every sampled point (standard deviation set by
   :func:`~.physics.noise_sd`);
4. weights k-space by the vendor's apodisation filter (Hamming, Hann, Tukey or Fermi), which
   smooths the image and colours its noise;
5. zero-fills up to the reconstructed matrix (interpolation: neighbouring pixels' noise is
   correlated) and transforms back;
6. amplifies the noise by ``sqrt(R) * g(x)`` where parallel imaging with factor ``R`` unfolds it, ``g``
   rising smoothly from 1 at the edge of the field of view to ``g_factor_max`` at its centre;
7. returns the magnitude: Rician statistics, a noise floor in the background.

Noise texture therefore differs between vendors through the acquisition matrix, the filter, partial
Fourier and parallel imaging, not only its level.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from shiftguard.config.schema import ScannerProfile

#: a Fermi filter's transition width when ``apodisation_width`` is 0 (fraction of k_max)
DEFAULT_FERMI_WIDTH = 0.05
#: a Tukey window's tapered fraction when ``apodisation_width`` is 0
DEFAULT_TUKEY_WIDTH = 0.3


def window(kind: str, n: int, width: float = 0.0) -> NDArray[np.float64]:
    """The apodisation window ``(n,)`` over a k-space axis of ``n`` samples (centre at ``n // 2``).

    Args:
        kind: ``none``, ``hamming``, ``hann``, ``tukey`` or ``fermi``.
        n: samples along the axis.
        width: ``tukey``: the tapered fraction (0 means :data:`DEFAULT_TUKEY_WIDTH`); ``fermi``: the
            transition width as a fraction of k_max (0 means :data:`DEFAULT_FERMI_WIDTH`); ignored
            otherwise.

    >>> w = window("hamming", 8)
    >>> float(w[4]), round(float(w[0]), 2)
    (1.0, 0.08)
    """
    k = (np.arange(n) - n // 2) / max(n / 2.0, 1.0)  # -1 .. 1, 0 at the centre
    if kind == "none":
        return np.ones(n)
    if kind == "hamming":
        return 0.54 + 0.46 * np.cos(np.pi * k)
    if kind == "hann":
        return 0.5 + 0.5 * np.cos(np.pi * k)
    if kind == "tukey":
        taper = width or DEFAULT_TUKEY_WIDTH
        edge = 1.0 - taper
        out = np.ones(n)
        outer = np.abs(k) > edge
        out[outer] = 0.5 + 0.5 * np.cos(np.pi * (np.abs(k[outer]) - edge) / taper)
        return out
    if kind == "fermi":
        w = width or DEFAULT_FERMI_WIDTH
        radius = 1.0 - 3.0 * w  # the filter falls to 1/2 there, to ~5 % at the edge
        return 1.0 / (1.0 + np.exp((np.abs(k) - radius) / w))
    raise ValueError(f"unknown apodisation {kind!r}: none, hamming, hann, tukey or fermi")


def _centre_slice(big: int, small: int) -> slice:
    start = big // 2 - small // 2
    return slice(start, start + small)


def g_factor_map(shape: tuple[int, int], pe_axis: int, g_max: float) -> NDArray[np.float32]:
    """``(R, C)`` parallel-imaging noise amplification: 1 at the edges, ``g_max`` at the centre.

    Aliased pixels overlap most, and coil sensitivities differ least, in the middle of the field of
    view along the phase-encoding axis ``pe_axis`` (0 rows, 1 columns); the map is a Gaussian bump,
    wider along the frequency-encoding axis.
    """
    if g_max <= 1.0:
        return np.ones(shape, dtype=np.float32)
    u = np.linspace(-1, 1, shape[0])[:, None]
    v = np.linspace(-1, 1, shape[1])[None, :]
    pe, fe = (u, v) if pe_axis == 0 else (v, u)
    bump = np.exp(-(pe**2) / (2 * 0.35**2) - fe**2 / (2 * 0.6**2))
    return (1.0 + (g_max - 1.0) * bump).astype(np.float32)


def acquire(
    obj: NDArray[np.float32],
    profile: ScannerProfile,
    rng: np.random.Generator,
    noise_sd: float,
) -> NDArray[np.float32]:
    """The magnitude image the scanner reconstructs from the object.

    Args:
        obj: ``(K, R * o, C * o)`` float32 signed transverse magnetisation (water = 1) sampled ``o``
            times finer in-plane than the profile's reconstructed ``matrix`` over the same field of
            view, voxel ``[k, 0, 0]`` at the reconstructed voxel ``[k, 0, 0]``.
        profile: acquisition and reconstruction parameters.
        rng: draws the thermal noise.
        noise_sd: per-channel noise standard deviation of a full, unfiltered acquisition (see
            :func:`~.physics.noise_sd`); 0 gives the noise-free reconstruction.

    Returns:
        ``(K, R, C)`` float32 magnitude image on the reconstructed matrix.
    """
    n_slices, big_r, big_c = obj.shape
    rows, cols = profile.matrix
    acq_r, acq_c = profile.acquired
    if big_r < rows or big_c < cols:
        raise ValueError(f"object grid {obj.shape[1:]} is coarser than the matrix {profile.matrix}")
    pe_axis = 1 if profile.phase_encoding_direction == "ROW" else 0  # of (rows, cols)
    # forward-normalised: the DC term is the mean, so amplitudes survive any crop or zero-fill
    spectrum = np.fft.fftshift(np.fft.fft2(obj.astype(np.complex64), norm="forward"), axes=(1, 2))
    k = spectrum[:, _centre_slice(big_r, acq_r), _centre_slice(big_c, acq_c)]
    sampled = np.ones((acq_r, acq_c), dtype=bool)
    n_pe = (acq_r, acq_c)[pe_axis]
    skipped = round((1.0 - profile.partial_fourier) * n_pe)
    if skipped:
        if pe_axis == 0:
            sampled[:skipped, :] = False
        else:
            sampled[:, :skipped] = False
    filt = np.outer(
        window(profile.apodisation, acq_r, profile.apodisation_width),
        window(profile.apodisation, acq_c, profile.apodisation_width),
    ).astype(np.float32)
    weight = np.where(sampled, filt, np.float32(0.0)).astype(np.float32)

    def reconstruct(kspace: NDArray[np.complexfloating]) -> NDArray[np.complex64]:
        full = np.zeros((n_slices, rows, cols), dtype=np.complex64)
        full[:, _centre_slice(rows, acq_r), _centre_slice(cols, acq_c)] = kspace * weight
        image = np.fft.ifft2(np.fft.ifftshift(full, axes=(1, 2)), norm="forward")
        return image.astype(np.complex64)

    image = reconstruct(k)
    if noise_sd > 0:
        # per-sample sd such that a full unfiltered acquisition gives noise_sd per pixel
        sd = np.float32(noise_sd / np.sqrt(acq_r * acq_c))
        noise = rng.standard_normal((2, n_slices, acq_r, acq_c), dtype=np.float32) * sd
        noise_image = reconstruct((noise[0] + 1j * noise[1]).astype(np.complex64))
        if profile.parallel_factor > 1:
            g = g_factor_map((rows, cols), pe_axis, profile.g_factor_max)
            noise_image *= np.float32(np.sqrt(profile.parallel_factor)) * g[None]
        image += noise_image
    return np.abs(image).astype(np.float32)
