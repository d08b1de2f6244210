"""MR physics of the cohort: tissue relaxation at a field strength and the sequences' signal equations.

Every tissue has a proton density ``pd`` (relative to pure water) and T1, T2 and T2* that depend on the
field strength B0 (:func:`relaxation_at`). A scanner profile's sequence turns them into a signed
signal per tissue (:func:`sequence_signal`), in units of the equilibrium magnetisation of water:

* ``spgr``: spoiled gradient echo (FLASH, FSPGR, FFE), the steady state
  ``pd * sin(a) * (1 - E1) / (1 - cos(a) * E1) * exp(-TE / T2*)`` with ``E1 = exp(-TR / T1)``;
* ``ir_gre``: inversion-prepared gradient echo (MPRAGE, 3D TFE, BRAVO). A shot is an inversion, a
  delay, then ``readouts_per_shot`` spoiled pulses ``readout_tr`` apart, the centre of k-space
  acquired by the middle one at ``inversion_time``, and the rest of ``shot_interval``. The
  longitudinal magnetisation is followed pulse by pulse (each step is affine in Mz), the shot's
  steady state solved exactly, and the signal is Mz before the centre pulse times
  ``sin(a) * exp(-TE / T2*)``: negative where Mz has not yet recovered through zero;
* ``se`` / ``tse``: spin echo, ``pd * (1 - 2 exp(-(TR - TE/2) / T1) + exp(-TR / T1)) * exp(-TE / T2)``
  (a turbo spin echo at its effective TE; its T2 blurring along the echo train is left out);
* ``flair``: inversion recovery spin echo, ``pd * (1 - 2 exp(-TI / T1) + exp(-TR / T1)) *
  exp(-TE / T2)``, signed (CSF is nulled at ``TI = T1 ln(2 / (1 + exp(-TR / T1)))``).

The signals are signed because a voxel mixing tissues adds their transverse magnetisation before
the magnitude is taken (:mod:`.kspace`): an inversion-recovery boundary between tissues of opposite
sign goes dark, as on real scanners.

>>> wm = relaxation_table({"wm": (0.7, 680.0, 80.0, 66.0)})
>>> s = spgr(wm.pd, wm.t1, wm.t2s, tr=8.2, te=3.2, flip_deg=12.0)
>>> round(float(s[0]), 4)
0.0495
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from shiftguard.config.schema import PHYSICS_TISSUES, PhysicsConfig, ScannerProfile

#: label values of the tissue label maps (0 is air / background)
LABELS: Mapping[str, int] = {
    "background": 0,
    **{name: i + 1 for i, name in enumerate(PHYSICS_TISSUES)},
    "lesion": len(PHYSICS_TISSUES) + 1,
}


@dataclass(frozen=True)
class Relaxation:
    """Tissue parameters, one entry per tissue, in the order of ``names``.

    Attributes:
        names: tissue names.
        pd: ``(N,)`` proton density relative to water.
        t1: ``(N,)`` ms.
        t2: ``(N,)`` ms.
        t2s: ``(N,)`` ms (T2*, never longer than T2).
    """

    names: tuple[str, ...]
    pd: NDArray[np.float64]
    t1: NDArray[np.float64]
    t2: NDArray[np.float64]
    t2s: NDArray[np.float64]

    def index(self, name: str) -> int:
        """Position of tissue ``name``."""
        return self.names.index(name)

    def scaled(
        self, pd: NDArray[np.float64], t1: NDArray[np.float64], t2: NDArray[np.float64]
    ) -> Relaxation:
        """The same tissues with PD, T1 and T2 (and T2* with T2) multiplied by ``(N,)`` factors."""
        return Relaxation(
            self.names,
            self.pd * pd,
            self.t1 * t1,
            self.t2 * t2,
            np.minimum(self.t2s * t2, self.t2 * t2),
        )

    def append(self, name: str, pd: float, t1: float, t2: float, t2s: float) -> Relaxation:
        """These tissues and one more."""
        return Relaxation(
            (*self.names, name),
            np.append(self.pd, pd),
            np.append(self.t1, t1),
            np.append(self.t2, t2),
            np.append(self.t2s, min(t2s, t2)),
        )


def relaxation_table(values: Mapping[str, tuple[float, float, float, float]]) -> Relaxation:
    """A :class:`Relaxation` from ``{name: (pd, t1, t2, t2s)}``."""
    names = tuple(values)
    arr = np.array([values[n] for n in names], dtype=np.float64).reshape(len(names), 4)
    return Relaxation(names, arr[:, 0], arr[:, 1], arr[:, 2], np.minimum(arr[:, 3], arr[:, 2]))


def at_field(values: Sequence[float], fields: Sequence[float], b0: float) -> float:
    """A relaxation time at ``b0`` from its values at the reference ``fields``.

    Power law (straight line in log-log) through the two nearest anchors, extrapolated beyond them;
    one anchor: the value itself.

    >>> round(at_field([700.0, 900.0], [1.5, 3.0], 3.0), 6)
    900.0
    >>> round(at_field([700.0, 900.0], [1.5, 3.0], 0.55), 1)  # 700 * (0.55 / 1.5) ** log2(9 / 7)
    486.5
    """
    if len(values) != len(fields) or not values:
        raise ValueError(f"{len(values)} values for {len(fields)} reference fields")
    if len(values) == 1:
        return float(values[0])
    f = np.asarray(fields, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    i = int(np.clip(np.searchsorted(f, b0) - 1, 0, len(f) - 2))
    slope = math.log(v[i + 1] / v[i]) / math.log(f[i + 1] / f[i])
    return float(v[i] * (b0 / f[i]) ** slope)


def relaxation_at(physics: PhysicsConfig, b0: float) -> Relaxation:
    """Every tissue of ``physics.tissues`` at field strength ``b0`` (T), in table order."""
    fields = physics.reference_fields
    return relaxation_table(
        {
            name: (
                t.pd,
                at_field(t.t1_ms, fields, b0),
                at_field(t.t2_ms, fields, b0),
                at_field(t.t2s_ms, fields, b0),
            )
            for name, t in physics.tissues.items()
        }
    )


def spgr(
    pd: NDArray[np.float64],
    t1: NDArray[np.float64],
    t2s: NDArray[np.float64],
    *,
    tr: float,
    te: float,
    flip_deg: float,
) -> NDArray[np.float64]:
    """Spoiled gradient-echo steady-state signal ``(N,)`` (Ernst's equation)."""
    a = math.radians(flip_deg)
    e1 = np.exp(-tr / t1)
    return pd * math.sin(a) * (1.0 - e1) / (1.0 - math.cos(a) * e1) * np.exp(-te / t2s)


def ir_gre(
    pd: NDArray[np.float64],
    t1: NDArray[np.float64],
    t2s: NDArray[np.float64],
    *,
    ti: float,
    te: float,
    flip_deg: float,
    readout_tr: float,
    shot_interval: float,
    readouts: int,
    inversion_efficiency: float = 1.0,
) -> NDArray[np.float64]:
    """Inversion-prepared gradient-echo (MPRAGE) signal ``(N,)`` at the centre of k-space, signed.

    The shot's steady state is solved exactly: every event maps Mz affinely (relaxation over ``dt``:
    ``Mz -> Mz E + (1 - E)``; a pulse: ``Mz -> Mz cos(a)``; the inversion: ``Mz -> -eff Mz``), so the
    whole shot is ``Mz -> A Mz + B`` and its fixed point ``B / (1 - A)``.

    Args:
        pd, t1, t2s: ``(N,)`` tissue parameters (ms).
        ti: inversion to the centre pulse (ms), the ``readouts // 2``-th of the train.
        te: echo time (ms).
        flip_deg: readout flip angle.
        readout_tr: time between readout pulses (ms).
        shot_interval: time between inversions (ms).
        readouts: pulses per shot.
        inversion_efficiency: 1 for a perfect adiabatic inversion.

    Raises:
        ValueError: the train does not fit between two inversions.
    """
    centre = readouts // 2
    first = ti - centre * readout_tr
    tail = shot_interval - (first + (readouts - 1) * readout_tr)
    if first <= 0 or tail <= 0:
        raise ValueError(
            f"a train of {readouts} readouts {readout_tr} ms apart centred at TI {ti} ms does not "
            f"fit in a {shot_interval} ms shot"
        )
    a = math.radians(flip_deg)
    cos_a = math.cos(a)
    e_tr = np.exp(-readout_tr / t1)

    def relax(
        ma: NDArray[np.float64], mb: NDArray[np.float64], e: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        return ma * e, mb * e + (1.0 - e)

    # the shot from just before the inversion, as Mz -> ma * Mz + mb
    ma = np.full_like(t1, -inversion_efficiency)
    mb = np.zeros_like(t1)
    ma, mb = relax(ma, mb, np.exp(-first / t1))
    for n in range(readouts):
        ma, mb = ma * cos_a, mb * cos_a
        ma, mb = relax(ma, mb, e_tr if n < readouts - 1 else np.exp(-tail / t1))
    mz = mb / (1.0 - ma)  # steady state before the inversion
    # replay up to the centre pulse
    mz = -inversion_efficiency * mz
    mz = mz * np.exp(-first / t1) + (1.0 - np.exp(-first / t1))
    for _ in range(centre):
        mz = mz * cos_a
        mz = mz * e_tr + (1.0 - e_tr)
    return pd * mz * math.sin(a) * np.exp(-te / t2s)


def spin_echo(
    pd: NDArray[np.float64],
    t1: NDArray[np.float64],
    t2: NDArray[np.float64],
    *,
    tr: float,
    te: float,
) -> NDArray[np.float64]:
    """90-180 spin-echo signal ``(N,)``, the refocusing pulse's inversion of Mz included: it inverts
    Mz ``TR - TE/2`` before the next excitation, which makes it :func:`inversion_recovery` with that
    inversion time."""
    return inversion_recovery(pd, t1, t2, tr=tr, te=te, ti=tr - te / 2.0)


def inversion_recovery(
    pd: NDArray[np.float64],
    t1: NDArray[np.float64],
    t2: NDArray[np.float64],
    *,
    tr: float,
    te: float,
    ti: float,
) -> NDArray[np.float64]:
    """Inversion-recovery spin-echo (FLAIR, STIR) signal ``(N,)``, signed."""
    return pd * (1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)


def sequence_signal(profile: ScannerProfile, tissues: Relaxation) -> NDArray[np.float64]:
    """Signed signal ``(N,)`` of each tissue under the profile's sequence and parameters."""
    tr, te = profile.repetition_time, profile.echo_time
    if profile.sequence == "spgr":
        return spgr(tissues.pd, tissues.t1, tissues.t2s, tr=tr, te=te, flip_deg=profile.flip_angle)
    if profile.sequence == "ir_gre":
        assert profile.inversion_time is not None and profile.readout_tr is not None
        assert profile.shot_interval is not None and profile.readouts_per_shot is not None
        return ir_gre(
            tissues.pd,
            tissues.t1,
            tissues.t2s,
            ti=profile.inversion_time,
            te=te,
            flip_deg=profile.flip_angle,
            readout_tr=profile.readout_tr,
            shot_interval=profile.shot_interval,
            readouts=profile.readouts_per_shot,
        )
    if profile.sequence in ("se", "tse"):
        return spin_echo(tissues.pd, tissues.t1, tissues.t2, tr=tr, te=te)
    assert profile.inversion_time is not None
    return inversion_recovery(
        tissues.pd, tissues.t1, tissues.t2, tr=tr, te=te, ti=profile.inversion_time
    )


def sampling_time_s(profile: ScannerProfile) -> float:
    """Seconds of signal sampled per voxel: phase-encoding lines x partitions x averages / bandwidth.

    Partial Fourier and parallel imaging shorten it; :mod:`.kspace` accounts for them where they act
    (fewer k-space samples, the g-factor).
    """
    rows, cols = profile.acquired
    lines = cols if profile.phase_encoding_direction == "ROW" else rows
    partitions = profile.n_slices if profile.acquisition_type == "3D" else 1
    return lines * partitions * profile.averages / profile.pixel_bandwidth


def acquisition_voxel_mm3(profile: ScannerProfile) -> float:
    """Volume of an acquired voxel: field of view / acquisition matrix in-plane, times the slice."""
    rows, cols = profile.matrix
    acq_rows, acq_cols = profile.acquired
    fov_r = rows * profile.pixel_spacing[0]
    fov_c = cols * profile.pixel_spacing[1]
    return (fov_r / acq_rows) * (fov_c / acq_cols) * profile.slice_thickness


def noise_sd(profile: ScannerProfile, physics: PhysicsConfig) -> float:
    """Thermal noise standard deviation (per real/imaginary channel, relative to water's
    magnetisation) of a full, unfiltered acquisition with this profile.

    ``1 / (snr_constant * B0 * voxel_mm3 * sqrt(sampling_time_s))``: SNR proportional to the field,
    the voxel volume and the square root of the sampling time.
    """
    return 1.0 / (
        physics.snr_constant
        * profile.field_strength
        * acquisition_voxel_mm3(profile)
        * math.sqrt(sampling_time_s(profile))
    )
