"""``lungseg evaluate``: paper A's tables from a cache and two checkpoints.

- Segmentation, Table 4's layout: Dice, precision and recall per size category
  (micro, small, nodule, mass). Each ground-truth nodule is scored inside its
  16 x 48 x 48 ROI (the prediction of the sub-cases pasted back onto the
  resampled scan, against the consensus masks there), so each nodule counts
  once whatever its size. Plus nodule-level detection over the sub-cases: a
  predicted component hits a nodule when they overlap; sensitivity and false
  positives per scan.
- Detection the LUNA16 way (scan caches only; Setio et al., Medical Image
  Analysis 42:1-13, 2017): findings are the connected components of the
  probability map (max over overlapping sub-cases) at or above a candidate
  threshold, scored by their maximum probability and placed at their
  probability-weighted centroid; :func:`lungseg.metrics.froc` matches them to
  the reference nodules (relevant: >= 3 readers and >= 3 mm) and gives the FROC
  curve and the CPM, with a bootstrap 95 % interval over scans; ``froc.png``.
- Classification, Table 5's layout: accuracy, recall (sensitivity),
  specificity, and the AUC, each with a percentile bootstrap 95 % interval
  that resamples patients (their nodules are correlated); the confusion
  matrix; the ROC curve as PNG; the calibration of p(malignant) (Brier score,
  expected calibration error with intervals, reliability diagram as PNG).
- With a detector (``--det``): its FROC, and Table 4 of the segmenter on what
  it finds (:func:`evaluate_detection`).

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
from .configs import CANDIDATE_THRESHOLD, FROC_MAX_FINDINGS
from .device import precision_context, resolve_device
from .errors import LungsegError
from .lidc import CHARACTERISTICS, malignancy_label
from .detect import Rescorer
from .malignancy import load_hybrid
from .preprocess import crop
from .splits import DEFAULT_SPLIT_FILE, read_split, split_scans

log = logging.getLogger(__name__)

MALIGNANCY = CHARACTERISTICS.index("malignancy")

#: LUNA16's reference standard: a nodule counts (is relevant) for the FROC when
#: at least this many readers marked it and it is at least this large.
FROC_MIN_READERS = 3
FROC_MIN_DIAMETER_MM = 3.0
#: The FP rate (per scan) of the operating point at which per-size-category
#: sensitivity is reported.
FROC_REPORT_FP_RATE = 4.0


def _probabilities(model, batch: np.ndarray, device, precision: str) -> np.ndarray:
    """Sigmoid of a segmenter's logits (N, 1, ...), or a classifier's malignant-class softmax (N,)."""
    x = torch.from_numpy(batch.astype(np.float32)).to(device)
    with torch.no_grad(), precision_context(device, precision):
        logits = model(x).float()
    probs = torch.softmax(logits, dim=1)[:, 1] if logits.ndim == 2 else torch.sigmoid(logits)
    return probs.cpu().numpy()


def find_findings(prob: np.ndarray, spacing, *, candidate_threshold: float = CANDIDATE_THRESHOLD,
                  max_findings: int = FROC_MAX_FINDINGS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Findings of a probability map: (centres in mm (K, 3), scores (K,), centres in voxels (K, 3)).

    A finding is a connected component (26-connectivity) of ``prob >=
    candidate_threshold``; its score is the component's maximum probability
    and its centre the probability-weighted centroid, voxel index * ``spacing``
    (z, y, x mm). The ``max_findings`` best are kept, best first.
    """
    from scipy import ndimage

    if not 0 < candidate_threshold <= 1:
        raise ValueError(f"candidate_threshold must lie in (0, 1], got {candidate_threshold!r}")
    labels, n = ndimage.label(prob >= candidate_threshold, structure=ndimage.generate_binary_structure(3, 3))
    if n == 0:
        return np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3))
    index = np.arange(1, n + 1)
    scores = np.asarray(ndimage.maximum(prob, labels, index), dtype=float).reshape(n)
    voxels = np.asarray(ndimage.center_of_mass(prob.astype(np.float64), labels, index), dtype=float).reshape(n, 3)
    best = np.argsort(-scores, kind="stable")[:max_findings]
    return voxels[best] * np.asarray(spacing, dtype=float), scores[best], voxels[best]


