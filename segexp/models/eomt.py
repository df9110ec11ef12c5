"""EoMT, the Encoder-only Mask Transformer (Kerssies et al., CVPR 2025, "Your ViT is Secretly an
Image Segmentation Model").

No pixel decoder, no transformer decoder: ``num_queries`` learnt query tokens are put in front of
the ViT's tokens before its last ``num_blocks`` blocks, which then process queries and patches
together. A light head turns the (final-LayerNorm'ed) tokens into a mask-classification output:

* class logits: a linear layer on each query, ``K + 1`` classes (the last = no object);
* mask logits: a 3-layer MLP on each query, dot product with the patch tokens upscaled to stride
  4 by ``ScaleBlock``s (2x2 transposed conv, GELU, 3x3 depthwise conv, LayerNorm; log2(patch) - 2
  of them: 2 for /16, 1 for /14 as the official code's rule).

Training: before each of the last ``num_blocks`` blocks the head predicts masks from the current
tokens (deep supervision: these go in :attr:`MaskPredictions.aux`, shallow to deep) and the block
runs with *masked attention*: a query attends only to the patches inside its predicted mask
(downsampled to the token grid, logit > 0), as in Mask2Former. Mask annealing removes that need:
for each query and image the mask is applied with probability ``p_i`` for block ``i``, and ``p_i``
falls from 1 to 0 during training on a polynomial schedule (power 0.9), block by block, shallow
blocks first. Evaluation runs without any mask (a fully annealed model), so inference is a plain
ViT forward pass plus the head.

The annealing is driven by the training iteration: the trainer calls
:meth:`EoMT.set_progress` before each step. By default block ``i`` of ``B`` anneals from
``(i + 1) / (B + 2)`` to ``(i + 2) / (B + 2)`` of training, which is the official recipes' rule
(ADE20K: 31 epochs ~ 39.1k iterations split in 6 segments of 6520; blocks from 6520-13040 to
26080-32600; Cityscapes and COCO likewise).

The ViT is a :class:`segexp.backbones.vit.ViTBackbone` (timm ``VisionTransformer``, e.g. DINOv2 with
registers re-patched to 16 as EoMT does, or ``Eva`` for DINOv3 with rotary embeddings), in
``self.backbone`` so that the optimizer's backbone/head lr groups and layer-wise decay apply.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segexp.errors import ConfigError
from segexp.models.mask_classification import MaskPredictions
from segexp.models.segmentor import InputSizeCheck
from segexp.nn import ChannelLayerNorm

log = logging.getLogger(__name__)


class ScaleBlock(nn.Module):
    """x2 upsampling of an NCHW map: 2x2 transposed conv, GELU, 3x3 depthwise conv (no bias),
    LayerNorm (eps 1e-6)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels,
                               bias=False)
        self.norm = ChannelLayerNorm(channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv2(self.act(self.conv1(x))))


