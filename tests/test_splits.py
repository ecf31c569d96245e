"""splits.py: split files, seeded patient splits and folds, the default split file."""

import numpy as np
import pytest

from lungseg import splits
from lungseg.errors import SplitError


def test_patient_split_is_seeded_and_disjoint():
    patients = [f"P{i:03d}" for i in range(200)]
    a = splits.patient_split(patients, seed=3)
    assert a == splits.patient_split(list(reversed(patients)), seed=3)
    assert a != splits.patient_split(patients, seed=4)
    counts = {s: list(a.values()).count(s) for s in ("train", "val", "test")}
    assert counts == {"train": 170, "val": 10, "test": 20}
    with pytest.raises(SplitError, match="fractions"):
        splits.patient_split(patients, fractions=(0.5, 0.5, 0.5))


def test_patient_folds_keep_patients_together_and_balance():
    rng = np.random.default_rng(1)
    patients = [f"P{i}" for i in range(60) for _ in range(int(rng.integers(1, 4)))]
    labelled = rng.random(len(patients)) < 0.6
    folds = splits.patient_folds(patients, labelled, k=5, seed=0)
    assert set(folds) == set(patients) and set(folds.values()) == set(range(5))
    per_fold = np.bincount([folds[p] for p, lab in zip(patients, labelled) if lab], minlength=5)
    assert per_fold.max() - per_fold.min() <= 3
    assert folds == splits.patient_folds(patients, labelled, k=5, seed=0)
    assert folds != splits.patient_folds(patients, labelled, k=5, seed=1)
    split = splits.fold_split(folds, 2)
    assert {p for p, s in split.items() if s == "test"} == {p for p, f in folds.items() if f == 2}
    assert set(splits.fold_split(folds, None).values()) == {"train"}
    with pytest.raises(SplitError, match="cannot fill 5 folds"):
        splits.patient_folds(["a", "b"], [True, True], k=5)


def test_split_files_round_trip_and_bad_files_are_refused(tmp_path):
    path = tmp_path / "s.csv"
    splits.write_split(path, {"A": "train", "B": "val", "C": "test"})
    assert splits.read_split(path) == {"A": "train", "B": "val", "C": "test"}
    with pytest.raises(SplitError, match="no such split file"):
        splits.read_split(tmp_path / "none.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,split\nA,holdout\n")
    with pytest.raises(SplitError, match="unknown split name"):
        splits.read_split(bad)
    bad.write_text("id,fold\nA,1\n")
    with pytest.raises(SplitError, match="columns patient_id,split"):
        splits.read_split(bad)


def test_default_split_file_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert splits.DEFAULT_SPLIT_FILE.is_absolute() and splits.DEFAULT_SPLIT_FILE.is_file()
    assert len(splits.read_split(splits.DEFAULT_SPLIT_FILE)) > 800


def test_fold_files_name_every_fold_and_the_final_split(tmp_path):
    files = splits.fold_files(tmp_path, "nodules", 3, 7)
    assert sorted(p.name for p in files.values()) == sorted(
        ["nodules_folds3_seed7.csv", "nodules_folds3_seed7_all.csv"] +
        [f"nodules_folds3_seed7_fold{i}.csv" for i in range(3)])


def test_patient_ids_that_differ_only_in_case_are_refused(tmp_path):
    path = tmp_path / "split.csv"
    path.write_text("patient_id,split\nLIDC-IDRI-0001,train\nlidc-idri-0001,test\n")
    with pytest.raises(SplitError, match="'LIDC-IDRI-0001' and 'lidc-idri-0001' differ only in case"):
        splits.read_split(path)
    with pytest.raises(SplitError, match="differ only in case"):
        splits.patient_split(["P-1", "p-1", "P-2"])
    with pytest.raises(SplitError, match="differ only in case"):
        splits.patient_folds(["P-1", "p-1", "P-2"], [True, True, False], k=2)


def test_a_split_file_whose_ids_match_the_cache_only_without_case_says_so(tmp_path):
    from lungseg import cache

    path = tmp_path / "c.h5"
    w = cache.CacheWriter(path, {})
    for uid, patient in (("1", "LIDC-IDRI-0001"), ("2", "LIDC-IDRI-0002")):
        w.add(cache.ScanRecordData(uid, {"patient_id": patient, "n_nodules": 0},
                                   {"nodules/label": np.zeros(0, np.int8), "rois/image": np.zeros((0, 2, 2, 2))}))
    split = {"lidc-idri-0001": "train", "LIDC-IDRI-0002": "test"}
    with cache.Cache(path) as c, pytest.raises(SplitError, match="'LIDC-IDRI-0001' is 'lidc-idri-0001'"):
        splits.split_scans(c, split, "train")
    with cache.Cache(path) as c:
        assert splits.split_scans(c, {"LIDC-IDRI-0001": "train"}, "train") == ["1"]
