"""The shared building blocks (segexp.nn) and the staged-encoder frame of MiT and MSCAN."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from segexp.backbones.mit import MixVisionTransformer
from segexp.backbones.mscan import MSCAN
from segexp.backbones.staged import StagedEncoder
from segexp.errors import ConfigError
from segexp.nn import (
    ChannelLayerNorm,
    ConvBNReLU,
    ConvGNReLU,
    DepthwiseSeparableConvBNReLU,
    DoubleConv,
    drop_path_or_identity,
    drop_path_rates,
)


def test_channel_layer_norm_normalises_each_pixel_over_channels():
    torch.manual_seed(0)
    norm = ChannelLayerNorm(6, eps=1e-6)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 6, 3, 5)
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (6,), norm.weight, norm.bias, 1e-6)
    torch.testing.assert_close(norm(x), expected.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-6)
    # A token LayerNorm's weights load into it unchanged (checkpoint keys weight/bias).
    assert set(norm.state_dict()) == set(nn.LayerNorm(6).state_dict())


def test_block_layouts_are_the_checkpoint_layouts():
    # Converters (segexp.convert) write these keys: index 0 = conv, 1 = norm.
    assert set(ConvBNReLU(3, 4, 3).state_dict()) == {
        "0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in DoubleConv(3, 4).state_dict()} == {
        "0.0", "0.1", "1.0", "1.1"}
    separable = DepthwiseSeparableConvBNReLU(4, 8, 3, dilation=2)
    assert separable[0][0].groups == 4 and separable[0][0].dilation == (2, 2)
    assert separable[0][0].padding == (2, 2) and separable[1][0].kernel_size == (1, 1)
    gn = ConvGNReLU(4, 8, 3, groups=4, relu=False, bias=True)
    assert set(gn.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert gn[0].padding == (1, 1) and gn[1].num_groups == 4 and len(gn) == 2
    assert isinstance(ConvGNReLU(4, 32)[2], nn.ReLU) and ConvGNReLU(4, 32)[0].bias is None


def test_conv_bn_relu_starts_as_mmcv_conv_module():
    """He normal over fan-out (MMCV's kaiming_init of every ConvModule), unit BatchNorm; PyTorch's
    default would be about 2.4x smaller (std 0.024 here)."""
    torch.manual_seed(0)
    block = ConvBNReLU(64, 128, 3)
    assert block[0].weight.std().item() == pytest.approx((2.0 / (128 * 9)) ** 0.5, rel=0.05)
    assert abs(block[0].weight.mean().item()) < 0.002
    assert torch.equal(block[1].weight.detach(), torch.ones(128))
    assert torch.equal(block[1].bias.detach(), torch.zeros(128))


def test_same_padding_keeps_the_size():
    x = torch.randn(1, 4, 9, 11)
    for block in (ConvBNReLU(4, 5, 3, dilation=3), DoubleConv(4, 5),
                  DepthwiseSeparableConvBNReLU(4, 5, 3, dilation=2), ConvGNReLU(4, 8, 5, groups=2)):
        assert block(x).shape[-2:] == (9, 11)


def test_drop_path_rates_are_linspace_over_all_blocks():
    for rate, n in ((0.1, 1), (0.1, 2), (0.3, 7), (0.0, 4)):
        torch.testing.assert_close(torch.tensor(drop_path_rates(rate, n)),
                                   torch.linspace(0, rate, n), rtol=0, atol=1e-7)
    assert isinstance(drop_path_or_identity(0.0), nn.Identity)
    assert isinstance(drop_path_or_identity(0.2), DropPath)
    assert drop_path_or_identity(0.2).drop_prob == 0.2


def test_unet_encoder_does_not_import_a_head():
    code = ("import sys, segexp.backbones.unet_encoder; "
            "print(sorted(m for m in sys.modules if m.startswith('segexp.heads')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("cls, family, variant, depths", [
    (MixVisionTransformer, "MiT", "b0", [2, 1, 3, 1]),
    (MSCAN, "MSCAN", "t", [1, 2, 1, 2]),
])
def test_staged_encoders_share_one_frame(cls, family, variant, depths):
    net = cls(variant, depths=depths, drop_path_rate=0.3)
    assert isinstance(net, StagedEncoder) and net.family == family
    assert net.reductions == [4, 8, 16, 32] and net.size_divisor == 32
    assert net.channels == list(cls.variants[variant][0])
    # Stochastic depth rises linearly over all blocks, stage after stage.
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in net.stages for b in s.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, sum(depths)),
                               rtol=0, atol=1e-6)
    with torch.no_grad():
        features = net(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == net.channels
    assert [64 // f.shape[-1] for f in features] == net.reductions


@pytest.mark.parametrize("cls, message", [
    (MixVisionTransformer, "MixVisionTransformer: unknown variant 'b9'; choose one of b0, b1, b2, "
                           "b3, b4, b5 (backbone=mit_b0 ... mit_b5)."),
    (MSCAN, "MSCAN: unknown variant 'b9'; choose one of t, s, b, l (backbone=mscan_t ... "
            "mscan_l)."),
])
def test_unknown_variant_names_the_choices(cls, message):
    with pytest.raises(ConfigError) as err:
        cls("b9")
    assert str(err.value) == message


def test_per_stage_options_need_four_entries():
    with pytest.raises(ConfigError) as err:
        MixVisionTransformer("b0", depths=[1, 1, 1])
    assert str(err.value) == ("MixVisionTransformer: embed_dims, depths, num_heads, sr_ratios and "
                              "mlp_ratios need one entry per stage (4).")
    with pytest.raises(ConfigError) as err:
        MSCAN("t", mlp_ratios=[4, 4])
    assert str(err.value) == "MSCAN: embed_dims, depths and mlp_ratios need one entry per stage (4)."


@pytest.mark.parametrize("cls, variant, family", [(MixVisionTransformer, "mit_b0", "MiT"),
                                                  (MSCAN, "mscan-t", "MSCAN")])
def test_pretrained_true_is_refused_with_the_family_name(cls, variant, family):
    with pytest.raises(ConfigError, match=f"segexp cannot download {family} weights. To use them, "
                                          "download .* or train from scratch"):
        cls(variant, pretrained=True, depths=[1, 1, 1, 1])


@pytest.mark.parametrize("cls, variant, family", [(MixVisionTransformer, "b0", "MiT"),
                                                  (MSCAN, "t", "MSCAN")])
def test_auto_warns_for_published_variants_only(cls, variant, family, caplog):
    with caplog.at_level("WARNING"):
        custom = cls(variant, pretrained="auto", depths=[1, 1, 1, 1])
    assert str(custom.pretrained_source) == f"none (auto: a custom {family} has no published weights)"
    assert not caplog.records
    with caplog.at_level("WARNING"):
        published = cls(variant, pretrained="auto")
    assert str(published.pretrained_source) == f"none (auto: segexp cannot download {family} weights)"
    assert len(caplog.records) == 1 and f"segexp cannot download {family} weights" in caplog.text
    assert str(cls(variant, depths=[1, 1, 1, 1]).pretrained_source) == "none (pretrained=false)"
