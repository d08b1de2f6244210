from __future__ import annotations

from pathlib import Path

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
