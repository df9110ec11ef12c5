"""Models: :class:`Segmentor` wires a backbone to a decode head; :func:`build_model` builds it
from a composed config (groups ``model``, ``backbone``, ``head``)."""

from omegaconf import DictConfig

from segexp.config import instantiate
from segexp.models.segmentor import Segmentor


def build_model(cfg: DictConfig) -> Segmentor:
    return instantiate(cfg.model, backbone=instantiate(cfg.backbone),
                       decode_head=instantiate(cfg.head))


__all__ = ["Segmentor", "build_model"]
