"""Paper B's measures: patch accuracy (Table I), box and mask AP (COCO), Dice per nodule size.

- **Patch accuracy**: p(nodule) >= 0.5 against the label, on balanced patches.
- **AP**: pycocotools' COCOeval, the field's reference implementation, on the
  test slices, for boxes and masks: AP at IoU 0.5 and COCO's AP averaged over
  IoU 0.50:0.05:0.95 (all areas, up to 100 detections per slice). Paper B's
  "mAP" (0.7334 / 0.7965) does not say which; it is set beside both.
- **Dice per size category** (paper A's categories, :data:`lungseg.cache.SIZE_CATEGORIES`):
  per slice, the union of the predicted masks (Mask R-CNN: instances of score
  >= 0.5; U-Net: p >= 0.5) against the union of the circles, the slice filed
  under its largest nodule's category. A mask anywhere else on the slice (the
  U-Net segmenting lung, say) lowers it.
- **Intervals**: 95 % percentile bootstrap over scans (a scan's slices and
  patches move together), :func:`lungseg.metrics.bootstrap_ci`.

Models see each slice's lungs window (:func:`lungseg_maskrcnn.train.window`):
the slice is blank outside the lungs, so nothing is lost, and time is saved.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Callable

import numpy as np
import torch

from lungseg.cache import SIZE_CATEGORIES, size_category
from lungseg.metrics import bootstrap_ci, dice

from .slices import IGNORE, SliceSet, normalize, read_slices
from .train import load_patches, predict_patches, window

log = logging.getLogger(__name__)

SCORE_THRESHOLD = 0.5
#: Paper B's reported Mask R-CNN figures ("mAP"), and its Table I.
PAPER = {"map_all_layers": 0.7334, "map_staged": 0.7965}
PAPER_TABLE1 = {"lenet": 0.950875, "alexnet": 0.958913, "vgg16": 0.959116, "resnet18": 0.941875,
                "resnet20": 0.94275, "resnet50": 0.935875, "resnet101": 0.965945}


def _ci(stat, *arrays, groups, n_resamples: int) -> dict:
    ci = bootstrap_ci(stat, *arrays, groups=groups, n_resamples=n_resamples)
    return {"value": float(stat(*arrays)), "ci95": [float(ci.low), float(ci.high)]}


def evaluate_patches(model, path, *, max_eval: int = 0, seed: int = 0, device="cpu", n_resamples: int = 1000) -> dict:
    """Accuracy of a patch classifier on a slices file's patches, with a bootstrap interval over scans."""
    x, y, scan = load_patches(path, max_eval, seed)
    p = predict_patches(model.to(device), x, device)
    correct = ((p >= 0.5) == y.numpy()).astype(float)
    return {"n_patches": int(len(y)), "n_scans": int(len(np.unique(scan))),
            "accuracy": _ci(np.mean, correct, groups=scan, n_resamples=n_resamples)}


# --------------------------------------------------------------------------
# Slices: predictions
# --------------------------------------------------------------------------

@torch.no_grad()
def predict_mask(model, image01: np.ndarray, lungs_box, device="cpu") -> list[dict]:
    """Mask R-CNN instances of one slice: score, box (x0, y0, x1, y1) and mask (bool) on the whole slice."""
    y0, x0, y1, x1 = window(lungs_box, image01.shape)
    x = torch.from_numpy(np.ascontiguousarray(image01[y0:y1, x0:x1]))[None].expand(3, -1, -1).to(device)
    model.eval()
    out = model([x])[0]
    found = []
    for score, box, m in zip(out["scores"].cpu().numpy(), out["boxes"].cpu().numpy(), out["masks"].cpu().numpy()):
        full = np.zeros(image01.shape, bool)
        full[y0:y1, x0:x1] = m[0] >= 0.5
        found.append({"score": float(score), "box": [float(box[0] + x0), float(box[1] + y0), float(box[2] + x0),
                                                     float(box[3] + y0)], "mask": full})
    return found


@torch.no_grad()
def predict_unet(model, image01: np.ndarray, lungs_box, device="cpu") -> np.ndarray:
    """U-Net p(nodule) of one slice (zero outside its lungs window)."""
    y0, x0, y1, x1 = window(lungs_box, image01.shape)
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(image01[y0:y1, x0:x1]))[None, None].to(device)
    p = np.zeros(image01.shape, np.float32)
    p[y0:y1, x0:x1] = torch.sigmoid(model(x))[0, 0].cpu().numpy()
    return p


# --------------------------------------------------------------------------
# COCO AP
# --------------------------------------------------------------------------

