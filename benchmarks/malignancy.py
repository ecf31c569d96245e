"""Malignancy benchmark: lungseg's nodule classifier against nodule size, on 791 real LIDC-IDRI nodule crops.

    python benchmarks/malignancy.py [--data ../shared/data/nodules] [--out benchmarks/out/malignancy]
                                    [--models nodule ...] [--stage all|train|report]

Every step is a ``lungseg`` command, printed before it runs (the sequence is
in ``OUT/commands.sh``):

1. ``lungseg import-crops`` the crop folder into ``OUT/crops.h5`` (ROIs padded with air beyond
   the crop) and, with ``--context``, into ``OUT/crops_context.h5`` (each crop placed in the
   aerated lung of LIDC-IDRI-0001 or Lung_Dx-A0002, the model ``nodule-context``).
2. For each model and each outer fold k of the committed patient-level folds
   (``data_manifests/nodules_folds5_seed0_fold{k}.csv``): ``lungseg train-cls
   --preset nodule`` on the four other folds (itself 5 cross-fitted members,
   calibrated and stacked on their inner out-of-fold logits: no fold-k
   patient is seen by any step), then ``lungseg evaluate`` on fold k.
3. The final model (``--final``, default ``nodule``): the same command on all patients
   (``_all.csv``): ``OUT/final/<model>/model.pt``.
4. Report: per fold and pooled out-of-fold AUC with 95 % patient-bootstrap
   intervals for the network alone, the hybrid, and logistic regression on the
   diameter and on the seven measured features fitted on the same training
   folds (:class:`lungseg.logistic.LogisticRegression` on the cache's
   ``nodules/features``); the paired AUC differences (network minus diameter,
   hybrid minus seven features); calibration (Brier, ECE, reliability
   diagram); the learning curve (the members' inner validation AUC by epoch);
   wall time. Written to ``OUT/results.json``, ``OUT/results.md`` and
   ``benchmarks/figures/malignancy_*.png``.

Resumable: an interrupted run continues where it stopped. Prints figures;
asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_nodules import FOLD_FILES, K, Runner, lungseg  # noqa: E402  (the same folds and command runner)

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "benchmarks" / "figures"
SEED, N_BOOT = 0, 1000
#: name -> extra train-cls options (after --preset nodule)
MODELS = {
    "nodule": [],
    # Ablations: what each ingredient is worth, on the same folds.
    "nodule-context": [],                     # the same, on crops placed in real lung instead of air
    "nodule-no-mask": ["--no-mask-channel"],
    "nodule-no-ratings": ["--aux-weight", "0"],
    "nodule-width8": ["--width", "8"],
}
DEFAULT_MODELS = ["nodule", "nodule-context"]
#: A reference, not a competitor: the readers' own ratings of the nodule (unknown for a new scan).
REFERENCE = "reference: lr-diameter+8-reader-ratings"
#: The model "nodule" (trained on air-padded crops) tested on the held-out crops in context.
TESTED_IN_CONTEXT = "nodule@context"
#: Backgrounds of the context crops (CC BY: never the non-commercial RICORD scan).
CONTEXT = ("lidc/LIDC-IDRI-0001", "ct/Lung_Dx-A0002")


def cache_of(name: str, out: Path) -> Path:
    return out / ("crops_context.h5" if name.endswith("-context") else "crops.h5")


def train(models: list[str], out: Path, runner: Runner, final: str | None, timing: dict, timing_path: Path) -> None:
    env = {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    seconds = timing.setdefault("train", {})
    jobs = [(name, f"fold{k}") for name in models for k in range(K)]
    if final:
        jobs.append((final, "all"))
    for name, fold in jobs:
        run = out / "final" / name if fold == "all" else out / "cv" / name / fold
        cache = cache_of(name, out)
        if not (run / "model.pt").exists():
            run.mkdir(parents=True, exist_ok=True)
            cmd = lungseg("train-cls", "--cache", cache, "--split-file", FOLD_FILES[fold], "--preset", "nodule",
                          *MODELS[name], "--out", run, *(["--resume"] if any(run.glob("member*/last.pt")) else []))
            seconds[f"{name}/{fold}"] = runner(cmd, env=env, log_file=run.parent / f"{run.name}.log")
            print(f"  {name}/{fold}: {seconds[f'{name}/{fold}']:.0f} s", flush=True)
            timing_path.write_text(json.dumps(timing, indent=2))
        # The air-trained model is also tested on the same held-out crops placed in real lung: what it
        # meets in whole scans (predict), which it never saw in training.
        if name == "nodule" and fold != "all" and (out / "crops_context.h5.done").exists() and \
                not (out / "eval" / TESTED_IN_CONTEXT / fold / "evaluation.json").exists():
            dest = out / "eval" / TESTED_IN_CONTEXT / fold
            dest.mkdir(parents=True, exist_ok=True)
            runner(lungseg("evaluate", "--cache", out / "crops_context.h5", "--cls", run / "model.pt", "--split",
                           "test", "--split-file", FOLD_FILES[fold], "--bootstrap", 200, "--out", dest), env=env,
                   log_file=dest / "evaluate.log")
        if fold != "all" and not (out / "eval" / name / fold / "evaluation.json").exists():
            dest = out / "eval" / name / fold
            dest.mkdir(parents=True, exist_ok=True)
            runner(lungseg("evaluate", "--cache", cache, "--cls", run / "model.pt", "--split", "test",
                           "--split-file", FOLD_FILES[fold], "--bootstrap", 200, "--out", dest), env=env,
                   log_file=dest / "evaluate.log")


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def _rows(out: Path, name: str) -> list[dict] | None:
    """Out-of-fold rows (id, patient, fold, label, p_network, p_hybrid) of a model whose folds are all evaluated."""
    rows = []
    for k in range(K):
        path = out / "eval" / name / f"fold{k}" / "evaluation.json"
        if not path.exists():
            return None
        for r in json.loads(path.read_text())["classification"]["items"]:
            rows.append({"id": r["id"], "patient_id": r["patient_id"], "fold": k, "label": r["label"],
                         "p_network": r.get("p_network", r["p_malignant"]), "p_hybrid": r["p_malignant"]})
    return rows


def _baselines(cache_path: Path, rows: list[dict]) -> dict[str, np.ndarray]:
    """Out-of-fold p of logistic regression on the diameter and on the seven features, same folds and rows."""
    from lungseg import lidc
    from lungseg.cache import FEATURES, Cache
    from lungseg.logistic import LogisticRegression

    with Cache(cache_path) as cache:
        feats, ratings = {}, {}
        for uid in cache.series_uids:
            f = cache.scan(uid)["nodules/features"][()]
            r = cache.scan(uid)["nodules/ratings_majority"][()]
            for j in range(len(f)):
                feats[f"{uid}/{j}"], ratings[f"{uid}/{j}"] = f[j], r[j]
    x7 = np.stack([feats[r["id"]] for r in rows]).astype(float)
    # The readers' own majority votes on the eight characteristics other than malignancy.
    x8 = np.stack([ratings[r["id"]][: lidc.CHARACTERISTICS.index("malignancy")] for r in rows]).astype(float)
    x = np.c_[x7, x8]
    y = np.array([r["label"] for r in rows])
    fold = np.array([r["fold"] for r in rows])
    out = {}
    diameter = FEATURES.index("diameter_mm")
    for name, cols in (("lr-diameter", [diameter]), ("lr-7-features", list(range(7))),
                       (REFERENCE, [diameter, *range(7, 15)])):
        p = np.zeros(len(y))
        for k in range(K):
            tr, te = fold != k, fold == k
            p[te] = LogisticRegression.fit(x[tr][:, cols], y[tr], l2=1e-3)(x[te][:, cols])
        out[name] = p
    return out


def _ci(fn, *arrays, groups) -> list[float]:
    from lungseg import metrics

    b = metrics.bootstrap_ci(fn, *arrays, n_resamples=N_BOOT, seed=SEED, groups=groups)
    return [b.estimate, b.low, b.high]


def _learning_curve(out: Path, name: str) -> dict[str, list[float]]:
    """Mean and sd over the members of all outer folds of the inner validation AUC, by epoch."""
    from lungseg.train import read_log

    curves = [[r.get("auc", np.nan) for r in read_log(log)] for log in sorted((out / "cv" / name).glob("fold*/member*/log.jsonl"))]
    n = min(map(len, curves)) if curves else 0
    a = np.array([c[:n] for c in curves], float)
    return {"epoch": list(range(1, n + 1)), "mean": np.nanmean(a, 0).tolist() if n else [],
            "sd": np.nanstd(a, 0).tolist() if n else [], "members": len(curves)}


def _ratings(out: Path, name: str, cache_path: Path) -> dict | None:
    """How well the fold models predict the readers' majority ratings of their held-out nodules (all 791).

    Per characteristic: Spearman's rank correlation (95 % patient-bootstrap interval) and the mean
    absolute error on the rating scale, pooled over the outer folds.
    """
    from scipy.stats import spearmanr

    from lungseg import lidc, metrics
    from lungseg.cache import Cache
    from lungseg.checkpoints import load_model
    from lungseg.malignancy import cache_rois, predicted_ratings
    from lungseg.splits import read_split, split_scans

    pred, truth, groups = [], [], []
    with Cache(cache_path) as cache:
        for k in range(K):
            model_path = out / "cv" / name / f"fold{k}" / "model.pt"
            if not model_path.exists():
                return None
            model, _ = load_model(model_path, kind="cls")
            uids = split_scans(cache, read_split(FOLD_FILES[f"fold{k}"]), "test")
            items, images, masks = cache_rois(cache, uids)
            r = predicted_ratings(model, images, masks)
            if r is None:
                return None
            pred.append(r)
            truth.append(np.stack([cache.scan(u)["nodules/ratings_majority"][j] for u, j in items]))
            groups += [str(cache.scan(u).attrs["patient_id"]) for u, _ in items]
    pred, truth, groups = np.concatenate(pred), np.concatenate(truth).astype(float), np.array(groups)
    table = {}
    for c, char in enumerate(lidc.CHARACTERISTICS):
        ok = truth[:, c] > 0
        rho = metrics.bootstrap_ci(lambda t, q: float(spearmanr(t, q)[0]), truth[ok, c], pred[ok, c],
                                   n_resamples=N_BOOT, seed=SEED, groups=groups[ok])
        table[char] = {"n": int(ok.sum()), "spearman": [rho.estimate, rho.low, rho.high],
                       "mae": float(np.abs(truth[ok, c] - pred[ok, c]).mean()),
                       "mae_predict_mean": float(np.abs(truth[ok, c] - truth[ok, c].mean()).mean())}
    return table


def _epoch_seconds(run: Path) -> float:
    """Seconds of training and validation epochs logged by every member below ``run``."""
    from lungseg.train import read_log

    return sum(r["seconds"] for log in run.glob("**/member*/log.jsonl") for r in read_log(log))


def report(models: list[str], out: Path) -> dict:
    import torch

    from lungseg import metrics

    auc = lambda t, s: metrics.roc_auc(t, s)  # noqa: E731
    results = {"data": "791 real LIDC-IDRI nodule crops (../shared/data/nodules); 507 labelled (majority malignancy "
                       "1-2 benign, 4-5 malignant, 3 unlabelled: used for the ratings only)",
               "protocol": f"patient-level {K}-fold cross-validation (data_manifests/nodules_folds5_seed0*.csv), "
                           "out-of-fold predictions pooled; 95 % percentile bootstrap over patients "
                           f"({N_BOOT} resamples); paired differences resample the same patients",
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "torch": torch.__version__, "python": platform.python_version()},
               "models": {}}
    timing = json.loads((out / "timing.json").read_text()) if (out / "timing.json").exists() else {}
    for name in [*models, *([TESTED_IN_CONTEXT] if "nodule" in models else [])]:
        rows = _rows(out, name)
        if rows is None:
            continue
        cache = out / "crops_context.h5" if name == TESTED_IN_CONTEXT else cache_of(name, out)
        y = np.array([r["label"] for r in rows])
        g = np.array([r["patient_id"] for r in rows])
        fold = np.array([r["fold"] for r in rows])
        p = {"network": np.array([r["p_network"] for r in rows]), "hybrid": np.array([r["p_hybrid"] for r in rows]),
             **_baselines(cache, rows)}
        entry = {"n": len(y), "n_malignant": int(y.sum()), "n_patients": len(set(g.tolist())), "auc": {},
                 "fold_auc": {}, "calibration": {}}
        for key, q in p.items():
            entry["auc"][key] = _ci(auc, y, q, groups=g)
            entry["fold_auc"][key] = [auc(y[fold == k], q[fold == k]) for k in range(K)]
            entry["calibration"][key] = {"brier": _ci(metrics.brier_score, y, q, groups=g),
                                         "ece": _ci(metrics.expected_calibration_error, y, q, groups=g)}
        entry["paired"] = {
            "network - lr-diameter": _ci(lambda t, a, b: auc(t, a) - auc(t, b), y, p["network"], p["lr-diameter"],
                                         groups=g),
            "hybrid - lr-7-features": _ci(lambda t, a, b: auc(t, a) - auc(t, b), y, p["hybrid"], p["lr-7-features"],
                                          groups=g),
            "hybrid - network": _ci(lambda t, a, b: auc(t, a) - auc(t, b), y, p["hybrid"], p["network"], groups=g),
        }
        entry["learning_curve"] = _learning_curve(out, name) if name in MODELS else _learning_curve(out, "nodule")
        entry["ratings"] = _ratings(out, name if name in MODELS else "nodule", cache)
        entry["train_seconds"] = _epoch_seconds(out / "cv" / name) if name in MODELS else 0
        entry["fold_wall_seconds"] = {k.split("/")[1]: v for k, v in timing.get("train", {}).items()
                                      if k.startswith(f"{name}/fold")}
        entry["_p"] = {k: v.tolist() for k, v in p.items()}
        entry["_y"] = y.tolist()
        results["models"][name] = entry
    final = next(iter(sorted((out / "final").glob("*/model.pt"))), None)
    if final is not None:
        from lungseg.checkpoints import load_checkpoint, sha256

        ckpt = load_checkpoint(final, kind="cls")
        results["final"] = {"path": str(final.relative_to(ROOT)), "sha256": sha256(final), **ckpt["val"],
                            "train_seconds": _epoch_seconds(final.parent),
                            "cache": ckpt["data"]["cache"]}
    return results


def plot(results: dict, name: str = "nodule") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lungseg import metrics

    entry = results["models"].get(name)
    if not entry:
        return
    y = np.array(entry["_y"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.3))
    ax = axes[0]
    for key, q in entry["_p"].items():
        fpr, tpr, _ = metrics.roc_curve(y, np.array(q))
        a = entry["auc"][key]
        ax.plot(fpr, tpr, ":" if key == REFERENCE else "--" if key.startswith("lr-") else "-",
                label=f"{key} {a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}]")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"benign vs malignant, {K}-fold CV, out of fold (n={entry['n']})", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    for key in ("network", "hybrid", "lr-7-features"):
        curve = metrics.reliability(y, np.array(entry["_p"][key]))
        ok = curve["count"] > 0
        ece = entry["calibration"][key]["ece"][0]
        ax.plot(curve["mean_predicted"][ok], curve["observed"][ok], "o-", label=f"{key} (ECE {ece:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("mean p(malignant) in bin")
    ax.set_ylabel("observed malignant fraction")
    ax.set_title("reliability, pooled out of fold", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[2]
    for other, e in results["models"].items():
        lc = e["learning_curve"]
        if other not in MODELS or not lc["epoch"]:
            continue
        m, s = np.array(lc["mean"]), np.array(lc["sd"])
        ax.plot(lc["epoch"], m, "o-", ms=3, label=f"{other}: members' inner validation AUC (n={lc['members']})")
        if other == name:
            ax.fill_between(lc["epoch"], m - s, m + s, alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("AUC")
    ax.set_title(f"learning curves (mean over members; band: sd of {name})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    FIGURES.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURES / "malignancy.png", dpi=80)
    plt.close(fig)


def _f(v, digits=3) -> str:
    return f"{v[0]:.{digits}f} [{v[1]:.{digits}f}, {v[2]:.{digits}f}]"


def markdown(results: dict) -> str:
    lines = [f"Data: {results['data']}. Protocol: {results['protocol']}.", ""]
    for name, e in results["models"].items():
        what = "the model `nodule`, tested on the held-out crops placed in real lung" if name == TESTED_IN_CONTEXT \
            else f"train-cls --preset nodule {' '.join(MODELS[name])}".strip()
        lines += [f"Model `{name}` ({what}; {'crops in context' if 'context' in name else 'air-padded crops'}): "
                  f"{e['n']} nodules, {e['n_malignant']} malignant, {e['n_patients']} patients.", "",
                  "| predictor | pooled AUC [95 % CI] | " + " | ".join(f"fold {k}" for k in range(K))
                  + " | Brier | ECE |", "|---|---|" + "---|" * K + "---|---|"]
        for key in e["auc"]:
            lines.append(f"| {key} | {_f(e['auc'][key])} | " + " | ".join(f"{v:.3f}" for v in e["fold_auc"][key])
                         + f" | {_f(e['calibration'][key]['brier'])} | {_f(e['calibration'][key]['ece'])} |")
        lines += ["", "| paired AUC difference | estimate [95 % CI] |", "|---|---|"]
        lines += [f"| {k} | {_f(v)} |" for k, v in e["paired"].items()]
        if e.get("ratings"):
            lines += ["", "The readers' majority ratings of the held-out nodules (all with a rating, malignancy 3 "
                          "included), as the ratings head predicts them: Spearman's rho [95 % CI]; mean absolute "
                          "error, and that of always predicting the mean rating.", "",
                      "| characteristic | n | Spearman rho | MAE | MAE of the mean |", "|---|---|---|---|---|"]
            lines += [f"| {c} | {t['n']} | {_f(t['spearman'])} | {t['mae']:.2f} | {t['mae_predict_mean']:.2f} |"
                      for c, t in e["ratings"].items()]
        lc = e["learning_curve"]
        if lc["epoch"]:
            pick = [i for i in range(len(lc["epoch"])) if (i + 1) % 5 == 0 or i == 0]
            lines += ["", f"Learning curve (inner validation AUC, mean +- sd over {lc['members']} members): "
                      + ", ".join(f"epoch {lc['epoch'][i]} {lc['mean'][i]:.3f} +- {lc['sd'][i]:.3f}" for i in pick)]
        if e["train_seconds"]:
            walls = ", ".join(f"{k} {v / 60:.1f}" for k, v in sorted(e["fold_wall_seconds"].items()))
            lines += ["", f"Time: the {K} outer folds' 25 members train and validate in {e['train_seconds'] / 60:.0f} min "
                          f"of logged epochs; wall per outer fold (min, whole train-cls command): {walls or '-'}."]
        lines.append("")
    if "final" in results:
        f = results["final"]
        lines += [f"Final model `{f['path']}` (all patients, {f['members']} members): out-of-fold AUC of the network "
                  f"{f['oof_auc_network']:.3f} on {f['n_oof']} labelled nodules, temperature {f['temperature']:.2f}"
                  + (f", trained in {f['train_seconds'] / 60:.0f} min" if f.get("train_seconds") else "")
                  + f"; sha256 {f['sha256'][:16]}...", ""]
    m = results["machine"]
    lines += [f"Machine: {m['cpu']}, {m['cores']} cores, no GPU; torch {m['torch']}, Python {m['python']}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "nodules")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "malignancy")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=sorted(MODELS))
    parser.add_argument("--final", default="nodule", choices=sorted(MODELS) + ["none"],
                        help="the model trained on all patients (none: skip it)")
    parser.add_argument("--stage", choices=["all", "train", "report"], default="all")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(out)
    timing_path = out / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    if args.stage in ("all", "train"):
        shared = args.data.resolve().parent
        for name in dict.fromkeys(cache_of(m, out).name for m in [*args.models, args.final] if m in MODELS):
            done = out / f"{name}.done"
            if not done.exists():
                context = [a for c in CONTEXT for a in ("--context", shared / c)] if "context" in name else []
                timing[f"import {name}"] = runner(lungseg("import-crops", args.data.resolve(), "--out", out / name,
                                                          *context))
                done.write_text("")
        t0 = time.perf_counter()
        train(args.models, out, runner, None if args.final == "none" else args.final, timing, timing_path)
        timing.setdefault("train_stage_wall_seconds", []).append(round(time.perf_counter() - t0, 1))
        timing_path.write_text(json.dumps(timing, indent=2))
    if args.stage in ("all", "report"):
        results = report(list(MODELS), out)          # every model whose folds are all evaluated
        plot(results)
        public = {**results, "models": {n: {k: v for k, v in e.items() if not k.startswith("_")}
                                        for n, e in results["models"].items()}}
        (out / "results.json").write_text(json.dumps(public, indent=2, default=float))
        text = markdown(results)
        (out / "results.md").write_text(text + "\n")
        print(text)


if __name__ == "__main__":
    main()
