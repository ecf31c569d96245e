"""The anatomy of the LIDC twin: a chest drawn slice by slice, then the scanner's blur and noise.

:mod:`lungseg.synth` is the only caller: it makes the grid (:class:`Grid`, the
LIDC record's slice positions and pixel spacing), the readers' nodule outlines
and the random generators, calls the functions below in order (plan the body,
fit it to the nodules, build the scene, paint each slice, draw the mediastinal
tubes and the vessel trees), draws the nodules itself, and finally passes the
volume through :func:`scanner`. Nothing here imports :mod:`lungseg.synth`.

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
  small nodules, which is what makes nodule finding hard.

Then the scanner (:func:`scanner`): in-plane blur (the point spread function),
partial-volume blur along z for the slice thickness (vessels get an extra
slab-average edge), and correlated noise (white noise filtered in-plane, about
18 HU in the body).

Where the rules it uses live:

- the scan's geometry: the LIDC record (:class:`lungseg.lidc.ScanRecord`:
  ``slice_zvals``, pixel spacing, slice thickness, ``contrast_used``), turned
  into a :class:`Grid` by ``lungseg.synth._make_grid``; the chest is sized from
  the grid's field of view (:func:`plan_body`);
- the nodules: their outlines are the readers' contours on the grid, made in
  :mod:`lungseg.synth` (clustered and rasterised by :mod:`lungseg.lidc`) and
  seen here only as :class:`NoduleOutline`; :func:`fit_body_to_nodules` and
  :func:`force_lungs_around_nodules` make the lungs hold them;
- tissue HU, vessel and scanner settings: :class:`TwinConfig` (defined here
  because the renderer reads it; :mod:`lungseg.synth` exports it as part of
  its public API);
- the anatomy itself (body plan, cavity outline, domes, ribs, spine, heart,
  mediastinal tubes, vessel roots): the tables and functions of this module.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
from scipy import ndimage

from . import lidc

__all__ = [
    "AIR_HU",
    "Body",
    "Grid",
    "NoduleOutline",
    "Scene",
    "TwinConfig",
    "draw_tubes",
    "draw_vessels",
    "fit_body_to_nodules",
    "force_lungs_around_nodules",
    "make_scene",
    "mediastinal_tubes",
    "mediastinum_volume",
    "paint_slice",
    "plan_body",
    "scanner",
]

log = logging.getLogger(__name__)

#: HU of air.
AIR_HU = -1000.0


# --------------------------------------------------------------------------
# Configuration
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


# --------------------------------------------------------------------------
# The grid, the nodules as the renderer sees them, and the patient's body plan
# --------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Grid:
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


class NoduleOutline(Protocol):
    """A nodule's outline on a box of the grid, as the renderer needs it (``lungseg.synth._Footprint``)."""

    index: int
    box: tuple[slice, slice, slice]     # (z, y, x) slices of the grid
    frac: np.ndarray                    # share of readers including each voxel of the box

    def centroid(self) -> np.ndarray:
        """Reader-weighted (z, y, x) voxel of the grid."""
        ...


@dataclass(frozen=True)
class Body:
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


def plan_body(grid: Grid, record: lidc.ScanRecord, cfg: TwinConfig, rng: np.random.Generator) -> Body:
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
    return Body(
        cx=centre + rng.uniform(-4, 4), cy=centre + 0.025 * fov + rng.uniform(-4, 4),
        a=a, b_ant=b_post * rng.uniform(0.9, 1.0), b_post=b_post, exponent=rng.uniform(2.1, 2.4),
        z_base=z_base, z_apex=z_apex, fat_mm=rng.uniform(18.0, 30.0), fat_waves=waves,
        dome_right=rng.uniform(0.3, 0.36), dome_left=rng.uniform(0.24, 0.3),
        r_vb=rng.uniform(15.0, 18.0), rib_gap=(z_apex - z_base + 30.0) / 10.5,
        heart_x=rng.uniform(0.16, 0.24), heart_size=rng.uniform(0.95, 1.08),
        contrast=bool(record.contrast_used),
    )


def fit_body_to_nodules(body: Body, nodules: Sequence[NoduleOutline], grid: Grid) -> Body:
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


def _make_room_for_centres(body: Body, centres: Sequence[np.ndarray], grid: Grid) -> Body:
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


def _cavity_outline(body: Body, theta, t):
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


def _cavity_norm(body: Body, x, y, t):
    """Distance of points from the centre over the cavity's radius in their direction (< 1 inside)."""
    return np.hypot(x, y) / _cavity_outline(body, np.arctan2(y, x), t)


# --------------------------------------------------------------------------
# The scene: in-plane maps shared by every slice
# --------------------------------------------------------------------------

