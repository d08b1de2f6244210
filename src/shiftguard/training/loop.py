"""A seeded, resumable training loop selecting the epoch with the best validation AUROC.

Every epoch starts from seeds derived from ``cfg.seed`` and the epoch number (torch's global
generator, the loader's shuffling generator or distributed sampler, the dataset's random transforms,
seeded per sample by :class:`~shiftguard.training.data.SeededCacheDataset`), so a run resumed from
its last checkpoint follows exactly the path an uninterrupted run takes, whatever the number of
loader workers.

Under ``torchrun`` (a :class:`~shiftguard.training.distributed.DistContext` with several processes)
the model is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, each rank trains on its
shard of every epoch, rank 0 scores the validation set and broadcasts the score so every rank makes
the same early-stopping decision, and only rank 0 writes checkpoints.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data.utils import set_rnd
from monai.utils import set_determinism
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from shiftguard.config.schema import TrainConfig
from shiftguard.errors import ModelFileError
from shiftguard.metrics import auroc
from shiftguard.training.distributed import DistContext, broadcast_object, gather_objects
from shiftguard.utils import progress_bar

log = logging.getLogger(__name__)

LAST, BEST = "last.pt", "best.pt"
_CHECKPOINTED = ("epoch", "train_loss", "val_auroc")  # not the timings: same run, same bytes


@dataclass
class EpochRecord:
    """What one epoch measured.

    ``data_wait_fraction`` and ``seconds`` are timings: they are not checkpointed (the same inputs
    must give the same ``last.pt``), so epochs restored by a resume have NaN there.
    """

    epoch: int
    train_loss: float
    val_auroc: float
    data_wait_fraction: float
    seconds: float


@dataclass
class FitResult:
    """The outcome of :func:`fit`.

    ``data_wait_fraction`` is the share of training-step time spent waiting for the loader, in
    ``[0, 1]``, over the epochs this call ran.
    """

    best_epoch: int
    best_val_auroc: float
    epochs_run: int
    stopped_early: bool
    best_checkpoint: Path
    last_checkpoint: Path
    data_wait_fraction: float
    history: list[EpochRecord] = field(default_factory=list)
    world_size: int = 1
    samples_per_rank: list[int] = field(default_factory=list)
    weights_in_sync: bool = True
    train_seconds: float = 0.0
    samples_trained: int = 0


def _load_checkpoint(path: Path, device: str | torch.device) -> dict[str, Any]:
    """A resume checkpoint (``last.pt``), read with ``weights_only``: a pickled object is refused,
    never run.

    Raises:
        ModelFileError: the file is unreadable or holds anything but tensors and plain values.
    """
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFileError(
            f"{path}: not a readable checkpoint ({reason}); delete it to train from the start"
        ) from err
    if not isinstance(state, dict) or "model" not in state:
        raise ModelFileError(
            f"{path}: not a training checkpoint; delete it to train from the start"
        )
    return state


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Call the ``train.optimizer`` partial with the model's parameters, ``lr`` and ``weight_decay``."""
    from hydra.utils import instantiate

    make: Any = instantiate(cfg.optimizer)
    optimizer: torch.optim.Optimizer = make(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    return optimizer


def build_loss(cfg: TrainConfig, train_labels: np.ndarray | None = None) -> nn.Module:
    """Instantiate ``train.loss`` with ``pos_weight`` as a one-element tensor when set.

    Args:
        cfg: the ``train`` section.
        train_labels: training labels ``(N,)``; needed for ``pos_weight: balanced``.

    Raises:
        ValueError: for ``balanced`` without labels of both classes.
    """
    from hydra.utils import instantiate

    weight: float | None
    if cfg.pos_weight == "balanced":
        if train_labels is None:
            raise ValueError("train.pos_weight=balanced needs the training labels")
        positives = float(np.sum(train_labels == 1))
        negatives = float(np.sum(train_labels == 0))
        if positives == 0 or negatives == 0:
            raise ValueError(
                "train.pos_weight=balanced: the training set has only one class "
                f"({positives:.0f} positive, {negatives:.0f} negative); fix the split"
            )
        weight = negatives / positives
    else:
        weight = cfg.pos_weight
    kwargs = {} if weight is None else {"pos_weight": torch.tensor([weight])}
    loss: nn.Module = instantiate(cfg.loss, **kwargs)
    return loss


def lesion_map_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Class-balanced binary cross-entropy between lesion logits ``(B, 1, x, y, z)`` and the lesion
    fraction per voxel ``mask`` ``(B, 1, X, Y, Z)`` on the input grid.

    The target of each logit is the largest lesion fraction within its cell (adaptive max pooling
    to the logits' grid), a soft label in ``[0, 1]``. Lesion and background each weigh half of the
    loss, so a lesion filling a few of the ~1,000 cells is not drowned out; a batch without lesions
    weighs its background by one half too.

    >>> x = torch.zeros(1, 1, 2, 2, 2); m = torch.zeros(1, 1, 4, 4, 4); m[..., 0, 0, 0] = 1.0
    >>> round(float(lesion_map_loss(x, m)), 4)  # log 2 whatever the balance
    0.6931
    """
    target = F.adaptive_max_pool3d(mask.float(), logits.shape[2:]).clamp(0.0, 1.0)
    cells = float(target.numel())
    positive = target.sum()
    negative = cells - positive
    w_pos = cells / (2.0 * positive) if float(positive) > 0 else torch.zeros(())
    w_neg = cells / (2.0 * negative) if float(negative) > 0 else torch.zeros(())
    per_cell = -(
        w_pos * target * F.logsigmoid(logits) + w_neg * (1 - target) * F.logsigmoid(-logits)
    )
    return per_cell.mean()


class TrainStep:
    """One optimisation step: forward, loss, backward, optimizer update; AMP (float16 autocast with
    a gradient scaler) when ``amp`` is set and the device is CUDA.

    With a lesion ``mask`` and ``lesion_weight`` above 0 the loss adds ``lesion_weight`` times
    :func:`lesion_map_loss` of the network's lesion map (``model(image, lesion_map=True)``).

    :func:`fit` runs every batch through it, and ``benchmarks/train_throughput.py`` times it, so the
    benchmark measures the step training really takes.

    Args:
        model: the module to train (may be DDP-wrapped).
        optimizer: over ``model``'s parameters.
        criterion: maps ``(logits (B, 1) float32, labels (B, 1))`` to a scalar loss.
        device: where ``model`` lives.
        amp: mixed precision; ignored off CUDA.
        lesion_weight: the lesion-map loss's weight.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: nn.Module,
        device: torch.device,
        amp: bool = False,
        lesion_weight: float = 0.0,
    ) -> None:
        self.model, self.optimizer, self.criterion, self.device = (
            model,
            optimizer,
            criterion,
            device,
        )
        self.amp = amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.lesion_weight = float(lesion_weight)

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, mask: torch.Tensor | None = None
    ) -> float:
        """Train on one batch already on the device; returns its loss (synchronised on CUDA)."""
        self.optimizer.zero_grad(set_to_none=True)
        autocast = (
            torch.autocast(device_type="cuda", dtype=torch.float16) if self.amp else nullcontext()
        )
        with autocast:
            if mask is not None and self.lesion_weight > 0:
                logits, lesion = self.model(image, lesion_map=True)
                loss = self.criterion(logits.float(), label) + self.lesion_weight * (
                    lesion_map_loss(lesion.float(), mask)
                )
            else:
                loss = self.criterion(self.model(image).float(), label)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())  # waits for the step to finish on CUDA


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """The learning rate of ``epoch`` (0-based) under ``cfg.lr_schedule``.

    ``constant``: ``cfg.lr`` throughout. ``cosine``: a linear warm-up over ``cfg.warmup_epochs``
    (from ``lr / (warmup + 1)``), then half a cosine from ``lr`` at the first epoch after it down to
    ``lr * min_lr_ratio`` at the last epoch. A function of the epoch alone, so a resumed run sets the
    same rates as an uninterrupted one.

    >>> from shiftguard.config.schema import TrainConfig
    >>> cfg = TrainConfig(epochs=5, lr=1.0, lr_schedule="cosine")
    >>> [round(lr_at(cfg, e), 3) for e in range(5)]
    [1.0, 0.854, 0.5, 0.146, 0.0]
    """
    if cfg.lr_schedule == "constant":
        return cfg.lr
    warm = cfg.warmup_epochs
    if epoch < warm:
        return cfg.lr * (epoch + 1) / (warm + 1)
    span = cfg.epochs - 1 - warm
    progress = (epoch - warm) / span if span > 0 else 1.0
    low = cfg.lr * cfg.min_lr_ratio
    return low + (cfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _seed_epoch(loader: DataLoader[Any], seed: int, epoch: int) -> None:
    torch.manual_seed(seed)
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(seed)
    sampler: Any = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)  # DistributedSampler: seed + epoch decides the shards
    dataset: Any = loader.dataset
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)  # SeededCacheDataset: each sample seeded from seed, epoch, index
    else:
        set_rnd(dataset, seed)  # other datasets: one stream per process (workers: MONAI's seeds)


