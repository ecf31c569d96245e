"""Patient-level splits and folds: the one home of who trains and who tests.

Nodules of one patient are correlated, so every split in lungseg is by
patient, seeded, and written to a CSV file that anyone can reuse:

- a split file has the columns ``patient_id,split`` with split one of
  :data:`SPLITS`; :func:`read_split` reads one and :func:`split_scans` picks
  the scans of a cache that belong to one split;
- :func:`patient_split` draws a train/val/test split (paper A's shares by
  default), :func:`patient_folds` a k-fold assignment balanced by labelled
  nodules, :func:`fold_split` the split file of one fold, and
  :func:`write_folds` writes all of a cache's fold files;
- :data:`DEFAULT_SPLIT_FILE` is the committed LIDC-IDRI split, found beside
  the package (``data_manifests/``) whatever the working directory.

Torch-free (and numpy only when drawing): the command line reads its defaults
here at once.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Sequence

from .errors import SplitError
from .files import replacing

SPLITS = ("train", "val", "test")

#: ``data_manifests/`` of the repository lungseg is installed from.
MANIFESTS_DIR = Path(__file__).resolve().parent.parent / "data_manifests"
#: The committed seeded patient-level split of LIDC-IDRI (``lungseg manifest``).
DEFAULT_SPLIT_FILE = MANIFESTS_DIR / "lidc_split_seed0.csv"
#: Paper A's shares: 85 % training, the other 15 % validation and test.
DEFAULT_FRACTIONS = (0.85, 0.05, 0.10)


def write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Write dict rows as CSV (header from the first row), atomically."""
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def read_split(path: str | os.PathLike) -> dict[str, str]:
    """``patient_id -> split`` from a split CSV."""
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"{path}: no such split file (write one with `lungseg manifest` or `lungseg folds`)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"patient_id", "split"} <= set(rows[0]):
        raise SplitError(f"{path}: a split file needs the columns patient_id,split")
    bad = {r["split"] for r in rows} - set(SPLITS)
    if bad:
        raise SplitError(f"{path}: unknown split name(s) {sorted(bad)}; use {', '.join(SPLITS)}")
    split = {r["patient_id"]: r["split"] for r in rows}
    check_patient_ids(split, str(path))
    return split


def check_patient_ids(patients, where: str) -> None:
    """Refuse patient ids that differ only in case (one patient, or two? a split must not guess)."""
    by_folded: dict[str, str] = {}
    for p in patients:
        other = by_folded.setdefault(str(p).casefold(), str(p))
        if other != str(p):
            raise SplitError(f"{where}: patient ids {other!r} and {p!r} differ only in case; make them one id, "
                             "or two that differ otherwise")


def write_split(path: str | os.PathLike, split: dict[str, str]) -> None:
    """Write ``patient_id -> split`` as a split file."""
    write_csv(path, [{"patient_id": p, "split": s} for p, s in split.items()])


def split_scans(cache, split: dict[str, str], name: str) -> list[str]:
    """Series UIDs of a :class:`lungseg.cache.Cache` whose patient is in split ``name``."""
    if name not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
    patients = {uid: str(cache.scan(uid).attrs["patient_id"]) for uid in cache.series_uids}
    check_patient_ids(set(patients.values()), str(cache.path))
    folded = {p.casefold(): p for p in split}
    for p in set(patients.values()) - set(split):
        if p.casefold() in folded:
            raise SplitError(f"{cache.path}: patient {p!r} is {folded[p.casefold()]!r} in the split file; patient "
                             "ids must match exactly (case too)")
    return [uid for uid, p in patients.items() if split.get(p) == name]


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Three non-negative train/val/test shares summing to 1, else :class:`SplitError`."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise SplitError(f"fractions must be three non-negative shares summing to 1, got {tuple(fractions)}")
    return tuple(float(f) for f in fractions)


