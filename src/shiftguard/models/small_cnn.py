"""A compact 3D convolutional classifier that trains on a few CPU cores."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class SmallCNN3d(nn.Module):
    """Conv-BN-ReLU blocks, each halving the grid, then global average and max pooling and a linear head.

    Works on any input grid of at least ``2 ** (len(channels) - 1)`` voxels per axis.

    Args:
        in_channels: channels of the input volume.
        out_channels: outputs per volume (1: one logit).
        channels: channels of each block; every block but the first halves the grid.
        dropout: dropout before the head.
        spatial_dims: must be 3 (kept for MONAI-style configs).
        local_contrast: when above 0, each input channel is joined by its local contrast: the volume
            minus its mean over a ``local_contrast``-voxel cube. A focal lesion stands out in it
            whatever the scanner's overall intensity and bias field, which lets a small network
            learn the finding from a few hundred volumes.
        pooling: how the feature maps become one vector: ``"meanmax"`` (global mean and max,
            concatenated) or ``"max"`` (max only: "is there a lesion anywhere", which leaves the
            network no whole-volume statistic such as head size to lean on).
        lesion_head: add a 1x1x1 convolution mapping the last block's features to a lesion logit
            per position, ``forward(x, lesion_map=True)``. Training supervises it with lesion masks
            (``train.lesion_masks``), which tells the shared features where the finding is; the
            volume's logit, and so inference and the exported bundle, do not use it.

    >>> SmallCNN3d(channels=(4, 8))(torch.zeros(2, 1, 24, 28, 24)).shape
    torch.Size([2, 1])
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (8, 16, 32, 64),
        dropout: float = 0.0,
        spatial_dims: int = 3,
        local_contrast: int = 0,
        pooling: str = "meanmax",
        lesion_head: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"SmallCNN3d: spatial_dims must be 3, got {spatial_dims}")
        if not channels:
            raise ValueError("SmallCNN3d: channels must list at least one block")
        if local_contrast < 0 or (local_contrast and local_contrast % 2 == 0):
            raise ValueError(
                f"SmallCNN3d: local_contrast must be 0 or an odd kernel size, got {local_contrast}"
            )
        if pooling not in ("meanmax", "max"):
            raise ValueError(f"SmallCNN3d: pooling must be 'meanmax' or 'max', got {pooling!r}")
        self.local_contrast = local_contrast
        self.pooling = pooling
        blocks: list[nn.Module] = []
        previous = in_channels * (2 if local_contrast else 1)
        for i, width in enumerate(channels):
            blocks += [
                nn.Conv3d(previous, width, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm3d(width),
                nn.ReLU(inplace=True),
                nn.Conv3d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm3d(width),
                nn.ReLU(inplace=True),
            ]
            previous = width
        self.features = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear((2 if pooling == "meanmax" else 1) * previous, out_channels)
        self.lesion_head = nn.Conv3d(previous, 1, 1) if lesion_head else None

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.local_contrast:
            k = self.local_contrast
            local = F.avg_pool3d(x, k, stride=1, padding=k // 2, count_include_pad=False)
            x = torch.cat([x, x - local], dim=1)
        return self.features(x)  # type: ignore[no-any-return]

    def activation_map(self, x: torch.Tensor) -> torch.Tensor:
        """Class activation map ``(B, 1, x, y, z)`` on the last block's grid: each position's
        feature vector weighted by the head's weights for the first output (mean and max parts
        summed), i.e. how much each region pushes the logit up. The key image overlays it.

        >>> SmallCNN3d(channels=(2, 4))(torch.zeros(1, 1, 8, 8, 8)).shape
        torch.Size([1, 1])
        >>> SmallCNN3d(channels=(2, 4)).activation_map(torch.zeros(1, 1, 8, 8, 8)).shape
        torch.Size([1, 1, 4, 4, 4])
        """
        f = self._features(x)
        w = self.head.weight[0]
        if self.pooling == "meanmax":
            w = w[: f.shape[1]] + w[f.shape[1] :]
        return torch.einsum("bcxyz,c->bxyz", f, w)[:, None]

    def forward(
        self, x: torch.Tensor, lesion_map: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, out_channels)`` for volumes ``(B, in_channels, X, Y, Z)``; with
        ``lesion_map`` (a network built with ``lesion_head``) also the lesion logits
        ``(B, 1, x, y, z)`` on the last block's grid, from the same features.

        >>> net = SmallCNN3d(channels=(2, 4), lesion_head=True)
        >>> [tuple(t.shape) for t in net(torch.zeros(1, 1, 8, 8, 8), lesion_map=True)]
        [(1, 1), (1, 1, 4, 4, 4)]
        """
        f = self._features(x)
        pooled = f.amax(dim=(2, 3, 4))
        if self.pooling == "meanmax":
            pooled = torch.cat([f.mean(dim=(2, 3, 4)), pooled], dim=1)
        out: torch.Tensor = self.head(self.dropout(pooled))
        if not lesion_map:
            return out
        if self.lesion_head is None:
            raise ValueError("SmallCNN3d: lesion_map=True needs a network built with lesion_head")
        return out, self.lesion_head(f)
