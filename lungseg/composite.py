"""Real nodules in real lungs: compositing nodule crops into whole CT scans (``lungseg composite``).

No whole real scans with many annotated nodules can be had here, but there
are real nodule crops with consensus masks (``../shared/data/nodules``) and
real chest CTs (``../shared/data``) or LIDC twins to put them in. A composite
is a background series with real nodules pasted into its lung parenchyma:

1. **Crop.** A crop is read and checked by :func:`lungseg.crops.read_crop`,
   then flipped along each axis (p = 0.5 each), turned in-plane by an angle
   drawn uniformly from [0, 360) degrees and scaled isotropically by a factor
   from [``scale_min``, ``scale_max``] (0.85-1.2 by default; LIDC readers'
   outlines of one nodule differ by more), all drawn from the seed.
2. **Resampling.** The transformed crop (HU and mask) is sampled onto the
   background's grid with trilinear interpolation; along z each background
   voxel averages sub-samples over its slice spacing, so a thick-slice
   background gets the partial-volume blur a scanner would give it. The mask
   is the averaged mask >= 0.5.
3. **Position.** Centres are drawn from the background's lung mask
   (:func:`lungseg.preprocess.lung_mask`) for one of three placements, in turn:
   ``parenchyma`` (anywhere the nodule fits), ``juxta-pleural`` (the nodule's
   mask within ``touch_mm`` of the lung's edge) and ``juxta-vascular`` (within
   ``touch_mm`` of a vessel: lung voxels above -500 HU that are no nodule).
   The nodule's mask must lie inside the lung mask, over and among mostly
   aerated lung (``min_air_fraction`` of the background under the mask, and of
   the lung in its blending margin, below -500 HU: not on the hilum, a tumour
   or a consolidation), and its mask grown by the blending margin must not touch
   another nodule (the background's own or one pasted before).
4. **Blending.** With d the distance (mm) of a voxel outside the nodule's
   mask, the weight of the crop is 1 inside the mask, falls as a raised
   cosine to 0 at d = ``margin_mm`` (3 mm by default), and is 0 beyond, where
   the crop holds no data, and outside the background's lungs (the chest wall
   of a juxta-pleural nodule stays the background's). Inside the margin the
   transition is therefore the nodule's own surroundings fading into the
   background; outside it every voxel is the background's, unchanged.

What is written, per composite ``OUT/<case>/``: ``dicom/`` (an ordinary CT
series with new UIDs, the background's geometry and HU), ``nodules.nii.gz``
(nodule label mask on that grid, value = nodule ``id``) and ``nodules.json``:
per nodule its id, centre (voxel and LPS), equivalent diameter, volume, mean
HU, majority ratings (LIDC characteristics), readers, label
(:func:`lungseg.lidc.malignancy_label`), patient of origin, and how it was
placed (kind, scale, angle, flips); plus the background's own nodules (from
the LIDC database when the background is an LIDC scan or twin: readers'
consensus masks and ratings keep their labels) and, for detection, its
nodules marked by fewer readers (``irrelevant``). :func:`lungseg.preprocess.
preprocess_composite` turns a composite into an ordinary cache entry.

Everything random comes from one seed and the composite's index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from scipy import ndimage

from . import lidc
from .cache import equivalent_diameter_mm
from .configs import CompositeConfig
from .crops import CropRow, find_crops, read_crop
from .dicomio import CTVolume, check_chest_ct, find_series, read_series, write_nifti, write_series
from .errors import LungsegError
from .files import write_text
from .preprocess import lung_mask

log = logging.getLogger(__name__)

PLACEMENTS = ("parenchyma", "juxta-pleural", "juxta-vascular")
#: Lung voxels at or above this HU that belong to no nodule count as vessels (and airway walls).
VESSEL_HU = -500.0
#: Format of ``nodules.json``.
COMPOSITE_FORMAT = 1


@dataclass(frozen=True)
class Background:
    """A background scan and what the compositor needs of it."""

    volume: CTVolume
    lungs: np.ndarray                   # bool (z, y, x)
    name: str
    own: tuple[dict, ...]               # the background's own annotated nodules (with "mask", "box")
    irrelevant: tuple[dict, ...]        # nodules of fewer readers: centre and diameter only
    wall_mm: np.ndarray                 # distance of each lung voxel to the lung's edge, mm
    vessel_mm: np.ndarray               # distance to the nearest vessel voxel, mm (computed once per background)


# --------------------------------------------------------------------------
# Backgrounds
# --------------------------------------------------------------------------

def _name(record: lidc.ScanRecord | None, patient_id: str, folder) -> str:
    """What a background's composites are named after: its LIDC patient id, else its PatientID, else its folder."""
    return record.patient_id if record is not None else (patient_id or Path(folder).name)


