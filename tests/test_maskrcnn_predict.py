"""lungseg_maskrcnn.predict: instances per slice merged into 3D findings, in lungseg's report format."""

import json

import numpy as np
import pytest

pytest.importorskip("lungseg_maskrcnn")
torch = pytest.importorskip("torch")

from conftest import TINY_LUNA_NODULES, tiny_luna_volume  # noqa: E402
from lungseg.errors import LungsegError  # noqa: E402
from lungseg_maskrcnn import configs, predict, train  # noqa: E402


class Bright(torch.nn.Module):
    """A stand-in Mask R-CNN: one instance per connected bright blob of the window (score 0.9)."""

    def forward(self, images):
        from scipy import ndimage

        out = []
        for x in images:
            img = x[0].numpy()
            labels, n = ndimage.label(img > 0.45)            # soft tissue in the lungs (nodules, the vessel)
            boxes, scores, masks = [], [], []
            for i, box in enumerate(ndimage.find_objects(labels), start=1):
                m = labels == i
                boxes.append([box[1].start, box[0].start, box[1].stop, box[0].stop])
                scores.append(0.9 if m.sum() > 3 else 0.2)
                masks.append(m[None].astype(np.float32))
            h, w = img.shape
            out.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "scores": torch.tensor(scores, dtype=torch.float32),
                        "labels": torch.ones(len(boxes), dtype=torch.int64),
                        "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, 1, h, w))})
        return out


def test_instances_on_neighbouring_slices_merge_into_one_finding():
    volume = tiny_luna_volume()
    pred = predict.predict_volume(volume, Bright().eval())
    big = TINY_LUNA_NODULES[0]
    hits = [n for n in pred.nodules
            if np.linalg.norm(np.subtract(n["centroid_voxel_zyx"], big[:3]) * volume.spacing) < 3]
    assert len(hits) == 1                                     # one finding, not one per slice
    n = hits[0]
    assert n["slices"] >= 3 and n["nodule_probability"] == pytest.approx(0.9)
    assert abs(n["diameter_mm"] - 12) < 3 and n["lung_side"] == "left"
    assert pred.labels.shape == volume.shape and (pred.labels == n["id"]).sum() > 0
    assert [m["nodule_probability"] for m in pred.nodules] == sorted((m["nodule_probability"] for m in pred.nodules),
                                                                    reverse=True)


def test_predict_writes_lungsegs_report_for_a_metaimage(tiny_luna, tmp_path, monkeypatch):
    cfg = configs.make_config("mask", "cpu", iterations=1, crop=64, save_every=1, device="cpu")
    # a real checkpoint of the plugin (untrained weights), with the stand-in model in its place
    model = train.build_model("mask", cfg)
    train._save(tmp_path / "model.pt", "mask", cfg, model, None, 1)
    monkeypatch.setattr(predict, "load", lambda path, kind=None: (Bright().eval(), cfg, {"step": 1}))
    mhd = next(tiny_luna.glob("*.mhd"))
    results = list(predict.predict(mhd, tmp_path / "model.pt", tmp_path / "out", device="cpu"))
    assert [r[1] for r in results] == ["done"]
    report = json.loads(results[0][2].read_text())
    assert report["n_nodules"] >= 1 and report["checkpoints"]["maskrcnn"]["arch"] == "maskrcnn-resnet18-fpn"
    assert "malignancy_probability" not in report["nodules"][0]
    for name in ("nodules.csv", "nodules.nii.gz", "lungs.nii.gz", "nodule_001.png"):
        assert (results[0][2].parent / name).exists()
    again = list(predict.predict(mhd, tmp_path / "model.pt", tmp_path / "out", device="cpu"))
    assert [r[1] for r in again] == ["skipped"]


def test_bad_inputs(tmp_path):
    with pytest.raises(LungsegError, match="threshold"):
        list(predict.predict(tmp_path, tmp_path / "m.pt", tmp_path / "o", threshold=0))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(LungsegError):
        list(predict.predict(tmp_path / "notes.txt", tmp_path / "m.pt", tmp_path / "o"))
