"""Real-nodule benchmark: paper A's networks trained and tested on 791 real LIDC-IDRI nodule crops.

    python benchmarks/real_nodules.py [--data ../shared/data/nodules] [--out benchmarks/out/real_nodules]
                                      [--jobs 2] [--models NAME ...] [--stage all|train|report]

Every step is a ``lungseg`` command, printed before it runs (the exact
sequence is in ``OUT/commands.sh``):

1. ``lungseg import-crops`` the crop folder into ``OUT/crops.h5``.
2. ``lungseg folds``: seeded patient-level 5-fold cross-validation, written to
   ``data_manifests/nodules_folds5_seed0*.csv`` (committed; regenerated here
   and compared).
3. For each model and fold ``lungseg train-cls`` / ``train-seg`` on the other
   four folds, for a fixed number of epochs without validation (last.pt is
   the model), then ``lungseg evaluate`` on the held-out fold. The main
   models are also trained once on all patients (``_all.csv``): the final
   checkpoints, ``OUT/runs/<model>/all/last.pt``.
4. Pooled out-of-fold results with 95 % patient-bootstrap intervals, next to
   paper A's figures and to simple baselines on the same folds (logistic
   regression on mask features; a -500 HU threshold segmentation), written
   to ``OUT/results.json`` and ``OUT/results.md``.

Runs are resumable: an interrupted run is resumed, a finished one costs a
checkpoint load. ``--jobs`` runs train in parallel, each with
``cpu_count // jobs`` threads; each run's progress is in
``OUT/runs/<model>/<fold>.log``.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lungseg.splits import MANIFESTS_DIR, fold_files

ROOT = Path(__file__).resolve().parents[1]
K, SEED = 5, 0
FOLDS_STEM = f"nodules_folds{K}_seed{SEED}"
#: The committed fold files ("folds", "fold0".."fold4", "all"), named as `lungseg folds` names them.
FOLD_FILES = fold_files(MANIFESTS_DIR, "nodules", K, SEED)

#: name -> (kind, extra train options, trained on all patients too)
MODELS = {
    "resnet3d50-cpu": ("cls", ["--preset", "cpu"], True),
    "resunet3d-cpu": ("seg", ["--preset", "cpu"], True),
    # Paper A trained its 3D U-Net baseline with Dice loss alone.
    "unet3d-cpu": ("seg", ["--preset", "cpu", "--arch", "unet3d", "--loss", "dice"], False),
    "resnet3d50_plain": ("cls", ["--arch", "resnet3d50_plain", "--epochs", "5"], False),
    "resnet2d50": ("cls", ["--arch", "resnet2d50", "--epochs", "5"], False),
    # The paper's full-width 3D ResNet50 for 52 epochs: a GPU job (about 0.15 ROIs/s
    # per CPU thread here). Not in the default set; --models resnet3d50-paper runs it.
    "resnet3d50-paper": ("cls", [], True),
}
DEFAULT_MODELS = ["resnet3d50-cpu", "resunet3d-cpu", "unet3d-cpu", "resnet3d50_plain", "resnet2d50"]
#: Training order: the main models' folds, the cheap baselines, the final
#: models on all patients, and the costliest baseline last.
PRIORITY = ["resnet3d50-cpu", "resunet3d-cpu", "resnet2d50", "unet3d-cpu", "resnet3d50-paper", "resnet3d50_plain"]


def lungseg(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("lungseg")), *map(str, args)]


class Runner:
    """Runs commands, echoes them and appends them to OUT/commands.sh."""

    def __init__(self, out: Path):
        self.log = out / "commands.sh"

    def __call__(self, cmd: list[str], *, env: dict | None = None, log_file: Path | None = None) -> float:
        shown = " ".join(shlex.quote(os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c) for c in cmd)
        prefix = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        line = f"{prefix} {shown}".strip()
        print(f"$ {line}", flush=True)
        with open(self.log, "a") as f:
            f.write(line + "\n")
        t0 = time.perf_counter()
        full_env = {**os.environ, **(env or {})}
        if log_file is None:
            subprocess.run(cmd, check=True, cwd=ROOT, env=full_env)
        else:
            with open(log_file, "a") as f:
                subprocess.run(cmd, check=True, cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT)
        return time.perf_counter() - t0


def epochs_done(run: Path) -> int:
    log = run / "log.jsonl"
    return sum(1 for line in open(log) if line.strip()) if log.exists() else 0


def planned_epochs(run: Path) -> int | None:
    cfg = run / "config.json"
    return json.loads(cfg.read_text())["epochs"] if cfg.exists() else None


def train_jobs(models: list[str], out: Path, cache: Path) -> list[tuple[str, str, Path, list[str]]]:
    """(model, fold, run folder, command) in :data:`PRIORITY` order; final ("all") runs
    after every fold run except those of the last model."""
    jobs = []
    order = [(name, f"fold{i}") for name in models for i in range(K)]
    order += [(name, "all") for name in models if MODELS[name][2]]
    rank = {name: i for i, name in enumerate(PRIORITY)}
    group = lambda job: 1 if job[1] == "all" else 2 if job[0] == PRIORITY[-1] else 0  # noqa: E731
    order.sort(key=lambda job: (group(job), rank.get(job[0], len(rank))))
    for name, fold in order:
        kind, extra, _ = MODELS[name]
        run = out / "runs" / name / fold
        split = FOLD_FILES[fold]
        cmd = lungseg(f"train-{kind}", "--cache", cache, "--split-file", split, "--out", run, *extra)
        jobs.append((name, fold, run, cmd))
    return jobs


def run_training(jobs, runner: Runner, n_parallel: int) -> dict[str, float]:
    threads = max(1, (os.cpu_count() or 1) // n_parallel)
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    seconds = {}

    def one(job):
        name, fold, run, cmd = job
        # An existing run is always resumed: it trains only the epochs it lacks
        # (none when it is finished), whatever its config.json said before.
        run.parent.mkdir(parents=True, exist_ok=True)
        resume = ["--resume"] if (run / "last.pt").exists() else []
        seconds[f"{name}/{fold}"] = runner(cmd + resume, env=env, log_file=run.parent / f"{fold}.log")
        print(f"  {name}/{fold}: {seconds[f'{name}/{fold}']:.0f} s", flush=True)

    with ThreadPoolExecutor(max_workers=n_parallel) as pool:
        for f in [pool.submit(one, job) for job in jobs]:
            f.result()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "nodules")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "real_nodules")
    parser.add_argument("--jobs", type=int, default=2, help="training runs in parallel")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=sorted(MODELS))
    parser.add_argument("--stage", choices=["all", "train", "report"], default="all")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(out)
    cache = out / "crops.h5"
    timing_path = out / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}

    if args.stage in ("all", "train"):
        if not (cache.exists() and (out / "import.done").exists()):
            timing["import"] = runner(lungseg("import-crops", args.data.resolve(), "--out", cache))
            (out / "import.done").write_text("")
        runner(lungseg("folds", cache, "--k", K, "--seed", SEED, "--out", MANIFESTS_DIR))
        changed = subprocess.run(["git", "status", "--porcelain", "data_manifests"], cwd=ROOT,
                                 capture_output=True, text=True).stdout.strip()
        if changed:
            print(f"note: the regenerated folds differ from the committed ones:\n{changed}")
        t0 = time.perf_counter()
        seconds = run_training(train_jobs(args.models, out, cache), runner, args.jobs)
        timing.setdefault("train", {}).update(seconds)
        timing.setdefault("train_stage_wall_seconds", []).append(round(time.perf_counter() - t0, 1))
        timing_path.write_text(json.dumps(timing, indent=2))
    if args.stage in ("all", "report"):
        evaluate_runs(args.models, out, cache, runner)
        results = report(args.models, out, cache, args.data.resolve())
        (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
        plot(results, out / "real_nodules.png")
        text = markdown(results)
        (out / "results.md").write_text(text + "\n")
        print(text)


# --------------------------------------------------------------------------
# Evaluation of every finished fold run, and pooling
# --------------------------------------------------------------------------

def finished(run: Path) -> bool:
    planned = planned_epochs(run)
    return planned is not None and epochs_done(run) >= planned and (run / "last.pt").exists()


def evaluate_runs(models: list[str], out: Path, cache: Path, runner: Runner) -> None:
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for name in models:
        kind = MODELS[name][0]
        for i in range(K):
            run, dest = out / "runs" / name / f"fold{i}", out / "eval" / name / f"fold{i}"
            if not finished(run):
                continue
            result = dest / "evaluation.json"
            if result.exists() and result.stat().st_mtime > (run / "last.pt").stat().st_mtime:
                continue
            split = FOLD_FILES[f"fold{i}"]
            dest.mkdir(parents=True, exist_ok=True)
            runner(lungseg("evaluate", "--cache", cache, f"--{kind}", run / "last.pt", "--split", "test",
                           "--split-file", split, "--bootstrap", 200, "--out", dest), env=env,
                   log_file=dest / "evaluate.log")


def pooled(models: list[str], out: Path) -> dict[str, dict]:
    """Out-of-fold rows of each model whose 5 folds are all evaluated."""
    rows = {}
    for name in models:
        kind = MODELS[name][0]
        files = [out / "eval" / name / f"fold{i}" / "evaluation.json" for i in range(K)]
        if not all(f.exists() for f in files):
            continue
        key = "classification" if kind == "cls" else "segmentation"
        items, fold_auc = [], []
        for f in files:
            part = json.loads(f.read_text())[key]
            items.extend(part["items"] if kind == "cls" else part["nodules"])
            fold_auc.append(part.get("auc"))
        runs = [out / "runs" / name / f"fold{i}" for i in range(K)]
        train_s = sum(r["seconds"] for run in runs for r in map(json.loads, open(run / "log.jsonl")))
        cfg = json.loads((runs[0] / "config.json").read_text())
        rows[name] = {"kind": kind, "rows": items, "train_seconds": train_s, "config": cfg, "fold_auc": fold_auc}
    return rows


# --------------------------------------------------------------------------
# Baselines on the same folds: mask features + logistic regression, HU threshold
# --------------------------------------------------------------------------

def mask_features(hu: np.ndarray, mask: np.ndarray, spacing) -> dict[str, float]:
    """Seven simple features of one nodule on its crop's own grid (:func:`lungseg.cache.nodule_features`)."""
    from lungseg.cache import FEATURES, nodule_features

    return dict(zip(FEATURES, map(float, nodule_features(hu, mask, spacing))))


