"""The data tools in scripts/: browse_dataset (a PNG grid of augmented samples), dataset_stats
(class frequencies and weights) and benchmark_data (loader throughput; no timed assertions)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import cv2
import hydra.utils
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from segexp.data.stanford_background import StanfordBackgroundDataset
from segexp.data.synthetic import SyntheticDataset
from segexp.visualize import legend
from tests.conftest import ROOT, compose_config, load_script

TINY = ["dataset=synthetic", "dataset.train_length=8", "dataset.image_size=32"]


@pytest.fixture(scope="module")
def browse():
    return load_script("browse_dataset")


@pytest.fixture(scope="module")
def stats_script():
    return load_script("dataset_stats")


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/data_loading")


def read_png(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"{path} is not a readable PNG"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def expected_grid_shape(num: int, cols: int, tile_h: int, tile_w: int, class_names, palette):
    """The documented layout: tiles of [image | overlay] under an 18-pixel caption, each followed
    by 4 white pixels right and below, ``cols`` per row; then the legend (classes + ignore)."""
    width = cols * (2 * tile_w + 4)
    rows = math.ceil(num / cols)
    legend_h = legend([*class_names, "ignore"], [*palette, (0, 0, 0)], width).shape[0]
    return rows * (18 + tile_h + 4) + legend_h, width


# -- browse_dataset ----------------------------------------------------------------------------
def test_browse_synthetic_grid_size(browse, tmp_path, capsys):
    out = tmp_path / "grid.png"
    written = browse.main([*TINY, "--num", "5", "--cols", "2", "--out", str(out)])
    assert written == out and str(out) in capsys.readouterr().out
    dataset = SyntheticDataset(num_classes=6)
    height, width = expected_grid_shape(5, 2, 32, 32, dataset.class_names, dataset.colours)
    assert read_png(out).shape == (height, width, 3)


def test_browse_tiles_show_image_and_mask(browse, tmp_path):
    """Without augmentation and with every sample drawn, tile k is sample k: its left half the
    image itself, its right half the image under the class colours."""
    out = tmp_path / "grid.png"
    browse.main([*TINY, "transforms=none", "--num", "8", "--cols", "4", "--out", str(out)])
    grid = read_png(out).astype(np.int64)
    dataset = SyntheticDataset(num_classes=6, train_length=8, image_size=32)
    palette = np.array(dataset.colours)
    for k in (0, 5):
        sample = dataset.load(k)
        top, left = (k // 4) * (18 + 32 + 4) + 18, (k % 4) * (64 + 4)
        shown = grid[top:top + 32, left:left + 32]
        overlay = grid[top:top + 32, left + 32:left + 64]
        assert np.abs(shown - sample.image).max() <= 1
        expected = sample.image * 0.4 + palette[sample.mask] * 0.6
        assert np.abs(overlay - expected).max() <= 2


def test_browse_stanford_background(browse, shared_datasets, tmp_path):
    root = shared_datasets / "stanford_background" / "iccv09Data"
    if not root.is_dir():
        pytest.skip(f"Stanford Background not found at {root}")
    out = tmp_path / "sb.png"
    browse.main(["dataset=stanford_background", f"dataset.root={root}", "--num", "3",
                 "--cols", "3", "--seed", "1", "--out", str(out)])
    # The training pipeline crops to dataset.crop_size, 224x224.
    height, width = expected_grid_shape(3, 3, 224, 224, StanfordBackgroundDataset.class_names,
                                        StanfordBackgroundDataset.palette)
    image = read_png(out)
    assert image.shape == (height, width, 3)
    assert image[18:18 + 224, :224].std() > 10  # a photograph, not a blank tile


def test_browse_missing_root_is_one_clear_line(tmp_path):
    missing = tmp_path / "nowhere"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "browse_dataset.py"), "dataset=stanford_background",
         f"dataset.root={missing}", "--out", str(tmp_path / "x.png")],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("segexp: error: Stanford Background data not found")
    assert str(missing) in result.stderr
    assert not (tmp_path / "x.png").exists()


# -- dataset_stats -----------------------------------------------------------------------------
def independent_counts(dataset) -> np.ndarray:
    """Per-image pixel counts of each class, recomputed here (images x classes)."""
    counts = np.zeros((len(dataset), dataset.num_classes), dtype=np.int64)
    for i in range(len(dataset)):
        mask = dataset.load(i).mask
        for c in range(dataset.num_classes):
            counts[i, c] = int((mask == c).sum())
    return counts


def test_dataset_stats_frequencies_and_weights(stats_script, tmp_path):
    stats = stats_script.main([*TINY, "--out-dir", str(tmp_path), "--no-progress"])
    counts = independent_counts(SyntheticDataset(num_classes=6, train_length=8, image_size=32))
    pixels = counts.sum(axis=0)
    assert (pixels > 0).all(), "the fixture should contain every class"
    assert stats["num_images"] == 8
    assert stats["pixels"] == pixels.tolist()
    assert stats["images_with_class"] == (counts > 0).sum(axis=0).tolist()
    assert sum(stats["frequency"]) == pytest.approx(1.0, abs=1e-9)
    assert stats["ignored_fraction"] == 0.0
    assert stats["height"] == {"min": 32, "median": 32.0, "max": 32}

    freq = pixels / pixels.sum()
    inverse = (1 / freq) / (1 / freq).mean()
    # SegNet: class pixels over all pixels of the images where the class occurs.
    f = np.array([pixels[c] / counts[counts[:, c] > 0].sum() for c in range(6)])
    median = np.median(f) / f
    assert not np.allclose(inverse, median)  # the two methods differ here, so each is checked
    np.testing.assert_allclose(stats["frequency"], freq, rtol=1e-12)
    np.testing.assert_allclose(stats["inverse_frequency_weights"], inverse, rtol=1e-9)
    np.testing.assert_allclose(stats["median_frequency_weights"], median, rtol=1e-9)

    # The YAML snippet: loss.class_weights (median frequency by default) fits the CE loss.
    path = tmp_path / "stats_synthetic_train.yaml"
    assert stats["yaml"] == path and (tmp_path / "stats_synthetic_train.png").is_file()
    weights = list(OmegaConf.load(path).loss.class_weights)
    np.testing.assert_allclose(weights, median, rtol=1e-5)
    loss = hydra.utils.instantiate(compose_config("loss=ce", f"loss.class_weights={weights}").loss)
    np.testing.assert_allclose(loss.class_weights.numpy(), weights, rtol=1e-6)
    logits, target = torch.randn(2, 6, 4, 4), torch.randint(0, 6, (2, 4, 4))
    assert torch.isfinite(loss(logits, target))

    stats_script.main([*TINY, "--out-dir", str(tmp_path), "--no-progress", "--weights", "inverse"])
    np.testing.assert_allclose(OmegaConf.load(path).loss.class_weights, inverse, rtol=1e-5)


def test_dataset_stats_absent_classes_weigh_zero(stats_script, tmp_path):
    """Images with no shapes hold only the background: every other class is absent."""
    overrides = ["dataset=synthetic", "dataset.num_classes=4", "dataset.train_length=2",
                 "dataset.image_size=16", "dataset.min_shapes=0", "dataset.max_shapes=0"]
    with pytest.warns(UserWarning, match="3 class\\(es\\) never occur.*circle, rectangle, triangle"):
        stats = stats_script.main([*overrides, "--out-dir", str(tmp_path), "--no-progress"])
    assert stats["pixels"] == [2 * 16 * 16, 0, 0, 0]
    assert stats["frequency"] == [1.0, 0.0, 0.0, 0.0]
    assert stats["median_frequency_weights"] == [1.0, 0.0, 0.0, 0.0]
    assert stats["inverse_frequency_weights"] == [1.0, 0.0, 0.0, 0.0]
    assert OmegaConf.load(stats["yaml"]).loss.class_weights == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.filterwarnings("ignore:.*never occur:UserWarning")
def test_dataset_stats_reads_without_augmentation(stats_script, tmp_path):
    """The counts come from the stored masks: identical whatever transforms are configured."""
    a = stats_script.main([*TINY, "--out-dir", str(tmp_path), "--no-progress", "--max-images", "3"])
    b = stats_script.main([*TINY, "transforms=none", "--out-dir", str(tmp_path), "--no-progress",
                           "--max-images", "3"])
    assert a["num_images"] == 3 and a["pixels"] == b["pixels"]
    assert sum(a["pixels"]) == 3 * 32 * 32


# -- benchmark_data ----------------------------------------------------------------------------
def test_benchmark_data_writes_table(bench, tmp_path):
    out = tmp_path / "throughput.md"
    argv = ["dataset=synthetic", "dataset.train_length=3", "dataset.image_size=32", "--batches", "2",
            "--warmup", "1", "--batch-size", "2", "--workers", "0,1", "--out", str(out)]
    results = bench.main(argv)
    assert [r["workers"] for r in results] == [0, 1]
    assert all(r["images"] == 4 and r["images_per_s"] > 0 for r in results)
    text = out.read_text()
    assert text.startswith("# Data-pipeline throughput")
    assert "## synthetic: train split, training transforms" in text
    assert "3 image(s) in the split, cycled 2.0 times" in text
    assert f"torch {torch.__version__}" in text
    assert "python scripts/bench/data_loading.py dataset=synthetic dataset.train_length=3" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["0", "1"]
    assert float(rows[0].split("|")[2]) == pytest.approx(results[0]["images_per_s"], abs=0.06)

    bench.main([*argv[:-4], "--workers", "0", "--out", str(out)])  # a second run appends
    text = out.read_text()
    assert text.count("## synthetic:") == 2 and text.count("# Data-pipeline throughput") == 1


def test_benchmark_cycles_small_splits(bench):
    base = SyntheticDataset(num_classes=6, train_length=3, image_size=16)
    cycled = bench.Cycled(base, 7)
    assert len(cycled) == 7
    for i in (1, 4, 6):
        assert torch.equal(cycled[i][1], base[i % 3][1])
