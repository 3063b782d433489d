"""Image sources and the biased-dataset builders (CMNIST-DD, CCIFAR10-DD)."""

from distill_core.data.bias import assign_attributes, attribute_count_matrix, class_milestones
from distill_core.data.biased import BiasedDataset, DatasetConfig, build_biased_dataset
from distill_core.data.sources import SOURCES, DatasetUnavailable, SourceData, load_source

__all__ = [
    "SOURCES",
    "BiasedDataset",
    "DatasetConfig",
    "DatasetUnavailable",
    "SourceData",
    "assign_attributes",
    "attribute_count_matrix",
    "build_biased_dataset",
    "class_milestones",
    "load_source",
]
