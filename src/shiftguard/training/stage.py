"""The ``train`` stage: datasets from the split table, :func:`~shiftguard.training.fit`, MLflow.

One call of :func:`run` trains the classifier on the ``train`` split, selects the epoch with the best
validation AUROC, and writes to ``out_dir``:

- ``model.pt``: the weights with everything needed to rebuild and feed the network (the ``model`` and
  ``train`` sections, the ingest grid, the network's input grid, the intensity percentiles);
- ``checkpoints/``: ``last.pt`` and ``best.pt`` (a ``shiftguard train --resume`` continues from them).

On rank 0 it logs one MLflow run: the params a reviewer compares (:data:`LOGGED_PARAMS`; the full
resolved config is the run's ``config.yaml`` artifact), per-epoch metrics (one batched call per
epoch), provenance tags, the split table as a dataset input, the model with a signature, and
registers it as a new version of ``train.registered_model`` aliased ``challenger``
(:data:`~shiftguard.tracking.CHALLENGER`). The logged model carries the metrics of the epoch whose
weights ``model.pt`` holds (the best epoch with ``train.keep: best``, else the last) and the run's
summary (``best_val_auroc``, ``best_epoch``, ...); once registered, the run is renamed
``train v<version> <arm> seed <seed>``. The run id and the registry's version number are MLflow's
alone (a fresh store numbers from 1): nothing in ``out_dir`` names them, so the same inputs give the
same files. The run is tagged with the SHA-256 of ``model.pt`` (``shiftguard.model_sha256``), by
which :func:`shiftguard.tracking.trained_model` finds it and its registered version.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
import warnings
from contextlib import nullcontext, redirect_stderr
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shiftguard.augment.arms import labels_dir
from shiftguard.config.schema import AugmentConfig, ModelConfig, TrainConfig
from shiftguard.errors import ModelFileError, TrainingDataError
from shiftguard.models import build_model
from shiftguard.tracking import (
    CHALLENGER,
    MODEL_SHA256_TAG,
    MODEL_VERSION_TAG,
    MetricLogger,
    data_version,
    file_sha256,
    run_name,
    stage_run,
)
from shiftguard.training.data import (
    build_dataset,
    build_loader,
    items_from_rows,
    labels_of,
    volume_geometry,
)
from shiftguard.training.distributed import DistContext, init_distributed, shutdown
from shiftguard.training.loop import EpochRecord, FitResult, fit
from shiftguard.utils import write_csv

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
CHECKPOINTS = "checkpoints"
HISTORY = "history.csv"
FORMAT = 1
#: the params of a training run in MLflow (keys or sections of the resolved config): what a reviewer
#: compares between runs; the whole config is the run's ``config.yaml`` artifact
LOGGED_PARAMS = (
    "data.name",
    "cohort.seed",
    "cohort.n_subjects",
    "split.seed",
    "model.network._target_",
    "model.network.channels",
    "model.network.dropout",
    "augment.enabled",
    "augment.arm",
    "augment.probability",
    "augment.backend",
    "train.seed",
    "train.epochs",
    "train.batch_size",
    "train.lr",
    "train.weight_decay",
    "train.optimizer._target_",
    "train.loss._target_",
    "train.pos_weight",
    "train.patience",
    "train.keep",
    "train.lr_schedule",
    "train.input_shape",
    "train.lesion_loss_weight",
)


@dataclass
class TrainSummary:
    """What one training run produced and measured."""

    fit: FitResult
    n_train: int
    n_val: int
    n_train_positive: int
    device: str
    augment: bool
    input_shape: tuple[int, ...]
    logging_seconds: float = 0.0
    main_process: bool = True
    run_id: str | None = None
    model_uri: str | None = None
    registered_model: str | None = None
    version: str | None = None

    @property
    def logging_overhead(self) -> float:
        """Seconds spent in MLflow calls during training, as a fraction of the training time."""
        spent = self.fit.train_seconds
        return self.logging_seconds / spent if spent > 0 else 0.0

    def to_metrics(self) -> dict[str, object]:
        """The stage's ``metrics.json``.

        Timings are left out (see :meth:`timings`): metrics are committed, and the same inputs must
        give the same file.
        """
        f = self.fit
        return {
            "best_epoch": f.best_epoch,
            "best_val_auroc": round(f.best_val_auroc, 4)
            if math.isfinite(f.best_val_auroc)
            else None,
            "epochs_run": f.epochs_run,
            "stopped_early": f.stopped_early,
            "world_size": f.world_size,
            "samples_per_rank": f.samples_per_rank,
            "weights_in_sync": f.weights_in_sync,
            "device": self.device,
            "augment": self.augment,
            "input_shape": list(self.input_shape),
            "n_train": self.n_train,
            "n_train_positive": self.n_train_positive,
            "n_val": self.n_val,
        }

    def timings(self) -> dict[str, float]:
        """What the run measured of its speed, logged to MLflow only: loader wait (share of step
        time), MLflow overhead (share of training time), training seconds and samples per second."""
        f = self.fit
        samples_per_second = f.samples_trained / f.train_seconds if f.train_seconds > 0 else 0.0
        return {
            "data_wait_fraction": round(f.data_wait_fraction, 4),
            "logging_overhead": round(self.logging_overhead, 5),
            "train_seconds": round(f.train_seconds, 2),
            "samples_per_second": round(samples_per_second, 2),
        }


def read_rows(dataset_csv: Path) -> list[dict[str, str]]:
    """Rows of ``dataset.csv``.

    Raises:
        TrainingDataError: when the file is missing or has no ``split`` column.
    """
    if not dataset_csv.is_file():
        raise TrainingDataError(
            f"{dataset_csv}: no split table; run the split stage first (dvc repro split)"
        )
    with dataset_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and "split" not in rows[0]:
        raise TrainingDataError(f"{dataset_csv}: no 'split' column; it is not a split table")
    return rows


def save_model(
    path: Path,
    net: nn.Module,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    spacing: tuple[float, ...],
    shape: tuple[int, ...],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the weights and what rebuilding and feeding the network takes to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "model": model_cfg.model_dump(mode="json"),
        "train": train_cfg.model_dump(mode="json"),
        "input": {
            "ingest_spacing": [float(s) for s in spacing],
            "ingest_shape": [int(s) for s in shape],
            "input_shape": [int(s) for s in (train_cfg.input_shape or shape)],
            "intensity_percentiles": list(train_cfg.intensity_percentiles),
        },
        **(extra or {}),
    }
    torch.save(payload, path)
    return path


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The network of a ``model.pt`` (in eval mode) and the file's contents.

    Raises:
        ModelFileError: when the file is missing, unreadable or of another format.
    """
    if not Path(path).is_file():
        raise ModelFileError(
            f"{path}: no trained model; run the train stage first (dvc repro train)"
        )
    try:  # weights_only: tensors and plain containers; a pickled object is refused, never run
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFileError(
            f"{path}: not a readable model file ({reason}); a model file holds tensors and plain "
            "values only: re-run training"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(
            f"{path}: not a ShiftGuard model file of format {FORMAT}; re-run the train stage"
        )
    net = build_model(ModelConfig.model_validate(payload["model"]))
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ModelFileError(f"{path}: weights do not fit the network it names: {err}") from err
    return net.to(device).eval(), payload


HISTORY_COLUMNS = ("epoch", "train_loss", "val_auroc")
"""The columns of ``history.csv``: not the epoch's timings (MLflow has them), so the same run gives
the same file."""


def _write_history(path: Path, history: list[EpochRecord]) -> None:
    rows = (
        {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(record).items()}
        for record in history
    )
    write_csv(path, HISTORY_COLUMNS, rows, line_end="\r\n")  # the line ends it always had


def saved_epoch(result: FitResult, keep: str) -> int:
    """The epoch whose weights ``model.pt`` holds: the best one with ``keep == "best"`` (when
    there was one), else the last one run."""
    if keep == "best" and result.best_epoch >= 0 and result.best_checkpoint.is_file():
        return result.best_epoch
    return result.history[-1].epoch if result.history else max(result.best_epoch, 0)


def _log_model(
    net: nn.Module, input_shape: tuple[int, ...], registered_model: str, step: int
) -> tuple[str, str | None, str]:
    """Log the network with its signature, register it and alias the new version ``challenger``.

    ``step`` is the epoch whose weights these are: MLflow links that step's metrics (the epoch's
    ``train_loss``, ``val_auroc``, ...) to the logged model. Returns the model's URI, the registered
    version (``None`` when registration failed) and the logged model's id.
    """
    import mlflow
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    example = np.zeros((1, 1, *input_shape), dtype=np.float32)
    with torch.no_grad():
        output = net.cpu().eval()(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    # MLflow prints "Registered model ... already exists" and "Created version ..." straight to
    # stderr (the log line below says it once), and warns on every call that the pickle format we
    # chose runs code when loaded (the edge never loads it: it runs the bundle's ONNX). Its logged
    # warnings and errors still show: logging's handler keeps the real stderr.
    pickle_note = logging.getLogger("mlflow.pytorch")
    level = pickle_note.level
    pickle_note.setLevel(logging.ERROR)
    try:
        with redirect_stderr(io.StringIO()):
            info = mlflow.pytorch.log_model(
                net,
                name="model",
                signature=signature,
                registered_model_name=registered_model,
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    "monai",
                    "shiftguard",
                ],
                serialization_format="pickle",
                await_registration_for=60,
                step=step,
            )
    finally:
        pickle_note.setLevel(level)
    version = info.registered_model_version
    if version is not None:
        MlflowClient().set_registered_model_alias(registered_model, CHALLENGER, str(version))
        log.info("registered %s version %s as @%s", registered_model, version, CHALLENGER)
    return info.model_uri, None if version is None else str(version), str(info.model_id)


def run(
    train_cfg: TrainConfig,
    model_cfg: ModelConfig,
    augment_cfg: AugmentConfig,
    dataset_csv: Path,
    ingest_dir: Path,
    out_dir: Path,
    params: dict[str, Any] | None = None,
    history_csv: Path | None = None,
    track: bool = True,
    resume: bool = False,
    device: str | None = None,
    root: Path | None = None,
) -> TrainSummary:
    """Train, select, save, log and register the classifier (see the module docstring).

    Args:
        train_cfg: the ``train`` section.
        model_cfg: the ``model`` section.
        augment_cfg: the ``augment`` section; ``enabled: false`` trains without scanner simulation.
        dataset_csv: the split table.
        ingest_dir: the folder its ``volume_path`` column is relative to.
        out_dir: receives ``model.pt`` and ``checkpoints/``.
        params: the resolved config logged as MLflow params (default: the three sections).
        history_csv: per-epoch records for ``dvc plots``.
        track: log to MLflow (rank 0 only).
        resume: continue from ``out_dir/checkpoints/last.pt``.
        device: ``cpu``/``cuda``; CUDA when available if omitted.
        root: the project root (tracking store, ``data.dvc``); default: cwd.

    Raises:
        TrainingDataError: when the split table lacks a labelled train or val split.
    """
    ctx: DistContext = init_distributed(device)
    try:
        return _run(
            ctx,
            train_cfg,
            model_cfg,
            augment_cfg,
            dataset_csv,
            ingest_dir,
            out_dir,
            params,
            history_csv,
            track,
            resume,
            root or Path.cwd(),
        )
    finally:
        shutdown(ctx)


def _lesion_masks(train_cfg: TrainConfig, model_cfg: ModelConfig, root: Path) -> Path | None:
    """The folder of ``train.lesion_masks`` (relative to ``root``) when the lesion-map loss is on.

    Raises:
        TrainingDataError: when the folder is missing or the network has no lesion head.
    """
    if train_cfg.lesion_masks is None or train_cfg.lesion_loss_weight == 0:
        return None
    folder = Path(train_cfg.lesion_masks)
    folder = folder if folder.is_absolute() else root / folder
    if not folder.is_dir():
        raise TrainingDataError(
            f"train.lesion_masks: {folder} is not a folder of lesion masks; point it at one "
            "(the cohort writes data/ground_truth/masks) or set train.lesion_masks=null"
        )
    if not model_cfg.network.get("lesion_head", False):
        raise TrainingDataError(
            "train.lesion_masks is set but model.network has no lesion head: set "
            "model.network.lesion_head=true (SmallCNN3d) or train.lesion_masks=null"
        )
    return folder


def _label_maps(augment_cfg: AugmentConfig, root: Path) -> Path | None:
    """The folder of tissue label maps the augmentation arm reads (relative to ``root``), if any.

    Raises:
        TrainingDataError: when the arm needs one and the folder is missing.
    """

    name = labels_dir(augment_cfg)
    if name is None:
        return None
    folder = Path(name) if Path(name).is_absolute() else root / name
    if not folder.is_dir():
        raise TrainingDataError(
            f"augment.{augment_cfg.training_arm}.labels_dir: {folder} is not a folder of tissue "
            "label maps; point it at one (the cohort writes data/ground_truth/labels) or train "
            "another augmentation arm"
        )
    return folder


def _run(
    ctx: DistContext,
    train_cfg: TrainConfig,
    model_cfg: ModelConfig,
    augment_cfg: AugmentConfig,
    dataset_csv: Path,
    ingest_dir: Path,
    out_dir: Path,
    params: dict[str, Any] | None,
    history_csv: Path | None,
    track: bool,
    resume: bool,
    root: Path,
) -> TrainSummary:
    rows = read_rows(dataset_csv)
    masks_dir = _lesion_masks(train_cfg, model_cfg, root)
    augment = augment_cfg if augment_cfg.training_arm != "none" else None
    if augment is not None and str(augment.device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingDataError(
                f"augment.device={augment.device}: no CUDA device is available here; run the arm "
                "in the loader's workers on the CPU (augment.device=null)"
            )
        if ctx.distributed:
            augment = augment.model_copy(update={"device": str(ctx.device)})  # a GPU per rank
    try:
        train_items = items_from_rows(
            rows,
            ingest_dir,
            "train",
            masks_dir=masks_dir,
            labels_dir=_label_maps(augment_cfg, root),
        )
    except ValueError as exc:
        raise TrainingDataError(f"{dataset_csv}: {exc}") from exc
    val_items = items_from_rows(rows, ingest_dir, "val")
    for name, items in (("train", train_items), ("val", val_items)):
        if not items:
            raise TrainingDataError(
                f"{dataset_csv}: the {name} split is empty; check split.fractions and the cohort size"
            )
    labels = labels_of(train_items)
    if labels.min() == labels.max():
        raise TrainingDataError(
            f"{dataset_csv}: every training series has finding={labels[0]:.0f}; a classifier needs "
            "both classes (check the cohort's prevalence and split.stratify_on)"
        )
    spacing, shape = volume_geometry([i["image"] for i in train_items + val_items])
    input_shape = tuple(train_cfg.input_shape or shape)
    log.info(
        "train: %d series (%d positive), val: %d; grid %s -> input %s; augmentation arm %s; "
        "lesion masks %s; %s",
        len(train_items),
        int(labels.sum()),
        len(val_items),
        shape,
        input_shape,
        augment_cfg.training_arm,
        masks_dir or "off",
        f"{ctx.world_size} processes" if ctx.distributed else "1 process",
    )
    train_ds = build_dataset(train_items, train_cfg, train=True, augment=augment, spacing=spacing)
    val_ds = build_dataset(val_items if ctx.is_main else val_items[:1], train_cfg)
    train_loader = build_loader(train_ds, train_cfg, shuffle=True, ctx=ctx)
    val_loader = build_loader(val_ds, train_cfg, shuffle=False)
    torch.manual_seed(train_cfg.seed)  # the initial weights: the same seed, the same network
    net = build_model(model_cfg)

    out_dir.mkdir(parents=True, exist_ok=True)
    params = (
        params
        if params is not None
        else {
            "train": train_cfg.model_dump(mode="json"),
            "model": model_cfg.model_dump(mode="json"),
            "augment": augment_cfg.model_dump(mode="json"),
        }
    )
    tracking = track and ctx.is_main
    if tracking:
        context: Any = stage_run(
            "train",
            params,
            root=root,
            tags={
                "shiftguard.augment": str(bool(augment)),
                "shiftguard.augment_arm": augment_cfg.training_arm,
            },
            name=f"train {augment_cfg.training_arm} seed {train_cfg.seed}",
            logged_params=LOGGED_PARAMS,
        )
    else:
        context = nullcontext(None)
    with context as mlrun:
        logger = None
        if mlrun is not None:
            logger = MetricLogger(mlrun.info.run_id)
            _log_dataset(rows, dataset_csv, root)

        def log_epoch(record: EpochRecord) -> None:
            if logger is not None:
                logger.log(
                    {
                        "train_loss": record.train_loss,
                        "val_auroc": record.val_auroc,
                        "data_wait_fraction": record.data_wait_fraction,
                        "epoch_seconds": record.seconds,
                    },
                    step=record.epoch,
                )

        began = time.perf_counter()
        result = fit(
            net,
            train_loader,
            val_loader,
            train_cfg,
            checkpoint_dir=out_dir / CHECKPOINTS,
            resume=resume,
            log_fn=log_epoch,
            ctx=ctx,
        )
        summary = TrainSummary(
            fit=result,
            n_train=len(train_items),
            n_val=len(val_items),
            n_train_positive=int(labels.sum()),
            device=str(ctx.device if ctx.distributed else next(net.parameters()).device),
            augment=augment is not None,
            input_shape=input_shape,
            logging_seconds=logger.seconds if logger else 0.0,
            main_process=ctx.is_main,
        )
        timings = summary.timings()
        log.info(
            "fit took %.1f s: %.2f samples/s, loader wait %.0f%% of step time",
            time.perf_counter() - began,
            timings["samples_per_second"],
            100 * timings["data_wait_fraction"],
        )
        if not ctx.is_main:
            return summary
        save_model(
            out_dir / MODEL_FILE,
            net,
            model_cfg,
            train_cfg,
            spacing,
            shape,
            extra={
                "best_epoch": result.best_epoch,
                "best_val_auroc": result.best_val_auroc,
                # what the held-out-profile rule of validation needs to know
                "augment": {
                    "arm": augment_cfg.training_arm,
                    "profiles_seen": augment_cfg.seen_profiles(),
                },
            },
        )
        if history_csv is not None:
            _write_history(history_csv, result.history)
        if mlrun is not None:
            import mlflow

            assert logger is not None
            mlflow.set_tag(MODEL_SHA256_TAG, file_sha256(out_dir / MODEL_FILE))
            summary.run_id = mlrun.info.run_id
            # the model first: it takes the metrics of the epoch its weights are from; the
            # summary then goes onto the run and the model alike
            summary.model_uri, summary.version, model_id = _log_model(
                net, input_shape, train_cfg.registered_model, saved_epoch(result, train_cfg.keep)
            )
            summary.registered_model = train_cfg.registered_model
            logger.log(_numbers(summary.to_metrics()), model_id=model_id)
            logger.log(_numbers(summary.timings()))
            if summary.version is not None:
                mlflow.set_tag(MODEL_VERSION_TAG, f"{train_cfg.registered_model}/{summary.version}")
                mlflow.set_tag(
                    "mlflow.runName",
                    run_name(
                        f"train v{summary.version} {augment_cfg.training_arm} seed {train_cfg.seed}"
                    ),
                )
            if history_csv is not None:
                mlflow.log_artifact(str(history_csv))
    return summary


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of ``values`` (booleans and ``None`` left out) as floats."""
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and v is not None
    }


def _log_dataset(rows: list[dict[str, str]], dataset_csv: Path, root: Path) -> None:
    """Record the split table as the run's dataset input, with the raw data's DVC hash."""
    import mlflow
    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas

    frame = pd.DataFrame(rows)
    digest = data_version(root)
    with warnings.catch_warnings():
        # a local path fits several of MLflow's source types; it picks the local-file one
        warnings.filterwarnings("ignore", message="The specified dataset source")
        dataset = from_pandas(
            frame,
            source=str(dataset_csv.resolve()),
            targets="finding",
            name="shiftguard-cohort",
            digest=(digest or "")[:36] or None,
        )
    mlflow.log_input(dataset, context="training")