def reference_nodules(cache: Cache, uid: str) -> dict[str, np.ndarray]:
    """A scan's reference nodules for the FROC, on the resampled grid and in mm.

    The nodule table (relevant when ``n_readers >= FROC_MIN_READERS`` and
    ``diameter_mm >= FROC_MIN_DIAMETER_MM``), then the optional group
    ``irrelevant/`` (nodules of fewer readers, all irrelevant; absent or empty
    in older caches). Keys: ``centroid_resampled`` (N, 3), ``centres_mm`` (N, 3),
    ``diameter_mm``, ``n_readers`` (-1 for the ``irrelevant/`` rows), ``relevant``,
    ``table_index`` (row of the nodule table, -1 for ``irrelevant/`` rows).
    """
    g = cache.scan(uid)
    table = cache.nodule_table(uid)
    centroid = np.asarray(table.get("centroid_resampled", np.zeros((0, 3))), dtype=float).reshape(-1, 3)
    diameter = np.asarray(table.get("diameter_mm", np.zeros(0)), dtype=float).reshape(-1)
    readers = np.asarray(table.get("n_readers", np.zeros(0)), dtype=int).reshape(-1)
    relevant = (readers >= FROC_MIN_READERS) & (diameter >= FROC_MIN_DIAMETER_MM)
    index = np.arange(len(diameter))
    extra = g.get("irrelevant")
    if extra is not None and "centroid_resampled" in extra and "diameter_mm" in extra:
        c = np.asarray(extra["centroid_resampled"][()], dtype=float).reshape(-1, 3)
        d = np.asarray(extra["diameter_mm"][()], dtype=float).reshape(-1)
        if len(c) != len(d):
            raise LungsegError(f"{cache.path}: scan {uid}: irrelevant/ has {len(c)} centroids, {len(d)} diameters")
        centroid, diameter = np.concatenate([centroid, c]), np.concatenate([diameter, d])
        readers = np.concatenate([readers, np.full(len(d), -1)])
        relevant = np.concatenate([relevant, np.zeros(len(d), bool)])
        index = np.concatenate([index, np.full(len(d), -1)])
    spacing = np.asarray(g.attrs["spacing"], dtype=float)
    return {"centroid_resampled": centroid, "centres_mm": centroid * spacing, "diameter_mm": diameter,
            "n_readers": readers, "relevant": relevant, "table_index": index}


def score_report(report: dict[str, Any], cache: Cache, uid: str) -> dict[str, Any]:
    """What a ``predict`` report (``nodules.json``) found of scan ``uid``'s reference nodules, by the FROC's rule.

    A finding hits a nodule when its centre lies within the nodule's radius
    (:func:`lungseg.metrics.froc`; centres in mm from voxel 0, which the
    source grid and the cache's resampled grid share). Returns ``nodules``
    (per reference nodule: ``diameter_mm``, ``relevant``, ``found``),
    ``n_relevant``, ``n_found`` (relevant nodules hit) and ``false_positives``
    (ids of findings that hit no nodule, relevant or not).
    """
    ref = reference_nodules(cache, uid)
    found = report["nodules"]
    centres = np.asarray([n["centroid_voxel_zyx"] for n in found], float).reshape(-1, 3)
    scores = np.asarray([n.get("nodule_probability", 1.0) for n in found], float)
    scan = metrics.froc([{"finding_centres_mm": centres * np.asarray(report["spacing_zyx_mm"], float),
                          "finding_scores": scores, "nodule_centres_mm": ref["centres_mm"],
                          "nodule_diameters_mm": ref["diameter_mm"], "nodule_relevant": ref["relevant"]}],
                        max_findings=max(1, len(found)))["scans"][0]
    hit = np.isfinite(scan["nodule_scores"])
    return {"nodules": [{"diameter_mm": float(d), "relevant": bool(r), "found": bool(h)}
                        for d, r, h in zip(ref["diameter_mm"], ref["relevant"], hit)],
            "n_relevant": int(ref["relevant"].sum()), "n_found": int((hit & ref["relevant"]).sum()),
            "false_positives": [n["id"] for n, s in zip(found, scan["status"]) if s == "fp"]}


