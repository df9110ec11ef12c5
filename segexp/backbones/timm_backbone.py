"""Encoders from timm (``features_only=True``), with their ``feature_info`` passed on to heads."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from segexp.errors import ConfigError


class TimmBackbone(nn.Module):
    """A timm model cut into a multi-scale feature extractor.

    Heads read ``channels`` and ``reductions`` (one entry per returned feature map, shallow to
    deep), so no channel count is ever written twice in a config. ``output_stride=8`` or ``16``
    dilates the last stages (the "d8"/"d16" ResNets of FCN, PSPNet and DeepLabV3).

    Weights: ``pretrained=True`` downloads ImageNet weights through timm; ``checkpoint=PATH`` loads
    a local ``.pth``/``.safetensors`` file of the same timm model instead (no network needed).
    """

    def __init__(self, name: str, pretrained: bool = False, checkpoint: str | None = None,
                 out_indices: list[int] | None = None, output_stride: int = 32,
                 drop_path_rate: float = 0.0, size_divisor: int = 32, **timm_kwargs) -> None:
        super().__init__()
        self.name = name
        kwargs = dict(features_only=True, **timm_kwargs)
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        if output_stride != 32:
            kwargs["output_stride"] = output_stride
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        if checkpoint:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise ConfigError(f"backbone.checkpoint={checkpoint}: no such file. Point it at a "
                                  f"saved state dict (.pth or .safetensors) of timm's '{name}'.")
            check_checkpoint_keys(path, name, timm_kwargs)
            # timm reads the file (weights_only=True for .pth) and adapts it as for a download.
            kwargs["pretrained_cfg_overlay"] = dict(file=str(path))
            pretrained = True
        try:
            self.body = timm.create_model(name, pretrained=pretrained, **kwargs)
        except RuntimeError as err:
            if checkpoint and ("state_dict" in str(err) or "size mismatch" in str(err)):
                raise ConfigError(f"backbone.checkpoint={checkpoint} does not fit timm model "
                                  f"'{name}': {str(err).splitlines()[0]}") from err
            raise
        except Exception as err:  # hub unreachable: say how to work offline
            if pretrained and not checkpoint:
                raise ConfigError(
                    f"could not download ImageNet weights for backbone '{name}' "
                    f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). Without network, "
                    f"download the timm weights for '{name}' elsewhere and pass "
                    "backbone.checkpoint=/path/to/weights.pth (or .safetensors), or train from "
                    "scratch with backbone.pretrained=false.") from err
            raise
        self.feature_info = self.body.feature_info
        self.channels: list[int] = list(self.feature_info.channels())
        self.reductions: list[int] = list(self.feature_info.reduction())
        # Inputs must divide by this so every stage sees whole pixels and skips line up.
        self.size_divisor = size_divisor

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))


def _file_keys(path: Path) -> set[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    return set(state)


def check_checkpoint_keys(path: Path, name: str, timm_kwargs: dict) -> None:
    """timm loads a features-only model non-strictly; refuse a file that does not fit instead of
    silently training from partly random weights."""
    with torch.device("meta"):  # key names only: no memory, no initialisation
        reference = timm.create_model(name, **timm_kwargs)
    classifier = reference.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    expected = {k for k in reference.state_dict() if not k.startswith(tuple(c + "." for c in classifier))}
    found = _file_keys(path)
    missing, unexpected = sorted(expected - found), sorted(found - expected - {
        f"{c}.{p}" for c in classifier for p in ("weight", "bias")})
    if missing or unexpected:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" ... ({len(keys)} in all)" if len(keys) > 6 else "")
        parts = [f"missing {show(missing)}" if missing else "",
                 f"unexpected {show(unexpected)}" if unexpected else ""]
        raise ConfigError(f"backbone.checkpoint={path} does not fit timm model '{name}': "
                          f"{'; '.join(p for p in parts if p)}. Use a state dict saved from timm's "
                          f"'{name}' (or choose the backbone that matches the file).")
