"""Datasets (``dataset`` config group): each yields ``(image, mask)`` pairs and carries class
names and a palette. See :mod:`segexp.data.base` for the contract a new dataset follows."""

from segexp.data.ade20k import ADE20KDataset
from segexp.data.base import IGNORE_INDEX, Sample, SegmentationDataset, pad_collate
from segexp.data.camvid import CamVidDataset
from segexp.data.cityscapes import CityscapesDataset
from segexp.data.datumaro import DatumaroDataset
from segexp.data.dis5k import DIS5KDataset
from segexp.data.folder import FolderDataset
from segexp.data.kitti import KITTIDataset
from segexp.data.sampler import ResumableSampler
from segexp.data.stanford2d3ds import Stanford2D3DSDataset
from segexp.data.stanford_background import StanfordBackgroundDataset
from segexp.data.synthetic import SyntheticDataset
from segexp.data.voc import VOCDataset

__all__ = ["ADE20KDataset", "CamVidDataset", "CityscapesDataset", "DIS5KDataset",
           "DatumaroDataset", "FolderDataset", "IGNORE_INDEX", "KITTIDataset", "ResumableSampler",
           "Sample", "SegmentationDataset", "Stanford2D3DSDataset", "StanfordBackgroundDataset",
           "SyntheticDataset", "VOCDataset", "pad_collate"]
