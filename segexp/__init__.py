"""segexp: Hydra-composed semantic segmentation experiments."""

__version__ = "0.1.0"