def evaluate_segmentation(model, cache: Cache, uids, *, device, precision: str = "auto",
                          threshold: float = 0.5, candidate_threshold: float = CANDIDATE_THRESHOLD,
                          max_findings: int = FROC_MAX_FINDINGS, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per-nodule Dice/precision/recall by size category, detection counts and the FROC, on ``uids``.

    ``threshold`` binarises the probability map for Dice and detection counts;
    ``candidate_threshold`` (default 0.1) cuts it into FROC findings, of which
    the ``max_findings`` best per scan count. The FROC (under ``"froc"``, with a
    CPM interval from ``n_bootstrap`` resamples of scans, ``seed``) and the
    detection counts are computed for scan caches only.
    """
    model.eval()
    diameters, scores = [], {"dice": [], "precision": [], "recall": []}
    detections, rows = [], []
    froc_scans, froc_meta = [], []
    crops = is_crop_cache(cache)
    for uid in uids:
        g = cache.scan(uid)
        shape = tuple(int(v) for v in g.attrs["shape"])
        pred = np.zeros(shape, bool)
        truth = np.zeros(shape, bool)
        covered = np.zeros(shape, bool)
        prob = None if crops else np.zeros(shape, np.float32)
        starts = g["subcases/start"][()]
        for i, start in enumerate(starts):
            q = _probabilities(model, g["subcases/image"][i][None, None], device, precision)[0, 0]
            p = q >= threshold
            sub = tuple(slice(max(s, 0), min(s + n, size)) for s, n, size in zip(start, p.shape, shape))
            local = tuple(slice(a.start - s, a.stop - s) for a, s in zip(sub, start))
            pred[sub] |= p[local]
            truth[sub] |= g["subcases/mask"][i][local] > 0
            covered[sub] = True
            if prob is not None:
                np.maximum(prob[sub], q[local], out=prob[sub])
        if not crops:
            detections.append(metrics.detection_counts(truth, pred & covered))
            prob[~covered] = 0.0
            centres, found, voxels = find_findings(prob, g.attrs["spacing"], candidate_threshold=candidate_threshold,
                                                   max_findings=max_findings)
            ref = reference_nodules(cache, uid)
            froc_scans.append({"finding_centres_mm": centres, "finding_scores": found,
                               "nodule_centres_mm": ref["centres_mm"], "nodule_diameters_mm": ref["diameter_mm"],
                               "nodule_relevant": ref["relevant"]})
            froc_meta.append((uid, str(g.attrs["patient_id"]), voxels, ref))
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
        if froc_scans:
            out["froc"] = _froc_section(froc_scans, froc_meta, rows, candidate_threshold=candidate_threshold,
                                        max_findings=max_findings, n_bootstrap=n_bootstrap, seed=seed)
    out["nodules"] = rows
    return out


def _rate_key(rate: float) -> str:
    return f"{rate:g}"


def _froc_section(scans, meta, seg_rows, *, candidate_threshold: float, max_findings: int,
                  n_bootstrap: int, seed: int) -> dict[str, Any]:
    """The report's ``froc`` section: :func:`lungseg.metrics.froc` plus rows and per-category tables."""
    result = metrics.froc(scans, max_findings=max_findings)
    ci = metrics.cpm_bootstrap_ci(result, n_resamples=n_bootstrap, seed=seed)
    at_rate = metrics.froc_operating_threshold(result, FROC_REPORT_FP_RATE)
    finding_rows, nodule_rows = [], []
    detected_ids = set()
    rel_diameters, rel_scores = [], []
    for scan, matched, (uid, patient, voxels, ref) in zip(scans, result["scans"], meta):
        for k, (centre, score, status) in enumerate(zip(scan["finding_centres_mm"], scan["finding_scores"],
                                                         matched["status"])):
            finding_rows.append({"id": f"{uid}/f{k}", "series_uid": uid, "patient_id": patient,
                                 "centre_mm": [float(v) for v in centre],
                                 "centre_resampled": [float(v) for v in voxels[k]],
                                 "score": float(score), "status": str(status)})
        for n, hit in enumerate(matched["nodule_scores"]):
            j = int(ref["table_index"][n])
            nid = f"{uid}/{j}" if j >= 0 else f"{uid}/irrelevant/{n - int(np.sum(ref['table_index'] >= 0))}"
            hit_score = float(hit) if np.isfinite(hit) else None
            nodule_rows.append({"id": nid, "series_uid": uid, "patient_id": patient,
                                "centre_resampled": [float(v) for v in ref["centroid_resampled"][n]],
                                "diameter_mm": float(ref["diameter_mm"][n]), "n_readers": int(ref["n_readers"][n]),
                                "relevant": bool(ref["relevant"][n]), "hit_score": hit_score})
            if hit_score is not None and j >= 0:
                detected_ids.add(nid)
            if ref["relevant"][n]:
                rel_diameters.append(float(ref["diameter_mm"][n]))
                rel_scores.append(float(hit))
    rel_scores_a = np.asarray(rel_scores, dtype=float)
    key = f"sensitivity_at_{_rate_key(FROC_REPORT_FP_RATE)}_fp"
    per_size = (metrics.per_category_table(np.asarray(rel_diameters),
                                           {key: rel_scores_a >= at_rate, "sensitivity_any": np.isfinite(rel_scores_a)})
                if rel_diameters else {})
    detected = [r for r in seg_rows if r["id"] in detected_ids]
    det_table = (metrics.per_category_table(np.asarray([r["diameter_mm"] for r in detected]),
                                            {k: [r[k] for r in detected] for k in ("dice", "precision", "recall")})
                 if detected else {})
    return {
        "protocol": "LUNA16 (Setio et al., Medical Image Analysis 42:1-13, 2017); sensitivity at an FP rate: "
                    "best operating point at or below it (step reading)",
        "cpm": result["cpm"], "cpm_ci95": [ci.low, ci.high], "n_bootstrap": ci.n_resamples,
        "sensitivity_ci95": {_rate_key(r): [b.low, b.high] for r in result["fp_rates"]
                             for b in [metrics.cpm_bootstrap_ci(result, n_resamples=n_bootstrap, seed=seed, fp_rate=r)]},
        "n_bootstrap_valid": ci.n_valid,
        "sensitivity_at_fp_rates": {_rate_key(r): float(s) for r, s in zip(result["fp_rates"],
                                                                           result["sensitivity_at_fp_rates"])},
        "curve": {"thresholds": result["thresholds"].tolist(), "sensitivity": result["sensitivity"].tolist(),
                  "fp_per_scan": result["fp_per_scan"].tolist()},
        "counts": result["counts"],
        "candidate_threshold": float(candidate_threshold), "max_findings": int(max_findings),
        "relevant_nodule": {"min_readers": FROC_MIN_READERS, "min_diameter_mm": FROC_MIN_DIAMETER_MM},
        "report_fp_rate": FROC_REPORT_FP_RATE,
        "threshold_at_report_fp_rate": at_rate if np.isfinite(at_rate) else None,
        "per_size_category": per_size,
        "per_size_category_detected": det_table,
        "findings": finding_rows,
        "nodules": nodule_rows,
    }


def evaluate_detection(det, seg, cache: Cache, uids, *, device, precision: str = "auto", det_threshold: float,
                       seg_threshold: float = 0.5, max_findings: int = FROC_MAX_FINDINGS, n_bootstrap: int = 1000,
                       seed: int = 0, rescorer=None) -> dict[str, Any]:
    """The detector (``lungseg train-det``) on a scan cache, and the segmenter on what it finds.

    ``froc``: the FROC of the detector's findings (its suppressed candidates,
    scored by p(nodule), rescored by ``rescorer`` when given;
    :func:`lungseg.detect.scan_findings`), as for a
    segmenter's findings. With a segmenter (``seg``), Table 4 twice: ``in_context``
    scores, per relevant nodule, the masks ``lungseg predict`` would report
    (findings at ``det_threshold``, :func:`lungseg.detect.finding_masks`)
    inside the nodule's ROI, a missed nodule scoring 0; ``nodule_centred``
    scores the segmenter on each nodule's own ROI (its component nearest the
    centre), whether found or not. Nodules whose mask vanishes on the model
    grid (a few micro nodules on 3 mm slices) are left out of both.
    """
    from .detect import cache_findings, finding_masks, segment_rois

    froc_scans, froc_meta = [], []
    context_rows, centred_rows = [], []
    for found in cache_findings(det, cache, uids, device=device, precision=precision, rescorer=rescorer):
        uid, keep, ref = found["uid"], found["keep"], found["ref"]
        g = cache.scan(uid)
        spacing = np.asarray(g.attrs["spacing"], float)
        froc_scans.append(found["froc"])
        froc_meta.append((uid, str(g.attrs["patient_id"]), found["centres"], ref))
        if seg is None:
            continue
        at = keep[found["froc"]["finding_scores"] >= det_threshold]
        probs = segment_rois(seg, cache.candidate_rois(uid, at), device=device, precision=precision)
        labels, _ = finding_masks(probs, g["candidates/start"][()][at], tuple(g.attrs["shape"]), spacing,
                                  seg_threshold)
        roi_images, roi_masks = g["rois/image"][()], g["rois/mask"][()]
        centred = segment_rois(seg, roi_images, device=device, precision=precision)
        table = cache.nodule_table(uid)
        relevant = ref["relevant"][ref["table_index"] >= 0]
        for j, start in enumerate(g["rois/start"][()]):
            if not relevant[j]:
                continue
            truth = roi_masks[j] > 0
            if not truth.any():         # the mask vanished on the model grid: nothing to score
                continue
            row = {"id": f"{uid}/{j}", "patient_id": str(g.attrs["patient_id"]),
                   "diameter_mm": float(table["diameter_mm"][j])}
            context_rows.append({**row, **metrics.segmentation_scores(truth, crop(labels, start, truth.shape) > 0)})
            own, _ = finding_masks(centred[j:j + 1], np.zeros((1, 3), int), truth.shape, spacing, seg_threshold)
            centred_rows.append({**row, **metrics.segmentation_scores(truth, own > 0)})
    out = {"froc": _froc_section(froc_scans, froc_meta, context_rows, candidate_threshold=det_threshold,
                                 max_findings=max_findings, n_bootstrap=n_bootstrap, seed=seed),
           "det_threshold": float(det_threshold)}
    if seg is not None:
        for name, rows in (("in_context", context_rows), ("nodule_centred", centred_rows)):
            out[name] = {"per_size_category": metrics.per_category_table(
                np.asarray([r["diameter_mm"] for r in rows]), {k: [r[k] for r in rows] for k in
                                                                ("dice", "precision", "recall")}) if rows else {},
                "nodules": rows}
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


def _cls_scores(labels: np.ndarray, probs: np.ndarray, patients: np.ndarray, *, n_bootstrap: int,
                seed: int) -> dict[str, Any]:
    """Accuracy, recall, specificity and AUC with patient-bootstrap 95 % intervals, and the calibration."""
    pred = (probs >= 0.5).astype(np.int64)
    stats = {
        "accuracy": lambda t, p, s: metrics.accuracy(t, p),
        "recall": lambda t, p, s: metrics.sensitivity(t, p),
        "specificity": lambda t, p, s: metrics.specificity(t, p),
        "auc": lambda t, p, s: metrics.roc_auc(t, s),
    }
    out: dict[str, Any] = {}
    ci = {}
    for name, fn in stats.items():
        b = metrics.bootstrap_ci(fn, labels, pred, probs, n_resamples=n_bootstrap, seed=seed, groups=patients)
        out[name] = b.estimate
        ci[name] = [b.low, b.high]
    out["ci95"] = ci
    calibration = {}
    for name, fn in (("brier", metrics.brier_score), ("ece", metrics.expected_calibration_error)):
        b = metrics.bootstrap_ci(fn, labels, probs, n_resamples=n_bootstrap, seed=seed, groups=patients)
        calibration[name], calibration[f"{name}_ci95"] = b.estimate, [b.low, b.high]
    curve = metrics.reliability(labels, probs)
    calibration["reliability"] = {k: [None if not np.isfinite(v) else float(v) for v in a] if a.dtype.kind == "f"
                                  else a.tolist() for k, a in curve.items()}
    calibration["n_bins"] = metrics.CALIBRATION_BINS
    out["calibration"] = calibration
    out["confusion_matrix"] = metrics.confusion_matrix(labels, pred, num_classes=2).tolist()
    return out


def evaluate_classification(model, cache: Cache, uids, *, device, precision: str = "auto",
                            protocol: str = "nodule", n_bootstrap: int = 1000, seed: int = 0,
                            hybrid=None) -> dict[str, Any]:
    """Table 5's measures with bootstrap 95 % intervals, the confusion matrix, the ROC curve and the calibration.

    With a ``hybrid`` (:mod:`lungseg.malignancy`) and a cache that stores the
    nodules' features, the reported p(malignant) is the hybrid's, and
    ``network`` holds the same measures for the network alone.
    """
    from .malignancy import cache_rois, features_of, probabilities

    model.eval()
    items, labels, patients = classification_items(cache, uids, protocol)
    if not len(labels):
        raise LungsegError("no labelled nodules to classify in this split")
    uids = list(dict.fromkeys(u for u, _ in items))
    rois, images, masks = cache_rois(cache, uids)
    feats = [features_of(cache, uid) for uid in uids]
    features = np.concatenate(feats) if all(f is not None for f in feats) else None
    p, q = probabilities(model, images, masks, device=device, precision=precision, features=features, hybrid=hybrid)
    by_roi = {item: (float(p[i]), None if q is None else float(q[i])) for i, item in enumerate(rois)}
    p_net = np.array([by_roi[item][0] for item in items])
    has_hybrid = all(by_roi[item][1] is not None for item in items)
    probs = np.array([by_roi[item][1] for item in items]) if has_hybrid else p_net
    out: dict[str, Any] = {"n": int(len(labels)), "n_malignant": int(labels.sum()),
                           "n_patients": int(len(set(patients.tolist()))),
                           "p_malignant": "hybrid" if has_hybrid else "network"}
    out.update(_cls_scores(labels, probs, patients, n_bootstrap=n_bootstrap, seed=seed))
    if has_hybrid:
        net = _cls_scores(labels, p_net, patients, n_bootstrap=n_bootstrap, seed=seed)
        out["network"] = {k: net[k] for k in ("auc", "ci95", "calibration")}
    fpr, tpr, _ = metrics.roc_curve(labels, probs)
    out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    out["items"] = [{"id": f"{uid}/{j}", "patient_id": str(pt), "label": int(y), "p_malignant": float(q),
                     **({"p_network": float(pn)} if has_hybrid else {})}
                    for (uid, j), pt, y, q, pn in zip(items, patients, labels, probs, p_net)]
    return out


def plot_calibration(result: dict[str, Any], path: Path, title: str) -> None:
    """Reliability diagram: observed malignant fraction against mean p(malignant) per bin, with bin counts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result["calibration"]
    r = c["reliability"]
    used = [i for i, n in enumerate(r["count"]) if n]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.plot([r["mean_predicted"][i] for i in used], [r["observed"][i] for i in used], "o-",
            label=f"ECE {c['ece']:.3f}, Brier {c['brier']:.3f}")
    ax.set_ylabel("observed malignant fraction")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title, fontsize=8)
    edges = r["edges"]
    bx.bar(edges[:-1], r["count"], width=np.diff(edges), align="edge", color="lightsteelblue", edgecolor="grey")
    bx.set_xlabel("p(malignant)")
    bx.set_ylabel("nodules")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


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


def plot_froc(froc: dict[str, Any], path: Path, title: str) -> None:
    """The FROC curve (step reading) on a log FP/scan axis from 1/8 to 8, CPM and interval in the legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = np.asarray(metrics.CPM_FP_RATES)
    curve = froc["curve"]
    grid = np.geomspace(rates.min(), rates.max(), 400)
    sens = metrics.froc_sensitivity_at(curve["sensitivity"], curve["fp_per_scan"], grid)
    at = [froc["sensitivity_at_fp_rates"][_rate_key(r)] for r in rates]
    lo, hi = froc["cpm_ci95"]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot(grid, sens, "-", label=f"CPM {froc['cpm']:.3f} [{lo:.3f}, {hi:.3f}]")
    ax.plot(rates, at, "o", color="C0")
    ax.set_xscale("log")
    ax.set_xlim(rates.min(), rates.max())
    ax.minorticks_off()
    ax.set_xticks(rates)
    ax.set_xticklabels(["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
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
        f = seg.get("froc")
        if f:
            c, (lo, hi), at = f["counts"], f["cpm_ci95"], f["sensitivity_at_fp_rates"]
            lines += ["", f"FROC (LUNA16): CPM {f['cpm']:.3f} [{lo:.3f}, {hi:.3f}]; sensitivity "
                          + ", ".join(f"{at[k]:.3f} at {k}" for k in ("1", "2", "4")) + " FP/scan; "
                          f"{c['n_hit']}/{c['n_relevant']} relevant nodules found, {c['n_false_positive']} false "
                          f"positives over {c['n_scans']} scans (candidate threshold {f['candidate_threshold']:g})"]
            if f["per_size_category"]:
                key = f"sensitivity_at_{_rate_key(f['report_fp_rate'])}_fp"
                lines += ["", f"| size category | relevant nodules | sensitivity at {f['report_fp_rate']:g} FP/scan "
                              "| sensitivity, all findings |", "|---|---|---|---|"]
                for name, row in f["per_size_category"].items():
                    lines.append(f"| {name} | {row['n']} | {row[key]:.3f} | {row['sensitivity_any']:.3f} |")
            if f["per_size_category_detected"]:
                lines += ["", "Detected nodules only:", "",
                          "| size category | n | dice | precision | recall |", "|---|---|---|---|---|"]
                for name, row in f["per_size_category_detected"].items():
                    lines.append(f"| {name} | {row['n']} | {row['dice']:.3f} | {row['precision']:.3f} "
                                 f"| {row['recall']:.3f} |")
        lines += [""]
    det = report.get("detection")
    if det:
        f = det["froc"]
        c, (lo, hi), at = f["counts"], f["cpm_ci95"], f["sensitivity_at_fp_rates"]
        sci = f.get("sensitivity_ci95", {})
        lines += [f"Detector FROC (LUNA16): CPM {f['cpm']:.3f} [{lo:.3f}, {hi:.3f}]; sensitivity "
                  + ", ".join(f"{at[k]:.3f}" + (f" [{sci[k][0]:.3f}, {sci[k][1]:.3f}]" if k in sci else "")
                              + f" at {k}" for k in ("1", "2", "4")) + " FP/scan; "
                  f"{c['n_hit']}/{c['n_relevant']} relevant nodules among all findings, {c['n_false_positive']} "
                  f"false positives over {c['n_scans']} scans"]
        for name, title in (("in_context", f"Table 4, masks of the findings at p(nodule) >= "
                                           f"{det['det_threshold']:.3f} (a missed nodule scores 0)"),
                            ("nodule_centred", "Table 4, the segmenter on each nodule's own ROI")):
            if det.get(name) and det[name]["per_size_category"]:
                lines += ["", title + ":", "", "| size category | n | dice | precision | recall |",
                          "|---|---|---|---|---|"]
                for cat, row in det[name]["per_size_category"].items():
                    lines.append(f"| {cat} | {row['n']} | {row['dice']:.3f} | {row['precision']:.3f} "
                                 f"| {row['recall']:.3f} |")
        lines += [""]
    cls = report.get("classification")
    if cls:
        ci = cls["ci95"]
        lines += ["| accuracy | recall | specificity | auc |", "|---|---|---|---|",
                  "| " + " | ".join(f"{cls[k]:.3f} [{ci[k][0]:.3f}, {ci[k][1]:.3f}]"
                                    for k in ("accuracy", "recall", "specificity", "auc")) + " |",
                  "", f"Confusion matrix (rows true benign/malignant, columns predicted): {cls['confusion_matrix']}; "
                      f"{cls['n']} items, {cls['n_malignant']} malignant, {cls['n_patients']} patients"]
        cal = cls.get("calibration")
        if cal:
            lines += ["", f"Calibration of p(malignant): Brier {cal['brier']:.3f} [{cal['brier_ci95'][0]:.3f}, "
                          f"{cal['brier_ci95'][1]:.3f}], ECE {cal['ece']:.3f} [{cal['ece_ci95'][0]:.3f}, "
                          f"{cal['ece_ci95'][1]:.3f}] ({cal['n_bins']} equal-width bins; calibration.png)"]
        net = cls.get("network")
        if net:
            ncal = net["calibration"]
            lines += ["", f"p(malignant) above is the hybrid's (network logit + measured size and HU). The network "
                          f"alone: AUC {net['auc']:.3f} [{net['ci95']['auc'][0]:.3f}, {net['ci95']['auc'][1]:.3f}], "
                          f"Brier {ncal['brier']:.3f}, ECE {ncal['ece']:.3f}."]
    return "\n".join(lines)


def evaluate(cache_path: str | os.PathLike, *, seg: str | os.PathLike | None, cls: str | os.PathLike | None,
             out: str | os.PathLike, split: str = "test", split_file: str | os.PathLike = DEFAULT_SPLIT_FILE,
             protocol: str = "nodule", device: str = "auto", precision: str = "auto",
             n_bootstrap: int = 1000, seed: int = 0, candidate_threshold: float = CANDIDATE_THRESHOLD,
             max_findings: int = FROC_MAX_FINDINGS, det: str | os.PathLike | None = None,
             det_threshold: float | None = None) -> dict[str, Any]:
    """Score the checkpoints on one split of a cache (``split="all"``: every entry, no split file).

    With a detector (``det``) the report's ``detection`` section holds its FROC
    and, with ``seg``, Table 4 of the segmenter on what it finds at
    ``det_threshold`` (default: the detector's operating point), instead of
    the segmenter's sub-case sections (:func:`evaluate_detection`).

    Writes ``evaluation.json`` (tables, intervals, and one row per nodule or
    item), ``evaluation.md``, for a classifier ``roc.png`` and
    ``calibration.png`` (reliability diagram), and for a segmenter or a
    detector on a scan cache ``froc.png`` (findings: ``candidate_threshold``,
    at most ``max_findings`` per scan). A checkpoint trained on other
    preprocessing than the cache's is refused.
    """
    if seg is None and cls is None and det is None:
        raise LungsegError("give a segmentation (--seg), classification (--cls) or detector (--det) checkpoint")
    cache = Cache(cache_path)
    if split == "all":
        uids, split_file = list(cache.series_uids), None
    else:
        uids = split_scans(cache, read_split(split_file), split)
    if not uids:
        raise LungsegError(f"{cache_path}: no scans of split '{split}' in {split_file}")
    dev = resolve_device(device)
    models, described = {}, {}
    op = rescore = hybrid = None
    for kind, path in (("seg", seg), ("cls", cls), ("det", det)):
        if path is not None:
            model, ckpt = load_model(path, kind=kind)
            check_input(path, ckpt, cache.config, cache_path)
            models[kind], described[kind] = model.to(dev), describe(path, ckpt)
            if kind == "det":
                op, rescore = ckpt.get("operating_point"), ckpt.get("rescore")
            if kind == "cls":
                hybrid = load_hybrid(ckpt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "data": {"cache": str(cache_path), "kind": "crops" if is_crop_cache(cache) else "scans", "split": split,
                 "split_file": None if split_file is None else str(split_file), "n_scans": len(uids)},
        "protocol": protocol,
        "checkpoints": described,
    }
    if det is not None:
        threshold = det_threshold if det_threshold is not None else (op or {}).get("threshold", 0.5)
        report["detection"] = evaluate_detection(models["det"], models.get("seg"), cache, uids, device=dev,
                                                 precision=precision, det_threshold=threshold,
                                                 max_findings=max_findings, n_bootstrap=n_bootstrap, seed=seed,
                                                 rescorer=Rescorer.from_dict(rescore) if rescore else None)
        report["detection"]["operating_point"] = op
        plot_froc(report["detection"]["froc"], out / "froc.png", f"{Path(cache_path).name}, split {split}, detector")
    elif seg is not None:
        report["segmentation"] = evaluate_segmentation(models["seg"], cache, uids, device=dev, precision=precision,
                                                       candidate_threshold=candidate_threshold,
                                                       max_findings=max_findings, n_bootstrap=n_bootstrap, seed=seed)
        if "froc" in report["segmentation"]:
            plot_froc(report["segmentation"]["froc"], out / "froc.png", f"{Path(cache_path).name}, split {split}")
    if cls is not None:
        result = evaluate_classification(models["cls"], cache, uids, device=dev, precision=precision,
                                         protocol=protocol, n_bootstrap=n_bootstrap, seed=seed, hybrid=hybrid)
        report["classification"] = result
        plot_roc(result, out / "roc.png", f"{Path(cache_path).name}, split {split}, {protocol} protocol")
        plot_calibration(result, out / "calibration.png", f"{Path(cache_path).name}, split {split}, {protocol} protocol")
    (out / "evaluation.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "evaluation.md").write_text(markdown(report) + "\n")
    return report
