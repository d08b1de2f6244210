"""MONAI transforms that simulate another scanner: an array transform for one drawn acquisition, and
a random dictionary transform that draws a profile, a severity and an acquisition per sample.

Following MONAI's naming, :class:`ScannerSim` applies given :class:`~shiftguard.augment.params.SimParams`
to a ``(C, X, Y, Z)`` array, :class:`ScannerSimd` is its dictionary variant, and :class:`RandScannerSimd`
is the random one. The random transform draws only from its own ``R`` (a
:class:`numpy.random.RandomState` that ``set_random_state``, ``Compose.set_random_state`` and
``monai.utils.set_determinism`` seed), so a seeded pipeline is reproducible::

    from monai.transforms import Compose
    pipeline = Compose([RandScannerSimd.from_config(["image"], cfg, spacing=(2.0, 2.0, 2.0))])
    pipeline.set_random_state(seed=0)
    sample = pipeline({"image": volume, "label": mask})  # the mask is left alone
    sample["scanner_sim"]  # {"applied": True, "profile": "low_field", "severity": 3, "params": "{...}"}

Two implementations apply the parameters: ``backend="fast"`` (:func:`shiftguard.augment.fast.apply_fast`)
and ``backend="torchio"`` (:func:`shiftguard.augment.reference.apply_reference`, plain TorchIO).
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform, Transform
from monai.utils import TransformBackends

from shiftguard.augment.params import SimParams
from shiftguard.augment.profiles import SEVERITY_MAX, draw
from shiftguard.config.schema import AugmentConfig, ScannerSimProfile
from shiftguard.errors import BackendUnavailableError

__all__ = [
    "RECORD_KEY",
    "Backend",
    "BackendUnavailableError",
    "RandScannerSimd",
    "ScannerSim",
    "ScannerSimd",
    "apply_function",
]

Backend = Literal["fast", "torchio"]
Spacing = tuple[float, float, float]
ApplyFunction = Callable[[torch.Tensor, SimParams, Spacing], torch.Tensor]

RECORD_KEY = "scanner_sim"
"""Where :class:`RandScannerSimd` records what it drew in the data dictionary."""

_SEED_BOUND = 2**31


@functools.cache
def apply_function(backend: Backend) -> ApplyFunction:
    """The function that applies :class:`SimParams` for ``backend``, imported on first use.

    Args:
        backend: ``"fast"`` (fused, :mod:`shiftguard.augment.fast`) or ``"torchio"`` (the reference
            TorchIO chain).

    Returns:
        ``apply(volume (C, X, Y, Z), params, spacing) -> (C, X, Y, Z) float32 tensor``.

    Raises:
        BackendUnavailableError: ``"fast"`` when :mod:`shiftguard.augment.fast` or its ``apply_fast``
            is not there (yet).
        ValueError: for any other name.
    """
    if backend == "torchio":
        from shiftguard.augment.reference import apply_reference

        return apply_reference
    if backend == "fast":
        try:
            fast = importlib.import_module("shiftguard.augment.fast")
        except ModuleNotFoundError as exc:
            if exc.name != "shiftguard.augment.fast":
                raise
            raise BackendUnavailableError(
                "scanner simulation backend 'fast' is not available: shiftguard.augment.fast is not "
                "installed in this checkout; use backend='torchio' (augment.backend=torchio)"
            ) from exc
        apply_fast: ApplyFunction | None = getattr(fast, "apply_fast", None)
        if apply_fast is None:
            raise BackendUnavailableError(
                "scanner simulation backend 'fast' is not available: shiftguard.augment.fast has no "
                "apply_fast; use backend='torchio' (augment.backend=torchio)"
            )
        return apply_fast
    raise ValueError(f"backend must be 'fast' or 'torchio', got {backend!r}")


def _check_backend(backend: str) -> Backend:
    if backend not in ("fast", "torchio"):
        raise ValueError(f"backend must be 'fast' or 'torchio', got {backend!r}")
    return backend  # type: ignore[return-value]


def _plain(img: Any) -> torch.Tensor:
    """A plain tensor view of ``img`` (numpy array, tensor or MetaTensor)."""
    if isinstance(img, MetaTensor):
        return img.as_tensor()
    if isinstance(img, torch.Tensor):
        return img
    return torch.as_tensor(np.ascontiguousarray(img))


def _as_spacing(value: Any, where: str) -> Spacing:
    flat = np.asarray(
        value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=float
    ).ravel()
    if flat.size != 3 or not np.all(flat > 0):
        raise ValueError(f"{where}: spacing must be 3 positive numbers (mm), got {value!r}")
    return (float(flat[0]), float(flat[1]), float(flat[2]))


def _spacing_of(img: Any, spacing: Sequence[float] | None) -> Spacing:
    if spacing is not None:
        return _as_spacing(spacing, "spacing")
    if isinstance(img, MetaTensor):
        return _as_spacing(img.pixdim, "the image's affine")
    raise ValueError(
        "spacing is unknown: pass spacing=(x, y, z) in mm (or spacing_key), or a MetaTensor image"
    )


class ScannerSim(Transform):
    """Apply one drawn acquisition (:class:`SimParams`) to a ``(C, X, Y, Z)`` volume.

    Deterministic: the same input and parameters give the same output. Identity parameters
    (``SimParams()``) return the input unchanged, as float32.

    Args:
        params: the acquisition to simulate.
        spacing: voxel size in mm ``(X, Y, Z)``; when ``None``, taken from a ``MetaTensor``'s affine.
        backend: ``"fast"`` or ``"torchio"`` (see :func:`apply_function`).

    Example:
        >>> from shiftguard.augment.params import SimParams
        >>> out = ScannerSim(SimParams(scale=2.0), (1.0, 1.0, 1.0), backend="torchio")(
        ...     np.ones((1, 4, 4, 4), dtype=np.float32)
        ... )
        >>> tuple(out.shape), float(out.max())
        ((1, 4, 4, 4), 2.0)
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]  # noqa: RUF012  (MONAI's attribute)

    def __init__(
        self,
        params: SimParams,
        spacing: Sequence[float] | None = None,
        backend: Backend = "fast",
    ) -> None:
        self.params = params
        self.spacing = None if spacing is None else _as_spacing(spacing, "spacing")
        # not `self.backend`: MONAI reads that class attribute as the supported array types
        self.sim_backend = _check_backend(backend)

    def __call__(self, img: Any) -> torch.Tensor:
        """Simulate the acquisition.

        Args:
            img: ``(C, X, Y, Z)`` numpy array, tensor or ``MetaTensor``.

        Returns:
            ``(C, X, Y, Z)`` float32 tensor; a ``MetaTensor`` with the input's metadata when the
            input is one.

        Raises:
            ValueError: when ``img`` is not 4-D or the spacing is unknown.
            BackendUnavailableError: when the backend cannot be imported.
        """
        tensor = _plain(img)
        if tensor.ndim != 4:
            raise ValueError(
                f"ScannerSim expects a (C, X, Y, Z) volume, got shape {tuple(img.shape)}"
            )
        if self.params.is_identity():
            out = tensor.to(torch.float32, copy=True)
        else:
            spacing = _spacing_of(img, self.spacing)
            source = tensor.detach()
            if self.sim_backend == "torchio":
                source = source.cpu()
            out = apply_function(self.sim_backend)(source, self.params, spacing).to(torch.float32)
        if isinstance(img, MetaTensor):
            return MetaTensor(
                out, meta=dict(img.meta), applied_operations=list(img.applied_operations)
            )
        return out


