"""Reading rows of a store's arrays straight from their chunk files (CRC-32C, blosc, columns
transposed back), bypassing zarr's generic read path where the codecs are the store's own."""

from __future__ import annotations

from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import TransposeCodec

from pipeline.files import read_regular
from storage.layout import chunk_key


def stored_axis_order(arr: zarr.Array) -> tuple[int, ...] | None:
    """The axis order of a chunk's bytes if the array uses the store's own codecs (an optional
    transpose, little-endian bytes, blosc, CRC-32C), else None."""
    codecs = list(arr.metadata.codecs)
    order = tuple(codecs.pop(0).order) if codecs and isinstance(codecs[0], TransposeCodec) else tuple(range(arr.ndim))
    names = [type(c).__name__ for c in codecs]
    endian = str(getattr(codecs[0].endian, "value", codecs[0].endian)) if names[:1] == ["BytesCodec"] else None
    if names != ["BytesCodec", "BloscCodec", "Crc32cCodec"] or endian != (
        "None" if np.dtype(arr.dtype).itemsize == 1 else "little"
    ):
        return None
    return order


def read_rows(folder: Path, arr: zarr.Array, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a row-chunked array. For the store's own codecs (an optional
    transpose, little-endian bytes, blosc, CRC-32C) the chunk files are read here: zarr-python's
    generic read path costs ~2-3 ms a call in a one-thread loader worker, a chunk's CRC check and
    decode ~0.25 ms. A missing chunk file is an error here, never fill values. An array with other
    codecs is refused, never decoded: Zarr can name codecs that unpickle (code from data)."""
    order = stored_axis_order(arr)
    if order is None:
        raise ValueError(f"{folder}: codecs other than the store's own; refused")
    stop = min(stop, arr.shape[0])
    rows, tail = arr.chunks[0], arr.shape[1:]
    chunk_shape = (rows, *tail)
    stored_shape = tuple(chunk_shape[axis] for axis in order)  # the chunk's bytes, axes in stored order
    dtype = np.dtype(arr.dtype).newbyteorder("<")
    blocks = []
    for i in range(start // rows, (stop - 1) // rows + 1) if stop > start else ():
        raw = read_regular(folder / chunk_key(i, arr.ndim))
        if len(raw) < 4 or google_crc32c.value(raw[:-4]).to_bytes(4, "little") != raw[-4:]:
            raise ValueError(f"chunk {i}: stored and computed CRC-32C differ")
        chunk = (
            np.frombuffer(blosc.decompress(raw[:-4]), dtype=dtype).reshape(stored_shape).transpose(np.argsort(order))
        )
        lo, hi = max(start - i * rows, 0), min(stop - i * rows, rows)
        blocks.append(chunk[lo:hi])
    if not blocks:
        return np.zeros((0, *tail), dtype=dtype)
    return np.concatenate(blocks) if len(blocks) > 1 else blocks[0].copy()  # C order, writable
