"""The fast path against the TorchIO reference chain, transform by transform and as a whole.

On the MNI152 T1 template resampled to a small, non-cubic grid (so an axis mix-up shows), every
deterministic transform must match :func:`apply_reference` to float32 rounding: largest absolute
difference at most ``1e-4`` of the reference's intensity range (measured: about ``1e-6``) and
correlation at least ``0.99999``. The fast path reproduces TorchIO's conventions exactly (motion's
rotation centre and k-space segments, ghosting's restored centre, sequential spike amplitudes,
``Resample``'s slice positions, scipy's Gaussian kernel), so there is no approximation to budget for;
the margin only covers FFT and summation order. Noise is checked twice: with the reference's seed on
CPU the field is the same (same generator calls), and with another seed the distributions must agree
(mean and std of the added noise within 2 %, two-sample KS statistic below 0.02 on ~90k voxels; the
KS critical value at 1 % is about 0.008 there).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
import torchio as tio
from scipy import stats

from shiftguard.augment import fast
from shiftguard.augment.fast import FastScannerSim, SimInputError, apply_fast
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

SHAPE = (48, 52, 44)
MAX_ERROR = 1e-4  # of the reference's intensity range
MIN_CORRELATION = 0.99999


@pytest.fixture(scope="module")
def brain() -> tuple[torch.Tensor, tuple[float, float, float]]:
    """``(1, 48, 52, 44)`` MNI152 T1 over its full field of view, and its voxel size (~4 mm)."""
    import nibabel as nib

    img = nib.Nifti1Image.from_filename(template_dir() / TEMPLATE_FILES["t1"])
    data = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))
    volume = torch.nn.functional.interpolate(data[None, None], size=SHAPE, mode="area")[0]
    a, b, c = (float(n) / s for n, s in zip(data.shape, SHAPE, strict=True))
    return volume.contiguous(), (a, b, c)


def _bias(order: int, seed: int = 0) -> BiasField:
    count = (order + 1) * (order + 2) * (order + 3) // 6
    return BiasField(tuple(np.random.default_rng(seed).uniform(-0.4, 0.4, count).tolist()), order)


MOTION = Motion(
    degrees=((3.0, -4.0, 5.0), (-2.0, 6.0, 1.0)),
    translation=((2.0, -3.0, 4.0), (-5.0, 1.0, 2.0)),
    times=(0.3, 0.62),
)
FULL = SimParams(
    motion=MOTION,
    ghosting=Ghosting(num_ghosts=4, axis=1, intensity=0.5, restore=0.02),
    spike=Spike(positions=((0.1, 0.7, 0.3), (0.6, 0.2, 0.9)), intensity=0.8),
    blur=Blur(std_mm=(3.0, 2.0, 4.0)),
    anisotropy=Anisotropy(axis=2, downsampling=2.5),
    bias_field=_bias(3),
    noise=Noise(std=0.05, seed=11, rician=True),
    gamma=0.8,
    scale=1.4,
)

DETERMINISTIC = {
    "motion": SimParams(motion=MOTION),
    "motion_one_late": SimParams(
        motion=Motion(degrees=((0.0, 0.0, 8.0),), translation=((6.0, 0.0, -3.0),), times=(0.7,))
    ),
    "motion_three": SimParams(
        motion=Motion(
            degrees=((1.0, 2.0, 3.0), (-4.0, 0.0, 2.0), (5.0, -5.0, 0.0)),
            translation=((1.0, 0.0, 0.0), (0.0, -4.0, 2.0), (3.0, 3.0, 3.0)),
            times=(0.2, 0.45, 0.8),
        )
    ),
    "ghosting_x": SimParams(ghosting=Ghosting(4, 0, 0.6, 0.02)),
    "ghosting_y": SimParams(ghosting=Ghosting(3, 1, 1.0, 0.1)),
    "ghosting_z": SimParams(ghosting=Ghosting(5, 2, 0.5, 0.0)),
    "spike": SimParams(spike=Spike(((0.1, 0.7, 0.3),), 0.8)),
    # three spikes, one on the spectrum's centre, large: later spikes see the raised maximum
    "spikes": SimParams(spike=Spike(((0.1, 0.7, 0.3), (0.5, 0.5, 0.5), (0.6, 0.2, 0.9)), 2.0)),
    "blur": SimParams(blur=Blur((3.0, 5.0, 0.0))),
    "blur_wide": SimParams(blur=Blur((12.0, 1.0, 9.0))),  # > 17 taps: the FFT branch
    "anisotropy_x": SimParams(anisotropy=Anisotropy(0, 2.0)),
    "anisotropy_y": SimParams(anisotropy=Anisotropy(1, 4.7)),
    "anisotropy_z": SimParams(anisotropy=Anisotropy(2, 3.0)),
    "bias_field": SimParams(bias_field=_bias(3)),
    "bias_field_order_4": SimParams(bias_field=_bias(4, seed=1)),
    "gamma": SimParams(gamma=0.7),
    "gamma_scale": SimParams(gamma=1.3, scale=0.6),
    "scale": SimParams(scale=1.7),
    "kspace_together": SimParams(motion=MOTION, ghosting=FULL.ghosting, spike=FULL.spike),
}


def assert_matches(fast_out: torch.Tensor, reference: torch.Tensor) -> None:
    assert fast_out.shape == reference.shape
    assert fast_out.dtype == torch.float32
    span = float(reference.max() - reference.min())
    error = float((fast_out - reference).abs().max()) / span
    assert error <= MAX_ERROR, f"largest difference {error:.2e} of the range"
    a, b = fast_out.double().flatten(), reference.double().flatten()
    correlation = float(torch.corrcoef(torch.stack((a, b)))[0, 1])
    assert correlation >= MIN_CORRELATION


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_each_deterministic_transform_matches_the_reference(
    brain: tuple[torch.Tensor, tuple[float, float, float]], name: str
) -> None:
    volume, spacing = brain
    params = DETERMINISTIC[name]
    assert_matches(apply_fast(volume, params, spacing), apply_reference(volume, params, spacing))


def test_motion_matches_with_the_torch_resampler_used_off_the_cpu(
    brain: tuple[torch.Tensor, tuple[float, float, float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU code path (trilinear gathers in torch), run on the CPU, on two channels."""
    volume, spacing = brain
    two = torch.cat((volume, 0.5 * volume.flip(2) - 3.0))
    monkeypatch.setattr(fast, "_RESAMPLER", "torch")
    params = DETERMINISTIC["motion_three"]
    assert_matches(apply_fast(two, params, spacing), apply_reference(two, params, spacing))


