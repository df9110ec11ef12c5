"""Decode heads and the U-Net encoder: shapes, gradients, configs, paper settings, errors."""

from __future__ import annotations

import hydra.utils
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from segexp.backbones import TimmBackbone, UNetEncoder
from segexp.errors import IncompatibleBackboneError
from segexp.heads.aspp import ASPPHead
from segexp.heads.deeplabv3plus import DeepLabV3PlusHead
from segexp.heads.fcn import FCNHead
from segexp.heads.psp import PSPHead
from segexp.heads.unet import UNetHead
from segexp.heads.upernet import UPerHead
from segexp.models import build_model
from tests.conftest import CONF, compose_config

HEAD_CONF = CONF / "head"
NUM_CLASSES = 5
SIZE = 64


class FakeBackbone(nn.Module):
    """Strided 1x1-conv pyramid honouring the backbone contract (channels, reductions)."""

    def __init__(self, channels, reductions):
        super().__init__()
        self.channels, self.reductions = list(channels), list(reductions)
        self.size_divisor = max(reductions)
        self.projs = nn.ModuleList(nn.Conv2d(3, c, 1) for c in channels)

    def forward(self, x):
        return [proj(nn.functional.avg_pool2d(x, r)) if r > 1 else proj(x)
                for proj, r in zip(self.projs, self.reductions, strict=True)]


def resnet_like():  # 5 maps as timm ResNet
    return FakeBackbone([8, 16, 32, 64, 128], [2, 4, 8, 16, 32])


def resnet_d8_like():  # output_stride=8: the last stages keep reduction 8
    return FakeBackbone([8, 16, 32, 64, 128], [2, 4, 8, 8, 8])


def convnext_like():  # 4 maps as timm ConvNeXt
    return FakeBackbone([12, 24, 48, 96], [4, 8, 16, 32])


def build(head_cls, backbone, **kwargs):
    return head_cls(backbone.channels, backbone.reductions, NUM_CLASSES, **kwargs)


SMALL = {"channels": 16}
# (head class, kwargs, expected output reduction) per backbone flavour.
CASES = [
    ("fcn", FCNHead, SMALL, resnet_like, 32),
    ("fcn_d8", FCNHead, SMALL, resnet_d8_like, 8),
    ("fcn_aux", FCNHead, {"in_index": -2, "channels": 8, "num_convs": 1, "concat_input": False},
     resnet_like, 16),
    ("psp", PSPHead, SMALL, resnet_d8_like, 8),
    ("aspp", ASPPHead, SMALL, resnet_d8_like, 8),
    ("aspp_convnext", ASPPHead, SMALL, convnext_like, 32),
    ("dlv3plus", DeepLabV3PlusHead, SMALL, resnet_d8_like, 4),
    ("dlv3plus_convnext", DeepLabV3PlusHead, SMALL, convnext_like, 4),
    ("upernet_resnet", UPerHead, SMALL, resnet_like, 4),
    ("upernet_convnext", UPerHead, SMALL, convnext_like, 4),
    ("unet_resnet", UNetHead, {"decoder_channels": [16, 16, 8, 8]}, resnet_like, 2),
    ("unet_resnet_d8", UNetHead, {"decoder_channels": [16, 16, 8, 8]}, resnet_d8_like, 2),
    ("unet_convnext_bilinear", UNetHead, {"upsample": "bilinear"}, convnext_like, 4),
    ("unet_resnet_full_resolution", UNetHead,
     {"decoder_channels": [16, 16, 8, 8], "full_resolution": True}, resnet_like, 1),
    ("unet_convnext_bilinear_full_resolution", UNetHead,
     {"upsample": "bilinear", "full_resolution": True}, convnext_like, 1),
]


@pytest.mark.parametrize("name,head_cls,kwargs,make_backbone,reduction", CASES,
                         ids=[c[0] for c in CASES])
def test_head_forward_backward(name, head_cls, kwargs, make_backbone, reduction):
    torch.manual_seed(0)
    backbone = make_backbone()
    head = build(head_cls, backbone, **kwargs)
    images = torch.randn(2, 3, SIZE, SIZE)  # batch 2: BN on 1x1 pooled maps needs > 1 value
    logits = head(backbone(images))
    assert logits.shape == (2, NUM_CLASSES, SIZE // reduction, SIZE // reduction)
    assert head.reduction == reduction
    logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters()), \
        f"{name}: a head parameter got no gradient"
    # Exactly the backbone maps the head reads receive gradient.
    used = {head.in_index} if isinstance(head.in_index, int) else set(head.in_index)
    used |= {head.c1_index} if hasattr(head, "c1_index") else set()
    got = {i for i, proj in enumerate(backbone.projs) if proj.weight.grad is not None}
    assert got == used


