import math

import pytest
import torch

from segexp.errors import DataError
from segexp.metrics import ConfusionMatrix, format_table


def test_update_builds_the_matrix_and_skips_ignored_pixels():
    target = torch.tensor([[[0, 0, 1, 1], [2, 255, 255, 0]]])
    pred = torch.tensor([[[0, 1, 1, 1], [0, 2, 0, 0]]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    # rows = ground truth, cols = prediction; the two ignored pixels are nowhere.
    expected = torch.tensor([[2, 1, 0], [0, 2, 0], [1, 0, 0]])
    assert torch.equal(cm.mat, expected)
    assert cm.mat.dtype == torch.int64
    cm.reset()
    assert cm.mat.sum() == 0


def test_metrics_from_a_hand_made_matrix():
    cm = ConfusionMatrix(4)
    # Class 3 is absent from ground truth and prediction; class 2 only predicted.
    cm.mat = torch.tensor([[5, 1, 2, 0],
                           [2, 6, 0, 0],
                           [0, 0, 0, 0],
                           [0, 0, 0, 0]])
    r = cm.compute()
    iou = [5 / (5 + 3 + 2), 6 / (6 + 2 + 1), 0.0]
    acc = [5 / 8, 6 / 8]
    dice = [10 / (10 + 3 + 2), 12 / (12 + 2 + 1), 0.0]
    assert r["IoU"][:3] == pytest.approx(iou) and math.isnan(r["IoU"][3])
    assert r["Dice"][:3] == pytest.approx(dice) and math.isnan(r["Dice"][3])
    assert r["Acc"][:2] == pytest.approx(acc)
    assert math.isnan(r["Acc"][2]) and math.isnan(r["Acc"][3])
    assert r["mIoU"] == pytest.approx(sum(iou) / 3)  # predicted-only class 2 counts, 3 does not
    assert r["mDice"] == pytest.approx(sum(dice) / 3)
    assert r["mAcc"] == pytest.approx(sum(acc) / 2)
    assert r["aAcc"] == pytest.approx(11 / 16)
    assert all(isinstance(r[k], float) for k in ("mIoU", "aAcc", "mAcc", "mDice"))


def test_empty_matrix_gives_nan_not_an_error():
    r = ConfusionMatrix(2).compute()
    assert math.isnan(r["mIoU"]) and math.isnan(r["aAcc"])


def test_logits_equal_argmax_and_batches_accumulate():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, 7, 9, generator=g)
    target = torch.randint(0, 5, (6, 7, 9), generator=g)
    target[torch.rand(6, 7, 9, generator=g) < 0.2] = 255
    whole, by_logits, batched = ConfusionMatrix(5), ConfusionMatrix(5), ConfusionMatrix(5)
    whole.update(logits.argmax(1), target)
    by_logits.update(logits, target)
    for i in range(0, 6, 2):
        batched.update(logits[i:i + 2].argmax(1), target[i:i + 2])
    assert torch.equal(whole.mat, by_logits.mat)
    assert torch.equal(whole.mat, batched.mat)
    assert whole.mat.sum() == (target != 255).sum()
    other = ConfusionMatrix(5)
    other.update(logits[:3], target[:3])
    rest = ConfusionMatrix(5)
    rest.update(logits[3:], target[3:])
    assert torch.equal(other.merge(rest).mat, whole.mat)


def test_matrix_follows_the_input_device():
    cm = ConfusionMatrix(3)
    # CPU here (CUDA checked too where present): the device comes from the input.
    target = torch.tensor([[[0, 1], [2, 2]]])
    cm.update(target.clone(), target)
    assert cm.mat.device == target.device
    fixed = ConfusionMatrix(3, device="cpu")
    fixed.update(target.clone(), target)
    assert fixed.mat.device.type == "cpu" and fixed.mat.trace() == 4
    if torch.cuda.is_available():  # pragma: no cover - GPU machines only
        gpu = ConfusionMatrix(3)
        gpu.update(target.cuda(), target.cuda())
        assert gpu.mat.is_cuda


def test_out_of_range_labels_are_a_clear_error():
    cm = ConfusionMatrix(3)
    with pytest.raises(DataError, match=r"target values in \[0, 7\]"):
        cm.update(torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([[[0, 7]]]))


def test_format_table_shows_names_values_and_absent_classes():
    cm = ConfusionMatrix(3)
    cm.mat = torch.tensor([[3, 1, 0], [1, 3, 0], [0, 0, 0]])
    r = cm.compute()
    table = format_table(r, ["road", "sky", "unicorn"])
    lines = table.splitlines()
    road = next(line for line in lines if line.startswith("road"))
    assert road.split() == ["road", "60.00", "75.00", "75.00"]
    unicorn = next(line for line in lines if line.startswith("unicorn"))
    assert unicorn.split() == ["unicorn", "-", "-", "-"]
    mean = next(line for line in lines if line.startswith("mean"))
    assert mean.split() == ["mean", "60.00", "75.00", "75.00"]
    assert "aAcc: 75.00" in table
    with pytest.raises(ValueError):
        format_table(r, ["road", "sky"])
