"""model.checkpoint: public layouts convert and give the reference model's logits; keys that do
not fit are reported in one table. Every weights file (resume, model.checkpoint,
backbone.checkpoint) is read without running anything in it, and a bad one is one clear message."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import segmentation as tv_segmentation

from segexp.engine.experiment import run_training
from segexp.errors import ConfigError
from segexp.models import build_model
from tests.conftest import compose_config, randomise_batchnorm, train_py


def torchvision_reference(name: str, num_classes: int = 6):
    torch.manual_seed(0)
    model = getattr(tv_segmentation, name)(weights=None, weights_backbone=None,
                                           num_classes=num_classes, aux_loss=True)
    randomise_batchnorm(model)
    return model.eval()


@pytest.mark.parametrize("name,model", [("fcn_resnet50", "fcn_torchvision"),
                                        ("deeplabv3_resnet50", "deeplabv3_torchvision")])
def test_torchvision_checkpoint_gives_the_same_logits(tmp_path, name, model):
    reference = torchvision_reference(name)
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    ours = build_model(compose_config(f"model={model}", "backbone=resnet50_d8",
                                      f"model.checkpoint={path}")).eval()
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(images)
        logits, aux = ours(images, return_aux=True)
    assert (logits - expected["out"]).abs().max() <= 1e-4
    assert (aux - expected["aux"]).abs().max() <= 1e-4


def test_keys_that_do_not_fit_are_listed_in_one_table(tmp_path):
    path = tmp_path / "fcn.pth"
    torch.save(torchvision_reference("fcn_resnet50").state_dict(), path)
    with pytest.raises(ConfigError) as info:
        build_model(compose_config("model=deeplabv3_torchvision", "backbone=resnet50_d8",
                                   f"model.checkpoint={path}"))
    message = str(info.value)
    assert "read as 'torchvision'" in message and "missing" in message
    assert "decode_head.aspp.bottleneck.0.weight" in message  # a missing head key is named


def test_class_count_mismatch_needs_explicit_reinit(tmp_path):
    path = tmp_path / "fcn21.pth"
    reference = torchvision_reference("fcn_resnet50", num_classes=21)
    torch.save(reference.state_dict(), path)
    overrides = ["model=fcn_torchvision", "backbone=resnet50_d8", f"model.checkpoint={path}"]
    with pytest.raises(ConfigError, match="reinit_classifier=true"):
        build_model(compose_config(*overrides))
    ours = build_model(compose_config(*overrides, "model.reinit_classifier=true"))
    backbone_key = "backbone.body.layer4.2.conv3.weight"
    assert torch.equal(ours.state_dict()[backbone_key],
                       reference.state_dict()["backbone.layer4.2.conv3.weight"])
    assert ours.decode_head.classifier[1].weight.shape[0] == 6


def test_segexp_checkpoint_round_trip_and_unknown_layout(tmp_path):
    cfg = compose_config("model=fcn", "head.channels=16")
    model = build_model(cfg)
    torch.save({"model": model.state_dict(), "state": {}}, tmp_path / "last.pt")
    loaded = build_model(compose_config("model=fcn", "head.channels=16",
                                        f"model.checkpoint={tmp_path / 'last.pt'}"))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "odd.pth")
    with pytest.raises(ConfigError, match="cannot tell which layout"):
        build_model(compose_config("model=fcn", f"model.checkpoint={tmp_path / 'odd.pth'}"))


def test_one_reader_unwraps_every_container_and_refuses_what_is_no_state_dict(tmp_path):
    from segexp.weights_io import read_state_dict

    state = {"w": torch.arange(3.0), "b": torch.zeros(2)}
    for name, content in (("plain.pt", state), ("mmseg.pth", {"state_dict": state, "meta": {}}),
                          ("run.pt", {"model": state, "state": {"iter": 4}}),
                          ("ema.pth", {"state_dict_ema": state})):
        torch.save(content, tmp_path / name)
        read = read_state_dict(tmp_path / name, "model.checkpoint")
        assert set(read) == {"w", "b"} and torch.equal(read["w"], state["w"]), name
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="model.checkpoint=.*list.pt holds a list, not a state dict"):
        read_state_dict(tmp_path / "list.pt", "model.checkpoint")
    with pytest.raises(ConfigError, match="no such file. Point it at a file of X"):
        read_state_dict(tmp_path / "nope.pt", "backbone.checkpoint", expected="a file of X")


def test_one_loader_names_every_misfit_and_leaves_the_model_untouched():
    from segexp.weights_io import load_weights_into

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    state["0.weight"] = torch.ones(5, 3, 1, 1)  # shape mismatch
    state["2.weight"] = torch.ones(1)  # unexpected
    del state["1.bias"]  # missing
    with pytest.raises(ConfigError) as info:
        load_weights_into(model, state, option="resume", path="last.pt", target="this model",
                          remedy="Do this.")
    message = str(info.value)
    first = message.splitlines()[0]
    assert first.startswith("resume=last.pt does not fit this model: missing 1.bias; unexpected "
                            "2.weight; shape mismatch 0.weight; 3 key(s)")
    assert "(5, 3, 1, 1) vs model (4, 3, 1, 1)" in message and message.endswith("Do this.")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    # A classifier with another class count: refused with the remedy, or kept fresh on request.
    state = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    state["0.weight"], state["0.bias"] = torch.ones(6, 3, 1, 1), torch.ones(6)
    with pytest.raises(ConfigError, match="reinit_classifier=true"):
        load_weights_into(model, state, option="model.checkpoint", path="x.pth", num_classes=4)
    fit = load_weights_into(model, state, option="model.checkpoint", path="x.pth", num_classes=4,
                            reinit_classifier=True)
    assert fit.reinitialised == ["0.weight", "0.bias"]
    assert torch.equal(model.state_dict()["1.weight"], torch.ones(4))
    assert torch.equal(model.state_dict()["0.bias"], before["0.bias"])


class _RunsCode:
    def __reduce__(self):  # unpickling this would create the marker file
        import os

        return (os.system, ("touch SEGEXP_PWNED",))


def test_weights_files_are_refused_clearly_and_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = tmp_path / "code.pt"
    torch.save({"model": _RunsCode()}, code)
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:200])
    common = ["trainer=debug", "model=fcn", "head.channels=8", "dataset.image_size=32"]
    for option in ("resume", "model.checkpoint", "backbone.checkpoint"):
        cases = [(code, "holds Python objects or code"), (cut, "damaged or incomplete")]
        if option != "resume":  # resume=<folder> means a run folder, looked into for its last.pt
            cases.append((tmp_path, "is a folder"))
        for path, expected in cases:
            with pytest.raises(ConfigError, match=expected):
                run_training(compose_config(*common, f"{option}={path}"), tmp_path / "run")
    # Through train.py (and Hydra's instantiation wrapper): one line, no traceback.
    out = train_py(*common, f"backbone.checkpoint={code}", f"hydra.run.dir={tmp_path / 'run'}",
                   cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("segexp: error: backbone.checkpoint")
    assert not (tmp_path / "SEGEXP_PWNED").exists()
