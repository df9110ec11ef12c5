"""Encoders from timm (``features_only=True``), with their ``feature_info`` passed on to heads."""

from __future__ import annotations

import re
import types
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from segexp.backbones.pretrained import (
    PretrainedSource,
    checkpoint_source,
    create_timm_model,
    pretrained_mode,
)
from segexp.errors import ConfigError, first_line
from segexp.nn import ChannelLayerNorm
from segexp.weights_io import fit_state_dict, misfit_error, read_state_dict


class TimmBackbone(nn.Module):
    """A timm model cut into a multi-scale feature extractor.

    Heads read ``channels`` and ``reductions`` (one entry per returned feature map, shallow to
    deep), so no channel count is ever written twice in a config. ``output_stride=8`` or ``16``
    dilates the last stages (the "d8"/"d16" ResNets of FCN, PSPNet and DeepLabV3).

    Weights: ``pretrained`` ``"auto"`` (the configs' default), ``True`` or ``False`` (the default
    here), see :mod:`segexp.backbones.pretrained`: timm's ImageNet weights from the local cache or
    the hub; ``checkpoint=PATH`` loads a local ``.pth``/``.safetensors`` file of the same timm model
    instead (no network needed). ``pretrained_source`` says which was used.

    Transformers: timm's Swin returns channels-last (NHWC) maps; they come back as NCHW like every
    other backbone. Its shifted-window blocks pad each map to a whole number of windows (padding
    before the cyclic shift, as the Swin and MMSegmentation implementations do), so any input that
    divides by 32 works; give Swin ``strict_img_size=False`` (any input size) and
    ``always_partition=True`` (keep window 7 and shift 3 in every stage, whatever the map size).

    ``out_norms=True`` adds a channels-first LayerNorm on each returned map (MMSegmentation's
    ConvNeXt/Swin ``norm0..norm3``, Hugging Face's ``hidden_states_norms``): these backbones end
    their stages without a norm, and the segmentation recipes normalise every map a head reads.

    Layer-wise learning-rate decay (``optimizer.layer_decay``) reads ``num_layers`` and
    ``layer_id(name)``, defined for ConvNeXt (MMSegmentation's ``LearningRateDecayOptimizerConstructor``
    rules, ``lr_decay_type`` ``stage_wise`` or ``layer_wise`` with ``lr_decay_num_layers`` as its
    ``num_layers``) and Swin (one id per block, SimMIM's fine-tuning rule).
    """

    def __init__(self, name: str, pretrained: bool | str = False, checkpoint: str | None = None,
                 out_indices: list[int] | None = None, output_stride: int = 32,
                 drop_path_rate: float = 0.0, size_divisor: int = 32, out_norms: bool = False,
                 out_norm_eps: float = 1e-6, lr_decay_num_layers: int | None = None,
                 lr_decay_type: str = "stage_wise", **timm_kwargs) -> None:
        super().__init__()
        self.name = name
        kwargs = dict(features_only=True, **timm_kwargs)
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        if output_stride != 32:
            kwargs["output_stride"] = output_stride
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        mode = pretrained_mode(pretrained)
        if checkpoint:
            self.body, self.pretrained_source = create_from_checkpoint(name, checkpoint, kwargs,
                                                                       timm_kwargs)
        else:
            self.body, self.pretrained_source = create_timm_model(name, mode, kwargs)
        self.feature_info = self.body.feature_info
        self.channels: list[int] = list(self.feature_info.channels())
        self.reductions: list[int] = list(self.feature_info.reduction())
        # Inputs must divide by this so every stage sees whole pixels and skips line up.
        self.size_divisor = size_divisor
        # Swin (and other transformer stages in timm) hand back channels-last maps.
        self.channels_last = str(getattr(self.body, "output_fmt", "NCHW")).endswith("NHWC")
        _pad_windows_before_shift(self.body)
        self.out_norms = nn.ModuleList(ChannelLayerNorm(c, eps=out_norm_eps) for c in self.channels) \
            if out_norms else None
        if lr_decay_type not in ("stage_wise", "layer_wise"):
            raise ConfigError(f"backbone.lr_decay_type={lr_decay_type}: choose stage_wise or "
                              "layer_wise (MMSegmentation's ConvNeXt decay types).")
        self.lr_decay_type = lr_decay_type
        self.lr_decay_num_layers = lr_decay_num_layers
        self._family = _layer_family(name, self.body)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = list(self.body(x))
        if self.channels_last:
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]
        if self.out_norms is not None:
            features = [norm(f) for norm, f in zip(self.out_norms, features, strict=True)]
        return features

    # --- layer-wise learning-rate decay -----------------------------------------------------

    @property
    def num_layers(self) -> int:
        """Layers counted by the decay rule (MMSegmentation's ``num_layers + 2``): parameters of
        layer ``i`` get ``lr * decay ** (num_layers - i - 1)``."""
        if self._family == "convnext":
            # MMSegmentation's ConvNeXt recipes: num_layers 6 (T/S) or 12 (B/L/XL), stage_wise.
            configured = self.lr_decay_num_layers
            if configured is None:
                configured = 6 if self.lr_decay_type == "stage_wise" else 12
            return int(configured) + 2
        if self._family == "swin":
            return sum(self._depths()) + 2
        raise AttributeError(f"backbone '{self.name}' has no layer-wise lr decay rule (ConvNeXt "
                             "and Swin have one)")

    def layer_id(self, param_name: str) -> int:
        """Decay layer of a parameter, named relative to this module (``body.stages_2.blocks.3
        .conv_dw.weight``, ``out_norms.0.weight``; a leading ``backbone.`` is ignored). Anything
        outside the timm stages (the output norms, a head) gets ``num_layers - 1``: full lr."""
        num_layers = self.num_layers
        name = param_name.removeprefix("backbone.").removeprefix("body.")
        if self._family == "convnext":
            return _convnext_layer_id(name, num_layers, self.lr_decay_type)
        return _swin_layer_id(name, num_layers, self._depths())

    def _depths(self) -> list[int]:
        """Blocks per stage, read from the parameter names (``stages_i``/``layers_i.blocks.b``)."""
        depth: dict[int, int] = {}
        for name, _ in self.body.named_parameters():
            match = _STAGE_BLOCK.match(name)
            if match and match.group(2) == "blocks" and match.group(3) is not None:
                stage, block = int(match.group(1)), int(match.group(3))
                depth[stage] = max(depth.get(stage, 0), block + 1)
        return [depth.get(i, 0) for i in range(max(depth) + 1)] if depth else []


