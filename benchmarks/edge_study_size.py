"""Benchmark: the edge service's latency and memory against the size of the study, 10 MB to 1 GB.

For each size (``--sizes`` in MiB of 16-bit 512 x 512 pixel data: 10, 50, 150, 500, 1000 by
default), clinical-size copies of the demo's first study (:mod:`clinical_study`, a new seed per
repeat so every study has its own UIDs) go from dcmtk's ``storescu`` (one association) to the edge
service (:class:`shiftguard.edge.service.Service`, clinical mode, the default bundle) on loopback,
which sends its SR and key image to a real Orthanc. Per study it measures:

* transfer: ``storescu`` start to the association's release (what the network and the receiver
  take);
* latency: the release to both result objects acknowledged by Orthanc (the issue's target: p95
  under 1 s whatever the size);
* memory: the peak of the process's resident set while the study is received and processed, over
  its resident set before, against the study's pixel bytes.

The forward pass alone (ONNX Runtime on the same input) is measured in the same run. Studies are
generated under a temporary folder and deleted; nothing is committed.

    python benchmarks/edge_study_size.py                         # 10 .. 1000 MiB, 3 repeats each
    python benchmarks/edge_study_size.py --sizes 10 150 --repeats 2
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clinical_study import SLICE_BYTES, slices_for, write_study


def _rss(pids: tuple[int, ...] = ()) -> int:
    """The resident set of this process and of ``pids`` (the service's preparing process; not
    storescu or Orthanc, which are children too), bytes."""
    total = 0
    for pid in ("self", *map(str, pids)):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:  # ended meanwhile
            pass
    return total


def _preparer_pids(service: Any) -> tuple[int, ...]:
    """The service's preparing child process, if it has one."""
    pid = service.prefetch.child_pid if service.prefetch is not None else None
    return (pid,) if pid is not None else ()


class PeakRss:
    """The highest resident set seen while it runs (sampled every 10 ms)."""

    def __init__(self, pids: tuple[int, ...] = ()) -> None:
        self.pids = pids
        self.peak = _rss(pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss(self.pids))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss(self.pids))


PREPARED, THREAD, AFTER = "prepared", "prepared-thread", "after-release"


def _one(
    service: Any,
    files: list[Path],
    folder: Path,
    slices: int,
    mode: str,
    sent: dict[str, int],
    processed: dict[str, int],
    storescu: Any,
) -> dict[str, Any]:
    """One study through one service: transfer, release -> SR acknowledged, peak memory."""
    pixel_bytes = slices * SLICE_BYTES
    pids = _preparer_pids(service)
    before = _rss(pids)
    with PeakRss(pids) as peak:
        began = time.perf_counter()
        proc = storescu(service.receiver.port, files)
        released = time.perf_counter()
        # instances the preparing thread had not reached when the association ended
        backlog = service.prefetch.backlog() if service.prefetch is not None else 0
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr)
        sent[mode] += 2
        processed[mode] += 1
        while service.queue.counts().get("deliveries_sent", 0) < sent[mode]:
            counts = service.queue.counts()
            if counts.get("studies_failed", 0):
                raise RuntimeError("a study failed: see the log")
            if (
                service.count("processed") >= processed[mode]
                and counts.get("deliveries_pending", 0) == 0
                and counts.get("deliveries_sent", 0) < sent[mode]
            ):
                raise RuntimeError(
                    f"{folder.name}: nothing to send; the service skipped it "
                    "(too few slices for the bundle's series selection?)"
                )
            time.sleep(0.002)
        done = time.perf_counter()
    import pydicom

    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    with (service.outbox / study_uid / "timings.csv").open(newline="") as fh:
        [steps] = list(csv.DictReader(fh))
    return {
        "mode": mode, "mib": pixel_bytes / 2**20, "slices": slices,
        "transfer_s": released - began, "latency_s": done - released,
        "peak_over_pixels": (peak.peak - before) / pixel_bytes, "backlog": backlog,
        **{k: float(v) for k, v in steps.items() if k.endswith("_s")},
    }  # fmt: skip


