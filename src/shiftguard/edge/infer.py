"""Inference with ONNX Runtime: the bundle's model, on the best execution provider present.

TensorRT, then CUDA, then the CPU: whichever of these the installed ``onnxruntime`` build offers
(``onnxruntime-gpu`` brings the first two). The model's first output is the logit; a second output,
when the export gave one, is a class-activation map the key image overlays.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from shiftguard.edge.bundle import Bundle, BundleError

log = logging.getLogger(__name__)

PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)


def choose_providers(available: Sequence[str], asked: Sequence[str] | None = None) -> list[str]:
    """The providers to use, best first; ``asked`` narrows them (unknown names are an error).

    >>> choose_providers(["CPUExecutionProvider", "CUDAExecutionProvider"])
    ['CUDAExecutionProvider', 'CPUExecutionProvider']
    """
    if asked:
        missing = [p for p in asked if p not in available]
        if missing:
            raise ValueError(
                f"execution provider(s) {', '.join(missing)} not available in this onnxruntime "
                f"build (available: {', '.join(available)})"
            )
        return list(asked)
    return [p for p in PREFERRED_PROVIDERS if p in available] or list(available)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class Model:
    """An ONNX Runtime session over the bundle's ONNX model."""

    def __init__(
        self, bundle: Bundle, providers: Sequence[str] | None = None, threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.providers = choose_providers(ort.get_available_providers(), providers)
        try:
            self.session = ort.InferenceSession(
                bundle.model("onnx"), sess_options=options, providers=self.providers
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"{bundle.path}: the ONNX model does not load ({exc})") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        log.debug("ONNX Runtime providers: %s", self.session.get_providers())

    def logits(self, image: np.ndarray) -> list[np.ndarray]:
        """Every output of the model for a ``(B, 1, X, Y, Z)`` float32 batch."""
        outputs: list[Any] = self.session.run(
            None, {self.input_name: np.ascontiguousarray(image, dtype=np.float32)}
        )
        return [np.asarray(o) for o in outputs]

    def predict(
        self, image: np.ndarray, canonical_shape: Sequence[int] | None = None
    ) -> tuple[float, np.ndarray | None]:
        """The finding probability for one ``(1, 1, X, Y, Z)`` input, and its activation map
        (``None`` when the model has no such output): on the network's last grid, or resampled to
        ``canonical_shape`` when given (the key image needs one slice of it, and resamples that
        slice alone)."""
        outputs = self.logits(image)
        probability = float(sigmoid(outputs[0].reshape(-1)[0].astype(np.float64)))
        saliency = None
        if len(outputs) > 1:
            saliency = outputs[1][0, 0].astype(np.float32)
            if canonical_shape is not None:
                from shiftguard.edge.preprocess import linear_resize

                saliency = linear_resize(saliency, canonical_shape)
        return probability, saliency
