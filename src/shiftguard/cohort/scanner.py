"""Image formation and storage of one scanner profile: PSF, bias field, contrast, noise, quantisation.

Applied in this order to the noise-free signal on the acquisition grid (white matter ~ 1):

1. in-plane Gaussian point-spread function of ``blur_fwhm_mm``;
2. smooth multiplicative receive-coil field: a random quadratic polynomial over the field of view,
   scaled to a peak-to-peak of ``bias_field`` around 1;
3. vendor contrast curve ``signal ** gamma``;
4. Rician noise: the magnitude of the signal plus complex Gaussian noise of standard deviation
   ``noise`` (relative to white matter), so the background has a noise floor as in real magnitude MR;
5. scaling so white matter ~ ``intensity_scale``, then
   ``stored = round((value - rescale_intercept) / rescale_slope)`` clipped to ``bits_stored`` bits.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from shiftguard.config.schema import ScannerProfile

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def bias_field(
    rng: np.random.Generator, shape: tuple[int, int, int], peak_to_peak: float
) -> NDArray[np.float32]:
    """A smooth multiplicative field over the grid: ``1 + f`` with ``max(f) - min(f) = peak_to_peak``.

    Args:
        rng: the subject's scanner stream.
        shape: ``(K, R, C)``.
        peak_to_peak: the field's range (0.3 means about +-15 %).

    Returns:
        ``(K, R, C)`` float32, centred on 1.
    """
    coeffs = rng.normal(0.0, 1.0, 9)
    if peak_to_peak <= 0:
        return np.ones(shape, dtype=np.float32)
    w = np.linspace(-1, 1, shape[0], dtype=np.float32)[:, None, None]
    v = np.linspace(-1, 1, shape[1], dtype=np.float32)[None, :, None]
    u = np.linspace(-1, 1, shape[2], dtype=np.float32)[None, None, :]
    c = coeffs.astype(np.float32)
    f = (c[0] * w + c[1] * v + c[2] * u) + (c[3] * w * w + c[4] * v * v + c[5] * u * u)
    f = f + (c[6] * (w * v) + c[7] * (w * u)) + c[8] * (v * u)
    f = np.broadcast_to(f, shape)
    lo, hi = float(f.min()), float(f.max())
    if hi - lo < 1e-6:
        return np.ones(shape, dtype=np.float32)
    scaled = (f - np.float32((hi + lo) / 2)) * np.float32(peak_to_peak / (hi - lo))
    return (np.float32(1.0) + scaled).astype(np.float32)


def acquire(
    signal: NDArray[np.float32],
    profile: ScannerProfile,
    rng: np.random.Generator,
) -> NDArray[np.float32]:
    """Turn the noise-free signal into what the scanner reconstructs, in physical units.

    Args:
        signal: ``(K, R, C)`` float32 noise-free signal, white matter ~ 1.
        profile: the scanner profile.
        rng: the subject's scanner stream (bias field then noise).

    Returns:
        ``(K, R, C)`` float32 magnitude image, white matter ~ ``profile.intensity_scale``.
    """
    img = signal
    if profile.blur_fwhm_mm > 0:
        sigma_mm = profile.blur_fwhm_mm * FWHM_TO_SIGMA
        row_sp, col_sp = profile.pixel_spacing
        img = ndi.gaussian_filter(
            img, (0.0, sigma_mm / row_sp, sigma_mm / col_sp), mode="nearest", output=np.float32
        )
    img = img * bias_field(rng, img.shape, profile.bias_field)
    np.maximum(img, 0.0, out=img)
    if profile.gamma != 1.0:
        img = np.power(img, np.float32(profile.gamma), dtype=np.float32)
    if profile.noise > 0:
        sd = np.float32(profile.noise)
        real = img + sd * rng.standard_normal(img.shape, dtype=np.float32)
        imag = sd * rng.standard_normal(img.shape, dtype=np.float32)
        img = np.hypot(real, imag, dtype=np.float32)
    return (img * np.float32(profile.intensity_scale)).astype(np.float32)


def quantise(values: NDArray[np.float32], profile: ScannerProfile) -> NDArray[np.uint16]:
    """Stored pixel values: ``round((value - intercept) / slope)`` clipped to ``bits_stored`` bits.

    Args:
        values: ``(...)`` physical values.
        profile: the scanner profile (rescale and bits).

    Returns:
        ``(...)`` uint16.
    """
    top = 2**profile.bits_stored - 1
    stored = np.rint((values - np.float32(profile.rescale_intercept)) / profile.rescale_slope)
    return np.clip(stored, 0, top).astype(np.uint16)


def window(profile: ScannerProfile) -> tuple[float, float]:
    """WindowCenter, WindowWidth in physical (rescaled) units: shows 0 to ~1.25 x white matter."""
    scale = profile.intensity_scale
    return (round(0.625 * scale, 1), round(1.25 * scale, 1))