@pytest.mark.parametrize("rician", [False, True])
def test_noise_is_the_reference_field_on_cpu(
    brain: tuple[torch.Tensor, tuple[float, float, float]], rician: bool
) -> None:
    volume, spacing = brain
    params = SimParams(noise=Noise(std=0.05, seed=3, rician=rician))
    assert_matches(apply_fast(volume, params, spacing), apply_reference(volume, params, spacing))


def _assert_same_distribution(a: torch.Tensor, b: torch.Tensor, added_to: torch.Tensor) -> None:
    """``a`` and ``b``: two draws of the same noisy image; compares what noise added and the
    voxel distributions."""
    da, db = (a - added_to).double(), (b - added_to).double()
    assert not torch.allclose(a, b)  # really two different fields
    assert abs(float(da.mean()) - float(db.mean())) <= 0.02 * float(db.std())
    assert float(da.std()) == pytest.approx(float(db.std()), rel=0.02)
    assert stats.ks_2samp(da.flatten().numpy(), db.flatten().numpy()).statistic < 0.02
    assert stats.ks_2samp(a.flatten().numpy(), b.flatten().numpy()).statistic < 0.02
    levels = torch.tensor([0.01, 0.25, 0.5, 0.75, 0.99], dtype=torch.float64)
    span = float(b.max() - b.min())
    qa, qb = (torch.quantile(v.double().flatten(), levels) for v in (a, b))
    assert float((qa - qb).abs().max()) <= 0.01 * span


