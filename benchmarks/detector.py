"""Train the whole-scan detector and measure it the LUNA16 way, without LIDC-IDRI-0001.

    python benchmarks/detector.py [--data ../shared/data] [--out benchmarks/out/detector]
                                  [--stage all|train|report]

One command, resumable (finished steps are skipped, an interrupted training
resumes from its last epoch); every step is a ``lungseg`` command, printed
before it runs and kept in ``OUT/commands.sh``. About 2 hours on 2 CPU cores.

Training data (nothing of LIDC-IDRI-0001, nothing of the RICORD series):

1. ``lungseg synth``: LIDC twins of two sets of patients of the training
   folds (every 29th of ``nodules_folds5_seed0_fold4.csv``'s train rows, from
   the 3rd and from the 17th; never a patient of ``lungseg demo``'s twins):
   the first with their own nodules filled with real crop texture, the second
   drawn as ``lungseg synth`` draws them by default (as the demo's twins are).
2. ``lungseg composite``: real nodules of folds 0-3 pasted into the real
   Lung_Dx-A0002 (10 composites) and into each twin (3 composites), seed 1.
3. ``lungseg preprocess`` of the composites: each scan's blob candidates
   (in the lungs as ``predict`` finds them), labelled against its nodules
   (:mod:`lungseg.detect`).
4. ``OUT/split.csv``: the composites of the last two twins of each set are the
   val split (where the rescoring is fitted and the operating point chosen),
   the rest train.
5. ``lungseg train-det`` (the false-positive reduction; then its operating
   point at 1 false positive per scan on val), ``lungseg train-seg --preset
   context`` (the Res U-Net on candidate ROIs: nodules in real surroundings)
   and, for p(malignant), ``lungseg train-cls --preset cpu`` on the crops of
   folds 0-3.

Test (the detection benchmark's set, ``benchmarks/detection.py``): real nodules
of fold 4 pasted into LIDC-IDRI-0001, Lung_Dx-A0002 and the RICORD series, and
the real LIDC-IDRI-0001. ``lungseg evaluate --det`` on the unseen backgrounds
(0001 and RICORD) and on A0002 (seen in training, with unseen nodules)
separately; ``lungseg predict --det`` on the real 0001, timed per stage.

Writes ``OUT/results.json`` and ``OUT/results.md``. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from detection import BACKGROUNDS as TEST_BACKGROUNDS
from lungseg.splits import MANIFESTS_DIR, fold_files
from real_nodules import ROOT, Runner, epochs_done, lungseg

FOLD = 4
#: Every 29th training patient of the fold-4 split (rows in file order, from the 3rd): the twins' patients;
#: from the 17th: the drawn twins' patients.
TWIN_STRIDE, TWIN_OFFSET, N_TWINS = 29, 2, 12
DRAWN_OFFSET = 16
VAL_TWINS = 2
SEED = 1
A0002 = "ct/Lung_Dx-A0002"
#: Paper A's Table 4 (Dice of the 3D Res U-Net on whole-scan sub-cases, by size category).
PAPER_TABLE4 = {"micro": 0.466, "small": 0.652, "nodule": 0.805, "mass": 0.910}


def demo_patients() -> set[str]:
    """The patients of ``lungseg demo``'s twins: never trained on, so that the demo's check stays unseen."""
    from lungseg import lidc, synth

    with lidc.LidcDatabase() as db:
        return {r.patient_id for r in synth.default_twin_scans(db, 6)}


def twin_patients(drawn: bool = False) -> list[str]:
    """The patients of the twins with real crop texture (``drawn=False``) or with drawn nodules."""
    with open(fold_files(MANIFESTS_DIR, "nodules", 5, 0)[f"fold{FOLD}"]) as f:
        train = [r["patient_id"] for r in csv.DictReader(f) if r["split"].strip() == "train"]
    pasted = ["LIDC-IDRI-0004"] + train[TWIN_OFFSET::TWIN_STRIDE][:N_TWINS]
    if not drawn:
        return [p for p in pasted if p not in demo_patients()]
    avoid = demo_patients() | set(pasted)
    return [p for p in train[DRAWN_OFFSET::TWIN_STRIDE] if p not in avoid][:N_TWINS]


def train_step(run: Runner, folder: Path, command: list, epochs: int, log: Path) -> None:
    """Run a training command into ``folder``; resume it when unfinished; skip it when done."""
    done = epochs_done(folder)
    if done >= epochs:
        print(f"# {folder.name}: {done} epochs done", flush=True)
        return
    run([*command, *(["--resume"] if (folder / "last.pt").exists() else [])], log_file=log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "detector")
    parser.add_argument("--test-out", type=Path, default=ROOT / "benchmarks" / "out" / "detection",
                        help="The detection benchmark's folder: its test set is reused.")
    parser.add_argument("--stage", choices=["all", "train", "report"], default="all")
    args = parser.parse_args()
    out, data, test_out = args.out.resolve(), args.data.resolve(), args.test_out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = Runner(out)
    folds = fold_files(MANIFESTS_DIR, "nodules", 5, 0)
    fold_split = folds[f"fold{FOLD}"]
    runs = out / "runs"
    runs.mkdir(exist_ok=True)

    from lungseg.configs import DetConfig, PRESETS, ClsConfig

    if args.stage in ("all", "train"):
        # 1-3: training scans.
        groups = {"twins": (twin_patients(), ["--paste-real-nodules", data / "nodules"]),
                  "twins-drawn": (twin_patients(drawn=True), [])}
        backgrounds, val = [], set()
        for folder, (patients, texture) in groups.items():
            twins = out / folder
            missing = [p for p in patients if not (twins / p).is_dir()]
            if missing:
                run(lungseg("synth", "--out", twins, *[a for p in missing for a in ("--patient", p)], *texture))
            backgrounds += [twins / p for p in patients]
            val |= set(patients[-VAL_TWINS:])
        composites = out / "composites"
        run(lungseg("composite", data / A0002, "--crops", data / "nodules", "--out", composites,
                    "--per-background", 10, "--split-file", fold_split, "--split", "train", "--seed", SEED))
        run(lungseg("composite", *backgrounds, "--crops", data / "nodules", "--out", composites,
                    "--per-background", 3, "--split-file", fold_split, "--split", "train", "--seed", SEED))
        cache = out / "train.h5"
        run(lungseg("preprocess", "--composite-root", composites, "--out", cache))
        # 4: split by background.
        split = out / "split.csv"
        rows = [(p.name, "val" if p.name.rsplit("-s", 1)[0] in val else "train")
                for p in sorted(composites.glob("*/nodules.json")) for p in [p.parent]]
        split.write_text("patient_id,split\n" + "".join(f"{a},{b}\n" for a, b in rows))
        # 5: the three networks.
        det_run, seg_run, cls_run = runs / "det", runs / "seg-context", runs / "cls-crops"
        train_step(run, det_run, lungseg("train-det", "--cache", cache, "--out", det_run, "--split-file", split),
                   DetConfig.epochs, runs / "det.log")
        if "rescore" not in _checkpoint(det_run / "best.pt"):
            run(lungseg("train-det", "--cache", cache, "--out", det_run, "--split-file", split, "--resume"),
                log_file=runs / "det.log")
        train_step(run, seg_run, lungseg("train-seg", "--preset", "context", "--cache", cache, "--out", seg_run,
                                         "--split-file", split),
                   PRESETS["seg"]["context"]["epochs"], runs / "seg-context.log")
        crops = out / "crops.h5"
        if not (out / "import.done").exists():
            run(lungseg("import-crops", data / "nodules", "--out", crops))
            (out / "import.done").write_text("")
        train_step(run, cls_run, lungseg("train-cls", "--preset", "cpu", "--cache", crops, "--out", cls_run,
                                         "--split-file", fold_split),
                   PRESETS["cls"]["cpu"].get("epochs", ClsConfig.epochs), runs / "cls-crops.log")
    if args.stage in ("all", "report"):
        report(run, out, data, test_out, fold_split)


def _checkpoint(path: Path) -> dict:
    from lungseg.checkpoints import load_checkpoint

    return load_checkpoint(path) if path.exists() else {}


def report(run: Runner, out: Path, data: Path, test_out: Path, fold_split: Path) -> None:
    runs = out / "runs"
    det, seg = runs / "det" / "best.pt", runs / "seg-context" / "best.pt"
    cls = runs / "cls-crops" / "last.pt"
    # The detection benchmark's test set (same commands as benchmarks/detection.py).
    test_out.mkdir(parents=True, exist_ok=True)
    composites, cache = test_out / "composites", test_out / "test.h5"
    run(lungseg("composite", *[data / b for b in TEST_BACKGROUNDS], "--crops", data / "nodules", "--out",
                composites, "--per-background", 2, "--split-file", fold_split, "--split", "test", "--seed", 0))
    run(lungseg("preprocess", "--composite-root", composites, "--out", cache))
    run(lungseg("preprocess", "--lidc-root", data / "lidc", "--out", cache))
    from lungseg.cache import Cache

    c = Cache(cache)
    names = {uid: str(c.scan(uid).attrs["patient_id"]) for uid in c.series_uids}
    split = out / "test_split.csv"
    # test: backgrounds no network here saw; val: A0002 (a training background) with unseen nodules.
    split.write_text("patient_id,split\n" + "".join(
        f"{n},{'val' if n.startswith('Lung_Dx-A0002') else 'test'}\n" for n in sorted(set(names.values()))))
    results = {"operating_point": _checkpoint(det).get("operating_point")}
    study = out / "candidate_study.json"
    if not study.exists():
        study.write_text(json.dumps(candidate_study(cache), indent=2))
    results["candidates"] = json.loads(study.read_text())
    study = out / "rescoring_study.json"
    if not study.exists():
        study.write_text(json.dumps(rescoring_study(det, out / "train.h5", out / "split.csv", cache, split), indent=2))
    results["rescoring"] = json.loads(study.read_text())
    for name, part in (("unseen", "test"), ("seen_background", "val"), ("all", "all")):
        folder = out / f"evaluate-{name}"
        if not (folder / "evaluation.json").exists():
            run(lungseg("evaluate", "--cache", cache, "--split", part, *(["--split-file", split] if part != "all" else []),
                        "--det", det, "--seg", seg, "--out", folder))
        results[name] = json.loads((folder / "evaluation.json").read_text())["detection"]
    pred = out / "predict-0001"
    if not any(pred.glob("*/nodules.json")):
        run(lungseg("predict", data / "lidc" / "LIDC-IDRI-0001", "--seg", seg, "--cls", cls, "--det", det,
                    "--out", pred))
    report_0001 = json.loads(next(pred.glob("*/nodules.json")).read_text())
    results["predict_0001"] = {k: report_0001[k] for k in ("n_nodules", "nodules", "timings_s", "settings")}
    # The same networks on paper A's path (the segmenter over the whole lungs), for the time per stage.
    paper = out / "predict-0001-paper-path"
    if not any(paper.glob("*/nodules.json")):
        run(lungseg("predict", data / "lidc" / "LIDC-IDRI-0001", "--seg", seg, "--cls", cls, "--out", paper))
    report_paper = json.loads(next(paper.glob("*/nodules.json")).read_text())
    results["predict_0001_paper_path"] = {k: report_paper[k] for k in ("n_nodules", "timings_s")}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "results.md").write_text(markdown(results) + "\n")
    print(markdown(results))


#: Candidates kept per scan at which the candidate study reads sensitivity.
CANDIDATE_CAPS = (100, 250, 500, 1000)


def candidate_study(cache_path: Path) -> dict:
    """Sensitivity of the candidate stage alone on the test scans, ranked by LoG response or by response x blobness.

    Each scan is read from its source and preprocessed as ``lungseg predict``
    does (:func:`lungseg.infer.model_grid`); a nodule is found at a cap when
    one of the best ``cap`` candidates lies within its radius.
    """
    import numpy as np

    from lungseg.cache import Cache
    from lungseg.configs import DetectConfig, PreprocessConfig
    from lungseg import metrics
    from lungseg.detect import candidates, label_candidates, suppress
    from lungseg.dicomio import read_series
    from lungseg.evaluate import reference_nodules
    from lungseg.infer import model_grid

    cache = Cache(cache_path)
    pre = PreprocessConfig.from_dict(cache.config)
    found = {w: {cap: 0 for cap in CANDIDATE_CAPS} for w in (0.0, DetectConfig().blob_weight)}
    n_nodules, peaks, froc_scans = 0, [], []
    for uid in cache.series_uids:
        g = cache.scan(uid)
        volume = read_series(ROOT / g.attrs["source"])     # sources are recorded relative to where preprocess ran
        hu, lungs = model_grid(volume, pre)
        ref = reference_nodules(cache, uid)
        nodules = [(c, d) for c, d, r in zip(ref["centroid_resampled"], ref["diameter_mm"], ref["relevant"]) if r]
        n_nodules += len(nodules)
        for w in found:
            cands = candidates(hu, lungs, pre.spacing, DetectConfig(max_candidates=100_000, blob_weight=w))
            label, which = label_candidates(cands, pre.spacing, nodules)
            first = [int(np.flatnonzero(which == j)[0]) if (which == j).any() else None for j in range(len(nodules))]
            for cap in CANDIDATE_CAPS:
                found[w][cap] += sum(f is not None and f < cap for f in first)
        peaks.append(len(cands))
        # No false-positive reduction: the default candidates scored by their rank alone, suppressed as the detector's.
        cands = candidates(hu, lungs, pre.spacing)
        score = 1.0 / (1.0 + np.arange(len(cands)))
        keep = suppress(cands.centres * np.asarray(pre.spacing), cands.radius_mm, score)
        froc_scans.append({"finding_centres_mm": cands.centres[keep] * np.asarray(pre.spacing),
                           "finding_scores": score[keep], "nodule_centres_mm": ref["centres_mm"],
                           "nodule_diameters_mm": ref["diameter_mm"], "nodule_relevant": ref["relevant"]})
    unseen = [not str(cache.scan(u).attrs["patient_id"]).startswith("Lung_Dx-A0002") for u in cache.series_uids]
    rank_only = {}
    for name, scans in (("unseen", [f for f, u in zip(froc_scans, unseen) if u]),
                        ("seen_background", [f for f, u in zip(froc_scans, unseen) if not u])):
        froc = metrics.froc(scans)
        rank_only[name] = {"cpm": froc["cpm"], "sensitivity_at_fp_rates": dict(zip(
            [f"{r:g}" for r in froc["fp_rates"]], froc["sensitivity_at_fp_rates"].tolist()))}
    return {"n_scans": len(cache.series_uids), "n_nodules": n_nodules, "peaks_per_scan": peaks,
            "rank_only": rank_only,
            "sensitivity": {f"blob_weight_{w:g}": {str(cap): found[w][cap] / n_nodules for cap in CANDIDATE_CAPS}
                            for w in found}}


#: Feature sets the rescoring study compares (columns of lungseg.detect.CANDIDATE_FEATURES).
RESCORE_STUDY = {"network alone": [0], "rank alone": [1], "network + rank (lungseg)": [0, 1],
                 "network + response + scale": [0, 2, 3], "network + rank + response + scale": [0, 1, 2, 3]}


def rescoring_study(det: Path, train_cache: Path, train_split: Path, test_cache: Path, test_split: Path) -> dict:
    """CPM of p(nodule) from subsets of the rescoring features, each fitted on the val split, on val and the test sets."""
    import numpy as np
    import torch

    from lungseg import metrics
    from lungseg.cache import Cache
    from lungseg.checkpoints import load_model
    from lungseg.detect import CANDIDATE_FEATURES, Rescorer, candidate_features, score_rois, suppress
    from lungseg.evaluate import reference_nodules
    from lungseg.splits import read_split, split_scans

    model, _ = load_model(det, kind="det")

    def scans(cache_path, split_file, split):
        cache, out = Cache(cache_path), []
        for uid in split_scans(cache, read_split(split_file), split):
            c, spacing = cache.scan(uid)["candidates"], np.asarray(cache.scan(uid).attrs["spacing"], float)
            p = score_rois(model, cache.candidate_rois(uid), device=torch.device("cpu"))
            out.append({"x": candidate_features(p, c["response"][()], c["radius_mm"][()]), "label": c["label"][()],
                        "centres": c["centre"][()] * spacing, "radius": c["radius_mm"][()],
                        "ref": reference_nodules(cache, uid)})
        return out

    sets = {"val": scans(train_cache, train_split, "val"), "unseen": scans(test_cache, test_split, "test"),
            "seen_background": scans(test_cache, test_split, "val")}
    x = np.concatenate([s["x"] for s in sets["val"]])
    y = np.concatenate([s["label"] for s in sets["val"]])
    out = {}
    for name, cols in RESCORE_STUDY.items():
        r = Rescorer.fit(x[y >= 0][:, cols], y[y >= 0], features=[CANDIDATE_FEATURES[c] for c in cols])
        out[name] = {}
        for part, items in sets.items():
            froc = []
            for s in items:
                score = r(s["x"])
                keep = suppress(s["centres"], s["radius"], score)
                froc.append({"finding_centres_mm": s["centres"][keep], "finding_scores": score[keep],
                             "nodule_centres_mm": s["ref"]["centres_mm"], "nodule_diameters_mm": s["ref"]["diameter_mm"],
                             "nodule_relevant": s["ref"]["relevant"]})
            out[name][part] = metrics.froc(froc)["cpm"]
    return out


def _froc_row(name: str, f: dict) -> str:
    at, ci, c = f["sensitivity_at_fp_rates"], f["sensitivity_ci95"], f["counts"]
    return (f"| {name} ({c['n_scans']} scans, {c['n_relevant']} nodules) | {f['cpm']:.3f} "
            f"[{f['cpm_ci95'][0]:.3f}, {f['cpm_ci95'][1]:.3f}] | "
            + " | ".join(f"{at[k]:.3f} [{ci[k][0]:.3f}, {ci[k][1]:.3f}]" for k in ("1", "2", "4"))
            + f" | {c['n_hit']}/{c['n_relevant']} |")


def markdown(results: dict) -> str:
    op = results.get("operating_point") or {}
    lines = [f"Operating point: p(nodule) >= {op.get('threshold', float('nan')):.3f}, chosen on {op.get('data')}: "
             f"{op.get('fp_per_scan', float('nan')):.2f} FP/scan, sensitivity {op.get('sensitivity', float('nan')):.3f}",
             "", "| test scans | CPM [95 % CI] | sens. @1 FP/scan | @2 | @4 | found among all findings |",
             "|---|---|---|---|---|---|"]
    for name in ("unseen", "seen_background", "all"):
        r = results["candidates"]["rank_only"].get(name)
        if r is None:
            lines.append(_froc_row(name, results[name]["froc"]))
            continue
        at = r["sensitivity_at_fp_rates"]
        lines.append(f"| {name}, candidates by rank alone (no false-positive reduction) | {r['cpm']:.3f} | "
                     f"{at['1']:.3f} | {at['2']:.3f} | {at['4']:.3f} | |")
        lines.append(_froc_row(name, results[name]["froc"]))
    for table in ("in_context", "nodule_centred"):
        lines += ["", f"Table 4 ({table}), Dice by size category (n):", "",
                  "| test scans | micro | small | nodule | mass | all |", "|---|---|---|---|---|---|"]
        for name in ("unseen", "seen_background", "all"):
            rows = results[name][table]["per_size_category"]
            lines.append(f"| {name} | " + " | ".join(
                f"{rows[k]['dice']:.3f} ({rows[k]['n']})" if rows[k]["n"] else "-" for k in
                ("micro", "small", "nodule", "mass", "all")) + " |")
        lines.append("| paper A (whole-scan sub-cases) | " + " | ".join(
            f"{PAPER_TABLE4[k]:.3f}" for k in ("micro", "small", "nodule", "mass")) + " | |")
    lines += ["", "p(nodule) from which evidence (each a logistic regression fitted on the val split): CPM", "",
              "| features | val (4 twins, 12 composites) | unseen | seen background |", "|---|---|---|---|"]
    for name, row in results["rescoring"].items():
        lines.append(f"| {name} | {row['val']:.3f} | {row['unseen']:.3f} | {row['seen_background']:.3f} |")
    c = results["candidates"]
    lines += ["", f"Candidates alone ({c['n_scans']} test scans, {c['n_nodules']} relevant nodules; peaks per scan "
              f"{min(c['peaks_per_scan'])}-{max(c['peaks_per_scan'])}): sensitivity within the best N per scan", "",
              "| ranking | " + " | ".join(f"N = {k}" for k in CANDIDATE_CAPS) + " |",
              "|---|" + "---|" * len(CANDIDATE_CAPS)]
    for name, row in c["sensitivity"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[str(k)]:.3f}" for k in CANDIDATE_CAPS) + " |")
    p = results["predict_0001"]
    lines += ["", f"predict on the real LIDC-IDRI-0001: {p['n_nodules']} findings; timings "
              + ", ".join(f"{k} {v:.1f} s" for k, v in p["timings_s"].items()), "",
              "| id | p(nodule) | diameter mm | centre LPS mm | side | p(malignant) |", "|---|---|---|---|---|---|"]
    q = results["predict_0001_paper_path"]
    lines[-3:-3] = [f"the same networks on paper A's path (segmenter over the whole lungs): {q['n_nodules']} findings; "
                    "timings " + ", ".join(f"{k} {v:.1f} s" for k, v in q["timings_s"].items()), ""]
    for n in p["nodules"]:
        lines.append(f"| {n['id']} | {n.get('nodule_probability', float('nan')):.3f} | {n['diameter_mm']:.1f} "
                     f"| {', '.join(f'{v:.1f}' for v in n['centroid_world_lps_mm'])} | {n['lung_side']} "
                     f"| {n.get('malignancy_probability', float('nan')):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
