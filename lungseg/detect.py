"""Whole-scan nodule detection: blob candidates, then a small 3D network that rejects false ones.

The detector of ``lungseg predict``, in two stages on the preprocessing grid
(:class:`lungseg.configs.PreprocessConfig`: 3 x 1.5 x 1.5 mm, lung window):

1. **Candidates** (:func:`candidates`), no training: the scale-normalised
   Laplacian of Gaussian of the HU volume, -sigma^2 * LoG, at the scales of
   :class:`lungseg.configs.DetectConfig` (a sphere of radius r answers most at
   sigma = r / sqrt(3); a tube answers weaker than a sphere of its width). Its
   local maxima over space and scale inside the lung mask, above
   ``min_response`` HU and on tissue denser than ``min_hu``, strongest first,
   at most ``max_candidates`` per scan. Vessels, airway walls and the chest
   wall give candidates too: that is the next stage's job.
2. **False-positive reduction** (:class:`CandidateNet`): a small 3D network on
   the ROI around each candidate (the classifier's ROI shape and centring,
   :func:`lungseg.preprocess.roi_start`) gives p(nodule).

:func:`label_candidates` scores candidates against known nodules with the FROC
rule of :func:`lungseg.metrics.froc` (a candidate hits a nodule when its centre
lies within the nodule's radius), so training labels and the benchmark agree.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from .configs import DetectConfig
from .logistic import LogisticRegression


@dataclass
class Candidates:
    """Candidate centres of one scan on the preprocessing grid."""

    centres: np.ndarray        # (n, 3) float voxel indices (z, y, x)
    radius_mm: np.ndarray      # (n,) radius of the answering scale, sqrt(3) * sigma
    response: np.ndarray       # (n,) -sigma^2 LoG at the centre, HU

    def __len__(self) -> int:
        return len(self.centres)

    def take(self, keep) -> "Candidates":
        return Candidates(self.centres[keep], self.radius_mm[keep], self.response[keep])


#: HU the candidates see: dense tissue all alike above 100 HU.
CANDIDATE_CLIP_HU = (-1000.0, 100.0)


def _smooth(hu: np.ndarray, spacing: Sequence[float], sigma_mm: float, clip=CANDIDATE_CLIP_HU) -> np.ndarray:
    """HU clipped to ``clip`` (None: as it is) and smoothed with a Gaussian of ``sigma_mm``, float32."""
    hu = hu if clip is None else np.clip(hu, *clip)
    return ndimage.gaussian_filter(hu.astype(np.float32, copy=False), [sigma_mm / s for s in spacing], mode="nearest")


def blob_response(smooth: np.ndarray, spacing: Sequence[float], sigma_mm: float) -> np.ndarray:
    """-sigma^2 * Laplacian (mm units) of HU smoothed at ``sigma_mm``, float32: bright blobs of radius ~sqrt(3) sigma peak."""
    lap = np.zeros_like(smooth)
    for axis, s in enumerate(spacing):
        lap += ndimage.correlate1d(smooth, [1.0, -2.0, 1.0], axis=axis, mode="nearest") / (s * s)
    lap *= -sigma_mm ** 2
    return lap


def blobness(smooth: np.ndarray, spacing: Sequence[float], points: np.ndarray) -> np.ndarray:
    """Per point, |smallest| / |largest| Hessian eigenvalue of ``smooth``: near 1 on a blob, near 0 on a tube or sheet.

    Negative eigenvalues only count (a bright structure curves down): points
    with fewer than three give 0.
    """
    if len(points) == 0:
        return np.zeros(0, np.float32)
    pts = np.asarray(points, int)
    shape = np.asarray(smooth.shape)
    h = np.zeros((len(pts), 3, 3))

    def at(offset):
        q = np.clip(pts + offset, 0, shape - 1)
        return smooth[tuple(q.T)].astype(np.float64)

    c = at(np.zeros(3, int))
    eye = np.eye(3, dtype=int)
    for a in range(3):
        h[:, a, a] = (at(eye[a]) - 2 * c + at(-eye[a])) / spacing[a] ** 2
        for b in range(a + 1, 3):
            v = (at(eye[a] + eye[b]) - at(eye[a] - eye[b]) - at(-eye[a] + eye[b]) + at(-eye[a] - eye[b])) \
                / (4 * spacing[a] * spacing[b])
            h[:, a, b] = h[:, b, a] = v
    lam = np.linalg.eigvalsh(h)                         # ascending: most negative first
    ratio = np.where(lam[:, 2] < 0, np.abs(lam[:, 2]) / np.maximum(np.abs(lam[:, 0]), 1e-9), 0.0)
    return ratio.astype(np.float32)


def _support(spacing: Sequence[float], cfg: DetectConfig) -> np.ndarray:
    """Voxels per axis that a candidate's evidence reaches: the widest Gaussian (scipy's 4 sigma), the
    Laplacian's and the Hessian's one voxel, and the peak search's half window."""
    sigma = max(cfg.sigmas_mm)
    return np.array([int(4.0 * sigma / s + 0.5) + 1 + max(1, int(round(cfg.nms_mm / s))) for s in spacing])


