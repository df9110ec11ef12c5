"""scripts/bench/learning.py: the plain loop's data and the shared full-resolution evaluation (the
learning figures themselves are recorded by running the script, never asserted in a test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from segexp.data.stanford_background import StanfordBackgroundDataset
from tests.conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/learning")


@pytest.fixture
def stanford(shared_datasets):
    return shared_datasets / "stanford_background" / "iccv09Data"


def test_loop_data_gives_aligned_256_crops_of_the_train_split(bench, stanford):
    ids = StanfordBackgroundDataset.split_ids(
        [p.name.split(".")[0] for p in (stanford / "images").glob("*.jpg")], "train")
    assert len(ids) == 572
    data = bench.LoopData(stanford, ids)
    image, mask = data[0]
    assert image.shape == (3, 256, 256) and mask.shape == (256, 256)
    values = set(mask.unique().tolist())
    assert values <= set(range(8)) | {255} and values - {255}
    again, _ = data[0]
    assert torch.equal(image, again)  # seeded by (seed, epoch, index)
    data.epoch = 1
    assert not torch.equal(image, data[0][0])


class Oracle(nn.Module):
    """Predicts a fixed class everywhere: the evaluation must score it as that class's share."""

    def __init__(self, cls: int) -> None:
        super().__init__()
        self.cls = cls

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 8, *x.shape[-2:])
        logits[:, self.cls] = 1
        return logits


def test_evaluation_covers_the_held_out_split_at_full_resolution(bench, stanford):
    dataset = StanfordBackgroundDataset("val", root=stanford)
    labelled = np.zeros(8)
    for i in range(len(dataset)):
        mask = dataset.load(i).mask
        labelled += np.bincount(mask[mask != 255].ravel(), minlength=8)[:8]
    scores = bench.evaluate_full_resolution(Oracle(0), stanford)
    # "sky everywhere": IoU of sky = sky pixels / all labelled pixels; every other class 0.
    assert scores["IoU"][0] == pytest.approx(labelled[0] / labelled.sum(), rel=1e-6)
    assert scores["aAcc"] == pytest.approx(labelled[0] / labelled.sum(), rel=1e-6)
    assert all(v == 0 for v in scores["IoU"][1:] if v is not None)
