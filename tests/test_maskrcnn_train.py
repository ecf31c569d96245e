"""lungseg_maskrcnn.train: the three loops run, save self-describing checkpoints, resume, refuse mix-ups."""

import json

import numpy as np
import pytest

pytest.importorskip("lungseg_maskrcnn")
torch = pytest.importorskip("torch")

from lungseg.errors import LungsegError  # noqa: E402
from lungseg_maskrcnn import configs, train  # noqa: E402
from lungseg_maskrcnn.slices import IGNORE, read_slices  # noqa: E402

TINY_MASK = dict(backbone="resnet18", crop=64, iterations=4, batch_size=2, lr=0.01, save_every=2, device="cpu")


def test_patch_classifier_trains_keeps_best_epoch_and_resumes(tiny_slices, tmp_path):
    cfg = configs.make_config("patch", arch="resnet20", epochs=2, batch_size=16, lr=1e-3, device="cpu")
    model_pt = train.train_patch(cfg, tiny_slices, tiny_slices, tmp_path / "r")
    log = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(0 <= r["val_accuracy"] <= 1 for r in log)
    model, got, ckpt = train.load(model_pt, kind="patch")
    assert got == cfg and ckpt["val_accuracy"] == max(r["val_accuracy"] for r in log)
    with pytest.raises(LungsegError, match="holds a run already"):
        train.train_patch(cfg, tiny_slices, tiny_slices, tmp_path / "r")
    longer = configs.make_config("patch", arch="resnet20", epochs=3, batch_size=16, lr=1e-3, device="cpu")
    with pytest.raises(LungsegError, match="another run's settings"):
        train.train_patch(longer, tiny_slices, tiny_slices, tmp_path / "r", resume=True)
    with pytest.raises(LungsegError, match="nothing to resume"):
        train.train_patch(cfg, tiny_slices, tiny_slices, tmp_path / "new", resume=True)


def test_maskrcnn_resumed_run_equals_an_uninterrupted_one(tiny_slices, tmp_path):
    cfg = configs.MaskConfig(**TINY_MASK)            # staged: heads, 3+, all within 4 steps
    train.train_mask(cfg, tiny_slices, tmp_path / "whole")
    train.train_mask(cfg, tiny_slices, tmp_path / "split", stop_at=2)
    assert not (tmp_path / "split" / "model.pt").exists()
    train.train_mask(cfg, tiny_slices, tmp_path / "split", resume=True)
    a, _, _ = train.load(tmp_path / "whole" / "model.pt", kind="mask")
    b, _, _ = train.load(tmp_path / "split" / "model.pt", kind="mask")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_unet_trains_and_a_wrong_kind_is_refused(tiny_slices, tmp_path):
    cfg = configs.make_config("unet", width=4, crop=64, iterations=2, batch_size=2, save_every=1, device="cpu")
    model_pt = train.train_unet(cfg, tiny_slices, tmp_path / "u")
    model, got, _ = train.load(model_pt, kind="unet")
    assert got.width == 4
    with pytest.raises(LungsegError, match="a unet checkpoint, expected a mask"):
        train.load(model_pt, kind="mask")
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(LungsegError, match="not a loadable checkpoint"):
        train.load(tmp_path / "junk.pt")


def test_training_view_crops_keep_a_nodule_and_targets_skip_excluded_findings(tiny_slices):
    data = read_slices(tiny_slices)
    rng = np.random.default_rng(0)
    seen = 0
    for _ in range(20):
        image, ins = train.training_view(data, 0, 32, True, rng)
        assert image.shape == ins.shape == (32, 32) and image.dtype == np.float32
        seen += bool(ins.any())
    assert seen >= 10                                    # 3 crops in 4 are drawn around a nodule
    ins = np.zeros((20, 20), np.uint8)
    ins[2:6, 2:6] = 1
    ins[10:14, 10:14] = IGNORE
    t = train.targets_of(ins)
    assert t["boxes"].tolist() == [[2.0, 2.0, 6.0, 6.0]] and t["masks"].shape == (1, 20, 20)
    empty = train.targets_of(np.zeros((20, 20), np.uint8))
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 20, 20)


def test_window_covers_the_lungs_in_multiples_of_32():
    y0, x0, y1, x1 = train.window((100, 50, 300, 400), (512, 512))
    assert (y1 - y0) % 32 == 0 and (x1 - x0) % 32 == 0
    assert y0 <= 100 and y1 >= 300 and x0 <= 50 and x1 >= 400
    assert train.window((0, 0, 512, 512), (512, 512)) == (0, 0, 512, 512)
    y0, x0, y1, x1 = train.window((10, 10, 20, 20), (96, 96))
    assert 0 <= y0 <= 10 and y1 >= 20 and (y1 - y0) == 32


def test_configs_refuse_bad_settings():
    with pytest.raises(ValueError, match="schedule"):
        configs.MaskConfig(schedule="heads-only")
    with pytest.raises(ValueError, match="multiple of 32"):
        configs.MaskConfig(crop=100)
    with pytest.raises(ValueError, match="preset"):
        configs.make_config("mask", "gpu")
    cpu = configs.make_config("mask", "cpu")
    assert cpu.backbone == "resnet18" and configs.MaskConfig().backbone == "resnet101"
    assert configs.MaskConfig().lr == 1e-4 and configs.MaskConfig().momentum == 0.9
    assert configs.from_dict("mask", configs.to_dict(cpu)) == cpu
