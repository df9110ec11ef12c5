"""The YAML transform pipelines: joint image/mask geometry, padding values, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchvision import tv_tensors
from torchvision.transforms import v2

from segexp.data.base import IGNORE_INDEX, Sample, SegmentationDataset
from segexp.data.synthetic import SyntheticDataset
from segexp.data.transforms import KeepRatioResize
from tests.conftest import CONF
from tests.data.conftest import DATASET, LABELS, block_pattern, interior, misaligned

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def pipelines(dataset: dict, name: str = "default"):
    cfg = OmegaConf.merge({"dataset": dataset},
                          {"transforms": OmegaConf.load(CONF / "transforms" / f"{name}.yaml")})
    return instantiate(cfg.transforms.train), instantiate(cfg.transforms.val)


def geometric_part(train: v2.Compose) -> v2.Compose:
    """The configured rescale, crop and flip (as configured, fill included), without the
    photometric and normalising steps, so pixel values can be compared exactly."""
    kept = [t for t in train.transforms
            if isinstance(t, (KeepRatioResize, v2.RandomCrop, v2.RandomHorizontalFlip))]
    assert [type(t) for t in kept] == [KeepRatioResize, v2.RandomCrop, v2.RandomHorizontalFlip]
    return v2.Compose(kept)


def test_train_geometry_keeps_image_and_mask_aligned():
    train, _ = pipelines(DATASET)
    geometry = geometric_part(train)
    sizes, padded, flipped_check_fails = set(), 0, 0
    for seed in range(60):
        image, mask = block_pattern(48, 64, seed=seed)
        torch.manual_seed(seed)
        out_image, out_mask = geometry(image, mask)
        assert isinstance(out_mask, tv_tensors.Mask) and out_mask.dtype == torch.uint8
        assert out_image.shape == (3, 40, 40) and out_mask.shape == (40, 40)
        # Nearest-neighbour masks: only the original labels, plus 255 where padded.
        assert set(out_mask.unique().tolist()) <= set(LABELS) | {IGNORE_INDEX}
        # Padding: image 0 exactly where the mask is 255 (the pattern image is never 0).
        pad_image = out_image.sum(0) == 0
        pad_mask = out_mask == IGNORE_INDEX
        assert torch.equal(pad_image, pad_mask)
        padded += int(pad_mask.any())
        # Alignment: wherever the label cannot be blended (3x3 interior: the mask may not lag
        # the image by even half a source pixel), the image encodes the mask's label.
        assert interior(out_mask).sum() > 100
        assert misaligned(out_image, out_mask) == 0, f"seed {seed}"
        # The check has teeth: a mask flipped on its own no longer matches the image.
        flipped_check_fails += misaligned(out_image, out_mask.flip(-1)) > 0
        torch.manual_seed(seed)
        sizes.add(tuple(geometry.transforms[0].make_params([image])["size"]))
    assert padded >= 5  # scales below 40/48 (p ~ 0.22) leave the 40x40 crop bigger than the image
    assert flipped_check_fails >= 55
    assert len(sizes) > 30


def test_rescale_range_and_aspect_ratio():
    train, _ = pipelines(DATASET)
    rescale = train.transforms[0]
    assert isinstance(rescale, KeepRatioResize)
    image = tv_tensors.Image(torch.zeros(3, 30, 80, dtype=torch.uint8))  # other ratio than base
    heights = []
    for seed in range(200):
        torch.manual_seed(seed)
        height, width = rescale(image).shape[-2:]
        heights.append(height)
        assert abs(width - height * 80 / 30) <= 2  # keeps the ratio, up to rounding
    # Fit (48, 64) keeping ratio: factor min(48/30, 64/80) = 0.8 -> 24x64 at scale 1; the default
    # range 0.75-1.5 gives heights 18..36.
    assert 18 <= min(heights) < 20 and 34 < max(heights) <= 36


def test_val_resize_fits_base_size_keeping_ratio_and_null_keeps_size():
    _, val = pipelines(DATASET)
    image, mask = block_pattern(60, 40)
    state = torch.random.get_rng_state()
    out_image, out_mask = val(image, mask)
    assert torch.equal(torch.random.get_rng_state(), state)  # deterministic: draws nothing
    assert out_image.shape == (3, 48, 32) and out_mask.shape == (48, 32)  # factor 0.8
    assert out_image.dtype == torch.float32
    assert set(out_mask.unique().tolist()) <= set(LABELS)
    _, val_null = pipelines({**DATASET, "base_size": None})
    out_image, out_mask = val_null(image, mask)
    assert out_image.shape == (3, 60, 40)
    assert torch.equal(out_mask, mask)


def test_full_yaml_pipelines_output_types_and_normalisation():
    train, val = pipelines(DATASET)
    image, mask = block_pattern(48, 64)
    torch.manual_seed(0)
    out_image, out_mask = train(image, mask)
    assert out_image.dtype == torch.float32 and out_image.shape == (3, 40, 40)
    assert not out_mask.dtype.is_floating_point and out_mask.shape == (40, 40)
    assert set(out_mask.unique().tolist()) <= set(LABELS) | {IGNORE_INDEX}
    out_image, out_mask = val(image, mask)
    expected = (image.float() / 255 - MEAN) / STD
    # Already at base size: no resize, just normalised.
    torch.testing.assert_close(out_image.as_subclass(torch.Tensor), expected)
    assert torch.equal(out_mask, mask)


def test_none_pipelines_only_normalise():
    train, val = pipelines(DATASET, "none")
    image, mask = block_pattern(21, 13)
    for pipeline in (train, val):
        out_image, out_mask = pipeline(image, mask)
        expected = (image.float() / 255 - MEAN) / STD
        torch.testing.assert_close(out_image.as_subclass(torch.Tensor), expected)
        assert torch.equal(out_mask, mask)


@pytest.mark.parametrize("name", ["synthetic", "stanford_background", "folder"])
@pytest.mark.parametrize("transforms", ["default", "none"])
def test_dataset_yamls_compose_with_transform_yamls(name, transforms):
    dataset = OmegaConf.load(CONF / "dataset" / f"{name}.yaml")
    assert dataset._target_.startswith("segexp.data.")
    train, val = pipelines(dataset, transforms)
    assert isinstance(train, v2.Compose) and isinstance(val, v2.Compose)
    image, mask = block_pattern(50, 70)
    torch.manual_seed(0)
    out_image, out_mask = train(image, mask)
    resolved = OmegaConf.to_container(dataset, resolve=True)
    if transforms == "default":
        assert list(out_image.shape[-2:]) == list(resolved["crop_size"])
    assert out_mask.shape == out_image.shape[-2:]


def test_synthetic_yaml_instantiates_with_its_pipelines():
    cfg = OmegaConf.merge({"dataset": OmegaConf.load(CONF / "dataset" / "synthetic.yaml")},
                          {"transforms": OmegaConf.load(CONF / "transforms" / "default.yaml")},
                          {"dataset": {"image_size": 32, "train_length": 4, "val_length": 2}})
    train = instantiate(cfg.dataset, split="train", transforms=instantiate(cfg.transforms.train))
    val = instantiate(cfg.dataset, split="val", transforms=instantiate(cfg.transforms.val))
    assert isinstance(train, SyntheticDataset) and (len(train), len(val)) == (4, 2)
    assert train.crop_size == train.base_size == (32, 32)
    image, mask = train[(0, 1)]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and mask.dtype == torch.int64
    image, mask = val[0]
    np.testing.assert_array_equal(mask.numpy(), val.load(0).mask)  # val: no geometric change


class _Pattern(SegmentationDataset):
    class_names = ("a", "b", "c", "d")

    def __len__(self) -> int:
        return 3

    def load(self, index: int) -> Sample:
        image, mask = block_pattern(48, 64, seed=index)
        return Sample(image.permute(1, 2, 0).numpy(), mask.numpy(), f"pattern {index}")


def test_getitem_with_seed_is_reproducible():
    train, _ = pipelines(DATASET)
    ds = _Pattern(transforms=train)
    first = ds[(1, 1234)]
    torch.manual_seed(99)  # the global RNG must not matter with an explicit seed
    again = ds[(1, 1234)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[1].dtype == torch.int64 and first[0].dtype == torch.float32
    others = [ds[(1, seed)] for seed in range(5)]
    assert any(not torch.equal(first[0], other[0]) for other in others)
    state = torch.random.get_rng_state()
    ds[(2, 5)]
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded draws leave the global RNG