def _lidc_record(db: lidc.LidcDatabase | None, series_uid: str) -> lidc.ScanRecord | None:
    found = [s for s in db.scans() if s.series_uid == series_uid] if db is not None else []
    return found[0] if found else None


def background_name(folder: str | os.PathLike, db: lidc.LidcDatabase | None = None) -> str:
    """A background's name from its headers alone (cheap: no pixel data), as :func:`load_background` names it."""
    import pydicom

    series = [s for s in find_series(folder) if s.modality == "CT"]
    if len(series) != 1:
        return Path(folder).name            # load_background will say what is wrong
    header = pydicom.dcmread(series[0].files[0], stop_before_pixels=True, specific_tags=["PatientID"])
    return _name(_lidc_record(db, series[0].series_uid), str(header.get("PatientID", "")), folder)


def load_background(folder: str | os.PathLike, db: lidc.LidcDatabase | None = None, *,
                    min_readers: int = 3, mask_readers: int = 3) -> Background:
    """A background series, its lung mask, and its own LIDC nodules when the database knows the series."""
    volume = read_series(folder)
    check_chest_ct(volume)
    axial = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])     # z, y, x axes along S, P, L
    if not np.allclose(volume.direction, axial, atol=1e-3):
        raise LungsegError(f"{folder}: a composite needs an axial series without tilt (direction "
                           f"{np.round(volume.direction, 3).tolist()}); this one is oblique or flipped")
    own, irrelevant = [], []
    record = _lidc_record(db, volume.series_uid)
    include = np.zeros(volume.shape, bool)
    if record is not None:
        annotations = db.annotations(record.id)
        k_to_slice = lidc.slice_index_map(record, volume.slice_z_world(), where=str(folder))
        voxel_mm3 = float(np.prod(volume.spacing))
        for nodule in lidc.find_nodules(record, annotations, min_readers=1):
            relevant = nodule.n_readers >= min_readers
            mask, box = lidc.consensus_mask(nodule, record.slice_zvals, volume.shape,
                                            mask_readers=mask_readers if relevant else 1, k_to_slice=k_to_slice)
            if not mask.any():
                continue
            centre = np.argwhere(mask).mean(axis=0) + [b.start for b in box]
            diameter = equivalent_diameter_mm(float(mask.sum()) * voxel_mm3)
            if relevant:
                ratings = np.full((4, len(lidc.CHARACTERISTICS)), -1, int)
                k = min(nodule.n_readers, 4)
                ratings[:k] = nodule.ratings[:k]
                own.append({"source": "lidc", "origin_patient": record.patient_id,
                            "origin_nodule": f"cluster {nodule.index}", "n_readers": nodule.n_readers,
                            "ratings": ratings.tolist(), "ratings_majority": None,
                            "label": nodule.label(), "mask": mask, "box": box})
                include[box] |= mask
            else:
                irrelevant.append({"centre_voxel": centre.tolist(), "diameter_mm": diameter,
                                   "n_readers": nodule.n_readers})
    lungs = lung_mask(volume.hu, volume.spacing, include=include)
    if not lungs.any():
        raise LungsegError(f"{folder}: no lungs found; a composite needs a chest CT")
    name = _name(record, volume.patient_id, folder)
    spacing = np.asarray(volume.spacing, float)
    vessels = lungs & (volume.hu >= VESSEL_HU) & ~include
    wall = ndimage.distance_transform_edt(lungs, sampling=spacing).astype(np.float32)
    vessel = ndimage.distance_transform_edt(~vessels, sampling=spacing).astype(np.float32) if vessels.any() \
        else np.full(volume.shape, np.inf, np.float32)
    return Background(volume, lungs, name, tuple(own), tuple(irrelevant), wall, vessel)


