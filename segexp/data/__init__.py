"""Datasets (``dataset`` config group): each yields ``(image, mask)`` pairs and carries class
names and a palette. See :mod:`segexp.data.base` for the contract a new dataset follows."""

from segexp.data.ade20k import ADE20KDataset
from segexp.data.base import IGNORE_INDEX, Sample, SegmentationDataset, pad_collate
from segexp.data.cityscapes import CityscapesDataset
from segexp.data.folder import FolderDataset
from segexp.data.sampler import ResumableSampler
from segexp.data.stanford_background import StanfordBackgroundDataset
from segexp.data.synthetic import SyntheticDataset

__all__ = ["ADE20KDataset", "CityscapesDataset", "FolderDataset", "IGNORE_INDEX", "ResumableSampler",
           "Sample", "SegmentationDataset", "StanfordBackgroundDataset", "SyntheticDataset",
           "pad_collate"]
