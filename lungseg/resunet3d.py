"""3D Res U-Net of paper A (Table 1, Fig. 3, Fig. 4) and its plain 3D U-Net baseline.

Paper A, "Segmentation network architecture": a 3D U-Net whose two consecutive
convolutions per stage are replaced by a residual unit. Input one 48 x 192 x 192
sub-case (3 x 1.5 x 1.5 mm voxels, lung window 0..1); four encoder stages
(residual unit, then 2x max-pool) with 8, 16, 32, 64 channels; a bottleneck
residual unit with 128 channels at 3 x 12 x 12; four decoder stages (2x
transposed convolution, concatenation with the encoder map of the same size,
residual unit that halves the channels); a 1x1x1 output convolution. Instance
normalization, Xavier initialization ("Experiment settings").

Shapes (N = batch), defaults, Table 1::

    input        (N, 1, 48, 192, 192)
    encoder 0    (N, 8, 24, 96, 96)      residual unit 1 -> 8 at 48x192x192, max-pool
    encoder 1    (N, 16, 12, 48, 48)
    encoder 2    (N, 32, 6, 24, 24)
    encoder 3    (N, 64, 3, 12, 12)      residual unit at 6x24x24, max-pool
    bottleneck   (N, 128, 3, 12, 12)
    decoder 0    (N, 64, 6, 24, 24)      transposed conv 128 -> 64, concat (128), unit -> 64
    decoder 1    (N, 32, 12, 48, 48)
    decoder 2    (N, 16, 24, 96, 96)
    decoder 3    (N, 8, 48, 192, 192)
    output       (N, 1, 48, 192, 192)    logits

Table 1 lists each stage's output *after* its max-pool, so its Encoder3 row
(64 x 3 x 12 x 12) and the bottleneck (128 x 3 x 12 x 12) agree: 48 x 192 x 192
over four 2x poolings is 3 x 12 x 12. Every spatial size must therefore be a
multiple of 2**depth (16 by default); :meth:`UNet3d.forward` raises
``ValueError`` otherwise, and the caller pads (sub-cases are cut at 48 x 192 x 192).

The residual unit: Table 1 vs the text of Fig. 4
-------------------------------------------------
Table 1 lists, for every stage, "Conv, IN, ReLU, k=1" followed by two "Conv, IN,
ReLU, k=3" rows. Read literally that is a chain of three conv-IN-ReLU blocks and
leaves no place for the residual sum. The text of Fig. 4 is specific: the
*mapping* path is conv-IN-ReLU then conv-IN; a convolution on the *identity*
path matches the channel count; the two are added and the sum goes through
ReLU. We follow the text::

    y = ReLU( IN(conv3(ReLU(IN(conv3(x))))) + conv1(x) )

and read Table 1's rows as the unit's three convolutions: the k=1 row is the
identity-path projection (a plain 1x1x1 convolution with bias, no IN or ReLU:
the text names only "a convolutional layer" there, and an activation on the
shortcut would stop it being a linear identity map), the two k=3 rows are the
mapping path. The table's "Conv, IN, ReLU" is a generic label: it is also
attached to the second k=3 convolution, which the text says has no ReLU before
the sum. In this network the channel count always changes inside a unit
(1 -> 8, 8 -> 16, ..., concatenated 2c -> c), so every unit has the projection;
a unit whose channels do not change (possible with custom widths) uses the
plain identity.

Other choices the paper leaves open
-----------------------------------
- Instance norm with learnable scale and shift (``affine=True``, as nnU-Net and
  MONAI use); convolutions that feed a norm layer carry no bias (the norm's
  mean subtraction cancels it). ``norm="none"`` restores the biases.
- The transposed convolution is followed by IN and ReLU, as Table 1's decoder
  rows say. The skip is the encoder's residual-unit output before pooling,
  concatenated as ``cat([skip, up])``.
- Xavier (Glorot) uniform weights, zero biases; norm layers start at 1 / 0.
- The output layer returns logits; Table 1's sigmoid belongs to the loss
  (:mod:`lungseg.losses`) and to inference (project convention).

The plain 3D U-Net baseline (Table 3/4 "3D U-Net", Cicek et al.) has the same
widths, pooling, decoder and head, with two conv-IN-ReLU layers per stage
instead of the residual unit (``block="plain"``).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

NormLayer = Callable[[int], nn.Module]

BLOCKS = ("residual", "plain")
NORMS = ("instance", "batch", "none")


@dataclass(frozen=True)
class UNet3dConfig:
    """Settings of :class:`UNet3d`; the defaults are paper A's Table 1.

    ``widths[i]`` is the channel count of encoder stage ``i``; the last entry is
    the bottleneck. ``depth = len(widths) - 1`` poolings, so inputs must be
    multiples of ``2**depth`` in every spatial dimension.
    """

    in_channels: int = 1
    out_channels: int = 1
    widths: tuple[int, ...] = (8, 16, 32, 64, 128)
    block: str = "residual"        # "residual" (3D Res U-Net) or "plain" (3D U-Net)
    norm: str = "instance"         # "instance", "batch" or "none"
    kernel_size: int = 3

    def __post_init__(self):
        if any(not isinstance(w, numbers.Integral) or isinstance(w, bool) for w in self.widths):
            raise ValueError(f"widths must be ints, got {self.widths!r}")
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        for name in ("in_channels", "out_channels", "kernel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if len(self.widths) < 2:
            raise ValueError(f"widths needs at least 2 entries (one pooling), got {self.widths}")
        if any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be positive, got {self.widths}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {self.kernel_size}")
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")

    @property
    def depth(self) -> int:
        """Number of 2x poolings (4 in paper A)."""
        return len(self.widths) - 1

    @property
    def size_multiple(self) -> int:
        """Every spatial input size must be a multiple of this (16 in paper A)."""
        return 2 ** self.depth

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UNet3dConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def norm_factory(norm: str) -> NormLayer | None:
    """The norm layer named by ``norm`` as a ``channels -> module`` callable (None for "none")."""
    if norm == "instance":
        return lambda c: nn.InstanceNorm3d(c, affine=True)
    if norm == "batch":
        return nn.BatchNorm3d
    if norm == "none":
        return None
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _conv(cin: int, cout: int, k: int, *, bias: bool) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, k, padding=k // 2, bias=bias)


def _norm(norm_layer: NormLayer | None, c: int) -> nn.Module:
    return nn.Identity() if norm_layer is None else norm_layer(c)


class ResidualUnit(nn.Module):
    """Fig. 4: ``ReLU(IN(conv(ReLU(IN(conv(x))))) + conv1x1x1(x))``.

    (N, in_channels, D, H, W) -> (N, out_channels, D, H, W). The 1x1x1
    projection on the identity path exists only when the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3,
                 norm_layer: NormLayer | None = None):
        super().__init__()
        bias = norm_layer is None
        self.conv1 = _conv(in_channels, out_channels, kernel_size, bias=bias)
        self.norm1 = _norm(norm_layer, out_channels)
        self.conv2 = _conv(out_channels, out_channels, kernel_size, bias=bias)
        self.norm2 = _norm(norm_layer, out_channels)
        self.shortcut = (nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels
                         else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class PlainUnit(nn.Sequential):
    """3D U-Net stage: two conv-norm-ReLU layers, (N, in, D, H, W) -> (N, out, D, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3,
                 norm_layer: NormLayer | None = None):
        bias = norm_layer is None
        super().__init__(
            _conv(in_channels, out_channels, kernel_size, bias=bias), _norm(norm_layer, out_channels),
            nn.ReLU(inplace=True),
            _conv(out_channels, out_channels, kernel_size, bias=bias), _norm(norm_layer, out_channels),
            nn.ReLU(inplace=True),
        )


class UpConv(nn.Sequential):
    """Table 1 decoder row: TransConv k=2 s=2, IN, ReLU: (N, in, D, H, W) -> (N, out, 2D, 2H, 2W)."""

    def __init__(self, in_channels: int, out_channels: int, *, norm_layer: NormLayer | None = None):
        super().__init__(
            nn.ConvTranspose3d(in_channels, out_channels, 2, stride=2, bias=norm_layer is None),
            _norm(norm_layer, out_channels),
            nn.ReLU(inplace=True),
        )


class UNet3d(nn.Module):
    """3D (Res) U-Net: (N, in_channels, D, H, W) -> logits (N, out_channels, D, H, W).

    D, H and W must be multiples of ``config.size_multiple`` (16 by default).
    ``norm_layer`` (a ``channels -> nn.Module`` callable) overrides
    ``config.norm``; a checkpoint's config then does not record it, so pass the
    same callable when loading.

    Submodules, in data order: ``encoders[i]`` (unit at full stage resolution,
    output kept as the skip), ``pool`` (shared, called once per encoder stage),
    ``bottleneck``, ``ups[i]`` and ``decoders[i]`` (i = 0 is the deepest
    decoder stage, Table 1's Decoder0), ``head``.
    """

    def __init__(self, config: UNet3dConfig | None = None, *, norm_layer: NormLayer | None = None):
        super().__init__()
        self.config = config = config or UNet3dConfig()
        if norm_layer is None:
            norm_layer = norm_factory(config.norm)
        Unit = ResidualUnit if config.block == "residual" else PlainUnit
        k = config.kernel_size
        w = config.widths
        self.encoders = nn.ModuleList()
        cin = config.in_channels
        for width in w[:-1]:
            self.encoders.append(Unit(cin, width, kernel_size=k, norm_layer=norm_layer))
            cin = width
        self.pool = nn.MaxPool3d(2)
        self.bottleneck = Unit(w[-2], w[-1], kernel_size=k, norm_layer=norm_layer)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for deep, shallow in zip(w[:0:-1], w[-2::-1]):
            self.ups.append(UpConv(deep, shallow, norm_layer=norm_layer))
            self.decoders.append(Unit(2 * shallow, shallow, kernel_size=k, norm_layer=norm_layer))
        self.head = nn.Conv3d(w[0], config.out_channels, 1)
        xavier_init(self)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is (N, in_channels, D, H, W) with sizes multiples of 2**depth."""
        c = self.config
        if x.ndim != 5:
            raise ValueError(f"expected input (N, C, D, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != c.in_channels:
            raise ValueError(f"expected {c.in_channels} input channel(s), got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)})")
        m = c.size_multiple
        spatial = tuple(x.shape[2:])
        if any(s % m for s in spatial):
            padded = tuple(-(-s // m) * m for s in spatial)
            raise ValueError(
                f"input spatial size {spatial} is not a multiple of {m} in every dimension "
                f"({c.depth} 2x poolings); pad it to {padded} (paper A uses 48 x 192 x 192 sub-cases)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = dec(torch.cat([skip, up(x)], dim=1))
        return self.head(x)


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
          nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm)


def xavier_init(module: nn.Module) -> None:
    """Paper A's initializer: Xavier-uniform conv/linear weights, zero biases, norms at 1 / 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                          nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _NORMS):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def _widths(widths: Sequence[int] | None, base_width: int | None, depth: int | None) -> tuple[int, ...]:
    if widths is not None:
        if base_width is not None or depth is not None:
            raise ValueError("give either widths or base_width/depth, not both")
        return tuple(widths)
    base = 8 if base_width is None else base_width
    d = 4 if depth is None else depth
    if not isinstance(base, int) or base < 1:
        raise ValueError(f"base_width must be a positive int, got {base!r}")
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"depth must be a positive int, got {d!r}")
    return tuple(base * 2 ** i for i in range(d + 1))


def resunet3d(*, in_channels: int = 1, out_channels: int = 1, widths: Sequence[int] | None = None,
              base_width: int | None = None, depth: int | None = None, norm: str = "instance",
              kernel_size: int = 3, norm_layer: NormLayer | None = None) -> UNet3d:
    """Paper A's 3D Res U-Net (Table 1 with the defaults).

    Width and depth: either ``widths`` (encoder channels then the bottleneck's)
    or ``base_width`` (8) and ``depth`` (4 poolings), giving
    ``base_width * 2**i`` for ``i = 0..depth``.
    """
    cfg = UNet3dConfig(in_channels=in_channels, out_channels=out_channels,
                       widths=_widths(widths, base_width, depth), block="residual", norm=norm,
                       kernel_size=kernel_size)
    return UNet3d(cfg, norm_layer=norm_layer)


def unet3d(*, in_channels: int = 1, out_channels: int = 1, widths: Sequence[int] | None = None,
           base_width: int | None = None, depth: int | None = None, norm: str = "instance",
           kernel_size: int = 3, norm_layer: NormLayer | None = None) -> UNet3d:
    """The paper's baseline plain 3D U-Net, same widths and options as :func:`resunet3d`."""
    cfg = UNet3dConfig(in_channels=in_channels, out_channels=out_channels,
                       widths=_widths(widths, base_width, depth), block="plain", norm=norm,
                       kernel_size=kernel_size)
    return UNet3d(cfg, norm_layer=norm_layer)