def candidates(hu: np.ndarray, lungs: np.ndarray, spacing: Sequence[float], cfg: DetectConfig = DetectConfig()
               ) -> Candidates:
    """Blob candidates of a resampled HU volume (z, y, x) inside ``lungs``; most blob-like first.

    Peaks of the strongest scale-normalised LoG response over the scales, then
    ranked by response x (1 - w + w x :func:`blobness` at the peak's scale),
    w = ``cfg.blob_weight``, so that vessels (tubes) give way to round
    structures when there are more than ``max_candidates`` peaks. Only the
    lungs' bounding box, grown by all that a peak's value reads
    (:func:`_support`), is filtered: the same candidates as over the whole
    volume, in less time.
    """
    box = ndimage.find_objects(np.asarray(lungs, np.uint8))
    if not box:
        return Candidates(np.zeros((0, 3), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32))
    reach = _support(spacing, cfg)
    box = tuple(slice(max(b.start - r, 0), min(b.stop + r, n)) for b, r, n in zip(box[0], reach, hu.shape))
    hu, lungs = np.clip(hu[box], *CANDIDATE_CLIP_HU).astype(np.float32), np.asarray(lungs[box], bool)
    best = np.full(hu.shape, -np.inf, np.float32)
    scale = np.zeros(hu.shape, np.uint8)

    def at_scale(sigma: float) -> tuple[np.ndarray, np.ndarray]:
        smooth = _smooth(hu, spacing, sigma, clip=None)
        return smooth, blob_response(smooth, spacing, sigma)

    # The scales in threads: scipy's filters release the GIL, so they run side by side on the cores.
    with ThreadPoolExecutor(max_workers=max(1, min(len(cfg.sigmas_mm), os.cpu_count() or 1))) as pool:
        scales = list(pool.map(at_scale, cfg.sigmas_mm))
    smoothed = [sm for sm, _ in scales]
    for i, (_, r) in enumerate(scales):
        better = r > best
        np.copyto(best, r, where=better)
        scale[better] = i
    size = [2 * max(1, int(round(cfg.nms_mm / s))) + 1 for s in spacing]
    peaks = (best == ndimage.maximum_filter(best, size=size, mode="nearest")) & lungs & (best >= cfg.min_response)
    idx = np.argwhere(peaks & (smoothed[0] >= cfg.min_hu))
    response = best[tuple(idx.T)]
    which = scale[tuple(idx.T)]
    round_ = np.zeros(len(idx), np.float32)
    for i in range(len(cfg.sigmas_mm)):
        at = which == i
        round_[at] = blobness(smoothed[i], spacing, idx[at])
    rank = response * (1 - cfg.blob_weight + cfg.blob_weight * round_)
    order = np.argsort(-rank, kind="stable")[: cfg.max_candidates]
    idx = idx[order] + [b.start for b in box]
    sigmas = np.asarray(cfg.sigmas_mm, np.float32)[which[order]]
    return Candidates(idx.astype(np.float32), sigmas * math.sqrt(3), response[order].astype(np.float32))


