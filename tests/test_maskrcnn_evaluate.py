"""lungseg_maskrcnn.evaluate: COCO AP by pycocotools, excluded findings ignored, Dice per size, patch accuracy."""

import numpy as np
import pytest

pytest.importorskip("lungseg_maskrcnn")
pytest.importorskip("pycocotools")
torch = pytest.importorskip("torch")

from lungseg_maskrcnn import evaluate  # noqa: E402
from lungseg_maskrcnn.slices import IGNORE, read_slices  # noqa: E402

SHAPE = (64, 64)


def _disc(cy, cx, r):
    yy, xx = np.ogrid[:SHAPE[0], :SHAPE[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _found(mask, score):
    ys, xs = np.nonzero(mask)
    return {"score": score, "box": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)],
            "mask": mask}


def _ap(instances, found):
    return evaluate.coco_ap([evaluate._gt_of(instances)], [evaluate._det_of(found)], "segm", [SHAPE])


def test_perfect_missing_and_wrong_detections():
    ins = np.zeros(SHAPE, np.uint8)
    ins[_disc(20, 20, 6)] = 1
    ins[_disc(45, 40, 4)] = 2
    perfect = [_found(ins == 1, 0.9), _found(ins == 2, 0.8)]
    assert _ap(ins, perfect) == pytest.approx((1.0, 1.0))
    assert _ap(ins, []) == (0.0, 0.0)
    half = _ap(ins, [_found(ins == 1, 0.9)])                    # one of two found
    assert 0.4 < half[1] < 0.6
    ranked_wrong = _ap(ins, [_found(_disc(50, 10, 4), 0.95), *perfect])   # a false positive ranked first
    assert ranked_wrong[1] < 1.0
    shifted = _ap(ins, [_found(_disc(22, 21, 6), 0.9), _found(ins == 2, 0.8)])   # IoU 0.62: AP50 ok, AP lower
    assert shifted[0] < shifted[1]


def test_detection_on_an_excluded_finding_is_neither_hit_nor_false_positive():
    ins = np.zeros(SHAPE, np.uint8)
    ins[_disc(20, 20, 6)] = 1
    ins[_disc(45, 40, 5)] = IGNORE
    gt = evaluate._gt_of(ins)
    assert [g["iscrowd"] for g in gt] == [0, 1]
    on_excluded = [_found(_disc(45, 40, 5), 0.99), _found(ins == 1, 0.5)]
    assert _ap(ins, on_excluded) == pytest.approx((1.0, 1.0))


def test_dice_per_category_and_patch_accuracy_on_a_slices_file(tiny_slices):
    data = read_slices(tiny_slices)

    class Truth(torch.nn.Module):
        """Predicts each slice's own circles (looked up by image), a perfect segmenter."""

        def forward(self, x):
            image = x[0, 0].numpy()
            for i in range(len(data)):
                from lungseg_maskrcnn.slices import normalize
                from lungseg_maskrcnn.train import window
                y0, x0, y1, x1 = window(data.lungs[i], data.image.shape[1:])
                if np.array_equal(normalize(data.image[i])[y0:y1, x0:x1], image):
                    m = np.isin(data.instances[i][y0:y1, x0:x1], (0, IGNORE), invert=True)
                    return torch.from_numpy(np.where(m, 10.0, -10.0)[None, None].astype(np.float32))
            raise AssertionError("slice not found")

    result = evaluate.evaluate_slices(Truth(), "unet", tiny_slices, n_resamples=20)
    assert result["dice"]["all"]["dice"]["value"] == pytest.approx(1.0)
    assert result["n_slices"] == len(data) and set(result["dice"]) <= {"micro", "small", "nodule", "mass", "all"}
    assert result["dice"]["nodule"]["n_slices"] >= 1                      # the 12 mm nodule's slices

    class Always(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, 1.0]]).expand(len(x), -1)

    acc = evaluate.evaluate_patches(Always(), tiny_slices, n_resamples=50)
    assert acc["accuracy"]["value"] == pytest.approx(0.5)                 # balanced 1:1
