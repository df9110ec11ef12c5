"""The mask-classification criterion (segexp.losses_mask): parity with transformers'
Mask2FormerLoss, the matcher's optimality, gradients, the loss/model checks before training, and
training through the real loop with a tiny test-only mask-classification head."""

from __future__ import annotations

import contextlib
import itertools
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from torch import nn

from segexp.errors import ConfigError
from segexp.losses_mask import MaskClassificationLoss, sample_class_masks
from segexp.models.mask_classification import MaskPredictions, is_mask_classification
from tests.conftest import compose_config, free_port

# transformers and the training loop are imported inside the tests that use them: the DDP test's
# worker processes import this module, and those imports would cost them many seconds each.

WEIGHTS = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


class TinyMaskHead(nn.Module):
    """Test-only mask-classification head: ``num_queries`` learned queries refined by
    ``num_layers`` linear layers; each layer predicts classes and masks (dot products with
    stride-4 pixel embeddings), the earlier ones as deep supervision."""

    mask_classification = True

    def __init__(self, in_channels, in_reductions, num_classes, num_queries=4, num_layers=3,
                 dim=8):
        super().__init__()
        reductions = list(in_reductions)
        self.index = reductions.index(4) if 4 in reductions else 0
        self.pixel = nn.Conv2d(in_channels[self.index], dim, 1)
        self.queries = nn.Parameter(torch.randn(num_queries, dim))
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_layers))
        self.classify = nn.Linear(dim, num_classes + 1)

    def forward(self, features):
        pixels = self.pixel(features[self.index])
        context = pixels.mean((2, 3)).unsqueeze(1)
        queries = self.queries.expand(len(pixels), -1, -1)
        outputs = []
        for layer in self.layers:
            queries = queries + layer(queries + context)
            outputs.append((self.classify(queries),
                            torch.einsum("nqd,ndhw->nqhw", queries, pixels)))
        return MaskPredictions(*outputs[-1], aux=outputs[:-1])


# `~head` drops the model's own head; the fake one is then given key by key.
FAKE_HEAD = ["model=fcn", "~head", f"+head._target_={__name__}.TinyMaskHead", "+head._partial_=true"]
SMALL = ["trainer=debug", "trainer.measure_speed=false", "dataset.train_length=4",
         "dataset.val_length=2"]


def random_case(n=3, q=7, k=5, size=(32, 40), layers=1, seed=0):
    """Label maps ``(N, H, W)`` and ``layers`` pairs of (class logits, mask logits at 1/4)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n, *size), generator=g)
    h, w = size[0] // 4, size[1] // 4
    pairs = [(torch.randn(n, q, k + 1, generator=g),
              torch.randn(n, q, h, w, generator=g) * 3) for _ in range(layers)]
    return labels, pairs


def predictions(pairs) -> MaskPredictions:
    """The last pair is the last decoder layer; the others, shallow to deep, its aux."""
    return MaskPredictions(*pairs[-1], aux=list(pairs[:-1]))


def reference(k: int, num_points: int):
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    return Mask2FormerLoss(Mask2FormerConfig(num_labels=k, train_num_points=num_points), WEIGHTS)


def reference_targets(labels):
    """transformers' own conversion of semantic maps to per-class binary masks."""
    from transformers.models.mask2former.image_processing_mask2former import (
        convert_segmentation_map_to_binary_masks_fast,
    )

    pairs = [convert_segmentation_map_to_binary_masks_fast(m, ignore_index=255) for m in labels]
    return [masks for masks, _ in pairs], [classes for _, classes in pairs]


