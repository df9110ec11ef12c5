"""Config composition: every model with every CNN backbone, head selection, help and errors."""

from __future__ import annotations

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from tests.conftest import ALL_MODELS, CONF, compose_config, train_py

MODELS = ["fcn", "unet", "pspnet", "deeplabv3", "deeplabv3plus", "upernet"]
# Family names (backbone=convnext...) are their sized files: test_family_name_picks_its_default_size.
FAMILIES = {"convnext": "convnext_tiny", "resnet": "resnet50", "swin": "swin_tiny",
            "mit": "mit_b0", "vit": "vit_base"}
CNN_BACKBONES = sorted(p.stem for p in (CONF / "backbone").glob("*.yaml") if p.stem not in FAMILIES)
WITH_AUX = {"pspnet", "deeplabv3", "deeplabv3plus", "upernet"}


@pytest.mark.parametrize("backbone", CNN_BACKBONES)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_composes_with_every_cnn_backbone(model, backbone):
    cfg = compose_config(f"model={model}", f"backbone={backbone}")
    head_file = OmegaConf.load(CONF / "head" / f"{model}.yaml")
    assert cfg.head._target_ == head_file._target_  # model=X picks head X
    assert cfg.backbone._target_.startswith("segexp.backbones.")
    assert cfg.model.num_classes == cfg.dataset.num_classes
    assert (cfg.model.get("aux_head") is not None) == (model in WITH_AUX)
    if model in WITH_AUX:
        assert cfg.model.aux_head.in_index == -2 and cfg.model.aux_weight == 0.4
    OmegaConf.resolve(cfg)  # every interpolation resolves


def test_head_override_beats_the_model_default():
    cfg = compose_config("model=pspnet", "head=upernet")
    assert cfg.head._target_.endswith("UPerHead")
    assert cfg.model.aux_head._target_.endswith("FCNHead")


def test_unknown_option_lists_the_choices():
    with pytest.raises(MissingConfigException) as info:
        compose_config("model=nosuchmodel")
    message = str(info.value)
    assert "nosuchmodel" in message and "upernet" in message and "pspnet" in message


def test_debug_trainer_shrinks_the_run():
    cfg = compose_config("trainer=debug")
    assert cfg.trainer.max_iters == 2 and cfg.trainer.max_val_batches == 1
    assert list(cfg.dataset.crop_size) == [64, 64]


def test_dataset_root_defaults_under_segexp_data(monkeypatch):
    monkeypatch.setenv("SEGEXP_DATA", "/data/somewhere")
    cfg = compose_config("dataset=stanford_background")
    assert cfg.dataset.root.startswith("/data/somewhere/")


