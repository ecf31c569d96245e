"""``lungseg evaluate``: paper A's tables from a cache and two checkpoints.

- Segmentation, Table 4's layout: Dice, precision and recall per size category
  (micro, small, nodule, mass). Each ground-truth nodule is scored inside its
  16 x 48 x 48 ROI (the prediction of the sub-cases pasted back onto the
  resampled scan, against the consensus masks there), so each nodule counts
  once whatever its size. Plus nodule-level detection over the sub-cases: a
  predicted component hits a nodule when they overlap; sensitivity and false
  positives per scan.
- Classification, Table 5's layout: accuracy, recall (sensitivity),
  specificity, and the AUC, each with a percentile bootstrap 95 % interval
  that resamples patients (their nodules are correlated); the confusion
  matrix; the ROC curve as PNG.

Protocols: ``nodule`` (default) counts each nodule once with the label of its
readers' median malignancy; ``annotation`` counts every reader's annotation
with that reader's own rating (1-2 benign, 4-5 malignant, 3 dropped), as paper
A counted its 2985 nodules (the label rule is :func:`lungseg.lidc.malignancy_label`
either way). The JSON names data, split and protocol. Checkpoints whose
preprocessing differs from the cache's are refused (:mod:`lungseg.checkpoints`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metrics
from .cache import Cache
from .checkpoints import check_input, describe, load_model
from .device import precision_context, resolve_device
from .errors import LungsegError
from .lidc import CHARACTERISTICS, malignancy_label
from .preprocess import crop
from .splits import DEFAULT_SPLIT_FILE, read_split, split_scans

log = logging.getLogger(__name__)

MALIGNANCY = CHARACTERISTICS.index("malignancy")


def _probabilities(model, batch: np.ndarray, device, precision: str) -> np.ndarray:
    """Sigmoid of a segmenter's logits (N, 1, ...), or a classifier's malignant-class softmax (N,)."""
    x = torch.from_numpy(batch.astype(np.float32)).to(device)
    with torch.no_grad(), precision_context(device, precision):
        logits = model(x).float()
    probs = torch.softmax(logits, dim=1)[:, 1] if logits.ndim == 2 else torch.sigmoid(logits)
    return probs.cpu().numpy()


def evaluate_segmentation(model, cache: Cache, uids, *, device, precision: str = "auto",
                          threshold: float = 0.5) -> dict[str, Any]:
    """Per-nodule Dice/precision/recall by size category, and detection counts, on ``uids``."""
    model.eval()
    diameters, scores = [], {"dice": [], "precision": [], "recall": []}
    detections, rows = [], []
    crops = is_crop_cache(cache)
    for uid in uids:
        g = cache.scan(uid)
        shape = tuple(int(v) for v in g.attrs["shape"])
        pred = np.zeros(shape, bool)
        truth = np.zeros(shape, bool)
        covered = np.zeros(shape, bool)
        starts = g["subcases/start"][()]
        for i, start in enumerate(starts):
            p = _probabilities(model, g["subcases/image"][i][None, None], device, precision)[0, 0] >= threshold
            sub = tuple(slice(max(s, 0), min(s + n, size)) for s, n, size in zip(start, p.shape, shape))
            local = tuple(slice(a.start - s, a.stop - s) for a, s in zip(sub, start))
            pred[sub] |= p[local]
            truth[sub] |= g["subcases/mask"][i][local] > 0
            covered[sub] = True
        if not crops:
            detections.append(metrics.detection_counts(truth, pred & covered))
        table = cache.nodule_table(uid)
        patient = str(g.attrs["patient_id"])
        roi_shape = g["rois/mask"].shape[1:]
        for j, start in enumerate(g["rois/start"][()] if "rois/start" in g else []):
            t = crop(truth.astype(np.uint8), start, roi_shape)
            q = crop(pred.astype(np.uint8), start, roi_shape)
            row = metrics.segmentation_scores(t, q)
            for k, v in row.items():
                scores[k].append(v)
            diameters.append(float(table["diameter_mm"][j]))
            rows.append({"id": f"{uid}/{j}", "patient_id": patient, "diameter_mm": diameters[-1], **row})
    out = {"per_size_category": metrics.per_category_table(np.asarray(diameters), scores) if diameters else {}}
    if not crops:   # a crop's patch holds one nodule by construction: no detection task
        out["detection"] = metrics.detection_summary(detections)
    out["nodules"] = rows
    return out


def is_crop_cache(cache: Cache) -> bool:
    """Whether the cache was made by ``lungseg import-crops`` (one nodule crop per entry)."""
    return cache.config.get("source") == "crops"


def classification_items(cache: Cache, uids, protocol: str = "nodule"):
    """((series uid, nodule index) per item, labels, patient ids) under a counting protocol."""
    if protocol not in ("nodule", "annotation"):
        raise ValueError(f"protocol must be 'nodule' or 'annotation', got {protocol!r}")
    if protocol == "annotation" and is_crop_cache(cache):
        raise LungsegError(f"{cache.path}: a crop cache holds majority ratings only, not each reader's; "
                           "use --protocol nodule")
    items, labels, patients = [], [], []
    for uid in uids:
        g = cache.scan(uid)
        table = cache.nodule_table(uid)
        patient = str(g.attrs["patient_id"])
        for j in range(int(g.attrs["n_nodules"])):
            if protocol == "nodule":
                ys = [int(table["label"][j])]
            else:
                ratings = table["ratings"][j][: int(table["n_readers"][j]), MALIGNANCY]
                ys = [malignancy_label(r) for r in ratings]
            for y in ys:
                if y >= 0:
                    items.append((uid, j))
                    labels.append(y)
                    patients.append(patient)
    return items, np.asarray(labels, np.int64), np.asarray(patients)


def evaluate_classification(model, cache: Cache, uids, *, device, precision: str = "auto",
                            protocol: str = "nodule", n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Table 5's measures with bootstrap 95 % intervals, the confusion matrix and the ROC curve."""
    model.eval()
    items, labels, patients = classification_items(cache, uids, protocol)
    if not len(labels):
        raise LungsegError("no labelled nodules to classify in this split")
    probs_by_roi: dict[tuple, float] = {}
    for uid in dict.fromkeys(u for u, _ in items):
        rois = cache.scan(uid)["rois/image"][()]
        for j, p in enumerate(_probabilities(model, rois[:, None], device, precision)):
            probs_by_roi[(uid, j)] = float(p)
    probs = np.array([probs_by_roi[item] for item in items])
    pred = (probs >= 0.5).astype(np.int64)
    stats = {
        "accuracy": lambda t, p, s: metrics.accuracy(t, p),
        "recall": lambda t, p, s: metrics.sensitivity(t, p),
        "specificity": lambda t, p, s: metrics.specificity(t, p),
        "auc": lambda t, p, s: metrics.roc_auc(t, s),
    }
    out: dict[str, Any] = {"n": int(len(labels)), "n_malignant": int(labels.sum()),
                           "n_patients": int(len(set(patients.tolist())))}
    ci = {}
    for name, fn in stats.items():
        b = metrics.bootstrap_ci(fn, labels, pred, probs, n_resamples=n_bootstrap, seed=seed, groups=patients)
        out[name] = b.estimate
        ci[name] = [b.low, b.high]
    out["ci95"] = ci
    out["confusion_matrix"] = metrics.confusion_matrix(labels, pred, num_classes=2).tolist()
    fpr, tpr, _ = metrics.roc_curve(labels, probs)
    out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    out["items"] = [{"id": f"{uid}/{j}", "patient_id": str(p), "label": int(y), "p_malignant": float(q)}
                    for (uid, j), p, y, q in zip(items, patients, labels, probs)]
    return out


