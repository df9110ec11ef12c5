"""The datasets: synthetic generation, folder layouts and checks, Stanford Background parsing."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from segexp.data.base import IGNORE_INDEX
from segexp.data.folder import FolderDataset
from segexp.data.overlap import validation_images_in_training
from segexp.data.stanford_background import DUPLICATES, StanfordBackgroundDataset, read_regions
from segexp.data.synthetic import ALL_CLASS_NAMES, SyntheticDataset
from segexp.errors import ConfigError, DataError
from tests.conftest import SHARED_DATASETS

STANFORD = SHARED_DATASETS / "stanford_background" / "iccv09Data"


# -- synthetic -------------------------------------------------------------------------------
def test_synthetic_is_deterministic_by_seed_split_and_index():
    a = SyntheticDataset(seed=3, image_size=64, train_length=8)
    b = SyntheticDataset(seed=3, image_size=64, train_length=8)
    for i in range(4):
        sa, sb = a.load(i), b.load(i)
        np.testing.assert_array_equal(sa.image, sb.image)
        np.testing.assert_array_equal(sa.mask, sb.mask)
    other_seed = SyntheticDataset(seed=4, image_size=64).load(0)
    other_split = SyntheticDataset(split="val", seed=3, image_size=64).load(0)
    other_index = a.load(1)
    for other in (other_seed, other_split, other_index):
        assert not np.array_equal(a.load(0).image, other.image)


def test_synthetic_sizes_lengths_and_types():
    train = SyntheticDataset(image_size=48, train_length=7, val_length=3)
    val = SyntheticDataset(split="val", image_size=48, train_length=7, val_length=3)
    assert (len(train), len(val)) == (7, 3)
    sample = train.load(2)
    assert sample.image.shape == (48, 48, 3) and sample.image.dtype == np.uint8
    assert sample.mask.shape == (48, 48)
    assert train.crop_size == (48, 48) and train.base_size == (48, 48)
    image, mask = train[2]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert mask.shape == (48, 48) and mask.dtype == torch.int64
    np.testing.assert_array_equal(mask.numpy(), sample.mask)
    with pytest.raises(IndexError):
        train.load(7)


@pytest.mark.parametrize("num_classes", [2, 4, 8])
def test_synthetic_num_classes_and_every_class_appears(num_classes):
    ds = SyntheticDataset(num_classes=num_classes, image_size=48, train_length=40)
    assert ds.num_classes == num_classes == len(ds.palette)
    assert list(ds.class_names) == list(ALL_CLASS_NAMES[:num_classes])
    seen = set()
    for i in range(40):
        seen |= set(np.unique(ds.load(i).mask).tolist())
    assert seen == set(range(num_classes))


def test_synthetic_num_classes_out_of_range():
    with pytest.raises(ConfigError, match="2 to 8"):
        SyntheticDataset(num_classes=9)
    with pytest.raises(ConfigError, match="2 to 8"):
        SyntheticDataset(num_classes=1)


def test_synthetic_masks_are_exact_and_shapes_occlude():
    """Each labelled region is painted with its class's colours: pixels of one class share a
    hue family, and regions of different classes meet (later shapes cover earlier ones)."""
    ds = SyntheticDataset(num_classes=6, image_size=64, noise=0.0, train_length=30)
    touching = 0
    for i in range(30):
        sample = ds.load(i)
        mask = sample.mask
        # The mask is a crisp label map (no in-between values) and uses only valid classes.
        assert set(np.unique(mask).tolist()) <= set(range(6))
        # Occlusion: shape pixels (non-zero) next to a different shape class.
        right = (mask[:, 1:] != mask[:, :-1]) & (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
        down = (mask[1:] != mask[:-1]) & (mask[1:] > 0) & (mask[:-1] > 0)
        touching += int(right.any() or down.any())
    assert touching >= 3


def test_synthetic_mask_is_exactly_the_painted_pixels(monkeypatch):
    """Paint every class with a flat grey of its own (no noise, no gradient): the image then spells
    out which shape won each pixel, and the mask must agree with it everywhere."""

    def flat(self, rng, cls, centre):
        rng.random()  # keep drawing from the generator like the real textures do
        return np.full((self.image_size, self.image_size, 3), 30.0 * cls, np.float32)

    monkeypatch.setattr(SyntheticDataset, "_texture", flat)
    ds = SyntheticDataset(num_classes=8, image_size=64, noise=0.0, illumination=0.0,
                          train_length=10)
    for i in range(10):
        sample = ds.load(i)
        np.testing.assert_array_equal(sample.image[..., 0], sample.mask.astype(np.uint8) * 30)


def test_synthetic_classes_have_their_own_look():
    """Texture/colour carries the label: a saturated shape class differs from the greyish
    background in mean saturation."""
    ds = SyntheticDataset(num_classes=2, image_size=64, noise=0.0, train_length=20,
                          min_shapes=1, max_shapes=1)
    checked = 0
    for i in range(20):
        sample = ds.load(i)
        circle = sample.mask == 1
        if circle.sum() < 30:
            continue
        hsv = cv2.cvtColor(sample.image, cv2.COLOR_RGB2HSV)
        inside_sat = hsv[..., 1][circle].astype(float).mean()
        outside_sat = hsv[..., 1][~circle].astype(float).mean()
        assert inside_sat > outside_sat + 40  # saturated red shape vs greyish background
        checked += 1
    assert checked >= 5


# -- folder ----------------------------------------------------------------------------------
def _write_pair(images: Path, masks: Path, stem: str, mask: np.ndarray,
                image: np.ndarray | None = None):
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    if image is None:
        image = np.full(mask.shape + (3,), 100, np.uint8)
        image[..., 0] = (mask * 40).astype(np.uint8)
    cv2.imwrite(str(images / f"{stem}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    Image.fromarray(mask.astype(np.uint8), mode="L").save(masks / f"{stem}.png")


def _mask(value: int, other: int = 0, size=(6, 8)) -> np.ndarray:
    mask = np.full(size, other, np.uint8)
    mask[: size[0] // 2] = value
    return mask


def test_folder_subfolder_layout(tmp_path):
    for split, stems in (("train", ["a", "b", "c"]), ("val", ["d"])):
        for j, stem in enumerate(stems):
            _write_pair(tmp_path / "images" / split, tmp_path / "masks" / split, stem,
                        _mask(1 + j % 2))
    train = FolderDataset(root=tmp_path, class_names=["bg", "x", "y"], num_classes=3)
    val = FolderDataset(split="val", root=tmp_path, class_names=["bg", "x", "y"])
    assert train.layout == "subfolders"
    assert [p[0].stem for p in train.samples] == ["a", "b", "c"]
    assert [p[0].stem for p in val.samples] == ["d"]
    sample = train.load(1)
    np.testing.assert_array_equal(sample.mask, _mask(2))
    assert sample.image.shape == (6, 8, 3) and sample.image[0, 0, 0] == 80
    image, mask = train[1]
    assert image.shape == (3, 6, 8) and mask.dtype == torch.int64
    assert train.class_names == ("bg", "x", "y")


def test_folder_split_files_and_classes_file(tmp_path):
    for stem in "abcde":
        _write_pair(tmp_path / "images", tmp_path / "masks", stem, _mask(1))
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("a\nc\ne\n")
    (tmp_path / "splits" / "val.txt").write_text("b\n\nd\n")
    (tmp_path / "classes.txt").write_text("background\ncell\n")
    train = FolderDataset(root=tmp_path, classes_file="classes.txt", num_classes=2)
    val = FolderDataset(split="val", root=tmp_path, classes_file=tmp_path / "classes.txt")
    assert train.layout == val.layout == "split_files"
    assert [p[0].stem for p in train.samples] == ["a", "c", "e"]
    assert [p[0].stem for p in val.samples] == ["b", "d"]
    assert train.class_names == ("background", "cell") and train.num_classes == 2
    (tmp_path / "splits" / "val.txt").write_text("b\nzzz\n")
    with pytest.raises(DataError, match="zzz"):
        FolderDataset(split="val", root=tmp_path, classes_file="classes.txt")


def test_folder_val_fraction_is_seeded_and_disjoint(tmp_path):
    stems = [f"s{i:02d}" for i in range(20)]
    for stem in stems:
        _write_pair(tmp_path / "images", tmp_path / "masks", stem, _mask(1))

    def names(split, seed, fraction=0.25):
        ds = FolderDataset(split=split, root=tmp_path, num_classes=2, val_fraction=fraction,
                           seed=seed)
        assert ds.layout == "val_fraction"
        return [p[0].stem for p in ds.samples]

    train, val = names("train", 0), names("val", 0)
    assert len(val) == 5 and len(train) == 15
    assert set(train) | set(val) == set(stems) and not set(train) & set(val)
    assert names("val", 0) == val
    assert names("val", 1) != val
    assert len(names("val", 0, fraction=0.1)) == 2


def test_folder_missing_mask_names_the_stem(tmp_path):
    _write_pair(tmp_path / "images", tmp_path / "masks", "good", _mask(1))
    cv2.imwrite(str(tmp_path / "images" / "lonely.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="lonely") as info:
        FolderDataset(root=tmp_path, num_classes=2)
    assert "no mask" in str(info.value) and "good" not in str(info.value)
    (tmp_path / "images" / "lonely.png").unlink()
    Image.fromarray(_mask(1)).save(tmp_path / "masks" / "orphan.png")
    with pytest.raises(DataError, match="orphan"):
        FolderDataset(root=tmp_path, num_classes=2)


def test_folder_missing_root_says_what_was_expected(tmp_path):
    with pytest.raises(DataError) as info:
        FolderDataset(root=tmp_path / "nowhere", num_classes=2)
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "images") in message and "does not exist" in message
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="images/"):  # lists what it found instead
        FolderDataset(root=tmp_path, num_classes=2)


def test_folder_binary_255_trap_and_mask_map(tmp_path):
    for stem in "abc":
        _write_pair(tmp_path / "images", tmp_path / "masks", stem, _mask(255))
    with pytest.raises(DataError, match="mask_map") as info:
        FolderDataset(root=tmp_path, class_names=["bg", "fg"], val_fraction=0)
    assert "a.png" in str(info.value)
    ds = FolderDataset(root=tmp_path, class_names=["bg", "fg"], val_fraction=0, mask_map={255: 1})
    image, mask = ds[0]
    np.testing.assert_array_equal(mask.numpy(), _mask(1))
    # 255 really meaning "ignore" is allowed by mapping it to itself.
    ds = FolderDataset(root=tmp_path, class_names=["bg", "fg"], val_fraction=0, mask_map={255: 255})
    assert set(ds[0][1].unique().tolist()) == {0, IGNORE_INDEX}


def test_folder_mask_map_from_omegaconf(tmp_path):
    from omegaconf import OmegaConf

    _write_pair(tmp_path / "images", tmp_path / "masks", "a", _mask(7, other=3))
    ds = FolderDataset(root=tmp_path, num_classes=3, val_fraction=0,
                       mask_map=OmegaConf.create({7: 2, 3: 0}))
    np.testing.assert_array_equal(ds.load(0).mask, _mask(2, other=0))


def test_folder_out_of_range_values_name_file_and_values(tmp_path):
    _write_pair(tmp_path / "images", tmp_path / "masks", "a", _mask(1))
    _write_pair(tmp_path / "images", tmp_path / "masks", "bad", _mask(5, other=3))
    ds = FolderDataset(root=tmp_path, num_classes=3, val_fraction=0)
    ds[0]
    with pytest.raises(DataError) as info:
        ds[1]
    message = str(info.value)
    assert "bad.png" in message and "3, 5" in message


def test_negative_mask_values_are_refused_not_wrapped():
    """A negative label would silently wrap to 254 in the uint8 mask; the base class refuses it."""
    from segexp.data.base import Sample, SegmentationDataset

    class Negative(SegmentationDataset):
        class_names = ("a", "b")

        def __len__(self):
            return 1

        def load(self, index):
            mask = np.zeros((3, 4), np.int32)
            mask[0, 0] = -2
            return Sample(np.zeros((3, 4, 3), np.uint8), mask, "negative.tif")

    with pytest.raises(DataError, match="negative.tif holds values -2"):
        Negative()[0]


def test_folder_palette_must_match_classes(tmp_path):
    _write_pair(tmp_path / "images", tmp_path / "masks", "a", _mask(1))
    ds = FolderDataset(root=tmp_path, num_classes=2, val_fraction=0, palette=[[0, 0, 0], [9, 9, 9]])
    assert ds.colours == [(0, 0, 0), (9, 9, 9)]
    with pytest.raises(ConfigError, match="palette"):
        FolderDataset(root=tmp_path, num_classes=2, val_fraction=0, palette=[[0, 0, 0]])


def test_folder_size_mismatch_names_the_file(tmp_path):
    _write_pair(tmp_path / "images", tmp_path / "masks", "a", _mask(1),
                image=np.zeros((6, 9, 3), np.uint8))
    ds = FolderDataset(root=tmp_path, num_classes=2, val_fraction=0)
    with pytest.raises(DataError, match="sizes differ") as info:
        ds[0]
    assert "a.png" in str(info.value) and "9x6" in str(info.value)


def test_folder_unreadable_image_names_it(tmp_path):
    _write_pair(tmp_path / "images", tmp_path / "masks", "a", _mask(1))
    (tmp_path / "images" / "a.png").write_bytes(b"this is not a png at all")
    ds = FolderDataset(root=tmp_path, num_classes=2, val_fraction=0)
    with pytest.raises(DataError, match="cannot read image") as info:
        ds[0]
    assert str(tmp_path / "images" / "a.png") in str(info.value)


def test_folder_num_classes_disagreement(tmp_path):
    _write_pair(tmp_path / "images", tmp_path / "masks", "a", _mask(1))
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    with pytest.raises(DataError, match="num_classes=2"):
        FolderDataset(root=tmp_path, num_classes=2, classes_file="classes.txt", val_fraction=0)
    # No classes at all: the count comes from the masks (tests/data/test_folder_layouts.py).
    assert FolderDataset(root=tmp_path, val_fraction=0).num_classes == 2


# -- stanford background ---------------------------------------------------------------------
def _write_stanford(root: Path, labels: dict[str, np.ndarray]) -> None:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for sample_id, label in labels.items():
        image = np.full(label.shape + (3,), 90, np.uint8)
        cv2.imwrite(str(root / "images" / f"{sample_id}.jpg"), image)
        text = "\n".join(" ".join(str(v) for v in row) for row in label) + "\n"
        (root / "labels" / f"{sample_id}.regions.txt").write_text(text)
        (root / "labels" / f"{sample_id}.surfaces.txt").write_text(text)  # ignored


def stanford_ids(ds: StanfordBackgroundDataset) -> list[str]:
    """The ids of a Stanford Background split, checking each sample pairs <id>.jpg with its
    labels/<id>.regions.txt."""
    ids = [image.name[:-4] for image, _ in ds.samples]
    assert [labels for _, labels in ds.samples] == [
        ds.root / "labels" / f"{i}.regions.txt" for i in ids]
    return ids


def test_stanford_fixture_parser_and_split(tmp_path):
    rng = np.random.default_rng(0)
    labels = {"0000001": rng.integers(-1, 8, size=(5, 7)),
              "0000002": rng.integers(0, 8, size=(5, 7))}
    labels["0000001"][0, 0] = -1
    _write_stanford(tmp_path, labels)
    train = StanfordBackgroundDataset(root=tmp_path)
    val = StanfordBackgroundDataset(split="val", root=tmp_path)
    assert len(train) == len(val) == 1 and set(stanford_ids(train) + stanford_ids(val)) == set(labels)
    for ds in (train, val):
        sample = ds.load(0)
        expected = labels[stanford_ids(ds)[0]]
        np.testing.assert_array_equal(sample.mask, np.where(expected < 0, 255, expected))
        assert sample.image.shape == (5, 7, 3)
    parsed = read_regions(tmp_path / "labels" / "0000001.regions.txt")
    assert parsed[0, 0] == 255 and (parsed == 255).sum() == (labels["0000001"] < 0).sum()
    image, mask = train[0]
    assert image.shape == (3, 5, 7) and mask.dtype == torch.int64


def test_stanford_bad_label_files(tmp_path):
    _write_stanford(tmp_path, {"a": np.zeros((4, 6), int)})
    (tmp_path / "labels" / "a.regions.txt").write_text("0 0 0\n0 0 0\n")  # 2x3, image 4x6
    ds = StanfordBackgroundDataset(root=tmp_path, split="train")
    with pytest.raises(DataError, match="sizes differ"):
        ds[0]
    (tmp_path / "labels" / "a.regions.txt").write_text("0 0 x\n0 0 0\n")
    with pytest.raises(DataError, match="a.regions.txt"):
        ds.load(0)
    (tmp_path / "labels" / "a.regions.txt").write_text(
        "\n".join(["0 0 9 0 0 0"] + ["0 0 0 0 0 0"] * 3))
    with pytest.raises(DataError, match="values 9"):
        ds[0]


def test_stanford_wrong_root_names_expected_subfolders(tmp_path):
    with pytest.raises(DataError) as info:
        StanfordBackgroundDataset(root=tmp_path / "missing")
    message = str(info.value)
    assert str(tmp_path / "missing" / "images") in message
    assert str(tmp_path / "missing" / "labels") in message and "iccv09Data" in message
    (tmp_path / "iccv09Data" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="did you mean"):
        StanfordBackgroundDataset(root=tmp_path)


@pytest.fixture(scope="module")
def stanford_root() -> Path:
    if not (STANFORD / "images").is_dir():
        pytest.skip(f"Stanford Background not found at {STANFORD}")
    return STANFORD


def test_stanford_real_split(stanford_root):
    train = StanfordBackgroundDataset(root=stanford_root)
    val = StanfordBackgroundDataset(split="val", root=stanford_root)
    assert len(train) == 572 and len(val) == 142
    assert not set(stanford_ids(train)) & set(stanford_ids(val))
    all_ids = sorted(p.name[:-4] for p in (stanford_root / "images").glob("*.jpg"))
    # every image but 6000257, whose byte-for-byte copy 6000348 is a training image
    assert sorted(stanford_ids(train) + stanford_ids(val) + ["6000257"]) == all_ids
    assert "6000348" in stanford_ids(train)
    assert (stanford_root / "images" / "6000257.jpg").read_bytes() == \
        (stanford_root / "images" / "6000348.jpg").read_bytes()
    # and no other validation image is a copy of a training one
    assert validation_images_in_training(train, val) == []
    for a, b in DUPLICATES:  # what the dataset module says of the set holds
        assert (stanford_root / "images" / f"{a}.jpg").read_bytes() == \
            (stanford_root / "images" / f"{b}.jpg").read_bytes()
    assert stanford_ids(StanfordBackgroundDataset(root=stanford_root)) == stanford_ids(train)


def test_stanford_real_sample(stanford_root):
    ds = StanfordBackgroundDataset(root=stanford_root)
    unknown_found = False
    for index in range(0, len(ds), 40):
        sample = ds.load(index)
        raw = np.loadtxt(stanford_root / "labels" / f"{stanford_ids(ds)[index]}.regions.txt", dtype=int)
        np.testing.assert_array_equal(sample.mask, np.where(raw < 0, 255, raw))
        assert sample.image.shape[:2] == sample.mask.shape
        assert set(np.unique(sample.mask).tolist()) <= set(range(8)) | {255}
        unknown_found |= bool((raw < 0).any())
        image, mask = ds[index]
        assert mask.shape == sample.mask.shape
    assert unknown_found  # the real data has unknown pixels in some of these samples


def test_stanford_samples_drive_len_files_and_drop(tmp_path):
    _write_stanford(tmp_path, {f"{i:07d}": np.zeros((4, 6), int) for i in range(10)})
    ds = StanfordBackgroundDataset(root=tmp_path)
    ids = stanford_ids(ds)
    assert len(ds) == len(ds.samples) == 8
    assert ds.files() == [p for i in ids for p in (tmp_path / "images" / f"{i}.jpg",
                                                   tmp_path / "labels" / f"{i}.regions.txt")]
    ds.drop_samples([0, 3])
    assert len(ds) == 6 and stanford_ids(ds) == [i for k, i in enumerate(ids) if k not in (0, 3)]


def test_found_in_and_root_hint(tmp_path):
    from segexp.data.base import found_in, root_hint

    assert found_in(tmp_path / "nope") == f"no folder {tmp_path / 'nope'}"
    assert found_in(tmp_path) == "an empty folder"
    for name in "abcdefghijkl":
        (tmp_path / name).touch()
    (tmp_path / "sub").mkdir()
    assert found_in(tmp_path) == "a, b, c, d, e, f, g, h, i, j ..."
    assert found_in(tmp_path, 12) == "a, b, c, d, e, f, g, h, i, j, k, l ..."
    assert found_in(tmp_path, 13) == "a, b, c, d, e, f, g, h, i, j, k, l, sub/"
    assert root_hint(tmp_path, [tmp_path / "sub"], holds=" with subsets") == (
        f" It holds sub/ with subsets: did you mean dataset.root={tmp_path / 'sub'}?")
    assert root_hint(tmp_path / "images", [], ("images",)) == (
        f" {tmp_path / 'images'} is itself one of the sub-folders: did you mean "
        f"dataset.root={tmp_path}?")
    assert root_hint(tmp_path / "x", [], ("images",)) == ""
