"""Tests for lungseg.dicomio on small synthetic DICOM series written per test.

Every synthetic slice stores ``k * 100 + row * columns + column`` (k = the slice's
index along the normal as written), so a read volume shows at once whether
slices, rows and columns came out in the right order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, UID, generate_uid

from lungseg import dicomio
from lungseg.dicomio import (
    CTVolume,
    find_series,
    list_series,
    read_nifti_mask,
    read_series,
    write_nifti,
)
from lungseg.errors import DicomError

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
ROWS, COLUMNS = 8, 6  # not square, so a row/column mix-up shows
PIXEL_SPACING = (0.7, 0.6)  # (between rows = y, between columns = x)
ORIGIN = (-10.0, -20.0, 30.0)


# --------------------------------------------------------------------------- helpers


@dataclass
class Written:
    """What write_series wrote: files and ImagePositionPatient per slice index k."""

    folder: Path
    files: list[Path]
    positions: np.ndarray  # (n, 3) LPS
    series_uid: str
    normal: np.ndarray


def stored_values(k: int, rows: int = ROWS, columns: int = COLUMNS) -> np.ndarray:
    return k * 100 + np.arange(rows * columns).reshape(rows, columns)


def write_series(
    tmp_path: Path,
    n: int = 5,
    *,
    folder: str = "series",
    prefix: str = "im",
    shuffle: bool = False,
    suffix: str = ".dcm",
    offsets: list[float] | None = None,
    modality: str = "CT",
    series_uid: str | None = None,
    orientation: tuple[float, ...] = AXIAL,
    origin: tuple[float, float, float] = ORIGIN,
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    signed: bool = False,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    shift_per_slice: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Written:
    """Write an n-slice 8x6 series; slice k sits at ``origin + offsets[k] * normal``.

    ``offsets`` defaults to 2.5 mm steps; ``shuffle`` numbers the files in a
    random order; ``signed`` stores int16 (PixelRepresentation 1) values
    ``stored_values(k) - 500``; ``shift_per_slice`` shears the stack in-plane.
    """
    out = tmp_path / folder
    out.mkdir(parents=True, exist_ok=True)
    offsets = [2.5 * k for k in range(n)] if offsets is None else offsets
    series_uid = series_uid or generate_uid()
    study_uid = "1.2.826.0.1.3680043.8.498.1"
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    names = np.random.default_rng(0).permutation(n) if shuffle else np.arange(n)
    files, positions = [], []
    for k in range(n):
        position = np.array(origin) + offsets[k] * normal + k * np.array(shift_per_slice)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = transfer_syntax
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.PatientID = "SYNTH-0001"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = f"synthetic {modality}"
        ds.Modality = modality
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [round(v, 6) for v in orientation]
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.Rows, ds.Columns = ROWS, COLUMNS
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if signed else 0
        if slope is not None:
            ds.RescaleSlope = slope
        if intercept is not None:
            ds.RescaleIntercept = intercept
        values = stored_values(k) - 500 if signed else stored_values(k)
        if transfer_syntax.is_compressed:
            ds.PixelData = encapsulate([b"\x00\x01not a JPEG 2000 codestream" * 4])
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        else:
            ds.PixelData = values.astype(np.int16 if signed else np.uint16).tobytes()
        path = out / f"{prefix}{names[k]:03d}{suffix}"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        positions.append([float(v) for v in ds.ImagePositionPatient])
    return Written(out, files, np.array(positions), series_uid, normal)


def rewrite(path: Path, **changes) -> None:
    """Change top-level elements of one written file in place."""
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def assert_one_line_naming(excinfo: pytest.ExceptionInfo, name: str | Path) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(name) in message


def rotation(a: float, b: float, c: float) -> np.ndarray:
    """A proper rotation matrix from three angles (radians)."""
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rx = np.array([[1, 0, 0], [0, cc, -sc], [0, sc, cc]])
    return rz @ ry @ rx


OBLIQUE = tuple(np.concatenate([rotation(0.3, -0.4, 0.2)[:, 0], rotation(0.3, -0.4, 0.2)[:, 1]]).round(6))


# --------------------------------------------------------------------------- reading and sorting


def test_reads_shuffled_files_without_suffix_in_position_order(tmp_path):
    written = write_series(tmp_path, n=7, shuffle=True, suffix="")
    (written.folder / "notes.txt").write_text("not DICOM")
    (written.folder / ".hidden").write_bytes(b"\x00" * 200)

    volume = read_series(written.folder)

    assert volume.shape == (7, ROWS, COLUMNS)
    assert volume.hu.dtype == np.int16
    for k in range(7):
        np.testing.assert_array_equal(volume.hu[k], stored_values(k) - 1024)
    assert volume.files == tuple(str(p) for p in written.files)
    assert volume.series_uid == written.series_uid
    assert volume.patient_id == "SYNTH-0001"
    assert len(set(volume.sop_uids)) == 7
    assert volume.path == str(written.folder)


def test_hu_applies_slope_and_intercept_exactly(tmp_path):
    written = write_series(tmp_path, slope=2.0, intercept=-1024.0)
    volume = read_series(written.folder)
    for k in range(5):
        np.testing.assert_array_equal(volume.hu[k], 2 * stored_values(k) - 1024)


def test_fractional_slope_rounds_and_clips_into_int16(tmp_path):
    written = write_series(tmp_path, n=3, slope=0.5, intercept=40000.0)
    volume = read_series(written.folder)
    assert volume.hu.dtype == np.int16
    assert volume.hu.max() == np.iinfo(np.int16).max  # 40000 + ... is clipped
    written = write_series(tmp_path, n=3, folder="half", slope=0.5, intercept=-1024.0)
    volume = read_series(written.folder)
    np.testing.assert_array_equal(volume.hu[1], np.rint(stored_values(1) * 0.5) - 1024)


def test_signed_pixel_data_without_rescale(tmp_path):
    written = write_series(tmp_path, signed=True, slope=None, intercept=None)
    volume = read_series(written.folder)
    np.testing.assert_array_equal(volume.hu[2], stored_values(2) - 500)
    assert volume.hu.min() < 0


def test_raw_looking_data_without_intercept_is_logged(tmp_path, caplog):
    written = write_series(tmp_path, slope=None, intercept=None)
    with caplog.at_level(logging.WARNING, logger="lungseg.dicomio"):
        volume = read_series(written.folder)
    np.testing.assert_array_equal(volume.hu[0], stored_values(0))
    assert "may be raw" in caplog.text


def test_spacing_origin_and_direction(tmp_path):
    written = write_series(tmp_path, shuffle=True)
    volume = read_series(written.folder)
    assert volume.spacing == pytest.approx((2.5, 0.7, 0.6))
    assert volume.origin == pytest.approx(ORIGIN)
    np.testing.assert_allclose(volume.direction, np.eye(3)[:, [2, 1, 0]])  # columns: z, y, x
    np.testing.assert_allclose(volume.slice_positions, 30.0 + 2.5 * np.arange(5))


ROTATED_180 = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


@pytest.mark.parametrize("orientation", [AXIAL, OBLIQUE, ROTATED_180, SAGITTAL])
def test_affine_matches_every_slice_position_and_pixel(tmp_path, orientation):
    written = write_series(tmp_path, shuffle=True, orientation=orientation)
    volume = read_series(written.folder)
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    for k, position in enumerate(written.positions):
        np.testing.assert_allclose(volume.voxel_to_world([k, 0, 0]), position, atol=1e-3)
        j, i = 5, 3  # row 5, column 3 of slice k
        expected = position + j * PIXEL_SPACING[0] * col + i * PIXEL_SPACING[1] * row
        np.testing.assert_allclose(volume.voxel_to_world([k, j, i]), expected, atol=1e-3)
        homogeneous = volume.affine_lps() @ np.array([k, j, i, 1.0])
        np.testing.assert_allclose(homogeneous[:3], expected, atol=1e-3)
        assert volume.hu[k, j, i] == stored_values(k)[j, i] - 1024
    np.testing.assert_allclose(volume.direction.T @ volume.direction, np.eye(3), atol=1e-6)


def test_voxel_world_round_trip_on_random_points(tmp_path):
    volume = read_series(write_series(tmp_path, orientation=OBLIQUE).folder)
    rng = np.random.default_rng(1)
    voxels = rng.uniform(-2, 10, size=(50, 3))
    np.testing.assert_allclose(volume.world_to_voxel(volume.voxel_to_world(voxels)), voxels, atol=1e-9)
    points = rng.uniform(-300, 300, size=(4, 5, 3))  # any leading shape
    np.testing.assert_allclose(volume.voxel_to_world(volume.world_to_voxel(points)), points, atol=1e-9)


@pytest.mark.parametrize(
    "orientation, offsets",
    [
        (AXIAL, [0.0, -2.5, -5.0, -7.5, -10.0]),  # files numbered head to feet (descending z)
        ((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0), [0.0, 2.5, 5.0, 7.5, 10.0]),  # flipped rows: normal is -z
    ],
)
def test_descending_or_flipped_stacks_sort_along_the_normal(tmp_path, orientation, offsets):
    written = write_series(tmp_path, orientation=orientation, offsets=offsets)
    volume = read_series(written.folder)
    order = np.argsort(offsets)  # ascending position along the normal
    for z, k in enumerate(order):
        np.testing.assert_array_equal(volume.hu[z], stored_values(k) - 1024)
        np.testing.assert_allclose(volume.voxel_to_world([z, 0, 0]), written.positions[k], atol=1e-3)
    assert np.all(np.diff(volume.slice_positions) > 0)
    assert volume.spacing[0] == pytest.approx(2.5)
    np.testing.assert_allclose(volume.direction[:, 0], written.normal)


def test_small_position_jitter_is_tolerated(tmp_path):
    written = write_series(tmp_path, offsets=[0.0, 2.5, 5.004, 7.5, 10.0])
    assert read_series(written.folder).spacing[0] == pytest.approx(2.5)


# --------------------------------------------------------------------------- several series


@pytest.fixture
def mixed_folder(tmp_path):
    """One folder holding CT (5 slices), CT (3 slices) and MR (7 slices)."""
    ct5 = write_series(tmp_path, n=5, prefix="a", series_uid="1.2.3.5")
    ct3 = write_series(tmp_path, n=3, prefix="b", series_uid="1.2.3.3")
    mr7 = write_series(tmp_path, n=7, prefix="c", series_uid="1.2.3.7", modality="MR")
    return ct5.folder, ct5, ct3, mr7


def test_default_picks_the_ct_series_with_most_slices(mixed_folder, caplog):
    folder, ct5, ct3, mr7 = mixed_folder
    with caplog.at_level(logging.INFO, logger="lungseg.dicomio"):
        volume = read_series(folder)
    assert volume.series_uid == ct5.series_uid
    assert volume.shape[0] == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(ct5.series_uid in m and ct3.series_uid in m and mr7.series_uid in m for m in warnings)


def test_series_uid_picks_another_series(mixed_folder):
    folder, _, ct3, _ = mixed_folder
    volume = read_series(folder, series_uid=ct3.series_uid)
    assert volume.series_uid == ct3.series_uid
    assert volume.shape == (3, ROWS, COLUMNS)


def test_unknown_series_uid_lists_the_available(mixed_folder):
    folder, ct5, ct3, mr7 = mixed_folder
    with pytest.raises(DicomError, match="not found") as excinfo:
        read_series(folder, series_uid="9.9.9")
    assert_one_line_naming(excinfo, folder)
    for uid in (ct5.series_uid, ct3.series_uid, mr7.series_uid):
        assert uid in str(excinfo.value)


def test_requested_mr_series_is_refused(mixed_folder):
    folder, _, _, mr7 = mixed_folder
    with pytest.raises(DicomError, match="modality MR") as excinfo:
        read_series(folder, series_uid=mr7.series_uid)
    assert_one_line_naming(excinfo, folder)


def test_list_series_and_find_series(mixed_folder, tmp_path):
    folder, ct5, ct3, mr7 = mixed_folder
    (folder / "DICOMDIR").write_bytes(b"\x00" * 10)
    series = list_series(folder)
    assert [(s.series_uid, s.modality, s.n_files) for s in series] == [
        (mr7.series_uid, "MR", 7),
        (ct5.series_uid, "CT", 5),
        (ct3.series_uid, "CT", 3),
    ]
    assert set(series[1].files) == {str(p) for p in ct5.files}
    other = write_series(tmp_path / "patient" / "study", n=2, series_uid="1.2.3.2")
    found = find_series(tmp_path)
    assert {(s.folder, s.series_uid) for s in found} == {
        (str(folder), "1.2.3.5"), (str(folder), "1.2.3.3"), (str(folder), "1.2.3.7"),
        (str(other.folder), "1.2.3.2"),
    }


def test_patient_folder_with_one_series_below_is_read(tmp_path, caplog):
    written = write_series(tmp_path / "patient" / "study", n=4)
    (tmp_path / "patient" / "annotations.xml").write_text("<xml/>")
    with caplog.at_level(logging.INFO, logger="lungseg.dicomio"):
        volume = read_series(tmp_path / "patient")
    assert volume.shape[0] == 4
    assert volume.path == str(written.folder)
    assert str(written.folder) in caplog.text


def test_patient_folder_with_several_series_folders_is_refused(tmp_path):
    first = write_series(tmp_path / "patient" / "study", folder="s1", n=3)
    second = write_series(tmp_path / "patient" / "study", folder="s2", n=3)
    with pytest.raises(DicomError, match="pass the series folder or series_uid") as excinfo:
        read_series(tmp_path / "patient")
    assert_one_line_naming(excinfo, tmp_path / "patient")
    assert first.series_uid in str(excinfo.value) and second.series_uid in str(excinfo.value)
    assert read_series(tmp_path / "patient", series_uid=second.series_uid).series_uid == second.series_uid


# --------------------------------------------------------------------------- refusals


def test_folder_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DicomError, match="does not exist") as excinfo:
        read_series(missing)
    assert_one_line_naming(excinfo, missing)


def test_file_instead_of_folder(tmp_path):
    written = write_series(tmp_path, n=2)
    with pytest.raises(DicomError, match="not a folder") as excinfo:
        read_series(written.files[0])
    assert_one_line_naming(excinfo, written.files[0])


def test_empty_folder_and_folder_without_dicom(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DicomError, match="no DICOM files") as excinfo:
        read_series(empty)
    assert_one_line_naming(excinfo, empty)
    (empty / "readme.txt").write_text("hello")
    with pytest.raises(DicomError, match="no DICOM files"):
        read_series(empty)


def test_non_ct_modality(tmp_path):
    written = write_series(tmp_path, modality="MR")
    with pytest.raises(DicomError, match="modality MR, not CT") as excinfo:
        read_series(written.folder)
    assert_one_line_naming(excinfo, written.folder)


def test_duplicate_slice_position(tmp_path):
    written = write_series(tmp_path, offsets=[0.0, 2.5, 5.0, 5.0, 7.5])
    with pytest.raises(DicomError, match=r"duplicate slice position z=35\.000") as excinfo:
        read_series(written.folder)
    assert_one_line_naming(excinfo, written.folder)
    assert written.files[2].name in str(excinfo.value) and written.files[3].name in str(excinfo.value)


def test_missing_slice(tmp_path):
    written = write_series(tmp_path, offsets=[0.0, 2.5, 5.0, 10.0, 12.5])
    with pytest.raises(DicomError, match=r"missing slice\(s\) between z=35\.000 and z=40\.000") as excinfo:
        read_series(written.folder)
    assert_one_line_naming(excinfo, written.folder)


def test_uneven_spacing(tmp_path):
    written = write_series(tmp_path, offsets=[0.0, 2.5, 5.0, 7.8, 10.3])
    with pytest.raises(DicomError, match="uneven slice spacing") as excinfo:
        read_series(written.folder)
    assert_one_line_naming(excinfo, written.folder)
    # a looser tolerance accepts it
    assert read_series(written.folder, spacing_tolerance=0.2).shape[0] == 5


def test_sheared_stack_is_refused(tmp_path):
    written = write_series(tmp_path, shift_per_slice=(1.0, 0.0, 0.0))
    with pytest.raises(DicomError, match="gantry-tilted or sheared") as excinfo:
        read_series(written.folder)
    assert_one_line_naming(excinfo, written.folder)


def test_single_slice(tmp_path):
    written = write_series(tmp_path, n=1)
    with pytest.raises(DicomError, match="single slice") as excinfo:
        read_series(written.folder)
    assert_one_line_naming(excinfo, written.folder)


@pytest.mark.parametrize("size", [100, 400])
def test_truncated_header(tmp_path, size):
    written = write_series(tmp_path)
    broken = written.files[2]
    broken.write_bytes(broken.read_bytes()[:size])
    with pytest.raises(DicomError) as excinfo:
        read_series(written.folder)
    assert_one_line_naming(excinfo, broken)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")  # pydicom, on cut UIDs
def test_a_file_truncated_anywhere_is_never_silently_dropped(tmp_path):
    written = write_series(tmp_path)
    last = written.files[-1]  # the end slice: no gap would reveal its loss
    data = last.read_bytes()
    for size in range(0, len(data), 11):
        last.write_bytes(data[:size])
        with pytest.raises(DicomError) as excinfo:
            read_series(written.folder)
        assert_one_line_naming(excinfo, last)


def test_non_image_objects_beside_the_slices_are_skipped(tmp_path):
    written = write_series(tmp_path)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report = Dataset()
    report.file_meta = meta
    report.SOPClassUID = meta.MediaStorageSOPClassUID
    report.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    report.SeriesInstanceUID = generate_uid()
    report.Modality = "SR"
    report.save_as(written.folder / "report.dcm", enforce_file_format=True)
    assert {s.modality for s in list_series(written.folder)} == {"CT", "SR"}
    assert read_series(written.folder).series_uid == written.series_uid


def test_truncated_pixel_data(tmp_path):
    written = write_series(tmp_path)
    broken = written.files[3]
    broken.write_bytes(broken.read_bytes()[:-20])
    with pytest.raises(DicomError, match="corrupt pixel data") as excinfo:
        read_series(written.folder)
    assert_one_line_naming(excinfo, broken)


def test_inconsistent_rows_columns(tmp_path):
    written = write_series(tmp_path)
    rewrite(written.files[1], Rows=4, PixelData=np.zeros((4, COLUMNS), np.uint16).tobytes())
    with pytest.raises(DicomError, match="inconsistent Rows/Columns") as excinfo:
        read_series(written.folder)
    assert_one_line_naming(excinfo, written.folder)
    assert written.files[1].name in str(excinfo.value)


def test_inconsistent_orientation_and_pixel_spacing(tmp_path):
    written = write_series(tmp_path)
    rewrite(written.files[1], PixelSpacing=[0.8, 0.6])
    with pytest.raises(DicomError, match="inconsistent PixelSpacing"):
        read_series(written.folder)
    rewrite(written.files[1], PixelSpacing=list(PIXEL_SPACING), ImageOrientationPatient=list(OBLIQUE))
    with pytest.raises(DicomError, match="inconsistent ImageOrientationPatient") as excinfo:
        read_series(written.folder)
    assert_one_line_naming(excinfo, written.folder)


def test_rescale_type_other_than_hu(tmp_path):
    written = write_series(tmp_path)
    rewrite(written.files[0], RescaleType="US")
    with pytest.raises(DicomError, match="RescaleType is 'US'") as excinfo:
        read_series(written.folder)
    assert_one_line_naming(excinfo, written.files[0])


def test_compressed_pixel_data_that_cannot_be_decoded(tmp_path):
    written = write_series(tmp_path, transfer_syntax=JPEG2000Lossless)
    with pytest.raises(DicomError, match="JPEG 2000") as excinfo:
        read_series(written.folder)
    assert_one_line_naming(excinfo, written.files[0])
    assert "pip install python-gdcm" in str(excinfo.value)


def test_compressed_pixel_data_without_a_decoder(tmp_path, monkeypatch):
    class NoDecoder:
        is_available = False

    monkeypatch.setattr(dicomio, "get_decoder", lambda syntax: NoDecoder())
    written = write_series(tmp_path, transfer_syntax=JPEG2000Lossless)
    with pytest.raises(DicomError, match="no decoder for it is installed") as excinfo:
        read_series(written.folder)
    assert_one_line_naming(excinfo, written.files[0])
    assert "JPEG 2000" in str(excinfo.value) and "1.2.840.10008.1.2.4.90" in str(excinfo.value)


# --------------------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("orientation", [AXIAL, OBLIQUE])
def test_write_nifti_round_trip(tmp_path, orientation):
    volume = read_series(write_series(tmp_path, orientation=orientation).folder)
    rng = np.random.default_rng(2)
    mask = rng.integers(0, 3, size=volume.shape).astype(np.uint8)
    path = tmp_path / "mask.nii.gz"
    write_nifti(mask, volume, path)

    array, affine_ras = read_nifti_mask(path)
    np.testing.assert_array_equal(array, mask)
    assert array.dtype == np.uint8
    image = nib.load(path)
    assert image.shape == volume.shape[::-1]  # stored (x, y, z)
    assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
    np.testing.assert_allclose(image.get_qform(), affine_ras, atol=1e-4)

    zyx = rng.integers(0, volume.shape, size=(20, 3))
    lps = volume.voxel_to_world(zyx)
    xyz1 = np.column_stack([zyx[:, ::-1], np.ones(len(zyx))])
    ras = (affine_ras @ xyz1.T).T[:, :3]
    np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-4)


def test_write_nifti_refuses_a_mismatched_array(tmp_path):
    volume = read_series(write_series(tmp_path).folder)
    with pytest.raises(ValueError, match="does not match"):
        write_nifti(np.zeros((2, 2, 2)), volume, tmp_path / "bad.nii")


# --------------------------------------------------------------------------- real scan


def test_reads_lidc_idri_0001(shared_data):
    patient = shared_data / "lidc" / "LIDC-IDRI-0001"
    if not patient.is_dir():
        pytest.skip(f"{patient} not found")
    volume = read_series(patient)  # patient folder: exercises the single-series search
    assert isinstance(volume, CTVolume)
    assert volume.shape == (133, 512, 512)
    assert volume.spacing == pytest.approx((2.5, 0.703125, 0.703125))
    assert volume.hu.dtype == np.int16
    assert volume.series_uid == Path(volume.path).name == Path(volume.files[0]).parent.name
    air = np.median(volume.hu[66, 250:260, 10:20])  # left of the body, inside the field of view
    assert -1100 < air < -900
    assert np.all(np.diff(volume.slice_positions) > 0)


@pytest.mark.slow
def test_reads_the_jpeg_lossless_ricord_series(shared_data):
    folder = shared_data / "ct" / "MIDRC-RICORD-1A-419639-000082"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    volume = read_series(folder)          # JPEG Lossless, process 14: decoded by GDCM (python-gdcm)
    assert volume.shape == (255, 512, 512)
    assert volume.spacing == pytest.approx((1.25, 0.703125, 0.703125))
    lung = volume.hu[128, 200:300, 100:180]          # right lung, mid-scan
    assert -1000 < np.median(lung) < -500 and volume.hu.max() > 500      # lung and bone in HU
    assert np.all(np.diff(volume.slice_positions) > 0)


def test_slice_z_world_is_each_slices_world_z(tmp_path):
    volume = read_series(write_series(tmp_path).folder)
    z = volume.slice_z_world()
    assert z.shape == (volume.shape[0],)
    np.testing.assert_allclose(z, [volume.voxel_to_world([k, 5, 7])[2] for k in range(volume.shape[0])])
    np.testing.assert_allclose(np.diff(z), volume.spacing[0])


# --------------------------------------------------------------------------
# What lungseg supports as a chest CT (check_chest_ct)
# --------------------------------------------------------------------------

def _chest(**changes) -> CTVolume:
    from dataclasses import replace

    from conftest import tiny_luna_volume

    return replace(tiny_luna_volume(), **changes)


@pytest.mark.parametrize("changes, problem", [
    ({"hu": None, "n": 2}, "2 slices of 2.5 mm"),
    ({"spacing": (50.0, 1.5, 1.5)}, "slices 50 mm apart"),
    ({"spacing": (2.5, 1e-9, 1e-9)}, "pixels of 1e-09 x 1e-09 mm"),
    ({"offset": 1024}, "do not look like chest CT Hounsfield units"),      # stored values, no rescale
    ({"scale": 0.5}, "do not look like chest CT Hounsfield units"),        # halved HU
])
def test_what_is_not_a_supported_chest_ct_is_refused_in_one_line(changes, problem):
    volume = _chest()
    if "n" in changes:
        volume = _chest(hu=volume.hu[:changes["n"]], slice_positions=volume.slice_positions[:changes["n"]])
    elif "spacing" in changes:
        volume = _chest(spacing=changes["spacing"])
    elif "offset" in changes:
        volume = _chest(hu=(volume.hu + changes["offset"]).astype(np.int16))
    else:
        volume = _chest(hu=(volume.hu * changes["scale"]).astype(np.int16))
    with pytest.raises(DicomError, match=problem) as info:
        dicomio.check_chest_ct(volume, min_extent_mm=48)
    assert "\n" not in str(info.value)


def test_a_chest_ct_passes_and_a_short_one_does_not():
    dicomio.check_chest_ct(_chest(), min_extent_mm=48)                          # 24 slices of 2.5 mm
    with pytest.raises(DicomError, match="spanning 100 mm"):
        dicomio.check_chest_ct(_chest(), min_extent_mm=100)


def test_real_scans_are_supported_chest_ct(shared_data):
    folders = [shared_data / "lidc" / "LIDC-IDRI-0001", shared_data / "ct" / "Lung_Dx-A0002"]
    if not all(f.is_dir() for f in folders):
        pytest.skip("real scans not found")
    for folder in folders:
        dicomio.check_chest_ct(read_series(folder), min_extent_mm=48)


def test_nifti_with_nan_voxels_is_refused(tmp_path):
    volume = _chest()
    data = volume.hu.astype(np.float32)
    data[3, 10, 10] = np.nan
    path = tmp_path / "nan.nii.gz"
    write_nifti(data, volume, path, dtype=np.float32)
    with pytest.raises(DicomError, match="1 voxels are not finite"):
        dicomio.read_nifti_volume(path)


# --------------------------------------------------------------------------
# Orientation: any permutation or flip of axial is read in the axial frame
# --------------------------------------------------------------------------

def test_an_axial_volume_is_left_as_it_is():
    volume = _chest()
    axial, ro = dicomio.reorient_to_axial(volume)
    assert ro.identity and axial is volume


def test_a_coronal_reformat_is_reoriented_exactly_and_maps_back():
    from conftest import coronal_of

    volume = _chest()
    coronal = coronal_of(volume)
    axial, ro = dicomio.reorient_to_axial(coronal)
    assert not ro.identity and ro.perm == (1, 0, 2) and ro.flip == (True, False, False)
    np.testing.assert_array_equal(axial.hu, volume.hu)
    assert axial.spacing == pytest.approx(volume.spacing)
    np.testing.assert_allclose(axial.origin, volume.origin, atol=1e-9)
    np.testing.assert_allclose(axial.direction, volume.direction, atol=1e-12)
    np.testing.assert_array_equal(ro.to_source(axial.hu), coronal.hu)
    for index in ([0, 0, 0], [3.5, 10, 7], [95, 23, 95]):
        back = ro.index_to_axial(index)
        np.testing.assert_allclose(ro.index_to_source(back), index)
        np.testing.assert_allclose(axial.voxel_to_world(back), coronal.voxel_to_world(index), atol=1e-9)


def test_a_nifti_with_permuted_axes_reads_in_the_axial_frame(tmp_path):
    from conftest import coronal_of

    volume = _chest()
    coronal = coronal_of(volume)
    path = tmp_path / "coronal.nii.gz"
    write_nifti(coronal.hu, coronal, path, dtype=np.int16)
    axial, _ = dicomio.reorient_to_axial(dicomio.read_nifti_volume(path))
    np.testing.assert_array_equal(axial.hu, volume.hu)


def test_an_oblique_volume_is_refused_in_one_line():
    from dataclasses import replace

    volume = _chest()
    tilted = replace(volume, direction=rotation(0.0, 0.0, np.radians(45)) @ volume.direction)
    with pytest.raises(DicomError, match="oblique orientation .* resample it to an axial") as info:
        dicomio.reorient_to_axial(tilted)
    assert "\n" not in str(info.value)
    slight = replace(volume, direction=rotation(0.0, 0.0, np.radians(5)) @ volume.direction)
    assert dicomio.reorient_to_axial(slight)[1].identity                   # a small tilt is read as it is


# --------------------------------------------------------------------------
# Compressed transfer syntaxes, through pydicom's decoders (GDCM, a dependency)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("syntax", ["JPEGLosslessProcess14_1", "JPEGLSLossless", "JPEG2000Lossless", "RLELossless"])
def test_a_compressed_series_reads_exactly_as_the_uncompressed_one(tmp_path, syntax):
    import gdcm

    volume = _chest()
    files = dicomio.write_series(tmp_path / "plain", volume.hu, spacing=volume.spacing, origin=volume.origin,
                                 patient_id="P", study_uid=generate_uid(), series_uid=generate_uid())
    (tmp_path / "packed").mkdir()
    for f in files:
        reader = gdcm.ImageReader()
        reader.SetFileName(str(f))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(tmp_path / "packed" / f.name))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
    packed = read_series(tmp_path / "packed")
    assert pydicom.dcmread(packed.files[0]).file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(packed.hu, read_series(tmp_path / "plain").hu)
    np.testing.assert_array_equal(packed.hu, np.maximum(volume.hu, -1024))       # unsigned storage from -1024


@pytest.mark.parametrize("tag", [b"\x08\x00\x18\x00", b"\x02\x00\x02\x00"])        # SOPInstanceUID, in the meta
def test_a_garbled_value_representation_anywhere_in_a_header_is_one_line(tmp_path, tag):
    """Found by the fuzz target: pydicom decodes values lazily, so a garbled one must fail while reading."""
    written = write_series(tmp_path, n=3)
    data = written.files[1].read_bytes()
    assert data.count(tag + b"UI") == 1
    written.files[1].write_bytes(data.replace(tag + b"UI", tag + b"U~"))
    with pytest.raises(DicomError) as excinfo:
        read_series(written.folder)
    assert_one_line_naming(excinfo, written.files[1])
    assert "Traceback" not in str(excinfo.value)
