"""report: the per-nodule figure, the overview figure and the self-contained HTML page."""

import re

import numpy as np
import pytest

from lungseg import dicomio, report


@pytest.fixture
def volume(tiny_lidc):
    root, _ = tiny_lidc
    return dicomio.read_series(root / "LIDC-IDRI-9001")


def _nodule(i, zyx, diameter=15.0, **extra):
    return {"id": i, "centroid_voxel_zyx": list(zyx), "centroid_world_lps_mm": [1.0, 2.0, 3.0],
            "diameter_mm": diameter, "long_axis_mm": diameter, "volume_mm3": 1767.1, "mean_hu": -20.0,
            "size_category": "nodule", "lung_side": "right", **extra}


def test_overview_circles_every_finding(volume, tmp_path):
    from PIL import Image

    lungs = volume.hu < -400
    nodules = [_nodule(1, (12, 46, 18)), _nodule(2, (5, 30, 40), 6.0)]
    report.overview_png(volume, lungs, nodules, tmp_path / "a.png")
    report.overview_png(volume, lungs, [], tmp_path / "b.png")
    a = np.asarray(Image.open(tmp_path / "a.png").convert("RGB")).astype(int)
    b = np.asarray(Image.open(tmp_path / "b.png").convert("RGB")).astype(int)
    red = lambda im: ((im[..., 0] > 180) & (im[..., 1] < 80) & (im[..., 2] < 80)).sum()  # noqa: E731
    assert red(a) > 50 and red(b) == 0


def test_html_is_self_contained_with_one_row_per_finding(volume, tmp_path):
    lungs = volume.hu < -400
    nodules = [_nodule(1, (12, 46, 18), nodule_probability=0.9, malignancy_probability=0.7),
               _nodule(2, (5, 30, 40), 6.0, nodule_probability=0.6, malignancy_probability=0.1)]
    labels = np.zeros(volume.shape, np.uint16)
    labels[11:14, 44:49, 16:21] = 1
    for n in nodules:
        report.nodule_png(volume, labels, n, tmp_path / f"nodule_{n['id']:03d}.png")
    report.overview_png(volume, lungs, nodules, tmp_path / "overview.png")
    rep = {"lungseg_version": "0", "source": "<scan> & co", "patient_id": "P<1>", "series_uid": "1.2",
           "shape_zyx": list(volume.shape), "spacing_zyx_mm": list(volume.spacing),
           "checkpoints": {"det": {"arch": "candidatenet", "sha256": "ab" * 32, "path": "d.pt"}},
           "timings_s": {"load_s": 0.1}, "disclaimer": "Research software.", "n_nodules": 2, "nodules": nodules}
    page = report.write_html(tmp_path, rep).read_text()
    assert "<script" not in page.lower() and not re.search(r"(src|href)=\"(https?:)?//", page)
    assert page.count('src="data:image/png;base64,') == 3                  # overview + 2 thumbnails
    assert "P&lt;1&gt;" in page and "&lt;scan&gt; &amp; co" in page and "P<1>" not in page
    rows = re.findall(r"<tr><td>(\d+)</td>", page)
    assert rows == ["1", "2"] and "0.900" in page and "0.100" in page and "p(malignant)" in page
    empty = report.write_html(tmp_path, {**rep, "n_nodules": 0, "nodules": []}).read_text()
    assert "no findings" in empty and empty.count("data:image/png") == 1