def patient_split(patients: Sequence[str], *, seed: int = 0,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[str, str]:
    """Assign each patient to 'train', 'val' or 'test' (seeded; a patient is on one side only)."""
    import numpy as np

    fractions = check_fractions(fractions)
    check_patient_ids(set(patients), "patient_split")
    unique = sorted(set(patients))
    order = np.random.default_rng(seed).permutation(len(unique))
    n_train = int(round(fractions[0] * len(unique)))
    n_val = int(round(fractions[1] * len(unique)))
    names = ["train"] * n_train + ["val"] * n_val + ["test"] * (len(unique) - n_train - n_val)
    return {unique[i]: names[rank] for rank, i in enumerate(order)}


def patient_folds(patients: Sequence[str], labelled: Sequence[bool], *, k: int = 5, seed: int = 0) -> dict[str, int]:
    """Assign each patient to one of ``k`` folds, seeded, balancing labelled nodules per fold.

    ``patients`` and ``labelled`` have one entry per nodule. Patients are taken
    in a seeded random order, most labelled nodules first, each into the fold
    that has the fewest labelled nodules so far (ties: fewest nodules, then
    lowest fold); patients with unlabelled nodules only go where there are
    fewest nodules. All nodules of a patient share a fold.
    """
    import numpy as np

    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    check_patient_ids(set(patients), "patient_folds")
    unique = sorted(set(patients))
    if len(unique) < k:
        raise SplitError(f"{len(unique)} patients cannot fill {k} folds")
    n_lab = {p: 0 for p in unique}
    n_all = {p: 0 for p in unique}
    for p, lab in zip(patients, labelled):
        n_lab[p] += bool(lab)
        n_all[p] += 1
    shuffled = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    order = sorted(shuffled, key=lambda p: (-n_lab[p], -n_all[p]))   # stable: seeded order breaks ties
    load_lab, load_all = [0] * k, [0] * k
    folds = {}
    for p in order:
        if n_lab[p]:
            f = min(range(k), key=lambda i: (load_lab[i], load_all[i], i))
        else:   # only unlabelled nodules: even out the total count instead
            f = min(range(k), key=lambda i: (load_all[i], load_lab[i], i))
        folds[p] = f
        load_lab[f] += n_lab[p]
        load_all[f] += n_all[p]
    return folds


def fold_split(folds: dict[str, int], test_fold: int | None) -> dict[str, str]:
    """A train/test split file mapping for one fold (``None``: every patient trains)."""
    return {p: "test" if f == test_fold else "train" for p, f in sorted(folds.items())}


def fold_files(out: str | os.PathLike, name: str, k: int, seed: int) -> dict[str, Path]:
    """The files :func:`write_folds` writes: ``"folds"``, ``"fold0"`` .. ``"fold{k-1}"`` and ``"all"``."""
    stem = Path(out) / f"{name}_folds{k}_seed{seed}"
    return {"folds": stem.with_name(stem.name + ".csv"),
            **{f"fold{i}": stem.with_name(f"{stem.name}_fold{i}.csv") for i in range(k)},
            "all": stem.with_name(f"{stem.name}_all.csv")}


def write_folds(cache, out: str | os.PathLike, *, k: int = 5, seed: int = 0,
                name: str = "nodules") -> dict[str, Any]:
    """Seeded patient-level k-fold files of a cache's nodules (see :func:`fold_files`).

    ``NAME_folds{K}_seed{SEED}.csv`` lists each patient's fold and nodule
    counts; ``_fold{i}.csv`` is the split file of fold i (fold i 'test', the
    rest 'train'); ``_all.csv`` makes every patient 'train' (the final model).
    Returns the files and, per fold, patients, nodules and labelled nodules.
    """
    patients, labelled = [], []
    for uid in cache.series_uids:
        pid = str(cache.scan(uid).attrs["patient_id"])
        for lab in cache.nodule_table(uid).get("label", []):
            patients.append(pid)
            labelled.append(int(lab) >= 0)
    assignment = patient_folds(patients, labelled, k=k, seed=seed)
    counts = {p: [0, 0] for p in assignment}
    for p, lab in zip(patients, labelled):
        counts[p][0] += 1
        counts[p][1] += lab
    Path(out).mkdir(parents=True, exist_ok=True)
    files = fold_files(out, name, k, seed)
    write_csv(files["folds"], [{"patient_id": p, "fold": f, "nodules": counts[p][0], "labelled": counts[p][1]}
                               for p, f in sorted(assignment.items())])
    for i in [*range(k), None]:
        write_split(files["all" if i is None else f"fold{i}"], fold_split(assignment, i))
    per_fold = []
    for i in range(k):
        members = [p for p, f in assignment.items() if f == i]
        per_fold.append({"fold": i, "patients": len(members), "nodules": sum(counts[p][0] for p in members),
                         "labelled": sum(counts[p][1] for p in members)})
    return {"files": files, "folds": per_fold}


__all__ = ["SPLITS", "MANIFESTS_DIR", "DEFAULT_SPLIT_FILE", "DEFAULT_FRACTIONS", "write_csv", "read_split",
           "write_split", "split_scans", "check_fractions", "patient_split", "patient_folds", "fold_split",
           "fold_files", "write_folds"]
