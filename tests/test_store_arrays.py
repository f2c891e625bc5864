"""zarr3 arrays of the activation store: layout, round trip, and detection of a corrupted shard."""

import json

import ml_dtypes
import numpy as np
import pytest

from emojax.store.arrays import StoreError, create, open_array, read_rows


def test_round_trip_and_layout(tmp_path):
    path = str(tmp_path / "acts")
    arr = create(path, (1000, 24), "bfloat16", write_rows=256, read_rows=64)
    data = np.random.default_rng(0).normal(size=(1000, 24)).astype(ml_dtypes.bfloat16)
    for start in range(0, 1000, 256):  # one write per shard
        stop = min(start + 256, 1000)
        arr[start:stop].write(data[start:stop]).result()
    back = read_rows(open_array(path), 0, 1000)
    assert back.dtype == ml_dtypes.bfloat16 and np.array_equal(back, data)
    meta = json.loads((tmp_path / "acts" / "zarr.json").read_text())
    codec = meta["codecs"][0]
    assert codec["name"] == "sharding_indexed" and codec["configuration"]["chunk_shape"] == [64, 24]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [256, 24]
    assert [c["name"] for c in codec["configuration"]["index_codecs"]][-1] == "crc32c"
    assert any(c["name"] == "zstd" for c in codec["configuration"]["codecs"])


def test_creating_over_an_existing_array_is_refused(tmp_path):
    create(str(tmp_path / "a"), (8, 4), "float32", write_rows=8, read_rows=4)
    with pytest.raises(StoreError, match="cannot create array"):
        create(str(tmp_path / "a"), (8, 4), "float32", write_rows=8, read_rows=4)


def test_corrupted_shard_is_detected_on_read(tmp_path):
    path = tmp_path / "acts"
    arr = create(str(path), (512, 16), "float32", write_rows=256, read_rows=64)
    arr[0:512].write(np.ones((512, 16), np.float32)).result()
    shard = path / "c" / "1" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # flip bits inside the checksummed shard index
    shard.write_bytes(bytes(raw))
    assert np.array_equal(read_rows(open_array(str(path)), 0, 256), np.ones((256, 16), np.float32))
    with pytest.raises(StoreError, match=r"rows 256:512 cannot be read.*corrupted"):
        read_rows(open_array(str(path)), 256, 512, source=str(path))


def test_missing_array_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="cannot open array"):
        open_array(str(tmp_path / "nope"))
