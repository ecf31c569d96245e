"""lungseg_maskrcnn.nets: Table I classifiers, Mask R-CNN for nodules, the 2D U-Net, on tiny inputs."""

import pytest

pytest.importorskip("lungseg_maskrcnn")
torch = pytest.importorskip("torch")

from lungseg.errors import LungsegError  # noqa: E402
from lungseg_maskrcnn import nets  # noqa: E402


@pytest.mark.parametrize("arch", nets.PATCH_ARCHS)
def test_every_table1_network_classifies_a_50px_patch(arch):
    torch.manual_seed(0)
    model = nets.patch_classifier(arch, num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 50, 50))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_patch_classifier_refuses_bad_arguments():
    with pytest.raises(ValueError, match="unknown patch classifier"):
        nets.patch_classifier("googlenet")
    with pytest.raises(ValueError, match="num_classes"):
        nets.patch_classifier("lenet", num_classes=1)


def _target(size=64):
    masks = torch.zeros(1, size, size, dtype=torch.uint8)
    masks[0, 20:30, 24:34] = 1
    return {"boxes": torch.tensor([[24.0, 20.0, 34.0, 30.0]]), "labels": torch.tensor([1]), "masks": masks}


def test_maskrcnn_trains_and_predicts_at_the_images_own_size():
    torch.manual_seed(0)
    model = nets.maskrcnn("resnet18")
    model.train()
    losses = model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], [_target(), _target()])
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 96, 64)])[0]
    assert set(out) >= {"boxes", "scores", "labels", "masks"}
    assert out["masks"].shape[-2:] == (96, 64)                   # no resizing to 800 px
    if len(out["boxes"]):
        assert out["boxes"][:, 2].max() <= 64 and out["boxes"][:, 3].max() <= 96


def test_maskrcnn_anchors_are_sized_for_nodules():
    model = nets.maskrcnn("resnet18", anchor_sizes=(2, 4, 8, 16, 32))
    assert model.rpn.anchor_generator.sizes == ((2,), (4,), (8,), (16,), (32,))
    with pytest.raises(ValueError, match="anchor_sizes"):
        nets.maskrcnn("resnet18", anchor_sizes=(4, 8))
    with pytest.raises(ValueError, match="backbone"):
        nets.maskrcnn("vgg16")


def test_staged_schedule_trains_heads_then_stage3_up_then_all():
    model = nets.maskrcnn("resnet18")
    n_heads = nets.set_trainable(model, "heads")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("backbone.fpn.", "rpn.", "roi_heads.")) for n in trainable)
    n_three = nets.set_trainable(model, "3+")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone.body.layer2.") for n in names)
    assert not any(n.startswith(("backbone.body.layer1.", "backbone.body.conv1")) for n in names)
    n_all = nets.set_trainable(model, "all")
    assert n_heads < n_three < n_all == len(list(model.parameters()))
    with pytest.raises(ValueError):
        nets.set_trainable(model, "4+")


def test_local_weights_load_where_shapes_fit_and_never_download(tmp_path):
    a, b = nets.maskrcnn("resnet18"), nets.maskrcnn("resnet18", num_classes=3)
    torch.save(a.state_dict(), tmp_path / "w.pth")
    counts = nets.load_weights(b, tmp_path / "w.pth")
    assert counts["loaded"] > 0 and counts["skipped"] > 0            # the class-count heads differ
    assert torch.equal(b.backbone.body.conv1.weight, a.backbone.body.conv1.weight)
    torch.save({"x": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(LungsegError, match="no tensor fits"):
        nets.load_weights(b, tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(LungsegError, match="cannot load weights"):
        nets.load_weights(b, tmp_path / "junk.pth")


def test_unet2d_shapes_and_bad_sizes():
    model = nets.unet2d(width=4, depth=3)
    assert model(torch.rand(1, 1, 32, 48)).shape == (1, 1, 32, 48)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.rand(1, 1, 30, 48))
    with pytest.raises(ValueError):
        nets.unet2d(width=0)
