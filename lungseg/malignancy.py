"""The malignancy classifier that must beat a ruler: a small 3D network, cross-fitted, calibrated, stacked.

LIDC's malignancy ratings follow nodule size closely: logistic regression on
the mask's diameter alone reaches a pooled AUC of about 0.92 on the real
nodule crops, and paper A's 3D ResNet50 at CPU size does not. What this module
adds (``lungseg train-cls --preset nodule``; measured in
``benchmarks/malignancy.py``):

- **Shape as input.** :class:`NoduleNet` reads two channels, the windowed
  ROI and the nodule's mask on it (the consensus mask in training, the
  segmenter's output in ``predict``), so that size and outline are given, not
  guessed from the box edge. It sees the central 12 x 32 x 32 voxels of the
  16 x 48 x 48 ROI (36 x 48 x 48 mm at 3 x 1.5 x 1.5 mm; a 36 mm nodule
  fits), with an in-plane stride-2 stem, three residual stages and a global
  average, about 0.1 M parameters at width 16: some 10x faster than paper A's
  ResNet50 at width 8 on these CPUs.
- **More supervision from the same readers.** Besides the two-class logits it
  regresses the readers' majority vote on the nine LIDC characteristics
  (:data:`lungseg.lidc.CHARACTERISTICS`, scaled as (r - 3) / 2) with weight
  ``aux_weight``. Nodules of malignancy 3 (no benign/malignant label) still
  teach these. In eval mode the network returns the two logits only.
- **Cross-fitting.** ``members`` = K trains K networks, network j on the
  training patients outside inner fold j (folds by :func:`lungseg.splits.
  patient_folds`), validated on fold j each epoch (the learning curve). The
  model is their mean logit (:class:`NoduleEnsemble`, with flip test-time
  augmentation); every training nodule thereby has an out-of-fold logit, from
  the one member that did not see it, on which the rest is fitted:
- **Calibration.** A temperature (:func:`fit_temperature`) on the
  out-of-fold logits, stored in the ensemble: ``softmax(logits)`` is the
  calibrated p(malignant) of the network alone.
- **The hybrid.** Logistic regression (:class:`lungseg.logistic.
  LogisticRegression`) of the out-of-fold logit and the nodule's measured size
  and HU features (:data:`FEATURES`, on the nodule's own grid:
  :func:`nodule_features`), fitted on the training patients only. ``predict``
  and ``evaluate`` report its probability as ``malignancy_probability`` when
  the features are at hand, and the network's alone beside it.

Exact resume holds per member (each is an ordinary ``train-cls`` run in
``OUT/member<j>/``); the ensemble ``OUT/model.pt`` is written once all
members are done, as an ordinary ``cls`` checkpoint (``weights_only``) with
``hybrid`` and ``cross_fit`` entries.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cache import CALCIFIED_HU, FEATURES, nodule_features  # noqa: F401  (re-exported)
from .logistic import LogisticRegression

log = logging.getLogger(__name__)

#: What the hybrid reads: the network's logit, then :data:`FEATURES` (volume as its log).
HYBRID_FEATURES = ("network_logit", "log_volume_mm3", *FEATURES[1:])
#: The readers' ratings the network regresses (:data:`lungseg.lidc.CHARACTERISTICS` order): (r - centre) / scale.
RATING_CENTRE, RATING_SCALE = 3.0, 2.0


def hybrid_features(logits: np.ndarray, features: np.ndarray) -> np.ndarray:
    """(N, len(HYBRID_FEATURES)) rows from network logits (N,) and :data:`FEATURES` rows (N, 7)."""
    f = np.asarray(features, np.float64).reshape(len(logits), len(FEATURES))
    return np.c_[np.asarray(logits, np.float64), np.log(np.maximum(f[:, 0], 1e-3)), f[:, 1:]]


# --------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------

def _conv(cin: int, cout: int, stride) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a = _conv(c, c, 1)
        self.b = nn.Sequential(nn.Conv3d(c, c, 3, 1, 1, bias=False), nn.BatchNorm3d(c))

    def forward(self, x):
        return F.relu(x + self.b(self.a(x)))


class NoduleNet(nn.Module):
    """(N, in_channels, D, H, W) ROIs -> (N, 2) logits in eval mode, (N, 2 + n_aux) in training mode.

    The central ``input_shape`` of the ROI is used (the whole ROI when it is
    smaller). Channels: the windowed image, then (``in_channels`` 2) the mask.
    """

    def __init__(self, num_classes: int = 2, width: int = 16, in_channels: int = 2, n_aux: int = 9,
                 input_shape: Sequence[int] = (12, 32, 32), dropout: float = 0.3):
        super().__init__()
        self.num_classes, self.n_aux, self.in_channels = num_classes, n_aux, in_channels
        self.input_shape = tuple(int(s) for s in input_shape)
        w = width
        self.features = nn.Sequential(_conv(in_channels, w, (1, 2, 2)), _Residual(w), _conv(w, 2 * w, 2),
                                      _Residual(2 * w), _conv(2 * w, 4 * w, 2), _Residual(4 * w))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(4 * w, num_classes + n_aux)
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        """The central ``input_shape`` of (N, C, D, H, W) ROIs."""
        idx = [slice(None), slice(None)]
        for size, want in zip(x.shape[2:], self.input_shape):
            lo = max(0, (size - want) // 2)
            idx.append(slice(lo, lo + min(size, want)))
        return x[tuple(idx)]

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 2 + n_aux): the class logits, then the ratings' regression (scaled, see :data:`RATING_SCALE`)."""
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channel(s) (image{', mask' * (self.in_channels > 1)}), "
                             f"got {x.shape[1]}")
        h = self.features(self.centre(x)).mean(dim=(2, 3, 4))
        return self.head(self.drop(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.outputs(x)
        return out if self.training else out[:, : self.num_classes]


def nodulenet(num_classes: int = 2, width: int = 16, in_channels: int = 2, n_aux: int = 9) -> NoduleNet:
    return NoduleNet(num_classes=num_classes, width=width, in_channels=in_channels, n_aux=n_aux)


#: Test-time augmentation: the identity and flips along z, y, x and y+x (dims of (N, C, D, H, W)).
TTA_FLIPS = ((), (2,), (3,), (4,), (3, 4))


def tta_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean logits of ``model`` over :data:`TTA_FLIPS`."""
    return torch.stack([model(x.flip(f) if f else x) for f in TTA_FLIPS]).mean(0)


class NoduleEnsemble(nn.Module):
    """Mean TTA logits of cross-fitted members, divided by a fitted temperature."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.in_channels = getattr(members[0], "in_channels", 1)
        self.register_buffer("temperature", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([tta_logits(m, x) for m in self.members]).mean(0)
        return logits / self.temperature


@torch.no_grad()
def predicted_ratings(model: nn.Module, images: np.ndarray, masks: np.ndarray) -> np.ndarray | None:
    """(N, 9) readers' ratings (:data:`lungseg.lidc.CHARACTERISTICS` order, rating scale) the network predicts.

    Mean over members and :data:`TTA_FLIPS`; None for a classifier without the ratings' head.
    """
    members = list(model.members) if isinstance(model, NoduleEnsemble) else [model]
    if not all(isinstance(m, NoduleNet) and m.n_aux for m in members):
        return None
    out = []
    for i in range(0, len(images), BATCH):
        x = model_input(model, images[i:i + BATCH], masks[i:i + BATCH])
        per = [torch.stack([m.eval().outputs(x.flip(f) if f else x)[:, m.num_classes:] for f in TTA_FLIPS]).mean(0)
               for m in members]
        out.append(torch.stack(per).mean(0).numpy())
    return np.concatenate(out) * RATING_SCALE + RATING_CENTRE if out else np.zeros((0, members[0].n_aux))


def model_input(model: nn.Module, images: np.ndarray, masks: np.ndarray | None = None) -> torch.Tensor:
    """(N, C, D, H, W) float32 input of a classifier from (N, D, H, W) ROI images and masks.

    One channel (the image) for paper A's networks; image and mask for those
    with ``in_channels`` 2 (:class:`NoduleNet`, :class:`NoduleEnsemble`).
    """
    images = np.asarray(images, np.float32)
    channels = [images]
    if getattr(model, "in_channels", 1) > 1:
        if masks is None:
            raise ValueError("this classifier reads the nodule's mask as a second channel; none was given")
        channels.append(np.asarray(masks, np.float32))
    return torch.from_numpy(np.stack(channels, axis=1))


def load_hybrid(ckpt: dict) -> LogisticRegression | None:
    """A checkpoint's hybrid (None for a classifier without one)."""
    return LogisticRegression.from_dict(ckpt["hybrid"], HYBRID_FEATURES) if ckpt.get("hybrid") else None


@torch.no_grad()
def probabilities(model: nn.Module, images: np.ndarray, masks: np.ndarray | None, *, device, precision: str = "fp32",
                  features: np.ndarray | None = None, hybrid: LogisticRegression | None = None
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """p(malignant) of N ROIs: (the network's, the hybrid's or None).

    The hybrid's needs ``features`` (N, 7) (:data:`FEATURES`); rows with a
    missing feature get the network's probability.
    """
    from .device import precision_context

    if len(images) == 0:
        return np.zeros(0, np.float32), (np.zeros(0, np.float32) if hybrid is not None else None)
    model.eval()
    parts = []
    for i in range(0, len(images), BATCH):
        x = model_input(model, images[i:i + BATCH], None if masks is None else masks[i:i + BATCH]).to(device)
        with precision_context(device, precision):
            parts.append(model(x).float().cpu())
    logits = torch.cat(parts)
    p = torch.softmax(logits, dim=1)[:, 1].numpy()
    if hybrid is None or features is None:
        return p, None
    x = hybrid_features((logits[:, 1] - logits[:, 0]).numpy(), features)
    ok = np.isfinite(x).all(axis=1)
    q = p.copy()
    if ok.any():
        q[ok] = hybrid(x[ok])
    return p, q


# --------------------------------------------------------------------------
# Targets and the loss
# --------------------------------------------------------------------------

def majority_ratings(table: dict[str, np.ndarray], j: int) -> np.ndarray:
    """The readers' majority vote on each characteristic of nodule ``j`` of a cache's nodule table (-1: none).

    Crop caches and composites store it (``ratings_majority``); for scans it is
    the median of the readers' ratings, rounded half up.
    """
    from .lidc import CHARACTERISTICS

    if "ratings_majority" in table and (np.asarray(table["ratings_majority"][j]) > 0).any():
        return np.asarray(table["ratings_majority"][j], np.float32)
    out = np.full(len(CHARACTERISTICS), -1.0, np.float32)
    if "ratings" in table:
        r = np.asarray(table["ratings"][j], np.float32)
        for c in range(r.shape[1]):
            given = r[:, c][r[:, c] > 0]
            if len(given):
                out[c] = math.floor(float(np.median(given)) + 0.5)
    return out


def cls_loss(logits: torch.Tensor, target: torch.Tensor, aux_weight: float = 0.0) -> torch.Tensor:
    """NLL of the softmax (paper A's eq. 4) on the labelled rows, plus ``aux_weight`` x the ratings' MSE.

    ``target`` is (N,) class indices, or (N, 1 + n_ratings) rows of
    [label (-1: none), ratings (<= 0: none)] when the network regresses the ratings.
    """
    from .losses import nll_loss

    if target.ndim == 1:
        return nll_loss(logits, target)
    label = target[:, 0].long()
    has = label >= 0
    k = logits.shape[1] - (target.shape[1] - 1)
    loss = nll_loss(logits[has, :k], label[has]) if has.any() else logits.sum() * 0.0
    if aux_weight > 0 and logits.shape[1] > k:
        r = target[:, 1:]
        given = (r > 0).float()
        err = (logits[:, k:] - (r - RATING_CENTRE) / RATING_SCALE) ** 2 * given
        loss = loss + aux_weight * err.sum() / given.sum().clamp(min=1.0)
    return loss


# --------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------

def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T) (Guo et al. 2017), logits (N, 2)."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.int64)
    d = z[:, 1] - z[:, 0]

    def nll(log_t):
        t = d / math.exp(log_t)
        return float(np.mean(np.logaddexp(0, t) - y * t))

    return float(math.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))


# --------------------------------------------------------------------------
# Cross-fitting
# --------------------------------------------------------------------------

def inner_folds(cache, split_file: str | os.PathLike, k: int, seed: int = 0) -> dict[str, int]:
    """Patient -> inner fold (0..k-1) over the split file's train and val patients (test patients left out).

    :func:`lungseg.splits.patient_folds` balances labelled nodules per fold; with
    every patient in training (an ``_all`` split file) and the same ``k`` and
    seed these are the folds ``lungseg folds`` writes.
    """
    from .splits import patient_folds, read_split, split_scans

    split = read_split(split_file)
    patients, labelled = [], []
    for uid in (u for name in ("train", "val") for u in split_scans(cache, split, name)):
        p = str(cache.scan(uid).attrs["patient_id"])
        for lab in cache.nodule_table(uid).get("label", []):
            patients.append(p)
            labelled.append(int(lab) >= 0)
    return patient_folds(patients, labelled, k=k, seed=seed)


#: ROIs per forward pass when many are scored (crop caches hold one nodule per entry).
BATCH = 64


def cache_rois(cache, uids: Sequence[str]) -> tuple[list[tuple[str, int]], np.ndarray, np.ndarray]:
    """Every nodule ROI of ``uids``: ((uid, j) items, (N, D, H, W) images, (N, D, H, W) masks)."""
    items, images, masks = [], [], []
    for uid in uids:
        g = cache.scan(uid)
        n = g["rois/image"].shape[0]
        if n:
            items.extend((uid, j) for j in range(n))
            images.append(g["rois/image"][()])
            masks.append(g["rois/mask"][()])
    if not items:
        return [], np.zeros((0, 1, 1, 1), np.float16), np.zeros((0, 1, 1, 1), np.uint8)
    return items, np.concatenate(images), np.concatenate(masks)


@torch.no_grad()
def _member_logits(model: nn.Module, cache, uids: Sequence[str]) -> tuple[list[tuple[str, int]], np.ndarray]:
    """TTA logits of every nodule of ``uids``: ((uid, j) items, (N, 2) logits)."""
    model.eval()
    items, images, masks = cache_rois(cache, uids)
    out = [tta_logits(model, model_input(model, images[i:i + BATCH], masks[i:i + BATCH])).numpy()
           for i in range(0, len(items), BATCH)]
    return items, (np.concatenate(out) if out else np.zeros((0, 2), np.float32))


def features_of(cache, uid: str) -> np.ndarray | None:
    """The cache's :data:`FEATURES` rows of a scan's nodules (None where the cache predates them)."""
    g = cache.scan(uid)
    return g["nodules/features"][()] if "nodules" in g and "features" in g["nodules"] else None


def train_cross_fit(cfg, cache_path: str | os.PathLike, out: str | os.PathLike, *, resume: bool = False,
                    callbacks=None, on_member=None) -> dict[str, Any]:
    """Train ``cfg.members`` networks by cross-fitting, then calibrate, fit the hybrid and write ``out/model.pt``.

    ``on_member(j, k)`` is called before each member. Members already trained
    are kept; with ``resume`` an interrupted member continues from its
    ``last.pt``.
    """
    from . import metrics, train
    from .cache import Cache
    from .checkpoints import CHECKPOINT_FORMAT, load_model, save_checkpoint
    from .errors import TrainingError
    from .splits import read_split, write_split

    out = Path(out)
    k = int(cfg.members)
    if (out / "model.pt").exists() and not resume:
        raise TrainingError(f"{out}: already holds a run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    cache = Cache(cache_path)
    split = read_split(cfg.split_file)
    folds = inner_folds(cache, cfg.split_file, k, seed=cfg.seed)
    (out / "config.json").write_text(json.dumps({"kind": "cls", **cfg.to_dict()}, indent=2))
    member_cfgs = []
    for j in range(k):
        member_dir = out / f"member{j}"
        member_dir.mkdir(exist_ok=True)
        inner = {p: "test" for p in split}
        inner.update({p: "val" if f == j else "train" for p, f in folds.items()})
        split_path = member_dir / "split.csv"
        write_split(split_path, inner)
        mcfg = dataclasses.replace(cfg, members=0, split_file=str(split_path))
        member_cfgs.append(mcfg)
        last = member_dir / "last.pt"
        logged = train.read_log(member_dir / "log.jsonl") if last.exists() else []
        if logged and logged[-1]["epoch"] >= cfg.epochs:          # this member is trained
            continue
        if on_member:
            on_member(j, k)
        train.fit(mcfg, cache_path, member_dir, resume=last.exists(), callbacks=callbacks)

    members, oof_items, oof_logits = [], [], []
    for j, mcfg in enumerate(member_cfgs):
        model, _ = load_model(out / f"member{j}" / "last.pt", kind="cls")
        members.append(model)
        val_uids = [u for u in cache.series_uids
                    if folds.get(str(cache.scan(u).attrs["patient_id"])) == j]
        items, logits = _member_logits(model, cache, val_uids)
        oof_items += items
        oof_logits.append(logits)
    logits = np.concatenate(oof_logits)
    tables = {uid: cache.nodule_table(uid) for uid in dict.fromkeys(u for u, _ in oof_items)}
    labels = np.array([int(tables[u]["label"][j]) for u, j in oof_items])
    has = labels >= 0
    if len(set(labels[has].tolist())) < 2:
        raise TrainingError(f"{cache_path}: the training patients hold one class only; cannot calibrate")
    temperature = fit_temperature(logits[has], labels[has])
    d = (logits[:, 1] - logits[:, 0])
    summary = {"members": k, "n_oof": int(has.sum()), "temperature": temperature,
               "oof_auc_network": metrics.roc_auc(labels[has], d[has])}
    feats = [features_of(cache, u) for u in tables]
    hybrid = None
    if all(f is not None for f in feats):
        fmap = {u: f for u, f in zip(tables, feats)}
        x = hybrid_features(d / temperature, np.stack([fmap[u][j] for u, j in oof_items]))
        ok = has & np.isfinite(x).all(axis=1)
        hybrid = LogisticRegression.fit(x[ok], labels[ok], features=HYBRID_FEATURES)
        summary["oof_auc_hybrid_in_sample"] = metrics.roc_auc(labels[ok], hybrid.decision(x[ok]))
    else:
        log.warning("%s predates nodules/features: no hybrid fitted (re-run preprocess or import-crops)", cache_path)
    ensemble = NoduleEnsemble(members)
    ensemble.temperature.fill_(temperature)
    payload = {
        "format": CHECKPOINT_FORMAT, "kind": "cls", "config": cfg.to_dict(), "model": ensemble.state_dict(),
        "epoch": cfg.epochs, "best_metric": summary["oof_auc_network"], "metric": "oof_auc",
        "val": summary, "lungseg_version": train._version(), "preprocess": cache.config,
        "data": {"cache": str(cache_path), "split_file": cfg.split_file, "train_items": int(has.sum()),
                 "val_items": 0},
        "hybrid": hybrid.to_dict() if hybrid else {},
        "cross_fit": {"folds": folds, "oof": [{"id": f"{u}/{j}", "label": int(y), "logit": float(t)}
                                              for (u, j), y, t in zip(oof_items, labels, d)]},
    }
    save_checkpoint(out / "model.pt", payload)
    cache.close()
    return {"run": str(out), "model": str(out / "model.pt"), **summary}


__all__ = ["FEATURES", "CALCIFIED_HU", "HYBRID_FEATURES", "nodule_features", "hybrid_features", "NoduleNet",
           "nodulenet", "TTA_FLIPS", "tta_logits", "NoduleEnsemble", "model_input", "load_hybrid", "probabilities", "cache_rois", "predicted_ratings", "majority_ratings", "cls_loss",
           "fit_temperature", "inner_folds", "features_of", "train_cross_fit"]
