"""CCNet, FastFCN (JPU), Lite-HRNet, UPerNet on Swin, ConvNeXt/Swin extras (output norms, layer
decay ids): forward/backward, reference computations, parameter counts against the papers, and a
debug training run each.

Published parameter counts used here:
* UPerNet + Swin-T / S / B: 60 M / 81 M / 121 M (Liu et al., "Swin Transformer", ICCV 2021,
  Table 3, ADE20K, 150 classes).
* UPerNet + ConvNeXt-T / B: 60 M / 122 M (Liu et al., "A ConvNet for the 2020s", CVPR 2022,
  Table 4, ADE20K).
* Lite-HRNet-18 / 30: 1.1 M / 1.8 M, 0.20 / 0.31 GFLOPs at 256x192 (Yu et al., "Lite-HRNet",
  CVPR 2021, Table 1; HRNet/Lite-HRNet README): the backbone with its IterativeHead and the 1x1
  keypoint conv (17 joints), a figure given to 0.1 M.
CCNet and FastFCN publish no parameter counts; their modules are checked against the counts their
MMCV/MMSegmentation definitions imply instead.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from segexp.backbones import TimmBackbone
from segexp.backbones.litehrnet import LiteHRModule, LiteHRNet
from segexp.engine.experiment import run_training
from segexp.errors import ConfigError, IncompatibleBackboneError
from segexp.heads.ccnet import CCHead, CrissCrossAttention
from segexp.heads.jpu import JPU
from segexp.heads.litehrnet import IterativeAggregator, LiteHRNetHead
from segexp.models import build_model
from segexp.optim import build_optimizer
from tests.conftest import compose_config
from tests.models.conftest import n_params


def meta_model(*overrides: str):
    with torch.device("meta"):
        return build_model(compose_config(*overrides))


SMALL = {  # small heads so every forward/backward is quick
    "ccnet": ["head.channels=32", "model.aux_head.channels=16"],
    "fastfcn": ["model.neck.mid_channels=16", "head.channels=16", "model.aux_head.channels=16"],
    "litehrnet": [],
    "upernet": ["head.channels=32", "model.aux_head.channels=16"],
}


def small_model(model: str, backbone: str, *extra: str):
    return build_model(compose_config(f"model={model}", f"backbone={backbone}", *SMALL[model],
                                      *extra))


# --- CCNet ------------------------------------------------------------------------------------

def brute_force_cca(cca: CrissCrossAttention, x: torch.Tensor) -> torch.Tensor:
    """For every pixel, one softmax over its column (without itself) and its whole row."""
    q, k, v = cca.query_conv(x), cca.key_conv(x), cca.value_conv(x)
    batch, _, height, width = x.shape
    out = torch.empty_like(x)
    for b in range(batch):
        for h in range(height):
            for w in range(width):
                positions = [(i, w) for i in range(height) if i != h] + \
                            [(h, j) for j in range(width)]
                logits = torch.stack([q[b, :, h, w] @ k[b, :, i, j] for i, j in positions])
                weights = torch.softmax(logits, dim=0)
                values = torch.stack([v[b, :, i, j] for i, j in positions])
                out[b, :, h, w] = cca.gamma * (weights[:, None] * values).sum(0) + x[b, :, h, w]
    return out


def test_criss_cross_attention_matches_brute_force():
    torch.manual_seed(0)
    cca = CrissCrossAttention(16).double()
    x = torch.randn(2, 16, 3, 4, dtype=torch.float64)
    assert torch.equal(cca(x), x)  # gamma starts at 0: the module starts as the identity
    with torch.no_grad():
        cca.gamma.fill_(0.7)
    torch.testing.assert_close(cca(x), brute_force_cca(cca, x))


def test_criss_cross_attention_has_mmcv_parameters():
    cca = CrissCrossAttention(512)
    assert (cca.query_conv.out_channels, cca.value_conv.out_channels) == (64, 512)
    # query + key 1x1 (512 -> 64, bias), value 1x1 (512 -> 512, bias), gamma
    assert n_params(cca) == 2 * (512 * 64 + 64) + 512 * 512 + 512 + 1


def test_ccnet_head_applies_cca_recurrence_times_between_its_convs():
    head = CCHead([64, 128], [4, 8], 5, channels=32)
    calls = []
    head.cca.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    logits = head([torch.randn(2, 64, 8, 8), torch.randn(2, 128, 4, 4)])
    assert logits.shape == (2, 5, 4, 4) and len(calls) == 2
    assert calls[0][1] == 32  # after the first conv, before the second
    assert len(head.convs) == 2 and head.conv_cat is not None  # MMSeg CCHead: FCN, concat input


# --- FastFCN ----------------------------------------------------------------------------------

def test_jpu_on_resnet50_gives_2048_channels_at_stride_8():
    net = meta_model("model=fastfcn", "backbone=resnet50")
    assert net.backbone.reductions == [2, 4, 8, 16, 32]
    assert net.neck.channels == [64, 256, 512, 1024, 2048]
    assert net.neck.reductions == [2, 4, 8, 16, 8]
    # The PSP head reads the JPU output, the auxiliary head layer3 (1024 at stride 16).
    assert net.decode_head.ppm.branches[0][1][0].in_channels == 2048
    assert net.aux_head.convs[0][0].in_channels == 1024
    # MMSeg's JPU: 3x3 ConvBNReLU per input, 4 x (depthwise 3x3 + BN, pointwise 1x1 + BN)
    convs = sum(9 * c * 512 + 2 * 512 for c in (512, 1024, 2048))
    separable = 4 * (9 * 1536 + 2 * 1536 + 1536 * 512 + 2 * 512)
    assert n_params(net.neck) == convs + separable


def test_fastfcn_forward_backward():
    net = small_model("fastfcn", "resnet18")
    images = torch.randn(2, 3, 64, 96)
    features = net.neck(net.backbone(images))
    assert features[-1].shape == (2, 4 * 16, 8, 12)  # 4 dilations x mid_channels at stride 8
    assert features[-2].shape == (2, 256, 4, 6)  # the backbone's stride-16 map, for the aux head
    logits, aux = net(images, return_aux=True)
    assert logits.shape == aux.shape == (2, 6, 64, 96)
    (logits.mean() + aux.mean()).backward()
    assert all(p.grad is not None for p in net.neck.parameters())


@pytest.mark.parametrize("head", ["deeplabv3", "fcn"])
def test_fastfcn_takes_the_other_heads(head):
    net = small_model("fastfcn", "resnet18", f"head={head}").eval()
    if head == "deeplabv3":
        assert net.decode_head.dilations == (1, 12, 24, 36)  # stride 8, as MMSeg's _aspp config
    with torch.no_grad():
        assert net(torch.randn(1, 3, 32, 64)).shape == (1, 6, 32, 64)


def test_jpu_refuses_a_dilated_backbone_and_names_what_fits():
    with pytest.raises(IncompatibleBackboneError, match="backbone=resnet50"):
        meta_model("model=fastfcn", "backbone=resnet50_d8")
    with pytest.raises(IncompatibleBackboneError, match="at least 3 feature maps"):
        JPU([512], [32])


# --- Lite-HRNet -------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, channels, reductions", [
    ("18", [40, 80, 160, 320], [4, 8, 16, 32]),
    ("30", [40, 80, 160, 320], [4, 8, 16, 32]),
    ("s", [60, 120, 240], [8, 16, 32]),
])
def test_litehrnet_forward_backward(variant, channels, reductions):
    net = small_model("litehrnet", f"litehrnet_{variant}")
    assert net.backbone.channels == channels and net.backbone.reductions == reductions
    assert net.size_divisor == 32
    images = torch.randn(2, 3, 32, 64)
    features = net.backbone(images)
    assert [f.shape[1] for f in features] == channels
    assert [64 // f.shape[3] for f in features] == reductions
    assert net.decode_head(features).shape[-2:] == features[0].shape[-2:]
    logits = net(images)
    assert logits.shape == (2, 6, 32, 64)
    logits.mean().backward()
    assert net.backbone.stem.conv1.conv.weight.grad is not None
    assert all(p.grad is not None for p in net.decode_head.parameters())


@pytest.mark.parametrize("variant, modules", [("18", (2, 4, 2)), ("30", (3, 8, 3)), ("s", (4, 4))])
def test_litehrnet_stage_settings(variant, modules):
    with torch.device("meta"):
        backbone = LiteHRNet(variant)
    assert tuple(len(getattr(backbone, f"stage{i}")) for i in range(len(modules))) == modules
    assert all(len(module.layers) == 2 for i in range(len(modules))  # num_blocks 2
               for module in getattr(backbone, f"stage{i}"))


@pytest.mark.parametrize("variant, published_m", [("18", 1.1), ("30", 1.8)])
def test_litehrnet_parameters_match_the_paper(variant, published_m):
    with torch.device("meta"):
        backbone = LiteHRNet(variant)
        iterative_head = IterativeAggregator(backbone.channels)  # the official IterativeHead
    keypoint_conv = backbone.channels[0] * 17 + 17
    count = n_params(backbone) + n_params(iterative_head) + keypoint_conv
    assert round(count / 1e6, 1) == published_m  # published to 0.1 M (18: 1.131 M, 30: 1.764 M)


def test_litehrnet_18_flops_match_the_paper():
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), FlopCounterMode(display=False) as counter:  # shapes only
        backbone = LiteHRNet("18")
        IterativeAggregator(backbone.channels)(backbone(torch.empty(1, 3, 256, 192)))
    assert round(counter.get_total_flops() / 2e9, 2) == 0.20  # multiply-adds, as the paper


def test_litehrnet_reference_fusion_matches_the_official_in_place_loop():
    torch.manual_seed(0)
    module = LiteHRModule([8, 16, 32], num_blocks=1, reduce_ratio=8).eval()
    x = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)]
    with torch.no_grad():
        out = module.layers([t.clone() for t in x])
        expected = []  # HRNet/Lite-HRNet LiteHRModule.forward, verbatim apart from upsampling
        for i in range(3):
            y = out[0] if i == 0 else module.fuse_layers[i][0](out[0])
            for j in range(3):
                if i == j:
                    y += out[j]
                elif j > i:
                    y += nn.functional.interpolate(module.fuse_layers[i][j](out[j]),
                                                   scale_factor=2 ** (j - i), mode="nearest")
                else:
                    y += module.fuse_layers[i][j](out[j])
            expected.append(module.relu(y))
        got = module([t.clone() for t in x])
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    module.fuse_mode = "hrnet"
    with torch.no_grad():
        assert not torch.allclose(module(x)[0], got[0])  # each branch once: a different sum


def test_litehrnet_head_is_otx_aggregator_plus_1x1_fcn():
    head = LiteHRNetHead([40, 80, 160, 320], [4, 8, 16, 32], 3)
    projects = [(p[0].in_channels, p[2].out_channels) for p in head.aggregator.projects]
    assert projects == [(320, 160), (160, 80), (80, 40), (40, 40)]  # deep to fine
    assert head.channels == 40 and head.conv[0].kernel_size == (1, 1)
    assert not any(isinstance(m, nn.ReLU) for m in head.conv)  # OTX drops the last activation
    with pytest.raises(ConfigError, match="unknown variant"):
        LiteHRNet("99")


# --- Swin / ConvNeXt --------------------------------------------------------------------------

def test_upernet_swin_tiny_forward_backward():
    net = small_model("upernet", "swin_tiny")
    assert net.backbone.channels == [96, 192, 384, 768]
    assert net.backbone.reductions == [4, 8, 16, 32] and net.size_divisor == 32
    images = torch.randn(2, 3, 32, 64)
    features = net.backbone(images)
    assert [tuple(f.shape[1:]) for f in features] == [(96, 8, 16), (192, 4, 8), (384, 2, 4),
                                                      (768, 1, 2)]  # NCHW, not timm's NHWC
    logits, aux = net(images, return_aux=True)
    assert logits.shape == aux.shape == (2, 6, 32, 64)
    (logits.mean() + aux.mean()).backward()
    assert net.backbone.body.patch_embed.proj.weight.grad is not None


def test_swin_takes_a_512_crop():
    net = meta_model("model=upernet", "backbone=swin_tiny")
    net.check_input_size(512, 512)
    with torch.device("meta"):  # shapes only: the window padding and masks for 512x512
        features = net.backbone(torch.empty(1, 3, 512, 512))
    assert [f.shape[-1] for f in features] == [128, 64, 32, 16]  # none a multiple of window 7


def test_swin_shifted_windows_pad_before_the_shift():
    backbone = TimmBackbone("swin_tiny_patch4_window7_224", strict_img_size=False,
                            always_partition=True, embed_dim=16, num_heads=(1, 1, 1, 1))
    block = backbone.body.layers_0.blocks[1]
    assert tuple(block.window_size) == (7, 7) and tuple(block.shift_size) == (3, 3)
    x = torch.randn(1, 8, 8, 16, requires_grad=True)  # an 8x8 map: padded to 14x14 windows
    block(x)[0, 0, 0].sum().backward()
    depends_on = x.grad.abs().sum(-1)[0] > 0
    # Padded first, shifted by 3: pixel (0, 0) shares its sub-window with rows/cols 0..2 only,
    # never with the opposite border (timm's shift-then-pad order mixes rows 0 and 7).
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:3, :3] = True
    assert torch.equal(depends_on, expected)


@pytest.mark.parametrize("backbone, published_m", [
    ("swin_tiny", 60), ("swin_small", 81), ("swin_base", 121),  # Swin paper, Table 3
    ("convnext_tiny", 60), ("convnext_base", 122),              # ConvNeXt paper, Table 4
])
def test_upernet_parameters_match_the_papers(backbone, published_m):
    net = meta_model("model=upernet", f"backbone={backbone}", "model.num_classes=150")
    assert n_params(net) == pytest.approx(published_m * 1e6, rel=0.02)


@pytest.mark.parametrize("backbone, eps", [("convnext_tiny", 1e-6), ("swin_tiny", 1e-5)])
def test_out_norms_on_every_map(backbone, eps):
    net = meta_model("model=upernet", f"backbone={backbone}")
    norms = net.backbone.out_norms
    assert norms is not None and [n.normalized_shape[0] for n in norms] == net.backbone.channels
    assert all(n.eps == eps for n in norms)
    plain = TimmBackbone("convnext_atto", out_norms=False)
    assert plain.out_norms is None
    normed = TimmBackbone("convnext_atto", out_norms=True)
    normed.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(normed(x), plain(x), strict=True):
            mean = a.mean(dim=1)  # channels-first LayerNorm: zero mean over channels per pixel
            assert mean.abs().max() < 1e-4 and not torch.allclose(a, b)


def test_convnext_stage_wise_layer_ids_follow_mmsegmentation():
    with torch.device("meta"):
        backbone = TimmBackbone("convnext_tiny", out_norms=True, lr_decay_num_layers=6)
        layer_wise = TimmBackbone("convnext_tiny", lr_decay_type="layer_wise",
                                  lr_decay_num_layers=12)
    assert backbone.num_layers == 8  # MMSeg: num_layers 6 + 2
    names = {name for name, _ in backbone.named_parameters()}
    expected = {"body.stem_0.weight": 0, "body.stem_1.bias": 0,
                "body.stages_0.blocks.0.conv_dw.weight": 1,
                "body.stages_1.downsample.1.weight": 0,  # MMSeg's downsample_layers -> 0
                "body.stages_2.blocks.8.mlp.fc1.weight": 3,
                "body.stages_3.blocks.2.gamma": 4, "out_norms.3.weight": 7}
    assert set(expected) <= names  # the real timm features_only names
    assert {name: backbone.layer_id(name) for name in expected} == expected
    assert backbone.layer_id("backbone.body.stages_3.blocks.0.norm.weight") == 4
    assert layer_wise.num_layers == 14
    assert [layer_wise.layer_id(n) for n in (
        "body.stem_0.weight", "body.stages_0.blocks.1.gamma", "body.stages_1.downsample.1.weight",
        "body.stages_2.blocks.7.gamma", "body.stages_3.blocks.0.gamma", "other.weight")] \
        == [0, 1, 2, 5, 12, 13]


def test_swin_layer_ids_one_per_block():
    with torch.device("meta"):
        backbone = TimmBackbone("swin_tiny_patch4_window7_224", strict_img_size=False)
    assert backbone.num_layers == 2 + 2 + 6 + 2 + 2
    assert [backbone.layer_id(n) for n in (
        "body.patch_embed.proj.weight", "body.layers_0.blocks.1.attn.qkv.weight",
        "body.layers_1.downsample.reduction.weight", "body.layers_2.blocks.5.mlp.fc2.bias",
        "body.layers_3.blocks.1.norm1.weight", "out_norms.0.weight")] == [0, 2, 2, 10, 12, 13]


def test_layer_decay_reaches_the_optimizer():
    net = meta_model("model=upernet", "backbone=convnext_tiny")
    opt = build_optimizer(net, type="torch.optim.AdamW", lr=1.0, weight_decay=0.05,
                          layer_decay=0.9)
    lr_of = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lr_of["backbone_layer0"] == pytest.approx(0.9 ** 7)
    assert lr_of["backbone_layer4"] == pytest.approx(0.9 ** 3)  # stage 4 of ConvNeXt-T
    assert lr_of["backbone_layer7_no_decay"] == pytest.approx(1.0)  # the output norms
    assert lr_of["head"] == pytest.approx(1.0)
    resnet = meta_model("model=upernet", "backbone=resnet18")
    with pytest.raises(ConfigError, match="layer_decay"):
        build_optimizer(resnet, lr=1.0, layer_decay=0.9)


@pytest.mark.parametrize("model", ["ccnet", "fastfcn", "litehrnet"])
def test_new_heads_run_on_convnext(model):
    net = small_model(model, "convnext_tiny", "backbone.name=convnext_atto")
    logits = net(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 6, 64, 64)
    logits.mean().backward()


# --- debug training runs ----------------------------------------------------------------------

@pytest.mark.parametrize("model, backbone", [
    ("ccnet", "resnet18_d8"), ("fastfcn", "resnet18"), ("litehrnet", "litehrnet_18"),
    ("upernet", "swin_tiny"),
])
def test_debug_run(tmp_path, model, backbone):
    cfg = compose_config(f"model={model}", f"backbone={backbone}", "trainer=debug",
                         *SMALL[model], "dataset.image_size=32", "dataset.train_length=4",
                         "dataset.val_length=1", "dataset.crop_size=[32,32]",
                         "dataset.base_size=[32,32]", "trainer.num_vis_images=0")
    best = run_training(cfg, tmp_path)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["iters"] == 2
    assert 0.0 <= best <= 1.0
