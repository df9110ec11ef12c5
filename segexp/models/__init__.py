"""Models: :class:`Segmentor` wires a backbone to a decode head; :func:`build_model` builds it
from a composed config (groups ``model``, ``backbone``, ``head``)."""

from omegaconf import DictConfig

from segexp.backbones.pretrained import no_pretrained_weights
from segexp.config import instantiate
from segexp.errors import ConfigError
from segexp.models.segmentor import Segmentor


def build_model(cfg: DictConfig, pretrained: bool = True) -> Segmentor:
    """``pretrained=False``: no pretrained backbone weights whatever ``backbone.pretrained`` says,
    and no warning about it (see :func:`segexp.backbones.pretrained.no_pretrained_weights`), for a
    model whose trained weights are loaded next or that needs none."""
    if cfg.model.get("num_classes", 0) is None:
        raise ConfigError(
            "model.num_classes is null: it comes from dataset.num_classes, which this dataset "
            "leaves to be counted from its masks when the data is built (train.py does that "
            "first). Set dataset.num_classes=<N> or dataset.class_names=[...] here.")
    if not pretrained:
        with no_pretrained_weights():
            return build_model(cfg)
    return instantiate(cfg.model, backbone=instantiate(cfg.backbone),
                       decode_head=instantiate(cfg.head))


__all__ = ["Segmentor", "build_model"]
