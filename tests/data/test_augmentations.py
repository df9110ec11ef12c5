"""Augmentations beyond the default pipeline: MMSeg's cat_max_ratio crop and photometric
distortion, rotation and blur (torchvision's), image mixing, and the mmseg / strong presets."""

from __future__ import annotations

import math
import pickle

import cv2
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchvision import tv_tensors
from torchvision.transforms import v2

from segexp.data.base import IGNORE_INDEX, Sample, SegmentationDataset
from segexp.data.mixing import MixedDataset, derive_seed
from segexp.data.transforms import (
    KeepRatioResize,
    PhotoMetricDistortion,
    RandomCropCatMax,
    add_brightness_delta,
)
from segexp.errors import ConfigError, DataError
from tests.conftest import CONF
from tests.data.conftest import DATASET, LABELS, block_pattern, interior, misaligned

PRESETS = ("default", "none", "mmseg", "strong")


def load_preset(name: str, dataset: dict | None = None):
    return OmegaConf.merge({"dataset": DATASET if dataset is None else dataset},
                           {"transforms": OmegaConf.load(CONF / "transforms" / f"{name}.yaml")})


def train_pipeline(name: str) -> v2.Compose:
    return instantiate(load_preset(name).transforms.train)


def find(pipeline: v2.Compose, kind: type) -> v2.Transform:
    """The configured transform of ``kind`` (looking inside RandomApply too)."""
    for t in pipeline.transforms:
        if isinstance(t, kind):
            return t
        if isinstance(t, v2.RandomApply) and any(isinstance(s, kind) for s in t.transforms):
            return t
    raise AssertionError(f"no {kind.__name__} in {pipeline}")


# -- RandomCropCatMax --------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(48, 64), (30, 50), (50, 30), (24, 24)])
def test_cat_max_crop_is_an_exact_window_padded_bottom_right(size):
    height, width = size
    crop = RandomCropCatMax((40, 40), cat_max_ratio=0.75)
    offsets = set()
    for seed in range(25):
        image, mask = block_pattern(height, width, block=6, seed=seed)
        torch.manual_seed(seed)
        out_image, out_mask = crop(image, mask)
        assert isinstance(out_image, tv_tensors.Image) and isinstance(out_mask, tv_tensors.Mask)
        assert out_image.shape == (3, 40, 40) and out_mask.shape == (40, 40)
        assert out_mask.dtype == torch.uint8
        h, w = min(40, height), min(40, width)
        # The labelled part is one window of the source, at the top-left of the output ...
        windows = [(t, left) for t in range(height - h + 1) for left in range(width - w + 1)
                   if torch.equal(out_mask[:h, :w], mask[t: t + h, left: left + w])
                   and torch.equal(out_image[:, :h, :w], image[:, t: t + h, left: left + w])]
        assert windows, f"seed {seed}: the crop is no window of the input"
        offsets.add(windows[0])
        # ... and the rest is padding: image 0, mask ignore (the pattern image is never 0).
        pad = torch.ones(40, 40, dtype=torch.bool)
        pad[:h, :w] = False
        assert torch.equal(out_mask == IGNORE_INDEX, pad)
        assert torch.equal(out_image.sum(0) == 0, pad)
        assert misaligned(out_image, out_mask) == 0
    if height > 40 or width > 40:
        assert len(offsets) > 5  # random positions


def accepts(crop: np.ndarray, ratio: float = 0.75, ignore: int = IGNORE_INDEX) -> bool:
    """MMSeg's test, transcribed: ``np.unique`` counts without the ignore index."""
    labels, counts = np.unique(crop, return_counts=True)
    counts = counts[labels != ignore]
    return len(counts) > 1 and counts.max() / counts.sum() < ratio


def dominated_mask() -> tv_tensors.Mask:
    """64x64, class 0 nearly everywhere: a class-1 square in one corner, an ignored band."""
    mask = np.zeros((64, 64), np.uint8)
    mask[:26, :26] = 1
    mask[40:, 30:34] = IGNORE_INDEX
    return tv_tensors.Mask(torch.from_numpy(mask))


