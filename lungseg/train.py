"""Training loops of paper A ("Experiment settings"): plain functions, no framework.

- Segmentation (``train-seg``): 3D Res U-Net, Adam, learning rate 1e-2 then
  1e-3 then 1e-4 by epoch, batch 6, 64 epochs, BCE for the first 3 epochs then
  Dice (:class:`lungseg.losses.SegLoss`), Xavier initialisation. Validation:
  voxel Dice over the validation sub-cases.
- Classification (``train-cls``): 3D ResNet50, Adam, learning rate 1e-4,
  batch 16, 52 epochs, NLL on log-softmax. Validation: AUC and accuracy.

The paper does not say at which epochs the learning rate drops; the defaults
drop it at epochs 32 and 48 of 64 (half-way, then three quarters).

Training is one loop (:func:`fit`) over a table of tasks (:data:`TASKS`): the
config's type (:mod:`lungseg.configs`) picks the dataset, the loss, the
validation and the metric that chooses ``best.pt``; adding a task is one
entry. Checkpoints are written and read by :mod:`lungseg.checkpoints`.

A run folder holds ``config.json``, ``log.jsonl`` (one JSON line per epoch),
``curves.png``, and the checkpoints ``last.pt`` (after every epoch) and
``best.pt`` (best validation metric). Checkpoints hold only tensors and plain
data (model, optimizer, scheduler and RNG states, epoch, best metric, config)
and load with ``torch.load(..., weights_only=True)``; they are written to a
temporary file and renamed, so an interrupted run never leaves a torn one.
``resume=True`` continues from ``last.pt``: the data order and augmentation
of every epoch are drawn from ``(seed, epoch)``, so the remaining epochs give
the same losses as an uninterrupted run on the same device.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from . import distributed, metrics
from .cache import Cache
from .checkpoints import (CHECKPOINT_FORMAT, load_checkpoint, load_model,  # noqa: F401  (re-exported)
                          save_checkpoint, unwrap)
from .configs import ClsConfig, DetConfig, SegConfig, TrainConfig  # noqa: F401  (re-exported)
from .datasets import CandidateDataset, CandidateSegDataset, EpochSampler, RoiDataset, SubcaseDataset
from .device import fast_layout, precision_context
from .errors import TrainingError  # noqa: F401  (re-exported)
from .losses import SegLoss
from .malignancy import cls_loss
from .splits import read_split, split_scans

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# RNG state (exact resume)
# --------------------------------------------------------------------------

def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------
# One epoch of training, one of validation
# --------------------------------------------------------------------------

def _batches(loader: DataLoader, max_batches: int):
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        yield batch


#: Consecutive steps with a non-finite loss or gradient after which a run stops.
MAX_SKIPPED_STEPS = 5


def _grads_finite(model) -> bool:
    return all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def train_one_epoch(model, loader, loss_fn: Callable, optimizer, *, device, precision: str,
                    scaler=None, grad_clip: float = 0.0, max_batches: int = 0,
                    on_batch: Callable[[int, float], None] | None = None,
                    on_skip: Callable[[int, str], None] | None = None,
                    world: distributed.World = distributed.World()) -> float:
    """One pass over ``loader``; returns the mean loss of the steps taken (over all processes of ``world``).

    Non-finite input is a data error and stops the run. A step whose loss or
    gradients are not finite although its input is (seen here: oneDNN's 3D
    convolutions on some CPUs now and then return NaN from finite input) is
    skipped, as a ``GradScaler`` skips fp16 overflows, and reported through
    ``on_skip(batch, reason)``; :data:`MAX_SKIPPED_STEPS` in a row (a diverged
    run) stop it. Stopping raises :class:`TrainingError`; the last checkpoint is
    then the previous epoch's.
    """
    model.train()
    total, count, in_a_row = 0.0, 0, 0
    for i, (x, y) in enumerate(_batches(loader, max_batches)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if not torch.isfinite(x).all():
            raise TrainingError(f"batch {i} holds non-finite input values; the cache is damaged "
                                "(the last checkpoint is from the previous epoch)")
        optimizer.zero_grad(set_to_none=True)
        with precision_context(device, precision):
            out = model(x)
        loss = loss_fn(out.float(), y)
        problem = "" if torch.isfinite(loss) else f"the loss became {loss.item()}"
        if distributed.any_process(bool(problem), world) and not problem:      # skipped together
            problem = "the loss became non-finite in another process"
        if not problem:
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if scaler is None and not _grads_finite(model):
                problem = "the gradients became non-finite"
        if problem:
            in_a_row += 1
            if in_a_row >= MAX_SKIPPED_STEPS:
                raise TrainingError(f"{problem} at batch {i}, {in_a_row} steps in a row; lower --lr or use "
                                    "--precision fp32 (the last checkpoint is from the previous epoch)")
            optimizer.zero_grad(set_to_none=True)
            log.warning("%s at batch %d: step skipped", problem, i)
            if on_skip:
                on_skip(i, problem)
            continue
        in_a_row = 0
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        total += loss.item() * x.shape[0]
        count += x.shape[0]
        if on_batch:
            on_batch(i, loss.item())
    return distributed.mean_over_processes(total, count, world)


@torch.no_grad()
def validate_seg(model, loader, loss_fn: Callable, *, device, precision: str, threshold: float = 0.5,
                 max_batches: int = 0) -> dict[str, float]:
    """Mean loss and voxel Dice, precision and recall (eqs. 5-7) over all validation voxels."""
    model.eval()
    total, count, tp, fp, fn = 0.0, 0, 0, 0, 0
    for x, y in _batches(loader, max_batches):
        x, y = x.to(device), y.to(device)
        with precision_context(device, precision):
            out = model(x)
        out = out.float()
        total += loss_fn(out, y).item() * x.shape[0]
        count += x.shape[0]
        pred, truth = torch.sigmoid(out) >= threshold, y > 0.5
        tp += int((pred & truth).sum())
        fp += int((pred & ~truth).sum())
        fn += int((~pred & truth).sum())
    return {"val_loss": total / max(count, 1),
            "dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
            "precision": tp / (tp + fp) if tp + fp else 1.0,
            "recall": tp / (tp + fn) if tp + fn else 1.0}


@torch.no_grad()
def predict_cls(model, loader, *, device, precision: str, max_batches: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels, malignancy probabilities) over ``loader``."""
    model.eval()
    labels, probs = [], []
    for x, y in _batches(loader, max_batches):
        y = y[:, 0].long() if y.ndim == 2 else y          # [label, ratings] rows: the label
        with precision_context(device, precision):
            out = model(x.to(device))
        keep = (y >= 0).numpy()                            # nodules without a label train the ratings only
        probs.append(torch.softmax(out.float(), dim=1)[:, 1].cpu().numpy()[keep])
        labels.append(y.numpy()[keep])
    return np.concatenate(labels), np.concatenate(probs)


