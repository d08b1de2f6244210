"""The smoke test a bundle passes before a site serves it: its own reference series, run here.

The export stage stores in each bundle one validation series on the model's canonical grid
(``smoke/volume.npy``, pixel values only: no DICOM header, no identifier) and the logit the
exported network gave it (the manifest's ``smoke`` section). :func:`smoke_test` runs the site's
preprocessing and ONNX Runtime session on that volume and compares: a bundle whose model does
not load here, computes something else here (another runtime build, a damaged graph) or gives a
value that is not finite fails, and a site never swaps it in.

A bundle exported before bundles carried a reference series is run on a deterministic synthetic
volume of its canonical grid instead, and must give a finite probability: a weaker check, said
so in the result.

>>> SmokeResult(passed=True, detail="ok", logit=0.5, expected=0.5, seconds=0.01).passed
True
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from shiftguard.edge.preprocess import preprocess
from shiftguard.errors import SmokeTestError

if TYPE_CHECKING:
    from shiftguard.edge.predict import Predictor

log = logging.getLogger(__name__)

#: the manifest section and the member that hold a bundle's reference series
SMOKE_SECTION = "smoke"
SMOKE_MEMBER = "smoke/volume.npy"
#: how far the site's logit may be from the export's: ONNX Runtime builds and CPUs differ in
#: their last bits, a different network or preprocessing differs by far more
SMOKE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class SmokeResult:
    """One smoke test: whether it passed, in words, the logit here and the one expected (NaN
    when the bundle records none), and how long it took."""

    passed: bool
    detail: str
    logit: float
    expected: float
    seconds: float


def smoke_volume(volume: np.ndarray) -> bytes:
    """A canonical ``(X, Y, Z)`` volume as the bundle member's bytes (``.npy``, float32)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(volume, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def _reference(predictor: Predictor) -> tuple[np.ndarray, float, str]:
    """The volume to run, the logit expected (NaN: none) and its name."""
    bundle = predictor.bundle
    section = bundle.manifest.get(SMOKE_SECTION)
    if section:
        member = str(section.get("member", SMOKE_MEMBER))
        if member not in bundle.members:
            raise SmokeTestError(
                f"{bundle.path}: the manifest's smoke section names {member}, which the bundle "
                "does not hold; export it again"
            )
        try:
            volume = np.load(io.BytesIO(bundle.members[member]), allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise SmokeTestError(f"{bundle.path}: {member} is not a .npy array ({exc})") from None
        return volume, float(section["logit"]), "the bundle's reference series"
    shape = [int(v) for v in predictor.rules.shape]
    volume = np.random.default_rng(0).gamma(2.0, 100.0, size=shape).astype(np.float32)
    return volume, math.nan, "a synthetic volume (the bundle holds no reference series)"


def smoke_test(predictor: Predictor) -> SmokeResult:
    """Run ``predictor``'s preprocessing and model on its bundle's reference series.

    Never raises for a bundle that fails: the result says why (a bundle that cannot be read at
    all fails in :func:`~shiftguard.edge.bundle.open_bundle` or the :class:`Predictor`).
    """
    began = time.perf_counter()
    expected = math.nan
    try:
        volume, expected, what = _reference(predictor)
        image = preprocess(volume, predictor.bundle.manifest["preprocessing"])
        outputs = dict(
            zip(predictor.model.output_names, predictor.model.logits(image), strict=True)
        )
        first = next(iter(outputs.values()))
        logit = float(np.asarray(outputs.get("logit", first)).reshape(-1)[0])
    except Exception as exc:  # a model that fails to run here, whatever ONNX Runtime raises
        return SmokeResult(
            False, f"the model did not run: {type(exc).__name__}: {exc}", math.nan, expected,
            time.perf_counter() - began,
        )  # fmt: skip
    seconds = time.perf_counter() - began
    if not math.isfinite(logit):
        return SmokeResult(False, f"the logit on {what} is {logit}", logit, expected, seconds)
    if math.isfinite(expected) and abs(logit - expected) > SMOKE_TOLERANCE:
        return SmokeResult(
            False,
            f"the logit on {what} is {logit:.6f} here, {expected:.6f} at export "
            f"(|difference| {abs(logit - expected):.2g} > {SMOKE_TOLERANCE:g})",
            logit, expected, seconds,
        )  # fmt: skip
    return SmokeResult(True, f"passed on {what}: logit {logit:.6f}", logit, expected, seconds)


def require_smoke(predictor: Predictor) -> SmokeResult:
    """:func:`smoke_test`, raising :class:`SmokeTestError` when it fails."""
    result = smoke_test(predictor)
    if not result.passed:
        bundle = predictor.bundle
        raise SmokeTestError(
            f"{bundle.path} ({bundle.name} v{bundle.version}) failed its smoke test: "
            f"{result.detail}; it is not served"
        )
    log.info("bundle %s v%s: smoke test %s", predictor.bundle.name, predictor.bundle.version,
             result.detail)  # fmt: skip
    return result
