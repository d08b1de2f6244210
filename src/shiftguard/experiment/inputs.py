"""The scored volumes' network inputs, preprocessed once and shared by every cell of a sweep.

Every cell scores the same hold-out and unseen-scanner series, each preprocessed exactly as
validation does (load, percentile scaling, area resampling to ``train.input_shape``). In one process
:class:`InputCache` keeps them in memory after the first cell. Across the processes of a parallel
sweep (Hydra's joblib launcher) each would pay for them again, so ``shiftguard experiment prepare``
also writes them into the cohort's folder (:func:`write_inputs`): ``inputs/<tag>.npy``, one
``(1, X, Y, Z)`` float32 input per series, and ``inputs/<tag>.txt``, the volume each row is (the
marker of a finished file, written last). ``<tag>`` names the preprocessing (:func:`input_tag`), so
a cell that scales or resamples otherwise never reads another's inputs. The cache memory-maps the
file; each process reads its rows from the shared page cache.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shiftguard.config.schema import TrainConfig
from shiftguard.pool import WorkerPool, run_tasks
from shiftguard.utils import progress_bar

log = logging.getLogger(__name__)

INPUTS_DIR = "inputs"


def input_tag(cfg: TrainConfig) -> str:
    """The name of a preprocessing: its intensity percentiles and the network's grid.

    >>> input_tag(TrainConfig(intensity_percentiles=(1.0, 99.5), input_shape=(40, 48, 40)))
    'p1-99.5_40x48x40'
    >>> input_tag(TrainConfig())
    'p1-99_ingest'
    """
    lo, hi = cfg.intensity_percentiles
    grid = "x".join(str(n) for n in cfg.input_shape) if cfg.input_shape else "ingest"
    return f"p{lo:g}-{hi:g}_{grid}"


def _key(path: str | Path) -> str:
    return os.path.realpath(path)


def preprocess(paths: Sequence[str], cfg: TrainConfig) -> list[torch.Tensor]:
    """The network inputs of ``paths``, exactly as validation preprocesses them."""
    from shiftguard.training.data import build_dataset

    items = [{"image": str(p), "label": 0.0, "key": str(p)} for p in paths]
    dataset = build_dataset(items, cfg.model_copy(update={"cache_rate": 0.0, "num_workers": 0}))
    return [dataset[i]["image"].float() for i in range(len(items))]


def _fill(target: str, start: int, paths: Sequence[str], cfg_json: str) -> int:
    """Write the inputs of ``paths`` into rows ``start...`` of the ``.npy`` file ``target``."""
    torch.set_num_threads(1)
    cfg = TrainConfig.model_validate_json(cfg_json)
    rows = np.load(target, mmap_mode="r+")
    for i, tensor in enumerate(preprocess(paths, cfg)):
        rows[start + i] = tensor.numpy()
    rows.flush()
    return len(paths)


def write_inputs(
    paths: Sequence[str],
    cfg: TrainConfig,
    folder: Path,
    workers: int | None = None,
    progress: bool = False,
) -> Path:
    """Preprocess ``paths`` as validation does into ``folder/<tag>.npy`` and ``folder/<tag>.txt``
    (see the module docstring); rewritten whole when either is missing or they disagree.

    Args:
        paths: the volumes, in the order of the file's rows.
        cfg: the ``train`` section (percentiles, input shape).
        folder: where the two files go (created).
        workers: processes (``None``: one per core).
        progress: show a progress bar.

    Returns:
        The ``.npy`` file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tag = input_tag(cfg)
    npy, names = folder / f"{tag}.npy", folder / f"{tag}.txt"
    if not paths:
        raise ValueError(f"{folder}: no volumes to preprocess")
    shape = tuple(preprocess(paths[:1], cfg)[0].shape)
    partial = folder / f".{tag}.partial.npy"
    names.unlink(missing_ok=True)  # the marker goes first and comes back last
    rows = np.lib.format.open_memmap(
        partial, mode="w+", dtype=np.float32, shape=(len(paths), *shape)
    )
    del rows
    n = max(1, min(workers or os.cpu_count() or 1, len(paths)))
    step = -(-len(paths) // (4 * n))
    chunks = [(i, list(paths[i : i + step])) for i in range(0, len(paths), step)]
    cfg_json = cfg.model_dump_json()
    args = [(str(partial), start, part, cfg_json) for start, part in chunks]
    # Workers start before the progress bar's thread exists, so they are forked (see WorkerPool).
    pool = WorkerPool(n, tune=False) if n > 1 else None
    with pool or nullcontext(), progress_bar(progress) as bar:
        task = bar.add_task(f"network inputs {tag}", total=len(paths))
        for done in run_tasks(pool, _fill, args, _worker_died):
            bar.advance(task, done)
    partial.replace(npy)
    names.write_text("".join(_key(p) + "\n" for p in paths), encoding="utf-8")
    log.info("experiment: %d network inputs %s into %s", len(paths), tag, npy)
    return npy


def _worker_died(args: tuple[Any, ...]) -> Iterator[int]:
    """A chunk whose preprocessing killed its worker even when run alone."""
    raise RuntimeError(
        f"preprocessing {len(args[2])} volume(s) from {args[2][0]} killed the worker process "
        "(out of memory: use fewer workers)"
    )
    yield 0  # a generator, as run_tasks expects


class InputCache:
    """Network inputs of scored volumes, preprocessed once per (volume, percentiles, input shape):
    read from a file :func:`write_inputs` wrote (:meth:`attach`), else computed and kept in memory
    for the sweep's later cells (``(1, X, Y, Z)`` float32 each)."""

    def __init__(self) -> None:
        self._store: dict[tuple[str, str], torch.Tensor] = {}
        self._mapped: dict[tuple[str, str], tuple[np.ndarray, int]] = {}
        self._attached: set[tuple[str, str]] = set()

    def attach(self, folder: Path, cfg: TrainConfig) -> int:
        """Read the inputs in ``folder`` written for ``cfg``'s preprocessing, if there are any;
        returns how many volumes they cover (0 when absent, unfinished or inconsistent)."""
        tag = input_tag(cfg)
        if (str(folder), tag) in self._attached:
            return 0
        npy, names = folder / f"{tag}.npy", folder / f"{tag}.txt"
        if not (npy.is_file() and names.is_file()):
            return 0
        rows = np.load(npy, mmap_mode="r")
        keys = names.read_text(encoding="utf-8").splitlines()
        if rows.ndim != 5 or rows.shape[0] != len(keys):
            log.warning("%s: %d rows for %d volumes; not used", npy, rows.shape[0], len(keys))
            return 0
        for i, key in enumerate(keys):
            self._mapped[(key, tag)] = (rows, i)
        self._attached.add((str(folder), tag))
        return len(keys)

    def inputs(self, paths: Sequence[str], cfg: TrainConfig) -> list[torch.Tensor]:
        """The network inputs of ``paths``, exactly as validation preprocesses them."""
        tag = input_tag(cfg)
        keys = [_key(p) for p in paths]
        missing = [
            (p, k) for p, k in zip(paths, keys, strict=True)
            if (k, tag) not in self._store and (k, tag) not in self._mapped
        ]  # fmt: skip
        if missing:
            for (_, key), tensor in zip(
                missing, preprocess([p for p, _ in missing], cfg), strict=True
            ):
                self._store[(key, tag)] = tensor
        out = []
        for key in keys:
            if (key, tag) in self._store:
                out.append(self._store[(key, tag)])
            else:
                rows, i = self._mapped[(key, tag)]
                out.append(torch.from_numpy(np.array(rows[i])))
        return out