def reference_total(ref, pairs, labels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's total as Mask2FormerForUniversalSegmentation sums it: each term (auxiliary
    ones included) times its weight."""
    mask_labels, class_labels = reference_targets(labels)
    (class_logits, mask_logits), aux = pairs[-1], pairs[:-1]
    terms = ref(mask_logits, class_logits, mask_labels, class_labels,
                [{"masks_queries_logits": m, "class_queries_logits": c} for c, m in aux])
    total = sum(WEIGHTS[key.rstrip("_0123456789")] * value for key, value in terms.items())
    return total, terms


# -- parity with transformers ---------------------------------------------------------------------
# How parity is exact: both implementations draw every random point from torch's global generator,
# with the same shapes and in the same order (last layer first, then the aux layers in list order;
# per layer the matcher's uniform points image by image, then the mask loss's oversampled
# candidates and its uniform remainder). Seeding the generator identically before each call
# therefore gives both the same points, and what remains are float rounding differences.
@pytest.mark.parametrize("case", ["plain", "ignore_and_empty_image", "more_classes_than_queries",
                                  "deep_supervision"])
def test_total_loss_and_matching_equal_transformers(case):
    k, points = 5, 300
    labels, pairs = random_case(q=3 if case == "more_classes_than_queries" else 7, k=k,
                                layers=3 if case == "deep_supervision" else 1)
    if case == "ignore_and_empty_image":
        labels[0, :10] = 255  # ignored band
        labels[1][labels[1] == 2] = 4  # a class missing from one image
        labels[2] = 255  # an image with no class at all
    criterion, ref = MaskClassificationLoss(k, num_points=points), reference(k, points)

    torch.manual_seed(1)
    ours = criterion(predictions(pairs), labels)
    torch.manual_seed(1)
    theirs, terms = reference_total(ref, pairs, labels)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)
    for ours_key, their_key in (("class", "loss_cross_entropy"), ("mask", "loss_mask"),
                                ("dice", "loss_dice")):
        torch.testing.assert_close(criterion.last_values[ours_key], terms[their_key], rtol=1e-4,
                                   atol=1e-6)

    mask_labels, class_labels = reference_targets(labels)
    classes, sizes = criterion.targets(labels)
    assert sizes == [len(c) for c in class_labels]
    for class_logits, mask_logits in pairs:
        torch.manual_seed(2)
        expected = ref.matcher(mask_logits, class_logits, mask_labels, class_labels)
        torch.manual_seed(2)
        got = criterion.match(class_logits, mask_logits, labels, classes, sizes)
        for image, ((q_ref, t_ref), (q, t)) in enumerate(zip(expected, got, strict=True)):
            assert torch.equal(q, q_ref) and torch.equal(t, t_ref)
            assert len(q) == min(class_logits.shape[1], sizes[image])
            # A target index names the same class in both target lists.
            assert torch.equal(classes[image, t], class_labels[image][t_ref])
    if case == "ignore_and_empty_image":
        assert sizes[2] == 0 and sizes[1] == len(class_labels[1]) == 4


def test_targets_read_as_transformers_reads_its_binary_masks():
    """Bilinear reads straight from the label map equal grid_sample on the float masks."""
    labels, _ = random_case(n=2, size=(9, 13))
    labels[0, 2:4] = 255
    points = torch.rand(2, 50, 2)
    # The corners and edges of [0, 1]^2 lie half a pixel out: bilinear reads with zero padding.
    points[:, :4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.02]])
    mask_labels, class_labels = reference_targets(labels)
    for i in range(2):
        expected = torch.nn.functional.grid_sample(
            mask_labels[i][:, None], (2 * points[i] - 1).expand(len(class_labels[i]), -1, -1)[:, :, None],
            align_corners=False).flatten(1)
        got = sample_class_masks(labels, points[i:i + 1].expand(len(class_labels[i]), -1, -1),
                                 torch.full((len(class_labels[i]),), i), class_labels[i])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_deep_supervision_sums_every_layer_with_the_same_weights():
    labels, pairs = random_case(layers=3, seed=3)
    criterion = MaskClassificationLoss(5, num_points=200)
    torch.manual_seed(0)
    together = criterion(predictions(pairs), labels)
    torch.manual_seed(0)  # the same draws, layer by layer: last first, then aux in order
    apart = [criterion(MaskPredictions(*pair), labels) for pair in (pairs[-1], *pairs[:-1])]
    torch.testing.assert_close(together, sum(apart), rtol=1e-6, atol=0)
    assert all(float(a) > 0 for a in apart)


def test_autocast_does_not_lower_the_precision():
    # Two queries whose masks differ by 1e-3 in every logit: query 1 fits the all-ones target
    # slightly better. bfloat16 (spacing 2**-6 at 2.0) would round both to 2.0 inside the cost
    # matmuls and pick query 0; float32 sees the difference.
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    masks = torch.full((1, 2, 4, 4), 2.0)
    masks[0, 1] += 1e-3
    criterion = MaskClassificationLoss(2, num_points=64)
    classes, sizes = criterion.targets(labels)
    for context in (contextlib.nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16)):
        with context:
            (queries, _), = criterion.match(torch.zeros(1, 2, 3), masks, labels, classes, sizes)
        assert queries.tolist() == [1]

    # Model outputs in bfloat16 (what autocast gives): the loss is computed from their float32
    # values, and comes back in float32.
    labels, pairs = random_case(n=2, q=6, seed=7)
    pairs = [tuple(t.bfloat16() for t in pair) for pair in pairs]
    criterion = MaskClassificationLoss(5, num_points=300)
    torch.manual_seed(0)
    full = criterion(predictions([tuple(t.float() for t in pair) for pair in pairs]), labels)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = criterion(predictions(pairs), labels)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, full, rtol=1e-6, atol=0)


def test_image_without_classes_and_all_ignored_batch():
    labels, pairs = random_case(n=2, seed=4)
    labels[:] = 255
    class_logits, mask_logits = (t.clone().requires_grad_() for t in pairs[0])
    criterion = MaskClassificationLoss(5, num_points=100)
    loss = criterion(MaskPredictions(class_logits, mask_logits), labels)
    loss.backward()
    # Every query is "no object": only the class term, 2 x the cross entropy towards class K.
    expected = torch.nn.functional.cross_entropy(class_logits.detach().flatten(0, 1),
                                                 torch.full((14,), 5))
    torch.testing.assert_close(loss.detach(), 2.0 * expected)
    assert float(criterion.last_values["mask"]) == 0.0 == float(criterion.last_values["dice"])
    assert class_logits.grad.abs().sum() > 0
    assert mask_logits.grad is not None and mask_logits.grad.abs().sum() == 0


# -- the matcher ----------------------------------------------------------------------------------
def test_matcher_assigns_each_class_the_query_whose_mask_covers_it():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :, 4:] = 2  # class 0 on the left, class 2 on the right; class 1 absent
    left = torch.zeros(8, 8, dtype=torch.bool)
    left[:, :4] = True
    masks = torch.full((1, 4, 8, 8), -8.0)
    masks[0, 3] = torch.where(left, 8.0, -8.0)
    masks[0, 1] = torch.where(left, -8.0, 8.0)
    classes_logits = torch.zeros(1, 4, 4)  # uniform: only the masks can decide
    criterion = MaskClassificationLoss(3, num_points=256)
    classes, sizes = criterion.targets(labels)
    assert classes.tolist() == [[0, 2]] and sizes == [2]
    (queries, targets), = criterion.match(classes_logits, masks, labels, classes, sizes)
    assert dict(zip(queries.tolist(), targets.tolist(), strict=True)) == {1: 1, 3: 0}


def test_matcher_finds_the_optimal_assignment_not_the_greedy_one():
    # Class costs only: -p(class). Greedy would take query 0 -> class 0 (0.5) then query 1 ->
    # class 1 (0.05), total 0.55; the optimum is query 0 -> class 1, query 1 -> class 0 (0.9).
    probs = torch.tensor([[[0.50, 0.45, 0.05], [0.45, 0.05, 0.50]]])
    labels = torch.tensor([[[0, 1]]])
    criterion = MaskClassificationLoss(2, class_weight=1.0, mask_weight=0.0, dice_weight=0.0,
                                       num_points=4)
    classes, sizes = criterion.targets(labels)
    (queries, targets), = criterion.match(probs.log(), torch.zeros(1, 2, 1, 2), labels, classes,
                                          sizes)
    assert queries.tolist() == [0, 1] and targets.tolist() == [1, 0]

    # Random class costs: the assignment's cost is the brute-force minimum.
    criterion = MaskClassificationLoss(4, class_weight=1.0, mask_weight=0.0, dice_weight=0.0,
                                       num_points=4)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 5, 5, generator=g) * 2
    labels = torch.tensor([[[0, 1, 3, 3]]])
    classes, sizes = criterion.targets(labels)
    (queries, targets), = criterion.match(logits, torch.zeros(1, 5, 1, 4), labels, classes, sizes)
    cost = -logits[0].softmax(-1)[:, classes[0]]
    best = min(sum(float(cost[q, t]) for t, q in enumerate(chosen))
               for chosen in itertools.permutations(range(5), 3))
    assert sum(float(cost[q, t]) for q, t in zip(queries, targets, strict=True)) == \
        pytest.approx(best, abs=1e-6)


# -- gradients, options, bad input ----------------------------------------------------------------
def test_gradients_reach_every_layer_and_only_matched_masks():
    labels, pairs = random_case(n=2, q=6, layers=2, seed=6)
    pairs = [tuple(t.clone().requires_grad_() for t in pair) for pair in pairs]
    criterion = MaskClassificationLoss(5, num_points=100)
    torch.manual_seed(0)
    criterion(predictions(pairs), labels).backward()
    torch.manual_seed(0)
    classes, sizes = criterion.targets(labels)
    matched = criterion.match(*(t.detach() for t in pairs[-1]), labels, classes, sizes)
    for class_logits, mask_logits in pairs:
        assert torch.isfinite(class_logits.grad).all() and class_logits.grad.abs().sum() > 0
        assert torch.isfinite(mask_logits.grad).all()
    for image, (queries, _) in enumerate(matched):  # the last layer's matching
        per_query = pairs[-1][1].grad[image].abs().sum((1, 2))
        assert (per_query[queries] > 0).all()
        unmatched = torch.ones(6, dtype=torch.bool)
        unmatched[queries] = False
        assert (per_query[unmatched] == 0).all()


def test_config_builds_the_paper_settings_and_class_weights_auto_resolve():
    from segexp.data.synthetic import SyntheticDataset
    from segexp.losses import resolve_auto_class_weights

    cfg = compose_config("loss=mask_classification", "dataset.num_classes=4")
    criterion = instantiate(cfg.loss)
    assert isinstance(criterion, MaskClassificationLoss) and criterion.num_classes == 4
    assert criterion.empty_weight.tolist() == pytest.approx([1, 1, 1, 1, 0.1])
    assert (criterion.class_weight, criterion.mask_weight, criterion.dice_weight) == (2, 5, 5)
    assert (criterion.num_points, criterion.oversample_ratio,
            criterion.importance_sample_ratio) == (12544, 3.0, 0.75)

    auto = compose_config("loss=mask_classification", "dataset.num_classes=4",
                          "loss.class_weights=auto").loss
    resolved = resolve_auto_class_weights(
        auto, SyntheticDataset(num_classes=4, train_length=4, image_size=32), None, progress=False)
    weights = instantiate(resolved).empty_weight
    assert weights[-1] == pytest.approx(0.1) and len(set(weights[:-1].tolist())) > 1


def test_bad_inputs_are_explained():
    labels, pairs = random_case(n=1, k=5)
    criterion = MaskClassificationLoss(5, num_points=16)
    with pytest.raises(ConfigError, match="per-pixel model.*loss=ce"):
        criterion(torch.zeros(1, 5, 32, 40), labels)
    with pytest.raises(ConfigError, match="predicts 4 classes.*loss.num_classes=5"):
        criterion(MaskPredictions(pairs[0][0][..., 1:], pairs[0][1]), labels)
    labels[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"values \[7\]"):
        criterion(predictions(pairs), labels)
    with pytest.raises(ConfigError, match="num_points"):
        MaskClassificationLoss(5, importance_sample_ratio=1.5)
    with pytest.raises(ConfigError, match="one value per class"):
        MaskClassificationLoss(5, class_weights=[1.0, 2.0])


# -- the training loop ----------------------------------------------------------------------------
def test_per_pixel_loss_for_a_mask_model_and_the_converse_are_refused(tmp_path):
    from segexp.cli.train import hydra_launch
    from segexp.engine.experiment import run_training

    with pytest.raises(ConfigError) as err:  # the messages name the options chosen (train.py's)
        run_training(compose_config(*SMALL, *FAKE_HEAD, "loss=ce"), tmp_path / "a", hydra_launch())
    message = str(err.value)
    assert "mask-classification model" in message and "loss=ce" in message
    assert "loss=mask_classification" in message and "TinyMaskHead" in message

    with pytest.raises(ConfigError) as err:
        run_training(compose_config(*SMALL, "model=fcn", "head.channels=8",
                                    "loss=mask_classification"), tmp_path / "b", hydra_launch())
    message = str(err.value)
    assert "loss=mask_classification" in message and "model=fcn" in message
    assert "loss=ce" in message
    assert not (tmp_path / "b" / "checkpoints").exists()  # refused before training

    with pytest.raises(ConfigError, match=r"model.aux_head=null"):
        run_training(compose_config(*SMALL, *FAKE_HEAD, "loss=mask_classification",
                                    "+head@model.aux_head=fcn_aux"), tmp_path / "c")


def test_training_through_the_loop_writes_metrics_and_resumes_exactly(tmp_path, monkeypatch):
    from segexp.engine import trainer as trainer_module
    from segexp.engine.experiment import run_training
    from segexp.models import build_model
    from segexp.weights_io import read_weights_file

    overrides = [*SMALL, *FAKE_HEAD, "loss=mask_classification", "loss.num_points=64",
                 "loss.class_weights=auto", "trainer.max_iters=4", "trainer.val_interval=2"]
    cfg = compose_config(*overrides)
    assert is_mask_classification(build_model(cfg, pretrained=False))
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_training(cfg, straight)
    summary = json.loads((straight / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["iters"] == 4
    assert 0.0 <= summary["best"]["mIoU"] <= 1.0
    losses = [json.loads(line)["train/loss"] for line in
              (straight / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    assert len(losses) == 4 and all(0 < v < 1e3 for v in losses)

    # Crash in iteration 3, resume from the checkpoint of iteration 2: the same weights (the
    # criterion's random points come from the generators the checkpoint restores).
    real_step, calls = trainer_module.optimizer_step, {"n": 0}

    def crashing_step(run):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        real_step(run)

    monkeypatch.setattr(trainer_module, "optimizer_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        run_training(compose_config(*overrides), broken)
    monkeypatch.setattr(trainer_module, "optimizer_step", real_step)
    run_training(compose_config(*overrides, "resume=true"), broken)
    a = read_weights_file(straight / "checkpoints" / "last.pt")["model"]
    b = read_weights_file(broken / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_benchmark_training_step_takes_mask_predictions():
    from segexp.cli import benchmark as bench

    row = bench.benchmark([*FAKE_HEAD, "loss=mask_classification", "loss.num_points=64"],
                          (64, 64), 1, 2, torch.device("cpu"), "none", iters=1, warmup=0)
    assert row["train_iter_ms"] > 0 and row["fps"] > 0
    with pytest.raises(ConfigError, match="loss=mask_classification"):
        bench.benchmark([*FAKE_HEAD], (64, 64), 1, 2, torch.device("cpu"), "none", iters=1,
                        warmup=0)


# -- distributed ----------------------------------------------------------------------------------
def _ddp_worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2")
    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)  # the same initial weights on both ranks
        head = TinyMaskHead([3], [4], num_classes=5)
        model = nn.parallel.DistributedDataParallel(head, find_unused_parameters=True)
        assert is_mask_classification(model)
        # rank 0 holds 2 classes, rank 1 holds 4: the normaliser is their mean, 3, on both.
        labels = torch.zeros(1, 32, 32, dtype=torch.long)
        labels[0, :, 16:] = 1
        if rank == 1:
            labels[0, :16, :] = 2
            labels[0, :8, :] = 3
        torch.manual_seed(rank + 1)
        criterion = MaskClassificationLoss(5, num_points=64)
        _, sizes = criterion.targets(labels)
        assert float(criterion.num_masks(sizes, labels.device)) == 3.0
        output = model([torch.randn(1, 3, 8, 8)])
        assert isinstance(output, MaskPredictions) and len(output.aux) == 2
        criterion(output, labels).backward()
        grad = head.classify.weight.grad.clone()
        others = [torch.zeros_like(grad) for _ in range(2)]
        dist.all_gather(others, grad)
        torch.testing.assert_close(others[0], others[1])  # averaged by DDP: equal on both ranks
        assert grad.abs().sum() > 0
    finally:
        dist.destroy_process_group()


def test_distributed_normaliser_and_ddp_with_mask_predictions():
    # Forked, not spawned: a spawned worker would import this module's dependencies again
    # (many seconds); the child only runs one tiny step on one thread.
    mp.start_processes(_ddp_worker, args=(free_port(),), nprocs=2, start_method="fork")