def plot_roc(result: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    roc = result["roc"]
    lo, hi = result["ci95"]["auc"]
    ax.plot(roc["fpr"], roc["tpr"], "-", drawstyle="default",
            label=f"AUC {result['auc']:.3f} [{lo:.3f}, {hi:.3f}]")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity (recall)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables (Table 4 and Table 5 layouts)."""
    lines = [f"Data: {report['data']['cache']} (split '{report['data']['split']}', "
             f"{report['data']['n_scans']} scans); protocol: {report['protocol']}", ""]
    seg = report.get("segmentation")
    if seg:
        lines += ["| size category | n | dice | precision | recall |", "|---|---|---|---|---|"]
        for name, row in seg["per_size_category"].items():
            lines.append(f"| {name} | {row['n']} | {row['dice']:.3f} | {row['precision']:.3f} | {row['recall']:.3f} |")
        d = seg.get("detection")
        if d:
            lines += ["", f"Detection: sensitivity {d['sensitivity']:.3f} ({d['n_hit']}/{d['n_truth']} nodules), "
                          f"{d['fp_per_scan']:.2f} false positives per scan"]
        lines += [""]
    cls = report.get("classification")
    if cls:
        ci = cls["ci95"]
        lines += ["| accuracy | recall | specificity | auc |", "|---|---|---|---|",
                  "| " + " | ".join(f"{cls[k]:.3f} [{ci[k][0]:.3f}, {ci[k][1]:.3f}]"
                                    for k in ("accuracy", "recall", "specificity", "auc")) + " |",
                  "", f"Confusion matrix (rows true benign/malignant, columns predicted): {cls['confusion_matrix']}; "
                      f"{cls['n']} items, {cls['n_malignant']} malignant, {cls['n_patients']} patients"]
    return "\n".join(lines)


def evaluate(cache_path: str | os.PathLike, *, seg: str | os.PathLike | None, cls: str | os.PathLike | None,
             out: str | os.PathLike, split: str = "test", split_file: str | os.PathLike = DEFAULT_SPLIT_FILE,
             protocol: str = "nodule", device: str = "auto", precision: str = "auto",
             n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Score the checkpoints on one split of a cache (``split="all"``: every entry, no split file).

    Writes ``evaluation.json`` (tables, intervals, and one row per nodule or
    item), ``evaluation.md`` and, for a classifier, ``roc.png``. A checkpoint
    trained on other preprocessing than the cache's is refused.
    """
    if seg is None and cls is None:
        raise LungsegError("give a segmentation checkpoint (--seg), a classification one (--cls), or both")
    cache = Cache(cache_path)
    if split == "all":
        uids, split_file = list(cache.series_uids), None
    else:
        uids = split_scans(cache, read_split(split_file), split)
    if not uids:
        raise LungsegError(f"{cache_path}: no scans of split '{split}' in {split_file}")
    dev = resolve_device(device)
    models, described = {}, {}
    for kind, path in (("seg", seg), ("cls", cls)):
        if path is not None:
            model, ckpt = load_model(path, kind=kind)
            check_input(path, ckpt, cache.config, cache_path)
            models[kind], described[kind] = model.to(dev), describe(path, ckpt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "data": {"cache": str(cache_path), "kind": "crops" if is_crop_cache(cache) else "scans", "split": split,
                 "split_file": None if split_file is None else str(split_file), "n_scans": len(uids)},
        "protocol": protocol,
        "checkpoints": described,
    }
    if seg is not None:
        report["segmentation"] = evaluate_segmentation(models["seg"], cache, uids, device=dev, precision=precision)
    if cls is not None:
        result = evaluate_classification(models["cls"], cache, uids, device=dev, precision=precision,
                                         protocol=protocol, n_bootstrap=n_bootstrap, seed=seed)
        report["classification"] = result
        plot_roc(result, out / "roc.png", f"{Path(cache_path).name}, split {split}, {protocol} protocol")
    (out / "evaluation.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "evaluation.md").write_text(markdown(report) + "\n")
    return report
