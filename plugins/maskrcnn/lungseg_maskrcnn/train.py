"""Training loops of the plugin: patch classifiers, Mask R-CNN, the 2D U-Net.

Straight loops, one per network kind. Each writes to ``OUT/``: ``last.pt``
(every epoch or every ``save_every`` iterations, for ``--resume``),
``model.pt`` (the model to use: best val accuracy for the patch classifiers,
the last step for the others, which train a fixed number of iterations),
``log.jsonl`` and ``config.json``. A resumed run continues from the last saved
step with the same data order and augmentation draws (they are drawn from the
seed and the step), so nothing but the work since that save is lost.

Checkpoints hold tensors and plain data only (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lungseg.checkpoints import save_checkpoint
from lungseg.device import resolve_device
from lungseg.errors import LungsegError

from . import configs, nets
from .slices import IGNORE, SliceSet, augment, normalize, read_patches, read_slices

log = logging.getLogger(__name__)

FORMAT = "lungseg-maskrcnn/1"


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------

def build_model(kind: str, cfg):
    """The network a config describes."""
    if kind == "patch":
        return nets.patch_classifier(cfg.arch)
    if kind == "mask":
        return nets.maskrcnn(cfg.backbone, anchor_sizes=cfg.anchor_sizes, frozen_norm=bool(cfg.weights),
                             proposals=cfg.proposals, rois_per_image=cfg.rois_per_image)
    if kind == "unet":
        return nets.unet2d(width=cfg.width)
    raise ValueError(f"unknown kind {kind!r}")


def load(path: str | os.PathLike, kind: str | None = None):
    """(model in eval mode, config, checkpoint) of a plugin checkpoint; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise LungsegError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LungsegError(f"{path}: not a loadable checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise LungsegError(f"{path}: not a lungseg maskrcnn checkpoint (format {FORMAT})")
    if kind is not None and ckpt.get("kind") != kind:
        raise LungsegError(f"{path}: a {ckpt.get('kind')} checkpoint, expected a {kind} checkpoint")
    try:
        cfg = configs.from_dict(ckpt["kind"], ckpt["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LungsegError(f"{path}: its config describes no network of this version ({exc})") from None
    model = build_model(ckpt["kind"], cfg)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg, ckpt


def _save(path: Path, kind: str, cfg, model, optimizer, step: int, **extra) -> None:
    """A checkpoint; ``optimizer`` None for a model.pt (only last.pt resumes, and Adam's state triples the size)."""
    save_checkpoint(path, {"format": FORMAT, "kind": kind, "config": configs.to_dict(cfg),
                           "model": model.state_dict(), "step": step, "rng": torch.get_rng_state(), **extra,
                           **({"optimizer": optimizer.state_dict()} if optimizer is not None else {})})


def _start(out: Path, kind: str, cfg, model, optimizer, resume: bool) -> int:
    """Write config.json; on resume load last.pt and return its step (else 0)."""
    out.mkdir(parents=True, exist_ok=True)
    last = out / "last.pt"
    if resume:
        if not last.is_file():
            raise LungsegError(f"{out}: nothing to resume (no last.pt)")
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        if ckpt.get("kind") != kind or ckpt.get("config") != configs.to_dict(cfg):
            raise LungsegError(f"{last}: another run's settings; resume with the same options or use a new --out")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])         # torchvision's samplers and dropout draw from it
        return int(ckpt["step"])
    if last.exists():
        raise LungsegError(f"{out}: holds a run already; --resume to continue it or choose another --out")
    (out / "config.json").write_text(json.dumps({"kind": kind, **configs.to_dict(cfg)}, indent=2))
    (out / "log.jsonl").write_text("")
    return 0


def _log(out: Path, row: dict) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_log(out: Path, key: str, upto: int) -> None:
    path = out / "log.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r[key] <= upto))


# --------------------------------------------------------------------------
# Patch classifiers (Table I)
# --------------------------------------------------------------------------

def _subset(n: int, limit: int, labels: np.ndarray, seed: int) -> np.ndarray:
    """At most ``limit`` indices (all when 0), half of each class, seeded; sorted."""
    if not limit or limit >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    per = limit // 2
    keep = [rng.choice(np.flatnonzero(labels == c), min(per, int((labels == c).sum())), replace=False) for c in (0, 1)]
    return np.sort(np.concatenate(keep))


def load_patches(path, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(patches (M, 1, 50, 50), labels, scan index) of a slices file, at most ``limit`` balanced."""
    x, y, scan = read_patches(path)
    if len(y) == 0:
        raise LungsegError(f"{path}: no patches")
    keep = _subset(len(y), limit, y, seed)
    return torch.from_numpy(x[keep][:, None]), torch.from_numpy(y[keep]), scan[keep]


@torch.no_grad()
def predict_patches(model, x: torch.Tensor, device, batch_size: int = 256) -> np.ndarray:
    """p(nodule) of each patch."""
    model.eval()
    out = [torch.softmax(model(x[i:i + batch_size].to(device)).float(), 1)[:, 1].cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def _dihedral(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random flip and quarter turn per batch (patches have no orientation)."""
    k = int(torch.randint(4, (1,), generator=g))
    x = torch.rot90(x, k, (2, 3))
    return torch.flip(x, (3,)) if int(torch.randint(2, (1,), generator=g)) else x


def train_patch(cfg: configs.PatchConfig, train_file, val_file, out, *, resume: bool = False,
                echo: Callable[[str], None] = log.info) -> Path:
    """Train one Table I classifier; ``OUT/model.pt`` is the epoch of best val accuracy."""
    out = Path(out)
    device = resolve_device(cfg.device)
    xt, yt, _ = load_patches(train_file, cfg.max_train, cfg.seed)
    xv, yv, _ = load_patches(val_file, cfg.max_eval, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model("patch", cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start = _start(out, "patch", cfg, model, opt, resume)
    _truncate_log(out, "epoch", start)
    best = max((r["val_accuracy"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())),
               default=-1.0)
    echo(f"{cfg.arch}: {len(yt)} train / {len(yv)} val patches, epochs {start + 1}..{cfg.epochs} on {device}")
    for epoch in range(start + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        order = torch.randperm(len(yt), generator=g)
        model.train()
        losses = []
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x = _dihedral(xt[idx], g).to(device)
            loss = F.cross_entropy(model(x), yt[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        acc = float(((predict_patches(model, xv, device) >= 0.5) == yv.numpy()).mean())
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "val_accuracy": acc,
               "seconds": round(time.perf_counter() - t0, 1)}
        _log(out, row)
        if acc > best:
            best = acc
            _save(out / "model.pt", "patch", cfg, model, None, epoch, val_accuracy=acc)
        _save(out / "last.pt", "patch", cfg, model, opt, epoch)
        echo(f"{cfg.arch} epoch {epoch}/{cfg.epochs}: loss {row['loss']:.4f}, val accuracy {acc:.4f} "
             f"({row['seconds']:.0f} s)")
    return out / "model.pt"


# --------------------------------------------------------------------------
# Slices for Mask R-CNN and the U-Net
# --------------------------------------------------------------------------

def window(lungs_box, shape, multiple: int = 32) -> tuple[int, int, int, int]:
    """The lungs' box grown to a multiple of ``multiple`` px (clipped to the slice): ``y0, x0, y1, x1``.

    Outside the lungs a slice is blank (the lung mask is applied), so a model
    sees all there is in this window.
    """
    out = []
    for lo, hi, size in ((lungs_box[0], lungs_box[2], shape[0]), (lungs_box[1], lungs_box[3], shape[1])):
        side = min(int(math.ceil((hi - lo) / multiple) * multiple), size // multiple * multiple)
        start = int(min(max(lo - (side - (hi - lo)) // 2, 0), size - side))
        out.append((start, start + side))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def training_view(data: SliceSet, i: int, crop: int, do_augment: bool, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One training image (float32 in [0, 1]) and its instance map: augmented, then cropped.

    With ``crop``: a ``crop`` x ``crop`` window holding a random nodule of the
    slice (3 draws in 4) or anywhere in the lungs' box.
    """
    image, ins = normalize(data.image[i]), data.instances[i]
    if do_augment:
        image, ins = augment(image, ins, rng)
    if not crop:
        return image, ins
    h, w = image.shape
    ys, xs = np.nonzero((ins > 0) & (ins != IGNORE))
    if ys.size and rng.random() < 0.75:
        k = rng.integers(ys.size)
        cy, cx = int(ys[k]) + int(rng.integers(-crop // 3, crop // 3 + 1)), int(xs[k]) + int(rng.integers(-crop // 3, crop // 3 + 1))
    else:
        y0, x0, y1, x1 = data.lungs[i]
        cy, cx = int(rng.integers(y0, max(y1, y0 + 1))), int(rng.integers(x0, max(x1, x0 + 1)))
    y, x = int(np.clip(cy - crop // 2, 0, h - crop)), int(np.clip(cx - crop // 2, 0, w - crop))
    return image[y:y + crop, x:x + crop], ins[y:y + crop, x:x + crop]


def targets_of(ins: np.ndarray) -> dict[str, torch.Tensor]:
    """Mask R-CNN targets of an instance map: boxes (x0, y0, x1, y1), labels 1, masks."""
    boxes, masks = [], []
    for k in np.unique(ins[(ins > 0) & (ins != IGNORE)]):
        m = ins == k
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        masks.append(m)
    h, w = ins.shape
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.ones(len(boxes), dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)).to(torch.uint8) if masks else torch.zeros((0, h, w), dtype=torch.uint8)}


def _batch(data: SliceSet, cfg, step: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Batch of a step: slices drawn and augmented from the seed and the step (same on resume)."""
    rng = np.random.default_rng([cfg.seed, step])
    idx = rng.integers(len(data), size=cfg.batch_size)
    views = [training_view(data, int(i), cfg.crop, cfg.augment, rng) for i in idx]
    return [v[0] for v in views], [v[1] for v in views]


def _stage(cfg: configs.MaskConfig, step: int) -> str:
    if cfg.schedule == "all":
        return "all"
    third = cfg.iterations / 3
    return "heads" if step <= third else "3+" if step <= 2 * third else "all"


def _lr(cfg, step: int) -> float:
    return cfg.lr * min(1.0, step / cfg.warmup) if getattr(cfg, "warmup", 0) else cfg.lr


def train_mask(cfg: configs.MaskConfig, train_file, out, *, resume: bool = False,
               echo: Callable[[str], None] = log.info, stop_at: int | None = None) -> Path:
    """Train Mask R-CNN on a slices file for ``cfg.iterations`` steps (SGD, paper B's lr and momentum).

    ``stop_at``: leave after that step's save, as an interrupted run would.
    """
    out = Path(out)
    device = resolve_device(cfg.device)
    data = read_slices(train_file)
    torch.manual_seed(cfg.seed)
    model = build_model("mask", cfg)
    if cfg.weights:
        counts = nets.load_weights(model, cfg.weights)
        echo(f"weights {cfg.weights}: {counts['loaded']} tensors loaded, {counts['skipped']} skipped")
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    start = _start(out, "mask", cfg, model, opt, resume)
    _truncate_log(out, "step", start)
    echo(f"Mask R-CNN {cfg.backbone}-FPN, schedule {cfg.schedule}: {len(data)} train slices, "
         f"steps {start + 1}..{cfg.iterations} on {device}")
    stage, t0, window_losses = None, time.perf_counter(), []
    for step in range(start + 1, cfg.iterations + 1):
        if _stage(cfg, step) != stage:
            stage = _stage(cfg, step)
            n = nets.set_trainable(model, stage)
            echo(f"step {step}: training {stage} ({n} tensors)")
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        images, maps = _batch(data, cfg, step)
        model.train()
        x = [torch.from_numpy(im)[None].expand(3, -1, -1).to(device) for im in images]
        targets = [{k: v.to(device) for k, v in targets_of(m).items()} for m in maps]
        losses = model(x, targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise LungsegError(f"{out}: the loss is not finite at step {step} (lower --lr)")
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 10.0)
        opt.step()
        window_losses.append({k: v.item() for k, v in losses.items()})
        if step % cfg.save_every == 0 or step == cfg.iterations:
            row = {"step": step, "stage": stage, "lr": _lr(cfg, step),
                   **{k: float(np.mean([w[k] for w in window_losses])) for k in window_losses[0]},
                   "seconds": round(time.perf_counter() - t0, 1)}
            _log(out, row)
            _save(out / "last.pt", "mask", cfg, model, opt, step)
            total = sum(v for k, v in row.items() if k.startswith("loss"))
            echo(f"step {step}/{cfg.iterations} ({stage}): loss {total:.3f} "
                 f"({row['seconds'] / len(window_losses):.2f} s/step)")
            t0, window_losses = time.perf_counter(), []
            if stop_at is not None and step >= stop_at:
                return out / "last.pt"
    _save(out / "model.pt", "mask", cfg, model, None, cfg.iterations)
    return out / "model.pt"


def _dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    inter = (p * target).sum((1, 2, 3))
    dice = 1 - (2 * inter + 1) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, target)


def train_unet(cfg: configs.UNetConfig, train_file, out, *, resume: bool = False,
               echo: Callable[[str], None] = log.info, stop_at: int | None = None) -> Path:
    """Train the 2D U-Net baseline (Dice + BCE, Adam) for ``cfg.iterations`` steps."""
    out = Path(out)
    device = resolve_device(cfg.device)
    data = read_slices(train_file)
    torch.manual_seed(cfg.seed)
    model = build_model("unet", cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start = _start(out, "unet", cfg, model, opt, resume)
    _truncate_log(out, "step", start)
    echo(f"2D U-Net width {cfg.width}: {len(data)} train slices, steps {start + 1}..{cfg.iterations} on {device}")
    t0, losses = time.perf_counter(), []
    for step in range(start + 1, cfg.iterations + 1):
        images, maps = _batch(data, cfg, step)
        x = torch.from_numpy(np.stack(images))[:, None].to(device)
        y = torch.from_numpy(np.isin(np.stack(maps), (0, IGNORE), invert=True)).float()[:, None].to(device)
        model.train()
        loss = _dice_bce(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % cfg.save_every == 0 or step == cfg.iterations:
            row = {"step": step, "loss": float(np.mean(losses)), "seconds": round(time.perf_counter() - t0, 1)}
            _log(out, row)
            _save(out / "last.pt", "unet", cfg, model, opt, step)
            echo(f"step {step}/{cfg.iterations}: loss {row['loss']:.4f} ({row['seconds'] / len(losses):.2f} s/step)")
            t0, losses = time.perf_counter(), []
            if stop_at is not None and step >= stop_at:
                return out / "last.pt"
    _save(out / "model.pt", "unet", cfg, model, None, cfg.iterations)
    return out / "model.pt"