def validate_cls(model, loader, *, device, precision: str, max_batches: int = 0) -> dict[str, float]:
    """Mean NLL, AUC and accuracy (argmax) on the validation ROIs."""
    labels, probs = predict_cls(model, loader, device=device, precision=precision, max_batches=max_batches)
    eps = 1e-7
    p = np.clip(np.where(labels == 1, probs, 1 - probs), eps, 1)
    return {"val_loss": float(-np.log(p).mean()),
            "auc": metrics.roc_auc(labels, probs),
            "accuracy": metrics.accuracy(labels, (probs >= 0.5).astype(int))}


# --------------------------------------------------------------------------
# The table of tasks
# --------------------------------------------------------------------------

class ClsLoss:
    """The classifier's loss (eq. 4, NLL of the softmax; plus the ratings' with ``aux_weight``), with
    :class:`SegLoss`'s interface (:func:`lungseg.malignancy.cls_loss`)."""

    def __init__(self, aux_weight: float = 0.0):
        self.aux_weight = aux_weight

    def kind(self, epoch: int) -> str:
        return "nll+ratings" if self.aux_weight > 0 else "nll"

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, *, epoch: int) -> torch.Tensor:
        return cls_loss(logits, target, self.aux_weight)


def _validate_seg(model, loader, loss_fn, cfg: SegConfig, device) -> dict[str, float]:
    return validate_seg(model, loader, loss_fn, device=device, precision=cfg.precision, threshold=cfg.threshold)


