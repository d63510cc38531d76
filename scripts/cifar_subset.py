"""The first N training and M test images of a CIFAR-10 python-batch folder, written as a smaller folder of the same
layout (``data_batch_1``, ``test_batch``), for results that must fit a CPU's time.

    python scripts/cifar_subset.py data/cifar10-subset data/cifar10-5k --train 5000 --test 2000

"First" is the folder's own order (the CIFAR-10 subset's batches are already shuffled and class-balanced), so the
same arguments give the same images. The batches are read through raydistill's restricted unpickler and written as
plain dicts of a uint8 array and a list of labels, which it reads back.
"""
from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np


def cifar_subset(source: str, target: Path, train: int, test: int) -> Path:
    from raydistill.data import load_dataset

    full = load_dataset("cifar10", source)
    if train > len(full.train_x) or test > len(full.test_x):
        raise SystemExit(f"{source} holds {len(full.train_x)} train / {len(full.test_x)} test images; "
                         f"asked for {train} / {test}")
    target.mkdir(parents=True, exist_ok=True)
    for name, x, y in (("data_batch_1", full.train_x[:train], full.train_y[:train]),
                       ("test_batch", full.test_x[:test], full.test_y[:test])):
        batch = {"data": np.ascontiguousarray(x.reshape(len(x), -1)), "labels": [int(v) for v in y]}
        (target / name).write_bytes(pickle.dumps(batch, protocol=4))
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a CIFAR-10 folder (cifar-10-batches-py or its parent)")
    parser.add_argument("target", help="the folder to write")
    parser.add_argument("--train", type=int, required=True, help="the first N training images")
    parser.add_argument("--test", type=int, required=True, help="the first M test images")
    args = parser.parse_args(argv)
    print(cifar_subset(args.source, Path(args.target), args.train, args.test))
    return 0


if __name__ == "__main__":
    sys.exit(main())
