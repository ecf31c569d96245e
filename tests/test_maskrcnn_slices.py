"""lungseg_maskrcnn.slices: paper B's slices, circular masks, lung masking, patches, excluded findings."""

import numpy as np
import pytest

pytest.importorskip("lungseg_maskrcnn")

from conftest import TINY_LUNA_UID as UID, luna_row as _row, tiny_luna_volume as _volume  # noqa: E402
from lungseg.errors import LungsegError  # noqa: E402
from lungseg_maskrcnn import luna16, slices  # noqa: E402


@pytest.fixture
def luna_dir(tiny_luna):
    return tiny_luna


SMALL_PATCHES = slices.SliceConfig(patch=16, patch_stride=4)


def test_normalize_clips_to_paper_b_window():
    np.testing.assert_allclose(slices.normalize(np.array([-3000, -1024, -112, 800, 3000])),
                               [0, 0, 0.5, 1, 1], atol=1e-6)


def test_three_nearest_slices_include_the_centre():
    volume = _volume()
    centre = volume.voxel_to_world([12.4, 40, 40])
    assert slices.nearest_slices(volume, centre) == [11, 12, 13]
    assert slices.nearest_slices(volume, volume.voxel_to_world([0.2, 40, 40])) == [0, 1, 2]   # at the edge


def test_slices_hold_sphere_cross_sections_at_the_right_place(luna_dir, tmp_path):
    out = tmp_path / "s.h5"
    status = list(slices.build(luna_dir, out, SMALL_PATCHES))
    assert [s[1] for s in status] == ["done"]
    data = slices.read_slices(out)
    # 12 mm nodule (R 6 mm) on 2.5 mm slices: 3 slices; 6 mm (R 3 mm): its centre slice and neither neighbour
    # (2.5 mm away the sphere is sqrt(9 - 6.25) = 1.7 mm wide, still reached): 3 slices too.
    assert sorted(data.z.tolist()) == [7, 8, 9, 11, 12, 13]
    i = int(np.flatnonzero(data.z == 12)[0])
    ys, xs = np.nonzero(data.instances[i] == 1)
    assert abs(ys.mean() - 46) < 0.5 and abs(xs.mean() - 68) < 0.5
    radius_px = np.sqrt((data.instances[i] == 1).sum() / np.pi)
    assert abs(radius_px - 4) < 0.5                                   # 6 mm at 1.5 mm pixels
    j = int(np.flatnonzero(data.z == 11)[0])
    assert (data.instances[j] == 1).sum() < (data.instances[i] == 1).sum()   # off-centre: a smaller circle
    assert data.diameters(i) == {1: pytest.approx(12.0)}
    # lung masked: the body and the table are the lowest value, the lungs keep their HU
    assert (data.image[i][88:95, 40:60] == -1024).all()
    assert data.image[i][46, 75] > -1000
    assert slices.normalize(data.image[i]).max() <= 1


def test_patches_are_balanced_and_positives_centred_on_nodule(luna_dir, tmp_path):
    out = tmp_path / "s.h5"
    list(slices.build(luna_dir, out, SMALL_PATCHES))
    x, y, scan = slices.read_patches(out)
    assert x.shape[1:] == (16, 16) and (y == 1).sum() == (y == 0).sum() > 0
    c = slices.counts(out)
    assert c["patches_positive_before_balancing"] > 0 and c["patches_negative_before_balancing"] > 0
    assert (scan == 0).all()
    # a positive's centre pixel is nodule (brighter than lung), a negative's block holds no nodule
    assert (x[y == 1][:, 8, 8] > slices.normalize(np.array(-400))).all()


def test_patch_grid_every_stride_px_through_the_centre():
    image = np.zeros((80, 80), np.float32)
    instances = np.zeros((80, 80), np.uint8)
    instances[np.add.outer((np.arange(80) - 40) ** 2, (np.arange(80) - 40) ** 2) <= 11 ** 2] = 1
    lungs = np.ones((80, 80), bool)
    pos, neg = slices.patches(image, instances, (0, 0, 80, 80), lungs, slices.SliceConfig(patch=20, patch_stride=10))
    # grid points 30, 40, 50 on each axis; the four diagonal ones lie 14 px out, beyond the 11 px radius
    assert len(pos) == 5
    assert len(neg) == 12                                  # the 20 px tiling's blocks clear of rows/columns 29-51


def test_excluded_findings_give_no_slices_and_are_ignored(luna_dir, tmp_path):
    volume = _volume()
    # a 9 mm finding at slice 12 (right lung), excluded as LUNA16's annotations_excluded.csv does
    luna16.write_annotations(luna_dir / slices.EXCLUDED_CSV, [_row(volume, 12, 52, 28, 3)])
    try:
        out = tmp_path / "s.h5"
        list(slices.build(luna_dir, out, SMALL_PATCHES))
    finally:
        (luna_dir / slices.EXCLUDED_CSV).unlink()
    data = slices.read_slices(out)
    assert sorted(data.z.tolist()) == [7, 8, 9, 11, 12, 13]                # no slices of its own
    i = int(np.flatnonzero(data.z == 12)[0])
    assert set(np.unique(data.instances[i])) == {0, 1, slices.IGNORE}      # marked where it lies on a kept slice
    assert data.diameters(i) == {1: pytest.approx(12.0)}                  # and not an instance
    i = int(np.flatnonzero(data.z == 8)[0])
    assert not (data.instances[i] == slices.IGNORE).any()                 # 10 mm away: beyond its sphere


def test_augment_turns_image_and_instances_together():
    image = np.zeros((64, 64), np.float32)
    instances = np.zeros((64, 64), np.uint8)
    image[10:20, 30:34] = 1
    instances[10:20, 30:34] = 1
    img, ins = slices.augment(image, instances, np.random.default_rng(3), max_shift=5)
    assert ins.dtype == np.uint8 and set(np.unique(ins)) <= {0, 1}
    assert ins.sum() > 0 and abs(int(ins.sum()) - 40) <= 12
    assert img[ins == 1].mean() > 0.8 and img[ins == 0].mean() < 0.05


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(LungsegError, match="annotations.csv"):
        list(slices.build(tmp_path, tmp_path / "s.h5"))
    (tmp_path / "not.h5").write_text("no")
    with pytest.raises(LungsegError, match="not an HDF5 file"):
        slices.read_slices(tmp_path / "not.h5")
    with pytest.raises(ValueError):
        slices.SliceConfig(patch=4)


def test_missing_series_is_reported_not_fatal(tmp_path, luna_dir):
    rows = luna16.read_annotations(luna_dir / "annotations.csv")
    luna16.write_annotations(tmp_path / "annotations.csv", rows + [{**rows[0], "seriesuid": "1.2.3.4"}])
    (tmp_path / f"{UID}.mhd").symlink_to(luna_dir / f"{UID}.mhd")
    (tmp_path / f"{UID}.raw").symlink_to(luna_dir / f"{UID}.raw")
    status = {s[0]: s for s in slices.build(tmp_path, tmp_path / "s.h5", SMALL_PATCHES)}
    assert status["1.2.3.4"][1] == "failed" and "1.2.3.4.mhd" in status["1.2.3.4"][2]
    assert status[UID][1] == "done"
