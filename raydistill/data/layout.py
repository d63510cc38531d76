"""The on-disk layout of a prepared set (a folder), its index and its checks: what ``raydistill data prepare`` writes
and every reader (the memory maps, the node cache) reads::

    index.json          classes, size S, channels C, the view the set is trained with, channel mean and std, per
                        split its files with their byte counts and checksums, the source files skipped, the digest
    train-00000.u8 ...  uint8 [n, C, S, S], row-major, the split's samples in source order, a shard per file
    train-labels.npy    int64 [N]
    train-sizes.npy     int32 [N, 2]: each image's height and width before it was resized to S x S
    train-names.txt     each sample's source: a file relative to the source folder, or NAME:SPLIT[i]
    test-...            the same for the test split (ImageNet's official val)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from raydistill.errors import ConfigError

FORMAT = "raydistill-prepared"
VERSION = 1
INDEX = "index.json"
SPLITS = ("train", "test")
SIDE_FILES = ("labels", "sizes", "names")          # beside a split's shards: {split}-labels.npy, ...
SIDE_SUFFIX = {"labels": ".npy", "sizes": ".npy", "names": ".txt"}
CHECKSUM = "blake2b"
READ_BLOCK = 8 << 20                                 # bytes hashed or copied at a time


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.u8"


def side_name(split: str, kind: str) -> str:
    return f"{split}-{kind}{SIDE_SUFFIX[kind]}"


def file_checksum(path) -> str:
    """The blake2b (16 bytes, hex) of a file, read in blocks."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(READ_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def set_digest(index: dict) -> str:
    """The digest of a prepared set: of everything its index says but where it came from, so the same images, labels
    and settings give the same digest wherever they were prepared (every file enters through its checksum)."""
    content = {k: v for k, v in index.items() if k not in ("digest", "source")}
    return hashlib.blake2b(json.dumps(content, sort_keys=True).encode(), digest_size=16).hexdigest()


def index_files(index: dict) -> list:
    """Every file the index lists, as its entries ``{file, bytes, blake2b}``: shards, then labels, sizes, names."""
    files = []
    for split in SPLITS:
        entry = index["splits"][split]
        files += entry["shards"] + [entry[kind] for kind in SIDE_FILES]
    return files


def _refuse(path, allowed):
    raise ConfigError("data.root", str(path), allowed)


def read_index(root) -> dict:
    """The index of the prepared set at ``root`` (a local folder), checked against its files' presence and byte counts
    (cheap: no file is read; ``verify`` reads them all)."""
    root = Path(root)
    path = root / INDEX
    if not path.is_file():
        _refuse(root, f"a prepared set (a folder with {INDEX}: raydistill data prepare SOURCE {root})")
    try:
        index = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        _refuse(path, f"the index of a prepared set, in JSON ({err})")
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        _refuse(path, f"the index of a prepared set ({FORMAT} version {VERSION}); prepare the set again")
    try:
        sample_bytes = index["channels"] * index["size"] * index["size"]
        for split in SPLITS:
            entry = index["splits"][split]
            if sum(s["count"] for s in entry["shards"]) != entry["count"]:
                _refuse(path, f"an index whose {split} shards add up to its {split} count; prepare the set again")
            for shard in entry["shards"]:
                if shard["bytes"] != shard["count"] * sample_bytes:
                    _refuse(path, f"{shard['file']}: {shard['count']} samples of {sample_bytes} bytes; the index "
                                  f"says {shard['bytes']} bytes")
        files = index_files(index)
    except (KeyError, TypeError) as err:
        _refuse(path, f"the index of a prepared set ({type(err).__name__}: {err}); prepare the set again")
    for entry in files:
        file = root / entry["file"]
        size = file.stat().st_size if file.is_file() else None
        if size != entry["bytes"]:
            found = "it is missing" if size is None else f"it has {size}"
            _refuse(file, f"a file of {entry['bytes']} bytes, as {INDEX} lists it ({found}); the set is incomplete "
                          "or damaged: copy or prepare it again")
    if index.get("digest") != set_digest(index):
        _refuse(path, "an index whose digest matches its content (it was edited); prepare the set again")
    return index


def verify(root) -> dict:
    """Reads every file of a prepared set and checks it against its checksum in the index; returns the index."""
    root = Path(root)
    index = read_index(root)
    for entry in index_files(index):
        if file_checksum(root / entry["file"]) != entry[CHECKSUM]:
            _refuse(root / entry["file"], f"the bytes {INDEX} lists ({CHECKSUM} {entry[CHECKSUM]}); the file was "
                                          "changed or damaged: copy or prepare the set again")
    return index
