"""MMSegmentation checkpoints convert to segexp's layout.

mmseg cannot be installed here (it needs compiled mmcv), so the MMSeg side is written out from
MMSegmentation's module definitions (mmseg/models/backbones/resnet.py ``ResNetV1c``,
mmpretrain ``ConvNeXt``, mmseg ``MixVisionTransformer``; decode heads ``FCNHead``, ``PSPHead``,
``ASPPHead``, ``UPerHead``, ``SegformerHead``, mmcv ``ConvModule`` = ``conv``/``bn``/``activate``)
and the configs' numbers: key names and shapes are generated from stages, blocks and channels,
never from segexp's model. For SegFormer, whose conversion reshapes and permutes tensors, a small
re-implementation of MMSeg's MiT + SegformerHead also checks the logits.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segexp.convert.mmseg import convert_mmseg, looks_like_mmseg
from segexp.errors import ConfigError
from segexp.heads.segformer import SegFormerHead
from segexp.models import build_model
from segexp.models import weights as weights_module
from segexp.nn import ConvBNReLU
from tests.conftest import compose_config, randomise_batchnorm

NUM_CLASSES = 6
Shapes = dict[str, tuple[int, ...]]


# --- MMSeg key names and shapes, from the module definitions ----------------------------------


def conv(keys: Shapes, name: str, cout: int, cin: int, k: int, bias: bool = False,
         groups: int = 1) -> None:
    keys[f"{name}.weight"] = (cout, cin // groups, k, k)
    if bias:
        keys[f"{name}.bias"] = (cout,)


def bn(keys: Shapes, name: str, c: int) -> None:
    for part in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{name}.{part}"] = (c,)
    keys[f"{name}.num_batches_tracked"] = ()


def norm(keys: Shapes, name: str, c: int) -> None:  # LayerNorm / LN2d
    keys[f"{name}.weight"] = (c,)
    keys[f"{name}.bias"] = (c,)


def conv_module(keys: Shapes, name: str, cin: int, cout: int, k: int) -> None:
    """mmcv ConvModule with a norm: bias-free ``conv``, ``bn`` (BN and SyncBN abbreviate to bn)."""
    conv(keys, f"{name}.conv", cout, cin, k)
    bn(keys, f"{name}.bn", cout)


def resnet_v1c(depth: int = 50) -> Shapes:
    """ResNetV1c: deep stem (stem_channels 64), Bottleneck stages of base 64 * 2**i."""
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    keys: Shapes = {}
    conv(keys, "backbone.stem.0", 32, 3, 3)
    bn(keys, "backbone.stem.1", 32)
    conv(keys, "backbone.stem.3", 32, 32, 3)
    bn(keys, "backbone.stem.4", 32)
    conv(keys, "backbone.stem.6", 64, 32, 3)
    bn(keys, "backbone.stem.7", 64)
    inplanes = 64
    for i, num_blocks in enumerate(blocks):
        planes = 64 * 2**i
        for b in range(num_blocks):
            name = f"backbone.layer{i + 1}.{b}"
            cin = inplanes if b == 0 else planes * 4
            conv(keys, f"{name}.conv1", planes, cin, 1)
            bn(keys, f"{name}.bn1", planes)
            conv(keys, f"{name}.conv2", planes, planes, 3)
            bn(keys, f"{name}.bn2", planes)
            conv(keys, f"{name}.conv3", planes * 4, planes, 1)
            bn(keys, f"{name}.bn3", planes * 4)
            if b == 0:  # stride != 1 or inplanes != planes * expansion: always the first block
                conv(keys, f"{name}.downsample.0", planes * 4, inplanes, 1)
                bn(keys, f"{name}.downsample.1", planes * 4)
        inplanes = planes * 4
    return keys


def convnext(depths: list[int], channels: list[int]) -> Shapes:
    """mmpretrain ConvNeXt (linear_pw_conv, layer scale, out_indices 0..3 -> norm0..norm3)."""
    keys: Shapes = {}
    conv(keys, "backbone.downsample_layers.0.0", channels[0], 3, 4, bias=True)
    norm(keys, "backbone.downsample_layers.0.1", channels[0])
    for i, (depth, c) in enumerate(zip(depths, channels)):
        if i > 0:
            norm(keys, f"backbone.downsample_layers.{i}.0", channels[i - 1])
            conv(keys, f"backbone.downsample_layers.{i}.1", c, channels[i - 1], 2, bias=True)
        for j in range(depth):
            name = f"backbone.stages.{i}.{j}"
            conv(keys, f"{name}.depthwise_conv", c, c, 7, bias=True, groups=c)
            norm(keys, f"{name}.norm", c)
            keys[f"{name}.pointwise_conv1.weight"] = (4 * c, c)
            keys[f"{name}.pointwise_conv1.bias"] = (4 * c,)
            keys[f"{name}.pointwise_conv2.weight"] = (c, 4 * c)
            keys[f"{name}.pointwise_conv2.bias"] = (c,)
            keys[f"{name}.gamma"] = (c,)
        norm(keys, f"backbone.norm{i}", c)
    return keys


def mit(embed_dims: int, num_layers: list[int], num_heads=(1, 2, 5, 8), sr_ratios=(8, 4, 2, 1),
        patch_sizes=(7, 3, 3, 3), mlp_ratio: int = 4) -> Shapes:
    """MMSeg MixVisionTransformer: layers.i = [PatchEmbed, [TransformerEncoderLayer...], norm]."""
    keys: Shapes = {}
    cin = 3
    for i, depth in enumerate(num_layers):
        dim = embed_dims * num_heads[i]
        conv(keys, f"backbone.layers.{i}.0.projection", dim, cin, patch_sizes[i], bias=True)
        norm(keys, f"backbone.layers.{i}.0.norm", dim)
        for j in range(depth):
            name = f"backbone.layers.{i}.1.{j}"
            norm(keys, f"{name}.norm1", dim)
            keys[f"{name}.attn.attn.in_proj_weight"] = (3 * dim, dim)
            keys[f"{name}.attn.attn.in_proj_bias"] = (3 * dim,)
            keys[f"{name}.attn.attn.out_proj.weight"] = (dim, dim)
            keys[f"{name}.attn.attn.out_proj.bias"] = (dim,)
            if sr_ratios[i] > 1:
                conv(keys, f"{name}.attn.sr", dim, dim, sr_ratios[i], bias=True)
                norm(keys, f"{name}.attn.norm", dim)
            norm(keys, f"{name}.norm2", dim)
            hidden = mlp_ratio * dim
            conv(keys, f"{name}.ffn.layers.0", hidden, dim, 1, bias=True)  # fc1
            conv(keys, f"{name}.ffn.layers.1", hidden, hidden, 3, bias=True, groups=hidden)  # pe
            conv(keys, f"{name}.ffn.layers.4", dim, hidden, 1, bias=True)  # fc2 (2 act, 3 drop)
        norm(keys, f"backbone.layers.{i}.2", dim)
        cin = dim
    return keys


def conv_seg(keys: Shapes, prefix: str, channels: int) -> None:
    conv(keys, f"{prefix}.conv_seg", NUM_CLASSES, channels, 1, bias=True)


def fcn_head(prefix: str, cin: int, channels: int, num_convs: int, concat_input: bool) -> Shapes:
    keys: Shapes = {}
    for i in range(num_convs):
        conv_module(keys, f"{prefix}.convs.{i}", cin if i == 0 else channels, channels, 3)
    if concat_input:
        conv_module(keys, f"{prefix}.conv_cat", cin + channels, channels, 3)
    conv_seg(keys, prefix, channels)
    return keys


def ppm(keys: Shapes, cin: int, channels: int, pool_scales=(1, 2, 3, 6)) -> None:
    for i in range(len(pool_scales)):  # Sequential(AdaptiveAvgPool2d, ConvModule)
        conv_module(keys, f"decode_head.psp_modules.{i}.1", cin, channels, 1)


def psp_head(cin: int, channels: int) -> Shapes:
    keys: Shapes = {}
    ppm(keys, cin, channels)
    conv_module(keys, "decode_head.bottleneck", cin + 4 * channels, channels, 3)
    conv_seg(keys, "decode_head", channels)
    return keys


def aspp_head(cin: int, channels: int, dilations=(1, 12, 24, 36)) -> Shapes:
    keys: Shapes = {}
    conv_module(keys, "decode_head.image_pool.1", cin, channels, 1)
    for i, d in enumerate(dilations):
        conv_module(keys, f"decode_head.aspp_modules.{i}", cin, channels, 1 if d == 1 else 3)
    conv_module(keys, "decode_head.bottleneck", (len(dilations) + 1) * channels, channels, 3)
    conv_seg(keys, "decode_head", channels)
    return keys


def uper_head(in_channels: list[int], channels: int) -> Shapes:
    keys: Shapes = {}
    ppm(keys, in_channels[-1], channels)
    conv_module(keys, "decode_head.bottleneck", in_channels[-1] + 4 * channels, channels, 3)
    for i, c in enumerate(in_channels[:-1]):
        conv_module(keys, f"decode_head.lateral_convs.{i}", c, channels, 1)
        conv_module(keys, f"decode_head.fpn_convs.{i}", channels, channels, 3)
    conv_module(keys, "decode_head.fpn_bottleneck", len(in_channels) * channels, channels, 3)
    conv_seg(keys, "decode_head", channels)
    return keys


def segformer_head(in_channels: list[int], channels: int) -> Shapes:
    keys: Shapes = {}
    for i, c in enumerate(in_channels):
        conv_module(keys, f"decode_head.convs.{i}", c, channels, 1)
    conv_module(keys, "decode_head.fusion_conv", len(in_channels) * channels, channels, 1)
    conv_seg(keys, "decode_head", channels)
    return keys


def aux_fcn(cin: int) -> Shapes:  # every recipe's auxiliary head
    return fcn_head("auxiliary_head", cin, 256, num_convs=1, concat_input=False)


RESNET = ("backbone=resnet50_d8", "backbone.name=resnet50c")
CONFIGS = {
    # MMSeg config: (its keys, segexp overrides)
    "fcn_r50-d8": (lambda: {**resnet_v1c(50), **fcn_head("decode_head", 2048, 512, 2, True),
                            **aux_fcn(1024)},
                   ("model=fcn", *RESNET, "+head@model.aux_head=fcn_aux")),
    "pspnet_r50-d8": (lambda: {**resnet_v1c(50), **psp_head(2048, 512), **aux_fcn(1024)},
                      ("model=pspnet", *RESNET)),
    "deeplabv3_r50-d8": (lambda: {**resnet_v1c(50), **aspp_head(2048, 512), **aux_fcn(1024)},
                         ("model=deeplabv3", *RESNET)),
    "upernet_convnext-t": (lambda: {**convnext([3, 3, 9, 3], [96, 192, 384, 768]),
                                    **uper_head([96, 192, 384, 768], 512), **aux_fcn(384)},
                           ("model=upernet", "backbone=convnext_tiny")),
    "segformer_mit-b0": (lambda: {**mit(32, [2, 2, 2, 2]),
                                  **segformer_head([32, 64, 160, 256], 256)},
                         ("model=segformer", "backbone=mit_b0")),
}


def fake_state(shapes: Shapes) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(shape, dtype=torch.long if k.endswith("num_batches_tracked")
                           else torch.float32) for k, shape in shapes.items()}


def with_mmseg_segformer_head(model: nn.Module) -> nn.Module:
    """MMSeg's SegformerHead projects each level with a ConvModule (conv, BN, ReLU). segexp's
    SegFormerHead builds that with ``proj_norm_act=True``; until that option exists, put the same
    modules in place here (what the option must build: ``proj.i = ConvBNReLU(c_i, channels, 1)``)."""
    head = model.decode_head
    if not isinstance(head, SegFormerHead) or isinstance(head.proj[0], ConvBNReLU):
        return model
    head.proj = nn.ModuleList(ConvBNReLU(p.in_channels, p.out_channels, 1) for p in head.proj)
    return model


def has_proj_norm_act() -> bool:
    return "proj_norm_act" in inspect.signature(SegFormerHead).parameters


def build_ours(overrides: tuple[str, ...]) -> nn.Module:
    if "model=segformer" in overrides and has_proj_norm_act():
        overrides = (*overrides, "++head.proj_norm_act=true")
    return with_mmseg_segformer_head(build_model(compose_config(*overrides)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mmseg_layout_converts_to_exactly_our_keys(name):
    make_keys, overrides = CONFIGS[name]
    mmseg_state = fake_state(make_keys())
    model = build_ours(overrides)
    target = model.state_dict()
    assert looks_like_mmseg(mmseg_state)
    converted = convert_mmseg(mmseg_state)
    assert sorted(set(target) - set(converted)) == []  # missing
    assert sorted(set(converted) - set(target)) == []  # unexpected
    mismatched = [(k, tuple(v.shape), tuple(target[k].shape)) for k, v in converted.items()
                  if v.shape != target[k].shape]
    assert mismatched == []
    model.load_state_dict(converted, strict=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_only_the_mmseg_detector_claims_mmseg_files(name):
    state = fake_state(CONFIGS[name][0]())
    formats = weights_module._converters()
    claimed = [fmt for fmt, (detect, _) in formats.items() if detect(state)]
    assert claimed in ([], ["mmseg"])  # no other converter takes it
    if "mmseg" in formats:  # wired into weights.py: model.checkpoint routes it here
        model_keys = set(build_ours(CONFIGS[name][1]).state_dict())
        assert weights_module.convert(state, model_keys)[1] == "mmseg"


def test_model_checkpoint_loads_an_mmseg_file(tmp_path, monkeypatch):
    """model.checkpoint=<mmseg .pth> end to end (the ``state_dict`` wrapper, detection, the strict
    loader), with the converter registered as weights.py's _converters() registers it."""
    if "mmseg" not in weights_module._converters():
        registered = weights_module._converters
        monkeypatch.setattr(weights_module, "_converters", lambda: {
            **registered(), "mmseg": (looks_like_mmseg, convert_mmseg)})
    make_keys, overrides = CONFIGS["pspnet_r50-d8"]
    generator = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=generator) if v.is_floating_point() else v)
             for k, v in fake_state(make_keys()).items()}
    path = tmp_path / "pspnet_r50-d8.pth"
    torch.save({"meta": {"mmseg_version": "1.2.2", "CLASSES": ("a", "b")}, "state_dict": state},
               path)
    model = build_model(compose_config(*overrides, f"model.checkpoint={path}"))
    loaded = model.state_dict()
    assert torch.equal(loaded["backbone.body.bn1.running_var"], state["backbone.stem.7.running_var"])
    assert torch.equal(loaded["decode_head.ppm.branches.3.1.0.weight"],
                       state["decode_head.psp_modules.3.1.conv.weight"])
    assert torch.equal(loaded["aux_head.classifier.1.bias"], state["auxiliary_head.conv_seg.bias"])


