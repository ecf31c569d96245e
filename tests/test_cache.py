"""cache.py: atomic per-scan writes, resume, versioning, and survival of a kill at any moment."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from lungseg import cache
from lungseg.errors import CacheError


def record(uid: str, n_nodules: int = 1, size: int = 8) -> cache.ScanRecordData:
    rng = np.random.default_rng(abs(hash(uid)) % 2**32)
    return cache.ScanRecordData(
        series_uid=uid,
        attrs={"patient_id": f"P-{uid}", "n_nodules": n_nodules, "lung_volume_ml": 4000.0,
               "original_shape": np.array([10, 20, 20]), "original_spacing": np.array([2.5, 0.7, 0.7])},
        arrays={
            "subcases/image": rng.random((2, size, size, size)).astype(np.float16),
            "subcases/mask": np.zeros((2, size, size, size), np.uint8),
            "nodules/label": np.ones(n_nodules, np.int8),
            "rois/image": np.zeros((n_nodules, 4, 4, 4), np.float16),
        },
    )


def test_write_then_read_round_trip(tmp_path):
    path = tmp_path / "c.h5"
    w = cache.CacheWriter(path, {"spacing": [3, 1.5, 1.5]})
    assert w.done() == set()
    recs = [record("1.2.3"), record("1.2.4", n_nodules=3)]
    for r in recs:
        w.add(r)
    with cache.Cache(path) as c:
        assert c.series_uids == ["1.2.3", "1.2.4"]
        assert c.config == {"spacing": [3, 1.5, 1.5]}
        g = c.scan("1.2.4")
        assert g.attrs["patient_id"] == "P-1.2.4"
        np.testing.assert_array_equal(g["subcases/image"][()], recs[1].arrays["subcases/image"])
        assert c.nodule_table("1.2.4")["label"].tolist() == [1, 1, 1]
        with pytest.raises(CacheError, match="no scan"):
            c.scan("9.9")
    # No temporary files are left behind.
    assert sorted(p.name for p in cache.scans_dir(path).iterdir()) == ["1.2.3.h5", "1.2.4.h5"]


def test_reopening_resumes_and_refuses_other_settings(tmp_path):
    path = tmp_path / "c.h5"
    cache.CacheWriter(path, {"a": 1}).add(record("1"))
    assert cache.CacheWriter(path, {"a": 1}).done() == {"1"}
    with pytest.raises(CacheError, match="other preprocessing settings"):
        cache.CacheWriter(path, {"a": 2})


def test_schema_version_and_non_cache_files_are_refused(tmp_path):
    path = tmp_path / "c.h5"
    cache.CacheWriter(path, {}).add(record("1"))
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(CacheError, match="schema version 99"):
        cache.Cache(path)
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(CacheError, match="not a readable HDF5"):
        cache.Cache(text)
    plain = tmp_path / "plain.h5"
    h5py.File(plain, "w").close()
    with pytest.raises(CacheError, match="not a lungseg cache"):
        cache.Cache(plain)
    with pytest.raises(CacheError, match="no such cache"):
        cache.Cache(tmp_path / "missing.h5")


def test_cache_pickles_without_its_handle(tmp_path):
    import pickle

    path = tmp_path / "c.h5"
    cache.CacheWriter(path, {}).add(record("1"))
    c = cache.Cache(path)
    c.scan("1")
    clone = pickle.loads(pickle.dumps(c))       # what a DataLoader worker receives
    assert clone._file is None and clone.scan("1").attrs["n_nodules"] == 1


def test_a_renamed_cache_reads_and_a_damaged_one_says_what_to_do(tmp_path):
    import shutil

    import h5py

    path = tmp_path / "c.h5"
    w = cache.CacheWriter(path, {})
    for uid in ("1", "2", "3"):
        w.add(record(uid))
    moved = tmp_path / "moved" / "renamed.h5"
    moved.parent.mkdir()
    shutil.copy(path, moved)
    shutil.copytree(cache.scans_dir(path), cache.scans_dir(moved))
    with cache.Cache(moved) as c:
        assert [c.scan(u).attrs["n_nodules"] for u in c.series_uids] == [1, 1, 1]
    alone = tmp_path / "alone.h5"
    shutil.copy(path, alone)                                    # copied without its .scans folder
    with pytest.raises(CacheError, match=r"alone.h5.scans/1.h5: missing; .* copy or move both"):
        cache.Cache(alone).scan("1")
    part = cache.scans_dir(moved)
    (part / "2.h5").write_bytes((part / "2.h5").read_bytes()[:2000])                 # truncated
    with h5py.File(part / "3.h5", "a") as f:
        del f["rois"]                                                               # not what lungseg writes
    c = cache.Cache(moved)
    with pytest.raises(CacheError, match=r"2.h5: cannot be read \(truncated or corrupt\); delete it and run"):
        c.scan("2")
    with pytest.raises(CacheError, match=r"3.h5: no rois/ group"):
        c.scan("3")


@pytest.mark.parametrize("diameter, category", [(3, 0), (5, 0), (5.01, 1), (10, 1), (29.9, 2), (30, 2), (31, 3)])
def test_size_categories_follow_paper_a(diameter, category):
    assert cache.size_category(diameter) == category


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from lungseg import cache
    w = cache.CacheWriter(sys.argv[1], {"k": 1})
    done = w.done()
    print("ready", flush=True)
    for i in range(40):
        uid = f"1.{i}"
        if uid in done:
            continue
        rng = np.random.default_rng(i)
        w.add(cache.ScanRecordData(uid, {"n_nodules": 0},
              {"subcases/image": rng.random((3, 32, 64, 64)).astype(np.float16),
               "nodules/label": np.zeros(0, np.int8), "rois/image": np.zeros((0, 4, 4, 4), np.float16)}))
""")


