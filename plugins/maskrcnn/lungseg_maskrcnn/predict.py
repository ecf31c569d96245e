"""Mask R-CNN on a whole series: instances per slice merged into 3D findings (``lungseg maskrcnn predict``).

Every axial slice with lung is prepared as in training (lung mask applied, HU
clipped to [-1024, 800] and scaled to [0, 1]) and given to the model in its
lungs window. Instances with a score of at least ``threshold`` are drawn into
a 3D mask; its connected components (26-connected: a nodule's masks on
neighbouring slices overlap) are the findings, each scored by its best
instance's score (``nodule_probability``). Findings smaller than
``min_volume_mm3`` are dropped. The report is lungseg's own
(:func:`lungseg.infer.write_report`): ``nodules.json`` / ``.csv``, masks as
NIfTI, a PNG per finding, so that paper A's and paper B's findings on one scan
can be set side by side. Paper B rates no malignancy: that field is absent.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from scipy import ndimage

from lungseg.checkpoints import sha256
from lungseg.device import resolve_device
from lungseg.dicomio import CTVolume
from lungseg.errors import LungsegError
from lungseg.infer import Prediction, SeriesJob, find_inputs, nodule_row, read_job, report_each
from lungseg.preprocess import lung_mask

from .evaluate import predict_mask
from .slices import CLIP_HU, bounding_box, normalize
from .train import load

log = logging.getLogger(__name__)

THRESHOLD = 0.5
MIN_VOLUME_MM3 = 10.0


def predict_volume(volume: CTVolume, model, *, device="cpu", threshold: float = THRESHOLD,
                   min_volume_mm3: float = MIN_VOLUME_MM3,
                   progress: Callable[[int, int], None] | None = None) -> Prediction:
    """Findings of Mask R-CNN on every lung slice of ``volume``."""
    timings = {}
    t = time.perf_counter()
    lungs = lung_mask(volume.hu, volume.spacing)
    timings["lungs_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    found = np.zeros(volume.shape, bool)
    score = np.zeros(volume.shape, np.float32)
    zs = [z for z in range(volume.shape[0]) if lungs[z].any()]
    for n, z in enumerate(zs, 1):
        image = np.clip(volume.hu[z], *CLIP_HU)
        image = np.where(lungs[z], image, CLIP_HU[0])
        for inst in predict_mask(model, normalize(image), bounding_box(lungs[z]), device):
            if inst["score"] >= threshold:
                found[z] |= inst["mask"]
                score[z][inst["mask"]] = np.maximum(score[z][inst["mask"]], inst["score"])
        if progress:
            progress(n, len(zs))
    timings["slices_s"] = round(time.perf_counter() - t, 3)
    components, n = ndimage.label(found, structure=np.ones((3, 3, 3), bool))
    voxel_mm3 = float(np.prod(volume.spacing))
    labels = np.zeros(volume.shape, np.uint16)
    kept = []
    for i, box in enumerate(ndimage.find_objects(components), start=1):
        comp = components[box] == i
        if comp.sum() * voxel_mm3 >= min_volume_mm3:
            kept.append((float(score[box][comp].max()), box, comp))
    kept.sort(key=lambda k: -k[0])                  # best first, as lungseg's detector reports
    nodules = []
    for nid, (best, box, comp) in enumerate(kept, start=1):
        labels[box][comp] = nid
        nodules.append({**nodule_row(volume, nid, box, comp, lungs), "nodule_probability": round(best, 4),
                        "slices": int(comp.any(axis=(1, 2)).sum())})
    return Prediction(nodules=nodules, labels=labels, lungs=lungs.astype(np.uint8), timings=timings)


def find_sources(source: str | os.PathLike) -> list[SeriesJob]:
    """lungseg's inputs (DICOM folders, NIfTI files), plus MetaImage files (``.mhd``: LUNA16's layout)."""
    source = Path(source)
    if source.is_file() and source.suffix == ".mhd":
        return [_mhd_job(source)]
    if source.is_dir() and any(source.glob("*.mhd")) and not any(source.rglob("*.dcm")):
        return [_mhd_job(p) for p in sorted(source.glob("*.mhd"))]
    return find_inputs(source)


def _mhd_job(path: Path) -> SeriesJob:
    """A MetaImage input: its header and, when there, the raw data file beside it (what its report is made from)."""
    raw = [p for p in (path.with_suffix(".raw"), path.with_suffix(".zraw")) if p.exists()]
    return SeriesJob(path, None, path.stem, tuple(str(p) for p in (path, *raw)))


def _read(job: SeriesJob) -> CTVolume:
    from .luna16 import read_mhd

    return read_mhd(job.path) if job.series_uid is None and job.path.suffix == ".mhd" else read_job(job)


def predict(source, model_path, out, *, device: str = "auto", threshold: float = THRESHOLD,
            min_volume_mm3: float = MIN_VOLUME_MM3, progress: Callable[[int, int], None] | None = None
            ) -> Iterator[tuple[SeriesJob, str, Any]]:
    """Predict every series under ``source`` into ``out/<series>/``; yields (job, status, report or message)."""
    if not 0 < threshold <= 1:
        raise LungsegError(f"threshold must lie in (0, 1], got {threshold}")
    jobs = find_sources(source)
    model, cfg, ckpt = load(model_path, kind="mask")
    dev = resolve_device(device)
    model.to(dev)
    checkpoints = {"maskrcnn": {"path": str(model_path), "sha256": sha256(model_path), "kind": "mask",
                                "arch": f"maskrcnn-{cfg.backbone}-fpn", "step": ckpt.get("step")}}
    settings = {"threshold": threshold, "min_volume_mm3": min_volume_mm3, "device": str(dev),
                "pipeline": "paper B: Mask R-CNN per axial slice, merged in 3D"}
    yield from report_each(jobs, out, lambda volume: predict_volume(
        volume, model, device=dev, threshold=threshold, min_volume_mm3=min_volume_mm3, progress=progress),
        checkpoints=checkpoints, settings=settings, read=_read)
