"""Small helpers shared by stages and commands: runtime settings from the environment, stable JSON."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shiftguard.errors import ShiftGuardError

if TYPE_CHECKING:
    from rich.progress import Progress

WORKERS_ENV = "SHIFTGUARD_WORKERS"


def _env_count(name: str, minimum: int) -> int | None:
    """The integer in ``$name`` (``None`` when unset or empty), at least ``minimum``."""
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be at least {minimum}")
    return value


def loader_workers() -> int:
    """DataLoader worker processes: ``$SHIFTGUARD_LOADER_WORKERS``, else one per core beyond the
    two the training step's threads use, at most 4 (none on 1-2 cores, 2 on 4, 4 on 6 or more).

    On 2 cores a loader worker competes with the step's two threads: an epoch of the default
    training took 8.5 s with one worker against 7.3 s loading in the training process (same
    weights either way: random transforms are seeded per sample)."""
    value = _env_count("SHIFTGUARD_LOADER_WORKERS", 0)
    return max(0, min(4, (os.cpu_count() or 1) - 2)) if value is None else value


def env_workers(default: int | None = None) -> int:
    """Worker processes for pools: ``$SHIFTGUARD_WORKERS``, else ``default``, else the CPU count.

    Runtime-only settings like this come from the environment, never from ``conf/``, so they do not
    change DVC's view of a stage.
    """
    value = _env_count(WORKERS_ENV, 1)
    return (default or os.cpu_count() or 1) if value is None else value


def config_dir() -> Path:
    """The user's ShiftGuard folder (keys): ``$XDG_CONFIG_HOME/shiftguard``, else
    ``~/.config/shiftguard``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "shiftguard"


def write_csv(
    path: Path,
    columns: Sequence[str],
    rows: Iterable[Mapping[str, Any]],
    line_end: str = "\n",
    extras: Literal["ignore", "raise"] = "ignore",
) -> Path:
    """The one CSV writer of every table ShiftGuard writes: a fixed column order, a missing value
    as an empty cell, keys beyond ``columns`` dropped (or refused with ``extras="raise"``), written
    to a temporary name and renamed, so a reader never sees half a file (folders are created).

    ``line_end`` is ``"\n"``; the tables that DVC already tracked with ``"\r\n"`` (the ingest
    manifest and quarantine, the training history, the edge runner's results) keep it, so their
    bytes, and every stage after them, stay the same.
    """
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(
                fh, fieldnames=list(columns), lineterminator=line_end, extrasaction=extras
            )
            writer.writeheader()
            writer.writerows(rows)
    except BaseException:
        tmp.unlink(missing_ok=True)  # the table that was there stays as it was
        raise
    tmp.replace(path)
    return path


def write_json(path: Path, data: Mapping[str, object]) -> Path:
    """Write JSON with sorted keys and a trailing newline: stable bytes for git and ``dvc metrics``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def run_stage(main: Callable[[], int]) -> int:
    """Run a DVC stage's ``main``: an input it cannot accept (a :class:`ShiftGuardError`) ends it
    with the error's message on stderr and exit status 2, no traceback; anything else is a bug and
    keeps its traceback."""
    import sys

    try:
        return main()
    except ShiftGuardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def setup_logging(level: int | str = logging.INFO) -> None:
    """Log to stderr through rich when attached to a terminal, plain text otherwise."""
    import sys

    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler, fmt = RichHandler(show_path=False, rich_tracebacks=False), "%(message)s"
    else:  # a log file or a pipe: one line per record, never wrapped at 80 columns
        handler, fmt = logging.StreamHandler(), "%(asctime)s %(levelname)-7s %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="[%X]", handlers=[handler], force=True)
    # MLflow logs at INFO from the first use of a store ("Creating initial MLflow database
    # tables...") and resets its logger's level when imported: both ways, warnings and up only
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())
    # MONAI announces at import that an optional GPU JPEG decoder is absent; nothing uses it here
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")


def progress_bar(enabled: bool = True) -> Progress:
    """The project's rich progress bar (description, bar, n/total, elapsed, remaining).

    Use it as a context manager; when ``enabled`` is false it draws nothing.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )
