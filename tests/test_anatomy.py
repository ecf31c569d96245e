"""anatomy.py: the LIDC twin's chest renderer, on tiny grids (64 x 64 pixels of 5.6 mm, 10 mm slices).

The twin as a whole (nodules, DICOM, the LIDC path) is tested in test_synth.py.
"""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from lungseg import anatomy

CFG = anatomy.TwinConfig()
RECORD = SimpleNamespace(slice_zvals=np.arange(-300.0, 1.0, 10.0), contrast_used=False)   # 31 slices, 300 mm


def make_grid(n: int = 64, ps: float = 5.6) -> anatomy.Grid:
    z = RECORD.slice_zvals
    return anatomy.Grid(slice_z=z, first=0, n=n, ps=ps, dz=10.0, thickness=10.0, downsample=8)


@dataclasses.dataclass(frozen=True, eq=False)
class Outline:
    """A ball-shaped nodule outline (an anatomy.NoduleOutline) around grid voxel ``centre``."""

    index: int
    box: tuple
    frac: np.ndarray

    @classmethod
    def ball(cls, grid: anatomy.Grid, centre, radius_mm: float, index: int = 0) -> "Outline":
        half = [int(np.ceil(radius_mm / s)) for s in (grid.dz, grid.ps, grid.ps)]
        box = tuple(slice(max(c - h, 0), c + h + 1) for c, h in zip(centre, half))
        z, y, x = np.indices([b.stop - b.start for b in box])
        d = np.sqrt(sum(((i + b.start - c) * s) ** 2 for i, b, c, s in
                        zip((z, y, x), box, centre, (grid.dz, grid.ps, grid.ps))))
        return cls(index, box, (d <= radius_mm).astype(np.float32))

    def centroid(self) -> np.ndarray:
        return np.argwhere(self.frac > 0).mean(0) + [b.start for b in self.box]


def scene_of(grid, body, seed: int = 1):
    """The scene as synth.render_scan builds it (with the mediastinal tubes' volume)."""
    scene = anatomy.make_scene(grid, body, CFG, np.random.default_rng(seed))
    scene.mediastinum = anatomy.mediastinum_volume(scene, anatomy.mediastinal_tubes(scene))
    return scene


def body_and_scene(seed: int = 0):
    grid = make_grid()
    body = anatomy.plan_body(grid, RECORD, CFG, np.random.default_rng(seed))
    return grid, body, scene_of(grid, body, seed + 1)


def paint(scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    hu, lungs, body = (np.empty(scene.grid.shape, t) for t in (np.float32, bool, bool))
    for k in range(scene.grid.shape[0]):
        hu[k], lungs[k], body[k] = anatomy.paint_slice(scene, k)
    return hu, lungs, body


def mid_lung_slice(grid, body) -> int:
    return int(np.abs(grid.slice_z - (body.z_base + 0.5 * body.height)).argmin())


# --------------------------------------------------------------------------
# Body plan
# --------------------------------------------------------------------------

def test_body_plan_is_seeded_and_sized_from_the_field_of_view():
    small, large = make_grid(ps=5.0), make_grid(ps=6.5)
    a = anatomy.plan_body(small, RECORD, CFG, np.random.default_rng(1))
    assert a == anatomy.plan_body(small, RECORD, CFG, np.random.default_rng(1))
    assert anatomy.plan_body(large, RECORD, CFG, np.random.default_rng(1)).a > a.a      # wider field, wider chest
    z = RECORD.slice_zvals
    assert z[0] < a.z_base < a.z_apex <= z[-1]                                          # abdomen below, neck above
    assert 95 * 0.96 <= a.a <= 150 * 1.04 and a.b_post < a.a


def test_body_is_fitted_so_the_lungs_hold_the_nodules():
    grid = make_grid()
    body = anatomy.plan_body(grid, RECORD, CFG, np.random.default_rng(0))
    top = int(np.searchsorted(grid.slice_z, body.z_apex)) - 1            # the highest slice below the apices
    low_k = int(np.searchsorted(grid.slice_z, body.z_base))              # just above the deepest recess
    j = int(round(body.cy / grid.ps))
    outlines = [Outline.ball(grid, (top, j, int(round((body.cx - 0.55 * body.a) / grid.ps))), 12.0, 0),
                Outline.ball(grid, (low_k, j, int(round((body.cx + 1.2 * body.a) / grid.ps))), 12.0, 1)]
    fitted = anatomy.fit_body_to_nodules(body, outlines, grid)
    assert fitted.z_apex > body.z_apex and fitted.z_base < body.z_base    # room above and below them
    assert fitted.z_apex > grid.slice_z[top] + 10 and fitted.z_base < grid.slice_z[low_k] - 10
    assert fitted.a > body.a                                              # grown to hold the lateral one
    assert anatomy.fit_body_to_nodules(body, [], grid) is body


# --------------------------------------------------------------------------
# Slices
# --------------------------------------------------------------------------

def test_slices_hold_air_body_two_lungs_and_bone():
    grid, body, scene = body_and_scene()
    hu, lungs, inside = paint(scene)
    k = mid_lung_slice(grid, body)
    assert hu[k, 0, 0] == anatomy.AIR_HU and not inside[k, 0, 0]
    centre_col = body.cx / grid.ps
    cols = np.nonzero(lungs[k])[1]
    assert (cols < centre_col - 3).sum() > 20 and (cols > centre_col + 3).sum() > 20     # right and left lung
    assert abs(np.median(hu[k][lungs[k]]) - CFG.lung_hu) < 60
    assert (hu[k] > 250).sum() > 5                                                         # ribs, spine
    assert not lungs[k][~inside[k]].any()                                                  # lungs inside the body
    assert not lungs[0].any() and not lungs[-1].any()                                      # abdomen, neck
    assert (hu[0][inside[0]] > 0).mean() > 0.2                                             # liver, spleen, ...


def test_slices_are_reproducible_from_the_seed():
    _, _, a = body_and_scene(seed=4)
    _, _, b = body_and_scene(seed=4)
    _, _, c = body_and_scene(seed=5)
    k = a.grid.shape[0] // 2
    np.testing.assert_array_equal(anatomy.paint_slice(a, k)[0], anatomy.paint_slice(b, k)[0])
    assert not np.array_equal(anatomy.paint_slice(a, k)[0], anatomy.paint_slice(c, k)[0])


def test_contrast_brightens_the_blood():
    grid = make_grid()
    blood = []
    for contrast in (False, True):
        record = SimpleNamespace(slice_zvals=RECORD.slice_zvals, contrast_used=contrast)
        body = anatomy.plan_body(grid, record, CFG, np.random.default_rng(0))
        hu, _, _ = paint(scene_of(grid, body))
        blood.append(int((np.abs(hu - CFG.contrast_blood_hu) < 1).sum()))
    assert blood[0] == 0 and blood[1] > 20                  # heart chambers at 170 HU only with contrast


# --------------------------------------------------------------------------
# Nodules, tubes, vessels
# --------------------------------------------------------------------------

def test_a_nodule_outside_the_lungs_gets_a_pocket_of_lung_joined_to_the_lung():
    from scipy import ndimage

    grid, body, scene = body_and_scene()
    k = mid_lung_slice(grid, body)
    _, before, inside = paint(scene)
    far = ndimage.distance_transform_edt(~before[k]) * grid.ps * inside[k]
    centre = (k, *np.unravel_index(np.argmax(far), far.shape))                 # the body's farthest from the lungs
    assert far[centre[1:]] > 30
    nodule = Outline.ball(grid, centre, 4.0)
    assert anatomy.force_lungs_around_nodules(scene, [nodule]) == [False]
    _, lungs, _ = paint(scene)
    assert lungs[nodule.box][nodule.frac > 0].all()
    components, _ = ndimage.label(lungs[k])
    pocket = components[centre[1:]]
    assert pocket > 0 and (components == pocket)[before[k]].any()           # a recess of the lung, not an island


def test_tubes_put_air_in_the_airways_and_vessels_stay_in_the_lungs():
    _, _, scene = body_and_scene()
    tubes = anatomy.mediastinal_tubes(scene)
    hu, lungs, inside = paint(scene)
    before = hu.copy()
    anatomy.draw_tubes(scene, hu, tubes)
    airway = (hu < -900) & inside & ~lungs & (before > -900)
    assert airway.sum() > 3                                                  # trachea and bronchi
    before = hu.copy()
    assert anatomy.draw_vessels(scene, hu, lungs, np.random.default_rng(2)) > 10
    changed = hu != before
    assert changed.any() and not changed[~lungs].any()
    assert (hu[changed] > before[changed]).all()                            # blood is denser than lung


# --------------------------------------------------------------------------
# Scanner
# --------------------------------------------------------------------------

def test_scanner_blurs_and_adds_noise_of_the_configured_sd():
    grid = make_grid()
    hu = np.zeros((4, grid.n, grid.n), np.float32)
    body = np.zeros(hu.shape, bool)
    body[:, :, : grid.n // 2] = True
    cfg = dataclasses.replace(CFG, noise_sd=20.0)
    out = anatomy.scanner(hu, body, dataclasses.replace(grid, slice_z=grid.slice_z[:4]), cfg, np.random.default_rng(0))
    assert out is hu
    assert abs(hu[body].std() - 20.0) < 1.5 and abs(hu[~body].std() - 16.0) < 1.5
    edge = np.zeros((3, grid.n, grid.n), np.float32)
    edge[:, :, grid.n // 2:] = 100.0
    quiet = dataclasses.replace(CFG, noise_sd=0.0, psf_mm=5.6)
    anatomy.scanner(edge, body[:3], dataclasses.replace(grid, slice_z=grid.slice_z[:3]), quiet, np.random.default_rng(0))
    row = edge[1, 10]
    assert row[0] == pytest.approx(0, abs=1e-3) and row[-1] == pytest.approx(100, abs=1e-3)
    assert 0 < row[grid.n // 2 - 1] < 50 < row[grid.n // 2] < 100                  # a blurred edge