def _validate_cls(model, loader, loss_fn, cfg: ClsConfig, device) -> dict[str, float]:
    return validate_cls(model, loader, device=device, precision=cfg.precision)


def _cls_metric(val_ds: RoiDataset) -> str:
    if len(val_ds) and len(set(val_ds.labels[val_ds.labels >= 0].tolist())) < 2:
        log.warning("the validation split holds one class only: choosing the best epoch by accuracy, not AUC")
        return "accuracy"
    return "auc"


@dataclass(frozen=True)
class Task:
    """What one training task brings to the loop: everything else is shared."""

    kind: str                                      # the checkpoint's kind
    dataset: Callable[[Any], type]                 # cfg -> dataset type, built as (cache, uids, augment=, seed=)
    items: str                                     # what the dataset holds, for messages
    make_loss: Callable[[Any], Any]                # cfg -> loss(logits, target, epoch=) with .kind(epoch)
    validate: Callable[..., dict[str, float]]      # (model, loader, loss_fn, cfg, device) -> scores
    metric: Callable[[Any], str]                   # validation dataset -> metric that picks best.pt


#: Training tasks by config type (:mod:`lungseg.configs`).
TASKS: dict[type, Task] = {
    SegConfig: Task("seg", lambda cfg: {"subcase": SubcaseDataset, "candidate": CandidateSegDataset}[cfg.patches],
                    "patches", lambda cfg: SegLoss(schedule=cfg.loss, switch_epoch=cfg.switch_epoch),
                    _validate_seg, lambda val_ds: "dice"),
    ClsConfig: Task("cls", lambda cfg: functools.partial(RoiDataset, mask_channel=cfg.mask_channel,
                                                         ratings=cfg.aux_weight > 0),
                    "labelled nodules", lambda cfg: ClsLoss(cfg.aux_weight), _validate_cls, _cls_metric),
    DetConfig: Task("det", lambda cfg: CandidateDataset, "candidates", lambda cfg: ClsLoss(), _validate_cls,
                    _cls_metric),
}


def task_for(cfg: TrainConfig) -> Task:
    """The task a config trains."""
    try:
        return TASKS[type(cfg)]
    except KeyError:
        raise TypeError(f"no training task for {type(cfg).__name__}; tasks: "
                        f"{', '.join(t.__name__ for t in TASKS)}") from None


# --------------------------------------------------------------------------
# The epoch loop
# --------------------------------------------------------------------------

@dataclass
class Callbacks:
    """Hooks for progress display: ``on_epoch_start(epoch, n_batches)``,
    ``on_batch(batch, loss)``, ``on_epoch_end(record)``."""

    on_epoch_start: Callable[[int, int], None] | None = None
    on_batch: Callable[[int, float], None] | None = None
    on_epoch_end: Callable[[dict], None] | None = None


@dataclass
class _Data:
    cache: Cache
    train: Any
    val: Any
    validate: bool


def _load_data(task: Task, cfg: TrainConfig, cache_path) -> _Data:
    """The train and validation datasets of the split file; refuses an empty train or named-but-empty val split."""
    cache = Cache(cache_path)
    split = read_split(cfg.split_file)
    dataset = task.dataset(cfg)
    train_ds, val_ds = (dataset(cache, split_scans(cache, split, name), augment=augment, seed=cfg.seed)
                        for name, augment in (("train", cfg.augment), ("val", False)))
    if len(train_ds) == 0:
        raise TrainingError(f"{cache_path}: the train split of {cfg.split_file} has no {task.items}")
    validate = len(val_ds) > 0
    if not validate:
        if any(v == "val" for v in split.values()):
            raise TrainingError(f"{cache_path}: the val split of {cfg.split_file} has no {task.items}")
        log.warning("%s has no val split: training for a fixed %d epochs without validation; "
                    "last.pt is the model", cfg.split_file, cfg.epochs)
    return _Data(cache, train_ds, val_ds, validate)


