"""Scanner profiles at a severity level: scale their ranges, draw one acquisition's parameters.

A profile (:class:`~shiftguard.config.schema.ScannerSimProfile`, ``conf/scanner_sim/<name>.yaml``) gives
TorchIO-style parameter ranges at the highest severity, 4. Severity ``s`` in 0..4 moves each end of each
range towards the identity::

    end(s) = identity + s / 4 * (end - identity)

with identity 0 for additive magnitudes (noise std, intensities, degrees, translation, blur std, bias
coefficients, log-gamma, log-scale) and 1 for the down-sampling factor. Counts (ghosts, spikes,
movements) scale the same way and are rounded half up, and are at least 1 when ``s > 0``. Severity 0 is
the identity: :func:`draw` returns ``SimParams()``.

:func:`draw` takes every random number from the caller's generator, so the same generator state
always gives the same :class:`~shiftguard.augment.params.SimParams`:

>>> import numpy as np
>>> from shiftguard.config.schema import ScannerSimProfile
>>> profile = ScannerSimProfile.model_validate(
...     {"description": "noisy", "noise": {"std": [0.04, 0.08], "rician": True}}
... )
>>> scaled_ranges(profile, 2).noise.std
(0.02, 0.04)
>>> params = draw(profile, 2, np.random.default_rng(0), (32, 32, 32))
>>> 0.02 <= params.noise.std <= 0.04 and params.noise.rician and params.motion is None
True
>>> draw(profile, 0, np.random.default_rng(0), (32, 32, 32)).is_identity()
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from shiftguard.augment.params import (
    Anisotropy,
    BiasField,
    Blur,
    Ghosting,
    Motion,
    Noise,
    SimParams,
    Spike,
)
from shiftguard.config.schema import SEVERITY_MAX, ScannerSimProfile

__all__ = [
    "MOTION_PERTURBATION",
    "SEVERITY_MAX",
    "bias_coefficient_count",
    "draw",
    "scaled_ranges",
]

MOTION_PERTURBATION = 0.3
"""Jitter of the movement times, as a fraction of their spacing (TorchIO's ``RandomMotion``)."""


def _check_severity(severity: int) -> int:
    if isinstance(severity, bool) or int(severity) != severity or not 0 <= severity <= SEVERITY_MAX:
        raise ValueError(f"severity must be an integer from 0 to {SEVERITY_MAX}, got {severity!r}")
    return int(severity)


def _scale(value: float, severity: int, identity: float = 0.0) -> float:
    return identity + severity / SEVERITY_MAX * (value - identity)


def _scale_range(
    bounds: tuple[float, float], severity: int, identity: float = 0.0
) -> tuple[float, float]:
    return (_scale(bounds[0], severity, identity), _scale(bounds[1], severity, identity))


def _scale_count(bounds: tuple[int, int], severity: int) -> tuple[int, int]:
    if severity == 0:
        return (0, 0)
    lo, hi = (max(1, math.floor(_scale(b, severity) + 0.5)) for b in bounds)
    return (lo, hi)


def bias_coefficient_count(order: int) -> int:
    """How many coefficients TorchIO's ``BiasField`` takes for a polynomial of ``order``.

    >>> [bias_coefficient_count(k) for k in range(5)]
    [1, 4, 10, 20, 35]
    """
    return (order + 1) * (order + 2) * (order + 3) // 6


_SCALED: dict[str, dict[str, float | None]] = {
    "motion": {"degrees": 0.0, "translation": 0.0, "num_transforms": None},
    "ghosting": {"num_ghosts": None, "intensity": 0.0},
    "spike": {"num_spikes": None, "intensity": 0.0},
    "blur": {"std": 0.0},
    "anisotropy": {"downsampling": 1.0},
    "bias_field": {"coefficients": 0.0},
    "noise": {"std": 0.0},
    "gamma": {"log_gamma": 0.0},
    "scale": {"log_scale": 0.0},
}
"""The ranges :func:`scaled_ranges` scales: per profile section, each range's identity (``None``: a
count, scaled by :func:`_scale_count`)."""


def scaled_ranges(profile: ScannerSimProfile, severity: int) -> ScannerSimProfile:
    """The profile's ranges at ``severity``.

    Args:
        profile: ranges at the highest severity (4).
        severity: 0 (identity) to 4 (the profile as written).

    Returns:
        A copy of ``profile`` whose ranges are scaled as the module explains; discrete settings
        (axes, polynomial order, Rician or not, ghost ``restore``) are unchanged. At severity 0 every
        range is its identity and counts are 0 (not a valid configuration; nothing is drawn from it).

    Raises:
        ValueError: when ``severity`` is not an integer from 0 to 4.
    """
    s = _check_severity(severity)
    update: dict[str, object] = {}
    for name, identities in _SCALED.items():
        section = getattr(profile, name)
        if section is None:
            continue
        scaled: dict[str, object] = {}
        for field, identity in identities.items():
            value = getattr(section, field)
            scaled[field] = (
                _scale_count(value, s) if identity is None else _scale_range(value, s, identity)
            )
        update[name] = section.model_copy(update=scaled)
    return profile.model_copy(update=update)


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _integer(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1], endpoint=True))


