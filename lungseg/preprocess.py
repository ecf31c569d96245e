"""Preprocessing of paper A: lung mask, resampling, windowing, sub-cases and ROIs.

Paper A ("Preprocessing", "Experiment settings"): the lung parenchyma is
segmented with thresholds and morphology; every scan is resampled to
3 x 1.5 x 1.5 mm (z, y, x), shown through the lung window -1000..400 HU scaled
to 0..1, cut into sub-cases of 48 x 192 x 192 voxels for the segmentation
network and ROIs of 16 x 48 x 48 voxels around each nodule for the classifier.

:func:`preprocess_scan` does one scan (read DICOM, find the LIDC nodules, build
arrays); :func:`preprocess_dataset` runs it over many scans (optionally in
worker processes) and writes each result to the HDF5 cache (:mod:`lungseg.cache`).
:func:`preprocess_composite` and :func:`preprocess_composites` do the same for
composites of ``lungseg composite`` (:mod:`lungseg.composite`); both paths
measure nodules with :func:`measure_nodule` and build the cache entry with
:func:`scan_record`, so LIDC scans and composites land in the cache alike.
Here too live the one ROI centring rule (:func:`roi_centre`, :func:`roi_start`)
and the lung mask.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from scipy import ndimage

from . import lidc
from .cache import FEATURES, CacheWriter, ScanRecordData, equivalent_diameter_mm, nodule_features, size_category
from .configs import MODEL_INPUT_FIELDS, PreprocessConfig, input_mismatch  # noqa: F401  (re-exported)
from .dicomio import CTVolume, check_chest_ct, read_series
from .errors import LungsegError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# Image operations
# --------------------------------------------------------------------------

def resampled_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """Voxels of the new grid that fit inside the old one (voxel 0 shared)."""
    return tuple(int(math.floor((n - 1) * s / t)) + 1 for n, s, t in zip(shape, spacing, new_spacing))


def resample(array: np.ndarray, spacing: Sequence[float], new_spacing: Sequence[float], *,
             order: int = 1, shape: Sequence[int] | None = None) -> np.ndarray:
    """Resample a (z, y, x) array to ``new_spacing``.

    Voxel 0 keeps its world position, so new voxel ``c`` sits at old index
    ``c * new_spacing / spacing``: resampled index <-> world stays a scaling
    of the original affine. ``order`` 1 is trilinear (float32), 0 nearest (the
    array's dtype; for masks and labels); beyond the last voxel the edge value
    holds. Done one axis at a time, the most shrinking first: trilinear and
    nearest interpolation are separable, so this equals
    ``scipy.ndimage.affine_transform`` (nearest exactly, trilinear to float32
    rounding) at a fraction of its time.
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (trilinear), got {order}")
    ratio = np.asarray(new_spacing, float) / np.asarray(spacing, float)
    shape = tuple(shape) if shape is not None else resampled_shape(array.shape, spacing, new_spacing)
    out = np.asarray(array)         # cast to float32 after the first, most shrinking, axis: less to cast
    for axis in np.argsort(-ratio, kind="stable"):
        n = out.shape[axis]
        coords = np.arange(shape[axis]) * ratio[axis]
        if order == 0:
            out = np.take(out, np.clip(np.floor(coords + 0.5).astype(np.intp), 0, n - 1), axis=axis)
            continue
        lo = np.clip(np.floor(coords).astype(np.intp), 0, n - 1)
        weight = np.clip(coords - lo, 0.0, 1.0).astype(np.float32).reshape([-1 if a == axis else 1
                                                                             for a in range(out.ndim)])
        a = np.take(out, lo, axis=axis).astype(np.float32, copy=False)
        b = np.take(out, np.minimum(lo + 1, n - 1), axis=axis).astype(np.float32, copy=False)
        b -= a
        b *= weight
        a += b
        out = a
    return out


def window(hu: np.ndarray, low: float = -1000.0, high: float = 400.0) -> np.ndarray:
    """Lung window: HU ``low..high`` linearly to 0..1, clipped (float32)."""
    out = (hu.astype(np.float32) - low) / (high - low)
    return np.clip(out, 0.0, 1.0, out=out)


def _near_zero(array: np.ndarray, radius_mm: float, spacing: Sequence[float], slices: int = 8) -> np.ndarray:
    """``scipy.ndimage.distance_transform_edt(array, sampling=spacing) <= radius_mm`` of a (z, y, x) array
    with a zero somewhere: the same bits, in 60 % of the time.

    The nearest zero within a slice comes from scipy's 2D transform of each
    slice; a voxel's nearest zero in 3D is the nearest over the slices within
    the radius of it, its squared distance summed in scipy's order (z, y, x)
    and its root compared as scipy's. A test compares the two on random masks,
    spacings and radii.
    """
    nz, ny, nx = array.shape
    sz, sy, sx = (float(s) for s in spacing)
    rows = np.arange(ny, dtype=np.int32)[:, None]
    cols = np.arange(nx, dtype=np.int32)[None, :]
    dy2, dx2 = np.full(array.shape, np.inf), np.zeros(array.shape)     # squared in-plane offsets (mm^2)
    for k in range(nz):
        if array[k].all():                       # no zero in this slice
            continue
        ft = ndimage.distance_transform_edt(array[k], sampling=(sy, sx), return_distances=False, return_indices=True)
        for axis, grid, step, out in ((0, rows, sy, dy2), (1, cols, sx, dx2)):
            d = (ft[axis] - grid).astype(np.float64)
            d *= step
            np.multiply(d, d, out=out[k])
    reach = int(radius_mm // sz) + 1
    near = np.empty(array.shape, bool)
    for z0 in range(0, nz, slices):
        z1 = min(z0 + slices, nz)
        best = np.full((z1 - z0, ny, nx), np.inf)
        for k in range(-reach, reach + 1):
            a, b = max(z0 + k, 0), min(z1 + k, nz)
            if a < b:
                dz = float(k) * sz
                dist2 = dz * dz + dy2[a:b]
                dist2 += dx2[a:b]
                np.minimum(best[a - k - z0:b - k - z0], dist2, out=best[a - k - z0:b - k - z0])
        near[z0:z1] = np.sqrt(best) <= radius_mm
    return near


def _closing_mm(mask: np.ndarray, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Binary closing with a ball of ``radius_mm``, via distance transforms (fast for big radii)."""
    pad = [int(math.ceil(radius_mm / s)) + 1 for s in spacing]
    padded = np.pad(mask, [(p, p) for p in pad])
    dilated = _near_zero(~padded, radius_mm, spacing)
    closed = ~_near_zero(dilated, radius_mm, spacing)
    return closed[tuple(slice(p, -p) for p in pad)]


def _fill_small_holes(mask: np.ndarray, max_area_px: float) -> np.ndarray:
    """Fill, slice by slice, the holes of at most ``max_area_px`` pixels."""
    out = mask.copy()
    for k in range(mask.shape[0]):
        holes = ndimage.binary_fill_holes(mask[k]) & ~mask[k]
        if not holes.any():
            continue
        labels, n = ndimage.label(holes)
        areas = np.bincount(labels.ravel())
        small = np.flatnonzero(areas <= max_area_px)
        out[k] |= np.isin(labels, small[small > 0])
    return out


def lung_mask(hu: np.ndarray, spacing: Sequence[float], *, threshold: float = -320.0,
              closing_mm: float = 10.0, max_hole_mm2: float = 2500.0,
              include: np.ndarray | None = None) -> np.ndarray:
    """Lung parenchyma mask of a (z, y, x) HU volume, bool.

    Paper A, Fig. 2: binarise (air-like voxels below ``threshold``), delete the
    air outside the body and under the table (components touching the in-plane
    border), keep the lungs (the largest remaining components), fill the holes
    that vessels and nodules leave (per slice, up to ``max_hole_mm2``, so that
    the dome of the liver or the heart, ringed by lung on a slice, stays out),
    and repair the border with a closing of radius ``closing_mm`` so that
    juxta-pleural nodules stay inside. ``include`` (e.g. known nodule masks) is
    added before the repair.
    """
    low = hu < threshold
    labels, n = ndimage.label(low)
    if n == 0:
        return np.zeros(hu.shape, bool)
    border = np.unique(np.concatenate([
        labels[:, 0, :].ravel(), labels[:, -1, :].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()
    ]))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    sizes_ml = np.bincount(labels.ravel()) * voxel_ml
    sizes_ml[0] = 0.0
    sizes_ml[border] = 0.0
    # The lungs: the largest one or two components (two when they are separate), each > 50 mL.
    largest = np.argsort(sizes_ml)[::-1][:2]
    keep = [i for i in largest if sizes_ml[i] > 50 and sizes_ml[i] >= 0.1 * sizes_ml[largest[0]]]
    mask = np.isin(labels, keep)
    if include is not None:
        mask |= include.astype(bool)
    if not mask.any():
        return mask
    zs, ys, xs = ndimage.find_objects(mask.astype(np.uint8))[0]
    box = (zs, slice(max(ys.start - 1, 0), ys.stop + 1), slice(max(xs.start - 1, 0), xs.stop + 1))
    max_hole_px = max_hole_mm2 / (spacing[1] * spacing[2])
    sub = _fill_small_holes(mask[box], max_hole_px)
    if closing_mm > 0:
        sub = _fill_small_holes(_closing_mm(sub, closing_mm, spacing), max_hole_px)
    out = np.zeros_like(mask)
    out[box] = sub
    return out


def scan_lungs(hu: np.ndarray, cfg: PreprocessConfig, include: np.ndarray | None = None) -> np.ndarray:
    """The lung mask of a resampled HU volume with ``cfg``'s settings (:func:`lung_mask`).

    Without ``include`` this is the mask ``predict`` sees, and the one the
    detector's candidates come from everywhere; the cache's ``lung`` arrays
    also include the known nodules' masks.
    """
    return lung_mask(hu, cfg.spacing, threshold=cfg.lung_threshold_hu, closing_mm=cfg.lung_closing_mm,
                     include=include)


def roi_centre(shape: Sequence[int]) -> np.ndarray:
    """The voxel an ROI is centred on: ``shape // 2`` per axis (voxel 8, 24, 24 of 16 x 48 x 48).

    The one centring rule of lungseg: scan ROIs (preprocess, predict) and crop
    ROIs (import-crops) put the nodule's centre on this voxel, and slice
    ``D // 2`` is the central slice the 2D baseline reads.
    """
    return np.asarray(shape, int) // 2


def roi_start(centre: Sequence[float], shape: Sequence[int]) -> tuple[int, int, int]:
    """First voxel of the ROI of ``shape`` whose :func:`roi_centre` lies nearest ``centre`` (same grid)."""
    return tuple(int(v) for v in np.round(np.asarray(centre, float) - roi_centre(shape)))


def crop(array: np.ndarray, start: Sequence[int], shape: Sequence[int], fill=0) -> np.ndarray:
    """``array[start : start + shape]``, padded with ``fill`` where it leaves the array."""
    out = np.full(tuple(shape), fill, dtype=array.dtype)
    src, dst = [], []
    for s, n, size in zip(start, shape, array.shape):
        lo, hi = max(s, 0), min(s + n, size)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


class Crops:
    """The ROIs of ``shape`` at ``starts`` (K, 3) of ``array`` (:func:`crop`), cut when indexed.

    ``crops[i]`` is one ROI; ``crops[i:j]`` and ``crops[index_array]`` a
    stack. A network reads them batch by batch, so a thousand candidates'
    ROIs are never all in memory at once. ``array`` may be an HDF5 dataset.
    """

    def __init__(self, array, starts, shape: Sequence[int], fill=0):
        self.array, self.starts, self.roi_shape, self.fill = array, np.asarray(starts, int).reshape(-1, 3), \
            tuple(shape), fill

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.roi_shape)

    def __getitem__(self, which) -> np.ndarray:
        if isinstance(which, (int, np.integer)):
            return crop(self.array, self.starts[which], self.roi_shape, self.fill)
        starts = self.starts[which]
        out = np.empty((len(starts), *self.roi_shape), self.array.dtype)
        for k, start in enumerate(starts):
            out[k] = crop(self.array, start, self.roi_shape, self.fill)
        return out


def subcase_starts(lung: np.ndarray, shape: Sequence[int]) -> list[tuple[int, int, int]]:
    """Starts of the sub-cases that tile the lungs along z (paper A: two per scan).

    In-plane the window is centred on the lungs' bounding box; along z as few
    windows as cover the lungs, spread evenly from top to bottom (overlapping
    when the lungs are not a multiple of the depth).
    """
    if not lung.any():
        box = tuple(slice(0, n) for n in lung.shape)
    else:
        box = ndimage.find_objects(lung.astype(np.uint8))[0]
    d = shape[0]
    z0, z1 = box[0].start, box[0].stop
    n = max(1, math.ceil((z1 - z0) / d))
    if n == 1:
        zstarts = [int(round((z0 + z1 - d) / 2))]
    else:
        zstarts = [int(round(z0 + i * (z1 - z0 - d) / (n - 1))) for i in range(n)]
    y = int(round((box[1].start + box[1].stop - shape[1]) / 2))
    x = int(round((box[2].start + box[2].stop - shape[2]) / 2))
    return [(z, y, x) for z in zstarts]


# --------------------------------------------------------------------------
# One scan
# --------------------------------------------------------------------------

def measure_nodule(mask: np.ndarray, box: tuple[slice, ...], volume: CTVolume) -> dict:
    """Centroid (voxel, world), volume, equivalent diameter, mean HU and size category of a mask on ``box``."""
    count = int(mask.sum())
    idx = np.argwhere(mask) + [b.start for b in box] if count else \
        np.array([[(b.start + b.stop - 1) / 2 for b in box]])       # empty: the box's centre
    centroid = idx.mean(axis=0)
    volume_mm3 = count * float(np.prod(volume.spacing))
    diameter = equivalent_diameter_mm(volume_mm3)
    return {"centroid_voxel": centroid, "centroid_world": volume.voxel_to_world(centroid),
            "volume_mm3": volume_mm3, "diameter_mm": diameter, "size_category": size_category(diameter),
            "mean_hu": float(volume.hu[box][mask].mean()) if count else float("nan")}


def _nodule_rows(nodules, masks, volume: CTVolume, record: lidc.ScanRecord, cfg: PreprocessConfig):
    """Measurements of each LIDC nodule on the original grid."""
    rows = []
    for nod, (mask, box) in zip(nodules, masks):
        if not mask.any():
            # Fewer than mask_readers readers overlap anywhere: fall back to the box's centre.
            log.warning("%s nodule %d: empty consensus mask at %d readers",
                        record.patient_id, nod.index, cfg.mask_readers)
        diameters = [lidc.annotation_diameter(a, record.pixel_spacing) for a in nod.annotations]
        k = min(nod.n_readers, 4)   # a rare pylidc group holds more than 4 annotations
        ratings = np.full((4, len(lidc.CHARACTERISTICS)), -1, np.int8)
        ratings[:k] = nod.ratings[:k]
        ann_ids = np.full(4, -1, np.int32)
        ann_ids[:k] = [a.id for a in nod.annotations][:k]
        rows.append({
            "index": nod.index,
            "n_readers": nod.n_readers,
            "ratings": ratings,
            "annotation_ids": ann_ids,
            "malignancy_median": nod.malignancy_median,
            "label": nod.label(),
            "long_axis_mm": float(np.mean(diameters)),
            **measure_nodule(mask, box, volume),
        })
    return rows


def preprocess_scan(folder: str | os.PathLike, record: lidc.ScanRecord,
                    annotations: Sequence[lidc.Annotation],
                    cfg: PreprocessConfig = PreprocessConfig()) -> ScanRecordData:
    """Read one LIDC scan and build everything the cache stores for it.

    Nodules marked by fewer than ``cfg.min_readers`` readers are stored apart
    (``irrelevant/``): detection scoring neither counts nor penalises findings on them.
    """
    volume = read_series(folder, series_uid=record.series_uid)
    k_to_slice = lidc.slice_index_map(record, volume.slice_z_world(), where=str(folder))
    nodules, irrelevant = [], []
    for nodule in lidc.find_nodules(record, annotations, min_readers=1):
        (nodules if nodule.n_readers >= cfg.min_readers else irrelevant).append(nodule)
    masks = [lidc.consensus_mask(n, record.slice_zvals, volume.shape, mask_readers=cfg.mask_readers,
                                 k_to_slice=k_to_slice) for n in nodules]
    rows = _nodule_rows(nodules, masks, volume, record, cfg)
    others = [measure_nodule(*lidc.consensus_mask(n, record.slice_zvals, volume.shape, mask_readers=1,
                                                  k_to_slice=k_to_slice), volume) for n in irrelevant]
    attrs = {"patient_id": record.patient_id, "study_uid": record.study_uid, "series_uid": record.series_uid,
             "source": str(folder)}
    return scan_record(volume, masks, rows, cfg, attrs, irrelevant=others)


def preprocess_composite(folder: str | os.PathLike, cfg: PreprocessConfig = PreprocessConfig(), *,
                         report: dict | None = None) -> ScanRecordData:
    """One composite of ``lungseg composite`` (:mod:`lungseg.composite`) as a cache entry, like an LIDC scan.

    Nodules come from ``nodules.nii.gz`` (value = nodule id) and ``nodules.json``
    (readers, label, ratings: each reader's for the background's own LIDC
    nodules, the majority vote in ``nodules/ratings_majority`` for pasted ones).
    """
    from .composite import read_composite
    from .dicomio import read_nifti_mask

    folder = Path(folder)
    report = report if report is not None else read_composite(folder)     # nodules.json, read once
    volume = read_series(folder / "dicom")
    labels, _ = read_nifti_mask(folder / "nodules.nii.gz")
    if labels.shape != volume.shape:
        raise LungsegError(f"{folder / 'nodules.nii.gz'}: shape {labels.shape} differs from the series' {volume.shape}")
    boxes = ndimage.find_objects(labels.astype(np.int64))
    masks, rows, n_char = [], [], len(lidc.CHARACTERISTICS)
    for n in report["nodules"]:
        nid = int(n["id"])
        box = boxes[nid - 1] if nid <= len(boxes) and boxes[nid - 1] is not None else None
        if box is None:
            raise LungsegError(f"{folder / 'nodules.nii.gz'}: nodule {nid} of nodules.json has no voxels")
        mask = labels[box] == nid
        masks.append((mask, box))
        ratings = np.full((4, n_char), -1, np.int8)
        if n.get("ratings"):
            ratings[:] = np.asarray(n["ratings"], np.int8)[:4]
        majority = np.asarray(n.get("ratings_majority") or [-1] * n_char, np.int8)
        rows.append({"index": nid, "n_readers": int(n["n_readers"]), "ratings": ratings,
                     "ratings_majority": majority, "annotation_ids": np.full(4, -1, np.int32),
                     "malignancy_median": float(np.median([r for r in ratings[:, -1] if r > 0]))
                     if (ratings[:, -1] > 0).any() else float(majority[-1]),
                     "label": int(n["label"]), "long_axis_mm": float("nan"),
                     **measure_nodule(mask, box, volume)})
    others = [{"centroid_voxel": np.asarray(o["centre_voxel"], float), "diameter_mm": float(o["diameter_mm"])}
              for o in report.get("irrelevant", [])]
    attrs = {"patient_id": str(report["patient_id"]), "study_uid": volume.study_uid,
             "series_uid": volume.series_uid, "source": str(folder), "kind": "composite",
             "background": str(report["background"]["name"])}
    return scan_record(volume, masks, rows, cfg, attrs, irrelevant=others)


def mask_to_grid(mask: np.ndarray, box: tuple[slice, ...], ratio, shape) -> np.ndarray:
    """A mask on ``box`` of the original grid, resampled onto the model grid of ``shape`` (bool, full size).

    ``ratio`` = original spacing / model spacing. Only the mask's
    neighbourhood is resampled (linear, then >= 0.5).
    """
    ratio = np.asarray(ratio, float)
    full = np.zeros(tuple(shape), bool)
    lo = np.floor(np.array([b.start for b in box]) * ratio).astype(int) - 1
    hi = np.ceil(np.array([b.stop for b in box]) * ratio).astype(int) + 1
    lo, hi = np.maximum(lo, 0), np.minimum(hi, shape)
    coords = np.meshgrid(*[np.arange(a, b) / r - b0.start for a, b, r, b0 in zip(lo, hi, ratio, box)],
                         indexing="ij")
    part = ndimage.map_coordinates(mask.astype(np.float32), coords, order=1, mode="constant", cval=0.0)
    full[tuple(slice(a, b) for a, b in zip(lo, hi))] = part >= 0.5
    return full


def scan_record(volume: CTVolume, masks: Sequence[tuple[np.ndarray, tuple[slice, ...]]], rows: Sequence[dict],
                cfg: PreprocessConfig, attrs: dict, *, irrelevant: Sequence[dict] = ()) -> ScanRecordData:
    """The cache entry of a volume and its nodules (masks on boxes of the original grid, measured rows).

    Resamples to the model grid, masks the lungs, windows, cuts sub-cases and
    one ROI per nodule (centred by :func:`roi_start`). The one builder behind
    LIDC scans and composites, so both land in the cache alike. Refuses what is
    not a supported chest CT (:func:`lungseg.dicomio.check_chest_ct`).
    """
    check_chest_ct(volume, min_extent_mm=cfg.roi_shape[0] * cfg.spacing[0])
    new_shape = resampled_shape(volume.shape, volume.spacing, cfg.spacing)
    hu = resample(volume.hu, volume.spacing, cfg.spacing, shape=new_shape)
    ratio = np.asarray(volume.spacing) / np.asarray(cfg.spacing)
    nodule_masks = [mask_to_grid(mask, box, ratio, new_shape) for mask, box in masks]
    union = np.any(nodule_masks, axis=0) if nodule_masks else np.zeros(new_shape, bool)
    centres = [np.asarray(row["centroid_voxel"]) * ratio for row in rows]      # on the model grid
    with ThreadPoolExecutor(1) as pool:
        # The detector's candidates are found beside the rest (distance transforms and filters let go of the GIL),
        # in the lungs found without the nodules' masks: where predict looks.
        found = pool.submit(_blind_candidates, hu, cfg) if cfg.candidates else None
        lungs = scan_lungs(hu, cfg, include=union) if union.any() or found is None else found.result()[0]
        image = window(hu, *cfg.window)
        arrays = _nodule_arrays(volume, masks, nodule_masks, rows, centres, irrelevant, image, union, lungs, ratio,
                                cfg)
        if found is not None:
            arrays.update(_candidate_arrays(found.result()[1], union, image, centres, rows, arrays, cfg))
    voxel_ml = float(np.prod(cfg.spacing)) / 1000.0
    attrs = {
        **attrs,
        "original_shape": np.asarray(volume.shape, np.int32),
        "original_spacing": np.asarray(volume.spacing, np.float64),
        "origin": np.asarray(volume.origin, np.float64),
        "direction": np.asarray(volume.direction, np.float64),
        "spacing": np.asarray(cfg.spacing, np.float64),
        "shape": np.asarray(new_shape, np.int32),
        "lung_volume_ml": float(lungs.sum()) * voxel_ml,
        "n_nodules": len(rows),
    }
    return ScanRecordData(series_uid=str(attrs["series_uid"]), attrs=attrs, arrays=arrays)


def _nodule_arrays(volume: CTVolume, masks, nodule_masks, rows, centres, irrelevant, image, union, lungs, ratio,
                   cfg: PreprocessConfig) -> dict:
    """A scan's sub-cases, one ROI per nodule, its nodule table and its irrelevant nodules, as cache arrays."""
    starts = subcase_starts(lungs, cfg.subcase_shape)
    sub = {
        "subcases/image": np.stack([crop(image, s, cfg.subcase_shape) for s in starts]).astype(np.float16),
        "subcases/mask": np.stack([crop(union.astype(np.uint8), s, cfg.subcase_shape) for s in starts]),
        "subcases/lung": np.stack([crop(lungs.astype(np.uint8), s, cfg.subcase_shape) for s in starts]),
        "subcases/start": np.asarray(starts, np.int32),
    }
    roi_starts, roi_images, roi_masks = [roi_start(c, cfg.roi_shape) for c in centres], [], []
    for start, m in zip(roi_starts, nodule_masks):
        roi_images.append(crop(image, start, cfg.roi_shape))
        roi_masks.append(crop(m.astype(np.uint8), start, cfg.roi_shape))
    n = len(rows)
    arrays = dict(sub)
    arrays["rois/image"] = (np.stack(roi_images) if n else np.zeros((0, *cfg.roi_shape))).astype(np.float16)
    arrays["rois/mask"] = (np.stack(roi_masks) if n else np.zeros((0, *cfg.roi_shape))).astype(np.uint8)
    arrays["rois/start"] = np.asarray(roi_starts, np.int32).reshape(n, 3)
    float_cols = ("malignancy_median", "diameter_mm", "long_axis_mm", "volume_mm3", "mean_hu")
    dtypes = {"index": np.int16, "n_readers": np.int8, "ratings": np.int8, "annotation_ids": np.int32,
              "label": np.int8, "size_category": np.int8, "centroid_voxel": np.float32,
              "centroid_world": np.float32, **{k: np.float32 for k in float_cols}}
    if rows and "ratings_majority" in rows[0]:
        dtypes["ratings_majority"] = np.int8
    for key, dtype in dtypes.items():
        values = [r[key] for r in rows]
        shape = (0, 4, len(lidc.CHARACTERISTICS)) if key == "ratings" else (0, 4) if key == "annotation_ids" \
            else (0, 3) if key.startswith("centroid") else (0,)
        arrays[f"nodules/{key}"] = np.asarray(values, dtype) if n else np.zeros(shape, dtype)
    arrays["nodules/centroid_resampled"] = np.asarray(centres, np.float32).reshape(n, 3)
    # Measured on the original grid: what the malignancy hybrid reads beside the network.
    arrays["nodules/features"] = np.asarray([nodule_features(volume.hu[box], m, volume.spacing) for m, box in masks],
                                            np.float32).reshape(n, len(FEATURES))
    arrays["irrelevant/centroid_resampled"] = np.asarray(
        [np.asarray(o["centroid_voxel"]) * ratio for o in irrelevant], np.float32).reshape(len(irrelevant), 3)
    arrays["irrelevant/diameter_mm"] = np.asarray([o["diameter_mm"] for o in irrelevant], np.float32)
    return arrays


def _blind_candidates(hu: np.ndarray, cfg: PreprocessConfig):
    """The lung mask predict sees (:func:`scan_lungs` without nodules) and the detector's candidates in it."""
    from .detect import candidates

    lungs = scan_lungs(hu, cfg)
    return lungs, candidates(hu, lungs, cfg.spacing)


def _candidate_arrays(cands, union, image, centres, rows, arrays, cfg: PreprocessConfig) -> dict:
    """The detector's candidates of a scan (:mod:`lungseg.detect`) labelled against its nodules, with the volume
    their ROIs are cut from."""
    from .detect import label_candidates

    label, which = label_candidates(
        cands, cfg.spacing, [(c, r["diameter_mm"]) for c, r in zip(centres, rows)],
        list(zip(arrays["irrelevant/centroid_resampled"], arrays["irrelevant/diameter_mm"])))
    starts = [roi_start(c, cfg.roi_shape) for c in cands.centres]
    k = len(cands)
    return {
        "candidates/centre": cands.centres.reshape(k, 3),
        "candidates/radius_mm": cands.radius_mm,
        "candidates/response": cands.response,
        "candidates/label": label,
        "candidates/nodule": which,
        "candidates/start": np.asarray(starts, np.int32).reshape(k, 3),
        # The ROIs are cut from these when read (Cache.candidate_rois): they overlap, and stored cut took 6x the bytes.
        "volume/image": image.astype(np.float16),
        "volume/mask": union.astype(np.uint8),
    }


# --------------------------------------------------------------------------
# Many scans
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class ScanJob:
    record: lidc.ScanRecord
    folder: Path


@dataclass(frozen=True)
class ScanResult:
    """What happened to one scan: ``status`` is 'done', 'skipped' (already cached) or 'failed'.

    ``record`` is the LIDC scan (None for a composite); ``name`` its patient id or composite case.
    """

    record: lidc.ScanRecord | None
    status: str
    message: str = ""
    n_nodules: int = 0
    name: str = ""

    def __post_init__(self):
        if not self.name and self.record is not None:
            object.__setattr__(self, "name", self.record.patient_id)


def select_scans(lidc_root: str | os.PathLike, db: lidc.LidcDatabase,
                 wanted: Sequence[str] = ()) -> list[ScanJob]:
    """The scans to preprocess: ``wanted`` patient ids or series UIDs, else every
    scan of the database whose patient folder exists under ``lidc_root``."""
    root = Path(lidc_root)
    if not root.is_dir():
        raise LungsegError(f"{root}: LIDC root folder does not exist")
    if wanted:
        chosen = [s for w in wanted for s in db.find(w)]
    else:
        present = {p.name for p in root.iterdir() if p.is_dir()}
        chosen = [s for s in db.scans() if s.patient_id in present]
        if not chosen:
            raise LungsegError(f"{root}: no LIDC-IDRI-XXXX patient folders of the LIDC database found")
    jobs = []
    for s in chosen:
        try:
            jobs.append(ScanJob(s, lidc.find_scan_folder(root, s)))
        except LungsegError as exc:
            if wanted:
                raise
            log.info("skipping %s: %s", s.series_uid, exc)
    return jobs


_worker_db: lidc.LidcDatabase | None = None


def _run_job(job: ScanJob, db_path: str, cfg: PreprocessConfig) -> ScanRecordData | str:
    global _worker_db
    if _worker_db is None or str(_worker_db.path) != db_path:
        _worker_db = lidc.LidcDatabase(db_path)
    try:
        return preprocess_scan(job.folder, job.record, _worker_db.annotations(job.record.id), cfg)
    except LungsegError as exc:
        return str(exc)


def preprocess_dataset(jobs: Sequence[ScanJob], out: str | os.PathLike, db: lidc.LidcDatabase,
                       cfg: PreprocessConfig = PreprocessConfig(), *, workers: int = 1) -> Iterator[ScanResult]:
    """Preprocess ``jobs`` into the cache ``out``, yielding one result per scan.

    Resumable: scans already in the cache are skipped. Each scan is written
    atomically, so interrupting the loop loses at most the scan in flight.
    """
    writer = CacheWriter(out, cfg.to_dict())
    done = writer.done()
    todo = []
    for job in jobs:
        if job.record.series_uid in done:
            yield ScanResult(job.record, "skipped", "already in the cache")
        else:
            todo.append(job)

    def handle(job: ScanJob, result) -> ScanResult:
        if isinstance(result, str):
            return ScanResult(job.record, "failed", result)
        writer.add(result)
        return ScanResult(job.record, "done", n_nodules=int(result.attrs["n_nodules"]))

    db_path = str(db.path)
    if workers <= 1:
        for job in todo:
            yield handle(job, _run_job(job, db_path, cfg))
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_run_job, job, db_path, cfg) for job in todo]
        try:
            for job, fut in zip(todo, futures):
                yield handle(job, fut.result())
        finally:
            for fut in futures:
                fut.cancel()



def preprocess_composites(root: str | os.PathLike, out: str | os.PathLike,
                          cfg: PreprocessConfig = PreprocessConfig()) -> Iterator[ScanResult]:
    """Preprocess every composite under ``root`` (:func:`lungseg.composite.find_composites`) into cache ``out``.

    Resumable like :func:`preprocess_dataset`; a composite is keyed by its series UID.
    """
    from .composite import find_composites, read_composite

    writer = CacheWriter(out, cfg.to_dict())
    done = writer.done()
    for folder in find_composites(root):
        try:
            report = read_composite(folder)
            if report["series_uid"] in done:
                yield ScanResult(None, "skipped", "already in the cache", name=report["case"])
                continue
            record = preprocess_composite(folder, cfg, report=report)
        except LungsegError as exc:
            yield ScanResult(None, "failed", str(exc), name=folder.name)
            continue
        writer.add(record)
        yield ScanResult(None, "done", n_nodules=int(record.attrs["n_nodules"]), name=report["case"])


__all__ = [
    "PreprocessConfig", "preprocess_scan", "preprocess_composite", "scan_record", "measure_nodule",
    "preprocess_dataset", "preprocess_composites", "select_scans", "lung_mask", "scan_lungs",
    "resample", "resampled_shape", "window", "crop", "roi_centre", "roi_start", "subcase_starts",
    "MODEL_INPUT_FIELDS", "input_mismatch",
]
