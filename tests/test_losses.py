"""losses.py: exact values on hand-computed tensors, empty masks, gradients, the schedule, bad input."""

import math

import pytest
import torch

from lungseg.losses import SegLoss, bce_loss, dice_bce_loss, nll_loss, soft_dice_loss

LN3 = math.log(3.0)


def small():
    """Logits giving P = [0.5, 0.5, 0.75, 0.25] against T = [1, 0, 1, 0], shape (1, 1, 2, 2)."""
    logits = torch.tensor([0.0, 0.0, LN3, -LN3], dtype=torch.float64).reshape(1, 1, 2, 2)
    target = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    return logits, target


def test_soft_dice_exact_value():
    logits, target = small()
    # sum(P T) = 0.5 + 0.75 = 1.25, sum(P) = 2, sum(T) = 2
    assert soft_dice_loss(logits, target, eps=1.0).item() == pytest.approx(1 - (2.5 + 1) / (4 + 1))
    assert soft_dice_loss(logits, target, eps=1e-12).item() == pytest.approx(1 - 2.5 / 4)


def test_soft_dice_per_sample_batch_and_reductions():
    logits, target = small()
    l2 = torch.cat([logits, torch.full_like(logits, 50.0)])          # second sample: P ~ 1 everywhere
    t2 = torch.cat([target, torch.ones_like(target)])
    per = soft_dice_loss(l2, t2, reduction="none")
    assert per.shape == (2, 1)
    torch.testing.assert_close(per[:, 0], torch.tensor([0.3, 0.0], dtype=torch.float64))
    assert soft_dice_loss(l2, t2).item() == pytest.approx(0.15)
    assert soft_dice_loss(l2, t2, reduction="sum").item() == pytest.approx(0.3)
    # batch Dice pools both samples: I = 1.25 + 4, sums 2 + 4 and 2 + 4
    assert soft_dice_loss(l2, t2, batch_dice=True).item() == pytest.approx(1 - (10.5 + 1) / (12 + 1))


def test_soft_dice_empty_mask_is_defined():
    target = torch.zeros(2, 1, 3, 3, 3)
    # Everything predicted background: exactly 0, gradient finite.
    logits = torch.full_like(target, -float("inf")).requires_grad_()
    loss = soft_dice_loss(logits, target)
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(logits.grad).any()
    # Predicted mass s = sum(P) on an empty mask: s / (s + eps).
    logits = torch.zeros_like(target, requires_grad=True)            # P = 0.5 on 27 voxels
    loss = soft_dice_loss(logits, target)
    loss.backward()
    assert loss.item() == pytest.approx(13.5 / 14.5)
    assert torch.isfinite(logits.grad).all() and (logits.grad > 0).all()


def test_soft_dice_gradient_matches_the_formula():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    t = (torch.rand(1, 1, 4, 5) > 0.5).double()
    eps = 1.0
    soft_dice_loss(x, t, eps=eps).backward()
    p = torch.sigmoid(x.detach())
    inter, s = (p * t).sum(), p.sum() + t.sum() + eps
    dl_dp = -(2 * t * s - (2 * inter + eps)) / s ** 2               # d/dP of 1 - (2I + eps) / S
    torch.testing.assert_close(x.grad, dl_dp * p * (1 - p))
    assert torch.autograd.gradcheck(lambda z: soft_dice_loss(z, t), (x.detach().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda z: soft_dice_loss(z, t, batch_dice=True, reduction="none"),
                                    (x.detach().requires_grad_(),))


def test_bce_exact_value_and_stability():
    logits, target = small()
    # -ln 0.5 - ln 0.5 - ln 0.75 - ln 0.75
    total = 2 * math.log(2) + 2 * math.log(4 / 3)
    assert bce_loss(logits, target, reduction="sum").item() == pytest.approx(total)
    assert bce_loss(logits, target).item() == pytest.approx(total / 4)
    big = torch.tensor([1000.0, -1000.0, 1000.0, -1000.0]).reshape(1, 1, 2, 2)
    t = torch.tensor([0.0, 0.0, 1.0, 1.0]).reshape(1, 1, 2, 2)
    torch.testing.assert_close(bce_loss(big, t, reduction="none").flatten(),
                               torch.tensor([1000.0, 0.0, 0.0, 1000.0]))


def test_bce_gradient_is_p_minus_t():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    t = torch.rand(2, 1, 3, 3, dtype=torch.float64)                  # soft targets allowed
    bce_loss(x, t, reduction="sum").backward()
    torch.testing.assert_close(x.grad, torch.sigmoid(x.detach()) - t)   # eq. 3
    assert torch.autograd.gradcheck(lambda z: bce_loss(z, t), (x.detach().requires_grad_(),))


def test_dice_bce_is_the_weighted_sum():
    logits, target = small()
    expected = 0.3 + 2.0 * (2 * math.log(2) + 2 * math.log(4 / 3)) / 4
    assert dice_bce_loss(logits, target, bce_weight=2.0).item() == pytest.approx(expected)


def test_losses_accept_bool_masks_and_compute_in_float32_under_low_precision():
    logits = torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16)
    mask = torch.tensor([[True, False], [False, False]]).reshape(1, 1, 2, 2)
    for fn in (soft_dice_loss, bce_loss, dice_bce_loss):
        assert fn(logits, mask).dtype == torch.float32
    assert soft_dice_loss(logits, mask).item() == pytest.approx(1 - (1 + 1) / (2 + 1 + 1))