_N_ANGLES = 4096        # polar angle bins: 0.25 mm along a 160 mm radius


@dataclass(eq=False)
class Scene:
    """Everything the slice painter needs that does not change from slice to slice."""

    grid: Grid
    body: Body
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


def make_scene(grid: Grid, body: Body, cfg: TwinConfig, rng: np.random.Generator) -> Scene:
    coords = (np.arange(grid.n) * grid.ps).astype(np.float32)
    x = np.broadcast_to(coords[None, :] - np.float32(body.cx), (grid.n, grid.n)).copy()
    y = np.broadcast_to(coords[:, None] - np.float32(body.cy), (grid.n, grid.n)).copy()
    theta = (np.arange(_N_ANGLES) + 0.5) * 2 * np.pi / _N_ANGLES - np.pi
    angle = ((np.arctan2(y, x) + np.pi) / (2 * np.pi) * _N_ANGLES).astype(np.int32)
    cell = 8.0 / grid.downsample if grid.downsample < 8 else 1.0      # coarse cell: 8 full-size pixels
    m = int(grid.n / cell) + 2
    return Scene(
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


def _dome_surface(body: Body, x, y) -> np.ndarray:
    """World z of the diaphragm under each pixel: two domes, the right higher.

    Centred well in front of the mid-plane, so that the lungs reach lowest at
    the back and the sides (the costophrenic recesses) and the liver touches
    the front of the chest wall at the level of the dome, as on real CT.
    """
    z = np.full(x.shape, body.z_base, np.float32)
    for side, height in ((-1, body.dome_right), (1, body.dome_left)):
        z = np.maximum(z, body.z_base + height * body.height * _dome_shape(body, x, y, side))
    return z


def _dome_shape(body: Body, x, y, side: int) -> np.ndarray:
    """Height of one dome (-1 right, 1 left) over its apex height: 1 at the top, 0 off the dome."""
    q = ((x - side * 0.45 * body.a) / (0.68 * body.a)) ** 2 + ((y + 0.35 * body.b_post) / (1.05 * body.b_post)) ** 2
    shape = np.sqrt(np.clip(1 - q ** 1.5, 0, 1))             # flat-topped
    return np.where(x * side >= -0.15 * body.a, shape, 0.0)


def _spine_maps(body: Body, x, y) -> dict:
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


def _slice_regions(scene: Scene, k: int) -> _Slice:
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


def _mediastinal_lens(body: Body, x, y, t: float):
    """The mediastinum's core: a lens from sternum to spine, narrow in front, widest at the hila."""
    sd = _cavity_scale(t)[1]
    front, back = -body.b_ant * sd, body.y_vb - body.r_vb
    width = float(np.interp(t, _MEDIASTINUM_T, _MEDIASTINUM_HALF)) * body.a * body.mediastinum_width * \
        (0.45 + 0.55 * np.clip((y - front) / (back - front), 0, 1))
    return ((x - 0.04 * body.a) / width) ** 2 + ((y - (front + back) / 2) / ((back - front) / 2 + 5.0)) ** 2 < 1


def _under_apices(body: Body, x, y, t: float):
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


def _heart_geometry(body: Body) -> tuple[float, float, float, float, float, float]:
    """Centre (x, y, z) and semi-axes (mm) of the heart ellipsoid."""
    size = body.heart_size
    return (body.heart_x * body.a, -0.22 * body.b_ant, body.z_base + 0.36 * body.height,
            0.55 * body.a * size, 0.6 * body.b_ant * size, min(max(0.2 * body.height, 45.0), 62.0) * size)


def _in_heart(body: Body, x, y, z):
    cx, cy, cz, ax, ay, az = _heart_geometry(body)
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 < 1


def paint_slice(scene: Scene, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _wall_profile(scene: Scene, t: float) -> tuple[np.ndarray, np.ndarray]:
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


def _back_of_body(body: Body) -> float:
    """Y of the skin of the back, flattened where the patient lies on the table."""
    return body.b_post + _RIB_BAND_MM + 20.0 + 0.4 * body.fat_mm


def _paint_body_wall(scene: Scene, reg: _Slice, hu: np.ndarray, texture: np.ndarray) -> np.ndarray:
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


def _paint_table(scene: Scene, hu: np.ndarray, body: np.ndarray) -> None:
    """Two thin curved carbon-fibre boards under the patient's back, foam between."""
    s, b = scene, scene.body
    curve = s.y - (_back_of_body(b) + 6.0) + s.x ** 2 / 1400.0           # 0 on the top board
    span = (np.abs(s.x) < 1.05 * b.a + 40.0) & ~body
    hu[span & (curve >= 2.5) & (curve < 24)] = -960.0
    hu[span & (curve >= 0) & (curve < 2.5)] = 250.0
    hu[span & (curve >= 24) & (curve < 27)] = 400.0


def _blood_hu(scene: Scene) -> float:
    return scene.cfg.contrast_blood_hu if scene.body.contrast else scene.cfg.blood_hu


def _paint_cavity(scene: Scene, reg: _Slice, hu: np.ndarray, texture: np.ndarray) -> None:
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


def _paint_heart(scene: Scene, reg: _Slice, hu: np.ndarray) -> None:
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


def _paint_abdomen(scene: Scene, reg: _Slice, hu: np.ndarray, texture: np.ndarray) -> None:
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


def _rib_offsets(scene: Scene, z: float) -> tuple[np.ndarray, np.ndarray]:
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


def _paint_bones(scene: Scene, reg: _Slice, hu: np.ndarray) -> None:
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


def _paint_spine(scene: Scene, hu: np.ndarray, z: float) -> None:
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


def _paint_lungs(scene: Scene, hu: np.ndarray, lungs: np.ndarray, texture: np.ndarray) -> None:
    """Parenchyma: denser towards the back (gravity), with a smooth texture."""
    cfg, b = scene.cfg, scene.body
    if lungs.any():
        value = cfg.lung_hu + cfg.lung_gradient_hu * scene.y[lungs] / (2 * b.b_post) + \
            cfg.lung_texture_hu * texture[lungs]
        hu[lungs] = value


# --------------------------------------------------------------------------
# Tubes: great vessels, airways, vessel trees (3D capsules with partial volume)
# --------------------------------------------------------------------------

def _capsule(grid: Grid, p0, p1, r0: float, r1: float):
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


def _tube_points(scene: Scene, points) -> list[np.ndarray]:
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


def mediastinal_tubes(scene: Scene) -> list[_Tube]:
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


def mediastinum_volume(scene: Scene, tubes: Sequence[_Tube]) -> np.ndarray:
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


def draw_tubes(scene: Scene, hu: np.ndarray, tubes: Sequence[_Tube]) -> None:
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
    grid: Grid

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


def _depth_map(lungs: np.ndarray, grid: Grid) -> _DepthMap:
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


def _vessel_roots(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def draw_vessels(scene: Scene, hu: np.ndarray, lungs: np.ndarray, rng: np.random.Generator) -> int:
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
# Lungs around the nodules
# --------------------------------------------------------------------------

def force_lungs_around_nodules(scene: Scene, footprints: Sequence[NoduleOutline]) -> list[bool]:
    """Make each nodule's outline lung; a nodule whose centre the template lungs miss
    gets an ellipsoidal pocket of lung 6 mm wider than it, joined to the nearest
    lung of its slice by a channel as wide as the pocket (a recess of the lung,
    not an island of air: a lung mask keeps it, as it keeps a real nodule's
    lung). Returns, per nodule, whether the template lungs held its centre."""
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
        _join_to_lung(scene, reg.lungs, centre, extent, zc)
    return held


def _join_to_lung(scene: Scene, lungs: np.ndarray, centre, extent: np.ndarray, zc: float) -> None:
    """Carve a channel of lung from a pocket's centre to the nearest lung pixel of its central slice ``lungs``,
    on the pocket's slices, as wide as the pocket there."""
    grid = scene.grid
    where = np.argwhere(lungs)
    if len(where) == 0:
        return
    c = np.asarray(centre[1:], float)
    end = where[np.argmin(((where - c) ** 2).sum(axis=1))].astype(float)
    seg = end - c
    length2 = max(float(seg @ seg), 1e-9)
    yy, xx = np.mgrid[0:grid.n, 0:grid.n].astype(np.float32)
    t = np.clip(((yy - c[0]) * seg[0] + (xx - c[1]) * seg[1]) / length2, 0, 1)
    dist_mm = np.hypot(yy - (c[0] + t * seg[0]), xx - (c[1] + t * seg[1])) * grid.ps
    half_width = min(extent[1], extent[2])
    for kk in range(grid.shape[0]):
        u = ((grid.slice_z[kk] - zc) / extent[0]) ** 2
        if u < 1:
            scene.forced_lung[kk] = scene.forced_lung[kk] | (dist_mm < half_width * math.sqrt(1 - u))


# --------------------------------------------------------------------------
# The scanner: blur and noise
# --------------------------------------------------------------------------

def scanner(hu: np.ndarray, body: np.ndarray, grid: Grid, cfg: TwinConfig, rng: np.random.Generator) -> np.ndarray:
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
