"""The GPU path of the edge runner: ONNX Runtime's CUDA (and, when present, TensorRT) execution
provider gives the CPU's results. Marked ``gpu``: they run where ``onnxruntime-gpu`` is installed
and a CUDA device answers (``scripts/setup.sh gpu``), and skip elsewhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shiftguard.edge.bundle import open_bundle
from shiftguard.edge.infer import Model, choose_providers
from shiftguard.edge.predict import Predictor

ort = pytest.importorskip("onnxruntime")
AVAILABLE = ort.get_available_providers()
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


def _cuda_works() -> bool:
    """Whether a CUDA session really starts (the provider may be built in with no device)."""
    if CUDA not in AVAILABLE:
        return False
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=[CUDA])
    except Exception:
        return False
    return session.get_providers()[0] == CUDA


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cuda_works(), reason="needs onnxruntime-gpu and a CUDA device"),
]


def test_the_runner_takes_the_gpu_when_there_is_one(bundle_path: Path) -> None:
    assert choose_providers(AVAILABLE)[0] in (TENSORRT, CUDA)
    model = Model(open_bundle(bundle_path))
    assert model.session.get_providers()[0] in (TENSORRT, CUDA)


@pytest.mark.parametrize("provider", [CUDA, TENSORRT])
def test_each_gpu_provider_gives_the_cpus_results(
    tmp_path: Path, bundle_path: Path, cohort: Path, provider: str
) -> None:
    """The same parity the CPU path is held to against PyTorch: every series' probability and the
    activation map, to 1e-4 (TensorRT may run reduced precision kernels: 1e-3)."""
    if provider not in AVAILABLE:
        pytest.skip(f"this onnxruntime build has no {provider}")
    bundle = open_bundle(bundle_path)
    studies = sorted(p for site in cohort.iterdir() for p in site.iterdir())
    cpu = Predictor(bundle, shadow=True, providers=["CPUExecutionProvider"])
    gpu = Predictor(bundle, shadow=True, providers=[provider, "CPUExecutionProvider"])
    assert gpu.model.session.get_providers()[0] == provider
    on_cpu = cpu.predict_folder(studies, tmp_path / "cpu").results
    on_gpu = gpu.predict_folder(studies, tmp_path / "gpu").results
    tolerance = 1e-3 if provider == TENSORRT else 1e-4
    assert [r["series_uid"] for r in on_gpu] == [r["series_uid"] for r in on_cpu]
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert b["probability"] == pytest.approx(a["probability"], abs=tolerance)
    image = np.random.default_rng(0).normal(size=(1, 1, *bundle.manifest["input"]["shape"][2:]))
    for x, y in zip(cpu.model.logits(image), gpu.model.logits(image), strict=True):
        np.testing.assert_allclose(y, x, atol=tolerance * max(1.0, float(np.abs(x).max())))
