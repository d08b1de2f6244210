"""Benchmark: training throughput of the CPU default preset and the GPU preset, on the CPU and on CUDA.

For each preset it composes the project's real configuration (``conf/``), builds the network, the
optimizer and the loss the ``train`` stage builds, and times :class:`shiftguard.training.TrainStep`,
the exact step :func:`shiftguard.training.fit` runs (AMP on CUDA when the preset asks for it),
including the copy of each batch from pinned host memory to the device. Batches are drawn from a
bank of random volumes at the preset's input shape: the content of a volume does not change the
cost of a convolution, and the ``cohort=large`` data the GPU preset is meant for is ~10 GB, which
nobody generates for a benchmark.

Presets:

* ``cpu``: ``model=default train=default`` (SmallCNN3d at ``train.input_shape``, batch 4, float32);
* ``gpu``: ``model=gpu train=gpu ingest=highres`` (MONAI ResNet-18 at the 1.25 mm grid,
  128 x 160 x 128, batch 16, AMP).

It also times the data side: one draw of the scanner simulation (``augment`` section, fast
backend) per sample at each preset's ingest grid, on one CPU thread (what one loader worker does)
and on CUDA when there is one, and prints how many loader workers the GPU step would need so that
it never waits for data. Nothing is asserted; it prints figures and ratios, the peer being the CPU
(``--threads`` threads; 2 by default, the README's machine).

Usage::

    python benchmarks/train_throughput.py                       # both presets, CPU (+ CUDA if any)
    python benchmarks/train_throughput.py --presets cpu --steps 20
    python benchmarks/train_throughput.py --threads 16 --cpu-batch 2
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shiftguard.config import (
    AugmentConfig,
    IngestConfig,
    ModelConfig,
    TrainConfig,
    compose,
    validate,
)
from shiftguard.models import build_model
from shiftguard.training import TrainStep, build_loss, build_optimizer

PRESETS: dict[str, list[str]] = {
    "cpu": [],
    "gpu": ["model=gpu", "train=gpu", "ingest=highres"],
}


@dataclass
class Preset:
    name: str
    model: ModelConfig
    train: TrainConfig
    augment: AugmentConfig
    ingest: IngestConfig

    @property
    def input_shape(self) -> tuple[int, int, int]:
        shape = self.train.input_shape or self.ingest.shape
        return (int(shape[0]), int(shape[1]), int(shape[2]))


def load_preset(name: str) -> Preset:
    """The validated sections of preset ``name`` composed from ``conf/``."""
    cfg = compose(PRESETS[name])
    return Preset(
        name=name,
        model=validate("model", cfg["model"], ModelConfig),
        train=validate("train", cfg["train"], TrainConfig),
        augment=validate("augment", cfg["augment"], AugmentConfig),
        ingest=validate("ingest", cfg["ingest"], IngestConfig),
    )


def time_training(
    preset: Preset, device: torch.device, batch: int, warmup: int, steps: int
) -> dict[str, Any]:
    """Samples per second of ``TrainStep`` for ``preset`` on ``device``."""
    torch.manual_seed(0)
    model = build_model(preset.model).to(device)
    model.train()
    labels = np.array([0.0, 1.0] * 8)
    stepper = TrainStep(
        model,
        build_optimizer(model, preset.train),
        build_loss(preset.train, labels).to(device),
        device,
        amp=preset.train.amp,
    )
    pin = device.type == "cuda"
    bank = [torch.randn(batch, 1, *preset.input_shape) for _ in range(2)]
    bank = [b.pin_memory() if pin else b for b in bank]
    label = torch.tensor([[i % 2] for i in range(batch)], dtype=torch.float32, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup):
        stepper(bank[i % 2].to(device, non_blocking=True), label)
    began = time.perf_counter()
    for i in range(steps):
        stepper(bank[i % 2].to(device, non_blocking=True), label)
    seconds = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    return {
        "samples_per_s": batch * steps / seconds,
        "ms_per_step": 1000 * seconds / steps,
        "batch": batch,
        "amp": stepper.amp,
        "peak_gib": peak,
    }


def time_simulation(preset: Preset, device: torch.device, repeats: int) -> float:
    """Samples per second of one scanner-simulation draw at the preset's ingest grid."""
    from shiftguard.augment import RandScannerSimd

    sim = RandScannerSimd.from_config(
        "image", preset.augment, spacing=preset.ingest.spacing, record_key=None
    )
    sim.set_random_state(seed=0)
    volume = torch.rand(1, *preset.ingest.shape, device=device)
    sim({"image": volume.clone()})  # warm-up: kernels, caches
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    for _ in range(repeats):
        out = sim({"image": volume.clone()})["image"]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del out
    return repeats / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the CPU runs")
    parser.add_argument("--steps", type=int, default=10, help="timed steps on CUDA / CPU default")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--cpu-batch", type=int, default=2, help="batch of the GPU preset when run on the CPU"
    )
    parser.add_argument("--cpu-steps", type=int, default=2, help="timed GPU-preset steps on CPU")
    parser.add_argument("--sim-repeats", type=int, default=3)
    parser.add_argument("--no-cpu", action="store_true", help="skip the GPU preset on the CPU")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        torch.backends.cudnn.benchmark = True
    gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, CPU threads {args.threads}, GPU: {gpu_name}"
    )

    rows: list[dict[str, Any]] = []
    for name in args.presets:
        preset = load_preset(name)
        for device in devices:
            if device.type == "cpu" and name == "gpu" and args.no_cpu:
                continue
            on_cpu_large = device.type == "cpu" and name == "gpu"
            batch = args.cpu_batch if on_cpu_large else preset.train.batch_size
            steps = args.cpu_steps if on_cpu_large else args.steps
            warmup = 1 if on_cpu_large else args.warmup
            result = time_training(preset, device, batch, warmup, steps)
            try:
                threads = 1 if device.type == "cpu" else None
                if threads:
                    torch.set_num_threads(1)
                sim_rate = time_simulation(preset, device, args.sim_repeats)
            except ImportError as exc:  # the GPU image may lack TorchIO / SimpleITK
                print(f"  (scanner simulation not timed on {device}: {exc})")
                sim_rate = math.nan
            finally:
                torch.set_num_threads(args.threads)
            rows.append({"preset": name, "device": device.type, "sim_per_s": sim_rate, **result})
            print(
                f"  {name:>3} on {device.type:<4}: {result['samples_per_s']:8.2f} samples/s "
                f"({result['ms_per_step']:.0f} ms/step, batch {batch}, amp {result['amp']})",
                flush=True,
            )

    print()
    header = (
        f"{'preset':<6} {'device':<6} {'input':<14} {'batch':>5} {'amp':>5} {'samples/s':>10} "
        f"{'ms/step':>9} {'peak GiB':>8} {'sim/s':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        shape = "x".join(str(v) for v in load_preset(row["preset"]).input_shape)
        print(
            f"{row['preset']:<6} {row['device']:<6} {shape:<14} {row['batch']:>5} "
            f"{row['amp']!s:>5} {row['samples_per_s']:>10.2f} {row['ms_per_step']:>9.0f} "
            f"{row['peak_gib']:>8.2f} {row['sim_per_s']:>7.2f}"
        )
    by = {(r["preset"], r["device"]): r for r in rows}
    print()
    base = by.get(("cpu", "cpu"))
    for name in args.presets:
        gpu, cpu = by.get((name, "cuda")), by.get((name, "cpu"))
        if gpu and cpu:
            ratio = gpu["samples_per_s"] / cpu["samples_per_s"]
            print(f"{name} preset: CUDA / CPU ({args.threads} threads) = {ratio:.1f}x samples/s")
        if gpu and base and name == "gpu":
            print(
                f"GPU preset on CUDA vs CPU default preset on CPU: {gpu['samples_per_s']:.1f} vs "
                f"{base['samples_per_s']:.1f} samples/s "
                f"(at {load_preset('gpu').input_shape} vs {load_preset('cpu').input_shape})"
            )
        if gpu and cpu and not math.isnan(cpu["sim_per_s"]):
            workers = gpu["samples_per_s"] / cpu["sim_per_s"]
            print(
                f"{name} preset: one CPU loader worker simulates {cpu['sim_per_s']:.2f} samples/s; "
                f"keeping the CUDA step fed takes ~{math.ceil(workers)} workers"
                + (
                    f", or the simulation on the GPU ({gpu['sim_per_s']:.1f} samples/s)"
                    if not math.isnan(gpu["sim_per_s"])
                    else ""
                )
            )


if __name__ == "__main__":
    main()
