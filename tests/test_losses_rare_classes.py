"""Losses for thin and rare classes: OHEM cross entropy, Lovász-Softmax, and
``class_weights: auto`` from one cached scan of the training masks (segexp.data.scan)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from PIL import Image

from segexp.config import instantiate as build
from segexp.data import scan as scan_module
from segexp.data.folder import FolderDataset
from segexp.data.scan import MaskScan, class_weights, dataset_fingerprint, scan_masks
from segexp.data.synthetic import SyntheticDataset
from segexp.engine.experiment import run_training
from segexp.errors import ConfigError, DataError
from segexp.losses import CombinedLoss, CrossEntropyLoss, LovaszSoftmaxLoss, resolve_auto_class_weights
from tests.conftest import SHARED_DATASETS, compose_config, make_batch


def logits_for(p_true: list[float], target: list[int]) -> torch.Tensor:
    """Two-class logits (1, 2, 1, W) giving each pixel probability ``p_true`` for its target."""
    logit_of_target = torch.tensor([math.log(p / (1 - p)) for p in p_true])
    first = torch.where(torch.tensor(target) == 0, logit_of_target, -logit_of_target)
    return torch.stack([first, torch.zeros_like(first)]).view(1, 2, 1, -1)


# -- OHEM ---------------------------------------------------------------------------------------
# Five pixels (target 0 or 1) with these true-class probabilities, and one ignored pixel.
P_TRUE = [0.9, 0.8, 0.6, 0.5, 0.2, 0.5]
TARGET = torch.tensor([[[0, 1, 1, 0, 0, 255]]])
NLL = [-math.log(p) for p in P_TRUE[:5]]


def ohem_loss(**ohem) -> float:
    loss_fn = CrossEntropyLoss(ohem=ohem)
    return loss_fn(logits_for(P_TRUE, [0, 1, 1, 0, 0, 0]), TARGET).item()


@pytest.mark.parametrize(("ohem", "kept"), [
    ({"thresh": 0.7, "min_kept": 1}, [2, 3, 4]),  # p < 0.7; the 1 hardest is among them
    ({"thresh": 0.7, "min_kept": 4}, [1, 2, 3, 4]),  # + the 4 hardest, 0.8 included
    ({"thresh": 0.55, "min_kept": 2}, [3, 4]),  # p < 0.55 = the 2 hardest
    ({"thresh": 0.1, "min_kept": 3}, [2, 3, 4]),  # nothing below 0.1: the 3 hardest
    ({"thresh": 0.7, "min_kept": 5}, [0, 1, 2, 3, 4]),  # budget = every valid pixel
    ({"thresh": None, "min_kept": 2}, [3, 4]),  # the 2 highest losses
])
def test_ohem_keeps_the_hand_computed_pixels(ohem, kept):
    """Kept pixels' losses over the count of *valid* pixels (5): plain CE's denominator."""
    expected = sum(NLL[i] for i in kept) / 5
    assert ohem_loss(**ohem) == pytest.approx(expected, rel=1e-5)


def test_ohem_budget_is_per_image_but_chosen_over_the_batch():
    """min_kept=2 with two images is a budget of 4 pixels, all from the harder image."""
    easy = logits_for([0.99, 0.98, 0.97, 0.96], [0, 0, 0, 0])
    hard = logits_for([0.4, 0.3, 0.2, 0.1], [0, 0, 0, 0])
    logits = torch.cat([easy, hard]).requires_grad_(True)
    target = torch.zeros(2, 1, 4, dtype=torch.long)
    loss = CrossEntropyLoss(ohem={"thresh": 0.05, "min_kept": 2})(logits, target)
    expected = -sum(math.log(p) for p in (0.4, 0.3, 0.2, 0.1)) / 8
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert logits.grad[0].abs().max() == 0 and (logits.grad[1].abs().sum(dim=0) > 0).all()


def test_ohem_gradient_of_kept_pixels_is_plain_cross_entropys():
    logits, target = make_batch(h=16, w=16)
    weights = [0.5, 1.0, 2.0, 4.0]
    plain = logits.clone().requires_grad_(True)
    CrossEntropyLoss(class_weights=weights)(plain, target).backward()
    mined = logits.clone().requires_grad_(True)
    CrossEntropyLoss(class_weights=weights, ohem={"thresh": 0.5, "min_kept": 20})(mined, target).backward()
    safe = torch.where(target == 255, 0, target).unsqueeze(1)
    p_true = logits.softmax(1).gather(1, safe).squeeze(1)
    valid = target != 255
    dropped = valid & (p_true >= 0.5)
    kept = valid & (p_true < 0.5)
    assert dropped.sum() > 40 and kept.sum() > 40  # the budget (40) does not reach past 0.5 here
    grad_plain, grad_mined = plain.grad.permute(0, 2, 3, 1), mined.grad.permute(0, 2, 3, 1)
    assert torch.allclose(grad_mined[kept], grad_plain[kept], atol=1e-7)
    assert grad_mined[dropped].abs().max() == 0 and grad_mined[~valid].abs().max() == 0


def test_ohem_all_ignored_gives_zero_with_gradient():
    for thresh in (0.7, None):
        logits = torch.randn(2, 3, 4, 4, requires_grad=True)
        loss = CrossEntropyLoss(ohem={"thresh": thresh, "min_kept": 3})(
            logits, torch.full((2, 4, 4), 255))
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0


def test_ohem_warns_once_when_it_would_keep_every_pixel(caplog):
    loss_fn = CrossEntropyLoss(ohem={"thresh": 0.7, "min_kept": 100000})
    logits, target = make_batch(h=6, w=7)
    with caplog.at_level(logging.WARNING, logger="segexp.losses"):
        loss_fn(logits, target)
        loss_fn(logits, target)
    warnings = [r.getMessage() for r in caplog.records if "OHEM keeps every pixel" in r.getMessage()]
    assert len(warnings) == 1 and "6x7" in warnings[0] and "min_kept=8" in warnings[0]
    assert loss_fn(logits, target).item() == pytest.approx(CrossEntropyLoss()(logits, target).item(),
                                                          rel=1e-6)


@pytest.mark.parametrize("ohem", [{"thresh": 1.5}, {"thresh": 0}, {"min_kept": 0},
                                  {"min_kept": 1e5}, {"tresh": 0.7}, [0.7, 100]])
def test_ohem_options_are_checked(ohem):
    with pytest.raises(ConfigError, match="loss.ohem"):
        CrossEntropyLoss(ohem=ohem)


# -- Lovász-Softmax -----------------------------------------------------------------------------
def jaccard_loss_of_set(mispredicted: set[int], class_pixels: set[int]) -> float:
    union = class_pixels | mispredicted
    return len(mispredicted) / len(union) if union else 0.0


def lovasz_by_threshold_integral(probs: np.ndarray, labels: np.ndarray, classes) -> float:
    """The Lovász extension as ``integral_0^1 Delta({i: error_i >= t}) dt``, summed piece by
    piece between the sorted error values: no sorting-and-weighting of the fast form."""
    losses = []
    for c in classes:
        class_pixels = set(np.flatnonzero(labels == c).tolist())
        errors = np.abs((labels == c).astype(np.float64) - probs[:, c])
        levels = np.concatenate([[0.0], np.unique(errors)])
        total = 0.0
        for low, high in zip(levels[:-1], levels[1:], strict=True):
            above = set(np.flatnonzero(errors >= high).tolist())
            total += (high - low) * jaccard_loss_of_set(above, class_pixels)
        losses.append(total)
    return float(np.mean(losses))


def flat_valid(logits: torch.Tensor, target: torch.Tensor):
    probs = logits.double().softmax(1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1]).numpy()
    labels = target.reshape(-1).numpy()
    valid = labels != 255
    return probs[valid], labels[valid]


def test_lovasz_matches_the_threshold_integral_of_the_jaccard_loss():
    logits, target = make_batch(n=2, c=4, h=5, w=6, seed=3)
    target[target == 2] = 1  # class 2 absent: 'present' leaves it out, 'all' counts it
    probs, labels = flat_valid(logits, target)
    expected = lovasz_by_threshold_integral(probs, labels, [0, 1, 3])
    assert LovaszSoftmaxLoss()(logits, target).item() == pytest.approx(expected, rel=1e-5)
    expected_all = lovasz_by_threshold_integral(probs, labels, [0, 1, 2, 3])
    assert LovaszSoftmaxLoss(classes="all")(logits, target).item() == pytest.approx(expected_all,
                                                                                   rel=1e-5)
    # An absent class's term is its largest probability (its one mispredicted "set").
    assert expected_all * 4 - expected * 3 == pytest.approx(probs[:, 2].max(), rel=1e-6)
    listed = lovasz_by_threshold_integral(probs, labels, [1, 2])
    assert LovaszSoftmaxLoss(classes=[2, 1])(logits, target).item() == pytest.approx(listed, rel=1e-5)


def test_lovasz_per_image_is_the_mean_over_images_with_labels():
    logits, target = make_batch(n=3, c=3, h=5, w=5, seed=4)
    target[2] = 255  # counts nowhere
    per_image = [lovasz_by_threshold_integral(*flat_valid(logits[i:i + 1], target[i:i + 1]),
                                              np.unique(target[i][target[i] != 255]).tolist())
                 for i in range(2)]
    loss = LovaszSoftmaxLoss(per_image=True)(logits, target).item()
    assert loss == pytest.approx(np.mean(per_image), rel=1e-5)
    assert loss != pytest.approx(LovaszSoftmaxLoss()(logits, target).item(), rel=1e-3)


def test_lovasz_of_hard_predictions_is_one_minus_iou():
    _, target = make_batch(n=2, c=3, h=6, w=6, seed=5, ignore_frac=0.2)
    g = torch.Generator().manual_seed(6)
    predicted = torch.randint(0, 3, target.shape, generator=g)
    logits = F.one_hot(predicted, 3).permute(0, 3, 1, 2).float() * 40  # probabilities 0 / 1
    valid = target != 255
    ious = []
    for c in range(3):
        truth, pred = (target == c) & valid, (predicted == c) & valid
        ious.append((truth & pred).sum().item() / (truth | pred).sum().item())
    assert LovaszSoftmaxLoss()(logits, target).item() == pytest.approx(1 - np.mean(ious), abs=1e-5)
    perfect = F.one_hot(torch.where(valid, target, 0), 3).permute(0, 3, 1, 2).float() * 40
    assert LovaszSoftmaxLoss()(perfect, target).item() == pytest.approx(0.0, abs=1e-5)


def test_lovasz_ignores_ignored_pixels_and_has_finite_gradients():
    logits, target = make_batch(n=2, c=4, h=8, w=8, seed=7, ignore_frac=0.3)
    garbage = logits.clone()
    ignored = (target == 255).unsqueeze(1).expand_as(logits)
    garbage[ignored] = torch.randn(int(ignored.sum())) * 100
    loss_fn = LovaszSoftmaxLoss()
    assert torch.allclose(loss_fn(logits, target), loss_fn(garbage, target), atol=1e-6)
    logits.requires_grad_(True)
    loss_fn(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert logits.grad[ignored].abs().max() == 0


@pytest.mark.parametrize("per_image", [False, True])
def test_lovasz_all_ignored_gives_zero_with_gradient(per_image):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = LovaszSoftmaxLoss(per_image=per_image)(logits, torch.full((2, 4, 4), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0


def test_lovasz_keeps_float32_precision_on_large_images(monkeypatch):
    """65536 pixels per class row, split over several chunks: the value and gradient agree with a
    float64 computation of the paper's algorithm (Jaccard values differenced in float64)."""
    import segexp.losses as losses_module

    monkeypatch.setattr(losses_module, "LOVASZ_CHUNK_ELEMENTS", 2 * 65536)  # 2 rows a chunk
    logits, target = make_batch(n=4, c=5, h=128, w=128, seed=8, ignore_frac=0.1)

    def reference(logits64):
        probs = logits64.softmax(1).permute(0, 2, 3, 1).reshape(-1, 5)
        labels = target.reshape(-1)
        valid = labels != 255
        probs, labels = probs[valid], labels[valid]
        terms = []
        for c in range(5):
            fg = (labels == c).double()
            errors, order = (fg - probs[:, c]).abs().sort(descending=True)
            fg = fg[order]
            jaccard = 1 - (fg.sum() - fg.cumsum(0)) / (fg.sum() + (1 - fg).cumsum(0))
            jaccard[1:] = jaccard[1:] - jaccard[:-1]
            terms.append(errors @ jaccard)
        return torch.stack(terms).mean()

    ours = logits.clone().requires_grad_(True)
    value = LovaszSoftmaxLoss()(ours, target)
    value.backward()
    exact = logits.double().requires_grad_(True)
    expected = reference(exact)
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    scale = exact.grad.abs().max().item()
    assert (ours.grad.double() - exact.grad).abs().max().item() < 1e-3 * scale


