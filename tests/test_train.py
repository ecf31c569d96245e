"""train.py and datasets.py: both loops on a tiny cache, exact resume, failures that must stop a run."""

import csv
import json

import h5py
import numpy as np
import pytest
import torch

from lungseg import cache, train
from lungseg.datasets import EpochSampler, RoiDataset, SubcaseDataset, augment
from lungseg.splits import read_split, split_scans

PATIENTS = {"P1": "train", "P2": "train", "P3": "train", "P4": "val", "P5": "val"}
SEG = dict(widths=(2, 4, 8, 16, 32), batch_size=2, device="cpu", precision="fp32", workers=0)
CLS = dict(arch="resnet3d50", width=4, batch_size=4, device="cpu", precision="fp32", workers=0)


def _blob(shape, centre, radius):
    idx = np.indices(shape).astype(float)
    return sum((i - c) ** 2 for i, c in zip(idx, centre)) <= radius ** 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A cache of 5 patients: sub-cases with a bright blob to segment, ROIs whose blob size is the label."""
    root = tmp_path_factory.mktemp("train")
    path = root / "c.h5"
    writer = cache.CacheWriter(path, {"tiny": True})
    rng = np.random.default_rng(0)
    for p, patient in enumerate(PATIENTS):
        sub_img, sub_mask = [], []
        for _ in range(2):
            m = _blob((16, 32, 32), rng.uniform(4, 12, 3) * [1, 2, 2], rng.uniform(2, 5))
            sub_img.append(np.clip(0.1 + 0.6 * m + rng.normal(0, 0.05, m.shape), 0, 1))
            sub_mask.append(m)
        labels = np.array([0, 1, 0, 1], np.int8)
        rois = [np.clip(0.1 + 0.6 * _blob((8, 16, 16), (4, 8, 8), 2 + 3 * lab) + rng.normal(0, 0.05, (8, 16, 16)),
                        0, 1) for lab in labels]
        writer.add(cache.ScanRecordData(f"1.{p}", {"patient_id": patient, "n_nodules": 4}, {
            "subcases/image": np.array(sub_img, np.float16), "subcases/mask": np.array(sub_mask, np.uint8),
            "rois/image": np.array(rois, np.float16), "nodules/label": labels,
        }))
    split = root / "split.csv"
    with open(split, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "split"])
        w.writerows(PATIENTS.items())
    return path, str(split)


def test_defaults_are_paper_a():
    s, c = train.SegConfig(), train.ClsConfig()
    assert (s.arch, s.epochs, s.batch_size, s.lr, s.loss, s.switch_epoch) == ("resunet3d", 64, 6, 1e-2, "paper", 3)
    assert s.widths == (8, 16, 32, 64, 128) and s.lr_gamma == 0.1 and len(s.lr_milestones) == 2
    assert (c.arch, c.epochs, c.batch_size, c.lr) == ("resnet3d50", 52, 16, 1e-4)


def test_datasets_read_the_split_and_augment_consistently(tiny):
    path, split_file = tiny
    split = read_split(split_file)
    c = cache.Cache(path)
    train_uids = split_scans(c, split, "train")
    assert train_uids == ["1.0", "1.1", "1.2"]
    seg = SubcaseDataset(c, train_uids, augment=True, seed=1)
    assert len(seg) == 6
    x, y = seg[(3, 5)]
    assert x.shape == y.shape == (1, 16, 32, 32) and x.dtype == torch.float32
    x2, y2 = seg[(3, 5)]
    assert torch.equal(x, x2) and torch.equal(y, y2)            # same (index, epoch): same augmentation
    # The mask moves with the image: the bright voxels are the mask's.
    assert torch.equal(y[0] > 0.5, x[0] > 0.4)
    rois = RoiDataset(c, train_uids)
    assert len(rois) == 12 and rois.labels.tolist() == [0, 1, 0, 1] * 3
    a = np.arange(24).reshape(2, 3, 4)
    flipped = augment([a], np.random.default_rng(0))[0]
    assert sorted(flipped.ravel()) == sorted(a.ravel())


def test_sampler_is_seeded_per_epoch_and_balances():
    s = EpochSampler(10, seed=3)
    first = list(s)
    assert list(s) == first and {i for i, _ in first} == set(range(10))
    s.set_epoch(1)
    assert list(s) != first and all(e == 1 for _, e in s)
    labels = np.array([0] * 9 + [1])
    b = EpochSampler(1000, seed=0, labels=np.resize(labels, 1000), balanced=True)
    drawn = np.resize(labels, 1000)[[i for i, _ in b]]
    assert 0.4 < drawn.mean() < 0.6


def test_seg_training_writes_run_folder_and_safe_checkpoints(tiny, tmp_path):
    path, split = tiny
    cfg = train.SegConfig(epochs=2, lr=1e-2, switch_epoch=1, split_file=split, **SEG)
    seen = []
    summary = train.fit(cfg, path, tmp_path / "run",
                        callbacks=train.Callbacks(on_epoch_end=seen.append))
    assert summary["epochs_run"] == 2 and len(seen) == 2
    log = train.read_log(tmp_path / "run" / "log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2]
    assert [r["loss_kind"] for r in log] == ["bce", "dice"]
    assert all(0 <= r["dice"] <= 1 and np.isfinite(r["train_loss"]) for r in log)
    for name in ("last.pt", "best.pt", "curves.png", "config.json"):
        assert (tmp_path / "run" / name).is_file()
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["kind"] == "seg" and ckpt["config"]["widths"] == [2, 4, 8, 16, 32]
    model, _ = train.load_model(tmp_path / "run" / "best.pt", kind="seg")
    assert model(torch.zeros(1, 1, 16, 32, 32)).shape == (1, 1, 16, 32, 32)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["kind"] == "seg"
    with pytest.raises(train.TrainingError, match="already holds a run"):
        train.fit(cfg, path, tmp_path / "run")
    with pytest.raises(train.TrainingError, match="expected a cls checkpoint"):
        train.load_checkpoint(tmp_path / "run" / "last.pt", kind="cls")


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("kind, options", [("seg", SEG), ("cls", CLS)])
def test_resume_after_an_interruption_gives_the_same_losses(tiny, tmp_path, kind, options):
    path, split = tiny
    Config = train.SegConfig if kind == "seg" else train.ClsConfig
    extra = dict(switch_epoch=1, lr_milestones=(2,)) if kind == "seg" else dict(balance=True, lr=1e-3)
    cfg = Config(epochs=3, split_file=split, seed=5, **extra, **options)
    train.fit(cfg, path, tmp_path / "whole")

    state = {"epoch": None}

    def on_start(epoch, n):
        state["epoch"] = epoch

    def on_batch(i, loss):               # die in the middle of the second epoch
        if state["epoch"] == 1 and i == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train.fit(cfg, path, tmp_path / "cut", callbacks=train.Callbacks(on_start, on_batch))
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 1
    summary = train.fit(cfg, path, tmp_path / "cut", resume=True)
    assert summary["epochs_run"] == 2
    whole = train.read_log(tmp_path / "whole" / "log.jsonl")
    cut = train.read_log(tmp_path / "cut" / "log.jsonl")
    key = "dice" if kind == "seg" else "auc"
    assert [r["train_loss"] for r in cut] == [r["train_loss"] for r in whole]
    assert [r[key] for r in cut] == [r[key] for r in whole]
    assert [r["lr"] for r in cut] == [r["lr"] for r in whole]


def test_cls_training_reports_auc_and_accuracy(tiny, tmp_path):
    path, split = tiny
    cfg = train.ClsConfig(epochs=2, lr=1e-3, split_file=split, **CLS)
    train.fit(cfg, path, tmp_path / "run")
    log = train.read_log(tmp_path / "run" / "log.jsonl")
    assert all(0 <= r["auc"] <= 1 and 0 <= r["accuracy"] <= 1 for r in log)
    model, ckpt = train.load_model(tmp_path / "run" / "last.pt")
    assert ckpt["kind"] == "cls" and model(torch.zeros(2, 1, 8, 16, 16)).shape == (2, 2)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tiny, tmp_path):
    import shutil

    path, split = tiny
    copy = tmp_path / "c.h5"
    shutil.copy(path, copy)
    shutil.copytree(cache.scans_dir(path), cache.scans_dir(copy))
    cfg = train.SegConfig(epochs=1, split_file=split, **SEG)
    train.fit(cfg, copy, tmp_path / "run")
    for uid in ("1.0", "1.1", "1.2"):
        with h5py.File(cache.scans_dir(copy) / f"{uid}.h5", "a") as f:
            f["subcases/image"][0, 0, 0, 0] = np.nan
    more = train.SegConfig(epochs=2, split_file=split, **SEG)
    with pytest.raises(train.TrainingError, match="non-finite input values"):
        train.fit(more, copy, tmp_path / "run", resume=True)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_refuses_empty_split_and_other_architecture(tiny, tmp_path):
    path, split = tiny
    only_test = tmp_path / "test.csv"
    only_test.write_text("patient_id,split\n" + "".join(f"{p},test\n" for p in PATIENTS))
    with pytest.raises(train.TrainingError, match="the train split"):
        train.fit(train.SegConfig(epochs=1, split_file=str(only_test), **SEG), path, tmp_path / "a")
    # A val split that is named but holds none of the cache's patients is an error, not "no validation".
    absent_val = tmp_path / "absent.csv"
    absent_val.write_text("patient_id,split\n" + "".join(f"{p},train\n" for p in PATIENTS) + "LIDC-IDRI-0000,val\n")
    with pytest.raises(train.TrainingError, match="the val split"):
        train.fit(train.SegConfig(epochs=1, split_file=str(absent_val), **SEG), path, tmp_path / "a")
    train.fit(train.SegConfig(epochs=1, split_file=split, **SEG), path, tmp_path / "b")
    other = train.SegConfig(epochs=2, split_file=split, arch="unet3d", **SEG)
    with pytest.raises(train.TrainingError, match="a resunet3d checkpoint"):
        train.fit(other, path, tmp_path / "b", resume=True)


def test_command_line_trains_and_resumes(tiny, tmp_path):
    from click.testing import CliRunner

    from cli import main

    path, split = tiny
    args = ["train-cls", "--cache", str(path), "--out", str(tmp_path / "run"), "--split-file", split,
            "--epochs", "1", "--batch-size", "4", "--width", "4", "--lr", "1e-3", "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "epoch   1" in result.output and "best validation auc" in result.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "pass --resume" in again.output and again.output.count("\n") == 1
    resumed = CliRunner().invoke(main, args[:-6] + ["--epochs", "2", "--batch-size", "4", "--width", "4",
                                                    "--lr", "1e-3", "--device", "cpu", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert [r["epoch"] for r in train.read_log(tmp_path / "run" / "log.jsonl")] == [1, 2]
    bad = CliRunner().invoke(main, ["train-seg", "--cache", str(path), "--out", str(tmp_path / "x"),
                                    "--split-file", split, "--widths", "8,a"])
    assert bad.exit_code == 2 and "--widths" in bad.output


def test_a_new_task_is_one_table_entry(tiny, tmp_path, monkeypatch):
    """A third task: its own config type, dataset and metric, and fit runs it unchanged."""
    import dataclasses

    path, split = tiny

    @dataclasses.dataclass(frozen=True)
    class CentreSliceConfig(train.ClsConfig):
        pass

    class CentreSlice(RoiDataset):            # only the central slice of each ROI carries the image
        def __getitem__(self, key):
            x, y = super().__getitem__(key)
            keep = torch.zeros_like(x)
            keep[:, x.shape[1] // 2] = 1
            return x * keep, y

    seen = []
    task = dataclasses.replace(train.TASKS[train.ClsConfig], dataset=lambda cfg: CentreSlice,
                               metric=lambda val_ds: seen.append(type(val_ds)) or "accuracy")
    monkeypatch.setitem(train.TASKS, CentreSliceConfig, task)
    summary = train.fit(CentreSliceConfig(epochs=1, split_file=split, **CLS), path, tmp_path / "run")
    assert seen == [CentreSlice] and summary["metric"] == "accuracy" and summary["epochs_run"] == 1
    with pytest.raises(TypeError, match="no training task for TrainConfig"):
        train.task_for(train.TrainConfig.__new__(train.TrainConfig))


class _Flaky(torch.nn.Module):
    """A classifier whose output is NaN on the calls listed in ``bad`` (a kernel's glitch)."""

    def __init__(self, bad):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)
        self.bad, self.calls = set(bad), 0

    def forward(self, x):
        out = self.lin(x)
        self.calls += 1
        return out * float("nan") if self.calls in self.bad else out


def test_a_glitch_skips_one_step_and_a_divergence_stops_the_run():
    from lungseg.losses import nll_loss

    batches = [(torch.rand(3, 4), torch.tensor([0, 1, 0])) for _ in range(8)]
    model = _Flaky(bad={2})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    skipped = []
    loss = train.train_one_epoch(model, batches, nll_loss, opt, device=torch.device("cpu"), precision="fp32",
                                 on_skip=lambda i, why: skipped.append((i, why)))
    assert np.isfinite(loss) and skipped == [(1, "the loss became nan")]
    assert all(torch.isfinite(p).all() for p in model.parameters())        # the glitch never reached the weights
    always = _Flaky(bad=range(1, 100))
    with pytest.raises(train.TrainingError, match=f"{train.MAX_SKIPPED_STEPS} steps in a row"):
        train.train_one_epoch(always, batches, nll_loss, torch.optim.SGD(always.parameters(), lr=0.1),
                              device=torch.device("cpu"), precision="fp32")
