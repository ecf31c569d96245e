"""Training loops of paper A ("Experiment settings"): plain functions, no framework.

- Segmentation (``train-seg``): 3D Res U-Net, Adam, learning rate 1e-2 then
  1e-3 then 1e-4 by epoch, batch 6, 64 epochs, BCE for the first 3 epochs then
  Dice (:class:`lungseg.losses.SegLoss`), Xavier initialisation. Validation:
  voxel Dice over the validation sub-cases.
- Classification (``train-cls``): 3D ResNet50, Adam, learning rate 1e-4,
  batch 16, 52 epochs, NLL on log-softmax. Validation: AUC and accuracy.

The paper does not say at which epochs the learning rate drops; the defaults
drop it at epochs 32 and 48 of 64 (half-way, then three quarters).

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

from . import metrics
from .cache import Cache
from .configs import ClsConfig, SegConfig, TrainConfig  # noqa: F401  (re-exported)
from .datasets import EpochSampler, RoiDataset, SubcaseDataset, read_split, split_scans
from .device import autocast_context, resolve_device
from .errors import LungsegError
from .losses import SegLoss, nll_loss

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class TrainingError(LungsegError):
    """Training cannot go on (a non-finite loss, an empty split, a mismatched checkpoint)."""


def _seg_model(cfg: SegConfig) -> nn.Module:
    from .resunet3d import resunet3d, unet3d
    return {"resunet3d": resunet3d, "unet3d": unet3d}[cfg.arch](widths=cfg.widths)


def _cls_model(cfg: ClsConfig) -> nn.Module:
    from .resnet3d import resnet2d50, resnet3d50, resnet3d50_plain
    return {"resnet3d50": resnet3d50, "resnet3d50_plain": resnet3d50_plain,
            "resnet2d50": resnet2d50}[cfg.arch](num_classes=2, width=cfg.width)


def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    """The network a checkpoint's ``kind`` ("seg"/"cls") and config describe."""
    if kind == "seg":
        return _seg_model(SegConfig(**config))
    if kind == "cls":
        return _cls_model(ClsConfig(**config))
    raise ValueError(f"unknown checkpoint kind {kind!r}")


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)     # torch.compile wraps the module


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


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename (atomic)."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, *, kind: str | None = None) -> dict[str, Any]:
    """Load a lungseg checkpoint safely (``weights_only=True``), checking its kind."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, not a torch file, pickled objects
        raise TrainingError(f"{path}: not a loadable lungseg checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: not a lungseg checkpoint (format {CHECKPOINT_FORMAT})")
    if kind is not None and ckpt["kind"] != kind:
        raise TrainingError(f"{path}: a {ckpt['kind']} checkpoint, expected a {kind} checkpoint")
    return ckpt


def load_model(path: str | os.PathLike, *, kind: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A network with a checkpoint's weights, in eval mode, and the checkpoint."""
    ckpt = load_checkpoint(path, kind=kind)
    model = build_model(ckpt["kind"], ckpt["config"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


# --------------------------------------------------------------------------
# One epoch of training, one of validation
# --------------------------------------------------------------------------

def _batches(loader: DataLoader, max_batches: int):
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        yield batch


def train_one_epoch(model, loader, loss_fn: Callable, optimizer, *, device, precision: str,
                    scaler=None, grad_clip: float = 0.0, max_batches: int = 0,
                    on_batch: Callable[[int, float], None] | None = None) -> float:
    """One pass over ``loader``; returns the mean loss. Raises on a non-finite loss."""
    model.train()
    total, count = 0.0, 0
    for i, (x, y) in enumerate(_batches(loader, max_batches)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            out = model(x)
        loss = loss_fn(out.float(), y)
        if not torch.isfinite(loss):
            raise TrainingError(f"the loss became {loss.item()} at batch {i}; lower --lr or use "
                                "--precision fp32 (the last checkpoint is from the previous epoch)")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
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
    return total / max(count, 1)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return autocast_context(device, enabled=False)
    if precision == "auto":
        return autocast_context(device)
    return autocast_context(device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def validate_seg(model, loader, loss_fn: Callable, *, device, precision: str, threshold: float = 0.5,
                 max_batches: int = 0) -> dict[str, float]:
    """Mean loss and voxel Dice, precision and recall (eqs. 5-7) over all validation voxels."""
    model.eval()
    total, count, tp, fp, fn = 0.0, 0, 0, 0, 0
    for x, y in _batches(loader, max_batches):
        x, y = x.to(device), y.to(device)
        with _autocast(device, precision):
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
        with _autocast(device, precision):
            out = model(x.to(device))
        probs.append(torch.softmax(out.float(), dim=1)[:, 1].cpu().numpy())
        labels.append(y.numpy())
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
# The epoch loop
# --------------------------------------------------------------------------

@dataclass
class Callbacks:
    """Hooks for progress display: ``on_epoch_start(epoch, n_batches)``,
    ``on_batch(batch, loss)``, ``on_epoch_end(record)``."""

    on_epoch_start: Callable[[int, int], None] | None = None
    on_batch: Callable[[int, float], None] | None = None
    on_epoch_end: Callable[[dict], None] | None = None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(kind: str, cfg: SegConfig | ClsConfig, cache_path: str | os.PathLike, out: str | os.PathLike, *,
        resume: bool = False, callbacks: Callbacks | None = None) -> dict[str, Any]:
    """Train a segmentation (``kind="seg"``) or classification (``"cls"``) network.

    Returns a summary: run folder, epochs run, best metric and where the
    checkpoints are. With ``resume`` the run continues from ``out/last.pt``.
    """
    cb = callbacks or Callbacks()
    out = Path(out)
    cache = Cache(cache_path)
    split = read_split(cfg.split_file)
    uids = {name: split_scans(cache, split, name) for name in ("train", "val")}
    Data = SubcaseDataset if kind == "seg" else RoiDataset
    train_ds = Data(cache, uids["train"], augment=cfg.augment, seed=cfg.seed)
    val_ds = Data(cache, uids["val"], augment=False, seed=cfg.seed)
    items = "sub-cases" if kind == "seg" else "labelled nodules"
    if len(train_ds) == 0:
        raise TrainingError(f"{cache_path}: the train split of {cfg.split_file} has no {items}")
    validate = len(val_ds) > 0
    if not validate:
        if any(v == "val" for v in split.values()):
            raise TrainingError(f"{cache_path}: the val split of {cfg.split_file} has no {items}")
        log.warning("%s has no val split: training for a fixed %d epochs without validation; "
                    "last.pt is the model", cfg.split_file, cfg.epochs)
    metric_name = "dice" if kind == "seg" else "auc"
    if kind == "cls" and validate and len(set(val_ds.labels.tolist())) < 2:
        metric_name = "accuracy"
        log.warning("the validation split holds one class only: choosing the best epoch by accuracy, not AUC")

    device = resolve_device(cfg.device)
    _seed_everything(cfg.seed)
    model = (_seg_model if kind == "seg" else _cls_model)(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.lr_milestones),
                                                     gamma=cfg.lr_gamma)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    start_epoch, best = 0, -math.inf

    out.mkdir(parents=True, exist_ok=True)
    last_path, best_path, log_path = out / "last.pt", out / "best.pt", out / "log.jsonl"
    if resume:
        ckpt = load_checkpoint(last_path, kind=kind)
        if ckpt["config"].get("arch") != cfg.arch:
            raise TrainingError(f"{last_path}: a {ckpt['config'].get('arch')} checkpoint; this run "
                                f"trains {cfg.arch}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        start_epoch, best = ckpt["epoch"], ckpt["best_metric"]
        _truncate_log(log_path, start_epoch)
        log.info("resuming %s at epoch %d (best %s %.4f)", out, start_epoch, metric_name, best)
    elif last_path.exists():
        raise TrainingError(f"{out}: already holds a run; pass --resume to continue it or choose another --out")
    (out / "config.json").write_text(json.dumps({"kind": kind, **cfg.to_dict()}, indent=2))

    train_model = torch.compile(model) if cfg.compile else model
    loader_args = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    train_sampler = EpochSampler(len(train_ds), seed=cfg.seed, shuffle=True,
                                 labels=getattr(train_ds, "labels", None),
                                 balanced=getattr(cfg, "balance", False))
    train_loader = DataLoader(train_ds, sampler=train_sampler, drop_last=False, **loader_args)
    val_loader = DataLoader(val_ds, sampler=EpochSampler(len(val_ds), shuffle=False), **loader_args)
    if kind == "seg":
        seg_loss = SegLoss(schedule=cfg.loss, switch_epoch=cfg.switch_epoch)
    epochs_run = 0
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        train_sampler.set_epoch(epoch)
        n_batches = len(train_loader) if not cfg.max_batches else min(cfg.max_batches, len(train_loader))
        if cb.on_epoch_start:
            cb.on_epoch_start(epoch, n_batches)
        if kind == "seg":
            loss_fn = lambda logits, target, e=epoch: seg_loss(logits, target, epoch=e)  # noqa: E731
        else:
            loss_fn = nll_loss
        lr = optimizer.param_groups[0]["lr"]
        train_loss = train_one_epoch(train_model, train_loader, loss_fn, optimizer, device=device,
                                     precision=cfg.precision, scaler=scaler, grad_clip=cfg.grad_clip,
                                     max_batches=cfg.max_batches, on_batch=cb.on_batch)
        scheduler.step()
        if not validate:
            scores = {}
        elif kind == "seg":
            scores = validate_seg(model, val_loader, loss_fn, device=device, precision=cfg.precision,
                                  threshold=cfg.threshold)
        else:
            scores = validate_cls(model, val_loader, device=device, precision=cfg.precision)
        value = scores.get(metric_name, math.nan)
        improved = not math.isnan(value) and value > best
        if improved:
            best = value
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, **scores,
                  "loss_kind": seg_loss.kind(epoch) if kind == "seg" else "nll",
                  "best": improved, "seconds": round(time.perf_counter() - t0, 2)}
        payload = {
            "format": CHECKPOINT_FORMAT, "kind": kind, "config": cfg.to_dict(),
            "model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else {},
            "rng": _rng_state(), "epoch": epoch + 1, "best_metric": best, "metric": metric_name,
            "val": scores, "lungseg_version": _version(),
            "preprocess": cache.config,
            "data": {"cache": str(cache_path), "split_file": cfg.split_file,
                     "train_items": len(train_ds), "val_items": len(val_ds)},
        }
        save_checkpoint(last_path, payload)
        if improved:
            save_checkpoint(best_path, payload)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
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
    """Keep the first ``epochs`` lines of a run log (an interrupted epoch may have logged nothing)."""
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