# --------------------------------------------------------------------------
# One nodule: transform, resample, place, blend
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Pasted:
    """A crop resampled onto a box of the background grid, before placement."""

    hu: np.ndarray          # float32 on the box
    mask: np.ndarray        # bool on the box
    valid: np.ndarray       # bool: the box voxel lies inside the crop's extent
    centre: np.ndarray      # mask centroid within the box (voxels)
    scale: float
    angle_deg: float
    flips: tuple[bool, bool, bool]


def _rotation_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def transform_crop(hu: np.ndarray, mask: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float],
                   *, scale: float, angle_deg: float, flips: Sequence[bool]) -> Pasted:
    """Flip, turn in-plane, scale and resample a crop onto a grid of ``target_spacing`` (z, y, x mm).

    Each target voxel averages sub-samples over its z extent (partial volume).
    """
    spacing, target = np.asarray(spacing, float), np.asarray(target_spacing, float)
    centre_src = np.argwhere(mask).mean(axis=0) * spacing                       # mm in the crop
    extent = np.asarray(hu.shape) * spacing
    half = 0.5 * scale * np.linalg.norm(extent[1:]) * np.array([0, 1, 1]) + 0.5 * scale * extent[0] * np.array([1, 0, 0])
    shape = np.ceil(2 * half / target).astype(int) + 3
    centre_box = (shape - 1) / 2.0
    rot = _rotation_z(math.radians(angle_deg))
    flip = np.array([-1.0 if f else 1.0 for f in flips])
    n_sub = max(1, int(math.ceil(target[0] / max(spacing[0] / 2, 0.25))))
    offsets = (np.arange(n_sub) + 0.5) / n_sub - 0.5                              # in target voxels along z
    grid = np.indices(tuple(shape), dtype=np.float64)
    acc_hu = np.zeros(tuple(shape), np.float64)
    acc_mask = np.zeros(tuple(shape), np.float64)
    acc_valid = np.zeros(tuple(shape), np.float64)
    source = hu.astype(np.float32)
    for off in offsets:
        mm = (grid - centre_box[:, None, None, None]) * target[:, None, None, None]
        mm[0] += off * target[0]
        # target mm -> source mm: undo scale, rotation (in-plane), flips.
        src = np.tensordot(rot.T, mm, axes=1) / scale
        src = src * flip[:, None, None, None] + centre_src[:, None, None, None]
        idx = src / spacing[:, None, None, None]
        inside = np.all([(idx[a] >= -0.5) & (idx[a] <= hu.shape[a] - 0.5) for a in range(3)], axis=0)
        acc_hu += ndimage.map_coordinates(source, idx, order=1, mode="nearest")
        acc_mask += ndimage.map_coordinates(mask.astype(np.float32), idx, order=1, mode="constant", cval=0.0)
        acc_valid += inside
    m = acc_mask / n_sub >= 0.5
    if not m.any():                       # thinner than a target slice: keep the most covered voxels
        m = acc_mask >= acc_mask.max() * 0.999 if acc_mask.max() > 0 else m
    valid = acc_valid / n_sub >= 0.5
    return Pasted((acc_hu / n_sub).astype(np.float32), m, valid | m, np.argwhere(m).mean(axis=0) if m.any()
                  else centre_box, float(scale), float(angle_deg), tuple(bool(f) for f in flips))


def blend_weight(mask: np.ndarray, valid: np.ndarray, lungs: np.ndarray, spacing, margin_mm: float) -> np.ndarray:
    """The crop's weight per voxel: 1 in the mask, a raised cosine to 0 at ``margin_mm`` outside it, 0 beyond.

    Outside the mask the weight is also 0 where the crop has no data (``valid``
    False) and outside the background's ``lungs``.
    """
    d = ndimage.distance_transform_edt(~mask, sampling=spacing)
    w = np.where(d < margin_mm, 0.5 * (1 + np.cos(np.pi * np.clip(d / margin_mm, 0, 1))), 0.0)
    w = np.where(mask, 1.0, w * (valid & lungs))
    return w.astype(np.float32)


def _clip(start: np.ndarray, shape_box, shape_bg):
    dst, src = [], []
    for s, n, size in zip(start, shape_box, shape_bg):
        lo, hi = max(s, 0), min(s + n, size)
        if hi <= lo:
            return None
        dst.append(slice(lo, hi))
        src.append(slice(lo - s, hi - s))
    return tuple(dst), tuple(src)