def coco_ap(gt: list[list[dict]], det: list[list[dict]], iou_type: str, shapes: list[tuple[int, int]]
            ) -> tuple[float, float]:
    """(AP[.5:.95], AP50) of detections against ground truth (per image lists; image (h, w)), by COCOeval."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, results = [], [], []
    for i, (g, d, (h, w)) in enumerate(zip(gt, det, shapes)):
        images.append({"id": i, "height": int(h), "width": int(w)})
        for a in g:
            anns.append({"iscrowd": 0, **a, "id": len(anns) + 1, "image_id": i, "category_id": 1})
        for r in d:
            results.append({**r, "image_id": i, "category_id": 1})
    if not anns:
        return float("nan"), float("nan")
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "nodule"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        if not results:
            return 0.0, 0.0
        dt = coco.loadRes(results)
        ev = COCOeval(coco, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode()
    return r


def _gt_of(instances: np.ndarray) -> list[dict]:
    """COCO ground truth of an instance map; excluded findings as crowd regions (neither hit nor miss)."""
    out = []
    for k in np.unique(instances[instances > 0]):
        m = instances == k
        ys, xs = np.nonzero(m)
        x0, y0 = float(xs.min()), float(ys.min())
        out.append({"bbox": [x0, y0, float(xs.max() + 1) - x0, float(ys.max() + 1) - y0],
                    "area": float(m.sum()), "segmentation": _rle(m), "iscrowd": int(k == IGNORE)})
    return out


def _det_of(found: list[dict]) -> list[dict]:
    return [{"bbox": [f["box"][0], f["box"][1], f["box"][2] - f["box"][0], f["box"][3] - f["box"][1]],
             "score": f["score"], "segmentation": _rle(f["mask"])} for f in found]


# --------------------------------------------------------------------------
# Evaluating a slices file
# --------------------------------------------------------------------------

def _category(data: SliceSet, i: int) -> str:
    d = data.diameters(i)
    return SIZE_CATEGORIES[int(size_category(max(d.values())))][1] if d else "none"


def _dice_table(dices: np.ndarray, cats: list[str], scans: np.ndarray, n_resamples: int) -> dict:
    table = {}
    for name in [n for _, n in SIZE_CATEGORIES] + ["all"]:
        sel = np.ones(len(cats), bool) if name == "all" else np.array([c == name for c in cats])
        if sel.any():
            table[name] = {"n_slices": int(sel.sum()),
                           "dice": _ci(np.mean, dices[sel], groups=scans[sel], n_resamples=n_resamples)}
    return table


def evaluate_slices(model, kind: str, path, *, device="cpu", n_resamples: int = 200,
                    progress: Callable[[int, int], None] | None = None, keep: int = 0) -> dict:
    """Mask R-CNN (``kind`` "mask": AP and Dice) or U-Net ("unet": Dice) on a slices file.

    ``keep``: also return the predictions of the first ``keep`` slices (for figures).
    """
    data = read_slices(path)
    model = model.to(device)
    gts, dets, dices, cats, kept = [], [], [], [], []
    for i in range(len(data)):
        image = normalize(data.image[i])
        truth = data.instances[i] > 0
        care = data.instances[i] != IGNORE       # an excluded finding's pixels count for nothing
        if kind == "mask":
            found = predict_mask(model, image, data.lungs[i], device)
            pred = np.zeros_like(truth)
            for f in found:
                if f["score"] >= SCORE_THRESHOLD:
                    pred |= f["mask"]
            gts.append(_gt_of(data.instances[i]))
            dets.append(_det_of(found))
        else:
            pred = predict_unet(model, image, data.lungs[i], device) >= 0.5
            found = None
        dices.append(dice(truth & care, pred & care))
        cats.append(_category(data, i))
        if i < keep:
            kept.append({"image": image, "truth": truth, "pred": pred, "found": found})
        if progress:
            progress(i + 1, len(data))
    scans = np.asarray(data.scan)
    result = {"n_slices": len(data), "n_scans": len(data.scans), "n_nodules_on_slices": int(len(data.inst_slice)),
              "dice": _dice_table(np.asarray(dices), cats, scans, n_resamples)}
    if kind == "mask":
        idx = np.arange(len(data))
        for iou_type, name in (("bbox", "box"), ("segm", "mask")):
            memo = {}

            def ap(sel, t=iou_type, memo=memo):     # both intervals draw the same resamples (same seed)
                key = tuple(int(j) for j in sel)
                if key not in memo:
                    memo[key] = coco_ap([gts[j] for j in sel], [dets[j] for j in sel], t,
                                        [data.image.shape[1:]] * len(sel))
                return memo[key]
            full = ap(idx)
            ci_coco = bootstrap_ci(lambda s: ap(s)[0], idx, groups=scans, n_resamples=n_resamples)
            ci_50 = bootstrap_ci(lambda s: ap(s)[1], idx, groups=scans, n_resamples=n_resamples)
            result[f"{name}_ap"] = {"value": full[0], "ci95": [float(ci_coco.low), float(ci_coco.high)]}
            result[f"{name}_ap50"] = {"value": full[1], "ci95": [float(ci_50.low), float(ci_50.high)]}
        result["detections_per_slice_at_0.5"] = float(np.mean([sum(d["score"] >= SCORE_THRESHOLD for d in ds)
                                                               for ds in dets]))
    if keep:
        result["_kept"] = kept
    return result


def figure(kept: list[dict], title: str, path) -> None:
    """Slices with the truth (green) and the prediction (red) outlined."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(kept)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4))
    for ax, k in zip(np.atleast_1d(axes), kept):
        ys, xs = np.nonzero(k["image"] > 0)
        if ys.size:
            ax.set_xlim(xs.min(), xs.max())
            ax.set_ylim(ys.max(), ys.min())
        ax.imshow(k["image"], cmap="gray", vmin=0, vmax=1)
        if k["truth"].any():
            ax.contour(k["truth"], [0.5], colors="lime", linewidths=1)
        if k["pred"].any():
            ax.contour(k["pred"], [0.5], colors="red", linewidths=1)
        ax.axis("off")
    fig.suptitle(f"{title}: truth green, prediction red")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