def test_cat_max_ratio_beats_plain_crop_statistics():
    mask = dominated_mask()
    image = tv_tensors.Image(torch.zeros(3, 64, 64, dtype=torch.uint8))
    array = mask.numpy()
    # Every position a plain 32x32 crop can take: few respect the ratio.
    valid = [accepts(array[t: t + 32, left: left + 32]) for t in range(33) for left in range(33)]
    p_plain = float(np.mean(valid))
    assert 0.1 < p_plain < 0.35
    plain = RandomCropCatMax(32, cat_max_ratio=1.0)
    cat_max = RandomCropCatMax(32, cat_max_ratio=0.75)
    hits = {"plain": 0, "cat_max": 0}
    trials = 300
    for seed in range(trials):
        for name, crop in (("plain", plain), ("cat_max", cat_max)):
            torch.manual_seed(seed)
            hits[name] += accepts(crop(image, mask)[1].numpy())
    # 11 draws (10 checked, one more kept): P(valid) = 1 - (1 - p)^11.
    expected = 1 - (1 - p_plain) ** 11
    assert abs(hits["plain"] / trials - p_plain) < 0.08
    assert hits["cat_max"] / trials > expected - 0.08 and hits["cat_max"] / trials > 0.85


class RecordingCrop(RandomCropCatMax):
    """Records every candidate position the crop draws."""

    def _random_offset(self, height, width):
        offset = super()._random_offset(height, width)
        self.candidates.append(offset)
        return offset


@pytest.mark.parametrize("max_tries", [10, 3])
def test_cat_max_keeps_the_first_valid_candidate_else_the_last_draw(max_tries):
    mask = dominated_mask()
    image = tv_tensors.Image(torch.zeros(3, 64, 64, dtype=torch.uint8))
    crop = RecordingCrop(32, cat_max_ratio=0.75, max_tries=max_tries)
    first_accepted = exhausted = 0
    for seed in range(150):
        crop.candidates = []
        torch.manual_seed(seed)
        params = crop.make_params([image, mask])
        chosen = (params["top"], params["left"])
        ok = [accepts(mask.numpy()[t: t + 32, left: left + 32]) for t, left in crop.candidates]
        assert chosen == crop.candidates[-1] and len(crop.candidates) <= max_tries + 1
        assert not any(ok[:-1]), f"seed {seed}: a valid candidate was passed over"
        if len(crop.candidates) <= max_tries:  # stopped early: because the crop is valid
            assert ok[-1]
        first_accepted += ok[0] and len(ok) == 1
        exhausted += len(crop.candidates) == max_tries + 1
    assert first_accepted > 10 and exhausted > 0


def test_cat_max_without_any_valid_crop_draws_max_tries_plus_one():
    mask = tv_tensors.Mask(torch.zeros(50, 50, dtype=torch.uint8))
    mask[:, :10] = IGNORE_INDEX  # one class and an ignored band: no crop can pass
    image = tv_tensors.Image(torch.ones(3, 50, 50, dtype=torch.uint8))
    crop = RecordingCrop(20, cat_max_ratio=0.75)
    crop.candidates = []
    torch.manual_seed(0)
    out_image, out_mask = crop(image, mask)
    assert len(crop.candidates) == 11 and out_mask.shape == (20, 20)
    # An all-ignore crop (no labelled pixel) is rejected, not a crash.
    assert not crop.acceptable(torch.full((5, 5), IGNORE_INDEX, dtype=torch.uint8))
    assert crop.acceptable(torch.tensor([[0, 1], [1, 2]], dtype=torch.uint8))
    assert not crop.acceptable(torch.tensor([[0, 1], [1, 1]], dtype=torch.uint8))  # 3/4 >= 0.75


