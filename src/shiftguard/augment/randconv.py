"""Random convolutions (Xu et al., ICLR 2021): a contrast- and texture-randomising augmentation for
the intensity arm of the augmentation experiment.

Each call draws a small 3D kernel with Gaussian weights (He-scaled), convolves the image with it
(edges replicated), mixes the result with the input (``alpha`` drawn uniformly) and maps it back onto
the input's 1st-99th percentile range, so the network sees the same anatomy under a random local
contrast and texture while the intensity scale it was normalised to stays put. Shapes are preserved;
label and mask keys must not be listed.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

from shiftguard.errors import RandConvInputError


def random_conv(
    image: torch.Tensor, kernel: torch.Tensor, alpha: float, percentiles: tuple[float, float]
) -> torch.Tensor:
    """``image`` ``(C, X, Y, Z)`` convolved channel by channel with ``kernel`` ``(k, k, k)`` (edges
    replicated), mixed as ``alpha * image + (1 - alpha) * conv`` and mapped linearly so that its
    ``percentiles`` land on the input's.

    >>> x = torch.arange(27.0).reshape(1, 3, 3, 3)
    >>> identity = torch.zeros(3, 3, 3); identity[1, 1, 1] = 1.0
    >>> torch.allclose(random_conv(x, identity, 0.0, (1.0, 99.0)), x)
    True
    """
    if image.ndim != 4:
        raise RandConvInputError(f"image must be (C, X, Y, Z), got shape {tuple(image.shape)}")
    k = kernel.shape[-1]
    if kernel.ndim != 3 or set(kernel.shape) != {k} or k % 2 == 0:
        raise RandConvInputError(f"kernel must be (k, k, k) with k odd, got {tuple(kernel.shape)}")
    x = image.float()
    pad = (k // 2,) * 6
    padded = F.pad(x[:, None], pad, mode="replicate")  # (C, 1, X+k-1, Y+k-1, Z+k-1)
    conv = F.conv3d(padded, kernel.to(x)[None, None])[:, 0]
    mixed = alpha * x + (1.0 - alpha) * conv
    q = torch.tensor(
        [percentiles[0] / 100.0, percentiles[1] / 100.0], dtype=x.dtype, device=x.device
    )
    out = torch.empty_like(x)
    for c in range(x.shape[0]):
        lo_in, hi_in = torch.quantile(x[c].flatten(), q)
        lo, hi = torch.quantile(mixed[c].flatten(), q)
        scale = (
            (hi_in - lo_in) / (hi - lo)
            if hi > lo
            else torch.zeros((), dtype=x.dtype, device=x.device)
        )
        out[c] = (mixed[c] - lo) * scale + lo_in
    return out.to(image.dtype)


class RandConvd(RandomizableTransform, MapTransform):
    """With probability ``prob``, one random convolution per call, the same for every key.

    Args:
        keys: image keys (not labels or masks).
        prob: chance per call.
        kernel_sizes: odd kernel sizes to draw from (uniformly); 1 only rescales.
        alpha_range: ``(low, high)`` of the input's share in the mix, within [0, 1].
        percentiles: the range mapped back onto the input's.
        allow_missing_keys: do not fail on a missing key.

    Every random number comes from ``self.R``; a call draws the same amount whether it applies or
    not (so later transforms see the same stream).
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        kernel_sizes: Sequence[int] = (1, 3, 5),
        alpha_range: tuple[float, float] = (0.0, 1.0),
        percentiles: tuple[float, float] = (1.0, 99.0),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        sizes = tuple(int(k) for k in kernel_sizes)
        if not sizes or any(k < 1 or k % 2 == 0 for k in sizes):
            raise RandConvInputError(f"kernel_sizes must be odd and positive, got {kernel_sizes}")
        lo, hi = alpha_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise RandConvInputError(
                f"alpha_range must satisfy 0 <= low <= high <= 1, got {alpha_range}"
            )
        self.kernel_sizes, self.alpha_range, self.percentiles = sizes, (lo, hi), percentiles
        self._kernel: torch.Tensor | None = None
        self._alpha = 1.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        k = self.kernel_sizes[int(self.R.randint(len(self.kernel_sizes)))]
        k_max = max(self.kernel_sizes)
        # always draw the largest kernel's worth, so the stream does not depend on the size drawn
        weights = self.R.normal(0.0, 1.0, size=k_max**3)[: k**3].reshape(k, k, k)
        self._kernel = torch.from_numpy(weights / np.sqrt(k**3)).float()
        self._alpha = float(self.R.uniform(*self.alpha_range))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform or self._kernel is None:
            return d
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            d[key] = random_conv(image, self._kernel, self._alpha, self.percentiles)
        return d
