"""Build the network the ``model`` section names."""

from __future__ import annotations

from typing import Any

from torch import nn

from shiftguard.config.schema import ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate ``cfg.network`` with Hydra.

    Args:
        cfg: the validated ``model`` section.

    Returns:
        A module mapping volumes ``(B, 1, X, Y, Z)`` to logits ``(B, 1)``.

    Raises:
        TypeError: when the target does not build a ``torch.nn.Module``.
    """
    from hydra.utils import instantiate

    model: Any = instantiate(cfg.network, _convert_="all")
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model.network._target_={cfg.network['_target_']!r} built a {type(model).__name__}, "
            "not a torch.nn.Module; point it at a network class or factory"
        )
    return model
