"""Random convolutions: contrast and texture change, the intensity scale and the anatomy stay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shiftguard.augment.randconv import RandConvd, RandConvInputError, random_conv


def phantom(seed: int = 0) -> torch.Tensor:
    """A smooth head-like volume with a bright blob, ``(1, 20, 24, 20)``."""
    g = torch.Generator().manual_seed(seed)
    x, y, z = torch.meshgrid(
        torch.linspace(-1, 1, 20),
        torch.linspace(-1, 1, 24),
        torch.linspace(-1, 1, 20),
        indexing="ij",
    )
    head = (x**2 + y**2 + z**2 < 0.8).float() * 100.0
    blob = ((x - 0.3) ** 2 + y**2 + z**2 < 0.05).float() * 60.0
    return (head + blob + torch.rand(20, 24, 20, generator=g) * 5.0)[None]


def apply(seed: int, prob: float = 1.0, **kwargs: object) -> tuple[torch.Tensor, RandConvd]:
    t = RandConvd(["image"], prob=prob, **kwargs)  # type: ignore[arg-type]
    t.set_random_state(seed)
    return t({"image": phantom(), "mask": torch.ones(1, 20, 24, 20)})["image"], t


def test_same_seed_same_output_and_another_seed_another() -> None:
    a, _ = apply(3)
    b, _ = apply(3)
    c, _ = apply(4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == phantom().shape and a.dtype == torch.float32


def test_the_input_percentile_range_is_kept() -> None:
    x = phantom()
    for seed in range(5):
        out, _ = apply(seed)
        q = torch.tensor([0.01, 0.99])
        assert torch.allclose(
            torch.quantile(out.flatten(), q), torch.quantile(x.flatten(), q), atol=1e-3
        )


def test_a_one_voxel_kernel_only_rescales_and_a_larger_one_changes_texture() -> None:
    x = phantom()
    one = torch.full((1, 1, 1), 2.0)
    rescaled = random_conv(x, one, 0.0, (1.0, 99.0))
    assert torch.allclose(rescaled, x, atol=1e-3)  # a positive scale maps back onto the input
    kernel = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 3, 3)) / np.sqrt(27)).float()
    textured = random_conv(x, kernel, 0.0, (1.0, 99.0))
    r = np.corrcoef(textured.flatten().numpy(), x.flatten().numpy())[0, 1]
    assert abs(r) < 0.99  # not an affine function of the input


def test_alpha_one_returns_the_input() -> None:
    out, t = apply(1, alpha_range=(1.0, 1.0))
    assert t._alpha == 1.0
    assert torch.allclose(out, phantom(), atol=1e-3)


def test_the_random_stream_does_not_depend_on_whether_it_applied() -> None:
    _, applied = apply(5, prob=1.0)
    _, skipped = apply(5, prob=0.0)
    assert applied.R.uniform() == skipped.R.uniform()
    out, _ = apply(5, prob=0.0)
    assert torch.equal(out, phantom())


def test_masks_are_left_alone() -> None:
    t = RandConvd(["image"], prob=1.0)
    t.set_random_state(0)
    mask = torch.ones(1, 20, 24, 20)
    assert torch.equal(t({"image": phantom(), "mask": mask})["mask"], mask)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernel_sizes": (2,)}, "odd"),
        ({"kernel_sizes": ()}, "odd"),
        ({"alpha_range": (0.8, 0.2)}, "alpha_range"),
        ({"alpha_range": (0.0, 1.5)}, "alpha_range"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(RandConvInputError, match=message):
        RandConvd(["image"], **kwargs)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(RandConvInputError, match="C, X, Y, Z"):
        random_conv(torch.zeros(20, 24, 20), torch.ones(1, 1, 1), 0.5, (1.0, 99.0))
    with pytest.raises(RandConvInputError, match="k odd"):
        random_conv(phantom(), torch.ones(2, 2, 2), 0.5, (1.0, 99.0))