def logistic_fit_predict(x_train, y_train, x_test, l2: float = 1e-3) -> np.ndarray:
    """Logistic regression (:class:`lungseg.logistic.LogisticRegression`, nearly unpenalised) fitted and applied."""
    from lungseg.logistic import LogisticRegression

    return LogisticRegression.fit(x_train, y_train, l2=l2)(x_test)


def threshold_segment(hu: np.ndarray, centre, threshold_hu: float = -500.0) -> np.ndarray:
    """Voxels above ``threshold_hu`` in the connected component nearest ``centre``."""
    from scipy import ndimage

    labels, n = ndimage.label(hu > threshold_hu)
    if n == 0:
        return np.zeros(hu.shape, bool)
    idx = np.argwhere(labels > 0)
    nearest = idx[np.argmin(((idx - np.asarray(centre)) ** 2).sum(1))]
    return labels == labels[tuple(nearest)]


def baselines(out: Path, cache_path: Path, data: Path) -> dict[str, list[dict]]:
    """Per-nodule rows of the feature classifiers (out of fold) and the threshold segmentation."""
    from lungseg import metrics
    from lungseg.cache import Cache
    from lungseg.dicomio import read_nifti_mask, read_nifti_volume

    cached = out / "baseline_rows.json"
    if cached.exists():
        return json.loads(cached.read_text())
    folds = {r["patient_id"]: int(r["fold"]) for r in csv_rows(FOLD_FILES["folds"])}
    cls_rows, seg_roi, seg_crop = [], [], []
    with Cache(cache_path) as cache:
        window_low, window_high = cache.config["window"]      # the cache's own lung window
        for uid in cache.series_uids:
            g = cache.scan(uid)
            table = cache.nodule_table(uid)
            patient = str(g.attrs["patient_id"])
            volume = read_nifti_volume(g.attrs["source"], min_hu_below=None)
            mask, _ = read_nifti_mask(Path(g.attrs["source"]).parent.parent / "mask" / Path(g.attrs["source"]).name)
            mask = mask > 0
            feats = mask_features(volume.hu, mask, volume.spacing)
            label = int(table["label"][0])
            if label >= 0:
                cls_rows.append({"id": f"{uid}/0", "patient_id": patient, "fold": folds[patient], "label": label,
                                 **feats})
            diameter = float(table["diameter_mm"][0])
            # On the ROI the networks see (model grid, padded with air).
            roi_hu = g["rois/image"][0].astype(np.float32) * (window_high - window_low) + window_low
            truth = g["rois/mask"][0] > 0
            pred = threshold_segment(roi_hu, np.asarray(truth.shape) // 2)
            seg_roi.append({"id": f"{uid}/0", "patient_id": patient, "diameter_mm": diameter,
                            **metrics.segmentation_scores(truth, pred)})
            # On the original crop (the data README's setting).
            pred = threshold_segment(volume.hu.astype(np.float32), (np.asarray(mask.shape) - 1) / 2)
            seg_crop.append({"id": f"{uid}/0", "patient_id": patient, "diameter_mm": diameter,
                             **metrics.segmentation_scores(mask, pred)})
    results = {"threshold-500HU-roi": seg_roi, "threshold-500HU-crop": seg_crop}
    from lungseg.cache import FEATURES

    for name, cols in (("lr-diameter", ["diameter_mm"]), ("lr-7-features", list(FEATURES))):
        x = np.array([[r[c] for c in cols] for r in cls_rows], float)
        y = np.array([r["label"] for r in cls_rows], float)
        f = np.array([r["fold"] for r in cls_rows])
        p = np.zeros(len(y))
        for i in range(K):
            p[f == i] = logistic_fit_predict(x[f != i], y[f != i], x[f == i])
        results[name] = [{"id": r["id"], "patient_id": r["patient_id"], "fold": r["fold"], "label": r["label"],
                          "p_malignant": float(q)}
                         for r, q in zip(cls_rows, p)]
    cached.write_text(json.dumps(results))
    return results


def csv_rows(path: Path) -> list[dict]:
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------

#: Paper A: Table 5 (test set, 400 annotations) and Table 4 (Dice, precision, recall).
PAPER_CLS = {"resnet3d50": (0.873, 0.804, 0.948, 0.907), "resnet3d50_plain": (0.808, 0.799, 0.817, None),
             "resnet2d50": (0.781, 0.736, 0.826, None)}
PAPER_SEG = {"resunet3d": {"micro": (0.466, 0.424, 0.549), "small": (0.652, 0.673, 0.697),
                           "nodule": (0.805, 0.839, 0.805), "mass": (0.910, 0.916, 0.902)},
             "unet3d": {"micro": (0.185, 0.144, 0.315), "small": (0.588, 0.532, 0.509),
                        "nodule": (0.698, 0.771, 0.687), "mass": (0.911, 0.944, 0.880)}}
N_BOOT = 1000


def classification_table(rows: list[dict]) -> dict:
    from lungseg import metrics

    y = np.array([r["label"] for r in rows])
    p = np.array([r["p_malignant"] for r in rows])
    g = np.array([r["patient_id"] for r in rows])
    pred = (p >= 0.5).astype(int)
    stats = {"accuracy": lambda t, q, s: metrics.accuracy(t, q), "recall": lambda t, q, s: metrics.sensitivity(t, q),
             "specificity": lambda t, q, s: metrics.specificity(t, q), "auc": lambda t, q, s: metrics.roc_auc(t, s)}
    fpr, tpr, _ = metrics.roc_curve(y, p)
    out = {"n": len(y), "n_malignant": int(y.sum()), "n_patients": len(set(g.tolist())),
           "confusion_matrix": metrics.confusion_matrix(y, pred, num_classes=2).tolist(),
           "roc": [fpr.tolist(), tpr.tolist()]}
    for name, fn in stats.items():
        b = metrics.bootstrap_ci(fn, y, pred, p, n_resamples=N_BOOT, seed=SEED, groups=g)
        out[name] = [b.estimate, b.low, b.high]
    return out


def segmentation_table(rows: list[dict]) -> dict:
    from lungseg import metrics
    from lungseg.cache import SIZE_CATEGORIES, size_category

    d = np.array([r["diameter_mm"] for r in rows])
    cat = size_category(d)
    g = np.array([r["patient_id"] for r in rows])
    out = {}
    for i, name in [*enumerate(n for _, n in SIZE_CATEGORIES), (None, "all")]:
        sel = np.ones(len(rows), bool) if i is None else cat == i
        entry = {"n": int(sel.sum())}
        for key in ("dice", "precision", "recall"):
            v = np.array([r[key] for r in rows])[sel]
            if not sel.any():
                entry[key] = [float("nan")] * 3
                continue
            b = metrics.bootstrap_ci(lambda x: float(np.mean(x)), v, n_resamples=N_BOOT, seed=SEED, groups=g[sel])
            entry[key] = [b.estimate, b.low, b.high]
        out[name] = entry
    return out


def report(models: list[str], out: Path, cache: Path, data: Path) -> dict:
    import platform

    import torch

    runs = pooled(models, out)
    base = baselines(out, cache, data)
    results = {"data": str(data), "protocol": f"patient-level {K}-fold cross-validation ({FOLDS_STEM}); "
               "each nodule once, label from the majority malignancy (1-2 benign, 4-5 malignant, 3 excluded); "
               "out-of-fold predictions pooled; 95 % percentile bootstrap over patients "
               f"({N_BOOT} resamples)",
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "torch": torch.__version__, "python": platform.python_version()},
               "classification": {}, "segmentation": {}, "missing": [m for m in models if m not in runs]}
    for name, r in runs.items():
        table = classification_table(r["rows"]) if r["kind"] == "cls" else segmentation_table(r["rows"])
        cfg = r["config"]
        table.update(train_seconds=r["train_seconds"], epochs=cfg["epochs"], arch=cfg["arch"],
                     width=cfg.get("width"), widths=cfg.get("widths"))
        if r["kind"] == "cls":
            table["fold_auc"] = r["fold_auc"]
        results["classification" if r["kind"] == "cls" else "segmentation"][name] = table
    from lungseg import metrics

    for name in ("lr-diameter", "lr-7-features"):
        results["classification"][name] = table = classification_table(base[name])
        folds = np.array([r["fold"] for r in base[name]])
        y = np.array([r["label"] for r in base[name]])
        p = np.array([r["p_malignant"] for r in base[name]])
        table["fold_auc"] = [metrics.roc_auc(y[folds == i], p[folds == i]) for i in range(K)]
    for name in ("threshold-500HU-roi", "threshold-500HU-crop"):
        results["segmentation"][name] = segmentation_table(base[name])
    if "resunet3d-cpu" in runs and "unet3d-cpu" in runs:
        # Paired: the same nodules, so the difference per nodule has a much tighter interval.
        a = {r["id"]: r for r in runs["resunet3d-cpu"]["rows"]}
        diff = [{**r, "dice": a[r["id"]]["dice"] - r["dice"], "precision": a[r["id"]]["precision"] - r["precision"],
                 "recall": a[r["id"]]["recall"] - r["recall"]} for r in runs["unet3d-cpu"]["rows"]]
        results["paired_difference"] = {"resunet3d-cpu minus unet3d-cpu": segmentation_table(diff)}
    return results


