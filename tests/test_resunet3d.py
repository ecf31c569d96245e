"""resunet3d.py: Table 1 shapes and parameter count, the residual unit of Fig. 4, options, bad input."""

import pytest
import torch
from torch import nn

from lungseg.resunet3d import ResidualUnit, UNet3d, UNet3dConfig, resunet3d, unet3d

# Table 1 of paper A: (name, output size) for a 1 x 48 x 192 x 192 input.
TABLE_1 = [
    ("Encoder0", (8, 24, 96, 96)),
    ("Encoder1", (16, 12, 48, 48)),
    ("Encoder2", (32, 6, 24, 24)),
    ("Encoder3", (64, 3, 12, 12)),
    ("Bottle", (128, 3, 12, 12)),
    ("Decoder0", (64, 6, 24, 24)),
    ("Decoder1", (32, 12, 48, 48)),
    ("Decoder2", (16, 24, 96, 96)),
    ("Decoder3", (8, 48, 192, 192)),
    ("OutputConv", (1, 48, 192, 192)),
]


def stage_shapes(model: UNet3d, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Outputs of Table 1's rows, in order: each encoder after its pool, bottleneck, decoders, head."""
    shapes = []
    hook = lambda mod, inp, out: shapes.append(tuple(out.shape[1:]))  # noqa: E731
    handles = [model.pool.register_forward_hook(hook), model.bottleneck.register_forward_hook(hook)]
    handles += [d.register_forward_hook(hook) for d in model.decoders]
    handles.append(model.head.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


def test_defaults_are_table_1():
    c = UNet3dConfig()
    assert (c.in_channels, c.out_channels, c.widths) == (1, 1, (8, 16, 32, 64, 128))
    assert (c.block, c.norm, c.kernel_size, c.depth, c.size_multiple) == ("residual", "instance", 3, 4, 16)
    assert UNet3dConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("build", [resunet3d, unet3d])
def test_every_stage_matches_table_1_at_full_size(build):
    # The meta device runs the full 1 x 1 x 48 x 192 x 192 forward without computing anything.
    with torch.device("meta"):
        model = build()
        shapes = stage_shapes(model, torch.empty(1, 1, 48, 192, 192))
    assert shapes == [size for _, size in TABLE_1]
    # Table 1 lists encoder outputs after their max-pool: 48 x 192 x 192 / 2**4 = 3 x 12 x 12.
    assert dict(TABLE_1)["Encoder3"][1:] == dict(TABLE_1)["Bottle"][1:] == (48 // 16, 192 // 16, 192 // 16)


def test_stage_sizes_follow_the_formula_on_other_inputs():
    d, h, w = 16, 32, 48
    with torch.device("meta"):
        model = resunet3d(base_width=4, depth=3)
        shapes = stage_shapes(model, torch.empty(2, 1, d, h, w))
    widths = [4, 8, 16, 32]
    expected = [(widths[i], d >> (i + 1), h >> (i + 1), w >> (i + 1)) for i in range(3)]
    expected += [(32, d >> 3, h >> 3, w >> 3)]
    expected += [(widths[2 - i], d >> (2 - i), h >> (2 - i), w >> (2 - i)) for i in range(3)]
    expected += [(1, d, h, w)]
    assert shapes == expected


def test_small_real_forward_returns_finite_logits_and_backpropagates():
    torch.manual_seed(0)
    model = resunet3d()
    x = torch.rand(2, 1, 16, 32, 32)
    y = model(x)
    assert y.shape == (2, 1, 16, 32, 32) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert (y < 0).any() or (y > 1).any()          # logits, not probabilities
    y.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---- parameter count, by hand from the layer formulas --------------------------------------

def conv(cin, cout, k, bias):        # 3D convolution with a k x k x k kernel
    return cin * cout * k ** 3 + (cout if bias else 0)


def inorm(c):                        # instance norm, affine
    return 2 * c


def residual_unit(cin, cout):        # Fig. 4: conv-IN-ReLU, conv-IN (no biases), 1x1x1 shortcut with bias
    return conv(cin, cout, 3, False) + inorm(cout) + conv(cout, cout, 3, False) + inorm(cout) \
        + conv(cin, cout, 1, True)


def plain_unit(cin, cout):
    return conv(cin, cout, 3, False) + inorm(cout) + conv(cout, cout, 3, False) + inorm(cout)


def up(cin, cout):                   # TransConv k=2 (no bias) + IN
    return conv(cin, cout, 2, False) + inorm(cout)


def unet_params(unit, widths=(8, 16, 32, 64, 128)):
    enc = [unit(cin, cout) for cin, cout in zip((1,) + widths[:-2], widths[:-1])]
    bottle = unit(widths[-2], widths[-1])
    dec = [up(widths[i + 1], widths[i]) + unit(2 * widths[i], widths[i]) for i in range(len(widths) - 1)]
    return sum(enc) + bottle + sum(dec) + conv(widths[0], 1, 1, True)


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_count_matches_the_layer_formula():
    assert count(resunet3d()) == unet_params(residual_unit) == 1_434_761
    assert count(unet3d()) == unet_params(plain_unit) == 1_412_625
    widths = (4, 8, 16)
    assert count(resunet3d(widths=widths)) == unet_params(residual_unit, widths)


def test_norm_none_puts_biases_back():
    # Each norm of c channels (2c parameters) goes; the conv feeding it gains c biases.
    a, b = resunet3d(), resunet3d(norm="none")
    assert not any(isinstance(m, nn.InstanceNorm3d) for m in b.modules())
    norms = sum(p.numel() for m in a.modules() if isinstance(m, nn.InstanceNorm3d) for p in m.parameters())
    assert count(b) == count(a) - norms + norms // 2


# ---- the residual unit ---------------------------------------------------------------------

def test_residual_unit_is_relu_of_mapping_plus_projected_identity():
    torch.manual_seed(0)
    unit = ResidualUnit(2, 4, norm_layer=lambda c: nn.InstanceNorm3d(c, affine=True))
    x = torch.randn(1, 2, 4, 6, 6)
    with torch.no_grad():
        mapping = unit.norm2(unit.conv2(torch.relu(unit.norm1(unit.conv1(x)))))
        expected = torch.relu(mapping + unit.shortcut(x))
        torch.testing.assert_close(unit(x), expected)
        # With the mapping path silenced the unit is ReLU of a plain 1x1x1 convolution.
        unit.conv2.weight.zero_()
        torch.testing.assert_close(unit(x), torch.relu(unit.shortcut(x)))
    assert isinstance(unit.shortcut, nn.Conv3d) and unit.shortcut.kernel_size == (1, 1, 1)
    assert isinstance(ResidualUnit(4, 4).shortcut, nn.Identity)


def test_xavier_initialisation():
    model = resunet3d()
    conv1 = model.encoders[1].conv1                  # 8 -> 16, 3x3x3
    bound = (6 / (8 * 27 + 16 * 27)) ** 0.5
    assert conv1.weight.abs().max() <= bound
    assert conv1.weight.abs().max() > 0.9 * bound
    assert torch.all(model.head.bias == 0) and torch.all(model.encoders[0].shortcut.bias == 0)


def test_injected_norm_layer_replaces_instance_norm():
    model = resunet3d(widths=(4, 8, 16), norm_layer=lambda c: nn.GroupNorm(2, c))
    kinds = {type(m) for m in model.modules()}
    assert nn.GroupNorm in kinds and nn.InstanceNorm3d not in kinds
    assert model(torch.rand(1, 1, 8, 8, 8)).shape == (1, 1, 8, 8, 8)


def test_width_depth_and_channels_options():
    model = resunet3d(in_channels=2, out_channels=3, base_width=4, depth=2)
    assert model.config.widths == (4, 8, 16) and model.config.size_multiple == 4
    assert model(torch.rand(1, 2, 4, 12, 8)).shape == (1, 3, 4, 12, 8)
    assert unet3d(widths=[2, 4]).config.widths == (2, 4)


@pytest.mark.parametrize("shape", [(1, 1, 47, 192, 192), (1, 1, 48, 190, 192), (1, 1, 8, 16, 16)])
def test_input_not_a_multiple_of_16_raises(shape):
    with torch.device("meta"):
        model = resunet3d()
        with pytest.raises(ValueError, match="multiple of 16"):
            model(torch.empty(shape))


@pytest.mark.parametrize("shape,match", [((1, 48, 192, 192), "N, C, D, H, W"),
                                         ((1, 2, 48, 192, 192), "input channel")])
def test_ill_formed_input_raises(shape, match):
    with torch.device("meta"):
        model = resunet3d()
        with pytest.raises(ValueError, match=match):
            model(torch.empty(shape))


@pytest.mark.parametrize("kwargs", [
    dict(widths=(8,)), dict(widths=()), dict(widths=(8, 0, 16)), dict(in_channels=0),
    dict(out_channels=-1), dict(kernel_size=2), dict(kernel_size=0), dict(norm="layer"),
    dict(widths=(8, 16), depth=1), dict(depth=0), dict(base_width=0), dict(in_channels=1.5),
    dict(widths=(8, 16.5)),
])
def test_ill_formed_options_raise(kwargs):
    with pytest.raises(ValueError):
        resunet3d(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(block="dense"), dict(norm="batchnorm"), dict(widths=(4, -4))])
def test_ill_formed_config_raises(kwargs):
    with pytest.raises(ValueError):
        UNet3dConfig(**kwargs)


def test_state_dict_loads_with_weights_only(tmp_path):
    model = resunet3d(widths=(2, 4))
    torch.save({"model": model.state_dict(), "config": model.config.to_dict()}, tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    again = UNet3d(UNet3dConfig.from_dict(ckpt["config"]))
    again.load_state_dict(ckpt["model"])
    x = torch.rand(1, 1, 4, 4, 4)
    torch.testing.assert_close(again(x), model(x))
