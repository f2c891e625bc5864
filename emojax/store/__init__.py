"""The activation store: TensorStore zarr3 arrays written from a device mesh (dumper.py), read by reader.py."""

from emojax.store.arrays import StoreError
from emojax.store.config import DumpConfig
from emojax.store.dumper import DumpError, dump
from emojax.store.reader import ActivationStore, DocTable, PooledChunk, TokenBatch, TokenBatches

__all__ = ["ActivationStore", "DocTable", "DumpConfig", "DumpError", "PooledChunk", "StoreError", "TokenBatch",
           "TokenBatches", "dump"]
