"""Benchmark: the fused scanner simulation (:func:`shiftguard.augment.fast.apply_fast`) against the
plain TorchIO chain (:func:`shiftguard.augment.reference.apply_reference`) for the same parameters.

Builds one ``1 x N^3`` volume (the MNI152 T1 template shipped with nilearn, resampled to ``--size``
voxels per side over its field of view), draws one representative :class:`SimParams` with every
transform active (motion with 2 movements, ghosting, 2 spikes, blur, anisotropy, an order-3 bias
field, Rician noise, gamma, scale; see :func:`representative_params`), and times, side by side, each
transform alone and the whole chain: the best of ``--repeats`` runs after one warm-up, on
``--threads`` CPU threads (default 2), and, when CUDA is available, the fast path on the GPU too
(synchronised). It prints a table of milliseconds and ratios, and the largest and mean absolute
difference between the two outputs (relative to the reference's intensity range) so a reader sees
they agree. Nothing here is asserted; it prints figures.

Usage::

    python benchmarks/augment_vs_torchio.py                    # 128^3, 2 threads, 5 repeats
    python benchmarks/augment_vs_torchio.py --threads 4 --size 96 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from collections.abc import Callable
from dataclasses import fields, replace

import numpy as np
import torch

from shiftguard.augment.fast import apply_fast
from shiftguard.augment.params import (
    ORDER,
    Anisotropy,
    BiasField,
    Blur,
    Ghosting,
    Motion,
    Noise,
    SimParams,
    Spike,
)
from shiftguard.augment.reference import apply_reference
from shiftguard.cohort.template import TEMPLATE_FILES, template_dir

Spacing = tuple[float, float, float]


def mni_volume(size: int) -> tuple[torch.Tensor, Spacing]:
    """The MNI152 T1 template, ``(1, size, size, size)`` float32 over its full field of view.

    Returns:
        The volume and its voxel size in mm ``(X, Y, Z)`` (the template's 1 mm grid stretched).
    """
    import nibabel as nib

    img = nib.Nifti1Image.from_filename(template_dir() / TEMPLATE_FILES["t1"])
    data = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))
    volume = torch.nn.functional.interpolate(data[None, None], size=(size,) * 3, mode="area")[0]
    spacing = tuple(float(n) / size for n in data.shape)
    return volume.contiguous(), (spacing[0], spacing[1], spacing[2])


def representative_params(shape: tuple[int, int, int], seed: int = 0) -> SimParams:
    """Every transform active, at strengths like the scanner profiles' highest severity."""
    rng = np.random.default_rng(seed)

    def triples(low: float, high: float, count: int) -> tuple[tuple[float, float, float], ...]:
        return tuple(
            (float(a), float(b), float(c)) for a, b, c in rng.uniform(low, high, (count, 3))
        )

    size = np.asarray(shape)
    positions: list[tuple[float, float, float]] = []
    while len(positions) < 2:  # away from the spectrum's centre, as profiles.draw does
        p = rng.random(3)
        if not np.array_equal(np.floor(p * size).astype(int), size // 2):
            positions.append((float(p[0]), float(p[1]), float(p[2])))
    return SimParams(
        motion=Motion(
            degrees=triples(-5, 5, 2),
            translation=triples(-5, 5, 2),
            times=(1 / 3 + float(rng.uniform(-0.1, 0.1)), 2 / 3 + float(rng.uniform(-0.1, 0.1))),
        ),
        ghosting=Ghosting(
            num_ghosts=5, axis=1, intensity=float(rng.uniform(0.3, 0.7)), restore=0.02
        ),
        spike=Spike(positions=tuple(positions), intensity=float(rng.uniform(0.5, 1.5))),
        blur=Blur(std_mm=(float(rng.uniform(0.5, 1.5)), float(rng.uniform(0.5, 1.5)), 1.0)),
        anisotropy=Anisotropy(axis=2, downsampling=float(rng.uniform(2.0, 4.0))),
        bias_field=BiasField(coefficients=tuple(rng.uniform(-0.4, 0.4, 20).tolist()), order=3),
        noise=Noise(std=0.06, seed=int(rng.integers(2**31)), rician=True),
        gamma=math.exp(float(rng.uniform(-0.3, 0.3))),
        scale=math.exp(float(rng.uniform(-0.5, 0.5))),
    )


def only(params: SimParams, name: str) -> SimParams:
    """``params`` with every transform but ``name`` switched off."""
    return replace(SimParams(), **{name: getattr(params, name)})


def best_ms(run: Callable[[], torch.Tensor], repeats: int, cuda: bool = False) -> float:
    """Best wall time of ``repeats`` runs after one warm-up, in ms."""
    run()
    best = math.inf
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="voxels per side (default 128)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs, best kept")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn parameters")
    parser.add_argument("--no-cuda", action="store_true", help="skip the GPU column")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    volume, spacing = mni_volume(args.size)
    params = representative_params((args.size,) * 3, args.seed)
    cuda = torch.cuda.is_available() and not args.no_cuda
    gpu_volume = volume.cuda() if cuda else None

    print(
        f"volume 1x{args.size}^3 (MNI152 T1), spacing {tuple(round(s, 3) for s in spacing)} mm; "
        f"torch {torch.__version__}, {args.threads} CPU threads, {platform.processor() or platform.machine()}"
        + (f", GPU {torch.cuda.get_device_name()}" if cuda else ", no GPU")
    )
    print(f"params: {params}")
    header = f"{'transform':<12}{'torchio ms':>12}{'fast ms':>10}{'ratio':>8}{'max|d|':>10}{'mean|d|':>10}"
    if cuda:
        header += f"{'cuda ms':>10}{'ratio':>9}"
    print(header)
    print("-" * len(header))
    names = [f.name for f in fields(SimParams)]
    assert tuple(names) == ORDER
    for name in [*ORDER, "all"]:
        p = params if name == "all" else only(params, name)
        reference = apply_reference(volume, p, spacing)
        fast = apply_fast(volume, p, spacing)
        span = float(reference.max() - reference.min()) or 1.0
        diff = (fast - reference).abs()
        t_ref = best_ms(lambda p=p: apply_reference(volume, p, spacing), args.repeats)
        t_fast = best_ms(lambda p=p: apply_fast(volume, p, spacing), args.repeats)
        row = (
            f"{name:<12}{t_ref:>12.1f}{t_fast:>10.1f}{t_ref / t_fast:>7.1f}x"
            f"{float(diff.max()) / span:>10.1e}{float(diff.mean()) / span:>10.1e}"
        )
        if cuda:
            t_gpu = best_ms(lambda p=p: apply_fast(gpu_volume, p, spacing), args.repeats, cuda=True)
            row += f"{t_gpu:>10.2f}{t_ref / t_gpu:>8.0f}x"
        print(row)
    print(
        "ratio: torchio / fast. max|d|, mean|d|: absolute difference of the outputs over the "
        "reference's intensity range (the noise field is the same on CPU: same generator calls)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
