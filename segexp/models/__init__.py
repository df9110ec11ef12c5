"""Models: :class:`Segmentor` wires a backbone to a decode head; :func:`build_model` builds it
from a composed config (groups ``model``, ``backbone``, ``head``)."""

from omegaconf import DictConfig

from segexp.config import instantiate
from segexp.errors import ConfigError
from segexp.models.segmentor import Segmentor


def build_model(cfg: DictConfig) -> Segmentor:
    if cfg.model.get("num_classes", 0) is None:
        raise ConfigError(
            "model.num_classes is null: it comes from dataset.num_classes, which this dataset "
            "leaves to be counted from its masks when the data is built (train.py does that "
            "first). Set dataset.num_classes=<N> or dataset.class_names=[...] here.")
    return instantiate(cfg.model, backbone=instantiate(cfg.backbone),
                       decode_head=instantiate(cfg.head))


__all__ = ["Segmentor", "build_model"]
