"""Benchmark: the edge service's latency from association release to SR stored in the PACS, and its
receive throughput against dcmtk's ``storescp``.

With a real Orthanc and the service (:class:`shiftguard.edge.service.Service`, clinical mode) on
loopback, ``storescu`` sends ``--studies`` copies (new UIDs) of one default-size study, one
association each, one after another. Per study it measures from the end of ``storescu`` (the
association is released) until Orthanc has acknowledged storing the study's SR and key image, and
prints p50 and p95
beside the model's forward pass measured in the same run (ONNX Runtime on the same input).

The EHR's share: a second service, identical but for two more destinations (an HL7 v2 receiver
over MLLP and a FHIR R4 server, the ones the test suite runs: hl7apy's MLLP server and uvicorn,
each validating what it gets), takes every other study; per study, release -> every destination
acknowledged, and the ratio of its p50 and p95 to the PACS-only arm's, with the time each
destination took from queueing to acknowledgement.

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
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=20, help="studies per arm")
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
    from shiftguard.peers import Orthanc, copy_study, free_port, storescu

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from ehr_peers import FhirServer, MllpListener  # the receivers the test suite uses

    bundle = resolve_bundle("artifacts/export")
    source = sorted(Path("data/dicom").glob("*/*"))[0]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        studies = copy_study(source, tmp / "studies", 2 * args.studies)
        n_images = len(list(studies[0].iterdir()))
        orthanc = Orthanc(tmp / "orthanc")
        orthanc.start()
        listener = MllpListener(free_port()).start()
        fhir = FhirServer(free_port()).start()
        pacs = {"name": "pacs", "ae_title": "ORTHANC", "port": orthanc.dicom}
        ehr = [
            {"name": "ehr", "kind": "hl7-mllp", "port": listener.port},
            {"name": "fhir", "kind": "fhir", "url": fhir.url},
        ]
        arms = {PACS_ONLY: [pacs], WITH_EHR: [pacs, *ehr]}
        services = {
            arm: Service(
                EdgeConfig(
                    bundle=str(bundle),
                    storage=str(tmp / f"edge{k}"),
                    port=0,
                    calling_ae_titles=["MODALITY"],
                    destinations=destinations,
                    shadow=False,
                    http_port=0,
                ),
                poll_s=0.005,
            )
            for k, (arm, destinations) in enumerate(arms.items())
        }
        for service in services.values():
            service.start()
        try:
            service = services[PACS_ONLY]
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

            # the arms take turns, study by study, so that neither has the quieter minutes
            latencies: dict[str, list[float]] = {arm: [] for arm in arms}
            for k, study in enumerate(studies):
                arm = list(arms)[k % 2]
                service = services[arm]
                proc = storescu(service.receiver.port, sorted(study.iterdir()))
                released = time.perf_counter()
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr)
                # every destination's acknowledgement (Orthanc's C-STORE success is "stored",
                # the listener's AA "accepted", the FHIR server's 2xx "committed")
                per_study = 2 + (len(arms[arm]) - 1)  # SR + key image, one message each
                expected = per_study * (len(latencies[arm]) + 1)
                while service.queue.counts().get("deliveries_sent", 0) < expected:
                    if time.perf_counter() - released > 120:
                        raise RuntimeError(f"{arm}: not every result acknowledged in 120 s: "
                                           f"{service.queue.counts()}")  # fmt: skip
                    time.sleep(0.002)
                latencies[arm].append(time.perf_counter() - released)

            def mean_ms(service: Service, stage: str) -> float:  # the service's histogram
                value = service.registry.get_sample_value
                total = value("shiftguard_edge_latency_seconds_sum", {"stage": stage}) or 0.0
                count = value("shiftguard_edge_latency_seconds_count", {"stage": stage}) or 0.0
                return 1000 * total / max(count, 1.0)

            stages = {
                arm: {n: mean_ms(services[arm], n) for n in ("predict", "deliver", "ready_to_sent")}
                for arm in arms
            }
            per_destination = _queued_to_sent(tmp / "edge1" / "queue.db")
            stored = orthanc.studies()
            assert len(stored) == 2 * args.studies and set(stored.values()) == {2}, stored
            assert len(listener.accepted) == args.studies and not listener.invalid
            assert len(fhir.of_type("DiagnosticReport")) == args.studies and not fhir.invalid

        finally:
            for service in services.values():
                service.stop()
            orthanc.stop()
            listener.stop()
            fhir.stop()

        with tempfile.TemporaryDirectory(dir=args.receive_dir) as receive_tmp:
            receive = receive_throughput(
                source, Path(receive_tmp), args.rounds, args.receive_studies
            )

    f = statistics.median(forward)
    p50, p95 = (float(v) for v in np.percentile(latencies[PACS_ONLY], [50, 95]))
    print(
        f"{args.studies} studies per arm of {n_images} images ({source.name}), bundle {bundle.name}"
    )
    print(f"forward pass alone (ONNX Runtime): {1000 * f:.1f} ms (median of 20)")
    print(
        f"association release -> SR and key image stored in Orthanc: p50 {1000 * p50:.0f} ms, "
        f"p95 {1000 * p95:.0f} ms  ({p95 / f:.1f}x the forward pass at p95)"
    )
    s0 = stages[PACS_ONLY]
    print(
        f"  where it goes (service histograms, means): predict + write SR/SC "
        f"{s0['predict']:.0f} ms, each C-STORE into Orthanc {s0['deliver']:.0f} ms, "
        f"ready -> last result sent {s0['ready_to_sent']:.0f} ms"
    )
    print(
        f"targets: p95 < 1 s: {'met' if p95 < 1 else 'MISSED'}; overhead <= 2x forward: "
        f"{'met' if p95 <= 2 * f else 'MISSED'}"
    )
    e50, e95 = (float(v) for v in np.percentile(latencies[WITH_EHR], [50, 95]))
    s1 = stages[WITH_EHR]
    print(
        "with an HL7 v2 receiver (MLLP, hl7apy validating) and a FHIR server (uvicorn, "
        "fhir.resources validating) beside Orthanc, studies alternating with the arm above:"
    )
    print(
        f"  release -> every destination acknowledged: p50 {1000 * e50:.0f} ms, p95 "
        f"{1000 * e95:.0f} ms; ratio to PACS only {e50 / p50:.2f} (p50), {e95 / p95:.2f} (p95)"
    )
    print(
        f"  predict + SR/SC + messages {s1['predict']:.0f} ms (PACS only {s0['predict']:.0f} ms); "
        "queued -> acknowledged, median per destination: "
        + ", ".join(f"{d} {1000 * v:.0f} ms" for d, v in sorted(per_destination.items()))
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


PACS_ONLY, WITH_EHR = "PACS only", "PACS + HL7 + FHIR"


def _queued_to_sent(queue_db: Path) -> dict[str, float]:
    """Median seconds from queueing (the study processed) to the destination's acknowledgement,
    per destination, read from a stopped service's queue."""
    import sqlite3

    db = sqlite3.connect(queue_db)
    try:
        rows = db.execute("SELECT destination, sent_at - queued_at FROM deliveries").fetchall()
    finally:
        db.close()
    by: dict[str, list[float]] = {}
    for destination, seconds in rows:
        by.setdefault(destination, []).append(seconds)
    return {d: statistics.median(v) for d, v in by.items()}


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