@pytest.mark.parametrize("file,expected_cls,reduction", [
    ("fcn.yaml", FCNHead, 8), ("fcn_aux.yaml", FCNHead, 8), ("pspnet.yaml", PSPHead, 8),
    ("deeplabv3.yaml", ASPPHead, 8), ("deeplabv3plus.yaml", DeepLabV3PlusHead, 4),
    ("upernet.yaml", UPerHead, 4), ("unet.yaml", UNetHead, 4),  # unet: the four deepest maps
])
def test_head_yaml_instantiates(file, expected_cls, reduction):
    path = HEAD_CONF / file
    backbone = resnet_d8_like()
    factory = hydra.utils.instantiate(OmegaConf.load(path))
    head = factory(in_channels=backbone.channels, in_reductions=backbone.reductions,
                   num_classes=NUM_CLASSES)
    assert type(head) is expected_cls
    head.eval()
    with torch.no_grad():
        out = head(backbone(torch.randn(1, 3, 32, 32)))
    assert out.shape == (1, NUM_CLASSES, 32 // reduction, 32 // reduction)


def test_yaml_defaults_follow_mmsegmentation():
    fcn = OmegaConf.load(HEAD_CONF / "fcn.yaml")
    assert (fcn.in_index, fcn.channels, fcn.num_convs, fcn.concat_input) == (-1, 512, 2, True)
    up = OmegaConf.load(HEAD_CONF / "upernet.yaml")
    assert list(up.in_index) == [-4, -3, -2, -1] and list(up.pool_scales) == [1, 2, 3, 6]
    assert OmegaConf.load(HEAD_CONF / "deeplabv3plus.yaml").c1_channels == 48
    assert OmegaConf.load(HEAD_CONF / "pspnet.yaml").channels == 512


def _atrous_dilations(head):
    """Dilations of the ASPP branches as read from the conv layers themselves."""
    rates = []
    for branch in head.aspp.branches:
        convs = [m for m in branch.modules() if isinstance(m, nn.Conv2d)]
        rates.append(convs[0].dilation[0] if convs[0].kernel_size == (3, 3) else 1)
    return tuple(rates)


@pytest.mark.parametrize("reductions,expected", [
    ([2, 4, 8, 8, 8], (1, 12, 24, 36)),
    ([2, 4, 8, 16, 16], (1, 6, 12, 18)),
    ([2, 4, 8, 16, 32], (1, 3, 6, 9)),
])
def test_aspp_rates_follow_output_stride(reductions, expected):
    channels = [8, 16, 32, 64, 128]
    head = ASPPHead(channels, reductions, NUM_CLASSES, channels=8)
    assert _atrous_dilations(head) == expected
    # The 3x3 atrous convs are padded by their rate so the map size is kept.
    conv = head.aspp.branches[-1][0]
    assert conv.padding == (expected[-1], expected[-1])
    plus = DeepLabV3PlusHead(channels, reductions, NUM_CLASSES, channels=8)
    assert _atrous_dilations(plus) == expected
    # DeepLabV3+'s atrous branches are depthwise separable: a depthwise conv then a 1x1.
    dw = plus.aspp.branches[1][0][0]
    assert dw.groups == dw.in_channels == 128 and dw.dilation == (expected[1],) * 2


def test_aspp_explicit_dilations_override():
    head = ASPPHead([8, 16], [4, 8], NUM_CLASSES, channels=8, dilations=[1, 2, 4])
    assert _atrous_dilations(head) == (1, 2, 4)
    assert len(head.aspp.branches) == 3


def test_aspp_unknown_reduction_asks_for_dilations():
    with pytest.raises(IncompatibleBackboneError, match=r"reduction 4.*dilations"):
        ASPPHead([8, 16], [2, 4], NUM_CLASSES, channels=8)


def test_pool_scales_present():
    backbone = convnext_like()
    for head in (build(PSPHead, backbone, **SMALL), build(UPerHead, backbone, **SMALL)):
        pools = [m.output_size for m in head.ppm.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
        assert pools == [1, 2, 3, 6]
    psp = build(PSPHead, backbone, channels=16, pool_scales=[1, 4])
    assert [b[0].output_size for b in psp.ppm.branches] == [1, 4]
    # Bottleneck input = deepest map + one `channels` slice per pooling branch.
    assert psp.bottleneck[0].in_channels == 96 + 2 * 16


def test_upernet_needs_four_maps():
    with pytest.raises(IncompatibleBackboneError) as err:
        UPerHead([32, 64, 128], [8, 16, 32], NUM_CLASSES, channels=8)
    msg = str(err.value)
    assert "UPerHead" in msg and "at least 4 feature maps" in msg
    assert "[32, 64, 128]" in msg and "[8, 16, 32]" in msg


def test_deeplabv3plus_needs_reduction_4_map():
    with pytest.raises(IncompatibleBackboneError) as err:
        DeepLabV3PlusHead([32, 64, 128], [8, 16, 32], NUM_CLASSES, channels=8)
    msg = str(err.value)
    assert "DeepLabV3PlusHead" in msg and "reduction 4" in msg and "[8, 16, 32]" in msg
    # An explicit c1_index takes another map instead.
    head = DeepLabV3PlusHead([32, 64, 128], [8, 16, 32], NUM_CLASSES, channels=8, c1_index=0)
    assert head.reduction == 8 and head.c1_bottleneck[0].in_channels == 32


def test_in_index_out_of_range():
    with pytest.raises(IncompatibleBackboneError, match=r"FCNHead: in_index 5 is out of range"):
        FCNHead([8, 16], [4, 8], NUM_CLASSES, in_index=5)
    with pytest.raises(IncompatibleBackboneError, match=r"PSPHead: in_index -3"):
        PSPHead([8, 16], [4, 8], NUM_CLASSES, in_index=-3)


def test_fcn_structure():
    head = FCNHead([8, 16, 32], [8, 16, 32], NUM_CLASSES, channels=16)
    assert len(head.convs) == 2 and head.convs[0][0].kernel_size == (3, 3)
    assert head.conv_cat[0].in_channels == 32 + 16  # concat_input: input + conv output
    assert isinstance(head.classifier[0], nn.Dropout2d) and head.classifier[0].p == 0.1
    aux = FCNHead([8, 16, 32], [8, 16, 32], NUM_CLASSES, in_index=-2, channels=8, num_convs=1,
                  concat_input=False)
    assert len(aux.convs) == 1 and aux.conv_cat is None and aux.convs[0][0].in_channels == 16


def test_unet_mirrors_skip_channels_and_transposed_convs():
    enc = UNetEncoder(base_channels=4)
    head = UNetHead(enc.channels, enc.reductions, 2)
    ups = [b.up for b in head.blocks]
    assert [(u.in_channels, u.out_channels, u.kernel_size, u.stride) for u in ups] == [
        (64, 32, (2, 2), (2, 2)), (32, 16, (2, 2), (2, 2)),
        (16, 8, (2, 2), (2, 2)), (8, 4, (2, 2), (2, 2))]
    assert [b.convs[1][0].out_channels for b in head.blocks] == [32, 16, 8, 4]
    logits = head(enc(torch.randn(2, 3, 32, 32)))
    assert logits.shape == (2, 2, 32, 32)


def test_unet_head_starts_with_every_level_and_logits_adamw_can_move():
    """At init the U-Net's logits depend on its deep maps as well as on the shallowest skip, and
    are not near zero. With PyTorch's transposed-conv init each stage scaled the deep path by about
    0.4 (the deepest map moved the logits by 5 %), and MMSegmentation's std-0.01 classifier over 32
    channels left the logits at about 0.03, which AdamW's lr-sized steps take a hundred iterations
    to grow: the loss sat near ln(classes) and the deep features were learnt late."""
    torch.manual_seed(0)
    channels, reductions = [64, 64, 128, 256, 512], [2, 4, 8, 16, 32]
    head = UNetHead(channels, reductions, 8, decoder_channels=256).train()
    # Post-ReLU features of unit scale, as BatchNorm + ReLU hand them over.
    features = [torch.randn(4, c, 64 // r, 64 // r).relu() for c, r in zip(channels, reductions)]
    with torch.no_grad():
        logits = head(features)
        assert 0.3 < logits.std().item() < 3.0
        for level in range(len(features)):
            cut = [torch.zeros_like(f) if i == level else f for i, f in enumerate(features)]
            change = ((head(cut) - logits).norm() / logits.norm()).item()
            assert change > 0.2, (level, change)
    up = head.blocks[0].up
    assert up.weight.std().item() == pytest.approx((2.0 / 512) ** 0.5, rel=0.1)
    assert head.classifier.weight.std().item() == pytest.approx((2.0 / 32) ** 0.5, rel=0.25)


def test_unet_encoder_contract():
    enc = UNetEncoder()
    assert enc.channels == [64, 128, 256, 512, 1024]
    assert enc.reductions == [1, 2, 4, 8, 16] and enc.size_divisor == 16
    small = UNetEncoder(in_chans=1, base_channels=4, depth=4)
    feats = small(torch.randn(1, 1, 16, 16))
    assert [f.shape[1] for f in feats] == small.channels == [4, 8, 16, 32]
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    cfg = OmegaConf.load(HEAD_CONF.parent / "backbone" / "unet.yaml")
    assert isinstance(hydra.utils.instantiate(cfg, base_channels=4), UNetEncoder)


def test_paper_unet_parameter_count():
    enc = UNetEncoder(in_chans=3, base_channels=64, depth=5)
    head = UNetHead(enc.channels, enc.reductions, 2, upsample="transpose")
    n = sum(p.numel() for p in enc.parameters()) + sum(p.numel() for p in head.parameters())
    assert abs(n - 31.04e6) / 31.04e6 < 0.02, n


def test_unet_decoder_channels_must_match_skips():
    with pytest.raises(IncompatibleBackboneError, match="decoder_channels has 2 entries"):
        UNetHead([8, 16, 32, 64], [4, 8, 16, 32], NUM_CLASSES, decoder_channels=[16, 8])


def test_unet_decoder_width_halves_from_the_deepest_stage_and_the_paper_recipe_mirrors():
    resnet = ([64, 64, 128, 256, 512], [2, 4, 8, 16, 32])
    head = UNetHead(*resnet, NUM_CLASSES, decoder_channels=256)
    widths = [head.blocks[i](torch.randn(1, c, 4, 4), torch.randn(1, skip, 8, 8)).shape[1]
              for i, (c, skip) in enumerate(zip([512, 256, 128, 64], [256, 128, 64, 64]))]
    assert widths == [256, 128, 64, 32] and head.classifier.in_channels == 32
    three = UNetHead([96, 192, 384, 768], [4, 8, 16, 32], NUM_CLASSES, decoder_channels=256)
    assert three.classifier.in_channels == 64  # 256, 128, 64 over three skips
    assert UNetHead(*resnet, NUM_CLASSES).classifier.in_channels == 64  # None: mirrored
    # full_resolution: one more stage of half the last width, at the input's size (smp's 16)
    full = UNetHead(*resnet, NUM_CLASSES, decoder_channels=256, full_resolution=True)
    assert len(full.blocks) == 5 and full.classifier.in_channels == 16 and full.reduction == 1
    # The default run: 128, 64, 32 over ResNet-18's maps at strides 4-32, logits at stride 4.
    default = build_model(compose_config())
    assert default.decode_head.in_index == [1, 2, 3, 4] and default.decode_head.reduction == 4
    assert default.decode_head.classifier.in_channels == 32
    paper = compose_config("experiment=unet_paper")
    assert paper.head.decoder_channels is None and paper.head.in_index is None
    assert paper.backbone._target_.endswith("UNetEncoder")


def test_unet_dropout_only_in_the_paper_recipe():
    """Channel dropout on the deepest map feeds BatchNorm layers whose running statistics then
    differ from what the model sees in eval (Li et al., CVPR 2019); it cost 1.2 points of mIoU
    on average in 20 minutes: off in the default run, the paper's 0.1 in experiment=unet_paper."""
    channels, reductions = [64, 64, 128, 256, 512], [2, 4, 8, 16, 32]
    features = [torch.randn(2, c, 64 // r, 64 // r) for c, r in zip(channels, reductions)]

    def head_of(*overrides):
        cfg = compose_config(*overrides)
        torch.manual_seed(0)
        return hydra.utils.instantiate(cfg.head)(channels, reductions, NUM_CLASSES).train()

    default, paper = head_of(), head_of("experiment=unet_paper", "backbone=resnet18")
    with torch.no_grad():
        torch.testing.assert_close(default(features), default(features))  # nothing random
        assert not torch.allclose(paper(features), paper(features))
    assert paper.dropout.p == pytest.approx(0.1)


def test_unet_head_on_timm_resnet18():
    torch.manual_seed(0)
    backbone = TimmBackbone("resnet18")
    head = UNetHead(backbone.channels, backbone.reductions, NUM_CLASSES,
                    decoder_channels=[32, 32, 16, 16])
    logits = head(backbone(torch.randn(2, 3, 64, 64)))
    assert logits.shape == (2, NUM_CLASSES, 32, 32)  # resnet18's finest map is at stride 2
    logits.mean().backward()
    assert backbone.body.conv1.weight.grad.abs().sum() > 0