def plot(results: dict, path: Path) -> None:
    """Pooled out-of-fold ROC curves, and Dice by size category with 95 % intervals."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, row in results["classification"].items():
        fpr, tpr = row["roc"]
        ax1.plot(fpr, tpr, "--" if name.startswith("lr-") else "-", label=f"{name} (AUC {row['auc'][0]:.3f})")
    ax1.plot([0, 1], [0, 1], ":", color="grey")
    ax1.set_xlabel("1 - specificity")
    ax1.set_ylabel("sensitivity")
    ax1.set_title("benign vs malignant, 5-fold CV, out of fold", fontsize=9)
    ax1.legend(fontsize=7, loc="lower right")
    cats = ["micro", "small", "nodule"]
    names = list(results["segmentation"]) + ["paper A resunet3d"]
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        if name.startswith("paper"):
            est = [PAPER_SEG["resunet3d"][c][0] for c in cats]
            err = None
        else:
            table = results["segmentation"][name]
            est = [table[c]["dice"][0] for c in cats]
            err = np.array([[table[c]["dice"][0] - table[c]["dice"][1], table[c]["dice"][2] - table[c]["dice"][0]]
                            for c in cats]).T
        ax2.bar(np.arange(len(cats)) + k * width, est, width, yerr=err, capsize=2, label=name)
    ax2.set_xticks(np.arange(len(cats)) + width * (len(names) - 1) / 2,
                   [f"{c}\n(n={results['segmentation'][next(iter(results['segmentation']))][c]['n']})" for c in cats])
    ax2.set_ylabel("mean per-nodule Dice")
    ax2.set_ylim(0, 1)
    ax2.set_title("segmentation by size (masses: n=3, not shown)", fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _ci(v, digits=3, scale=1.0) -> str:
    est, lo, hi = (x * scale for x in v)
    return "n/a" if np.isnan(est) else f"{est:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown(results: dict) -> str:
    lines = [f"Data: {results['data']}. Protocol: {results['protocol']}.", "",
             "Classification (Table 5 layout); paper A's rows are its test set of 400 annotations.", "",
             "| model | epochs | train time | accuracy | recall | specificity | AUC | AUC per fold, mean (min-max) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in results["classification"].items():
        time_s = f"{row['train_seconds'] / 60:.0f} min" if "train_seconds" in row else "-"
        f = np.array(row.get("fold_auc") or [np.nan], float)
        lines.append(f"| {name} | {row.get('epochs', '-')} | {time_s} | " + " | ".join(
            _ci(row[k]) for k in ("accuracy", "recall", "specificity", "auc"))
            + f" | {f.mean():.3f} ({f.min():.3f}-{f.max():.3f}) |")
    for name, (acc, rec, spec, auc) in PAPER_CLS.items():
        lines.append(f"| paper A {name} | 52 | GPU | {acc:.3f} | {rec:.3f} | {spec:.3f} | "
                     f"{'-' if auc is None else f'{auc:.3f}'} | - |")
    lines += ["", "Train time: the sum of the epochs of the 5 fold runs, one CPU thread each, two runs at a time.",
              "", "Segmentation (Table 4 layout): mean per-nodule Dice, precision, recall in the 16 x 48 x 48 ROI.", "",
              "| model | category | n | Dice | precision | recall |", "|---|---|---|---|---|---|"]
    for name, table in results["segmentation"].items():
        for cat in ("micro", "small", "nodule", "mass", "all"):
            row = table[cat]
            lines.append(f"| {name} | {cat} | {row['n']} | " + " | ".join(
                _ci(row[k]) for k in ("dice", "precision", "recall")) + " |")
    for name, table in PAPER_SEG.items():
        for cat, (d, p, r) in table.items():
            lines.append(f"| paper A {name} | {cat} | - | {d:.3f} | {p:.3f} | {r:.3f} |")
    for title, table in results.get("paired_difference", {}).items():
        lines += ["", f"Paired difference in per-nodule Dice, {title} (same nodules):", "",
                  "| category | n | Dice difference |", "|---|---|---|"]
        lines += [f"| {cat} | {table[cat]['n']} | {_ci(table[cat]['dice'])} |"
                  for cat in ("micro", "small", "nodule", "mass", "all")]
    if results["missing"]:
        lines += ["", f"Not yet trained and evaluated on all folds: {', '.join(results['missing'])}."]
    m = results["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, no GPU; torch {m['torch']}, Python {m['python']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
