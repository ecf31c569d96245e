"""Import a folder of nodule crops into the cache, for the real-nodule benchmark.

A crop folder holds tight HU boxes around single nodules, as
``../shared/data/nodules`` does::

    image/<patient_id>_R_<nodule_id>.nii.gz   int16 HU crop
    mask/<same name>                          binary consensus mask, same grid
    nodules.csv                               one row per nodule: patient_id,
                                              nodule_id, Malignancy_value (1-5),
                                              the other ``*_value`` ratings,
                                              len_mal_details (readers), ...

Each crop becomes one entry of the usual cache (schema of :mod:`lungseg.cache`,
entry key = the crop's file name without suffix), so ``train-seg``,
``train-cls`` and ``evaluate`` read it unchanged:

- The ROI (default 16 x 48 x 48 voxels at 3 x 1.5 x 1.5 mm, the classifier's
  input) is sampled trilinearly from the crop, with the mask's centroid on
  ROI voxel (8, 24, 24).
- A crop voxel covers half a voxel either side of its centre; ROI samples in
  that margin take the edge value. Where the ROI reaches further than the
  crop (always: a median crop is about 31 x 31 x 10 mm, the ROI
  72 x 72 x 48 mm) it is filled with air, ``pad_hu`` = -1000 HU, i.e. 0 after
  the lung window. The share of the ROI that is real image is stored per
  crop (``crop_fraction``).
- The mask is sampled the same way (linear, then >= 0.5). A nodule thinner
  than one 3 mm slice can vanish at that step; it then keeps the ROI voxels
  where the resampled mask is largest, and ``mask_rescued`` says so.
- The segmentation patch (``subcases``) is the ROI itself; the lung mask of a
  crop is unknown and stored as all ones.
- Labels from the majority malignancy rating: 1-2 benign, 4-5 malignant, 3
  excluded (or benign / malignant with ``indeterminate``). Per-reader ratings
  are not in the source: ``nodules/ratings`` is -1 and the majority votes are
  in ``nodules/ratings_majority``.
- Size category from the equivalent-sphere diameter of the mask on the crop's
  own grid, as for whole scans.

Missing files, rows without files, unreadable or mismatched crops are
reported and skipped; they never stop the import.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from scipy import ndimage

from . import lidc
from .cache import CacheWriter, ScanRecordData, equivalent_diameter_mm, nodule_features, size_category
from .dicomio import CTVolume, nifti_affine, read_nifti_mask, read_nifti_volume
from .errors import LungsegError
from .preprocess import PreprocessConfig, roi_centre, window

log = logging.getLogger(__name__)

#: CSV column of each of :data:`lungseg.lidc.CHARACTERISTICS`.
RATING_COLUMNS = {
    "subtlety": "Subtlety_value",
    "internal_structure": "InternalStructure_value",
    "calcification": "Calcification_value",
    "sphericity": "Sphericity_value",
    "margin": "Margin_value",
    "lobulation": "Lobulation_value",
    "spiculation": "Spiculation_value",
    "texture": "Texture_value",
    "malignancy": "Malignancy_value",
}
REQUIRED_COLUMNS = ("patient_id", "nodule_id", "Malignancy_value")
INDETERMINATE = {"excluded": lidc.EXCLUDED, "benign": lidc.BENIGN, "malignant": lidc.MALIGNANT}


@dataclass(frozen=True)
class CropConfig:
    """Settings of ``lungseg import-crops``; spacing, window and ROI are paper A's."""

    spacing: tuple[float, float, float] = PreprocessConfig.spacing
    window: tuple[float, float] = PreprocessConfig.window
    roi_shape: tuple[int, int, int] = PreprocessConfig.roi_shape
    pad_hu: float = -1000.0
    indeterminate: str = "excluded"          # what a majority malignancy of 3 becomes
    context: tuple[str, ...] = ()            # background series: place each crop in real lung instead of air

    def __post_init__(self):
        PreprocessConfig(spacing=self.spacing, window=self.window, roi_shape=self.roi_shape)  # validates
        if self.indeterminate not in INDETERMINATE:
            raise ValueError(f"indeterminate must be one of {sorted(INDETERMINATE)}, got {self.indeterminate!r}")
        object.__setattr__(self, "context", tuple(str(c) for c in self.context))

    def cache_config(self) -> dict:
        """The cache's settings: a :class:`PreprocessConfig` whose sub-case is the ROI, plus the crop fields.

        Checkpoints copy these, and ``predict`` rebuilds the preprocessing from
        the :class:`PreprocessConfig` fields, so a model trained on crops still
        resamples whole scans to the same spacing and window.
        """
        base = PreprocessConfig(spacing=self.spacing, window=self.window, subcase_shape=self.roi_shape,
                                roi_shape=self.roi_shape).to_dict()
        return {**base, "source": "crops", "pad_hu": self.pad_hu, "indeterminate": self.indeterminate,
                **({"context": [Path(c).name for c in self.context]} if self.context else {})}