def label_candidates(cands: Candidates, spacing: Sequence[float], nodules: Sequence[tuple[Sequence[float], float]],
                     ignore: Sequence[tuple[Sequence[float], float]] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(label, nodule index) per candidate: 1 within a nodule's radius, -1 within an ignored one's, else 0.

    ``nodules`` and ``ignore``: (centre voxel zyx on the same grid, diameter mm).
    """
    label = np.zeros(len(cands), np.int8)
    which = np.full(len(cands), -1, np.int64)
    sp = np.asarray(spacing, float)
    for value, group in ((-1, ignore), (1, nodules)):
        for j, (centre, diameter) in enumerate(group):
            d = np.linalg.norm((cands.centres - np.asarray(centre, float)) * sp, axis=1)
            hit = d <= max(diameter / 2, 1e-6)
            label[hit] = value
            if value == 1:
                which[hit] = j
    return label, which


# --------------------------------------------------------------------------
# False-positive reduction
# --------------------------------------------------------------------------

def candidate_net(width: int = 12, num_classes: int = 2):
    """A small 3D CNN on 1 x 16 x 48 x 48 candidate ROIs: logits (nodule or not); about 0.08 GMAC per ROI at width 12.

    Three stages of two 3 x 3 x 3 convolutions (batch norm, ReLU) at widths w,
    2w, 4w; the first halves the in-plane size (1.5 -> 3 mm voxels, as along
    z), then max pooling by 2 between stages; global average and max pooling,
    one linear layer.
    """
    import torch
    from torch import nn

    def block(cin, cout, stride=1):
        return [nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(cout),
                nn.ReLU(inplace=True)]

    class CandidateNet(nn.Module):
        def __init__(self):
            super().__init__()
            w = width
            self.features = nn.Sequential(
                *block(1, w, stride=(1, 2, 2)), *block(w, w), nn.MaxPool3d(2),
                *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool3d(2),
                *block(2 * w, 4 * w), *block(4 * w, 4 * w))
            self.head = nn.Linear(8 * w, num_classes)

        def forward(self, x):
            f = self.features(x)
            return self.head(torch.cat([f.mean(dim=(2, 3, 4)), f.amax(dim=(2, 3, 4))], dim=1))

    return CandidateNet()


def score_rois(model, images: np.ndarray, *, device, precision: str = "fp32", batch_size: int | None = None
               ) -> np.ndarray:
    """p(nodule) of each (16, 48, 48) windowed ROI, float32.

    ``batch_size`` defaults to 16 ROIs on the CPU (their activations stay in
    cache: twice as fast as 256 on two cores) and 256 on a GPU.
    """
    import torch

    from .device import precision_context

    model.eval()
    batch_size = batch_size or (16 if torch.device(device).type == "cpu" else 256)
    out = []
    with torch.no_grad(), precision_context(device, precision):
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.asarray(images[i:i + batch_size], np.float32)[:, None]).to(device)
            out.append(torch.softmax(model(x).float(), dim=1)[:, 1].cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def segment_rois(model, rois: np.ndarray, *, device, precision: str = "fp32", batch_size: int = 16) -> np.ndarray:
    """A segmenter's probabilities on (K, d, h, w) ROIs, float32 of the same shape.

    ROIs whose sizes are not multiples of the network's (2 ** poolings) are
    padded at the end with their edge values and cropped back (16 x 48 x 48
    ROIs go in as they are).
    """
    import torch

    from .device import precision_context

    multiple = getattr(getattr(model, "config", None), "size_multiple", 1)
    shape = rois.shape[1:]
    size = [-(-n // multiple) * multiple for n in shape]
    if multiple > 1 and np.prod([n // multiple for n in size]) == 1:
        size[-1] *= 2               # instance norm needs more than one voxel at the bottleneck
    pad = [(0, 0)] + [(0, m - n) for m, n in zip(size, shape)]
    out = np.zeros(rois.shape, np.float32)
    model.eval()
    for i in range(0, len(rois), batch_size):
        x = np.pad(np.asarray(rois[i:i + batch_size], np.float32), pad, mode="edge")
        with torch.no_grad(), precision_context(device, precision):
            p = torch.sigmoid(model(torch.from_numpy(x[:, None]).to(device)).float())[:, 0].cpu().numpy()
        out[i:i + batch_size] = p[(slice(None), *[slice(0, n) for n in shape])]
    return out


def suppress(centres_mm: np.ndarray, radius_mm: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Greedy non-maximum suppression: indices kept, best first.

    A candidate is dropped when it lies within the radius of a better one
    kept (or the better one within its own), so a large nodule, or a vessel,
    is one finding and not one per blob scale.
    """
    order = np.argsort(-np.asarray(scores), kind="stable")
    kept: list[int] = []
    for i in order:
        if kept:
            d = np.linalg.norm(centres_mm[kept] - centres_mm[i], axis=1)
            if np.any(d <= np.maximum(radius_mm[kept], radius_mm[i])):
                continue
        kept.append(int(i))
    return np.asarray(kept, np.int64)


def finding_masks(probs: np.ndarray, starts: np.ndarray, shape: Sequence[int], spacing: Sequence[float],
                  threshold: float = 0.5) -> tuple[np.ndarray, list[int]]:
    """The findings' masks on the model grid from the segmenter's ROI probabilities, best finding first.

    ``probs`` (K, d, h, w) are the segmenter's probabilities on the ROIs of the
    findings starting at ``starts`` (K, 3), in order of p(nodule). A finding's
    mask is the component of ``probs >= threshold`` nearest the ROI's centre
    (:func:`lungseg.preprocess.roi_centre`); voxels already given to a better
    finding stay with it. Returns the label volume (finding ``i`` of the kept
    ones has label ``i + 1``) and the indices into ``probs`` that got a mask.
    """
    from .preprocess import roi_centre

    labels = np.zeros(tuple(shape), np.uint16)
    kept: list[int] = []
    roi_shape = probs.shape[1:]
    centre = roi_centre(roi_shape)
    for k in range(len(probs)):
        comps, n = ndimage.label(probs[k] >= threshold, structure=np.ones((3, 3, 3)))
        if n == 0:
            continue
        where = np.argwhere(comps > 0)
        nearest = comps[tuple(where[np.argmin(np.linalg.norm((where - centre) * np.asarray(spacing), axis=1))])]
        start = starts[k]
        region = tuple(slice(max(s0, 0), min(s0 + n0, size)) for s0, n0, size in zip(start, roi_shape, shape))
        if any(r.stop <= r.start for r in region):
            continue
        local = tuple(slice(r.start - s0, r.stop - s0) for r, s0 in zip(region, start))
        mine = (comps[local] == nearest) & (labels[region] == 0)
        if not mine.any():
            continue
        labels[region][mine] = len(kept) + 1
        kept.append(k)
    return labels, kept


#: What :func:`candidate_features` measures of each candidate.
CANDIDATE_FEATURES = ("cnn_logit", "log_rank", "log_response", "log_radius_mm")

#: What the rescoring reads: the network's score and the candidate's rank by blob-likeness. The LoG response
#: and scale are left out: fitted on a few development scans, which hold few large nodules, their weights
#: extrapolate to masses (a scale 8 SD above the development mean took a 31 mm mass the network scored 0.97
#: down to 0.30). ``python benchmarks/detector.py`` compares the feature sets.
RESCORE_FEATURES = ("cnn_logit", "log_rank")


def candidate_features(p_cnn: np.ndarray, response: np.ndarray, radius_mm: np.ndarray) -> np.ndarray:
    """(K, 4) features of a scan's K candidates, in candidate order (most blob-like first): see CANDIDATE_FEATURES."""
    p = np.clip(np.asarray(p_cnn, np.float64), 1e-6, 1 - 1e-6)
    k = len(p)
    return np.stack([np.log(p / (1 - p)), np.log1p(np.arange(k)), np.log(np.maximum(response, 1.0)),
                     np.log(np.maximum(radius_mm, 0.1))], axis=1).reshape(k, len(CANDIDATE_FEATURES))


def feature_columns(names: Sequence[str]) -> list[int]:
    """Columns of :func:`candidate_features` holding ``names``."""
    unknown = [n for n in names if n not in CANDIDATE_FEATURES]
    if unknown:
        raise ValueError(f"unknown candidate features {unknown}; known: {CANDIDATE_FEATURES}")
    return [CANDIDATE_FEATURES.index(n) for n in names]


class Rescorer(LogisticRegression):
    """p(nodule) from the network's score and the candidate's own evidence: logistic regression on
    :data:`RESCORE_FEATURES` of :func:`candidate_features`.

    The network has only seen the backgrounds it trained on; the candidate's
    rank by blob-likeness is the same on any scanner. Fitted on development
    data (``lungseg train-det``: the val split), with standardised features and
    a weak L2 penalty (:class:`lungseg.logistic.LogisticRegression`). Called on
    the full :func:`candidate_features`, it reads its own columns, so a
    checkpoint fitted on another subset of :data:`CANDIDATE_FEATURES` still loads.
    """

    FEATURES = RESCORE_FEATURES

    @classmethod
    def from_dict(cls, d: dict, features: Sequence[str] | None = None) -> "Rescorer":
        names = tuple(features) if features is not None else tuple(d.get("features", ()))
        feature_columns(names)
        return super().from_dict(d, features=names)

    def decision(self, x: np.ndarray) -> np.ndarray:
        """The log-odds of each row of :func:`candidate_features`."""
        return super().decision(np.asarray(x)[:, feature_columns(self.features)])


def p_nodule(model, rois: np.ndarray, response: np.ndarray, radius_mm: np.ndarray, rescorer: Rescorer | None, *,
             device, precision: str = "fp32") -> np.ndarray:
    """p(nodule) of a scan's candidates (in candidate order): the network's, rescored when a rescorer is given."""
    p = score_rois(model, rois, device=device, precision=precision)
    return p if rescorer is None else rescorer(candidate_features(p, response, radius_mm))


def scan_findings(model, cache, uid: str, *, device, precision: str = "fp32", rescorer: Rescorer | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A cache scan's candidates scored and suppressed: (candidate indices, their p(nodule)), best first."""
    c = cache.candidates(uid)
    scores = p_nodule(model, cache.candidate_rois(uid), c["response"][:], c["radius_mm"][:], rescorer, device=device,
                      precision=precision)
    keep = suppress(c["centre"][:] * np.asarray(cache.scan(uid).attrs["spacing"], float), c["radius_mm"][:], scores)
    return keep, scores[keep]


def cache_findings(model, cache, series_uids, *, device, precision: str = "fp32",
                   rescorer: Rescorer | None = None) -> list[dict]:
    """Per scan of a cache: the detector's findings and the reference nodules.

    Each item holds ``froc`` (the scan as :func:`lungseg.metrics.froc` reads
    it), ``keep`` (the findings' candidate indices, best first) and
    ``centres`` (their voxel indices on the model grid).
    """
    from .evaluate import reference_nodules

    scans = []
    for uid in series_uids:
        keep, scores = scan_findings(model, cache, uid, device=device, precision=precision, rescorer=rescorer)
        voxels = cache.candidates(uid)["centre"][:][keep].reshape(-1, 3)
        ref = reference_nodules(cache, uid)
        froc = {"finding_centres_mm": voxels * np.asarray(cache.scan(uid).attrs["spacing"], float),
                "finding_scores": scores, "nodule_centres_mm": ref["centres_mm"],
                "nodule_diameters_mm": ref["diameter_mm"], "nodule_relevant": ref["relevant"]}
        scans.append({"uid": uid, "froc": froc, "keep": keep, "centres": voxels, "ref": ref})
    return scans


def calibrate(checkpoint, cache_path, split: str = "val") -> dict:
    """Fit a detector checkpoint's rescoring and choose its operating point on a split of its cache; store both in it.

    The :class:`Rescorer` is fitted on the ``split`` scans' candidates (those
    on nodules of fewer readers left out); the operating point is the FROC
    threshold of the rescored p(nodule) at the config's ``target_fp_per_scan``
    (:func:`lungseg.metrics.froc_operating_threshold`) on the same scans.
    Returns the operating point, with the FROC's CPM on that split.
    """
    import torch

    from . import metrics
    from .cache import Cache
    from .checkpoints import load_checkpoint, load_model, save_checkpoint
    from .configs import FROC_MAX_FINDINGS
    from .errors import TrainingError
    from .splits import read_split, split_scans

    model, ckpt = load_model(checkpoint, kind="det")
    cache = Cache(cache_path)
    uids = split_scans(cache, read_split(ckpt["config"]["split_file"]), split)
    if not uids:
        raise TrainingError(f"{cache_path}: no {split} scans to calibrate the detector on")
    device = torch.device("cpu")
    xs, ys = [], []
    for uid in uids:
        c = cache.candidates(uid)
        x = candidate_features(score_rois(model, cache.candidate_rois(uid), device=device), c["response"][:], c["radius_mm"][:])
        label = c["label"][:]
        xs.append(x[label >= 0])
        ys.append(label[label >= 0])
    y = np.concatenate(ys)
    if len(set(y.tolist())) < 2:
        raise TrainingError(f"{cache_path}: the {split} scans' candidates hold one class only; cannot calibrate")
    rescorer = Rescorer.fit(np.concatenate(xs)[:, feature_columns(RESCORE_FEATURES)], y)
    target = float(ckpt["config"]["target_fp_per_scan"])
    result = metrics.froc([f["froc"] for f in cache_findings(model, cache, uids, device=device, rescorer=rescorer)],
                          max_findings=FROC_MAX_FINDINGS)
    threshold = metrics.froc_operating_threshold(result, target)
    if not math.isfinite(threshold):
        threshold = 1.0
    at = np.asarray(result["thresholds"]) >= threshold
    op = {"threshold": round(float(threshold), 4), "target_fp_per_scan": target,
          "fp_per_scan": float(np.asarray(result["fp_per_scan"])[at].max(initial=0.0)),
          "sensitivity": float(np.asarray(result["sensitivity"])[at].max(initial=0.0)),
          "cpm": float(result["cpm"]), "data": f"{Path(cache_path).name}, split {split} ({len(uids)} scans)"}
    ckpt = load_checkpoint(checkpoint, kind="det")
    ckpt["rescore"] = rescorer.to_dict()
    ckpt["operating_point"] = op
    save_checkpoint(checkpoint, ckpt)
    return op
