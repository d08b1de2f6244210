"""Benchmark: the edge runner's whole ``predict`` path against the model's forward pass alone.

On one default-size series (a subject of the default synthetic cohort: its acquisition grid, the
2 mm canonical grid, the default network's input), it times side by side, in one process:

* ``forward``: ONNX Runtime's ``session.run`` on the already preprocessed input;
* ``predict``: :meth:`shiftguard.edge.predict.Predictor.predict_folder` on the series' folder: read
  the headers and pixels, build the canonical volume, preprocess, infer, write the SR and the key
  image, write ``results.csv``;

each the median of ``--repeats`` runs after a warm-up (the session is created once, as the edge
service holds it), with the per-step split of the whole path. The bundle is
``artifacts/export/*.sgbundle`` when the pipeline has run, else one built here from the default
network with random weights (the same cost). Targets on 2 CPU cores: whole path under 1 s and at
most 1.5x the forward pass. For scale: a MONAI spleen CT bundle spends ~1.1 s end to end for a
6.5 ms forward pass on an A100; MONAI Deploy's DICOM-to-SEG tutorial ~7.3 s.

``--preset gpu`` builds the GPU preset's bundle instead (``model=gpu ingest=highres train=gpu``:
MONAI's 3D ResNet-18 at 128 x 160 x 128, 1.25 mm; random weights, the same cost) and reads a
512 x 512 x 300 study (``clinical_study.py``, 150 MiB) with it; target at most 2x the forward pass.
ONNX Runtime takes the best execution provider installed (``pip install -e '.[edge-gpu]'`` brings
CUDA and TensorRT); the line printed first names the providers and the GPU.

Usage::

    python benchmarks/edge_predict.py                 # 2 threads, 10 repeats
    python benchmarks/edge_predict.py --threads 4 --repeats 20
    python benchmarks/edge_predict.py --preset gpu --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


#: the model presets: Hydra overrides of conf/, the target ratio of the whole path to the forward
#: pass, and the study size the series is made at (0: the demo cohort's own series)
PRESETS = {
    "default": ([], 1.5, 0.0),
    "gpu": (["model=gpu", "ingest=highres", "train=gpu"], 2.0, 150.0),
}


def _bundle(tmp: Path, preset: str) -> Path:
    found = sorted(Path("artifacts/export").glob("*.sgbundle"))
    if found and preset == "default":
        return found[0]
    import torch

    from shiftguard.config import IngestConfig, ModelConfig, TrainConfig, compose, validate
    from shiftguard.edge.bundle import write_bundle
    from shiftguard.export.stage import export_onnx, preprocessing_spec
    from shiftguard.models import build_model

    cfg = compose(PRESETS[preset][0])
    ingest = validate("ingest", cfg["ingest"], IngestConfig)
    train = validate("train", cfg["train"], TrainConfig)
    net = build_model(validate("model", cfg["model"], ModelConfig)).eval()
    shape = train.input_shape or ingest.shape
    onnx = export_onnx(net, torch.zeros(1, 1, *shape))
    manifest = {
        "name": f"benchmark-{preset}",
        "version": "0",
        "models": [{"member": "model.onnx", "format": "onnx"}],
        "input": {"name": "image", "shape": [None, 1, *shape]},
        "preprocessing": preprocessing_spec(ingest, train, shape),
        "threshold": 0.5,
        "series_selection": {"modalities": ["MR"], "min_slices": 8},
    }
    # a PCA basis for the embedding, as exported bundles carry (its cost is part of the features)
    import json

    import numpy as np

    from shiftguard.records.features import Projection

    linear = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    width = int(linear[-1].in_features)
    basis = Projection.fit(np.random.default_rng(0).normal(size=(64, width))).to_json()
    members = {"model.onnx": onnx, "embedding_pca.json": json.dumps(basis).encode()}
    return write_bundle(tmp / f"benchmark-{preset}-v0.sgbundle", manifest, members)


def _series(tmp: Path, mib: float) -> Path:
    """One subject's study folder: from ``data/dicom`` when the cohort is there, else generated;
    with ``mib``, a clinical-size copy of it (``benchmarks/clinical_study.py``, 512 x 512)."""
    existing = sorted(Path("data/dicom").glob("*/*"))
    if existing:
        source = existing[0]
    else:
        from shiftguard.cohort import generate
        from shiftguard.config import CohortConfig, compose, validate

        cfg = compose(["cohort.n_subjects=1"])
        generate.run(validate("cohort", cfg["cohort"], CohortConfig), tmp / "cohort", 1, False)
        source = next((tmp / "cohort" / "dicom").glob("*/*"))
    if not mib:
        return source
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from clinical_study import slices_for, write_study

    write_study(source, tmp / "study", slices_for(mib), seed=0)
    return tmp / "study"


def _gpu() -> str:
    """The GPU's name when ONNX Runtime runs on one (nvidia-smi), for the record."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ""
    out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    return f" on {out.splitlines()[0]}" if out else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="gpu: MONAI ResNet-18 at 128 x 160 x 128 (random weights: the same "
                        "cost) on a 512 x 512 x 300 study")  # fmt: skip
    parser.add_argument("--providers", nargs="+", default=None,
                        help="ONNX Runtime execution providers, best first (default: the best "
                        "present: TensorRT, CUDA, CPU)")  # fmt: skip
    args = parser.parse_args()
    _, target, mib = PRESETS[args.preset]
    _threads(args.threads)

    import numpy as np

    from shiftguard.dicom.scan import list_files
    from shiftguard.edge.bundle import open_bundle
    from shiftguard.edge.infer import Model
    from shiftguard.edge.predict import Predictor

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        bundle = open_bundle(_bundle(tmp, args.preset))
        series = _series(tmp, mib)
        predictor = Predictor(bundle)
        predictor.model = Model(bundle, providers=args.providers, threads=args.threads)
        n_files = len(list_files(series))

        # the same input the whole path feeds the model
        out = tmp / "out"
        first = predictor.predict_folder(series, out)  # warm-up: imports, caches, session
        row = first.results[0]
        spec = bundle.manifest["preprocessing"]
        from shiftguard.data.canonical import canonical_volume
        from shiftguard.dicom.scan import scan_files
        from shiftguard.dicom.series import group_series
        from shiftguard.edge.preprocess import preprocess

        headers, _ = scan_files(list_files(series))
        [group] = group_series(headers)
        volume = canonical_volume(group, predictor.rules)[1].array
        image = preprocess(volume, spec)
        predictor.model.logits(image)

        forward, whole = [], []
        steps: dict[str, list[float]] = {
            k: [] for k in ("read_s", "preprocess_s", "infer_s", "features_s", "write_s")
        }
        for _ in range(args.repeats):
            began = time.perf_counter()
            predictor.model.logits(image)
            forward.append(time.perf_counter() - began)
            began = time.perf_counter()
            summary = predictor.predict_folder(series, out)
            whole.append(time.perf_counter() - began)
            for key in steps:
                steps[key].append(float(summary.results[0][key]))

    f, w = statistics.median(forward), statistics.median(whole)
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads; "
        f"onnxruntime providers {predictor.model.session.get_providers()}{_gpu()}; "
        f"preset {args.preset}"
    )
    print(
        f"series: {n_files} files {row['series_description']!r} -> canonical "
        f"{list(volume.shape)} -> input {list(image.shape)}; bundle {bundle.name} v{bundle.version}"
    )
    print(f"median of {args.repeats} runs after a warm-up:")
    print(f"  forward pass alone (ONNX Runtime)  {1000 * f:8.1f} ms")
    print(
        f"  whole predict path                 {1000 * w:8.1f} ms   ({w / f:.2f}x the forward pass)"
    )
    for key, values in steps.items():
        print(f"    {key[:-2]:<12} {1000 * statistics.median(values):8.1f} ms")
    other = w - sum(statistics.median(v) for v in steps.values())
    print(f"    {'scan + csv':<12} {1000 * other:8.1f} ms")
    print(
        f"targets: whole path < 1 s: {'met' if w < 1 else 'MISSED'}; "
        f"<= {target}x forward: {'met' if w <= target * f else 'MISSED'} ({w / f:.2f}x). "
        "Peers for scale: MONAI spleen CT bundle ~1.1 s end to end for a 6.5 ms forward (A100); "
        "MONAI Deploy DICOM-to-SEG tutorial ~7.3 s"
    )
    print(f"  ({np.round(np.array(whole) * 1000, 1).tolist()} ms)")
    feats, infer = (statistics.median(steps[k]) for k in ("features_s", "infer_s"))
    print(
        f"drift-monitor features per series: {1000 * feats:.1f} ms = {100 * feats / w:.1f} % of "
        f"the runner's latency per series (target < 5 %), {100 * feats / infer:.0f} % of the "
        "inference step alone"
    )


if __name__ == "__main__":
    main()