# -- Rotation and blur (torchvision's, as configured in strong.yaml) --------------------------
def test_rotation_keeps_alignment_and_fills_mask_with_ignore():
    rotate = find(train_pipeline("strong"), v2.RandomRotation)
    assert isinstance(rotate, v2.RandomApply) and rotate.p == 0.5
    rotation = rotate.transforms[0]
    assert list(rotation.degrees) == [-10, 10]
    assert v2.InterpolationMode(rotation.interpolation) == v2.InterpolationMode.BILINEAR
    rotated = big_angle = teeth = 0
    for seed in range(60):
        image, mask = block_pattern(40, 40, block=6, seed=seed)
        torch.manual_seed(seed)
        out_image, out_mask = rotate(image, mask)
        assert isinstance(out_mask, tv_tensors.Mask) and out_mask.shape == (40, 40)
        # Nearest-neighbour masks: no blended values (a bilinear mask would blend 3 and 255).
        assert set(out_mask.unique().tolist()) <= set(LABELS) | {IGNORE_INDEX}
        empty_image = out_image.sum(0) == 0  # rotated in from outside (the pattern is never 0)
        empty_mask = out_mask == IGNORE_INDEX
        assert not (empty_image & ~empty_mask).any(), f"seed {seed}: empty pixel with a label"
        # Deep inside the ignored corners (5x5 all ignored) the image is empty as well.
        deep = -torch.nn.functional.max_pool2d(-(empty_mask.float()[None, None]), 5, 1, 2)[0, 0] > 0
        assert not (deep & ~empty_image).any()
        assert misaligned(out_image, out_mask) == 0, f"seed {seed}"
        if torch.equal(out_image, image):  # not applied (p = 0.5)
            assert torch.equal(out_mask, mask)
            continue
        rotated += 1
        if not torch.equal(out_mask, mask):  # an angle large enough to move whole pixels
            corners = out_mask[[0, 0, -1, -1], [0, -1, 0, -1]]
            big_angle += bool((corners == IGNORE_INDEX).all())
            # The check has teeth: the mask rotated by another angle no longer fits the image.
            other = v2.functional.rotate(out_mask, 6.0, fill=IGNORE_INDEX)
            teeth += misaligned(out_image, other) > 0
    # |angle| above ~2 degrees (80 % of draws) moves every corner of a 40x40 image off the image.
    assert 18 <= rotated <= 42 and big_angle >= 0.6 * rotated and teeth >= 0.6 * rotated


def test_gaussian_blur_changes_images_only():
    blur = find(train_pipeline("strong"), v2.GaussianBlur)
    assert isinstance(blur, v2.RandomApply) and blur.p == 0.2
    image, mask = block_pattern(40, 40, block=6, seed=3)
    blurred = 0
    for seed in range(100):
        torch.manual_seed(seed)
        out_image, out_mask = blur(image, mask)
        assert isinstance(out_mask, tv_tensors.Mask) and torch.equal(out_mask, mask)
        blurred += not torch.equal(out_image, image)
    assert 8 <= blurred <= 35


# -- PhotoMetricDistortion ---------------------------------------------------------------------
NONE = {"brightness": None, "contrast_first": False, "contrast": None, "saturation": None,
        "hue": None}


def test_brightness_adds_a_delta_with_mmseg_truncation_and_contrast_is_a_gain():
    pixels = torch.tensor([100, 250, 5, 0, 201, 7], dtype=torch.uint8)
    image = tv_tensors.Image(pixels.view(1, 1, 6).expand(3, 2, 6).clone())
    pmd = PhotoMetricDistortion()
    # clip(float32(x) + 10.7, 0, 255) truncated: 110.7 -> 110, 260.7 -> 255, 15.7 -> 15 ...
    out = pmd.transform(image, {**NONE, "brightness": 10.7})
    assert isinstance(out, tv_tensors.Image)
    assert out[0, 0].tolist() == [110, 255, 15, 10, 211, 17]
    out = pmd.transform(image, {**NONE, "brightness": -10.7})
    assert out[0, 0].tolist() == [89, 239, 0, 0, 190, 0]  # 239.3 -> 239, below 0 -> 0
    assert add_brightness_delta(torch.tensor([100], dtype=torch.uint8), 0.99).item() == 100
    # MMSeg's contrast is x * alpha (no blend with the mean): 130, 255 (325), 6.5 -> 6, ...
    out = pmd.transform(image, {**NONE, "contrast": 1.3})
    assert out[0, 0].tolist() == [130, 255, 6, 0, 255, 9]


def mmseg_photometric(bgr: np.ndarray, p: dict) -> np.ndarray:
    """MMSegmentation's PhotoMetricDistortion.transform, transcribed with its random draws
    replaced by ``p`` (BGR image, HxWx3 uint8, mmcv.bgr2hsv = cv2.COLOR_BGR2HSV)."""

    def convert(img, alpha=1, beta=0):
        img = img.astype(np.float32) * alpha + beta
        img = np.clip(img, 0, 255)
        return img.astype(np.uint8)

    img = bgr.copy()
    if p["brightness"] is not None:
        img = convert(img, beta=p["brightness"])
    if p["contrast_first"] and p["contrast"] is not None:
        img = convert(img, alpha=p["contrast"])
    if p["saturation"] is not None:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        img[:, :, 1] = convert(img[:, :, 1], alpha=p["saturation"])
        img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    if p["hue"] is not None:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        img[:, :, 0] = (img[:, :, 0].astype(int) + p["hue"]) % 180
        img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    if not p["contrast_first"] and p["contrast"] is not None:
        img = convert(img, alpha=p["contrast"])
    return img


