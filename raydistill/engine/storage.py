"""Mirror a run directory to shared storage: a local path or a pyarrow filesystem URI (s3://, gs://, hdfs://, file://).

Multi-node runs write on the driver's node; `train.storage` copies the run directory there after every checkpoint and
at the end, so results survive the cluster.
"""
from __future__ import annotations

from pathlib import Path

from raydistill.errors import ConfigError

def resolve_storage(uri: str):
    """(filesystem, path) for a storage location; ConfigError when pyarrow does not know the scheme."""
    from pyarrow import fs

    if "://" not in uri:
        return fs.LocalFileSystem(), str(Path(uri).absolute())
    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as err:  # noqa: BLE001 — pyarrow raises several types for an unusable URI
        raise ConfigError("train.storage", uri, f"is not a filesystem pyarrow can open ({err})") from None


def mirror(run_dir: Path, uri: str) -> None:
    from pyarrow import fs

    filesystem, path = resolve_storage(uri)
    filesystem.create_dir(path, recursive=True)
    fs.copy_files(str(Path(run_dir).absolute()), path, source_filesystem=fs.LocalFileSystem(),
                  destination_filesystem=filesystem)
