"""TensorStore zarr3 arrays in the activation store's layout.

Every array is [rows, ...] with the sharding_indexed codec: the outer chunk (a "shard", `write_rows` rows) is
the unit one writer commits, the inner chunk (`read_rows` rows) the unit a reader fetches; chunks are zstd
compressed and each shard's index carries a crc32c checksum, so a corrupted shard is detected on read.
Paths may be local folders or any TensorStore kvstore URL (gs://bucket/path, s3://..., memory://...).

Every written unit is stored as a file (`c/<unit>` or `c/<unit>/0`), even one whose values all equal the fill
value (TensorStore would otherwise skip it): so an absent file of a completed shard always means a lost file,
never "all zeros" (completeness.py checks for them, since TensorStore reads an absent file as fill values).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorstore as ts

from emojax.errors import EmojaxError
from emojax.fileio import disk_full, is_disk_full


class StoreError(EmojaxError):
    """An activation store that cannot be created, read or written."""


def kvstore(path: str) -> dict | str:
    """A TensorStore kvstore spec for a local folder or a kvstore URL."""
    return path if "://" in path else {"driver": "file", "path": str(path)}


def zarr3_spec(path: str, shape: tuple[int, ...], dtype: str, write_rows: int, read_rows: int,
               zstd_level: int = 3) -> dict[str, Any]:
    """The spec of a new array; rows are split into shards of `write_rows`, read in chunks of `read_rows`."""
    if write_rows % read_rows:
        raise ValueError(f"write_rows={write_rows} must be a multiple of read_rows={read_rows}")
    rest = list(shape[1:])
    return {
        "driver": "zarr3",
        "kvstore": kvstore(path),
        "store_data_equal_to_fill_value": True,  # see the module docstring: no unit may be silently absent
        "metadata": {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [write_rows, *rest]}},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [read_rows, *rest],
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                           {"name": "zstd", "configuration": {"level": zstd_level}},
                           {"name": "crc32c"}],  # every chunk checksummed, not only the index
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                "index_location": "end",
            }}],
        },
    }


def create(path: str, shape: tuple[int, ...], dtype: str, write_rows: int, read_rows: int,
           replace: bool = False) -> ts.TensorStore:
    """Creates the array. An existing array at `path` is an error (the caller decides about resuming), unless
    `replace`, which deletes it first."""
    try:
        spec = zarr3_spec(path, shape, dtype, write_rows, read_rows)
        return ts.open(spec, create=True, delete_existing=replace).result()
    except ValueError as e:
        raise write_error(path, e, "cannot create array") from None


def open_array(path: str) -> ts.TensorStore:
    """An existing array, opened so that writes store every unit (the same rule as `create`)."""
    try:
        return ts.open({"driver": "zarr3", "kvstore": kvstore(path), "store_data_equal_to_fill_value": True},
                       open=True).result()
    except ValueError as e:
        raise StoreError(f"{path}: cannot open array ({e})") from None


def write_error(path: str, error: BaseException, doing: str = "cannot write") -> EmojaxError:
    """The one-line error for a failed TensorStore write: a DiskFullError on ENOSPC/EDQUOT (what to do is the
    same as for any file emojax writes), else a StoreError naming `path`."""
    text = " ".join(str(error).split())
    if is_disk_full(error):  # TensorStore reports OS errors in a ValueError's text: [os_error_code='28']
        return disk_full(path)
    return StoreError(f"{path}: {doing} ({text}); is the disk full or the location read-only? Shards recorded as "
                      "complete are kept; rerun to finish")


def read_rows(array: ts.TensorStore, start: int, stop: int, source: str = "") -> np.ndarray:
    """Rows [start, stop); a corrupted or truncated shard is a StoreError naming the array and rows."""
    try:
        return array[start:stop].read().result()
    except ValueError as e:
        raise StoreError(f"{source or array.kvstore}: rows {start}:{stop} cannot be read ({e}); the shard is "
                         "corrupted or incomplete: rerun the stage that wrote it") from None
