"""Stores behind the `Backend` protocol."""

from .base import NO_VALUE, Backend, BackendError, NoValue
from .memory import MemoryBackend

__all__ = ["NO_VALUE", "Backend", "BackendError", "MemoryBackend", "NoValue"]