@dataclass
class _Scene:
    """A background being composited: its HU (float), lungs, distance maps and what is occupied."""

    hu: np.ndarray
    lungs: np.ndarray
    spacing: np.ndarray
    wall_mm: np.ndarray           # distance of each lung voxel to the lung's edge
    vessel_mm: np.ndarray         # distance to the nearest vessel voxel
    occupied: np.ndarray          # nodules (own and pasted)
    labels: np.ndarray            # uint16 nodule ids


def _scene(bg: Background) -> _Scene:
    occupied = np.zeros(bg.volume.shape, bool)
    labels = np.zeros(bg.volume.shape, np.uint16)
    for i, n in enumerate(bg.own, start=1):
        occupied[n["box"]] |= n["mask"]
        labels[n["box"]][n["mask"]] = i
    return _Scene(bg.volume.hu.astype(np.float32), bg.lungs, np.asarray(bg.volume.spacing, float), bg.wall_mm,
                  bg.vessel_mm, occupied, labels)


def _fits(scene: _Scene, pasted: Pasted, grown_box: np.ndarray, start: np.ndarray, kind: str,
          cfg: CompositeConfig):
    """(dst, src) when the nodule fits at ``start`` for a placement ``kind``, else None.

    ``grown_box``: the pasted mask grown by the blending margin, on the pasted box.
    """
    clipped = _clip(start, pasted.mask.shape, scene.hu.shape)
    if clipped is None:
        return None
    dst, src = clipped
    m = pasted.mask[src]
    if m.sum() < pasted.mask.sum():                     # leaves the volume
        return None
    if not scene.lungs[dst][m].all():                   # the nodule lies in the lungs
        return None
    grown = grown_box[src]
    ring = grown & ~m & scene.lungs[dst]
    for part in (m, ring):              # on aerated lung and among it: not the hilum, a tumour, a consolidation
        if part.any() and (scene.hu[dst][part] < VESSEL_HU).mean() < cfg.min_air_fraction:
            return None
    if (scene.occupied[dst] & grown).any():
        return None
    # Distances from the mask: smallest wall / vessel distance over the mask's voxels.
    touch = {"juxta-pleural": float(scene.wall_mm[dst][m].min()) - float(np.min(scene.spacing)),
             "juxta-vascular": float(scene.vessel_mm[dst][grown & ~m].min()) if (grown & ~m).any() else math.inf}
    if kind == "parenchyma":
        ok = True
    elif kind == "juxta-pleural":
        ok = touch["juxta-pleural"] <= cfg.touch_mm
    else:
        ok = touch["juxta-vascular"] <= cfg.touch_mm
    return (dst, src) if ok else None


def _candidate_centres(scene: _Scene, kind: str, radius_mm: float, cfg: CompositeConfig,
                       rng: np.random.Generator, n: int) -> np.ndarray:
    """Random lung voxels where a nodule of ``radius_mm`` could sit for ``kind``."""
    if kind == "juxta-pleural":
        band = scene.lungs & (np.abs(scene.wall_mm - radius_mm) <= max(cfg.touch_mm, float(scene.spacing.max())))
    elif kind == "juxta-vascular":
        band = scene.lungs & (scene.wall_mm > radius_mm) & (scene.vessel_mm <= radius_mm + cfg.touch_mm) & \
            (scene.vessel_mm >= 0.5 * radius_mm)
    else:
        band = scene.lungs & (scene.wall_mm > radius_mm + cfg.touch_mm)
    idx = np.flatnonzero(band.ravel())
    if idx.size == 0:
        return np.zeros((0, 3), int)
    pick = rng.choice(idx, size=min(n, idx.size), replace=False)
    return np.stack(np.unravel_index(pick, band.shape), axis=1)


def paste(scene: _Scene, pasted: Pasted, dst, src, nid: int, cfg: CompositeConfig) -> np.ndarray:
    """Blend ``pasted`` into the scene at (dst, src); returns the nodule's mask on the box."""
    mask = pasted.mask[src]
    w = blend_weight(pasted.mask, pasted.valid, np.ones_like(pasted.mask), scene.spacing, cfg.margin_mm)[src]
    w = np.where(mask, w, w * scene.lungs[dst])
    region = scene.hu[dst]
    region += w * (pasted.hu[src] - region)
    scene.occupied[dst] |= mask
    scene.labels[dst][mask] = nid
    return mask