def _resume(task: Task, cfg: TrainConfig, out: Path, state: dict[str, Any]) -> tuple[int, float]:
    """Load ``out/last.pt`` into the model, optimizer, scheduler, scaler and RNGs: (start epoch, best)."""
    last = out / "last.pt"
    ckpt = load_checkpoint(last, kind=task.kind)
    if ckpt["config"].get("arch") != cfg.arch:
        raise TrainingError(f"{last}: a {ckpt['config'].get('arch')} checkpoint; this run trains {cfg.arch}")
    for name in ("model", "optimizer", "scheduler"):
        state[name].load_state_dict(ckpt[name])
    if state["scaler"] is not None and ckpt.get("scaler"):
        state["scaler"].load_state_dict(ckpt["scaler"])
    _set_rng_state(ckpt["rng"])
    _truncate_log(out / "log.jsonl", ckpt["epoch"])
    return ckpt["epoch"], ckpt["best_metric"]


def _payload(task: Task, cfg: TrainConfig, state: dict[str, Any], data: _Data, cache_path, *, epoch: int,
             best: float, metric: str, scores: dict) -> dict[str, Any]:
    """A checkpoint (format of :mod:`lungseg.checkpoints`) after ``epoch`` epochs."""
    scaler = state["scaler"]
    return {
        "format": CHECKPOINT_FORMAT, "kind": task.kind, "config": cfg.to_dict(),
        "model": unwrap(state["model"]).state_dict(), "optimizer": state["optimizer"].state_dict(),
        "scheduler": state["scheduler"].state_dict(), "scaler": scaler.state_dict() if scaler else {},
        "rng": _rng_state(), "epoch": epoch, "best_metric": best, "metric": metric,
        "val": scores, "lungseg_version": _version(),
        "preprocess": data.cache.config,
        "data": {"cache": str(cache_path), "split_file": cfg.split_file,
                 "train_items": len(data.train), "val_items": len(data.val)},
    }


def fit(cfg: TrainConfig, cache_path: str | os.PathLike, out: str | os.PathLike, *,
        resume: bool = False, callbacks: Callbacks | None = None) -> dict[str, Any]:
    """Train the network of ``cfg`` (a :class:`SegConfig` or :class:`ClsConfig`) on a cache.

    Returns a summary: run folder, epochs run, best metric and where the
    checkpoints are. With ``resume`` the run continues from ``out/last.pt``.
    Started by ``torchrun`` on several processes, it trains with
    DistributedDataParallel on the same global batches (:mod:`lungseg.distributed`).
    """
    world, device = distributed.setup(cfg.device)
    try:
        return _fit(cfg, cache_path, Path(out), resume, callbacks or Callbacks(), world, device)
    finally:
        distributed.teardown(world)