def test_dataset_configs_compose(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGEXP_DATA", str(tmp_path))
    expected = {"voc": ("voc/VOCdevkit/VOC2012", 21, [512, 512], [512, 2048]),
                "voc_aug": ("voc/VOCdevkit/VOC2012", 21, [512, 512], [512, 2048]),
                "camvid": ("camvid/CamVid", 11, [352, 480], [360, 480]),
                "kitti": ("kitti/data_semantics", 19, [352, 704], [375, 1242])}
    for name, (root, classes, crop, base) in expected.items():
        cfg = compose_config(f"dataset={name}")
        assert cfg.dataset.root == str(tmp_path / root) and cfg.dataset.num_classes == classes
        assert list(cfg.dataset.crop_size) == crop and list(cfg.dataset.base_size) == base
        assert all(side % 32 == 0 for side in crop)
    assert compose_config("dataset=voc").dataset.train_split == "train"
    assert compose_config("dataset=voc_aug").dataset.train_split == "train_aug"


def test_help_lists_groups_and_options():
    out = train_py("--help")
    assert out.returncode == 0, out.stderr
    for text in ("model:", "backbone:", "dataset:", "trainer:", "upernet", "convnext_tiny",
                 "stanford_background", "debug"):
        assert text in out.stdout, text


def test_cfg_job_prints_the_composed_config():
    out = train_py("--cfg", "job", "model=upernet", "backbone=convnext_tiny")
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.backbone.name == "convnext_tiny" and cfg.head._target_.endswith("UPerHead")


@pytest.mark.parametrize("family, size", sorted(FAMILIES.items()))
def test_family_name_picks_its_default_size(family, size, tmp_path):
    from segexp.cli.train import hydra_launch
    from segexp.engine.experiment import run_info

    model = "setr" if family == "vit" else "upernet"  # a plain ViT needs a ViT head
    cfg = compose_config(f"model={model}", f"backbone={family}")
    sized = compose_config(f"model={model}", f"backbone={size}")
    assert OmegaConf.to_container(cfg.backbone) == OmegaConf.to_container(sized.backbone)
    # Run names and tags say the size, not the family.
    assert cfg.name == f"{model}_{size}_synthetic" and cfg.default_backbone == size
    assert f"backbone:{size}" in run_info(cfg, tmp_path, hydra_launch()).tags
    # The sized file's options override as on the sized option itself.
    cfg = compose_config(f"model={model}", f"backbone={family}", "backbone.pretrained=false",
                         "backbone.checkpoint=/weights/x.pth")
    assert cfg.backbone.pretrained is False and cfg.backbone.checkpoint == "/weights/x.pth"


def test_the_brief_command_composes():
    """python train.py model=upernet backbone=convnext dataset=cityscapes (no data is read)."""
    out = train_py("--cfg", "job", "model=upernet", "backbone=convnext", "dataset=cityscapes")
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.backbone.name == "convnext_tiny" and cfg.head._target_.endswith("UPerHead")
    assert cfg.dataset._target_.endswith("CityscapesDataset") and cfg.model.num_classes == 19
    assert cfg.backbone.out_norms is True  # the sized file whole, not a copy of part of it


SHARED_KEYS = OmegaConf.load(CONF / "model" / "shared" / "keys.yaml")


@pytest.mark.parametrize("model", ALL_MODELS)
def test_every_model_config_builds_on_the_shared_keys(model):
    own = OmegaConf.load(CONF / "model" / f"{model}.yaml")
    assert own.defaults[0] == "shared/keys@_here_" and own.defaults[-1] == "_self_"
    cfg = compose_config(f"model={model}")
    assert cfg.model._target_ in ("segexp.models.Segmentor", "segexp.models.eomt.EoMT")
    assert cfg.model.num_classes == cfg.dataset.num_classes
    for key in ("align_corners", "checkpoint", "checkpoint_format", "reinit_classifier"):
        assert cfg.model[key] == SHARED_KEYS[key], key
    # A model file states only what differs from the shared keys (restating the checkpoint keys
    # is allowed: there a model documents which weight files it reads).
    restated = {k for k in own if k in SHARED_KEYS and own[k] == SHARED_KEYS[k]}
    assert restated <= {"checkpoint", "checkpoint_format"}, restated


def test_shared_keys_are_no_model_option():
    assert "shared" not in ALL_MODELS and "keys" not in ALL_MODELS
    with pytest.raises(MissingConfigException):
        compose_config("model=keys")


def test_run_name_and_tags_name_an_overridden_head(tmp_path):
    from segexp.cli.train import hydra_launch
    from segexp.engine.experiment import run_info

    base = ("model=setr", "backbone=vit_base", "dataset=stanford_background")
    cfg = compose_config(*base)
    assert cfg.name == "setr_vit_base_stanford_background"
    assert not [t for t in run_info(cfg, tmp_path, hydra_launch()).tags if t.startswith("head:")]
    cfg = compose_config(*base, "head=setr_mla")
    assert cfg.name == "setr-setr_mla_vit_base_stanford_background"
    assert run_info(cfg, tmp_path, hydra_launch()).tags == [
        "model:setr", "head:setr_mla", "backbone:vit_base", "dataset:stanford_background"]
    assert compose_config("model=pspnet", "head=pspnet").name == "pspnet_resnet18_synthetic"