@pytest.mark.parametrize("classes", ["some", [], [-1], ["a"]])
def test_lovasz_classes_option_is_checked(classes):
    with pytest.raises(ConfigError, match="loss.classes"):
        LovaszSoftmaxLoss(classes=classes)
    with pytest.raises(ConfigError, match="predicts 3 classes"):
        LovaszSoftmaxLoss(classes=[1, 3])(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


# -- configs -------------------------------------------------------------------------------------
def test_rare_class_loss_configs_compose_and_build():
    logits, target = make_batch(c=6, h=6, w=7)
    ohem = instantiate(compose_config("loss=ohem").loss)
    assert isinstance(ohem, CrossEntropyLoss) and ohem.ohem == (0.7, 100000)
    assert instantiate(compose_config("loss=ohem", "loss.ohem.thresh=null",
                                      "loss.ohem.min_kept=16").loss).ohem == (None, 16)
    lovasz = instantiate(compose_config("loss=lovasz").loss)
    assert isinstance(lovasz, LovaszSoftmaxLoss) and lovasz.classes == "present"
    combined = instantiate(compose_config("loss=ce_lovasz").loss)
    assert isinstance(combined, CombinedLoss) and set(combined.losses) == {"ce", "lovasz"}
    expected = CrossEntropyLoss()(logits, target) + LovaszSoftmaxLoss()(logits, target)
    assert torch.allclose(combined(logits, target), expected, atol=1e-6)
    assert instantiate(compose_config("loss=ce").loss).ohem is None  # the default is unchanged


def test_unresolved_auto_weights_say_what_to_do():
    with pytest.raises(ConfigError, match="resolve_auto_class_weights"):
        build(compose_config("loss=ce", "loss.class_weights=auto").loss)
    with pytest.raises(ConfigError, match="loss.class_weights='often'"):
        resolve_auto_class_weights(compose_config("loss=ce", "loss.class_weights=often").loss,
                                   SyntheticDataset(train_length=1, image_size=16), None)


# -- the mask scan -------------------------------------------------------------------------------
TINY_SYNTHETIC = {"num_classes": 4, "train_length": 6, "image_size": 32}


def test_scan_counts_what_the_masks_hold():
    dataset = SyntheticDataset(**TINY_SYNTHETIC)
    masks = [dataset.load(i).mask.astype(np.int64) for i in range(len(dataset))]
    scan = scan_masks(dataset, progress=False, workers=2)
    per_image = np.array([[(m == c).sum() for c in range(4)] for m in masks])
    assert scan.num_images == 6 and scan.class_names == list(dataset.class_names)
    assert scan.pixels == per_image.sum(0).tolist()
    assert scan.images_with_class == (per_image > 0).sum(0).tolist()
    labelled = per_image.sum(1)
    assert scan.pixels_of_images_with_class == [int(labelled[per_image[:, c] > 0].sum())
                                                for c in range(4)]
    values, counts = np.unique(np.concatenate([m.ravel() for m in masks]), return_counts=True)
    assert scan.values == dict(zip(values.tolist(), counts.tolist(), strict=True))
    assert scan.sizes == {(32, 32): 6} and scan.ignored_pixels == 0 and scan.unexpected == {}
    assert MaskScan.from_json(json.loads(json.dumps(scan.to_json()))) == scan


def write_folder(root: Path, masks: dict[str, np.ndarray]) -> None:
    for stem, mask in masks.items():
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full(mask.shape + (3,), 90, np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask.astype(np.uint8), mode="L").save(root / "masks" / f"{stem}.png")


def folder_masks() -> dict[str, np.ndarray]:
    a = np.zeros((4, 6), np.uint8)
    a[0, :3] = 1
    b = np.full((4, 6), 2, np.uint8)
    b[3] = 255
    return {"a": a, "b": b}


def test_scan_reports_values_outside_the_classes_before_training(tmp_path):
    masks = folder_masks()
    masks["c"] = np.full((4, 6), 9, np.uint8)
    masks["c"][0, 0] = 0
    write_folder(tmp_path, masks)
    dataset = FolderDataset(root=tmp_path, num_classes=3, val_fraction=0, split_files=None)
    scan = scan_masks(dataset, progress=False)  # the scan itself does not stop
    assert scan.values == {0: 22, 1: 3, 2: 18, 9: 23, 255: 6}
    assert scan.ignored_pixels == 6 and scan.pixels == [22, 3, 18]
    assert scan.unexpected == {9: str(tmp_path / "masks" / "c.png") + " (image c.png)"}
    with pytest.raises(DataError, match="9 \\(23 pixels, first in .*c.png") as info:
        scan.check_values("train")
    assert "train split" in str(info.value) and "0..2" in str(info.value)


def test_scan_cache_is_reused_and_invalidated_when_a_mask_changes(tmp_path, monkeypatch):
    root, cache = tmp_path / "data", tmp_path / "cache"
    write_folder(root, folder_masks())
    dataset = FolderDataset(root=root, num_classes=3, val_fraction=0, split_files=None)
    first = scan_masks(dataset, cache_dir=cache, progress=False)
    [cache_file] = cache.glob("mask_scan_FolderDataset_train_*.json")
    assert json.loads(cache_file.read_text())["scan"]["pixels"] == first.pixels == [21, 3, 18]

    calls = []
    real_scan = scan_module._scan
    monkeypatch.setattr(scan_module, "_scan", lambda *a: calls.append(1) or real_scan(*a))
    again = FolderDataset(root=root, num_classes=3, val_fraction=0, split_files=None)
    assert scan_masks(again, cache_dir=cache, progress=False) == first and calls == []

    # A rewritten mask (new content and modification time) is noticed, even with the same size.
    changed = folder_masks()["a"]
    changed[1] = 1
    Image.fromarray(changed, mode="L").save(root / "masks" / "a.png")
    stamp = (root / "masks" / "a.png").stat().st_mtime_ns + 10**9  # coarse-clock file systems
    os.utime(root / "masks" / "a.png", ns=(stamp, stamp))
    rescanned = scan_masks(again, cache_dir=cache, progress=False)
    assert calls == [1] and rescanned.pixels == [15, 9, 18]
    assert scan_masks(again, cache_dir=cache, progress=False) == rescanned and calls == [1]
    # So is a parameter that changes the masks, with a file of its own.
    mapped = FolderDataset(root=root, num_classes=3, val_fraction=0, split_files=None,
                           mask_map={1: 2})
    assert scan_masks(mapped, cache_dir=cache, progress=False).pixels == [15, 0, 27]
    assert calls == [1, 1] and len(list(cache.glob("*.json"))) == 2


def test_fingerprint_follows_generator_parameters_and_skips_transforms():
    base = dataset_fingerprint(SyntheticDataset(**TINY_SYNTHETIC))
    assert dataset_fingerprint(SyntheticDataset(**TINY_SYNTHETIC, transforms=lambda i, m: (i, m))) == base
    assert dataset_fingerprint(SyntheticDataset(**TINY_SYNTHETIC, seed=1))["identity"] != base["identity"]
    assert base["files"] is not None  # generated data lists no files and is still cacheable


def test_datasets_that_cannot_list_files_are_scanned_every_time(tmp_path, monkeypatch, caplog):
    dataset = SyntheticDataset(**TINY_SYNTHETIC)
    monkeypatch.setattr(SyntheticDataset, "files", lambda self: None)
    with caplog.at_level(logging.INFO, logger="segexp.data.scan"):
        scan_masks(dataset, cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == [] and "not cached" in caplog.text


def test_class_weight_methods():
    scan = MaskScan(class_names=["a", "b", "c", "d"], ignore_index=255, num_images=3,
                    pixels=[600, 300, 100, 0], images_with_class=[3, 2, 1, 0],
                    pixels_of_images_with_class=[1000, 800, 400, 0], ignored_pixels=0)
    freq = np.array([0.6, 0.3, 0.1])
    inverse = (1 / freq) / (1 / freq).mean()
    np.testing.assert_allclose(class_weights(scan, "inverse"), [*inverse, 0], rtol=1e-12)
    median_freq = np.array([600 / 1000, 300 / 800, 100 / 400])  # median 0.375
    np.testing.assert_allclose(class_weights(scan, "median"), [*(0.375 / median_freq), 0], rtol=1e-12)
    np.testing.assert_allclose(class_weights(scan, "enet"), [*(1 / np.log(1.02 + freq)), 0],
                               rtol=1e-12)
    with pytest.raises(ConfigError, match="auto = median"):
        class_weights(scan, "often")


# -- class_weights: auto -------------------------------------------------------------------------
@pytest.mark.parametrize(("loss", "option"), [("ce", "loss.class_weights"),
                                              ("ohem", "loss.class_weights"),
                                              ("ce_dice", "loss.losses.ce.class_weights")])
def test_auto_class_weights_resolve_in_every_cross_entropy(loss, option, tmp_path, caplog):
    overrides = ["dataset.num_classes=4", "dataset.train_length=6", "dataset.image_size=32"]
    cfg = compose_config(f"loss={loss}", f"{option}=auto", *overrides)
    train_set = instantiate(cfg.dataset, split="train", transforms=None)
    expected = class_weights(scan_masks(SyntheticDataset(**TINY_SYNTHETIC), progress=False), "median")
    assert len(set(np.round(expected, 6))) == 4  # distinct weights: the order is checked too
    with caplog.at_level(logging.INFO, logger="segexp.losses"):
        resolved = resolve_auto_class_weights(cfg.loss, train_set, tmp_path, progress=False)
    criterion = instantiate(resolved)
    ce = criterion.losses["ce"] if isinstance(criterion, CombinedLoss) else criterion
    np.testing.assert_allclose(ce.class_weights.numpy(), expected, rtol=1e-6)
    assert f"{option}=auto: median frequency weights from the 6 train masks" in caplog.text
    assert cfg.loss.get("class_weights", "auto") == "auto" or loss == "ce_dice"  # input untouched
    explicit = compose_config("loss=ce", "loss.class_weights=[1,2,3,4]", *overrides).loss
    assert resolve_auto_class_weights(explicit, train_set, tmp_path) is explicit


def test_auto_class_weights_end_to_end_scan_once_per_run_folder(tmp_path, monkeypatch, caplog):
    overrides = ["trainer=debug", "trainer.measure_speed=false", "model=fcn", "head.channels=8",
                 "loss.class_weights=auto", "dataset.num_classes=4", "dataset.train_length=4",
                 "dataset.val_length=1", "dataset.image_size=64"]
    with caplog.at_level(logging.INFO, logger="segexp.losses"):
        run_training(compose_config(*overrides), tmp_path)
    [cache_file] = tmp_path.glob("mask_scan_SyntheticDataset_train_*.json")
    scan = MaskScan.from_json(json.loads(cache_file.read_text())["scan"])
    assert scan.num_images == 4 and sum(scan.pixels) == 4 * 64 * 64
    weights = class_weights(scan, "median")
    line = ", ".join(f"{name} {w:.4g}" for name, w in zip(scan.class_names, weights, strict=True))
    assert f"loss.class_weights=auto: median frequency weights from the 4 train masks: {line}" \
        in caplog.text

    def must_not_scan(*args):
        raise AssertionError("the masks were scanned again despite the cache")

    monkeypatch.setattr(scan_module, "_scan", must_not_scan)
    run_training(compose_config(*overrides, "resume=true"), tmp_path)
    assert len(list(tmp_path.glob("mask_scan_*.json"))) == 1


def test_datasets_list_the_files_their_samples_read(tmp_path):
    """Two existing files (image, mask) per sample, so the scan's cache sees any of them change."""
    from segexp.data.kitti import KITTIDataset
    from segexp.data.stanford_background import StanfordBackgroundDataset
    from tests.data.conftest import write_kitti

    write_kitti(tmp_path / "kitti")
    write_folder(tmp_path / "folder", folder_masks())
    root = SHARED_DATASETS / "stanford_background" / "iccv09Data"  # checked when present
    datasets = [KITTIDataset(root=tmp_path / "kitti"),
                FolderDataset(root=tmp_path / "folder", num_classes=3, val_fraction=0, split_files=None)]
    if root.is_dir():
        datasets.append(StanfordBackgroundDataset(root=root))
    for dataset in datasets:
        files = dataset.files()
        assert len(files) == 2 * len(dataset) and all(path.is_file() for path in files)
        assert dataset.load(0).source.split(" ")[0] in map(str, files)
