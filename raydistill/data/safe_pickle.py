"""A restricted unpickler for data pickles (the CIFAR python batches).

A pickle can call any importable function while it loads; data files downloaded from elsewhere must not. This
unpickler admits only the globals that a pickled dict of numpy arrays, lists, strings and bytes needs, and refuses
every other one with ``pickle.UnpicklingError`` naming it, before anything is called.
"""
import pickle

import numpy as np

try:  # numpy 2 moved the array reconstructor; pickles name either place
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct

_LATIN1 = ("latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1")


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """Stand-in for ``_codecs.encode``: Python 3 writes bytes into protocol-2 pickles as ``encode(str, 'latin1')``."""
    if not isinstance(text, str) or str(encoding).lower() not in _LATIN1:
        raise pickle.UnpicklingError(f"refused _codecs.encode({type(text).__name__}, {encoding!r}): only str to latin1")
    return text.encode("latin1", errors)


def _bytes(*args):
    """Stand-in for ``builtins.bytes``: Python 3 writes empty bytes into protocol-2 pickles as ``bytes()``."""
    if not args:
        return b""
    return _latin1_encode(*args)


# (module, name) -> the object the pickle gets; everything else is refused
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytes"): _bytes,
    ("__builtin__", "bytes"): _bytes,
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only hands out ``ALLOWED_GLOBALS``."""

    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: "
                "a data pickle may only rebuild numpy arrays, dicts, lists, str and bytes"
            ) from None


def safe_load(file, encoding: str = "latin1"):
    """Unpickle from a path or a binary file object through ``RestrictedUnpickler``.

    ``encoding='latin1'`` reads the Python-2 strings of the original CIFAR files as ``str`` and their array buffers
    byte for byte.
    """
    if hasattr(file, "read"):
        return RestrictedUnpickler(file, encoding=encoding).load()
    with open(file, "rb") as f:
        return RestrictedUnpickler(f, encoding=encoding).load()
