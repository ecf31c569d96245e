"""checkpoints.py: safe loading, kinds, and the model/data contract that evaluate and predict enforce."""

import torch
import pytest
from click.testing import CliRunner

from lungseg import checkpoints, evaluate, infer
from lungseg.errors import CheckpointError


def _with_preprocess(src, dst, **changes):
    """A copy of checkpoint ``src`` whose recorded preprocessing has ``changes``."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt["preprocess"] = {**ckpt["preprocess"], **changes}
    checkpoints.save_checkpoint(dst, ckpt)
    return dst


def test_load_checks_format_and_kind(tiny_trained, tmp_path):
    model, ckpt = checkpoints.load_model(tiny_trained["seg"], kind="seg")
    assert ckpt["kind"] == "seg" and not model.training
    with pytest.raises(CheckpointError, match="expected a cls checkpoint"):
        checkpoints.load_checkpoint(tiny_trained["seg"], kind="cls")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a loadable lungseg checkpoint"):
        checkpoints.load_checkpoint(junk)
    torch.save({"format": 1, "kind": "detector"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="unknown checkpoint kind 'detector'"):
        checkpoints.load_checkpoint(tmp_path / "other.pt")
    assert checkpoints.sha256(junk) == "9143fcc5e7747f5d007dec953958fadbd761c5bf675d4daec9e2c394b370c49d"   # sha256 of b"not a checkpoint"


def test_evaluate_refuses_a_checkpoint_trained_on_other_preprocessing(tiny_trained, tmp_path):
    seg = _with_preprocess(tiny_trained["seg"], tmp_path / "seg.pt", spacing=[2.0, 1.0, 1.0])
    with pytest.raises(CheckpointError) as info:
        evaluate.evaluate(tiny_trained["cache"], seg=seg, cls=None, out=tmp_path / "e",
                          split="all")
    message = str(info.value)
    assert "seg.pt" in message and str(tiny_trained["cache"]) in message and "spacing" in message
    assert not (tmp_path / "e").exists()                       # refused before anything is written
    cls = _with_preprocess(tiny_trained["cls"], tmp_path / "cls.pt", roi_shape=[16, 48, 48])
    with pytest.raises(CheckpointError, match="roi_shape"):
        evaluate.evaluate(tiny_trained["cache"], seg=None, cls=cls, out=tmp_path / "e", split="all")


def test_predict_refuses_a_classifier_of_another_window_but_takes_its_roi(tiny_trained, tmp_path):
    cls = _with_preprocess(tiny_trained["cls"], tmp_path / "cls.pt", window=[-1350.0, 150.0])
    with pytest.raises(CheckpointError, match="window"):
        infer.Models.load(tiny_trained["seg"], cls, "cpu")
    from cli import main

    result = CliRunner().invoke(main, ["predict", str(tiny_trained["root"]), "--seg", str(tiny_trained["seg"]),
                                       "--cls", str(cls), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "cls.pt" in result.output and "seg" in result.output and "window" in result.output
    # The classifier's ROI shape is its own: predict cuts ROIs of that shape.
    seg = _with_preprocess(tiny_trained["seg"], tmp_path / "seg.pt", roi_shape=[4, 4, 4])
    models = infer.Models.load(seg, tiny_trained["cls"], "cpu")
    cls_roi = torch.load(tiny_trained["cls"], weights_only=True)["preprocess"]["roi_shape"]
    assert list(models.preprocess.roi_shape) == cls_roi
