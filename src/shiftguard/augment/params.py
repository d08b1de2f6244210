"""The parameters of one simulated acquisition, drawn once and applied by either implementation.

:class:`SimParams` is the contract between the scanner profiles (which draw it from ranges scaled by a
severity level), the reference TorchIO chain (:mod:`shiftguard.augment.reference`) and the fused fast
path (:mod:`shiftguard.augment.fast`): for the same ``SimParams`` both must give statistically the
same image. Every field set to ``None`` is an identity.

Transforms are applied in this fixed order (acquisition physics first, display last):

1. ``motion``  rigid motion during the acquisition (k-space, TorchIO ``Motion``)
2. ``ghosting`` periodic ghosts along the phase-encoding axis (k-space, ``Ghosting``)
3. ``spike``   herringbone stripes from k-space spikes (``Spike``)
4. ``blur``    point-spread function (``Blur``, standard deviations in mm)
5. ``anisotropy`` thick slices: down-sample one axis (nearest) and back (linear), like
   ``RandomAnisotropy``
6. ``bias_field`` smooth multiplicative receive field (``BiasField``, Legendre-like polynomial)
7. ``noise``   Gaussian (``Noise``) or Rician magnitude noise, standard deviation relative to the
   image's robust maximum (99th percentile of the input)
8. ``gamma``   vendor contrast curve (``Gamma``, applied to intensities rescaled to [0, 1] and back)
9. ``scale``   vendor intensity scaling (multiplication)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ORDER = (
    "motion",
    "ghosting",
    "spike",
    "blur",
    "anisotropy",
    "bias_field",
    "noise",
    "gamma",
    "scale",
)


@dataclass(frozen=True)
class Motion:
    """``degrees`` and ``translation`` (mm): one ``(3,)`` triple per movement; ``times`` in (0, 1)
    are the fractions of the acquisition at which each movement happens (sorted)."""

    degrees: tuple[tuple[float, float, float], ...]
    translation: tuple[tuple[float, float, float], ...]
    times: tuple[float, ...]


@dataclass(frozen=True)
class Ghosting:
    """``num_ghosts`` ghosts along ``axis`` (0, 1 or 2) with relative ``intensity`` in [0, 1];
    ``restore`` is TorchIO's fraction of the k-space centre kept intact."""

    num_ghosts: int
    axis: int
    intensity: float
    restore: float = 0.02


@dataclass(frozen=True)
class Spike:
    """Spikes at ``positions`` (each ``(3,)`` in [0, 1) of the k-space shape) with ``intensity``
    relative to the spectrum's maximum, as TorchIO's ``Spike``."""

    positions: tuple[tuple[float, float, float], ...]
    intensity: float


@dataclass(frozen=True)
class Blur:
    """Gaussian point-spread function, standard deviation in mm along (X, Y, Z)."""

    std_mm: tuple[float, float, float]


@dataclass(frozen=True)
class Anisotropy:
    """Slices ``downsampling`` times thicker along ``axis``."""

    axis: int
    downsampling: float


@dataclass(frozen=True)
class BiasField:
    """TorchIO's polynomial bias field: ``coefficients`` in TorchIO's order for ``order``."""

    coefficients: tuple[float, ...]
    order: int


@dataclass(frozen=True)
class Noise:
    """Noise with standard deviation ``std`` relative to the input's 99th percentile; ``seed``
    fixes the noise field; ``rician`` takes the magnitude of complex Gaussian noise."""

    std: float
    seed: int
    rician: bool = False


@dataclass(frozen=True)
class SimParams:
    """Everything drawn for one simulated acquisition; ``None`` fields are skipped."""

    motion: Motion | None = None
    ghosting: Ghosting | None = None
    spike: Spike | None = None
    blur: Blur | None = None
    anisotropy: Anisotropy | None = None
    bias_field: BiasField | None = None
    noise: Noise | None = None
    gamma: float | None = None
    scale: float | None = None

    def is_identity(self) -> bool:
        """True when nothing would change the image."""
        return all(getattr(self, name) is None for name in ORDER)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable record of the drawn parameters (for manifests and MLflow)."""
        return asdict(self)
