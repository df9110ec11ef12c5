import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segexp.errors import ConfigError
from segexp.losses import CombinedLoss, CrossEntropyLoss, DiceLoss, FocalLoss
from tests.conftest import CONF, make_batch

LOSS_CONF = CONF / "loss"


def test_ce_matches_hand_computation_and_torch():
    logits, target = make_batch()
    valid = target != 255
    logp = logits.log_softmax(1)
    by_hand = -logp.gather(1, torch.where(valid, target, 0).unsqueeze(1)).squeeze(1)[valid].mean()
    loss = CrossEntropyLoss()(logits, target)
    assert torch.allclose(loss, by_hand, atol=1e-6)
    assert torch.allclose(loss, F.cross_entropy(logits, target, ignore_index=255), atol=1e-6)


@pytest.mark.parametrize("loss_fn", [CrossEntropyLoss(), DiceLoss(), FocalLoss(),
                                     CombinedLoss({"ce": CrossEntropyLoss(), "dice": DiceLoss()})])
def test_ignored_pixels_do_not_change_the_loss(loss_fn):
    logits, target = make_batch(ignore_frac=0.3)
    garbage = logits.clone()
    ignored = (target == 255).unsqueeze(1).expand_as(logits)
    garbage[ignored] = torch.randn(int(ignored.sum())) * 100
    assert torch.allclose(loss_fn(logits, target), loss_fn(garbage, target), atol=1e-6)
    assert loss_fn(logits, target) > 0


@pytest.mark.parametrize("loss_fn", [CrossEntropyLoss(),
                                     CrossEntropyLoss(class_weights=[1, 2, 3, 4]),
                                     DiceLoss(), FocalLoss(),
                                     CombinedLoss([CrossEntropyLoss(), DiceLoss()], [1.0, 1.0])])
def test_all_ignored_gives_zero_with_gradient(loss_fn):
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    target = torch.full((2, 3, 3), 255)
    loss = loss_fn(logits, target)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() == 0


def test_class_weights_match_torch_and_follow_the_device_buffer():
    logits, target = make_batch()
    weights = [0.5, 1.0, 2.0, 4.0]
    loss_fn = CrossEntropyLoss(class_weights=weights)
    expected = F.cross_entropy(logits, target, weight=torch.tensor(weights), ignore_index=255)
    assert torch.allclose(loss_fn(logits, target), expected, atol=1e-6)
    assert not torch.allclose(loss_fn(logits, target), CrossEntropyLoss()(logits, target))
    assert "class_weights" in dict(loss_fn.named_buffers())
    with pytest.raises(ConfigError, match="loss.class_weights has 4 values"):
        loss_fn(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


def test_label_smoothing_matches_torch():
    logits, target = make_batch()
    for weights in (None, [0.5, 1.0, 2.0, 4.0]):
        loss = CrossEntropyLoss(class_weights=weights, label_smoothing=0.1)(logits, target)
        w = None if weights is None else torch.tensor(weights)
        expected = F.cross_entropy(logits, target, weight=w, ignore_index=255, label_smoothing=0.1)
        assert torch.allclose(loss, expected, atol=1e-6)
    assert not torch.allclose(loss, CrossEntropyLoss(class_weights=weights)(logits, target))


def test_dice_is_zero_for_a_perfect_prediction():
    _, target = make_batch(c=3)
    safe = torch.where(target == 255, 0, target)
    logits = F.one_hot(safe, 3).permute(0, 3, 1, 2).float() * 50
    assert DiceLoss()(logits, target).item() == pytest.approx(0.0, abs=1e-5)
    assert DiceLoss(per_image=True)(logits, target).item() == pytest.approx(0.0, abs=1e-5)
    assert DiceLoss()(-logits, target).item() > 0.5


def test_dice_hand_computed_and_absent_classes_left_out():
    # Pixel 1: logits (0, 0) -> p = (0.5, 0.5), target 0. Pixel 2: (ln 3, 0) -> (0.75, 0.25),
    # target 1. Pixel 3 is ignored.
    logits = torch.tensor([[[[0.0, math.log(3), 9.0]], [[0.0, 0.0, -9.0]]]])
    target = torch.tensor([[[0, 1, 255]]])
    dice0 = (2 * 0.5 + 1) / (1.25 + 1 + 1)
    dice1 = (2 * 0.25 + 1) / (0.75 + 1 + 1)
    expected = 1 - (dice0 + dice1) / 2
    assert DiceLoss(smooth=1.0)(logits, target).item() == pytest.approx(expected, rel=1e-5)
    # A third class, absent from target and (by its tiny logits) from the prediction, is left out.
    three = torch.cat([logits, torch.full((1, 1, 1, 3), -30.0)], dim=1)
    assert DiceLoss(smooth=1.0)(three, target).item() == pytest.approx(expected, rel=1e-5)
    # Predicted but absent from the target: it enters the mean with its false-positive mass.
    three[0, 2, 0, 0] = 5.0
    z = 2 + math.exp(5)  # pixel 1 now has p = (1, 1, e^5) / z
    d0 = (2 / z + 1) / (1 / z + 0.75 + 1 + 1)
    d1 = (0.5 + 1) / (1 / z + 0.25 + 1 + 1)
    d2 = 1 / (math.exp(5) / z + 1)
    assert DiceLoss(smooth=1.0)(three, target).item() == pytest.approx(
        1 - (d0 + d1 + d2) / 3, rel=1e-5)


def test_focal_with_gamma_zero_is_cross_entropy_and_gamma_down_weights_easy_pixels():
    logits, target = make_batch()
    ce = CrossEntropyLoss()(logits, target)
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, target), ce, atol=1e-6)
    focal = FocalLoss(gamma=2.0)(logits, target)
    assert 0 < focal < ce
    # By hand for gamma 2 and per-class alpha.
    alpha = [0.25, 0.5, 1.0, 2.0]
    valid = target != 255
    safe = torch.where(valid, target, 0)
    logpt = logits.log_softmax(1).gather(1, safe.unsqueeze(1)).squeeze(1)
    per_pixel = -torch.tensor(alpha)[safe] * (1 - logpt.exp()) ** 2 * logpt
    expected = per_pixel[valid].sum() / valid.sum()
    assert torch.allclose(FocalLoss(gamma=2.0, alpha=alpha)(logits, target), expected, atol=1e-6)
    assert torch.allclose(FocalLoss(gamma=2.0, alpha=0.25)(logits, target), 0.25 * focal, atol=1e-6)


