"""A prepared set kept in object storage (or any ``pyarrow.fs`` URI) copied into a node-local cache, once per node.

The copy is checked file by file against the checksums of the set's index while it is made, lands in a temporary
folder and is renamed whole, so a folder in the cache is complete or absent; processes of one node that ask at once
wait on a lock for the first one's copy instead of copying again. The cached folder is named by the set's digest: a
set prepared again (other images, other size) never reuses a stale copy.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from pathlib import Path

from raydistill.data.layout import CHECKSUM, INDEX, READ_BLOCK, index_files, read_index, set_digest
from raydistill.errors import ConfigError

COMPLETE = ".complete"      # in a cached folder: the digest of the set, written last


def is_uri(root) -> bool:
    return "://" in str(root)


def localize(root, cache_dir=None) -> Path:
    """The local folder of a prepared set: ``root`` itself when it is a local path (or a file:// URI without a cache);
    else its copy in ``cache_dir``, made now if this node has none."""
    if root is None:
        raise ConfigError("data.root", root, "the folder (or URI) of a prepared set")
    if cache_dir is None:
        if not is_uri(root):
            return Path(root)
        if str(root).startswith("file://"):
            return Path(str(root)[len("file://"):])
        raise ConfigError("data.cache_dir", None, f"a node-local folder to copy {root} into (data.root is a URI)")
    filesystem, base, index_bytes, index = _remote_index(root)
    cache = _writable(cache_dir)
    target = cache / f"{Path(base).name}-{index['digest'][:16]}"
    if _complete(target, index):
        return target
    with open(cache / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                 # another process of this node may be copying it
        if not _complete(target, index):
            _copy(filesystem, base, root, index, index_bytes, target)
    return target


def _remote_index(root):
    """(filesystem, base path, the index's bytes, the index) of a prepared set at a ``pyarrow.fs`` URI (or folder)."""
    from pyarrow import fs

    try:
        filesystem, base = fs.FileSystem.from_uri(str(root) if is_uri(root) else str(Path(root).resolve()))
        index_bytes = _read_bytes(filesystem, f"{base}/{INDEX}")
        index = json.loads(index_bytes)
    except (OSError, ValueError) as err:
        raise ConfigError("data.root", str(root), f"a prepared set readable with pyarrow.fs ({err})") from None
    if not isinstance(index, dict) or index.get("digest") != set_digest(index):
        raise ConfigError("data.root", f"{root}/{INDEX}", "the index of a prepared set (its digest does not match)")
    return filesystem, base, index_bytes, index


def remote_index(root) -> dict:
    """The index of a prepared set at a URI, read without copying the set (a driver that reads no image)."""
    return _remote_index(root)[3]


def read_remote(root, name: str) -> bytes:
    """One file of a prepared set at a URI (its labels: a driver holds them, and reads no image)."""
    from pyarrow import fs

    try:
        filesystem, base = fs.FileSystem.from_uri(str(root))
        return _read_bytes(filesystem, f"{base}/{name}")
    except OSError as err:
        raise ConfigError("data.root", f"{root}/{name}", f"a file pyarrow.fs can read ({err})") from None


def _read_bytes(filesystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def _writable(cache_dir) -> Path:
    cache = Path(cache_dir)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / ".raydistill-write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError("data.cache_dir", str(cache_dir), f"a folder this node can write ({err.strerror or err})") \
            from None
    return cache


def _complete(target: Path, index: dict) -> bool:
    """A cached copy is whole: its marker names this digest and every file has the size the index gives."""
    marker = target / COMPLETE
    if not marker.is_file() or marker.read_text() != index["digest"]:
        return False
    try:
        read_index(target)
    except ConfigError:
        return False
    return True


def _copy(filesystem, base: str, root, index: dict, index_bytes: bytes, target: Path) -> None:
    files = index_files(index)
    needed = sum(entry["bytes"] for entry in files)
    free = shutil.disk_usage(target.parent).free
    if needed > free:
        raise ConfigError("data.cache_dir", str(target.parent), f"room for the set ({needed / 2**30:.1f} GiB; "
                                                                 f"{free / 2**30:.1f} GiB free)")
    partial = target.parent / f".{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)        # an incomplete copy of an earlier attempt
    partial.mkdir()
    for entry in files:
        digest = hashlib.blake2b(digest_size=16)
        with filesystem.open_input_stream(f"{base}/{entry['file']}") as source, \
                open(partial / entry["file"], "wb") as out:
            for block in iter(lambda: source.read(READ_BLOCK), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != entry[CHECKSUM]:
            shutil.rmtree(partial, ignore_errors=True)
            raise ConfigError("data.root", f"{root}/{entry['file']}", f"the bytes {INDEX} lists ({CHECKSUM} "
                                                                       f"{entry[CHECKSUM]}); the copy differs")
    (partial / INDEX).write_bytes(index_bytes)
    (partial / COMPLETE).write_text(index["digest"])
    partial.rename(target)