class EoMTHead(nn.Module):
    """The queries and what turns tokens into predictions (built by :class:`EoMT` with the ViT's
    width, patch size and prefix-token count).

    Args:
        num_queries: learnt query tokens (the official semantic recipes: 100; panoptic and
            instance: 200).
        num_blocks: how many of the last ViT blocks see the queries (4 for ViT-L in the paper).
        num_upscale: ScaleBlocks after the last block (``None``: ``max(1, log2(patch) - 2)``,
            i.e. stride 4 for /16).
    """

    def __init__(self, embed_dim: int, patch_size: int, num_prefix_tokens: int, num_classes: int,
                 num_queries: int = 100, num_blocks: int = 4,
                 num_upscale: int | None = None) -> None:
        super().__init__()
        if num_queries < 1 or num_blocks < 1:
            raise ConfigError(f"head.num_queries={num_queries} and head.num_blocks={num_blocks} "
                              "must both be >= 1.")
        self.num_queries = int(num_queries)
        self.num_blocks = int(num_blocks)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.query = nn.Embedding(self.num_queries, embed_dim)
        self.class_head = nn.Linear(embed_dim, num_classes + 1)
        self.mask_head = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.GELU(),
            nn.Linear(embed_dim, embed_dim), nn.GELU(),
            nn.Linear(embed_dim, embed_dim),
        )
        if num_upscale is None:
            num_upscale = max(1, int(math.log2(patch_size)) - 2)
        self.upscale = nn.Sequential(*[ScaleBlock(embed_dim) for _ in range(int(num_upscale))])

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens``: ``[queries, class/register tokens, patches]``, normalised. Returns class
        logits ``(N, Q, K + 1)`` and mask logits ``(N, Q, h, w)`` on the upscaled grid."""
        queries = tokens[:, :self.num_queries]
        patches = tokens[:, self.num_queries + self.num_prefix_tokens:]
        n, _, c = patches.shape
        features = self.upscale(patches.transpose(1, 2).reshape(n, c, *grid))
        masks = torch.einsum("nqc,nchw->nqhw", self.mask_head(queries), features)
        return self.class_head(queries), masks


def annealing_probability(iteration: float, start: float, end: float, power: float = 0.9) -> float:
    """Probability that a block applies its attention mask at ``iteration``: 1 before ``start``,
    ``(1 - (iteration - start) / (end - start)) ** power`` in between, 0 from ``end`` on."""
    if iteration < start:
        return 1.0
    if iteration >= end:
        return 0.0
    return (1.0 - (iteration - start) / (end - start)) ** power


class EoMT(InputSizeCheck, nn.Module):
    """Encoder-only Mask Transformer on a :class:`~segexp.backbones.vit.ViTBackbone`.

    Args:
        backbone: the ViT (all its blocks and its final LayerNorm are used, whatever
            ``backbone.out_indices`` says).
        decode_head: an :class:`EoMTHead` factory (``conf/head/eomt.yaml``).
        num_classes: K (the class head has K + 1 outputs).
        masked_attention: masked attention (with annealing) in training; false trains without it.
        annealing_start / annealing_end: per masked block, shallow to deep, the fraction of the
            training iterations where its mask probability starts to fall / reaches 0 (``None``:
            the official rule ``(i + 1) / (B + 2)`` / ``(i + 2) / (B + 2)``).
        annealing_power: the polynomial's power (0.9, as the learning-rate schedule's).
        align_corners: bilinear resizing of the masks to the input.
        checkpoint / checkpoint_format / reinit_classifier: whole-model weights
            (:mod:`segexp.models.weights`; ``hf_eomt`` converts transformers' EoMT).

    ``forward(images)`` returns per-pixel class scores ``(N, K, H, W)``; with ``return_aux=True``
    the :class:`MaskPredictions` of the last block, with one ``aux`` pair per masked block.
    """

    mask_classification = True  # returns MaskPredictions: trained by loss=mask_classification

    def __init__(self, backbone: nn.Module, decode_head, num_classes: int,
                 masked_attention: bool = True, annealing_start: Sequence[float] | None = None,
                 annealing_end: Sequence[float] | None = None, annealing_power: float = 0.9,
                 align_corners: bool = False, checkpoint: str | None = None,
                 checkpoint_format: str = "auto", reinit_classifier: bool = False) -> None:
        super().__init__()
        from segexp.backbones.vit import ViTBackbone

        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes}: a segmentation model needs at least 2 "
                              "classes (a binary task is background + foreground = 2).")
        name = getattr(backbone, "name", type(backbone).__name__)
        if not isinstance(backbone, ViTBackbone):
            raise ConfigError(f"model=eomt runs inside a plain ViT, but backbone '{name}' is a "
                              f"{type(backbone).__name__}. Use backbone=dinov2_reg_vits16 (the "
                              "default), dinov2_reg_vitl16, dinov3_vit*16 or vit_*.")
        body = backbone.body
        if len(body.blocks) != backbone.depth or isinstance(body.norm, nn.Identity):
            raise ConfigError(f"model=eomt needs all {backbone.depth} blocks of '{name}' and its "
                              "final LayerNorm: set backbone.out_indices=[-1] and "
                              "backbone.final_norm=last.")
        if getattr(body, "patch_drop", None) is not None and not isinstance(body.patch_drop,
                                                                          nn.Identity):
            raise ConfigError("model=eomt needs every patch token: remove the backbone's patch "
                              "dropout (patch_drop_rate).")
        if backbone.freeze:
            log.warning(f"model=eomt on a frozen backbone '{name}': only the queries and the "
                        "head train (EoMT fine-tunes the ViT; set backbone.freeze=false).")
        self.backbone = backbone
        self.num_classes = num_classes
        self.align_corners = align_corners
        self.decode_head = decode_head(embed_dim=backbone.embed_dim,
                                       patch_size=backbone.patch_size,
                                       num_prefix_tokens=int(body.num_prefix_tokens),
                                       num_classes=num_classes)
        blocks = self.decode_head.num_blocks
        if blocks > backbone.depth:
            raise ConfigError(f"head.num_blocks={blocks} but backbone '{name}' has only "
                              f"{backbone.depth} blocks.")
        self._rope = hasattr(body, "rope")  # timm Eva (DINOv3): blocks take the rotary embedding
        if self._rope:
            # Eva's attention rotates every token after its prefix tokens: the queries, put in
            # front, are prefix tokens too (no position), so those blocks skip them.
            for block in body.blocks[-blocks:]:
                block.attn.num_prefix_tokens += self.decode_head.num_queries
        self.masked_attention = bool(masked_attention)
        default_start = [(i + 1) / (blocks + 2) for i in range(blocks)]
        default_end = [(i + 2) / (blocks + 2) for i in range(blocks)]
        self.annealing_start = [float(v) for v in (annealing_start or default_start)]
        self.annealing_end = [float(v) for v in (annealing_end or default_end)]
        if len(self.annealing_start) != blocks or len(self.annealing_end) != blocks or any(
                not 0 <= s <= e for s, e in zip(self.annealing_start, self.annealing_end)):
            raise ConfigError(f"model.annealing_start={annealing_start} / annealing_end="
                              f"{annealing_end}: give {blocks} fractions each (one per masked "
                              "block, shallow to deep) with start <= end, or null for EoMT's.")
        self.annealing_power = float(annealing_power)
        # Probability of masking per masked block; 1 until the trainer reports progress.
        self.mask_probs = [1.0] * blocks
        if checkpoint:
            from segexp.models.weights import load_weights

            load_weights(self, checkpoint, checkpoint_format, reinit_classifier, num_classes)

    def set_progress(self, iteration: int, total_iterations: int) -> None:
        """Mask annealing: set each masked block's probability for training ``iteration`` (0 =
        the first) of ``total_iterations``."""
        total = max(int(total_iterations), 1)
        self.mask_probs = [
            annealing_probability(iteration, round(s * total), round(e * total),
                                  self.annealing_power)
            for s, e in zip(self.annealing_start, self.annealing_end)]

    # -- forward ---------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        body = self.backbone.body
        x = body.patch_embed(x)
        if self._rope:
            tokens, rope = body._pos_embed(x)
        else:
            tokens, rope = body._pos_embed(x), None
            tokens = body.patch_drop(tokens)
        return body.norm_pre(tokens), rope

    def _attention_mask(self, mask_logits: torch.Tensor, grid: tuple[int, int], num_tokens: int,
                        prob: float) -> torch.Tensor:
        """Boolean ``(N, 1, T, T)`` mask (True = may attend): queries see the patches where their
        mask logit (resized to the token grid) is positive, everything else is open; each
        (image, query) row is opened entirely with probability ``1 - prob`` (annealing)."""
        n, q = mask_logits.shape[:2]
        start = q + self.decode_head.num_prefix_tokens
        mask = torch.ones(n, num_tokens, num_tokens, dtype=torch.bool, device=mask_logits.device)
        small = F.interpolate(mask_logits.detach(), size=grid, mode="bilinear",
                              align_corners=False)
        inside = small.flatten(2) > 0
        if prob < 1:
            inside = inside | (torch.rand(n, q, 1, device=inside.device) > prob)
        mask[:, :q, start:] = inside
        return mask[:, None]

    def forward(self, images: torch.Tensor, return_aux: bool = False):
        self.check_input_size(images.shape[-2], images.shape[-1])
        x = self.backbone.prepare_input(images)
        p = self.backbone.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        body = self.backbone.body
        head = self.decode_head
        tokens, rope = self._embed(x)
        first = len(body.blocks) - head.num_blocks
        masking = self.training and self.masked_attention
        aux: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, block in enumerate(body.blocks):
            attn_mask = None
            if i == first:
                queries = head.query.weight[None].expand(tokens.shape[0], -1, -1)
                tokens = torch.cat([queries.to(tokens.dtype), tokens], dim=1)
            if i >= first and (masking or return_aux):
                class_logits, mask_logits = head(body.norm(tokens), grid)
                aux.append((class_logits, mask_logits))
                prob = self.mask_probs[i - first]
                if masking and prob > 0:
                    attn_mask = self._attention_mask(mask_logits, grid, tokens.shape[1], prob)
            tokens = block(tokens, rope=rope, attn_mask=attn_mask) if self._rope \
                else block(tokens, attn_mask=attn_mask)
        class_logits, mask_logits = head(body.norm(tokens), grid)
        out = MaskPredictions(class_logits, mask_logits, aux)
        if return_aux:
            return out
        return out.semantic_logits(images.shape[-2:], self.align_corners)
