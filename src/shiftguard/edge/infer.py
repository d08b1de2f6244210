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

from shiftguard.edge.bundle import Bundle
from shiftguard.edge.preprocess import linear_resize
from shiftguard.errors import BundleError

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
        probability, saliency, _ = self.infer(image, canonical_shape)
        return probability, saliency

    def infer(
        self, image: np.ndarray, canonical_shape: Sequence[int] | None = None
    ) -> tuple[float, np.ndarray | None, np.ndarray | None]:
        """:meth:`predict` plus the penultimate features ``(D,)`` (``None`` when the model has
        no ``embedding`` output). Outputs are found by name; a model with unnamed outputs has
        the logit first and the activation map second."""
        values = self.logits(image)
        outputs = dict(zip(self.output_names, values, strict=True))
        if "logit" in outputs:
            logit, saliency = outputs["logit"], outputs.get("saliency")
            embedding = outputs.get("embedding")
        else:  # an older or foreign model: by position
            logit, saliency = values[0], values[1] if len(values) > 1 else None
            embedding = None
        probability = float(sigmoid(logit.reshape(-1)[0].astype(np.float64)))
        if saliency is not None:
            saliency = saliency[0, 0].astype(np.float32)
            if canonical_shape is not None:
                saliency = linear_resize(saliency, canonical_shape)
        if embedding is not None:
            embedding = embedding[0].astype(np.float64)
        return probability, saliency, embedding