# "stages_2.blocks.3.x" (ConvNeXt) or "layers_1.downsample.norm" (Swin); "." or "_" before the
# index so the names of a plain (not features-only) timm model match too.
_STAGE_BLOCK = re.compile(r"^(?:stages|layers)[._](\d+)\.(blocks|downsample)(?:\.(\d+))?")


def _layer_family(name: str, body: nn.Module) -> str | None:
    names = [n for n, _ in body.named_parameters()]
    if "convnext" in name and any(n.startswith("stem") for n in names):
        return "convnext"
    if "swin" in name and any(n.startswith("patch_embed") for n in names):
        return "swin"
    return None


def _convnext_layer_id(name: str, num_layers: int, decay_type: str) -> int:
    """MMSegmentation's ``get_stage_id_for_convnext`` / ``get_layer_id_for_convnext`` on timm's
    names: timm's ``stem`` is MMSeg's ``downsample_layers.0`` and ``stages_i.downsample`` its
    ``downsample_layers.i``."""
    if name.startswith("stem"):
        return 0
    match = _STAGE_BLOCK.match(name)
    if match is None:
        return num_layers - 1
    stage, part = int(match.group(1)), match.group(2)
    if decay_type == "stage_wise":
        return 0 if part == "downsample" else stage + 1
    max_layer_id = num_layers - 2  # MMSeg's configured num_layers
    if part == "downsample":
        return {1: 2, 2: 3}.get(stage, max_layer_id)
    block = int(match.group(3))
    return {0: 1, 1: 2, 2: 3 + block // 3}.get(stage, max_layer_id)


def _swin_layer_id(name: str, num_layers: int, depths: list[int]) -> int:
    """One id per Swin block (SimMIM's ``get_swin_layer``): patch embedding 0, block ``b`` of
    stage ``s`` ``sum(depths[:s]) + b + 1``. timm merges patches at the start of stage ``s``
    (``layers_s.downsample``); the original Swin does it at the end of stage ``s - 1``, which
    SimMIM puts in that stage's last layer, ``sum(depths[:s])``."""
    if name.startswith(("patch_embed", "absolute_pos_embed", "mask_token")):
        return 0
    match = _STAGE_BLOCK.match(name)
    if match is None:
        return num_layers - 1
    stage, part = int(match.group(1)), match.group(2)
    if part == "downsample":
        return sum(depths[:stage])
    return sum(depths[:stage]) + int(match.group(3)) + 1


def _pad_windows_before_shift(body: nn.Module) -> None:
    """Make timm's Swin blocks pad a map to whole windows *before* the cyclic shift.

    timm 1.0 shifts first and pads after (huggingface/pytorch-image-models#2438), so on maps that
    are not a multiple of the window (every map of a 512x512 input: 128, 64, 32, 16 vs window 7)
    the shift mask is built for the padded grid while the wrapped-around rows sit before the
    padding: tokens from opposite image borders attend to each other. The Swin and MMSegmentation
    implementations pad first; this does the same, with the same weights and output shapes.
    """
    try:
        from timm.models.swin_transformer import SwinTransformerBlock
    except ImportError:  # pragma: no cover - timm without Swin
        return
    for module in body.modules():
        if isinstance(module, SwinTransformerBlock):
            module._attn = types.MethodType(_swin_attn_pad_first, module)


def _swin_attn_pad_first(block, x: torch.Tensor) -> torch.Tensor:
    from timm.models.swin_transformer import window_partition, window_reverse

    _, height, width, channels = x.shape
    win_h, win_w = block.window_size
    pad_h, pad_w = (win_h - height % win_h) % win_h, (win_w - width % win_w) % win_w
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    padded_h, padded_w = x.shape[1], x.shape[2]
    shift = tuple(block.shift_size)
    mask = None
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        mask = block.get_attn_mask(x)  # regions of the padded, shifted grid
    windows = window_partition(x, block.window_size).view(-1, win_h * win_w, channels)
    windows = block.attn(windows, mask=mask)
    x = window_reverse(windows.view(-1, win_h, win_w, channels), block.window_size, padded_h,
                       padded_w)
    if any(shift):
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


def check_checkpoint_keys(checkpoint: str | Path, name: str, timm_kwargs: dict) -> Path:
    """timm loads a features-only model non-strictly; refuse a file that does not fit instead of
    silently training from partly random weights. Returns the file's path, for timm to load."""
    state = read_state_dict(checkpoint, "backbone.checkpoint",
                            f"a saved state dict (.pth or .safetensors) of timm's '{name}'")
    path = Path(checkpoint).expanduser()
    with torch.device("meta"):  # key names only: no memory, no initialisation
        reference = timm.create_model(name, **timm_kwargs)
    classifier = reference.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    model_keys = {k: v for k, v in reference.state_dict().items()
                  if not k.startswith(tuple(c + "." for c in classifier))}
    # Keys only: timm adapts shapes itself (e.g. resamples ViT position embeddings to img_size)
    # and refuses a real mismatch when it loads.
    fit = fit_state_dict(model_keys, state, compare_shapes=False,
                         ignored={f"{c}.{p}" for c in classifier for p in ("weight", "bias")})
    if fit.problems:
        raise misfit_error("backbone.checkpoint", path, f"timm model '{name}'", fit.problems,
                           f"Use a state dict saved from timm's '{name}' (or choose the backbone "
                           "that matches the file).")
    return path


def create_from_checkpoint(name: str, checkpoint: str | Path, kwargs: dict,
                           timm_kwargs: dict) -> tuple[nn.Module, PretrainedSource]:
    """``timm.create_model(name, **kwargs)`` with the weights of a local file, checked first by
    :func:`check_checkpoint_keys` (``timm_kwargs``: the model's own arguments). timm then loads
    the file as it would a download (``weights_only=True``; it drops the classifier, resamples
    position embeddings and maps the keys to a features-only model). It reads the file itself:
    a state dict handed over in ``pretrained_cfg`` would be deep-copied into the model's config."""
    path = check_checkpoint_keys(checkpoint, name, timm_kwargs)
    try:
        body = timm.create_model(name, pretrained=True,
                                 **{**kwargs, "pretrained_cfg_overlay": dict(file=str(path))})
    except RuntimeError as err:
        if "state_dict" in str(err) or "size mismatch" in str(err):
            raise ConfigError(f"backbone.checkpoint={checkpoint} does not fit timm model "
                              f"'{name}': {first_line(err)}") from err
        raise
    return body, checkpoint_source(path)
