"""Models: :class:`Segmentor` wires a backbone to a decode head; :func:`build_model` builds it
from a composed config (groups ``model``, ``backbone``, ``head``)."""

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from segexp.errors import SegexpError
from segexp.models.segmentor import Segmentor


def build_model(cfg: DictConfig) -> Segmentor:
    try:
        return instantiate(cfg.model, backbone=instantiate(cfg.backbone),
                           decode_head=instantiate(cfg.head))
    except InstantiationException as err:
        # Hydra wraps errors raised inside targets; surface ours (they explain themselves).
        if isinstance(err.__cause__, SegexpError):
            raise err.__cause__ from None
        raise


__all__ = ["Segmentor", "build_model"]
