"""The arrays of a run: the data set, a validation split carved from its training part, as plain numpy arrays.

The driver loads them once and puts them in the object store; every actor reads the same arrays (zero-copy on a node).
"""
from raydistill.data import load_dataset
from raydistill.errors import ConfigError
from raydistill.seeding import derive_seed


def load_run_data(config):
    """(spec, arrays) for a resolved config: arrays has train/val/test x and y."""
    options = dict(config.data.options)
    if config.data.download:
        options["download"] = True
    dataset = load_dataset(config.data.name, config.data.root, **options)
    if dataset.spec.task != config.task:
        raise ConfigError("task", config.task, f"must be {dataset.spec.task}: data set {config.data.name} is a "
                          f"{dataset.spec.task} task")
    dataset, val_x, val_y = dataset.split_validation(config.data.val_fraction, derive_seed(config.seed, "val-split"))
    arrays = {"train_x": dataset.train_x, "train_y": dataset.train_y, "val_x": val_x, "val_y": val_y,
              "test_x": dataset.test_x, "test_y": dataset.test_y}
    return dataset.spec, arrays