def test_other_layouts_are_not_mmseg():
    ours = build_model(compose_config("model=upernet", "backbone=convnext_tiny")).state_dict()
    assert not looks_like_mmseg(ours)
    assert not looks_like_mmseg({"decode_head.classifier.weight": torch.zeros(1),
                                 "backbone.embeddings.patch_embeddings.weight": torch.zeros(1)})


def test_unsupported_keys_are_named():
    state = fake_state({**resnet_v1c(50), **psp_head(2048, 512), **aux_fcn(1024)})
    state["decode_head.c1_bottleneck.conv.weight"] = torch.zeros(1)  # DeepLabV3+'s decoder
    state["auxiliary_head.0.conv_seg.weight"] = torch.zeros(1)  # a list of auxiliary heads
    with pytest.raises(ConfigError) as info:
        convert_mmseg(state)
    assert "decode_head.c1_bottleneck.conv.weight" in str(info.value)
    assert "auxiliary_head.0.conv_seg.weight" in str(info.value)
    state = fake_state({**resnet_v1c(50), **psp_head(2048, 512)})
    state["data_preprocessor.mean"] = torch.zeros(3, 1, 1)  # not a weight: dropped
    del state["decode_head.bottleneck.bn.num_batches_tracked"]  # filled in
    converted = convert_mmseg(state)
    assert "decode_head.bottleneck.1.num_batches_tracked" in converted
    assert not any(k.startswith("data_preprocessor") for k in converted)


