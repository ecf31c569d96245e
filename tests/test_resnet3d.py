"""resnet3d.py: the paper's 3D ResNet50 and the Table 5 baselines: shapes, parameters, inputs, bad options."""

import math

import pytest
import torch
from torch import nn

from lungseg.resnet3d import ResNet, ResNetConfig, resnet2d50, resnet3d50, resnet3d50_plain

ROI = (16, 48, 48)


def stage_shapes(model: ResNet, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes = {}
    handles = [getattr(model, name).register_forward_hook(
        lambda mod, inp, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:])))
        for name in ["stem"] + model.stage_names]
    try:
        shapes["logits"] = tuple(model(x).shape)
    finally:
        for h in handles:
            h.remove()
    return shapes


def meta_shapes(build, batch=2, **kwargs):
    with torch.device("meta"):
        return stage_shapes(build(**kwargs), torch.empty(batch, 1, *ROI))


def test_defaults_are_the_documented_choices():
    c = ResNetConfig()
    assert c.layers == (3, 4, 6, 3) and c.width == 64 and c.num_classes == 2 and c.in_channels == 1
    assert (c.stem_kernel, c.stem_stride, c.stem_pool) == (3, 1, False)
    assert c.strides == (1, 2, 2, 2)
    assert c.kernels == ((3, 3, 3), (3, 3, 3), (1, 3, 3), (1, 3, 3))
    assert ResNetConfig.from_dict(c.to_dict()) == c
    assert ResNetConfig(kernels=(3, 3, 1, 1)).kernels == ((3, 3, 3),) * 2 + ((1, 1, 1),) * 2


def test_paper_3d_resnet50_shapes_on_a_16x48x48_roi():
    assert meta_shapes(resnet3d50, num_classes=3) == {
        "stem": (64, 16, 48, 48),          # 3x3x3 stride 1, no max-pool
        "layer1": (256, 16, 48, 48),
        "layer2": (512, 8, 24, 24),
        "layer3": (1024, 4, 12, 12),
        "layer4": (2048, 2, 6, 6),
        "logits": (2, 3),
    }


def test_plain_3d_resnet50_shapes():
    assert meta_shapes(resnet3d50_plain, num_classes=3) == {
        "stem": (64, 4, 12, 12),           # 7x7x7 stride 2, then max-pool stride 2
        "layer1": (256, 4, 12, 12),
        "layer2": (512, 2, 6, 6),
        "layer3": (1024, 1, 3, 3),
        "layer4": (2048, 1, 2, 2),
        "logits": (2, 3),
    }


@pytest.mark.parametrize("mode,channels", [("central_slice", 1), ("slices", 16)])
def test_2d_resnet50_shapes(mode, channels):
    model = resnet2d50(num_classes=3, input=mode)
    assert model.config.in_channels == channels
    with torch.device("meta"):
        shapes = stage_shapes(resnet2d50(num_classes=3, input=mode), torch.empty(2, 1, *ROI))
    assert shapes == {"stem": (64, 12, 12), "layer1": (256, 12, 12), "layer2": (512, 6, 6),
                      "layer3": (1024, 3, 3), "layer4": (2048, 2, 2), "logits": (2, 3)}


# ---- parameter counts by hand ---------------------------------------------------------------

def bn(c):
    return 2 * c


def bottleneck(cin, planes, kernel, projection):
    out = 4 * planes
    n = cin * planes + bn(planes) + planes * planes * math.prod(kernel) + bn(planes) + planes * out + bn(out)
    return n + (cin * out + bn(out) if projection else 0)


def resnet_params(in_ch, stem_kernel, kernels, num_classes, layers=(3, 4, 6, 3), width=64):
    n = in_ch * width * math.prod(stem_kernel) + bn(width)
    cin = width
    for i, (blocks, kernel) in enumerate(zip(layers, kernels)):
        planes = width * 2 ** i
        for b in range(blocks):
            n += bottleneck(cin, planes, kernel, projection=(b == 0))
            cin = 4 * planes
    return n + cin * num_classes + num_classes


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_layer_formula():
    paper = resnet_params(1, (3, 3, 3), [(3, 3, 3)] * 2 + [(1, 3, 3)] * 2, 2)
    assert count(resnet3d50()) == paper == 24_905_282
    plain = resnet_params(1, (7, 7, 7), [(3, 3, 3)] * 4, 2)
    assert count(resnet3d50_plain()) == plain == 46_159_170
    assert count(resnet2d50()) == resnet_params(1, (7, 7), [(3, 3)] * 4, 2) == 23_505_858
    assert count(resnet3d50(num_classes=3, width=16)) == resnet_params(
        1, (3, 3, 3), [(3, 3, 3)] * 2 + [(1, 3, 3)] * 2, 3, width=16)