def test_seg_loss_schedule():
    paper = SegLoss()
    assert [paper.kind(e) for e in range(5)] == ["bce", "bce", "bce", "dice", "dice"]
    assert [SegLoss(switch_epoch=1).kind(e) for e in range(3)] == ["bce", "dice", "dice"]
    assert SegLoss(switch_epoch=0).kind(0) == "dice"
    assert {SegLoss(schedule="dice").kind(e) for e in range(5)} == {"dice"}
    assert {SegLoss(schedule="bce").kind(e) for e in range(5)} == {"bce"}
    logits, target = small()
    assert paper(logits, target, epoch=2).item() == pytest.approx(bce_loss(logits, target).item())
    assert paper(logits, target, epoch=3).item() == pytest.approx(0.3)
    both = SegLoss(schedule="dice+bce", dice_weight=0.5)
    assert both(logits, target, epoch=0).item() == pytest.approx(
        0.5 * 0.3 + bce_loss(logits, target).item())


def test_nll_exact_value_with_three_classes():
    logits = torch.tensor([[0.0, 0.0, 0.0], [LN3, 0.0, 0.0]])
    target = torch.tensor([2, 0])
    # softmax rows: [1/3, 1/3, 1/3] and [3/5, 1/5, 1/5]
    expected = (math.log(3) - math.log(3 / 5)) / 2
    assert nll_loss(logits, target).item() == pytest.approx(expected)
    torch.testing.assert_close(nll_loss(logits, target, reduction="none"),
                               torch.tensor([math.log(3), -math.log(3 / 5)]))
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: nll_loss(z, torch.tensor([0, 1, 2, 1])), (x,))


def test_nll_gradient_is_softmax_minus_one_hot():
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 2, 1])
    nll_loss(x, target, reduction="sum").backward()
    one_hot = torch.nn.functional.one_hot(target, 3).double()
    torch.testing.assert_close(x.grad, torch.softmax(x.detach(), 1) - one_hot)


@pytest.mark.parametrize("call", [
    lambda: soft_dice_loss(torch.zeros(1, 1, 4), torch.zeros(1, 4)),            # shape mismatch
    lambda: soft_dice_loss(torch.zeros(4, 4), torch.zeros(4, 4)),               # no spatial axes
    lambda: soft_dice_loss(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4), eps=0),
    lambda: soft_dice_loss(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4), reduction="avg"),
    lambda: bce_loss(torch.zeros(1, 1, 4), torch.zeros(1, 1, 5)),
    lambda: bce_loss(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4), reduction="avg"),
    lambda: nll_loss(torch.zeros(2, 3), torch.tensor([0.0, 1.0])),              # float targets
    lambda: nll_loss(torch.zeros(2, 3), torch.tensor([0, 3])),                  # class out of range
    lambda: nll_loss(torch.zeros(2, 3), torch.tensor([0, -1])),
    lambda: nll_loss(torch.zeros(2, 3), torch.tensor([0, 1, 2])),               # length mismatch
    lambda: nll_loss(torch.zeros(2, 3, 1), torch.tensor([0, 1])),
    lambda: SegLoss(schedule="focal"),
    lambda: SegLoss(switch_epoch=-1),
    lambda: SegLoss(eps=0.0),
    lambda: SegLoss(dice_weight=0.0, bce_weight=0.0),
    lambda: SegLoss().kind(-1),
])
def test_ill_formed_cases_raise(call):
    with pytest.raises(ValueError):
        call()