# --------------------------------------------------------------------------
# A whole composite
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class CropChoice:
    row: CropRow
    image: Path
    mask: Path


def _rng(seed: int, name: str, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{name}/{index}".encode()).digest()
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *np.frombuffer(digest[:8], np.uint32).tolist()])


def compose(bg: Background, crops: Sequence[CropChoice], *, index: int = 0, seed: int = 0,
            cfg: CompositeConfig = CompositeConfig()) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Paste ``cfg.nodules_per_scan`` real nodules into ``bg``: (HU int16, label mask, nodule rows)."""
    if not crops:
        raise LungsegError("no nodule crops to paste")
    rng = _rng(seed, bg.name, index)
    scene = _scene(bg)
    rows = []
    for i, n in enumerate(bg.own, start=1):
        rows.append({k: v for k, v in n.items() if k not in ("mask", "box")} | {"id": i, "placement": "own"})
    volume = bg.volume
    nid = len(bg.own)
    for k in range(cfg.nodules_per_scan):
        kind = PLACEMENTS[k % len(PLACEMENTS)]
        for attempt in range(8):                         # another crop when one does not fit anywhere
            choice = crops[int(rng.integers(len(crops)))]
            crop_volume, crop_mask = read_crop(choice.image, choice.mask)
            scale = float(rng.uniform(cfg.scale_min, cfg.scale_max))
            angle = float(rng.uniform(0, 360))
            flips = tuple(bool(f) for f in rng.random(3) < 0.5)
            pasted = transform_crop(crop_volume.hu, crop_mask, crop_volume.spacing, volume.spacing,
                                    scale=scale, angle_deg=angle, flips=flips)
            volume_mm3 = float(pasted.mask.sum() * np.prod(volume.spacing))
            diameter = equivalent_diameter_mm(volume_mm3)
            if not cfg.min_diameter_mm <= diameter <= cfg.max_diameter_mm:
                continue
            grown_box = ndimage.distance_transform_edt(~pasted.mask, sampling=volume.spacing) <= cfg.margin_mm
            placed = None
            for centre in _candidate_centres(scene, kind, diameter / 2, cfg, rng, cfg.tries):
                start = np.round(centre - pasted.centre).astype(int)
                fit = _fits(scene, pasted, grown_box, start, kind, cfg)
                if fit is not None:
                    placed = (start, fit)
                    break
            if placed is None:
                continue
            nid += 1
            start, (dst, src) = placed
            mask = paste(scene, pasted, dst, src, nid, cfg)
            centroid = np.argwhere(mask).mean(axis=0) + [d.start for d in dst]
            row = choice.row
            rows.append({
                "id": nid, "source": "crop", "origin_patient": row.patient_id, "origin_nodule": row.name,
                "n_readers": row.n_readers, "ratings": None, "ratings_majority": list(row.ratings),
                "label": lidc.malignancy_label(row.malignancy), "placement": kind,
                "scale": round(scale, 4), "angle_deg": round(angle, 2), "flips_zyx": list(flips),
                "_centroid": centroid,
            })
            break
        else:
            log.warning("%s composite %d: placed %d of %d nodules (%s found no room)", bg.name, index,
                        nid - len(bg.own), cfg.nodules_per_scan, kind)
    hu = np.clip(np.rint(scene.hu), -32768, 32767).astype(np.int16)
    voxel_mm3 = float(np.prod(volume.spacing))
    for r in rows:
        m = scene.labels == r["id"]
        r.pop("_centroid", None)
        centroid = np.argwhere(m).mean(axis=0)
        volume_mm3 = float(m.sum()) * voxel_mm3
        r.update({"centre_voxel_zyx": [round(float(v), 2) for v in centroid],
                  "centre_world_lps_mm": [round(float(v), 2) for v in volume.voxel_to_world(centroid)],
                  "diameter_mm": round(equivalent_diameter_mm(volume_mm3), 2),
                  "volume_mm3": round(volume_mm3, 1), "mean_hu": round(float(hu[m].mean()), 1)})
    return hu, scene.labels, rows


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["lungseg composite", *parts])


def write_composite(out: str | os.PathLike, bg: Background, hu: np.ndarray, labels: np.ndarray,
                    rows: list[dict], *, case: str, seed: int, cfg: CompositeConfig) -> Path:
    """Write one composite as ``out/<case>/`` (``dicom/``, ``nodules.nii.gz``, ``nodules.json`` last)."""
    folder = Path(out) / case
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "nodules.json"
    if done.exists():
        done.unlink()
    volume = bg.volume
    dicom = folder / "dicom"
    if dicom.exists():
        for p in dicom.glob("*.dcm"):
            p.unlink()
    study, series = _uid(case, str(seed), "study"), _uid(case, str(seed), "series")
    write_series(dicom, hu, spacing=volume.spacing, origin=volume.origin, patient_id=case, study_uid=study,
                 series_uid=series, slice_z=volume.slice_z_world(), intercept=min(-1024, int(hu.min())),
                 description=f"lungseg composite of {bg.name}")
    write_nifti(labels, volume, folder / "nodules.nii.gz", dtype=np.uint16)
    report = {
        "format": COMPOSITE_FORMAT, "case": case, "patient_id": case, "series_uid": series, "study_uid": study,
        "background": {"name": bg.name, "path": volume.path, "series_uid": volume.series_uid},
        "seed": seed, "settings": asdict(cfg),
        "frames": {"centre_voxel_zyx": "voxel indices (slice, row, column) of dicom/",
                   "centre_world_lps_mm": "DICOM patient coordinates (LPS), mm",
                   "mask": "nodules.nii.gz: value = nodule id, on the grid of dicom/"},
        "nodules": rows,
        "irrelevant": list(bg.irrelevant),
    }
    write_text(done, json.dumps(report, indent=2))
    return folder


def read_composite(folder: str | os.PathLike) -> dict:
    """``nodules.json`` of a composite, checked."""
    path = Path(folder) / "nodules.json"
    if not path.is_file():
        raise LungsegError(f"{folder}: not a composite (no nodules.json; `lungseg composite` writes it last)")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LungsegError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if report.get("format") != COMPOSITE_FORMAT:
        raise LungsegError(f"{path}: composite format {report.get('format')!r}, this lungseg reads {COMPOSITE_FORMAT}")
    return report


def find_composites(root: str | os.PathLike) -> list[Path]:
    """Composite folders (holding ``nodules.json``) under ``root``, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise LungsegError(f"{root}: no such folder of composites")
    found = sorted(p.parent for p in root.glob("*/nodules.json"))
    if not found:
        raise LungsegError(f"{root}: no composites (folders with nodules.json) found")
    return found