def _spacing_from_data(
    params: SimParams,
    d: Mapping[Any, Any],
    img: Any,
    spacing: Spacing | None,
    spacing_key: str | None,
) -> Spacing | None:
    """The spacing :class:`ScannerSim` needs to apply ``params`` to ``img``, an image of the item
    ``d``: ``spacing``, else ``d[spacing_key]``, else ``img``'s affine; ``None`` (not looked up)
    for identity parameters, which need none."""
    if params.is_identity():
        return None
    if spacing_key is not None:
        if spacing_key not in d:
            raise KeyError(f"spacing_key {spacing_key!r} is not in the data (keys: {list(d)})")
        return _as_spacing(d[spacing_key], f"data[{spacing_key!r}]")
    return _spacing_of(img, spacing)


class ScannerSimd(MapTransform):
    """Dictionary variant of :class:`ScannerSim`: the same acquisition on every key in ``keys``.

    Args:
        keys: the image keys to transform (never list label or mask keys).
        params: the acquisition to simulate.
        spacing: voxel size in mm; or ``spacing_key``, a key of the data holding it; or neither, for
            ``MetaTensor`` images.
        spacing_key: see ``spacing``.
        backend: ``"fast"`` or ``"torchio"``.
        allow_missing_keys: do not fail when a key is missing.
    """

    backend = ScannerSim.backend

    def __init__(
        self,
        keys: KeysCollection,
        params: SimParams,
        spacing: Sequence[float] | None = None,
        spacing_key: str | None = None,
        backend: Backend = "fast",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.params = params
        self.spacing = None if spacing is None else _as_spacing(spacing, "spacing")
        self.spacing_key = spacing_key
        self.sim_backend = _check_backend(backend)

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            spacing = _spacing_from_data(self.params, d, d[key], self.spacing, self.spacing_key)
            d[key] = ScannerSim(self.params, spacing, self.sim_backend)(d[key])
        return d


class RandScannerSimd(RandomizableTransform, MapTransform):
    """Simulate a random scanner per sample: with probability ``prob``, draw a profile (by
    ``weights``), a severity (uniform over the integers of ``severity_range``) and a
    :class:`SimParams` from the profile, and apply it to every key in ``keys``.

    Every random number comes from ``self.R`` (seed it with ``set_random_state`` or through
    ``Compose.set_random_state`` / ``monai.utils.set_determinism``); the parameters are drawn by
    :func:`~shiftguard.augment.profiles.draw` from a ``numpy.random.Generator`` seeded from ``self.R``.
    Each call consumes the same amount of ``self.R`` whether or not it applies the simulation.

    What was drawn is recorded under ``record_key`` (default ``"scanner_sim"``) as
    ``{"applied": bool, "profile": str, "severity": int, "params": str}``, ``params`` being the JSON
    of :meth:`SimParams.to_dict` (profile ``""``, severity 0 and identity parameters when not
    applied): strings, ints and bools, so MONAI's and
    PyTorch's default collation batch it.

    Args:
        keys: the image keys to transform; label and mask keys must not be listed.
        profiles: scanner profiles by name (ranges at severity 4).
        weights: relative sampling weights by profile name; ``None`` or empty: uniform over
            ``profiles``. A profile not listed is never drawn.
        severity_range: ``(min, max)`` severity, each 0 to 4, inclusive.
        prob: chance per call of applying the simulation.
        spacing: voxel size in mm; or ``spacing_key``, a key of the data holding it; or neither,
            for ``MetaTensor`` images.
        spacing_key: see ``spacing``.
        backend: ``"fast"`` or ``"torchio"``.
        record_key: where to record the draw; ``None`` records nothing.
        allow_missing_keys: do not fail when a key is missing.

    Raises:
        ValueError: for an unknown profile in ``weights``, a severity range outside 0..4 or
            reversed, or ``prob > 0`` with nothing to draw.
    """

    backend = ScannerSim.backend

    def __init__(
        self,
        keys: KeysCollection,
        profiles: Mapping[str, ScannerSimProfile],
        weights: Mapping[str, float] | None = None,
        severity_range: tuple[int, int] = (1, SEVERITY_MAX),
        prob: float = 1.0,
        spacing: Sequence[float] | None = None,
        spacing_key: str | None = None,
        backend: Backend = "fast",
        record_key: str | None = RECORD_KEY,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.profiles = dict(profiles)
        chosen = dict(weights) if weights else dict.fromkeys(self.profiles, 1.0)
        unknown = sorted(set(chosen) - set(self.profiles))
        if unknown:
            raise ValueError(
                f"weights name unknown profile(s) {unknown} (known: {sorted(self.profiles)})"
            )
        if any(w < 0 for w in chosen.values()):
            raise ValueError(f"weights must not be negative, got {chosen}")
        self.names = [name for name, w in chosen.items() if w > 0]
        total = sum(chosen[name] for name in self.names)
        self.cumulative: np.ndarray = (
            np.cumsum([chosen[name] / total for name in self.names]) if total else np.zeros(0)
        )
        if self.prob > 0 and not self.names:
            raise ValueError("nothing to draw: no profile with a positive weight and prob > 0")
        lo, hi = severity_range
        if not (0 <= lo <= hi <= SEVERITY_MAX) or int(lo) != lo or int(hi) != hi:
            raise ValueError(
                f"severity_range must be integers 0 <= min <= max <= {SEVERITY_MAX}, "
                f"got {severity_range}"
            )
        self.severity_range = (int(lo), int(hi))
        self.spacing = None if spacing is None else _as_spacing(spacing, "spacing")
        self.spacing_key = spacing_key
        self.sim_backend = _check_backend(backend)
        self.record_key = record_key
        self.profile: str = ""
        self.severity = 0
        self.seed = 0

    @classmethod
    def from_config(
        cls,
        keys: KeysCollection,
        cfg: AugmentConfig,
        spacing: Sequence[float] | None = None,
        spacing_key: str | None = None,
        record_key: str | None = RECORD_KEY,
    ) -> RandScannerSimd:
        """The training-time transform the ``augment`` section describes.

        With ``cfg.enabled`` false it never applies (``prob=0``) but still records
        ``applied: False``, so a pipeline is the same shape with and without augmentation.

        Args:
            keys: the image keys to transform.
            cfg: the validated ``augment`` section.
            spacing: voxel size in mm (e.g. ``ingest.spacing``); see :class:`RandScannerSimd`.
            spacing_key: a data key holding the spacing, instead of ``spacing``.
            record_key: where to record the draw; ``None`` records nothing.
        """
        return cls(
            keys,
            profiles=cfg.profiles,
            weights=cfg.profile_weights or None,
            severity_range=cfg.severity,
            prob=cfg.probability if cfg.enabled else 0.0,
            spacing=spacing,
            spacing_key=spacing_key,
            backend=cfg.backend,
            record_key=record_key,
        )

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandScannerSimd:
        """Seed ``R`` (what ``Compose.set_random_state`` calls); returns this transform."""
        super().set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        """Draw whether to apply, the profile, the severity and the parameters' seed from ``R``."""
        super().randomize(None)
        u = self.R.rand()
        severity = int(self.R.randint(self.severity_range[0], self.severity_range[1] + 1))
        self.seed = int(self.R.randint(_SEED_BOUND))
        if self.names:
            index = int(np.searchsorted(self.cumulative, u, side="right"))
            self.profile = self.names[min(index, len(self.names) - 1)]
            self.severity = severity
        else:
            self.profile, self.severity = "", 0

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        """Draw and apply one simulated acquisition.

        Args:
            data: a sample; every key in ``keys`` is a ``(C, X, Y, Z)`` image of the same shape.

        Returns:
            A new dictionary: ``keys`` transformed (float32 tensors), everything else as it was,
            plus the record under ``record_key``.
        """
        d = dict(data)
        self.randomize(None)
        keys = list(self.key_iterator(d))
        params = SimParams()
        applied = bool(self._do_transform) and bool(keys)
        if applied:
            first = d[keys[0]]
            spatial = tuple(int(n) for n in first.shape[1:])
            rng = np.random.default_rng(self.seed)
            params = draw(self.profiles[self.profile], self.severity, rng, spatial)
            spacing = _spacing_from_data(params, d, first, self.spacing, self.spacing_key)
            simulate = ScannerSim(params, spacing, self.sim_backend)
            for key in keys:
                d[key] = simulate(d[key])
        if self.record_key is not None:
            d[self.record_key] = {
                "applied": applied,
                "profile": self.profile if applied else "",
                "severity": self.severity if applied else 0,
                "params": json.dumps(params.to_dict(), sort_keys=True),
            }
        return d