@pytest.mark.slow
def test_a_kill_at_any_moment_leaves_a_readable_cache_and_a_rerun_completes(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    path = tmp_path / "c.h5"
    rng = np.random.default_rng(0)
    counts = []
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with cache.Cache(path) as c:                    # always readable
            for uid in c.series_uids:                   # and every listed scan is complete
                assert c.scan(uid)["subcases/image"].shape == (3, 32, 64, 64)
            counts.append(len(c))
    print("scans after each kill:", counts)
    assert counts == sorted(counts)                     # nothing finished is ever lost
    subprocess.run([sys.executable, str(script), str(path)], check=True, capture_output=True)
    with cache.Cache(path) as c:
        assert len(c) == 40
        for i in (0, 17, 39):
            expected = np.random.default_rng(i).random((3, 32, 64, 64)).astype(np.float16)
            np.testing.assert_array_equal(c.scan(f"1.{i}")["subcases/image"][()], expected)
    assert not [p for p in os.listdir(cache.scans_dir(path)) if p.endswith(".tmp")]


def test_size_category_of_numbers_and_arrays():
    d = [0.0, 3.0, 5.0, 5.01, 10.0, 10.5, 30.0, 30.1, 120.0]
    idx = cache.size_category(d)
    assert idx.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert idx.tolist() == [cache.size_category(x) for x in d]
    assert isinstance(cache.size_category(5.0), int)
    assert tuple(name for _, name in cache.SIZE_CATEGORIES) == ("micro", "small", "nodule", "mass")
    for bad in ([float("nan")], [-1.0], [float("inf")]):
        with pytest.raises(ValueError):
            cache.size_category(bad)


def test_nodule_features_of_a_ball():
    from lungseg.cache import CALCIFIED_HU, FEATURES, equivalent_diameter_mm, nodule_features

    spacing = (1.0, 0.5, 0.5)
    z, y, x = np.indices((30, 60, 60)).astype(float)
    r = np.sqrt(((z - 15) * 1.0) ** 2 + ((y - 30) * 0.5) ** 2 + ((x - 30) * 0.5) ** 2)
    mask = r <= 8.0
    hu = np.where(r <= 3.0, CALCIFIED_HU + 100, 0.0)           # a calcified core in soft tissue
    f = dict(zip(FEATURES, nodule_features(hu, mask, spacing)))
    assert f["volume_mm3"] == pytest.approx(4 / 3 * np.pi * 8 ** 3, rel=0.03)
    assert f["diameter_mm"] == pytest.approx(equivalent_diameter_mm(f["volume_mm3"]))
    assert f["calcified_fraction"] == pytest.approx((3 / 8) ** 3, rel=0.15)
    assert f["p90_hu"] == 0.0 and f["mean_hu"] > 0 and f["std_hu"] > 0
    # Voxel faces overstate a sphere's surface (3/r for a sphere); a larger ball has less surface per volume.
    assert 3 / 8 < f["surface_to_volume"] < 2 * 3 / 8
    small = dict(zip(FEATURES, nodule_features(hu, r <= 4.0, spacing)))
    assert small["surface_to_volume"] > f["surface_to_volume"]
    assert np.isnan(nodule_features(hu, np.zeros_like(mask), spacing)).all()


def test_a_full_disk_is_refused_before_writing_a_scan(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    path = tmp_path / "c.h5"
    w = cache.CacheWriter(path, {})
    w.add(record("1"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(CacheError, match=r"MB free, scan 2 needs up to .* \(finished scans are kept\)"):
        w.add(record("2"))
    assert sorted(p.name for p in cache.scans_dir(path).iterdir()) == ["1.h5"]     # nothing half written
    with cache.Cache(path) as c:
        assert c.series_uids == ["1"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_a_large_cache_keeps_few_files_open(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(cache, "_OPEN_SCANS", 4)
    path = tmp_path / "c.h5"
    w = cache.CacheWriter(path, {})
    for i in range(12):
        w.add(record(str(i)))
    before = len(os.listdir("/proc/self/fd"))
    with cache.Cache(path) as c:
        held = c.scan("0")                                  # a group still in use stays readable
        for uid in c.series_uids:
            assert c.scan(uid).attrs["n_nodules"] == 1
        assert len(os.listdir("/proc/self/fd")) - before <= 4 + 2
        assert held["nodules/label"].shape == (1,)


def test_candidate_rois_are_cut_from_the_volume_as_version_2_stored_them(tmp_path):
    from lungseg.preprocess import crop

    rng = np.random.default_rng(0)
    image = rng.random((12, 20, 20)).astype(np.float16)
    mask = (rng.random((12, 20, 20)) > 0.7).astype(np.uint8)
    starts = np.array([[0, 0, 0], [-2, 5, 14], [8, 17, -3], [4, 4, 4]] * 3, np.int32)   # some run past the edges
    roi = (4, 6, 6)
    base = record("1.1", n_nodules=0)
    base.arrays["rois/image"] = np.zeros((0, *roi), np.float16)
    cut = {"image": np.stack([crop(image, s, roi) for s in starts]),
           "mask": np.stack([crop(mask, s, roi) for s in starts])}
    v3 = {**base.arrays, "candidates/start": starts, "candidates/label": np.zeros(len(starts), np.int8),
          "volume/image": image, "volume/mask": mask}
    v2 = {**base.arrays, "candidates/start": starts, "candidates/label": np.zeros(len(starts), np.int8),
          "candidates/image": cut["image"], "candidates/mask": cut["mask"]}
    path = tmp_path / "c.h5"
    w = cache.CacheWriter(path, {})
    w.add(cache.ScanRecordData("3", base.attrs, v3))
    w.add(cache.ScanRecordData("2", base.attrs, v2))
    with cache.Cache(path) as c:
        for uid in ("3", "2"):
            images, masks = c.candidate_rois(uid, masks=True)
            np.testing.assert_array_equal(images, cut["image"])
            np.testing.assert_array_equal(masks, cut["mask"])
            np.testing.assert_array_equal(c.candidate_rois(uid, 1), cut["image"][1])       # one, read alone
            at = np.array([5, 2])
            np.testing.assert_array_equal(c.candidate_rois(uid, at), cut["image"][at])
            assert c.candidate_rois(uid, np.zeros(0, int)).shape == (0, *roi)
    assert cut["image"][1][:2].max() == 0      # before slice 0: zero, the window's -1000 HU
