"""Backbones: multi-scale encoders exposing ``channels``, ``reductions`` and ``size_divisor``."""

from segexp.backbones.timm_backbone import TimmBackbone
from segexp.backbones.unet_encoder import UNetEncoder

__all__ = ["TimmBackbone", "UNetEncoder"]