def select_crops(crop_dir: str | os.PathLike, patients: set[str] | None = None) -> list[CropChoice]:
    """The usable crops of a crop folder, optionally only those of ``patients``."""
    items, problems = find_crops(crop_dir)
    for p in problems:
        log.info("%s", p)
    chosen = [CropChoice(r, i, m) for r, i, m in items if patients is None or r.patient_id in patients]
    if not chosen:
        raise LungsegError(f"{crop_dir}: no usable crops" + (" of the chosen patients" if patients else ""))
    return chosen


def composite_many(backgrounds: Sequence[str | os.PathLike], crop_dir: str | os.PathLike, out: str | os.PathLike,
                   *, per_background: int = 1, seed: int = 0, patients: set[str] | None = None,
                   cfg: CompositeConfig = CompositeConfig(), db: lidc.LidcDatabase | None = None
                   ) -> Iterator[tuple[str, str, Path | str]]:
    """Write ``per_background`` composites of each background; yields (case, status, folder or message).

    Resumable: a case whose ``nodules.json`` exists is skipped.
    """
    crops = select_crops(crop_dir, patients)
    for folder in backgrounds:
        bg = None
        try:
            name = background_name(folder, db)
        except LungsegError as exc:
            yield Path(folder).name, "failed", str(exc)
            continue
        for index in range(per_background):
            case = f"{name}-s{seed}-c{index:03d}"
            if (Path(out) / case / "nodules.json").exists():
                yield case, "skipped", Path(out) / case
                continue
            try:
                if bg is None:
                    bg = load_background(folder, db)        # only when a composite of it is still missing
                hu, labels, rows = compose(bg, crops, index=index, seed=seed, cfg=cfg)
            except LungsegError as exc:
                yield case, "failed", str(exc)
                if bg is None:              # the background itself cannot be used
                    break
                continue
            yield case, "done", write_composite(out, bg, hu, labels, rows, case=case, seed=seed, cfg=cfg)


