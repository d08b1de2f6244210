"""Pin the CPU kernels that numpy, scipy and torch choose when they load, so results do not depend on
the host's instruction set.

OpenBLAS (numpy's and scipy's matrix products), PyTorch's ATen and oneDNN (convolutions) and MKL each
pick kernels for the CPU they load on; AVX-512 and AVX2 kernels sum in another order, so the float
rounding differs. The same ingest of the same DICOM bytes gave other bytes for 147 of 240 volumes on
an AVX-512 host than on an AVX2 one, and from there another trained network. Pinned to the AVX2 level,
which x86-64 CPUs have had since 2013-2015, ingest and the scanner simulation give the same bytes on
hosts of either kind. Training does not: oneDNN's convolutions still round differently from host to
host (README, Reproducibility, says by how much).

Only on x86-64 with AVX2 and FMA, only variables the user has not set, and only before numpy or torch
loads: the package sets them on its first import, and every stage script imports it first. Worker
processes inherit them. ``SHIFTGUARD_NATIVE_KERNELS=1`` lets each library pick for itself (faster on
some hosts; results then depend on the host).
"""

from __future__ import annotations

import os
import platform
from collections.abc import MutableMapping
from pathlib import Path

# variable -> value: each library's documented switch. OpenBLAS, ATen and oneDNN at their AVX2
# (Haswell) level; MKL (torch's matrix products and FFTs) in its conditional-numerical-reproducibility
# branch COMPATIBLE, one SSE2 code path and the only fixed branch MKL runs on non-Intel CPUs (with
# its AVX2 branch the augment stage's bytes differed from those made on another host; with
# COMPATIBLE they matched).
PINNED = {
    "OPENBLAS_CORETYPE": "Haswell",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "COMPATIBLE",
}
OPT_OUT = "SHIFTGUARD_NATIVE_KERNELS"


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The first processor's feature flags (empty where ``cpuinfo`` cannot be read)."""
    try:
        with Path(cpuinfo).open(encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def pin(
    environ: MutableMapping[str, str] | None = None,
    *,
    machine: str | None = None,
    flags: frozenset[str] | None = None,
) -> dict[str, str]:
    """Set the :data:`PINNED` variables that ``environ`` lacks; return those set.

    Nothing is set off x86-64, on a CPU without AVX2 and FMA (the pinned kernels would not run),
    or when ``SHIFTGUARD_NATIVE_KERNELS`` is set to anything but ``0`` or empty.

    >>> pin({}, machine="x86_64", flags=frozenset({"avx2", "fma"}))["OPENBLAS_CORETYPE"]
    'Haswell'
    >>> pin({"SHIFTGUARD_NATIVE_KERNELS": "1"}, machine="x86_64", flags=frozenset({"avx2", "fma"}))
    {}
    >>> pin({}, machine="aarch64", flags=frozenset())
    {}
    """
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "") not in ("", "0"):
        return {}
    added = {name: value for name, value in PINNED.items() if name not in env}
    if not added:  # a worker process inherits them: no need to read the CPU's flags again
        return {}
    machine = platform.machine() if machine is None else machine
    if machine.lower() not in ("x86_64", "amd64"):
        return {}
    flags = cpu_flags() if flags is None else flags
    if not {"avx2", "fma"} <= flags:
        return {}
    env.update(added)
    return added
