"""Benchmark: the edge service's latency from association release to SR stored in the PACS, and its
receive throughput against dcmtk's ``storescp``.

With a real Orthanc and the service (:class:`shiftguard.edge.service.Service`, clinical mode) on
loopback, ``storescu`` sends ``--studies`` copies (new UIDs) of one default-size study, one
association each, one after another. Per study it measures from the end of ``storescu`` (the
association is released) until Orthanc has acknowledged storing the study's SR and key image, and
prints p50 and p95
beside the model's forward pass measured in the same run (ONNX Runtime on the same input).

Receive throughput: the same ``storescu`` sends ``--receive-studies`` studies' images in one
association to the service's Storage SCP alone (both engines, both durability modes) and to dcmtk's
``storescp`` (writing to disk, no fsync), side by side in rotating order; median images/s over
``--rounds`` rounds and the ratio to ``storescp``. The bundle is ``artifacts/export/*.sgbundle`` (run ``dvc repro`` first); the study is
the first of ``data/dicom``.

Usage::

    python benchmarks/edge_serve_latency.py              # 20 studies
    python benchmarks/edge_serve_latency.py --studies 40
"""

from __future__ import annotations

import argparse
import os
import shutil
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
    parser.add_argument("--rounds", type=int, default=5, help="receive-throughput rounds")
    parser.add_argument("--receive-studies", type=int, default=20, help="studies per round")
    parser.add_argument(
        "--receive-dir",
        default=None,
        help="where the receivers write (default: the temporary folder); /dev/shm takes the "
        "disk out and leaves the CPU cost of each receiver",
    )
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    from shiftguard.config import EdgeConfig
    from shiftguard.data.canonical import canonical_volume
    from shiftguard.dicom.scan import list_files, scan_files
    from shiftguard.dicom.series import group_series
    from shiftguard.edge.preprocess import preprocess
    from shiftguard.edge.service import Service, resolve_bundle
    from shiftguard.peers import Orthanc, copy_study, storescu

    bundle = resolve_bundle("artifacts/export")
    source = sorted(Path("data/dicom").glob("*/*"))[0]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        studies = copy_study(source, tmp / "studies", args.studies)
        n_images = len(list(studies[0].iterdir()))
        orthanc = Orthanc(tmp / "orthanc")
        orthanc.start()
        service = Service(
            EdgeConfig(
                bundle=str(bundle),
                storage=str(tmp / "edge"),
                port=0,
                calling_ae_titles=["MODALITY"],
                destinations=[{"name": "pacs", "ae_title": "ORTHANC", "port": orthanc.dicom}],
                shadow=False,
                http_port=0,
            ),
            poll_s=0.005,
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

            def mean_ms(stage: str) -> float:  # from the service's Prometheus histogram
                value = service.registry.get_sample_value
                total = value("shiftguard_edge_latency_seconds_sum", {"stage": stage}) or 0.0
                count = value("shiftguard_edge_latency_seconds_count", {"stage": stage}) or 0.0
                return 1000 * total / max(count, 1.0)

            stages = {name: mean_ms(name) for name in ("predict", "deliver", "ready_to_sent")}
            stored = orthanc.studies()
            assert len(stored) == args.studies and set(stored.values()) == {2}, stored

        finally:
            service.stop()
            orthanc.stop()

        with tempfile.TemporaryDirectory(dir=args.receive_dir) as receive_tmp:
            receive = receive_throughput(
                source, Path(receive_tmp), args.rounds, args.receive_studies
            )

    f = statistics.median(forward)
    p50, p95 = (float(v) for v in np.percentile(latencies, [50, 95]))
    print(f"{args.studies} studies of {n_images} images ({source.name}), bundle {bundle.name}")
    print(f"forward pass alone (ONNX Runtime): {1000 * f:.1f} ms (median of 20)")
    print(
        f"association release -> SR and key image stored in Orthanc: p50 {1000 * p50:.0f} ms, "
        f"p95 {1000 * p95:.0f} ms  ({p95 / f:.1f}x the forward pass at p95)"
    )
    print(
        f"  where it goes (service histograms, means): predict + write SR/SC "
        f"{stages['predict']:.0f} ms, each C-STORE into Orthanc {stages['deliver']:.0f} ms, "
        f"ready -> last result sent {stages['ready_to_sent']:.0f} ms"
    )
    print(
        f"targets: p95 < 1 s: {'met' if p95 < 1 else 'MISSED'}; overhead <= 2x forward: "
        f"{'met' if p95 <= 2 * f else 'MISSED'}"
    )
    images, rates = receive
    theirs = statistics.median(rates[STORESCP])
    print(
        f"receive throughput, {images} images in one association, median of {args.rounds} "
        f"alternating rounds (target >= 0.8x dcmtk storescp):"
    )
    for name, values in rates.items():
        ours = statistics.median(values)
        print(
            f"  {name:<34} {ours:6.0f} images/s  ratio {ours / theirs:.2f}  "
            f"(rounds: {', '.join(f'{v:.0f}' for v in values)})"
        )


#: dcmtk's largest receive PDU: storescp's default (16 KiB) makes storescu send in 16 KiB PDUs,
#: while ShiftGuard's SCP takes any size (``edge.max_pdu: 0``), which would flatter ShiftGuard
DCMTK_MAX_PDU = 131072
STORESCP = f"storescp (dcmtk, --max-pdu {DCMTK_MAX_PDU})"


def receive_throughput(
    source: Path, tmp: Path, rounds: int, n_studies: int, bundle: Path | None = None
) -> tuple[int, dict[str, list[float]]]:
    """The same ``storescu`` sends the same images (fresh UIDs each round, so every receiver writes
    new files) to dcmtk's ``storescp`` writing to disk and to ShiftGuard's Storage SCP alone
    (each engine and durability mode), one association each; the order rotates every round so
    that no receiver always goes first on a warm or cold page cache. With ``bundle``, also the
    whole edge service receiving while it prepares the study (in its child process, and in a
    thread), the time to the association's release."""
    from shiftguard.config import EdgeConfig
    from shiftguard.edge.queue import WorkQueue
    from shiftguard.edge.receiver import Receiver
    from shiftguard.edge.service import Service
    from shiftguard.peers import copy_study, free_port, storescu, tool

    variants: dict[str, tuple[str, str] | None] = {
        STORESCP: None,
        "ShiftGuard asyncio, association": ("asyncio", "association"),
        "ShiftGuard asyncio, instance": ("asyncio", "instance"),
        "ShiftGuard pynetdicom, association": ("pynetdicom", "association"),
    }
    if bundle is not None:
        variants["edge service, preparing in a process"] = ("service", "process")
        variants["edge service, preparing in a thread"] = ("service", "thread")
    rates: dict[str, list[float]] = {name: [] for name in variants}
    images = 0
    for round_ in range(rounds):
        names = list(variants)
        names = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in names:
            where = tmp / f"receive{round_}-{names.index(name)}"
            files = [
                p
                for s in copy_study(source, where / "sent", n_studies)
                for p in sorted(s.iterdir())
            ]
            images = len(files)
            variant = variants[name]
            if variant is None:
                port = free_port()
                (where / "out").mkdir()
                pdu = ["--max-pdu", str(DCMTK_MAX_PDU)]
                scp = subprocess.Popen(
                    [
                        tool("storescp"),
                        "-aet",
                        "SHIFTGUARD",
                        *pdu,
                        "-od",
                        str(where / "out"),
                        str(port),
                    ],
                    env={**os.environ, "TCP_NODELAY": "1"},  # dcmtk's switch for Nagle's algorithm
                    stderr=subprocess.DEVNULL,
                )
                _wait_for_port(port, scp)
            elif variant[0] == "service":
                service = Service(
                    EdgeConfig(
                        bundle=str(bundle), storage=str(where / "edge"), port=0, http_port=0,
                        calling_ae_titles=["MODALITY"], shadow=True, stability_s=600,
                        prepare_in=variant[1],
                    ),
                    poll_s=0.005,
                )  # fmt: skip
                service.start()
                assert service.prefetch is not None and service.prefetch.wait_ready()
                port = service.receiver.port
            else:
                queue = WorkQueue(where / "queue.db")
                receiver = Receiver(
                    EdgeConfig(
                        port=0,
                        calling_ae_titles=["MODALITY"],
                        engine=variant[0],
                        durability=variant[1],
                    ),
                    queue,
                    where / "inbox",
                )
                receiver.start()
                port = receiver.port
            began = time.perf_counter()
            proc = storescu(port, files)
            rates[name].append(len(files) / (time.perf_counter() - began))
            if variant is None:
                scp.terminate()
                scp.wait(10)
            elif variant[0] == "service":
                service.stop()
            else:
                receiver.stop()
                queue.close()
            if proc.returncode != 0:
                raise RuntimeError(f"{name}: {proc.stderr}")
            shutil.rmtree(where)
    return images, rates


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """Until ``process`` accepts connections on ``port`` (a fixed sleep lost the race on a busy host)."""
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"storescp exited with status {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"storescp did not listen on port {port} within {timeout_s:.0f} s")


if __name__ == "__main__":
    main()
