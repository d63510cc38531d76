"""Deterministic seeds derived from (seed, purpose, indices): the same numbers in every process and runtime."""
import hashlib

import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings; stable across processes (no Python hash randomisation)."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(*parts) -> torch.Generator:
    """A CPU torch.Generator seeded by ``derive_seed(*parts)``; CPU so that CPU and GPU runs draw the same numbers."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(*parts))
    return gen


def seed_device(device: torch.device, *parts) -> None:
    """Reseeds the global generator a forward pass draws from (dropout), for the CPU or this CUDA device only.

    ``torch.manual_seed`` would also queue a lazy CUDA seeding, which records a stack trace on every call."""
    seed = derive_seed(*parts)
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