def _checksum(model: nn.Module) -> float:
    """A sum over the learnable weights (not the buffers: each DDP rank updates its own batch-norm
    statistics in the last step; rank 0's are the ones saved)."""
    with torch.no_grad():
        return float(sum(p.double().sum().item() for p in model.parameters()))


def _to_device(
    batch: dict[str, Any], device: torch.device, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.as_tensor(batch["image"]).to(device, non_blocking=True).float()
    if channels_last and image.dim() == 5:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    label = torch.as_tensor(batch["label"]).to(device).float().reshape(-1, 1)
    return image, label


def _mask_to_device(batch: dict[str, Any], device: torch.device) -> torch.Tensor | None:
    mask = batch.get("mask")
    return None if mask is None else torch.as_tensor(mask).to(device, non_blocking=True).float()


def predict(
    model: nn.Module, loader: DataLoader[Any], device: torch.device | str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Probabilities for every sample of ``loader``, in its order.

    Returns:
        ``(labels, probs, keys)``: labels ``(N,)`` and sigmoid probabilities ``(N,)`` as float64,
        and the ``key`` of each sample.
    """
    device = torch.device(device)
    model.eval()
    labels: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    keys: list[str] = []
    with torch.no_grad():
        for batch in loader:
            image, label = _to_device(batch, device)
            logits = model(image).float().reshape(-1)
            probs.append(torch.sigmoid(logits).cpu().numpy().astype(np.float64))
            labels.append(label.reshape(-1).cpu().numpy().astype(np.float64))
            keys.extend(str(k) for k in batch.get("key", [""] * len(label)))
    if not labels:
        return np.zeros(0), np.zeros(0), []
    return np.concatenate(labels), np.concatenate(probs), keys


def _score(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def fit(
    model: nn.Module,
    train_loader: DataLoader[Any],
    val_loader: DataLoader[Any],
    cfg: TrainConfig,
    device: torch.device | str | None = None,
    checkpoint_dir: Path | str = Path("checkpoints"),
    resume: bool = True,
    log_fn: Callable[[EpochRecord], None] | None = None,
    loss_fn: nn.Module | None = None,
    ctx: DistContext | None = None,
    show_progress: bool = True,
) -> FitResult:
    """Train ``model``, keeping the epoch with the best validation AUROC.

    Args:
        model: maps ``(B, 1, X, Y, Z)`` to logits ``(B, 1)``.
        train_loader: batches ``{"image", "label"}`` (and ``"mask"``: the lesion-map loss, weighted
            by ``cfg.lesion_loss_weight``); reseeded every epoch.
        val_loader: the validation batches, for the AUROC.
        cfg: the ``train`` section (seed, epochs, optimizer, loss, patience, amp).
        device: where to train; CUDA when available when omitted. AMP runs only on CUDA.
        checkpoint_dir: receives ``last.pt`` (model, optimizer, scaler, epoch, best so far, history
            without timings) after every epoch and ``best.pt`` (model weights of the best epoch).
        resume: continue from ``checkpoint_dir/last.pt`` when it exists.
        log_fn: called with each epoch's record (e.g. to log to MLflow).
        loss_fn: the criterion; when omitted, :func:`build_loss` from ``cfg`` and the labels of
            ``train_loader.dataset.data`` (the items of a MONAI dataset).
        ctx: the process's place under ``torchrun``; ``None`` trains in this process alone. Its
            ``device`` is used when ``device`` is omitted. ``log_fn`` runs on rank 0 only.
        show_progress: a progress bar over the epochs (rank 0 only) with the last epoch's loss and
            validation AUROC; each epoch is also logged at ``DEBUG``.

    Returns:
        The :class:`FitResult`; the model holds the best epoch's weights (the last epoch's with
        ``cfg.keep == "last"``).
    """
    ctx = ctx or DistContext()
    if device is None:
        device = ctx.device if ctx.distributed else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = checkpoint_dir / LAST, checkpoint_dir / BEST

    set_determinism(seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    if device.type == "cpu":
        # simulated noise and bias fields leave subnormal floats, which slow CPU convolutions
        # several-fold; flushing them to zero changes no result that matters
        torch.set_flush_denormal(True)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    optimizer = build_optimizer(model, cfg)
    items = getattr(train_loader.dataset, "data", None)
    if loss_fn is None:
        labels = np.asarray([float(i["label"]) for i in items]) if items is not None else None
        loss_fn = build_loss(cfg, labels)
    criterion = loss_fn.to(device)
    net = model  # the bare module: checkpoints, validation and the result
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # a lesion head trained without masks (train.lesion_masks=null) gets no gradient, which
        # DDP refuses unless told to look for unused parameters
        first = items[0] if items else {}
        unused_head = getattr(net, "lesion_head", None) is not None and "mask" not in first
        model = DistributedDataParallel(net, device_ids=ids, find_unused_parameters=unused_head)
    stepper = TrainStep(
        model, optimizer, criterion, device, amp=cfg.amp, lesion_weight=cfg.lesion_loss_weight
    )
    scaler = stepper.scaler

    start, best_auroc, best_epoch, stale, stopped = 0, -math.inf, -1, 0, False
    history: list[EpochRecord] = []
    if resume and last_path.is_file():
        state = _load_checkpoint(last_path, device)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start, best_auroc, best_epoch = state["epoch"] + 1, state["best_auroc"], state["best_epoch"]
        stale, stopped = state["stale"], state["stopped"]
        history = [
            EpochRecord(
                epoch=int(r["epoch"]),
                train_loss=float(r["train_loss"]),
                val_auroc=float(r["val_auroc"]),
                data_wait_fraction=math.nan,
                seconds=math.nan,
            )
            for r in state["history"]
        ]
        log.info("resuming from %s at epoch %d", last_path, start)

    wait_total = step_total = train_seconds = 0.0
    ran = seen = 0
    # one line that updates in place, not a log line per epoch (``DEBUG`` logs each epoch)
    with progress_bar(enabled=ctx.is_main and show_progress) as bar:
        task = bar.add_task("training", total=cfg.epochs, completed=start)
        for epoch in range(start, cfg.epochs):
            if stopped:
                break
            began = time.perf_counter()
            _seed_epoch(train_loader, cfg.seed * 100_003 + epoch, epoch)
            _set_lr(optimizer, lr_at(cfg, epoch))
            model.train()
            losses: list[float] = []
            wait = step = 0.0
            mark = time.perf_counter()
            for batch in train_loader:
                arrived = time.perf_counter()
                image, label = _to_device(batch, device, cfg.channels_last)
                losses.append(stepper(image, label, _mask_to_device(batch, device)))
                seen += int(label.shape[0])
                done = time.perf_counter()
                wait += arrived - mark
                step += done - mark
                mark = done
            train_seconds += time.perf_counter() - began
            val_auroc = math.nan
            if ctx.is_main:
                labels, probs, _ = predict(net, val_loader, device)
                val_auroc = auroc(labels, probs) if len(labels) else math.nan
            val_auroc = float(broadcast_object(val_auroc, ctx))
            rank_losses = [x for part in gather_objects(losses, ctx) for x in part]
            record = EpochRecord(
                epoch=epoch,
                train_loss=float(np.mean(rank_losses)) if rank_losses else math.nan,
                val_auroc=float(val_auroc),
                data_wait_fraction=wait / step if step > 0 else 0.0,
                seconds=time.perf_counter() - began,
            )
            history.append(record)
            wait_total, step_total, ran = wait_total + wait, step_total + step, ran + 1
            if best_epoch < 0 or _score(val_auroc) > best_auroc + cfg.min_delta:
                best_auroc, best_epoch, stale = _score(val_auroc), epoch, 0
                if ctx.is_main:
                    torch.save(net.state_dict(), best_path)
            else:
                stale += 1
                stopped = stale >= cfg.patience
            bar.update(
                task,
                advance=1,
                description=f"epoch {epoch}: loss {record.train_loss:.3f}, "
                f"val AUROC {record.val_auroc:.3f} (best: epoch {best_epoch})",
            )
            if not ctx.is_main:
                continue
            torch.save(
                {
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch,
                    "best_auroc": best_auroc,
                    "best_epoch": best_epoch,
                    "stale": stale,
                    "stopped": stopped,
                    "history": [{k: asdict(r)[k] for k in _CHECKPOINTED} for r in history],
                },
                last_path,
            )
            log.debug(
                "epoch %d: loss %.4f, val AUROC %.3f, data wait %.0f%%",
                epoch,
                record.train_loss,
                record.val_auroc,
                100 * record.data_wait_fraction,
            )
            if log_fn is not None:
                log_fn(record)
            if stopped:
                log.info("early stop: no val AUROC gain for %d epochs (best %d)", stale, best_epoch)

    per_rank = gather_objects(seen, ctx)
    in_sync = len({round(c, 6) for c in gather_objects(_checksum(net), ctx)}) == 1
    if not in_sync:
        log.error("model weights differ between ranks after training: check the DDP set-up")
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has written best.pt
    if best_path.is_file() and cfg.keep == "best":
        net.load_state_dict(torch.load(best_path, map_location=device, weights_only=True))
    if cfg.channels_last:
        net.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return FitResult(
        best_epoch=best_epoch,
        best_val_auroc=best_auroc if math.isfinite(best_auroc) else math.nan,
        epochs_run=ran,
        stopped_early=stopped,
        best_checkpoint=best_path,
        last_checkpoint=last_path,
        data_wait_fraction=wait_total / step_total if step_total > 0 else 0.0,
        history=history,
        world_size=ctx.world_size,
        samples_per_rank=[int(n) for n in per_rank],
        weights_in_sync=in_sync,
        train_seconds=train_seconds,
        samples_trained=int(sum(per_rank)),
    )