def _choice(rng: np.random.Generator, options: Sequence[int]) -> int:
    return int(options[int(rng.integers(len(options)))])


def _triples(values: np.ndarray) -> tuple[tuple[float, float, float], ...]:
    return tuple((float(a), float(b), float(c)) for a, b, c in values)


def _spike_positions(
    rng: np.random.Generator, count: int, shape: tuple[int, int, int]
) -> tuple[tuple[float, float, float], ...]:
    """``count`` positions uniform in [0, 1)^3 like TorchIO's, redrawn when one would hit the
    centre voxel of the (centred) spectrum, ``floor(p * shape) == shape // 2``: a spike there only
    shifts the mean intensity instead of adding stripes."""
    size = np.asarray(shape, dtype=int)
    centre = size // 2
    positions: list[tuple[float, float, float]] = []
    while len(positions) < count:
        p = rng.random(3)
        if np.array_equal(np.floor(p * size).astype(int), centre):
            continue
        positions.append((float(p[0]), float(p[1]), float(p[2])))
    return tuple(positions)


def _motion_times(rng: np.random.Generator, count: int) -> tuple[float, ...]:
    """TorchIO's movement times: evenly spaced in (0, 1), each jittered by up to
    :data:`MOTION_PERTURBATION` of the spacing, so they stay sorted and inside (0, 1)."""
    step = 1.0 / (count + 1)
    jitter = rng.uniform(-step * MOTION_PERTURBATION, step * MOTION_PERTURBATION, count)
    return tuple(float((k + 1) * step + j) for k, j in enumerate(jitter))


def draw(
    profile: ScannerSimProfile,
    severity: int,
    rng: np.random.Generator,
    shape: Sequence[int],
) -> SimParams:
    """Draw one simulated acquisition from ``profile`` at ``severity``.

    Every random number comes from ``rng`` (the noise field's seed too), in the fixed order of
    :data:`~shiftguard.augment.params.ORDER`, so the same generator state gives the same parameters.
    Every drawn value lies within :func:`scaled_ranges` of the profile at ``severity``.

    Args:
        profile: the scanner profile (ranges at severity 4).
        severity: 0 (identity: ``SimParams()``, nothing drawn) to 4.
        rng: the generator to draw from.
        shape: the spatial shape ``(X, Y, Z)`` of the volume it will be applied to (spike positions
            avoid the centre voxel of its spectrum).

    Returns:
        The drawn parameters; transforms the profile leaves out are ``None``.

    Raises:
        ValueError: when ``severity`` is not an integer from 0 to 4 or ``shape`` is not 3-D.
    """
    s = _check_severity(severity)
    if s == 0:
        return SimParams()
    spatial = tuple(int(n) for n in shape)
    if len(spatial) != 3:
        raise ValueError(f"shape must be the spatial (X, Y, Z) shape, got {tuple(shape)}")
    r = scaled_ranges(profile, s)

    motion = ghosting = spike = blur = anisotropy = bias_field = noise = None
    gamma = scale = None
    if r.motion is not None:
        n = _integer(rng, r.motion.num_transforms)
        motion = Motion(
            degrees=_triples(rng.uniform(*r.motion.degrees, size=(n, 3))),
            translation=_triples(rng.uniform(*r.motion.translation, size=(n, 3))),
            times=_motion_times(rng, n),
        )
    if r.ghosting is not None:
        ghosting = Ghosting(
            num_ghosts=_integer(rng, r.ghosting.num_ghosts),
            axis=_choice(rng, r.ghosting.axes),
            intensity=_uniform(rng, r.ghosting.intensity),
            restore=r.ghosting.restore,
        )
    if r.spike is not None:
        n = _integer(rng, r.spike.num_spikes)
        spike = Spike(
            positions=_spike_positions(rng, n, (spatial[0], spatial[1], spatial[2])),
            intensity=_uniform(rng, r.spike.intensity),
        )
    if r.blur is not None:
        a, b, c = rng.uniform(*r.blur.std, size=3)
        blur = Blur(std_mm=(float(a), float(b), float(c)))
    if r.anisotropy is not None:
        anisotropy = Anisotropy(
            axis=_choice(rng, r.anisotropy.axes),
            downsampling=_uniform(rng, r.anisotropy.downsampling),
        )
    if r.bias_field is not None:
        magnitude = _uniform(rng, r.bias_field.coefficients)
        count = bias_coefficient_count(r.bias_field.order)
        coefficients = rng.uniform(-magnitude, magnitude, size=count)
        bias_field = BiasField(
            coefficients=tuple(float(c) for c in coefficients), order=r.bias_field.order
        )
    if r.noise is not None:
        noise = Noise(
            std=_uniform(rng, r.noise.std),
            seed=int(rng.integers(2**31)),
            rician=r.noise.rician,
        )
    if r.gamma is not None:
        gamma = math.exp(_uniform(rng, r.gamma.log_gamma))
    if r.scale is not None:
        scale = math.exp(_uniform(rng, r.scale.log_scale))
    return SimParams(
        motion=motion,
        ghosting=ghosting,
        spike=spike,
        blur=blur,
        anisotropy=anisotropy,
        bias_field=bias_field,
        noise=noise,
        gamma=gamma,
        scale=scale,
    )
