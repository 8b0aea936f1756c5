"""Data: shard writers (Fashion-MNIST, image folders), streaming datasets and DataModules."""

from nativetok.data.datamodule import ImageShardsDataModule, TokenShardsDataModule
from nativetok.data.shards import DatasetIndex

__all__ = ["DatasetIndex", "ImageShardsDataModule", "TokenShardsDataModule"]
