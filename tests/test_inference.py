"""Inference: whole / slide modes, test-time augmentation, the Python API and segexp-predict."""

from __future__ import annotations

import importlib
import json

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from segexp.engine.experiment import run_training
from segexp.errors import SegexpError
from segexp.inference import InferenceOptions, Segmenter, infer_logits, slide_logits
from tests.conftest import tiny_config

NUM_CLASSES = 6  # the synthetic dataset's default


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny trained run folder, laid out as train.py writes it (config in .hydra/)."""
    path = tmp_path_factory.mktemp("run")
    cfg = tiny_config("trainer.max_iters=2", "trainer.val_interval=2")
    run_training(cfg, path)
    (path / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, path / ".hydra" / "config.yaml")
    return path


@pytest.fixture(scope="module")
def segmenter(run_dir):
    return Segmenter.from_run(run_dir, device="cpu")


def _images(seed: int = 0, size=(1, 3, 40, 56)) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed))


def _rgb(seed: int = 0, size=(45, 70)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def test_slide_equals_whole_when_the_window_covers_the_image(segmenter):
    images = _images()
    whole = infer_logits(segmenter.model, images, InferenceOptions())
    for crop in ((40, 56), (64, 64)):  # exactly the image, and larger than it
        slide = infer_logits(segmenter.model, images,
                             InferenceOptions(mode="slide", crop=crop, stride=(8, 8)))
        assert slide.shape == whole.shape == (1, NUM_CLASSES, 40, 56)
        assert (slide - whole).abs().max().item() <= 1e-5


def test_slide_with_overlapping_windows_averages_them(segmenter):
    images = _images(1, (2, 3, 64, 96))
    logits = slide_logits(segmenter.model, images, crop=(32, 32), stride=(20, 24))
    assert logits.shape == (2, NUM_CLASSES, 64, 96) and torch.isfinite(logits).all()
    # The top-left window alone covers the top-left 20x24 pixels (no overlap there).
    corner = infer_logits(segmenter.model, images[:, :, :32, :32])
    assert (logits[..., :20, :24] - corner[..., :20, :24]).abs().max().item() <= 1e-5
    # Rows 20..31 of the first columns lie in two windows (rows 0..31 and 20..51): their mean.
    below = infer_logits(segmenter.model, images[:, :, 20:52, :32])
    expected = (corner[..., 20:32, :24] + below[..., :12, :24]) / 2
    assert (logits[..., 20:32, :24] - expected).abs().max().item() <= 1e-5


def test_tta_with_scale_one_and_no_flip_is_plain_inference(segmenter):
    images = _images(2)
    plain = infer_logits(segmenter.model, images)
    tta = infer_logits(segmenter.model, images, InferenceOptions(scales=[1.0], flip=False))
    assert torch.equal(plain, tta)


def test_flip_tta_is_flip_equivariant(segmenter):
    options = InferenceOptions(scales=[0.75, 1.0], flip=True)
    half = _images(3, (1, 3, 32, 24))
    symmetric = torch.cat([half, half.flip(-1)], dim=-1)  # a mirror-symmetric 32x48 input
    out = infer_logits(segmenter.model, symmetric, options)
    assert (out - out.flip(-1)).abs().max().item() <= 1e-5
    images = _images(4, (1, 3, 32, 48))  # and any input: TTA(flip x) = flip TTA(x)
    a = infer_logits(segmenter.model, images.flip(-1), options)
    b = infer_logits(segmenter.model, images, options).flip(-1)
    assert (a - b).abs().max().item() <= 1e-5
    # Log of averaged probabilities: their softmax sums to one.
    assert torch.allclose(out.exp().sum(1), torch.ones(1, 32, 48), atol=1e-5)


def test_python_api_on_a_numpy_image(run_dir, segmenter):
    image = _rgb()
    prediction = segmenter.predict(image)
    assert prediction.shape == (45, 70) and prediction.dtype == np.uint8
    assert prediction.max() < NUM_CLASSES
    logits = segmenter.predict_logits(image)
    assert logits.shape == (NUM_CLASSES, 45, 70)
    assert np.array_equal(logits.argmax(0).numpy(), prediction)
    # The run's val normalisation is applied: ImageNet statistics from conf/transforms/default.
    assert segmenter.mean == pytest.approx((0.485, 0.456, 0.406))
    assert segmenter.class_names[0] == "background" and len(segmenter.palette) >= NUM_CLASSES
    tta = Segmenter.from_run(run_dir, checkpoint="last", device="cpu", mode="slide",
                             crop=(32, 32), scales=[0.5, 1.0], flip=True)
    assert tta.predict(image).shape == (45, 70)
    with pytest.raises(SegexpError, match="HxWx3"):
        segmenter.predict(image[..., 0])


def _script(name: str):
    """A command's module (segexp-predict, segexp-eval), run in this process (a subprocess
    would import torch again)."""
    return importlib.import_module(f"segexp.cli.{name}")


def _check_image_outputs(out, stem, size):
    for suffix in ("mask", "overlay", "index"):
        assert (out / f"{stem}_{suffix}.png").is_file(), suffix
    index = cv2.imread(str(out / f"{stem}_index.png"), cv2.IMREAD_UNCHANGED)
    assert index.shape == size and index.max() < NUM_CLASSES
    assert cv2.imread(str(out / f"{stem}_mask.png")).shape == (*size, 3)


def test_predict_script_on_an_image_a_folder_and_a_video(run_dir, tmp_path):
    predict = _script("predict")
    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in enumerate([(40, 60), (33, 31)]):
        cv2.imwrite(str(folder / f"im{i}.png"), _rgb(i, size))
    (folder / "notes.txt").write_text("not an image")

    predict.main([str(run_dir), str(folder / "im0.png"), "--out", str(tmp_path / "one"),
                  "--device", "cpu"])
    _check_image_outputs(tmp_path / "one", "im0", (40, 60))

    predict.main([str(run_dir), str(folder), "--out", str(tmp_path / "many"), "--device", "cpu",
                  "--mode", "slide", "--crop", "32", "32", "--flip"])
    _check_image_outputs(tmp_path / "many", "im0", (40, 60))
    _check_image_outputs(tmp_path / "many", "im1", (33, 31))

    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (48, 32))
    assert writer.isOpened()
    for i in range(4):
        writer.write(_rgb(10 + i, (32, 48)))
    writer.release()
    written = predict.main([str(run_dir), str(video), "--out", str(tmp_path / "video"),
                            "--device", "cpu"])
    assert len(written) == 1 and written[0].name.startswith("clip_overlay")
    capture = cv2.VideoCapture(str(written[0]))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    assert len(frames) == 4 and frames[0].shape == (32, 48, 3)


def test_predict_script_explains_unreadable_input(run_dir, tmp_path):
    predict = _script("predict")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(SegexpError, match="cannot read image file"):
        predict.main([str(run_dir), str(broken), "--out", str(tmp_path / "o"), "--device", "cpu"])
    with pytest.raises(SegexpError, match="does not exist"):
        predict.main([str(run_dir), str(tmp_path / "missing.jpg"), "--device", "cpu"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegexpError, match="holds no images"):
        predict.main([str(run_dir), str(tmp_path / "empty"), "--device", "cpu"])
    bad_video = tmp_path / "bad.mp4"
    bad_video.write_bytes(b"\x00" * 100)
    with pytest.raises(SegexpError, match="video"):
        predict.main([str(run_dir), str(bad_video), "--out", str(tmp_path / "o"),
                      "--device", "cpu"])


def test_evaluate_script_slide_tta_and_show_dir(run_dir, tmp_path):
    show = tmp_path / "show"
    _script("evaluate").main([str(run_dir), "--device", "cpu", "--mode", "slide",
                              "--crop", "32", "32", "--stride", "16", "16",
                              "--scales", "1.0", "1.5", "--flip", "--show-dir", str(show)])
    result = json.loads((run_dir / "eval_val_best_slide_tta.json").read_text())
    assert 0.0 <= result["mIoU"] <= 1.0 and result["num_images"] == 4
    assert result["inference"] == {"mode": "slide", "crop": [32, 32], "stride": [16, 16],
                                   "scales": [1.0, 1.5], "flip": True}
    assert sorted(p.name for p in show.glob("*_pred.png")) == [f"{i:05d}_pred.png"
                                                               for i in range(4)]
    assert cv2.imread(str(show / "00000_pred.png")).shape == (32, 32, 3)


def _truncated_jpeg(path, seed: int = 0) -> None:
    ok, data = cv2.imencode(".jpg", _rgb(seed, (64, 64)))
    assert ok
    path.write_bytes(data.tobytes()[: len(data) * 2 // 3])


def test_truncated_jpeg_is_named_not_decoded_grey(tmp_path):
    from segexp.data.base import read_image

    good = tmp_path / "good.jpg"
    ok, data = cv2.imencode(".jpg", _rgb(1, (64, 64)))
    good.write_bytes(data.tobytes() + b"\x00\x00trailing bytes after the end marker")
    assert read_image(good).shape == (64, 64, 3)
    cut = tmp_path / "cut.jpg"
    _truncated_jpeg(cut)
    assert cv2.imread(str(cut)) is not None  # what OpenCV alone does: a half-grey image
    with pytest.raises(SegexpError, match="cut.jpg is truncated"):
        read_image(cut)


def test_predict_on_a_folder_skips_bad_files_and_keeps_the_good_outputs(run_dir, tmp_path):
    predict = _script("predict")
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "a_good.png"), _rgb(2, (40, 60)))
    _truncated_jpeg(folder / "b_cut.jpg")
    (folder / "c_broken.png").write_bytes(b"not a png")
    cv2.imwrite(str(folder / "d_good.png"), _rgb(3, (33, 31)))
    with pytest.raises(SegexpError, match="2 of 4 images could not be read") as info:
        predict.main([str(run_dir), str(folder), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert "b_cut.jpg is truncated" in str(info.value) and "c_broken.png" in str(info.value)
    _check_image_outputs(tmp_path / "out", "a_good", (40, 60))
    _check_image_outputs(tmp_path / "out", "d_good", (33, 31))
