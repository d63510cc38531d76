"""Data sets as numpy arrays (whole in memory), prepared sets read as memory maps, seeded views as batch tensor ops,
and a restricted unpickler for data pickles."""
from raydistill.data.memory import InMemorySet
from raydistill.data.prepared import PreparedSet, open_prepared  # registers the source "prepared"
from raydistill.data.sources import DataSpec, Dataset, check_root, dataset_names, default_augment, load_dataset
from raydistill.data.views import batch_indices, epoch_indices, make_view, num_steps, to_float

__all__ = [
    "DataSpec",
    "Dataset",
    "InMemorySet",
    "PreparedSet",
    "batch_indices",
    "check_root",
    "dataset_names",
    "default_augment",
    "epoch_indices",
    "load_dataset",
    "make_view",
    "num_steps",
    "open_prepared",
    "to_float",
]