@dataclass(frozen=True)
class CropRow:
    """One row of ``nodules.csv``."""

    patient_id: str
    nodule_id: str
    line: int
    ratings: tuple[int, ...]        # majority votes in CHARACTERISTICS order, -1 where missing
    n_readers: int
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        return f"{self.patient_id}_R_{self.nodule_id}"

    def rating(self, name: str) -> int:
        """The majority vote on one of :data:`lungseg.lidc.CHARACTERISTICS` (-1 where missing)."""
        return self.ratings[lidc.CHARACTERISTICS.index(name)]

    @property
    def malignancy(self) -> int:
        return self.rating("malignancy")


@dataclass(frozen=True)
class CropResult:
    """What happened to one crop: ``status`` is 'done', 'skipped' (already cached) or 'failed'."""

    name: str
    status: str
    message: str = ""


def _int(value: str | None) -> int:
    try:
        return int(round(float(value)))
    except (TypeError, ValueError):
        return -1


def read_table(folder: str | os.PathLike) -> tuple[list[CropRow], list[str]]:
    """Rows of ``folder/nodules.csv`` and the problems found in it (duplicates, unusable rows)."""
    path = Path(folder) / "nodules.csv"
    if not path.is_file():
        raise LungsegError(f"{path}: no such file; a crop folder holds image/, mask/ and nodules.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise LungsegError(f"{path}: missing column(s) {', '.join(missing)}")
        rows, problems, seen = [], [], set()
        for line, r in enumerate(reader, start=2):
            pid, nid = (r.get("patient_id") or "").strip(), (r.get("nodule_id") or "").strip()
            if not pid or not nid:
                problems.append(f"{path}:{line}: no patient_id or nodule_id; row skipped")
                continue
            ratings = tuple(_int(r.get(col)) for col in RATING_COLUMNS.values())
            row = CropRow(pid, nid, line, ratings, _int(r.get("len_mal_details")), extra=r)
            if row.name in seen:
                problems.append(f"{path}:{line}: {row.name} listed twice; later row skipped")
                continue
            seen.add(row.name)
            rows.append(row)
    return rows, problems


#: A crop around a lung nodule holds aerated lung: at least this share of its voxels at or below this HU
#: (every one of the 791 LIDC-IDRI crops of ../shared/data: 5th percentile -712 HU or lower). Stored values
#: read without their rescale, or HU scaled, fail it.
CROP_LUNG_SHARE, CROP_LUNG_HU = 0.05, -600.0


def read_crop(image_path: str | os.PathLike, mask_path: str | os.PathLike) -> tuple[CTVolume, np.ndarray]:
    """A crop's HU volume and its bool mask, checked: readable, HU of a nodule in lung, same grid, mask not empty."""
    image_path, mask_path = Path(image_path), Path(mask_path)
    volume = read_nifti_volume(image_path, min_hu_below=None)     # a DicomError names the file
    share = float((volume.hu <= CROP_LUNG_HU).mean())
    if share < CROP_LUNG_SHARE:
        raise LungsegError(f"{image_path}: values do not look like Hounsfield units of a nodule in lung "
                           f"({share:.1%} of voxels at or below {CROP_LUNG_HU:g} HU, where aerated lung lies; values "
                           f"{int(volume.hu.min())} to {int(volume.hu.max())}): stored values, or scaled HU?")
    try:
        mask, mask_affine = read_nifti_mask(mask_path)
    except (OSError, ValueError) as exc:
        raise LungsegError(f"{mask_path}: cannot read the mask ({str(exc).splitlines()[0]})") from None
    if mask.shape != volume.shape:
        raise LungsegError(f"{mask_path}: mask shape {mask.shape} differs from the image's {volume.shape}")
    if not np.allclose(mask_affine, nifti_affine(volume), atol=1e-3):
        raise LungsegError(f"{mask_path}: mask and image grids differ (NIfTI affines do not match)")
    mask = mask > 0
    if not mask.any():
        raise LungsegError(f"{mask_path}: empty mask")
    return volume, mask


def import_crop(image_path: str | os.PathLike, mask_path: str | os.PathLike, row: CropRow,
                cfg: CropConfig = CropConfig(), scenes: Sequence | None = None) -> ScanRecordData:
    """One crop and its mask as a cache entry (see the module docstring).

    With ``scenes`` (:func:`lungseg.composite.context_scene` of each of
    ``cfg.context``) the ROI is the crop placed in the lung of one of them,
    drawn from the crop's name, instead of the crop padded with air.
    """
    image_path = Path(image_path)
    volume, mask = read_crop(image_path, mask_path)
    hu = volume.hu

    voxel_mm3 = float(np.prod(volume.spacing))
    volume_mm3 = float(mask.sum()) * voxel_mm3
    diameter = equivalent_diameter_mm(volume_mm3)
    centroid = np.argwhere(mask).mean(axis=0)

    # Sample the ROI grid, centred on the centroid, from the crop grid.
    roi, centre = np.asarray(cfg.roi_shape), roi_centre(cfg.roi_shape)
    step = np.asarray(cfg.spacing) / np.asarray(volume.spacing)   # crop voxels per ROI voxel
    # The centroid sits exactly on the ROI's centre voxel (the library's one
    # centring rule), so even a crop thinner than one ROI slice is sampled.
    axes = [centroid[a] + (np.arange(roi[a]) - centre[a]) * step[a] for a in range(3)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    # A crop voxel covers +-0.5 voxel around its centre: samples in that margin
    # take the edge value, samples beyond it are padding.
    inside = np.all([(c >= -0.5) & (c <= n - 0.5) for c, n in zip(coords, hu.shape)], axis=0)
    roi_hu = ndimage.map_coordinates(hu.astype(np.float32), coords, order=1, mode="nearest")
    roi_hu[~inside] = cfg.pad_hu
    roi_mask_f = ndimage.map_coordinates(mask.astype(np.float32), coords, order=1, mode="nearest")
    roi_mask_f[~inside] = 0.0
    roi_mask = roi_mask_f >= 0.5
    rescued = not roi_mask.any()
    if rescued:
        if roi_mask_f.max() <= 0:
            raise LungsegError(f"{mask_path}: the mask does not reach the resampled ROI")
        roi_mask = roi_mask_f >= roi_mask_f.max() * 0.999
        log.info("%s: mask thinner than one resampled slice; kept its %d most covered voxel(s)",
                 row.name, int(roi_mask.sum()))

    background = ""
    if scenes:
        from .composite import _rng, in_context

        rng = _rng(0, row.name, 0)
        background, scene = scenes[int(rng.integers(len(scenes)))]
        try:
            roi_hu, roi_mask = in_context(hu, mask, volume.spacing, scene, cfg.roi_shape, rng)
        except LungsegError as exc:
            raise LungsegError(f"{image_path}: {exc} ({background})") from None
        inside, rescued = np.ones(roi_mask.shape, bool), False
    image = window(roi_hu, *cfg.window).astype(np.float16)[None]
    m = roi_mask.astype(np.uint8)[None]
    start = np.zeros((1, 3), np.int32)
    ratings = np.full((1, 4, len(lidc.CHARACTERISTICS)), -1, np.int8)
    world = volume.voxel_to_world(centroid)
    arrays = {
        "subcases/image": image, "subcases/mask": m, "subcases/lung": np.ones_like(m), "subcases/start": start,
        "rois/image": image, "rois/mask": m, "rois/start": start,
        "nodules/index": np.asarray([_int(row.nodule_id)], np.int16),
        "nodules/n_readers": np.asarray([row.n_readers], np.int8),
        "nodules/ratings": ratings,
        "nodules/ratings_majority": np.asarray([row.ratings], np.int8),
        "nodules/annotation_ids": np.full((1, 4), -1, np.int32),
        "nodules/malignancy_median": np.asarray([row.malignancy], np.float32),
        "nodules/label": np.asarray([lidc.malignancy_label(row.malignancy, indeterminate=INDETERMINATE[cfg.indeterminate])],
                                    np.int8),
        "nodules/diameter_mm": np.asarray([diameter], np.float32),
        "nodules/long_axis_mm": np.asarray([np.nan], np.float32),
        "nodules/volume_mm3": np.asarray([volume_mm3], np.float32),
        "nodules/mean_hu": np.asarray([float(hu[mask].mean())], np.float32),
        "nodules/features": nodule_features(hu, mask, volume.spacing).astype(np.float32)[None],
        "nodules/size_category": np.asarray([size_category(diameter)], np.int8),
        "nodules/centroid_voxel": np.asarray([centroid], np.float32),
        "nodules/centroid_world": np.asarray([world], np.float32),
        "nodules/centroid_resampled": np.asarray([centre], np.float32),
    }
    attrs = {
        "kind": "crop",
        "patient_id": row.patient_id,
        "study_uid": "",
        "series_uid": row.name,
        "source_series_uid": str(row.extra.get("seriesuid", "")),
        "source": str(image_path),
        "original_shape": np.asarray(volume.shape, np.int32),
        "original_spacing": np.asarray(volume.spacing, np.float64),
        "origin": np.asarray(volume.origin, np.float64),
        "direction": np.asarray(volume.direction, np.float64),
        "spacing": np.asarray(cfg.spacing, np.float64),
        "shape": roi.astype(np.int32),
        "lung_volume_ml": float("nan"),
        "n_nodules": 1,
        "crop_fraction": float(inside.mean()),
        "mask_rescued": bool(rescued),
        "context": background,
    }
    return ScanRecordData(series_uid=row.name, attrs=attrs, arrays=arrays)


def find_crops(folder: str | os.PathLike) -> tuple[list[tuple[CropRow, Path, Path]], list[str]]:
    """(row, image, mask) for every usable row of a crop folder, and the problems found."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LungsegError(f"{folder}: no such crop folder")
    for sub in ("image", "mask"):
        if not (folder / sub).is_dir():
            raise LungsegError(f"{folder}: no {sub}/ folder; a crop folder holds image/, mask/ and nodules.csv")
    rows, problems = read_table(folder)
    found, named = [], set()
    for row in rows:
        image = folder / "image" / f"{row.name}.nii.gz"
        mask = folder / "mask" / f"{row.name}.nii.gz"
        named.add(row.name)
        lacking = [p.parent.name + "/" + p.name for p in (image, mask) if not p.is_file()]
        if lacking:
            problems.append(f"{row.name}: no {' or '.join(lacking)}; row skipped")
            continue
        found.append((row, image, mask))
    for sub in ("image", "mask"):
        for p in sorted((folder / sub).glob("*.nii.gz")):
            if p.name[: -len(".nii.gz")] not in named:
                problems.append(f"{sub}/{p.name}: no row in nodules.csv; file skipped")
    return found, problems


def import_crops(folder: str | os.PathLike, out: str | os.PathLike, cfg: CropConfig = CropConfig(),
                 items: Sequence[tuple[CropRow, Path, Path]] | None = None) -> Iterator[CropResult]:
    """Import every crop of ``folder`` (or the given ``items`` of :func:`find_crops`) into cache ``out``.

    Resumable like ``preprocess``: crops already in the cache are skipped, and
    each is written atomically.
    """
    if items is None:
        items, _ = find_crops(folder)
    writer = CacheWriter(out, cfg.cache_config())
    done = writer.done()
    scenes = None
    for row, image, mask in items:
        if row.name in done:
            yield CropResult(row.name, "skipped", "already in the cache")
            continue
        if cfg.context and scenes is None:
            from .composite import context_scene

            with lidc.LidcDatabase() as db:      # an LIDC background's own nodules are no place for a crop
                scenes = [context_scene(folder, cfg.spacing, db) for folder in cfg.context]
        try:
            record = import_crop(image, mask, row, cfg, scenes)
        except LungsegError as exc:
            yield CropResult(row.name, "failed", str(exc))
            continue
        writer.add(record)
        yield CropResult(row.name, "done")


__all__ = ["CropConfig", "CropRow", "CropResult", "read_table", "find_crops", "read_crop", "import_crop",
           "import_crops"]