# --------------------------------------------------------------------------
# One nodule in real surroundings, on the model grid (import-crops --context)
# --------------------------------------------------------------------------

def context_scene(folder: str | os.PathLike, spacing: Sequence[float], db: lidc.LidcDatabase | None = None
                  ) -> tuple[str, _Scene]:
    """A background resampled to the model grid of ``spacing``, ready for :func:`in_context`: (name, scene)."""
    from .preprocess import mask_to_grid, resample, resampled_shape

    bg = load_background(folder, db)
    volume = bg.volume
    spacing = np.asarray(spacing, float)
    shape = resampled_shape(volume.shape, volume.spacing, spacing)
    hu = resample(volume.hu, volume.spacing, spacing, shape=shape).astype(np.float32)
    ratio = np.asarray(volume.spacing) / spacing
    occupied = np.zeros(shape, bool)
    for n in bg.own:
        occupied |= mask_to_grid(n["mask"], n["box"], ratio, shape)
    lungs = lung_mask(hu, spacing, include=occupied)
    vessels = lungs & (hu >= VESSEL_HU) & ~occupied
    wall = ndimage.distance_transform_edt(lungs, sampling=spacing).astype(np.float32)
    vessel = ndimage.distance_transform_edt(~vessels, sampling=spacing).astype(np.float32) if vessels.any() \
        else np.full(shape, np.inf, np.float32)
    return bg.name, _Scene(hu, lungs, spacing, wall, vessel, occupied, np.zeros(shape, np.uint16))


def in_context(hu: np.ndarray, mask: np.ndarray, spacing: Sequence[float], scene: _Scene, roi_shape: Sequence[int],
               rng: np.random.Generator, cfg: CompositeConfig = CompositeConfig()) -> tuple[np.ndarray, np.ndarray]:
    """A crop placed in a background's lung parenchyma: (ROI HU, ROI mask) on the scene's grid.

    The crop is resampled unscaled and unturned (its size is what a classifier
    must read), placed where it fits as :func:`compose` places a
    ``parenchyma`` nodule, blended in, and the ROI of ``roi_shape`` is cut
    around its mask's centroid (:func:`lungseg.preprocess.roi_start`). The
    scene is left as it was.
    """
    from .preprocess import crop, roi_start

    pasted = transform_crop(hu, mask, spacing, scene.spacing, scale=1.0, angle_deg=0.0, flips=(False, False, False))
    radius = equivalent_diameter_mm(float(pasted.mask.sum() * np.prod(scene.spacing))) / 2
    grown = ndimage.distance_transform_edt(~pasted.mask, sampling=scene.spacing) <= cfg.margin_mm
    for centre in _candidate_centres(scene, "parenchyma", radius, cfg, rng, cfg.tries):
        start = np.round(centre - pasted.centre).astype(int)
        fit = _fits(scene, pasted, grown, start, "parenchyma", cfg)
        if fit is not None:
            break
    else:
        raise LungsegError(f"no room for a {2 * radius:.0f} mm nodule in the background's aerated lung")
    dst, src = fit
    saved = scene.hu[dst].copy(), scene.occupied[dst].copy(), scene.labels[dst].copy()
    try:
        m = paste(scene, pasted, dst, src, 1, cfg)
        full = np.zeros(scene.hu.shape, bool)
        full[dst] = m
        centroid = np.argwhere(m).mean(axis=0) + [d.start for d in dst]
        first = roi_start(centroid, roi_shape)
        return crop(scene.hu, first, roi_shape, fill=-1000.0), crop(full, first, roi_shape)
    finally:
        scene.hu[dst], scene.occupied[dst], scene.labels[dst] = saved


__all__ = ["CompositeConfig", "PLACEMENTS", "Background", "background_name", "load_background", "transform_crop", "blend_weight",
           "compose", "write_composite", "read_composite", "find_composites", "select_crops", "composite_many",
           "context_scene", "in_context"]