def test_2d_resnet50_is_he_et_al_resnet50():
    # torchvision's resnet50 (3 input channels, 1000 classes) has 25,557,032 parameters.
    assert count(resnet2d50(in_channels=3, num_classes=1000)) == 25_557_032


# ---- real forwards on small networks --------------------------------------------------------

@pytest.mark.parametrize("build", [resnet3d50, resnet3d50_plain, resnet2d50])
def test_tiny_forward_odd_class_count_and_batch_of_one(build):
    torch.manual_seed(0)
    model = build(num_classes=3, width=4, layers=(1, 1, 1, 1))
    y = model(torch.rand(1, 1, *ROI))
    assert y.shape == (1, 3)                               # flatten(1), not squeeze()
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_2d_central_slice_sees_only_slice_8():
    torch.manual_seed(0)
    model = resnet2d50(width=4, layers=(1, 1, 1, 1)).eval()
    x = torch.rand(2, 1, *ROI)
    x2 = x.clone()
    x2[:, :, :8] = torch.rand(2, 1, 8, 48, 48)
    x2[:, :, 9:] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x2))
        torch.testing.assert_close(model(x), model(x[:, :, 8]))     # a 2D tensor is taken as is
        x2[:, :, 8] += 1
        assert not torch.allclose(model(x), model(x2))


def test_2d_slices_as_channels_sees_every_slice():
    torch.manual_seed(0)
    model = resnet2d50(input="slices", width=4, layers=(1, 1, 1, 1)).eval()
    x = torch.rand(2, 1, *ROI)
    x2 = x.clone()
    x2[:, :, 0] += 1
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x2))
        torch.testing.assert_close(model(x), model(x[:, 0]))


def test_injected_norm_layer():
    model = resnet3d50(width=4, layers=(1, 1, 1, 1), norm_layer=lambda c: nn.GroupNorm(1, c))
    kinds = {type(m) for m in model.modules()}
    assert nn.GroupNorm in kinds and nn.BatchNorm3d not in kinds
    assert model(torch.rand(2, 1, *ROI)).shape == (2, 2)


def test_xavier_init_and_zero_init_residual():
    model = resnet3d50(width=4, layers=(1, 1, 1, 1), zero_init_residual=True)
    fc = model.fc
    bound = (6 / (fc.in_features + fc.out_features)) ** 0.5
    assert fc.weight.abs().max() <= bound and torch.all(fc.bias == 0)
    assert torch.all(model.layer1[0].bn3.weight == 0)


# ---- ill-formed cases -----------------------------------------------------------------------

@pytest.mark.parametrize("build,kwargs", [
    (resnet3d50, dict(num_classes=0)),
    (resnet3d50, dict(width=0)),
    (resnet3d50, dict(layers=())),
    (resnet3d50, dict(layers=(3, 4, 0, 3))),
    (resnet3d50, dict(strides=(1, 2, 2))),
    (resnet3d50, dict(strides=(1, 0, 2, 2))),
    (resnet3d50, dict(layers=(3, 4, 6.5, 3))),
    (resnet3d50, dict(kernels=((3, 3, 3),) * 3)),
    (resnet3d50, dict(kernels=((3, 3, 3),) * 3 + ((2, 3, 3),))),
    (resnet3d50, dict(kernels=((3, 3),) * 4)),
    (resnet3d50, dict(stem_kernel=4)),
    (resnet3d50, dict(norm="layer")),
    (resnet3d50, dict(input="central_slice")),
    (resnet3d50, dict(no_such_option=1)),
    (resnet3d50_plain, dict(spatial_dims=4)),
    (resnet2d50, dict(input="volume")),
    (resnet2d50, dict(in_channels=0)),
])
def test_ill_formed_options_raise(build, kwargs):
    with pytest.raises(ValueError):
        build(**kwargs)


@pytest.mark.parametrize("build,shape,match", [
    (resnet3d50, (2, 16, 48, 48), "N, C, D, H, W"),
    (resnet3d50, (2, 2, 16, 48, 48), "input channel"),
    (resnet2d50, (2, 48, 48), "N, C, D, H, W"),
    (lambda **k: resnet2d50(input="slices", **k), (2, 1, 8, 48, 48), "slices as channels"),
])
def test_ill_formed_input_raises(build, shape, match):
    with torch.device("meta"):
        model = build(width=4, layers=(1, 1, 1, 1))
        with pytest.raises(ValueError, match=match):
            model(torch.empty(shape))