def test_photometric_distortion_matches_mmseg_arithmetic():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(3, 24, 32), dtype=np.uint8)
    image = tv_tensors.Image(torch.from_numpy(rgb))
    pmd = PhotoMetricDistortion()
    bgr = np.ascontiguousarray(rgb.transpose(1, 2, 0)[..., ::-1])
    differs_from_input = 0
    for seed in range(40):
        torch.manual_seed(seed)
        params = pmd.make_params([image])
        ours = pmd.transform(image, params).numpy()
        reference = mmseg_photometric(bgr, params)[..., ::-1].transpose(2, 0, 1)
        np.testing.assert_array_equal(ours, reference, err_msg=f"params {params}")
        differs_from_input += not np.array_equal(ours, rgb)
    assert differs_from_input >= 30
    # Each step on its own, both contrast positions (the order matters).
    for params in ({**NONE, "saturation": 1.37}, {**NONE, "saturation": 0.6}, {**NONE, "hue": -18},
                   {**NONE, "hue": 17}, {**NONE, "brightness": 20.0, "contrast": 1.4,
                                         "contrast_first": True, "hue": 5, "saturation": 1.2},
                   {**NONE, "brightness": 20.0, "contrast": 1.4, "hue": 5, "saturation": 1.2}):
        reference = mmseg_photometric(bgr, params)[..., ::-1].transpose(2, 0, 1)
        np.testing.assert_array_equal(pmd.transform(image, params).numpy(), reference)
    both = {**NONE, "contrast": 1.4, "saturation": 1.3}
    assert not torch.equal(pmd.transform(image, {**both, "contrast_first": True}),
                           pmd.transform(image, both))
    # v2's own saturation/hue would not do: they compute something else.
    assert not torch.equal(pmd.transform(image, {**NONE, "saturation": 1.37}),
                           v2.functional.adjust_saturation(image, 1.37))


