"""Losses of paper A: soft Dice (eq. 1), BCE (eq. 3), their schedule, and NLL (eq. 4).

Segmentation ("Segmentation network architecture"): the 3D Res U-Net is trained
with BCE for the first 3 epochs, then with Dice loss; the plain 3D U-Net
baseline uses Dice throughout. Classification: NLL of the log-softmax output
(eq. 4) for the 3D ResNet50.

All functions take the networks' *logits* (project convention: models return
logits; sigmoid and softmax live here and in inference) and compute in at least
float32 even under autocast, so sums over a 48 x 192 x 192 sub-case are exact
enough. Shapes: segmentation logits and targets (N, C, *spatial) with equal
shapes, targets in [0, 1] (bool or integer masks are accepted); classification
logits (N, K), targets (N,) integer class indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")
SCHEDULES = ("paper", "dice", "bce", "dice+bce")


def _float(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32, or float64 when it already is (gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32)) if x.is_floating_point() else x.float()


def _check_seg(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.ndim < 3:
        raise ValueError(f"expected logits (N, C, *spatial), got shape {tuple(logits.shape)}")
    if target.shape != logits.shape:
        raise ValueError(f"target shape {tuple(target.shape)} differs from logits shape "
                         f"{tuple(logits.shape)}; add the channel axis to masks: mask[:, None]")


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, eps: float = 1.0,
                   batch_dice: bool = False, reduction: str = "mean") -> torch.Tensor:
    """Eq. 1 on sigmoid probabilities: ``1 - (2 sum(P T) + eps) / (sum(P) + sum(T) + eps)``.

    Sums run over the spatial axes of each (sample, channel), or also over the
    batch with ``batch_dice=True``; ``reduction`` then averages or sums the
    (N, C) (or (C,)) losses, or returns them with "none".

    ``eps`` (default 1, the usual "smooth" term) keeps the loss finite and
    defined for an empty target: an empty mask and an all-background
    prediction give exactly 0, and an empty mask with predicted mass
    ``s = sum(P)`` gives ``s / (s + eps)``, which pushes false positives down.
    ``eps`` must be > 0: eq. 1 itself (``eps = 0``) is 0/0 for an empty target
    and an empty prediction.
    """
    _check_seg(logits, target)
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it keeps empty masks defined), got {eps!r}")
    p = torch.sigmoid(_float(logits))
    t = target.to(p.dtype)
    dims = tuple(range(2, p.ndim))
    if batch_dice:
        dims = (0,) + dims
    inter = (p * t).sum(dims)
    denom = p.sum(dims) + t.sum(dims)
    loss = 1.0 - (2.0 * inter + eps) / (denom + eps)
    return _reduce(loss, reduction)


def bce_loss(logits: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean",
             pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3, ``-[T log P + (1 - T) log(1 - P)]`` with ``P = sigmoid(logits)``, per voxel.

    Computed from the logits as ``max(x, 0) - x T + log(1 + exp(-|x|))``
    (numerically stable for any logit). Eq. 3 writes the sum over voxels
    (``reduction="sum"``); the default "mean" divides it by the voxel count
    (PyTorch's default, which the paper's PyTorch code most likely used). The
    gradient with respect to a logit is ``P - T`` (eq. 3), times ``pos_weight``
    on positive voxels when given.
    """
    _check_seg(logits, target)
    x = _float(logits)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return F.binary_cross_entropy_with_logits(x, target.to(x.dtype), reduction=reduction,
                                              pos_weight=pos_weight)


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, *, dice_weight: float = 1.0,
                  bce_weight: float = 1.0, eps: float = 1.0) -> torch.Tensor:
    """``dice_weight * soft_dice_loss + bce_weight * bce_loss`` (both mean-reduced), a scalar."""
    return (dice_weight * soft_dice_loss(logits, target, eps=eps)
            + bce_weight * bce_loss(logits, target))


@dataclass(frozen=True)
class SegLoss:
    """The segmentation loss, possibly changing with the epoch.

    ``schedule``: "paper" (BCE for epochs ``0 .. switch_epoch - 1``, then soft
    Dice: the paper's "first 3 epochs" with the default ``switch_epoch=3`` and
    0-based epochs), "dice" (the 3D U-Net baseline), "bce", or "dice+bce"
    (weighted sum, every epoch). Call it as ``loss(logits, target, epoch=e)``.
    """

    schedule: str = "paper"
    switch_epoch: int = 3
    eps: float = 1.0
    dice_weight: float = 1.0
    bce_weight: float = 1.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not isinstance(self.switch_epoch, int) or self.switch_epoch < 0:
            raise ValueError(f"switch_epoch must be an int >= 0, got {self.switch_epoch!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")
        if self.dice_weight < 0 or self.bce_weight < 0 or self.dice_weight + self.bce_weight == 0:
            raise ValueError("dice_weight and bce_weight must be >= 0 and not both 0")

    def kind(self, epoch: int) -> str:
        """The loss used at 0-based ``epoch``: "bce", "dice" or "dice+bce"."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self.schedule == "paper":
            return "bce" if epoch < self.switch_epoch else "dice"
        return self.schedule

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, *, epoch: int) -> torch.Tensor:
        kind = self.kind(epoch)
        if kind == "bce":
            return bce_loss(logits, target)
        if kind == "dice":
            return soft_dice_loss(logits, target, eps=self.eps)
        return dice_bce_loss(logits, target, dice_weight=self.dice_weight,
                             bce_weight=self.bce_weight, eps=self.eps)


def nll_loss(logits: torch.Tensor, target: torch.Tensor, *, weight: torch.Tensor | None = None,
             reduction: str = "mean") -> torch.Tensor:
    """Eq. 4: ``mean_n -ln(P_n . T_n)`` with ``P = softmax(logits)`` and one-hot ``T``.

    ``logits`` (N, K), ``target`` (N,) integer class indices in ``0..K-1``.
    Computed as NLL of ``log_softmax`` (stable). ``weight`` (K,) weights the
    classes (then "mean" divides by the summed weights, as PyTorch does).
    """
    if logits.ndim != 2:
        raise ValueError(f"expected logits (N, K), got shape {tuple(logits.shape)}")
    if target.ndim != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"expected target ({logits.shape[0]},) of class indices, got shape "
                         f"{tuple(target.shape)}")
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    k = logits.shape[1]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= k):
        raise ValueError(f"target class indices must lie in 0..{k - 1}, got "
                         f"{int(target.min())}..{int(target.max())}")
    return F.nll_loss(F.log_softmax(_float(logits), dim=1), target.long(), weight=weight,
                      reduction=reduction)