def _fit(cfg: TrainConfig, cache_path, out: Path, resume: bool, cb: Callbacks, world: distributed.World,
         device: torch.device) -> dict[str, Any]:
    """:func:`fit` in one process of ``world`` (rank 0 writes and reports progress)."""
    task = task_for(cfg)
    data = _load_data(task, cfg, cache_path)
    metric_name = task.metric(data.val)
    local_batch = distributed.local_batch_size(cfg.batch_size, world)
    if not world.is_main:
        cb = Callbacks()

    _seed_everything(cfg.seed)
    model = fast_layout(distributed.prepare(cfg.build_model().to(device), world, device), device)
    wd = getattr(cfg, "weight_decay", 0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=wd) if wd else \
        torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state = {"model": model, "optimizer": optimizer,
             "scheduler": torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.lr_milestones),
                                                               gamma=cfg.lr_gamma),
             "scaler": torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None}

    out.mkdir(parents=True, exist_ok=True)
    last_path, best_path, log_path = out / "last.pt", out / "best.pt", out / "log.jsonl"
    start_epoch, best = 0, -math.inf
    if resume:
        start_epoch, best = _resume(task, cfg, out, state)
        log.info("resuming %s at epoch %d (best %s %.4f)", out, start_epoch, metric_name, best)
    elif last_path.exists():
        raise TrainingError(f"{out}: already holds a run; pass --resume to continue it or choose another --out")
    if world.is_main:
        (out / "config.json").write_text(json.dumps({"kind": task.kind, **cfg.to_dict()}, indent=2))

    train_model = distributed.wrap(model, world, device)
    train_model = torch.compile(train_model) if cfg.compile else train_model
    loader_args = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda")
    train_sampler = distributed.ShardSampler(
        EpochSampler(len(data.train), seed=cfg.seed, shuffle=True, labels=getattr(data.train, "labels", None),
                     balanced=getattr(cfg, "balance", False)), cfg.batch_size, world)
    train_loader = DataLoader(data.train, sampler=train_sampler, batch_size=local_batch, drop_last=False,
                              **loader_args)
    val_loader = DataLoader(data.val, sampler=EpochSampler(len(data.val), shuffle=False),
                            batch_size=cfg.batch_size, **loader_args)
    loss = task.make_loss(cfg)
    epochs_run = 0
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        train_sampler.set_epoch(epoch)
        if cb.on_epoch_start:
            cb.on_epoch_start(epoch, min(cfg.max_batches, len(train_loader)) if cfg.max_batches else len(train_loader))
        loss_fn = lambda logits, target, e=epoch: loss(logits, target, epoch=e)  # noqa: E731
        lr = optimizer.param_groups[0]["lr"]
        skipped: list[int] = []
        train_loss = train_one_epoch(train_model, train_loader, loss_fn, optimizer, device=device,
                                     precision=cfg.precision, scaler=state["scaler"], grad_clip=cfg.grad_clip,
                                     max_batches=cfg.max_batches, on_batch=cb.on_batch,
                                     on_skip=lambda batch, why: skipped.append(batch), world=world)
        state["scheduler"].step()
        scores = task.validate(model, val_loader, loss_fn, cfg, device) if data.validate else {}
        value = scores.get(metric_name, math.nan)
        improved = not math.isnan(value) and value > best
        best = value if improved else best
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, **scores, "loss_kind": loss.kind(epoch),
                  "best": improved, "seconds": round(time.perf_counter() - t0, 2),
                  **({"skipped_batches": skipped} if skipped else {})}
        payload = _payload(task, cfg, state, data, cache_path, epoch=epoch + 1, best=best, metric=metric_name,
                           scores=scores)
        if world.is_main:       # the log line first: a resume keeps as many lines as last.pt has epochs
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            save_checkpoint(last_path, payload)
            if improved:
                save_checkpoint(best_path, payload)
            plot_curves(log_path, out / "curves.png", metric_name)
        epochs_run += 1
        if cb.on_epoch_end:
            cb.on_epoch_end(record)
    return {"run": str(out), "epochs_run": epochs_run, "epochs": cfg.epochs, "metric": metric_name,
            "best_metric": best, "last": str(last_path), "best": str(best_path) if best_path.exists() else None}


def _version() -> str:
    from . import __version__
    return __version__


def _truncate_log(path: Path, epochs: int) -> None:
    """Keep the first ``epochs`` lines of a run log (an interrupted epoch may have logged its line and not saved
    its checkpoint)."""
    if path.exists():
        lines = path.read_text().splitlines()[:epochs]
        path.write_text("".join(line + "\n" for line in lines))


def read_log(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(log_path: Path, png: Path, metric_name: str) -> None:
    """Loss (train and validation) and the validation metric by epoch, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    if any("val_loss" in r for r in rows):
        ax1.plot(epochs, [r.get("val_loss", math.nan) for r in rows], "o-", label="validation")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(epochs, [r.get(metric_name, math.nan) for r in rows], "o-", color="C2")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(f"validation {metric_name}")
    ax2.set_ylim(0, 1)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, png)