def test_photometric_distortion_draws_like_mmseg_and_leaves_masks_alone():
    pmd = PhotoMetricDistortion()
    image, mask = block_pattern(20, 20, block=6, seed=1)
    image = tv_tensors.Image(image // 2 + torch.tensor([0, 40, 90], dtype=torch.uint8).view(3, 1, 1))
    counts = dict.fromkeys(("brightness", "contrast", "saturation", "hue", "contrast_first"), 0)
    hues, changed = set(), 0
    draws = 1000
    for seed in range(draws):
        torch.manual_seed(seed)
        params = pmd.make_params([image])
        for key in counts:
            counts[key] += params[key] is not None if key != "contrast_first" else params[key]
        if params["brightness"] is not None:
            assert -32 <= params["brightness"] <= 32
        if params["contrast"] is not None:
            assert 0.5 <= params["contrast"] <= 1.5
        if params["saturation"] is not None:
            assert 0.5 <= params["saturation"] <= 1.5
        if params["hue"] is not None:
            hues.add(params["hue"])
        if seed < 40:
            torch.manual_seed(seed)
            out_image, out_mask = pmd(image, mask)
            assert isinstance(out_mask, tv_tensors.Mask) and torch.equal(out_mask, mask)
            assert out_image.dtype == torch.uint8 and isinstance(out_image, tv_tensors.Image)
            changed += not torch.equal(out_image, image)
    assert all(0.44 < n / draws < 0.56 for n in counts.values()), counts
    assert hues == set(range(-18, 18))  # numpy's randint(-18, 18): 18 itself never drawn
    assert changed >= 35
    with pytest.raises(TypeError, match="uint8"):
        pmd(image.float() / 255, mask)


# -- Image mixing ------------------------------------------------------------------------------
class Sources(SegmentationDataset):
    """Every pixel says where it came from: red = 40 * (index + 1), green = 30 + 60 * label
    (10 where ignored), blue = 0. Sample ``i`` holds ``i % 4 + 1`` classes and an ignored band."""

    class_names = ("a", "b", "c", "d")
    palette = [(1, 2, 3), (4, 5, 6), (7, 8, 9), (10, 11, 12)]
    crop_size = (32, 32)
    base_size = (32, 40)

    def __init__(self, transforms=None, length: int = 6, sizes=None):
        super().__init__(transforms=transforms)
        self.length, self.sizes = length, sizes

    def __len__(self) -> int:
        return self.length

    def load(self, index: int) -> Sample:
        height, width = self.sizes[index] if self.sizes else (32, 32)
        _, mask = block_pattern(height, width, block=5, seed=index)
        mask = mask.numpy() % (index % 4 + 1)  # 1, 2, 3 or 4 classes: odd counts for ClassMix
        mask[:, index * 3: index * 3 + 2] = IGNORE_INDEX
        image = np.zeros((height, width, 3), np.uint8)
        image[..., 0] = 40 * (index + 1)
        image[..., 1] = np.where(mask == IGNORE_INDEX, 10, 30 + 60 * mask.astype(np.int64))
        return Sample(image, mask, f"source {index}")


def decode(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(source index, label) of every pixel of a ``to_model_input`` image."""
    values = (image * 255).round().long()
    source = values[0] // 40 - 1
    label = torch.where(values[1] == 10, IGNORE_INDEX, (values[1] - 30) // 60)
    return source, label


FLIP = v2.RandomHorizontalFlip(0.5)


@pytest.mark.parametrize("mode", ["cutmix", "classmix"])
def test_mixing_keeps_every_label_with_its_pixels(mode):
    base = Sources(transforms=FLIP)
    mixed = MixedDataset(base, mode=mode, prob=1.0)
    fractions = []
    for seed in range(60):
        index = seed % len(base)
        image, mask = mixed[(index, seed)]
        assert image.shape == (3, 32, 32) and mask.dtype == torch.int64
        source, label = decode(image)
        assert torch.equal(label, mask), f"seed {seed}: a label does not match its pixel's source"
        others = set(source.unique().tolist()) - {index}
        assert len(others) <= 1
        own_image, own_mask = base[(index, seed)]
        own = source == index
        assert torch.equal(image[:, own], own_image[:, own]) and torch.equal(mask[own], own_mask[own])
        pasted = ~own
        fractions.append(float(pasted.float().mean()))
        if not pasted.any():
            continue
        other = others.pop()
        other_image, other_mask = base[(other, derive_seed(seed, "mix-second"))]
        assert torch.equal(image[:, pasted], other_image[:, pasted])
        if mode == "cutmix":  # a filled box
            rows, cols = pasted.any(1).nonzero()[:, 0], pasted.any(0).nonzero()[:, 0]
            box = pasted[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
            assert box.all(), f"seed {seed}: the pasted region is no box"
        else:  # exactly the pixels of ceil(C/2) of the classes present in the other mask
            classes = set(other_mask.unique().tolist()) - {IGNORE_INDEX}
            chosen = set(other_mask[pasted].unique().tolist())
            assert IGNORE_INDEX not in chosen and len(chosen) == math.ceil(len(classes) / 2)
            assert torch.equal(pasted, torch.isin(other_mask, torch.tensor(sorted(chosen))))
    assert sum(f > 0 for f in fractions) >= 45
    assert max(fractions) > 0.3 and min(f for f in fractions if f > 0) < 0.6


def test_mixing_prob_and_reproducibility():
    base = Sources(transforms=FLIP)
    never = MixedDataset(base, mode="cutmix", prob=0.0)
    for seed in range(10):
        a, b = never[(seed % 6, seed)], base[(seed % 6, seed)]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(3)
    a = never[2]
    torch.manual_seed(3)
    b = base[2]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    half = MixedDataset(base, mode="classmix", prob=0.5)
    mixed_count = 0
    for seed in range(200):
        image, _ = half[(1, seed)]
        mixed_count += bool((decode(image)[0] != 1).any())
    assert 70 <= mixed_count <= 130

    always = MixedDataset(base, mode="cutmix", prob=1.0)
    first = always[(4, 1234)]
    torch.manual_seed(99)  # the global RNG must not matter with a seed, nor change
    state = torch.random.get_rng_state()
    again = always[(4, 1234)]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert any(not torch.equal(first[0], always[(4, seed)][0]) for seed in range(5))
    # An int index (no seed) mixes with the global RNG: reproducible under torch.manual_seed.
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)
        outputs.append(always[0])
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    assert any((decode(always[0][0])[0] != 0).any() for _ in range(5))


def test_mixed_dataset_passes_the_dataset_through():
    base = Sources()
    mixed = MixedDataset(base, mode="classmix")
    assert len(mixed) == 6 and mixed.class_names == base.class_names
    assert mixed.palette == base.palette and mixed.colours == base.colours
    assert mixed.num_classes == 4 and mixed.ignore_index == IGNORE_INDEX
    assert mixed.crop_size == (32, 32) and mixed.base_size == (32, 40)
    assert mixed.transforms is None and mixed.dataset is base
    with pytest.raises(AttributeError):
        mixed.no_such_attribute  # noqa: B018
    clone = pickle.loads(pickle.dumps(mixed))  # DataLoader workers (spawn) pickle datasets
    assert len(clone) == 6 and clone.mode == "classmix"
    assert torch.equal(clone[(1, 5)][0], mixed[(1, 5)][0])


def test_mixing_refuses_samples_of_different_sizes_and_bad_settings():
    base = Sources(sizes=[(32, 32), (24, 32)], length=2)
    with pytest.raises(DataError, match="one size"):
        MixedDataset(base, prob=1.0)[(0, 0)]
    with pytest.raises(ConfigError, match="cutmix"):
        MixedDataset(base, mode="mixup")
    with pytest.raises(ConfigError, match="probability"):
        MixedDataset(base, prob=1.5)


# -- The presets -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mmseg", "strong"])
def test_preset_geometry_keeps_image_and_mask_aligned(name):
    train = train_pipeline(name)
    kinds = (KeepRatioResize, RandomCropCatMax, v2.RandomHorizontalFlip, v2.RandomRotation)
    geometry = v2.Compose([t for t in train.transforms
                           if isinstance(t, kinds) or (isinstance(t, v2.RandomApply)
                                                       and isinstance(t.transforms[0], kinds))])
    assert len(geometry.transforms) == (3 if name == "mmseg" else 4)
    crop = find(train, RandomCropCatMax)
    assert crop.size == (40, 40) and crop.cat_max_ratio == 0.75 and crop.max_tries == 10
    padded = checked = 0
    for seed in range(40):
        image, mask = block_pattern(48, 64, block=12, seed=seed)
        torch.manual_seed(seed)
        out_image, out_mask = geometry(image, mask)
        assert out_image.shape == (3, 40, 40) and out_mask.shape == (40, 40)
        assert set(out_mask.unique().tolist()) <= set(LABELS) | {IGNORE_INDEX}
        empty = out_image.sum(0) == 0
        assert not (empty & (out_mask != IGNORE_INDEX)).any()
        if name == "mmseg":  # no rotation: exactly the padding
            assert torch.equal(empty, out_mask == IGNORE_INDEX)
        padded += bool(empty.any())
        # Resized, then rotated: two resamplings blend up to 2 pixels from a boundary.
        checked += int(interior(out_mask, 5).sum())
        assert misaligned(out_image, out_mask, 5) == 0, f"seed {seed}"
    assert padded >= 4 and checked > 40 * 300


@pytest.mark.parametrize("dataset", ["synthetic", "stanford_background", "folder", None])
@pytest.mark.parametrize("name", PRESETS)
def test_every_transform_yaml_instantiates(name, dataset):
    node = DATASET if dataset is None else OmegaConf.load(CONF / "dataset" / f"{dataset}.yaml")
    cfg = load_preset(name, node)
    assert "mix" in cfg.transforms
    assert (cfg.transforms.mix is None) == (name != "strong")
    train, val = instantiate(cfg.transforms.train), instantiate(cfg.transforms.val)
    image, mask = block_pattern(50, 70, block=6)
    torch.manual_seed(0)
    out_image, out_mask = train(image, mask)
    assert out_image.dtype == torch.float32 and out_mask.shape == out_image.shape[-2:]
    assert set(out_mask.unique().tolist()) <= set(LABELS) | {IGNORE_INDEX}
    if name in ("mmseg", "strong"):
        crop = OmegaConf.to_container(cfg.dataset, resolve=True)["crop_size"]
        assert list(out_image.shape[-2:]) == list(crop)
    out_image, out_mask = val(image, mask)
    assert out_image.dtype == torch.float32 and out_mask.shape == out_image.shape[-2:]


def test_strong_mix_wraps_a_train_set_as_build_datasets_would():
    cfg = OmegaConf.merge({"dataset": OmegaConf.load(CONF / "dataset" / "synthetic.yaml")},
                          {"transforms": OmegaConf.load(CONF / "transforms" / "strong.yaml")},
                          {"dataset": {"image_size": 32, "train_length": 4, "val_length": 2}})
    train_set = instantiate(cfg.dataset, split="train", transforms=instantiate(cfg.transforms.train))
    if cfg.transforms.get("mix"):
        train_set = instantiate(cfg.transforms.mix)(train_set)
    assert isinstance(train_set, MixedDataset) and train_set.mode == "cutmix"
    assert train_set.prob == 0.5 and len(train_set) == 4 and train_set.num_classes == 6
    image, mask = train_set[(1, 3)]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64