def plot(rows: list[dict[str, Any]], forward_ms: float, path: Path) -> None:
    """Release-to-SR latency (every study, and the median per size and mode) against the study's
    size."""
    from shiftguard.figures import figure, save_png

    fig = figure(6.4, 3.8)
    ax = fig.add_subplot()
    for mode in sorted({r["mode"] for r in rows}):
        mine = [r for r in rows if r["mode"] == mode]
        sizes = sorted({r["mib"] for r in mine})
        medians = [statistics.median(r["latency_s"] for r in mine if r["mib"] == m) for m in sizes]
        [line] = ax.plot(sizes, medians, marker="o", label=f"median, {mode}")
        ax.scatter([r["mib"] for r in mine], [r["latency_s"] for r in mine], s=12, alpha=0.5,
                   color=line.get_color())  # fmt: skip
    ax.axhline(1.0, linestyle="--", color="grey", linewidth=1, label="target: 1 s")
    ax.set_xscale("log")
    ax.set_xlabel("study size, MiB of 16-bit pixels (512 x 512 slices)")
    ax.set_ylabel("association release -> SR stored, s")
    ax.set_title(f"Edge service on 2 CPU cores (forward pass {forward_ms:.0f} ms)", fontsize=10)
    ax.legend(frameon=False, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=float, nargs="*", default=[10, 50, 150, 500, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=[PREPARED, THREAD, AFTER],
                        default=[PREPARED, THREAD, AFTER],
                        help="edge.prepare_while_receiving on, in a child process (prepared, the "
                        "default) or a thread, and off (after-release), side by side")  # fmt: skip
    parser.add_argument("--tmp", default=None, help="where studies and the service's storage go")
    parser.add_argument("--receive-mib", type=float, nargs="*", default=[150, 1000],
                        help="receive throughput against dcmtk storescp at these sizes (none: "
                        "skip)")  # fmt: skip
    parser.add_argument("--receive-rounds", type=int, default=3)
    parser.add_argument("--plot", type=Path, default=None,
                        help="write the latency-versus-size figure here (PNG)")  # fmt: skip
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    from edge_serve_latency import STORESCP, receive_throughput

    from shiftguard.config import EdgeConfig
    from shiftguard.data.canonical import canonical_volume
    from shiftguard.dicom.scan import list_files, scan_files
    from shiftguard.dicom.series import group_series
    from shiftguard.edge.preprocess import preprocess
    from shiftguard.edge.service import Service, resolve_bundle
    from shiftguard.peers import Orthanc, storescu

    bundle = resolve_bundle("artifacts/export")
    source = sorted(Path("data/dicom").glob("*/*"))[0]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        orthanc = Orthanc(tmp / "orthanc")
        orthanc.start()
        services = {
            mode: Service(
                EdgeConfig(
                    bundle=str(bundle), storage=str(tmp / f"edge-{i}"), port=0, http_port=0,
                    calling_ae_titles=["MODALITY"], shadow=False, stability_s=600,
                    destinations=[{"name": "pacs", "ae_title": "ORTHANC", "port": orthanc.dicom}],
                    prepare_while_receiving=mode != AFTER,
                    prepare_in="thread" if mode == THREAD else "process",
                ),
                poll_s=0.005,
            )
            for i, mode in enumerate(args.modes)
        }  # fmt: skip
        for service in services.values():
            service.start()
        forward: list[float] = []
        sent = dict.fromkeys(services, 0)
        processed = dict.fromkeys(services, 0)
        try:
            champion = next(iter(services.values())).champion
            headers, _ = scan_files(list_files(source))
            [group] = group_series(headers)
            image = preprocess(
                canonical_volume(group, champion.rules)[1].array,
                champion.bundle.manifest["preprocessing"],
            )
            champion.model.logits(image)
            for _ in range(20):
                began = time.perf_counter()
                champion.model.logits(image)
                forward.append(time.perf_counter() - began)
            for size in args.sizes:
                slices = slices_for(size)
                for repeat in range(args.repeats):
                    folder = tmp / f"study-{size:g}-{repeat}"
                    modes = list(services) if repeat % 2 == 0 else list(services)[::-1]
                    for k, mode in enumerate(modes):  # alternating which goes first
                        service = services[mode]
                        files = write_study(source, folder, slices, seed=1000 + 10 * repeat + k)
                        rows.append(
                            _one(service, files, folder, slices, mode, sent, processed, storescu)
                        )
                        r = rows[-1]
                        print(f"  {r['mib']:6.0f} MiB ({slices} slices), {mode:<13} repeat "
                              f"{repeat + 1}: transfer {r['transfer_s']:6.2f} s, release -> SR "
                              f"{r['latency_s']:6.2f} s, peak RSS / pixels "
                              f"{r['peak_over_pixels']:.2f}; not prepared at release "
                              f"{r['backlog']}; worker: read {r['read_s']:.2f} s, preprocess "
                              f"{r['preprocess_s']:.2f}, infer {r['infer_s']:.3f}, features "
                              f"{r['features_s']:.2f}, write {r['write_s']:.2f}", flush=True)  # fmt: skip
                        for path in folder.iterdir():
                            path.unlink()
                        folder.rmdir()
        finally:
            for service in services.values():
                service.stop()
            orthanc.stop()
        receive = {}
        for size in args.receive_mib:
            study = tmp / f"receive-source-{size:g}"
            write_study(source, study, slices_for(size), seed=7)
            receive[size] = receive_throughput(
                study, tmp / "receive", args.receive_rounds, 1, bundle=bundle
            )
            shutil.rmtree(study)
    f = statistics.median(forward)
    print(f"\nbundle {bundle.name}; forward pass alone {1000 * f:.1f} ms (median of 20); "
          f"{args.repeats} studies per size, {args.threads} threads")  # fmt: skip
    print("MiB  slices  mode           transfer s (median)  release->SR p50 s  p95 s  "
          "peak RSS / pixel bytes (max)")  # fmt: skip
    p95s: dict[tuple[float, str], float] = {}
    for size in args.sizes:
        for mode in args.modes:
            mine = [r for r in rows if r["slices"] == slices_for(size) and r["mode"] == mode]
            latency = [r["latency_s"] for r in mine]
            p50, p95 = (float(v) for v in np.percentile(latency, [50, 95]))
            p95s[size, mode] = p95
            print(f"{mine[0]['mib']:5.0f} {mine[0]['slices']:6d}  {mode:<13}  "
                  f"{statistics.median(r['transfer_s'] for r in mine):19.2f}  {p50:17.2f}  "
                  f"{p95:5.2f}  {max(r['peak_over_pixels'] for r in mine):.2f}")  # fmt: skip
    if AFTER in args.modes:
        for mode in [m for m in args.modes if m != AFTER]:
            print(f"\nrelease -> SR p95, {mode} / {AFTER}: " + ", ".join(
                f"{size:g} MiB {p95s[size, mode] / p95s[size, AFTER]:.2f}" for size in args.sizes
            ))  # fmt: skip
    if args.plot is not None:
        plot(rows, 1000 * f, args.plot)
        print(f"\nfigure: {args.plot}")
    for size, (images, rates) in receive.items():
        theirs = statistics.median(rates[STORESCP])
        mib = slices_for(size) * SLICE_BYTES / 2**20
        print(f"\nreceive throughput, one {mib:.0f} MiB study ({images} images) in one association, "
              f"median of {args.receive_rounds} alternating rounds (target >= 0.9x storescp):")  # fmt: skip
        for name, values in rates.items():
            ours = statistics.median(values)
            print(f"  {name:<38} {ours * mib / images:7.0f} MiB/s  ratio {ours / theirs:.2f}  "
                  f"(rounds: {', '.join(f'{v * mib / images:.0f}' for v in values)})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
