"""Benchmark: the edge service's latency from association release to SR stored in the PACS, and its
receive throughput against dcmtk's ``storescp``.

With a real Orthanc and the service (:class:`shiftguard.edge.service.Service`, clinical mode) on
loopback, ``storescu`` sends ``--studies`` copies (new UIDs) of one default-size study, one
association each, one after another. Per study it measures from the end of ``storescu`` (the
association is released) until Orthanc has acknowledged storing the study's SR and key image, and
prints p50 and p95
beside the model's forward pass measured in the same run (ONNX Runtime on the same input).

Receive throughput: the same ``storescu`` sends all the studies' images in one association to the
service's Storage SCP alone and to dcmtk's ``storescp`` (writing to disk), side by side; images/s
and the ratio. The bundle is ``artifacts/export/*.sgbundle`` (run ``dvc repro`` first); the study is
the first of ``data/dicom``.

Usage::

    python benchmarks/edge_serve_latency.py              # 20 studies
    python benchmarks/edge_serve_latency.py --studies 40
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    from shiftguard.data.ingest import canonical_volume
    from shiftguard.dicom.scan import list_files, scan_files
    from shiftguard.dicom.series import group_series
    from shiftguard.edge.peers import Orthanc, copy_study, free_port, storescu
    from shiftguard.edge.preprocess import preprocess
    from shiftguard.edge.receiver import ReceiverSettings
    from shiftguard.edge.service import Destination, Service, ServiceSettings, resolve_bundle

    bundle = resolve_bundle("artifacts/export")
    source = sorted(Path("data/dicom").glob("*/*"))[0]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        studies = copy_study(source, tmp / "studies", args.studies)
        n_images = len(list(studies[0].iterdir()))
        orthanc = Orthanc(tmp / "orthanc")
        orthanc.start()
        service = Service(
            ServiceSettings(
                bundle=str(bundle),
                storage=str(tmp / "edge"),
                receiver=ReceiverSettings(port=0, calling_ae_titles=("MODALITY",)),
                destinations=(Destination("pacs", "ORTHANC", "127.0.0.1", orthanc.dicom),),
                shadow=False,
                http_port=0,
                poll_s=0.005,
            )
        )
        service.start()
        try:
            # forward pass alone, same input the service computes
            headers, _ = scan_files(list_files(studies[0]))
            [group] = group_series(headers)
            image = preprocess(
                canonical_volume(group, service.champion.rules)[1].array,
                service.champion.bundle.manifest["preprocessing"],
            )
            model = service.champion.model
            model.logits(image)
            forward = []
            for _ in range(20):
                began = time.perf_counter()
                model.logits(image)
                forward.append(time.perf_counter() - began)

            latencies = []
            for study in studies:
                proc = storescu(service.receiver.port, sorted(study.iterdir()))
                released = time.perf_counter()
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr)
                # Orthanc's C-STORE success is "stored": the service marks the delivery sent then
                while service.queue.counts().get("deliveries_sent", 0) < 2 * (len(latencies) + 1):
                    time.sleep(0.002)
                latencies.append(time.perf_counter() - released)
            stored = orthanc.studies()
            assert len(stored) == args.studies and set(stored.values()) == {2}, stored

            # receive throughput: the service's SCP against dcmtk's storescp, same sender
            everything = [p for s in studies for p in sorted(s.iterdir())]
            began = time.perf_counter()
            proc = storescu(service.receiver.port, everything)
            ours = len(everything) / (time.perf_counter() - began)
            port = free_port()
            out = tmp / "storescp"
            out.mkdir()
            scp = subprocess.Popen(
                ["storescp", "-aet", "SHIFTGUARD", "-od", str(out), str(port)],
                env={**os.environ, "TCP_NODELAY": "1"},  # dcmtk's switch for Nagle's algorithm
            )
            time.sleep(0.5)
            began = time.perf_counter()
            peer = storescu(port, everything)
            theirs = len(everything) / (time.perf_counter() - began)
            scp.terminate()
            scp.wait(10)
            if peer.returncode != 0:
                raise RuntimeError(peer.stderr)
        finally:
            service.stop()
            orthanc.stop()

    f = statistics.median(forward)
    p50, p95 = (float(v) for v in np.percentile(latencies, [50, 95]))
    print(f"{args.studies} studies of {n_images} images ({source.name}), bundle {bundle.name}")
    print(f"forward pass alone (ONNX Runtime): {1000 * f:.1f} ms (median of 20)")
    print(
        f"association release -> SR and key image stored in Orthanc: p50 {1000 * p50:.0f} ms, "
        f"p95 {1000 * p95:.0f} ms  ({p95 / f:.1f}x the forward pass at p95)"
    )
    print(
        f"targets: p95 < 1 s: {'met' if p95 < 1 else 'MISSED'}; overhead <= 2x forward: "
        f"{'met' if p95 <= 2 * f else 'MISSED'}"
    )
    print(
        f"receive throughput, {len(everything)} images in one association: ShiftGuard SCP "
        f"{ours:.0f} images/s, dcmtk storescp {theirs:.0f} images/s, ratio {ours / theirs:.2f} "
        f"(target >= 0.8)"
    )


if __name__ == "__main__":
    main()