def test_dilated_resnet_matches_mmseg_contract_dilation():
    """MMSeg's r50-d8: strides (1, 2, 1, 1), dilations (1, 1, 2, 4), contract_dilation=True (the
    first block of a dilated stage uses half the dilation) -> timm's output_stride=8."""
    body = build_model(compose_config("model=fcn", *RESNET)).backbone.body
    expected = {"layer2": [(2, 1)] + [(1, 1)] * 3, "layer3": [(1, 1)] + [(1, 2)] * 5,
                "layer4": [(1, 2)] + [(1, 4)] * 2}
    for layer, blocks in expected.items():
        got = [(b.conv2.stride[0], b.conv2.dilation[0]) for b in getattr(body, layer)]
        assert got == blocks, layer


# --- SegFormer: logits of a re-implementation of MMSeg's modules ------------------------------


class RefConvModule(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU()

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class RefPatchEmbed(nn.Module):
    def __init__(self, cin: int, dim: int, k: int, stride: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(cin, dim, k, stride, padding=k // 2)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        x = self.projection(x)
        return self.norm(x.flatten(2).transpose(1, 2)), x.shape[2:]


def nlc_to_nchw(x, hw):
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw)


class RefEfficientAttention(nn.Module):
    def __init__(self, dim: int, heads: int, sr: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, bias=True)  # mmcv: (N, B, C) inside
        self.sr_ratio = sr
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, sr)
            self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, hw, identity):
        kv = self.norm(self.sr(nlc_to_nchw(x, hw)).flatten(2).transpose(1, 2)) \
            if self.sr_ratio > 1 else x
        out = self.attn(x.transpose(0, 1), kv.transpose(0, 1), kv.transpose(0, 1))[0]
        return identity + out.transpose(0, 1)


class RefMixFFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(dim, hidden, 1),
                                    nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
                                    nn.GELU(), nn.Dropout(0.0), nn.Conv2d(hidden, dim, 1),
                                    nn.Dropout(0.0))

    def forward(self, x, hw, identity):
        return identity + self.layers(nlc_to_nchw(x, hw)).flatten(2).transpose(1, 2)


class RefEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, sr: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefEfficientAttention(dim, heads, sr)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = RefMixFFN(dim, 4 * dim)

    def forward(self, x, hw):
        x = self.attn(self.norm1(x), hw, identity=x)
        return self.ffn(self.norm2(x), hw, identity=x)


class RefMiT(nn.Module):
    def __init__(self, embed_dims: int, num_layers: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        cin = 3
        for i, depth in enumerate(num_layers):
            dim = embed_dims * (1, 2, 5, 8)[i]
            self.layers.append(nn.ModuleList([
                RefPatchEmbed(cin, dim, (7, 3, 3, 3)[i], (4, 2, 2, 2)[i]),
                nn.ModuleList(RefEncoderLayer(dim, (1, 2, 5, 8)[i], (8, 4, 2, 1)[i])
                              for _ in range(depth)),
                nn.LayerNorm(dim, eps=1e-6)]))
            cin = dim

    def forward(self, x):
        outs = []
        for patch_embed, layers, final_norm in self.layers:
            x, hw = patch_embed(x)
            for layer in layers:
                x = layer(x, hw)
            x = nlc_to_nchw(final_norm(x), hw)
            outs.append(x)
        return outs


class RefSegformerHead(nn.Module):
    def __init__(self, in_channels: list[int], channels: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(RefConvModule(c, channels) for c in in_channels)
        self.fusion_conv = RefConvModule(len(in_channels) * channels, channels)
        self.conv_seg = nn.Conv2d(channels, NUM_CLASSES, 1)

    def forward(self, inputs):
        outs = [F.interpolate(conv(x), size=inputs[0].shape[2:], mode="bilinear",
                              align_corners=False) for conv, x in zip(self.convs, inputs)]
        return self.conv_seg(self.fusion_conv(torch.cat(outs, dim=1)))


class RefSegformer(nn.Module):
    def __init__(self, depths: list[int]) -> None:
        super().__init__()
        self.backbone = RefMiT(32, depths)
        self.decode_head = RefSegformerHead([32, 64, 160, 256], 256)

    def forward(self, x):
        return F.interpolate(self.decode_head(self.backbone(x)), size=x.shape[2:],
                             mode="bilinear", align_corners=False)


def test_reference_modules_have_the_generated_keys():
    """The hand-written key list and the re-implemented modules agree (names and shapes)."""
    reference = {k: tuple(v.shape) for k, v in RefSegformer([2, 2, 2, 2]).state_dict().items()}
    assert reference == CONFIGS["segformer_mit-b0"][0]()


def test_mmseg_segformer_gives_the_same_logits():
    torch.manual_seed(0)
    depths = [1, 1, 1, 1]
    reference = RefSegformer(depths)
    randomise_batchnorm(reference)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    reference.eval()
    ours = build_ours(("model=segformer", "backbone=mit_b0", f"backbone.depths={depths}")).eval()
    # MMSeg's MiT uses LayerNorm eps 1e-6 where segexp (as the official code) uses 1e-5.
    for stage in ours.backbone.stages:
        stage.patch_embed.norm.eps = 1e-6
        for block in stage.blocks:
            if hasattr(block.attn, "sr_norm"):
                block.attn.sr_norm.eps = 1e-6
    ours.load_state_dict(convert_mmseg(reference.state_dict()), strict=True)
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(images)
        logits = ours(images)
    assert expected.abs().max() > 1e-2
    assert (logits - expected).abs().max() <= 1e-5  # 2e-7 here
