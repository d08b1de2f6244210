from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shiftguard.config import ConfigError, compose_section
from shiftguard.config.schema import ModelConfig
from shiftguard.models import SmallCNN3d, build_model


@pytest.mark.parametrize(
    "option",
    sorted(p.stem for p in (Path(__file__).resolve().parents[3] / "conf/model").glob("*.yaml")),
)
def test_every_model_option_gives_one_logit_per_volume(conf_dir: Path, option: str) -> None:
    cfg = compose_section("model", ModelConfig, [f"model={option}"], conf_dir)
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 24, 28, 24))
    assert out.shape == (2, 1)
    assert torch.isfinite(out).all()


def test_a_network_without_target_fails_at_load_time_naming_the_key(conf_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.network"):
        compose_section("model", ModelConfig, ["~model.network._target_"], conf_dir)


def test_a_target_that_is_not_a_module_is_refused() -> None:
    with pytest.raises(TypeError, match=r"not a torch\.nn\.Module"):
        build_model(ModelConfig(network={"_target_": "builtins.dict"}))


def test_small_cnn_gradients_reach_the_first_layer() -> None:
    model = SmallCNN3d(channels=(4, 8, 16))
    model(torch.randn(2, 1, 16, 16, 16)).sum().backward()
    first = model.features[0].weight.grad
    assert first is not None and first.abs().sum() > 0
    with pytest.raises(ValueError, match="spatial_dims"):
        SmallCNN3d(spatial_dims=2)


def test_local_contrast_channel_sees_a_focal_spot_and_not_a_global_offset() -> None:
    import torch
    from torch.nn import functional as F

    net = SmallCNN3d(channels=(4, 8), local_contrast=5)
    assert net.features[0].in_channels == 2
    base = torch.rand(1, 1, 20, 24, 20)
    captured: list[torch.Tensor] = []
    net.features[0].register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    net(base)
    net(base + 100.0)  # a scanner-wide intensity offset
    spot = base.clone()
    spot[0, 0, 10, 12, 10] += 5.0
    net(spot)
    plain, offset, focal = captured
    torch.testing.assert_close(plain[:, 1], offset[:, 1], atol=1e-3, rtol=0)
    assert (focal[:, 1] - plain[:, 1]).abs().amax() > 4.0
    local = F.avg_pool3d(base, 5, stride=1, padding=2, count_include_pad=False)
    torch.testing.assert_close(plain[:, 1:], base - local)
    with pytest.raises(ValueError, match="odd kernel"):
        SmallCNN3d(local_contrast=4)


def test_max_pooling_ignores_how_much_of_the_volume_a_pattern_covers() -> None:
    """With ``pooling="max"`` a spot answers the same whether the rest of the volume is empty or
    also holds it elsewhere: no whole-volume statistic reaches the head. Mean+max pooling differs."""
    torch.manual_seed(0)
    one = torch.zeros(1, 1, 28, 28, 28)
    one[..., 6:9, 6:9, 6:9] = 1.0
    many = one.clone()
    many[..., 16:19, 16:19, 16:19] = 1.0  # same stride phase, away from the padded border
    for pooling, same in (("max", True), ("meanmax", False)):
        torch.manual_seed(0)
        net = SmallCNN3d(channels=(4, 8), pooling=pooling).eval()
        with torch.no_grad():
            assert torch.allclose(net(one), net(many), atol=1e-6) is same, pooling
    with pytest.raises(ValueError, match="pooling must be"):
        SmallCNN3d(pooling="sum")


def test_activation_map_peaks_where_the_logit_comes_from() -> None:
    torch.manual_seed(0)
    net = SmallCNN3d(channels=(4, 8), pooling="max").eval()
    x = torch.zeros(1, 1, 16, 16, 16)
    x[..., 10:14, 2:6, 8:12] = 3.0
    with torch.no_grad():
        cam = net.activation_map(x)[0, 0]
        features = net._features(x)
        # the head on max pooling reads each channel at its maximum: the map summed over channels
        # at those positions reproduces the logit's weighted sum
        w = net.head.weight[0]
        logit = (features.amax(dim=(2, 3, 4))[0] * w).sum() + net.head.bias[0]
        assert torch.allclose(net(x)[0, 0], logit, atol=1e-5)
    assert cam.shape == (8, 8, 8)
    peak = np.unravel_index(int(cam.argmax()), cam.shape)
    assert 4 <= peak[0] <= 7 and peak[1] <= 3  # on the bright block (grid halved once)
