"""Whole-scan prediction and the per-nodule report (``lungseg predict``).

The pipeline of paper A, Fig. 1, on one CT series:

1. the same preprocessing as training (:mod:`lungseg.preprocess`): resample to
   the checkpoint's spacing, lung mask, lung window;
2. the segmentation network over the lung region in overlapping windows of the
   sub-case size, probabilities blended with Gaussian weights;
3. probabilities back on the original grid, threshold inside the lung mask,
   connected components; those smaller than ``min_volume_mm3`` dropped;
4. one ROI per component, classified by the classifier checkpoint: paper A's
   3D ResNet50 on the ROI, or lungseg's own (:mod:`lungseg.malignancy`) on the
   ROI and the component's mask, whose ``malignancy_probability`` is its
   hybrid's (the network's logit with the component's measured size and HU
   features, on the original grid), with the network's alone in
   ``malignancy_probability_network``;
5. the report: ``nodules.json`` and ``nodules.csv`` (positions in voxel indices
   of the original series and in world LPS mm), a nodule label mask and a lung
   mask as NIfTI on the original grid (they overlay the source in viewers), one
   PNG per nodule, an overview figure and a self-contained ``report.html``
   (:mod:`lungseg.report`), versions, checkpoint hashes and timings.

With a detector checkpoint (``--det``, :mod:`lungseg.detect`) steps 2-3 are
the detector's instead: blob candidates in the lungs, p(nodule) of each, its
operating point, and the segmenter on each finding's ROI; findings are
numbered by p(nodule), which they report with their lung side.

A report folder is complete only when ``nodules.json`` exists; it is written
last, after everything else, so a rerun redoes any series left half done.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
from scipy import ndimage

from .cache import SIZE_CATEGORIES, equivalent_diameter_mm, nodule_features, size_category
from .configs import MODEL_INPUT_FIELDS, DetectConfig, PredictConfig  # noqa: F401  (re-exported)
from .detect import Rescorer, candidates, finding_masks, p_nodule, segment_rois, suppress
from .dicomio import (CTVolume, SeriesJob, check_chest_ct, find_inputs, input_sha256, nifti_stem,  # noqa: F401
                      read_job, reorient_to_axial, unique_names)
from .errors import LungsegError
from .preprocess import (Crops, PreprocessConfig, crop, mask_to_grid, resample, resampled_shape, roi_start, scan_lungs,
                         window)
from .report import CSV_COLUMNS, DISCLAIMER, Prediction, report_of_input, write_report  # noqa: F401

if TYPE_CHECKING:       # PyTorch is imported where a network runs, so a helper process can start without it
    import torch

log = logging.getLogger(__name__)



@dataclass
class Models:
    """The two networks of a prediction, their checkpoints and preprocessing settings."""

    seg: torch.nn.Module
    cls: torch.nn.Module
    preprocess: PreprocessConfig
    checkpoints: dict[str, Any]
    device: torch.device
    det: torch.nn.Module | None = None             # the detector's false-positive reduction
    operating_point: dict[str, Any] | None = None  # chosen on the detector's development data
    rescorer: Rescorer | None = None               # p(nodule) from the network's score and the candidate's
    hybrid: Any = None                             # the classifier's hybrid (lungseg.malignancy), if it has one

    @classmethod
    def load(cls, seg_path, cls_path, device: str = "auto", det_path=None) -> "Models":
        """The checkpoints; refused when one expects other input than the segmenter's preprocessing.

        The preprocessing of a prediction is the segmenter's (spacing, window,
        window size, lung mask) with the classifier's ROI shape. With a
        detector (``det_path``, from ``lungseg train-det``) its ROI shape must
        be the classifier's.
        """
        from .checkpoints import check_input, describe, load_model
        from .device import inference_ready, resolve_device
        from .malignancy import load_hybrid

        dev = resolve_device(device)
        seg, seg_ckpt = load_model(seg_path, kind="seg")
        clf, cls_ckpt = load_model(cls_path, kind="cls")
        seg_pre, cls_pre = seg_ckpt.get("preprocess") or {}, cls_ckpt.get("preprocess") or {}
        shared = tuple(f for f in MODEL_INPUT_FIELDS["cls"] if f in MODEL_INPUT_FIELDS["seg"])
        check_input(cls_path, cls_ckpt, seg_pre, seg_path, fields=shared)
        config = PreprocessConfig.from_dict({**seg_pre, **({"roi_shape": cls_pre["roi_shape"]}
                                                           if "roi_shape" in cls_pre else {})})
        info = {"seg": describe(seg_path, seg_ckpt), "cls": describe(cls_path, cls_ckpt)}
        det = op = rescorer = None
        if det_path is not None:
            det, det_ckpt = load_model(det_path, kind="det")
            check_input(det_path, det_ckpt, config.to_dict(), f"{seg_path} and {cls_path}",
                        fields=MODEL_INPUT_FIELDS["det"])
            info["det"] = describe(det_path, det_ckpt)
            op = det_ckpt.get("operating_point")
            rescorer = Rescorer.from_dict(det_ckpt["rescore"]) if det_ckpt.get("rescore") else None
            det = inference_ready(det, dev)
        return cls(inference_ready(seg, dev), inference_ready(clf, dev), config, info, dev, det, op, rescorer,
                   load_hybrid(cls_ckpt))


def _gaussian_weights(shape) -> np.ndarray:
    """Window weights that favour the centre (sigma = 1/8 of the window, as nnU-Net)."""
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (n / 8)) ** 2) for n in shape]
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(w / w.max(), 1e-3).astype(np.float32)


def _starts(length: int, size: int, overlap: float) -> list[int]:
    if length <= size:
        return [0]
    step = max(1, int(size * (1 - overlap)))
    n = math.ceil((length - size) / step) + 1
    return [int(round(i * (length - size) / (n - 1))) for i in range(n)]


def sliding_window(model, image: np.ndarray, window_shape, *, region=None, overlap: float = 0.5,
                   device="cpu", precision: str = "auto") -> np.ndarray:
    """Sigmoid probabilities of a segmentation ``model`` over a (z, y, x) ``image``.

    Windows of ``window_shape`` tile ``region`` (slices, default the whole
    image, grown to at least one window) with the given ``overlap``; their
    probabilities are blended with Gaussian weights. Outside the region: 0.
    """
    import torch

    from .device import precision_context

    model.eval()
    region = region or tuple(slice(0, n) for n in image.shape)
    lo = [max(0, min(r.start, n - w)) if n >= w else r.start for r, n, w in zip(region, image.shape, window_shape)]
    hi = [max(r.stop, l0 + w) for r, l0, w in zip(region, lo, window_shape)]
    size = [h - l0 for h, l0 in zip(hi, lo)]
    weights = _gaussian_weights(window_shape)
    acc = np.zeros(size, np.float32)
    norm = np.zeros(size, np.float32)
    for z in _starts(size[0], window_shape[0], overlap):
        for y in _starts(size[1], window_shape[1], overlap):
            for x in _starts(size[2], window_shape[2], overlap):
                start = (lo[0] + z, lo[1] + y, lo[2] + x)
                patch = crop(image, start, window_shape)
                with torch.no_grad(), precision_context(device, precision):
                    logits = model(torch.from_numpy(patch)[None, None].to(device))
                prob = torch.sigmoid(logits.float())[0, 0].cpu().numpy()
                sl = tuple(slice(o, o + w) for o, w in zip((z, y, x), window_shape))
                acc[sl] += prob * weights
                norm[sl] += weights
    out = np.zeros(image.shape, np.float32)
    src = tuple(slice(max(0, -l0), min(s, n - l0)) for l0, s, n in zip(lo, size, image.shape))
    dst = tuple(slice(max(0, l0), min(h, n)) for l0, h, n in zip(lo, hi, image.shape))
    out[dst] = (acc / np.maximum(norm, 1e-6))[src]
    return out


def _to_original(array: np.ndarray, original_shape, spacing, model_spacing, order: int) -> np.ndarray:
    """Resample a model-grid array back onto the original grid (inverse of :func:`resample`); masks and labels
    go back by nearest neighbour (``order=0``)."""
    return resample(array, model_spacing, spacing, order=order, shape=original_shape)


def _long_axis_mm(mask: np.ndarray, spacing) -> float:
    """Longest in-plane chord of the mask over its slices, mm (as readers measure)."""
    from scipy.spatial.distance import pdist

    best = 0.0
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        pts = np.argwhere(mask[k]) * np.asarray(spacing[1:])
        if len(pts) > 1:
            if len(pts) > 400:       # the chord's ends lie on the outline
                edge = mask[k] & ~ndimage.binary_erosion(mask[k])
                pts = np.argwhere(edge) * np.asarray(spacing[1:])
            best = max(best, float(pdist(pts).max()))
    return best + float(np.mean(spacing[1:]))      # from pixel centres to pixel edges


def _detect(hu_r: np.ndarray, lungs_r: np.ndarray, image_r: np.ndarray, models: Models, cfg: PredictConfig,
            timings: dict) -> tuple[np.ndarray, list[dict]]:
    """The detector's path on the model grid: (finding label mask, per finding its p(nodule)), best first.

    Blob candidates, p(nodule) of each from the false-positive reduction,
    suppression of candidates on one structure, the operating point, then the
    segmenter on each finding's ROI (:func:`lungseg.detect.finding_masks`).
    """
    pre = models.preprocess
    t = time.perf_counter()
    cands = candidates(hu_r, lungs_r, pre.spacing, DetectConfig())
    starts = [roi_start(c, pre.roi_shape) for c in cands.centres]
    rois = Crops(image_r, starts, pre.roi_shape)             # cut batch by batch as the networks read them
    timings["candidates_s"] = time.perf_counter() - t

    t = time.perf_counter()
    p = p_nodule(models.det, rois, cands.response, cands.radius_mm, models.rescorer, device=models.device,
                 precision=cfg.precision)
    keep = suppress(cands.centres * np.asarray(pre.spacing), cands.radius_mm, p)
    threshold = cfg.det_threshold if cfg.det_threshold is not None else \
        (models.operating_point or {}).get("threshold", 0.5)
    keep = keep[p[keep] >= threshold]
    timings["fp_reduction_s"] = time.perf_counter() - t

    t = time.perf_counter()
    probs = segment_rois(models.seg, rois[keep], device=models.device, precision=cfg.precision)
    labels_r, got = finding_masks(probs, rois.starts[keep], hu_r.shape, pre.spacing, cfg.threshold)
    extras = [{"nodule_probability": round(float(p[keep[k]]), 4)} for k in got]
    timings["segment_s"] = time.perf_counter() - t
    return labels_r, extras


def nodule_row(volume: CTVolume, nid: int, box: tuple[slice, ...], comp: np.ndarray, lungs: np.ndarray) -> dict:
    """A finding's report row: id, centroid (voxel, LPS), long axis, diameter, volume, mean HU, size, lung side.

    ``comp`` is the finding's mask within ``box`` of the volume.
    """
    idx = np.argwhere(comp) + [b.start for b in box]
    centroid = idx.mean(axis=0)
    volume_mm3 = float(len(idx) * np.prod(volume.spacing))
    diameter = equivalent_diameter_mm(volume_mm3)
    return {
        "id": nid,
        "centroid_voxel_zyx": [round(float(v), 2) for v in centroid],
        "centroid_world_lps_mm": [round(float(v), 2) for v in volume.voxel_to_world(centroid)],
        "long_axis_mm": round(_long_axis_mm(comp, volume.spacing), 2),
        "diameter_mm": round(diameter, 2),
        "volume_mm3": round(volume_mm3, 1),
        "mean_hu": round(float(volume.hu[box][comp].mean()), 1),
        "size_category": SIZE_CATEGORIES[size_category(diameter)][1],
        "lung_side": _lung_side(volume, centroid, lungs),
    }


def _lung_side(volume: CTVolume, centroid, lungs: np.ndarray) -> str:
    """'left' or 'right' (the patient's): the side of the lungs' midline (LPS x grows to the left)."""
    box = ndimage.find_objects(lungs.astype(np.uint8))
    mid = np.array([(b.start + b.stop - 1) / 2 for b in box[0]]) if box else np.array(volume.shape) / 2
    x_mid = volume.voxel_to_world(mid)[0]
    return "left" if volume.voxel_to_world(np.asarray(centroid, float))[0] > x_mid else "right"


def model_grid(volume: CTVolume, pre: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """A series' HU and lung mask on the model grid, as prediction sees them (no nodule mask to help the lungs)."""
    hu_r = resample(volume.hu, volume.spacing, pre.spacing,
                    shape=resampled_shape(volume.shape, volume.spacing, pre.spacing))
    return hu_r, scan_lungs(hu_r, pre)


def predict_volume(volume: CTVolume, models: Models, cfg: PredictConfig = PredictConfig()) -> Prediction:
    """Find, segment and classify the nodules of one CT volume.

    With a detector (``models.det``) the findings are its (:func:`_detect`);
    without one, paper A's path: the segmenter over the lungs in overlapping
    windows, its probability map thresholded into components. A coronal,
    sagittal or flipped volume is predicted in the axial frame
    (:func:`lungseg.dicomio.reorient_to_axial`) and reported on its own grid:
    masks and centroid indices are the source's, world coordinates the same.
    """
    axial, ro = reorient_to_axial(volume)
    pred = _predict_axial(axial, models, cfg)
    if not ro.identity:
        pred.labels = np.ascontiguousarray(ro.to_source(pred.labels))
        pred.lungs = np.ascontiguousarray(ro.to_source(pred.lungs))
        for n in pred.nodules:
            n["centroid_voxel_zyx"] = [round(float(v), 2) for v in ro.index_to_source(n["centroid_voxel_zyx"])]
    return pred


def _predict_axial(volume: CTVolume, models: Models, cfg: PredictConfig) -> Prediction:
    """:func:`predict_volume` on a volume in the axial frame."""
    timings = {}
    t = time.perf_counter()
    pre = models.preprocess
    check_chest_ct(volume, min_extent_mm=pre.roi_shape[0] * pre.spacing[0])
    hu_r, lungs_r = model_grid(volume, pre)
    image_r = window(hu_r, *pre.window)
    timings["preprocess_s"] = time.perf_counter() - t
    lungs = _to_original(lungs_r.astype(np.uint8), volume.shape, volume.spacing, pre.spacing, order=0) > 0

    extras: list[dict] = []
    if models.det is not None:
        labels_r, extras = _detect(hu_r, lungs_r, image_r, models, cfg, timings)
        t = time.perf_counter()
        components = _to_original(labels_r, volume.shape, volume.spacing, pre.spacing, order=0).astype(np.uint16)
        probs = None
    else:
        t = time.perf_counter()
        region = ndimage.find_objects(lungs_r.astype(np.uint8))
        region = region[0] if region else None
        if region is None:
            log.warning("%s: no lungs found; segmenting the whole volume", volume.path)
        probs_r = sliding_window(models.seg, image_r, pre.subcase_shape, region=region, overlap=cfg.overlap,
                                 device=models.device, precision=cfg.precision)
        timings["segment_s"] = time.perf_counter() - t
        t = time.perf_counter()
        probs = _to_original(probs_r, volume.shape, volume.spacing, pre.spacing, order=1)
        # Only voxels inside the lung mask count (paper A masks the parenchyma to cut false positives;
        # the mask's closing keeps juxta-pleural nodules in).
        components, _ = ndimage.label((probs >= cfg.threshold) & lungs, structure=np.ones((3, 3, 3)))
    voxel_mm3 = float(np.prod(volume.spacing))
    kept = []
    for i, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        comp = components[box] == i
        if comp.sum() * voxel_mm3 < cfg.min_volume_mm3:
            continue
        kept.append((box, comp, extras[i - 1] if extras else {}))
    timings["components_s"] = time.perf_counter() - t

    t = time.perf_counter()
    ratio = np.asarray(volume.spacing) / np.asarray(pre.spacing)
    labels = np.zeros(volume.shape, np.uint16)
    nodules = []
    rois, roi_masks, features = [], [], []
    for nid, (box, comp, extra) in enumerate(kept, start=1):
        labels[box][comp] = nid
        row = {**nodule_row(volume, nid, box, comp, lungs), **extra}
        centroid = (np.argwhere(comp) + [b.start for b in box]).mean(axis=0)
        start = roi_start(centroid * ratio, pre.roi_shape)
        rois.append(crop(image_r, start, pre.roi_shape))
        if getattr(models.cls, "in_channels", 1) > 1:     # a classifier that reads the finding's mask too
            roi_masks.append(crop(mask_to_grid(comp, box, ratio, image_r.shape).astype(np.uint8), start,
                                  pre.roi_shape))
        features.append(nodule_features(volume.hu[box], comp, volume.spacing))
        if probs is not None:
            row["segmentation_confidence"] = round(float(probs[box][comp].mean()), 4)
        nodules.append(row)
    if rois:
        from .malignancy import probabilities

        p, q = probabilities(models.cls, np.stack(rois), np.stack(roi_masks) if roi_masks else None,
                             device=models.device, precision=cfg.precision, features=np.stack(features),
                             hybrid=models.hybrid)
        for row, prob, hyb in zip(nodules, p, p if q is None else q):
            row["malignancy_probability"] = round(float(hyb), 4)
            if q is not None:
                row["malignancy_probability_network"] = round(float(prob), 4)
    timings["classify_s"] = time.perf_counter() - t
    return Prediction(nodules, labels, lungs.astype(np.uint8), {k: round(v, 3) for k, v in timings.items()})


def report_settings(models: Models, cfg: PredictConfig) -> dict:
    """What a report says of the settings of a prediction with ``models``."""
    return {"threshold": cfg.threshold, "min_volume_mm3": cfg.min_volume_mm3,
            "overlap": cfg.overlap, "device": str(models.device), "precision": cfg.precision,
            **({"detector": {"threshold": cfg.det_threshold if cfg.det_threshold is not None
                             else (models.operating_point or {}).get("threshold", 0.5),
                             "operating_point": models.operating_point}} if models.det is not None else {})}


def checkpoint_paths(seg=None, cls=None, det=None) -> tuple[Path, Path, Path | None]:
    """The (seg, cls, det) checkpoints of a prediction: those given, the bundled models for the rest.

    With no segmenter given, the bundled detector and segmenter (trained on
    the detector's findings) run together; with a user's segmenter, the
    detector runs only when one is given, else paper A's path (the segmenter
    over the whole lungs).
    """
    from . import models

    if seg is None:
        seg, det = models.default("seg"), det if det is not None else models.default("det")
    cls = cls if cls is not None else models.default("cls")
    return Path(seg), Path(cls), (Path(det) if det is not None else None)


def predict(source: str | os.PathLike, seg: str | os.PathLike | None, cls: str | os.PathLike | None,
            out: str | os.PathLike, cfg: PredictConfig = PredictConfig(), det: str | os.PathLike | None = None
            ) -> Iterator[tuple[SeriesJob, str, Any]]:
    """Predict every series under ``source`` into ``out/<series>/``; yields (job, status, detail).

    ``seg``, ``cls`` and ``det`` default to the bundled models
    (:func:`checkpoint_paths`). ``status`` is 'done' (detail: the report
    path), 'skipped' (a complete report of the same input exists) or 'failed' (detail: the
    error message). A helper process reads and writes (:class:`lungseg.pipeline.Lane`): a
    script that calls this runs it under ``if __name__ == "__main__":``.
    """
    from .pipeline import Lane

    out = Path(out)
    with Lane() as lane:            # finds and reads the first series while PyTorch loads
        found = lane.discover(source, out)
        lane.warm()
        seg, cls, det = checkpoint_paths(seg, cls, det)
        models = Models.load(seg, cls, cfg.device, det_path=det)
        jobs = lane.jobs(found)
        yield from report_each(jobs, out, lambda volume: predict_volume(volume, models, cfg),
                               checkpoints=models.checkpoints, settings=report_settings(models, cfg), lane=lane)


def report_each(jobs: Sequence[SeriesJob], out: str | os.PathLike, predict_fn: Callable[[CTVolume], Prediction], *,
                checkpoints: dict, settings: dict, read: Callable[[SeriesJob], CTVolume] = read_job,
                lane=None) -> Iterator[tuple[SeriesJob, str, Any]]:
    """Read, predict and report each job into ``out/<job.name>/``; yields (job, status, detail), in job order.

    ``status`` is 'done' (detail: the report path), 'skipped' (a complete
    report of the same input, by :func:`input_sha256`, exists; a report of
    another input there is made again) or 'failed' (detail: the error
    message). Any pipeline that turns a volume into a :class:`Prediction`
    reports through here. With a :class:`lungseg.pipeline.Lane` a helper
    process reads (``read`` is then :func:`read_job`) and writes, the next
    series read and the last report written while ``predict_fn`` runs.
    """
    if lane is not None:
        yield from _report_each_beside(jobs, Path(out), predict_fn, checkpoints, settings, lane)
        return
    out = Path(out)
    for job in jobs:
        folder = out / job.name
        if job.problem:
            yield job, "failed", job.problem
            continue
        try:
            t = time.perf_counter()
            sha = input_sha256(job)
            done = report_of_input(folder, sha)
            if done is not None:
                yield job, "skipped", done
                continue
            volume = read(job)
            load_s = time.perf_counter() - t
            pred = predict_fn(volume)
            pred.timings = {"load_s": round(load_s, 3), **pred.timings}
            yield job, "done", write_report(folder, volume, pred, checkpoints=checkpoints, settings=settings,
                                            input_sha256=sha)
        except LungsegError as exc:
            yield job, "failed", str(exc)


def _report_each_beside(jobs, out: Path, predict_fn, checkpoints, settings, lane) -> Iterator[tuple]:
    """:func:`report_each` with the reading and writing in ``lane``'s helper process."""
    from collections import deque

    readable = [job for job in jobs if not job.problem]
    following = {a.name: b for a, b in zip(readable, readable[1:])}
    results: deque = deque()        # per job in order: (job, status, detail), or (job, future of its report)

    def finished():
        while results and (len(results[0]) == 3 or results[0][1].done()):
            entry = results.popleft()
            yield entry if len(entry) == 3 else (entry[0], *entry[1].result())

    for job in jobs:
        if job.problem:
            results.append((job, "failed", job.problem))
            continue
        folder = out / job.name
        got = lane.volume(job, folder)
        if job.name in following:                       # the next series is read while this one computes
            lane.read(following[job.name], out / following[job.name].name)
        if got[0] != "read":
            results.append((job, *got))
        else:
            _, sha, volume, load_s = got
            try:
                pred = predict_fn(volume)
            except LungsegError as exc:
                lane.forget(job)
                results.append((job, "failed", str(exc)))
            else:
                pred.timings = {"load_s": load_s, **pred.timings}
                results.append((job, lane.write(job, folder, pred, checkpoints=checkpoints, settings=settings,
                                                sha=sha)))
        yield from finished()
    for entry in results:
        yield entry if len(entry) == 3 else (entry[0], *entry[1].result())