@pytest.mark.parametrize("rician", [False, True])
def test_noise_statistics_match_for_another_seed(
    brain: tuple[torch.Tensor, tuple[float, float, float]], rician: bool
) -> None:
    """What a GPU (another generator) gives: another field of the same distribution."""
    volume, spacing = brain
    ours = apply_fast(volume, SimParams(noise=Noise(0.05, seed=1, rician=rician)), spacing)
    theirs = apply_reference(volume, SimParams(noise=Noise(0.05, seed=2, rician=rician)), spacing)
    _assert_same_distribution(ours, theirs, volume)
    # the std is relative to the input's 99th percentile, computed like the reference
    reference_max = float(
        torch.quantile(volume.flatten()[:: max(1, volume.numel() // 65536)], 0.99)
    )
    assert fast._robust_max(volume) == pytest.approx(reference_max, rel=1e-6)
    if not rician:
        assert float((ours - volume).std()) == pytest.approx(0.05 * reference_max, rel=0.02)


def test_the_whole_chain_matches_the_reference(
    brain: tuple[torch.Tensor, tuple[float, float, float]],
) -> None:
    volume, spacing = brain
    assert_matches(apply_fast(volume, FULL, spacing), apply_reference(volume, FULL, spacing))
    # and, with another noise seed, statistically
    other = dataclasses.replace(FULL, noise=Noise(std=0.05, seed=12, rician=True))
    clean = apply_reference(volume, dataclasses.replace(FULL, noise=None), spacing)
    _assert_same_distribution(
        apply_fast(volume, FULL, spacing), apply_reference(volume, other, spacing), clean
    )


def test_multichannel_input_matches_the_reference(
    brain: tuple[torch.Tensor, tuple[float, float, float]],
) -> None:
    """Two channels of different range: per-channel motion fill and spike maxima, a gamma on the
    maximum over all channels, one noise field over (C, X, Y, Z)."""
    volume, spacing = brain
    two = torch.cat((volume, 0.3 * volume.flip(1) + 5.0))
    assert_matches(apply_fast(two, FULL, spacing), apply_reference(two, FULL, spacing))


def test_all_none_is_the_exact_identity_and_a_copy(
    brain: tuple[torch.Tensor, tuple[float, float, float]],
) -> None:
    volume, spacing = brain
    out = apply_fast(volume, SimParams(), spacing)
    assert out.dtype == torch.float32 and out.shape == volume.shape
    assert torch.equal(out, volume)
    out += 1
    assert not torch.equal(out, volume)  # not aliasing the input


def test_output_shape_dtype_and_input_untouched(
    brain: tuple[torch.Tensor, tuple[float, float, float]],
) -> None:
    volume, spacing = brain
    before = volume.clone()
    out = apply_fast(volume, FULL, spacing)
    assert out.shape == volume.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.isfinite(out).all()
    assert torch.equal(volume, before)


def test_same_params_give_the_same_output(
    brain: tuple[torch.Tensor, tuple[float, float, float]],
) -> None:
    volume, spacing = brain
    assert torch.equal(apply_fast(volume, FULL, spacing), apply_fast(volume, FULL, spacing))
    reseeded = dataclasses.replace(FULL, noise=Noise(std=0.05, seed=99, rician=True))
    assert not torch.equal(apply_fast(volume, FULL, spacing), apply_fast(volume, reseeded, spacing))


def test_float64_numpy_input_gives_the_float32_result(
    brain: tuple[torch.Tensor, tuple[float, float, float]],
) -> None:
    volume, spacing = brain
    out = apply_fast(volume.double().numpy(), FULL, spacing)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert torch.equal(out, apply_fast(volume, FULL, spacing))


def test_torchio_transform_in_a_compose(
    brain: tuple[torch.Tensor, tuple[float, float, float]],
) -> None:
    volume, spacing = brain
    subject = tio.Subject(
        t1=tio.ScalarImage(tensor=volume.clone(), affine=np.diag([*spacing, 1.0])),
        mask=tio.LabelMap(tensor=(volume > 50).to(torch.int16), affine=np.diag([*spacing, 1.0])),
    )
    out = tio.Compose([FastScannerSim(FULL)])(subject)
    assert torch.equal(out["t1"].data, apply_fast(volume, FULL, spacing))
    assert torch.equal(out["mask"].data, (volume > 50).to(torch.int16))  # labels are left alone


@pytest.mark.parametrize(
    ("volume_shape", "spacing", "params", "message"),
    [
        ((48, 52, 44), (1.0, 1.0, 1.0), SimParams(scale=2.0), "(C, X, Y, Z)"),
        ((1, 8, 8, 8), (1.0, 0.0, 1.0), SimParams(scale=2.0), "spacing"),
        ((1, 8, 8, 8), (1.0, 1.0, 1.0), SimParams(spike=Spike(((1.0, 0.2, 0.2),), 1.0)), "[0, 1)"),
        (
            (1, 8, 8, 8),
            (1.0, 1.0, 1.0),
            SimParams(motion=Motion(((1.0, 2.0, 3.0),), (), (0.5,))),
            "per movement",
        ),
        (
            (1, 8, 8, 8),
            (1.0, 1.0, 1.0),
            SimParams(motion=Motion(((0.0,) * 3,) * 2, ((0.0,) * 3,) * 2, (0.6, 0.4))),
            "sorted",
        ),
        ((1, 8, 8, 8), (1.0, 1.0, 1.0), SimParams(bias_field=BiasField((0.1, 0.2), 1)), "needs 4"),
        ((1, 8, 8, 8), (1.0, 1.0, 1.0), SimParams(ghosting=Ghosting(2, 3, 0.5)), "axis"),
        ((1, 8, 8, 8), (1.0, 1.0, 1.0), SimParams(anisotropy=Anisotropy(0, 9.0)), "no slice"),
    ],
)
def test_invalid_input_raises_a_typed_error(
    volume_shape: tuple[int, ...],
    spacing: tuple[float, float, float],
    params: SimParams,
    message: str,
) -> None:
    with pytest.raises(SimInputError, match=re.escape(message)):
        apply_fast(torch.ones(volume_shape), params, spacing)


def test_every_transform_is_covered() -> None:
    covered = {
        f.name
        for params in DETERMINISTIC.values()
        for f in dataclasses.fields(params)
        if getattr(params, f.name) is not None
    }
    assert covered | {"noise"} == set(ORDER)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_the_cpu(brain: tuple[torch.Tensor, tuple[float, float, float]]) -> None:
    volume, spacing = brain
    clean = dataclasses.replace(FULL, noise=None)
    gpu = apply_fast(volume.cuda(), clean, spacing)
    assert gpu.device.type == "cuda"
    assert_matches(gpu.cpu(), apply_fast(volume, clean, spacing))
    noisy = apply_fast(volume.cuda(), FULL, spacing).cpu()
    _assert_same_distribution(
        noisy, apply_reference(volume, FULL, spacing), apply_fast(volume, clean, spacing)
    )
    assert math.isfinite(float(noisy.sum()))


@pytest.mark.parametrize("mode", ["reflect", "nearest"])
@pytest.mark.parametrize("sigma", [0.7, 1.9, 3.4, 9.0])
def test_gaussian_along_is_scipys_filter_in_both_edge_modes(mode: str, sigma: float) -> None:
    """Narrow kernels (direct sum) and wide ones (FFT, radius over 8 and over the signal's
    length) equal ``scipy.ndimage.gaussian_filter1d`` with the same edge mode."""
    from scipy import ndimage

    x = np.random.default_rng(2).gamma(2.0, 50.0, (3, 20, 7)).astype(np.float32)
    x[:, :3] += 400.0  # a bright edge, where the two modes differ
    for dim in range(3):
        expected = ndimage.gaussian_filter1d(x, sigma, axis=dim, mode=mode, truncate=4.0)
        got = fast.gaussian_along(torch.from_numpy(x), dim, sigma, mode=mode).numpy()  # type: ignore[arg-type]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)