def test_combined_is_the_weighted_sum_and_gradients_flow():
    logits, target = make_batch()
    logits.requires_grad_(True)
    ce, dice = CrossEntropyLoss(), DiceLoss()
    combined = CombinedLoss({"ce": ce, "dice": dice}, {"ce": 1.0, "dice": 0.5})
    loss = combined(logits, target)
    expected = ce(logits, target) + 0.5 * dice(logits, target)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert set(combined.last_values) == {"ce", "dice"}
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # Ignored pixels get no gradient.
    ignored = (target == 255).unsqueeze(1).expand_as(logits)
    assert logits.grad[ignored].abs().max() == 0
    with pytest.raises(ConfigError, match="loss.weights"):
        CombinedLoss({"ce": ce, "dice": dice}, {"ce": 1.0, "dcie": 1.0})


@pytest.mark.parametrize("loss_fn", [DiceLoss(), FocalLoss()])
def test_gradients_flow(loss_fn):
    logits, target = make_batch()
    logits.requires_grad_(True)
    loss_fn(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_yaml_configs_instantiate():
    logits, target = make_batch()
    ce = instantiate(OmegaConf.load(LOSS_CONF / "ce.yaml"))
    assert isinstance(ce, CrossEntropyLoss) and ce.ignore_index == 255 and ce.class_weights is None
    assert isinstance(instantiate(OmegaConf.load(LOSS_CONF / "dice.yaml")), DiceLoss)
    assert instantiate(OmegaConf.load(LOSS_CONF / "focal.yaml")).gamma == 2.0
    cfg = OmegaConf.load(LOSS_CONF / "ce_dice.yaml")
    combined = instantiate(cfg)
    assert isinstance(combined, CombinedLoss)
    expected = CrossEntropyLoss()(logits, target) + DiceLoss()(logits, target)
    assert torch.allclose(combined(logits, target), expected, atol=1e-6)
    cfg.losses.ce.class_weights = [1.0, 2.0, 1.0, 1.0]
    weighted = instantiate(cfg).losses["ce"]
    assert torch.equal(weighted.class_weights, torch.tensor([1.0, 2.0, 1.0, 1.0]))
