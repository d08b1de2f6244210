"""One cell of the augmentation experiment, run by Hydra's multirun sweeper.

``python -m shiftguard.experiment.runner --multirun +design=reduced`` composes ``conf/`` with the
design's sweep (``hydra.sweeper.params`` in ``conf/design/<name>.yaml``: arms x training seeds x
split seeds) and calls :func:`run_cell` once per combination, in one process (or, with the joblib
launcher, in a few), so the scored volumes are read and preprocessed once for every cell
(:class:`~shiftguard.experiment.inputs.InputCache`, from the files ``shiftguard experiment prepare``
wrote where they exist). Each cell writes, into its Hydra job folder:

- ``cell.json``: the arm, seeds, design, threshold, timings and per-set figures;
- ``predictions.csv``: every scored series with its set, scanner, label and probability;
- ``history.csv``: the training curve.

:mod:`shiftguard.experiment.report` reads the cells back and compares the arms.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shiftguard.config.loader import find_conf_dir, validate
from shiftguard.config.schema import (
    AugmentConfig,
    DataConfig,
    DesignConfig,
    EvaluateConfig,
    ModelConfig,
    SplitConfig,
    TrainConfig,
)
from shiftguard.data.split import run as split_run
from shiftguard.errors import ExperimentInputError
from shiftguard.experiment.inputs import INPUTS_DIR, InputCache
from shiftguard.utils import write_csv

log = logging.getLogger(__name__)

CELL_FILE = "cell.json"
PREDICTIONS_FILE = "predictions.csv"
PREDICTION_COLUMNS = ("set", "series_key", "scanner_model", "label", "prob")
HOLDOUT, EXTERNAL = "in_distribution", "external"


_CACHE = InputCache()


def score(
    net: torch.nn.Module,
    paths: Sequence[str],
    cfg: TrainConfig,
    batch_size: int = 16,
    cache: InputCache = _CACHE,
) -> np.ndarray:
    """Probabilities ``(N,)`` of the volumes at ``paths`` (preprocessed as validation does)."""
    inputs = cache.inputs(paths, cfg)
    device = next(net.parameters()).device
    net.eval()
    out: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            batch = torch.stack(inputs[start : start + batch_size]).to(device)
            logits = net(batch).float().reshape(-1)
            out.append(torch.sigmoid(logits).cpu().numpy().astype(np.float64))
    return np.concatenate(out) if out else np.zeros(0)


def _read_table(path: Path, what: str) -> list[dict[str, str]]:
    if not path.is_file():
        raise ExperimentInputError(
            f"{path}: the {what} is missing; `make experiment` (scripts/experiment.sh) generates, "
            "ingests and splits it on its first run"
        )
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _labelled(rows: list[dict[str, str]], splits: Sequence[str]) -> list[dict[str, str]]:
    return [
        r
        for r in rows
        if r.get("split") in set(splits) and str(r.get("finding", "")).strip() in {"0", "1"}
    ]


def set_figures(
    labels: np.ndarray, probs: np.ndarray, threshold: float, n_bins: int = 10
) -> dict[str, float]:
    """AUROC, sensitivity and specificity at ``threshold``, and ECE of one scored set."""
    from shiftguard.metrics import (
        auroc,
        expected_calibration_error,
        sensitivity_specificity,
    )

    both = labels.min() != labels.max()
    sens, spec = sensitivity_specificity(labels, probs, threshold)
    return {
        "n": int(labels.size),
        "n_positive": int(labels.sum()),
        "auroc": auroc(labels, probs) if both else math.nan,
        "sensitivity": sens,
        "specificity": spec,
        "ece": expected_calibration_error(labels, probs, n_bins=n_bins),
    }


def run_cell(config: Mapping[str, Any], out_dir: Path, root: Path | None = None) -> dict[str, Any]:
    """Split, train and score one cell of a design; write its files into ``out_dir``.

    Args:
        config: the composed configuration (``design``, ``augment``, ``train``, ``model``,
            ``split``, ``evaluate`` sections).
        out_dir: the cell's folder.
        root: where the design's relative paths start (default: the working directory).

    Returns:
        What ``cell.json`` holds.

    Raises:
        ExperimentInputError: when a design's table is missing or has no labelled series.
    """
    from shiftguard.metrics import choose_threshold
    from shiftguard.training.stage import run as train_run

    root = root or Path.cwd()
    design = validate("design", config.get("design"), DesignConfig)
    augment = validate("augment", config.get("augment"), AugmentConfig)
    train = validate("train", config.get("train"), TrainConfig)
    model = validate("model", config.get("model"), ModelConfig)
    split = validate("split", config.get("split"), SplitConfig)
    evaluate = validate("evaluate", config.get("evaluate"), EvaluateConfig)
    out_dir.mkdir(parents=True, exist_ok=True)
    here = lambda p: Path(p) if Path(p).is_absolute() else root / p  # noqa: E731
    began = time.perf_counter()

    data = validate("data", config.get("data"), DataConfig).model_copy(
        update={"labels": str(here(design.diagnoses))}
    )
    split_run(
        split, data, here(design.manifest), out_dir / "split", out_dir / "split" / "labels.csv"
    )
    trained = train_run(
        train,
        model,
        augment,
        out_dir / "split" / "dataset.csv",
        here(design.ingest),
        out_dir / "train",
        params={},
        history_csv=out_dir / "history.csv",
        track=False,
        root=root,
    )
    trained_s = time.perf_counter() - began
    from shiftguard.training.stage import load_model

    net, _ = load_model(out_dir / "train" / "model.pt")

    holdout = _labelled(_read_table(here(design.holdout), "hold-out split table"), ["val", "test"])
    external = _labelled(_read_table(here(design.external), "external split table"), ["external"])
    for name, rows in (("hold-out", holdout), ("external", external)):
        if not rows:
            raise ExperimentInputError(
                f"design {design.name}: the {name} set has no labelled series"
            )
    for cohort in (design.holdout_cohort, design.external_cohort):
        _CACHE.attach(design.cohort_folder(cohort, root) / INPUTS_DIR, train)
    sets = [(HOLDOUT, r, here(design.holdout_ingest)) for r in holdout]
    sets += [(EXTERNAL, r, here(design.external_ingest)) for r in external]
    probs = score(net, [str(folder / r["volume_path"]) for _, r, folder in sets], train)
    predictions = [
        {
            "set": name,
            "series_key": r["series_key"],
            "scanner_model": r.get("scanner_model", ""),
            "label": int(r["finding"]),
            "prob": float(p),
            "split": r["split"],
        }
        for (name, r, _), p in zip(sets, probs, strict=True)
    ]
    val = [p for p in predictions if p["set"] == HOLDOUT and p["split"] == "val"]
    threshold = choose_threshold(
        np.array([p["label"] for p in val]),
        np.array([p["prob"] for p in val]),
        evaluate.threshold_rule,
    )
    figures: dict[str, dict[str, float]] = {}
    groups: dict[str, list[dict[str, Any]]] = {
        HOLDOUT: [p for p in predictions if p["set"] == HOLDOUT]
    }
    for p in predictions:
        if p["set"] == EXTERNAL:
            groups.setdefault(str(p["scanner_model"]), []).append(p)
    for name, part in groups.items():
        figures[name] = set_figures(
            np.array([p["label"] for p in part], dtype=np.float64),
            np.array([p["prob"] for p in part]),
            threshold,
            evaluate.ece_bins,
        )
    write_csv(
        out_dir / PREDICTIONS_FILE,
        PREDICTION_COLUMNS,
        (
            {k: p[k] if k != "prob" else f"{p[k]:.8f}" for k in PREDICTION_COLUMNS}
            for p in predictions
        ),
    )
    cell = {
        "design": design.name,
        "arm": augment.training_arm,
        "train_seed": train.seed,
        "split_seed": split.seed,
        "epochs": train.epochs,
        "keep": train.keep,
        "n_train": trained.n_train,
        "n_train_positive": trained.n_train_positive,
        "threshold": float(threshold),
        "n_threshold": len(val),
        "figures": figures,
        "train_seconds": round(trained_s, 1),
        "seconds": round(time.perf_counter() - began, 1),
    }
    (out_dir / CELL_FILE).write_text(json.dumps(cell, indent=2, sort_keys=True) + "\n")
    log.info(
        "cell %s seed %d/%d: in-distribution AUROC %.3f; %s (%.0f s)",
        cell["arm"],
        train.seed,
        split.seed,
        figures[HOLDOUT]["auroc"],
        ", ".join(f"{k} {v['auroc']:.3f}" for k, v in figures.items() if k != HOLDOUT),
        cell["seconds"],
    )
    return cell


def _hydra_cell(cfg: Any) -> None:
    import multiprocessing as mp

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if mp.get_start_method(allow_none=True) == "loky":
        # a cell in a worker of Hydra's joblib launcher, whose default start method is loky's:
        # the data loader's workers are plain processes, forked as they are outside joblib
        mp.set_start_method("fork", force=True)

    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    run_cell({str(k): v for k, v in container.items()}, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    """The Hydra application: ``python -m shiftguard.experiment.runner --multirun +design=NAME``."""
    import hydra

    app = hydra.main(config_path=str(find_conf_dir()), config_name="config", version_base=None)
    app(_hydra_cell)()


if __name__ == "__main__":
    main()
