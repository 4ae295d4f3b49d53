"""Reading pickled data without running code from it.

A pickle names the functions and classes ("globals") that rebuild its objects, and loading it calls
them: a crafted file can name `os.system`. scalr reads pickles of two kinds only, through an
unpickler that admits a fixed list of globals and refuses any other with a DatasetError naming the
file and the global:

- PandaSet's tables (`*.pkl.gz`): a pandas DataFrame of numbers and strings, as pandas 1.x to 3.x
  pickle it (pandas 3 keeps even column names as Arrow strings: the Arrow arrays are validated in
  full before pandas sees them); pandas' own renames of old class locations apply.
- Object arrays of strings in `.npy` files (the released ScaLR code's frame lists).

Everything admitted only builds arrays, indexes and frames from the data it is given.
"""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from pipeline.errors import DatasetError
from pipeline.files import check_regular, read_regular

# What numpy arrays (plain or of Python objects) are rebuilt with, numpy 1.x and 2.x.
NUMPY_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("builtins", "bytearray"),
        ("__builtin__", "bytearray"),
        ("_codecs", "encode"),  # protocol 2 writes bytes as latin-1 text
    }
)
# What a DataFrame of numbers and object (str) columns is rebuilt with, pandas 1.x to 3.x.
DATAFRAME_GLOBALS = NUMPY_GLOBALS | frozenset(
    {
        ("builtins", "slice"),
        ("__builtin__", "slice"),
        ("functools", "partial"),  # pandas 1.3-1.5 pickle blocks as partial(new_block, ndim=2)
        ("pandas", "DataFrame"),
        ("pandas.core.frame", "DataFrame"),
        ("pandas", "Index"),
        ("pandas", "RangeIndex"),
        ("pandas.core.indexes.base", "Index"),
        ("pandas.core.indexes.base", "_new_Index"),
        ("pandas.core.indexes.range", "RangeIndex"),
        ("pandas.core.indexes.numeric", "Int64Index"),
        ("pandas.core.indexes.numeric", "UInt64Index"),
        ("pandas.core.indexes.numeric", "Float64Index"),
        ("pandas.core.internals.managers", "BlockManager"),
        ("pandas.core.internals.blocks", "new_block"),
        ("pandas._libs.internals", "_unpickle_block"),
        # strings, pandas 2.x-3.x: Arrow-backed arrays of a string dtype
        ("pandas", "StringDtype"),
        ("pandas.core.arrays.string_", "StringDtype"),
        ("pandas.arrays", "ArrowStringArray"),
        ("pandas.core.arrays.string_arrow", "ArrowStringArray"),
        ("pyarrow.lib", "type_for_alias"),
        ("pyarrow.lib", "py_buffer"),
        ("pyarrow.lib", "_restore_array"),  # replaced by _validated_arrow_array
    }
)


def _validated_arrow_array(data):
    """pyarrow's own unpickling of an array, then its full validation: lengths, offsets and UTF-8
    checked against the buffers, so a crafted array never reaches pandas."""
    import pyarrow.lib  # noqa: PLC0415 - pyarrow: only tables pickled by pandas 2-3 with strings need it

    array = pyarrow.lib._restore_array(data)
    array.validate(full=True)
    return array


REPLACED = {("pyarrow.lib", "_restore_array"): _validated_arrow_array}


class _Restricted(pickle.Unpickler):
    """An unpickler that resolves only `allowed` globals (after `renames`)."""

    def __init__(self, file, path: Path, allowed: frozenset, what: str, renames: dict | None = None):
        super().__init__(file)
        self.path, self.allowed, self.what, self.renames = path, allowed, what, renames or {}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            needs = f"{self.what} needs no such object (scalr runs no code from data)"
            raise DatasetError(self.path, f"refused to unpickle {module}.{name}: {needs}")
        if (module, name) in REPLACED:
            return REPLACED[(module, name)]
        return super().find_class(*self.renames.get((module, name), (module, name)))


def _pandas_renames() -> dict:
    """pandas' own map of old class locations to current ones (Int64Index -> Index, ...)."""
    try:  # pandas: 0.7 s to import, only PandaSet needs it; the map is pandas' own, kept since 1.x
        import pandas.compat.pickle_compat as compat  # noqa: PLC0415
    except ImportError:
        return {}
    return dict(getattr(compat, "_class_locations_map", {}))


def load_dataframe(path: Path):
    """The pandas DataFrame pickled (gzip or plain) in `path`, or a DatasetError naming the file."""
    import pandas as pd  # noqa: PLC0415 - 0.7 s to import, and only PandaSet needs it

    path = Path(path)
    try:
        raw = read_regular(path, DatasetError)
    except FileNotFoundError:
        raise DatasetError(path, "file is missing") from None
    except OSError as err:
        raise DatasetError(path, f"unreadable ({err.strerror})") from None
    what = "a pandas DataFrame of numbers and strings"
    try:
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        frame = _Restricted(io.BytesIO(data), path, DATAFRAME_GLOBALS, what, _pandas_renames()).load()
    except DatasetError:
        raise
    except Exception as err:  # noqa: BLE001 - unpickling can fail in any way: all mean a bad file
        raise DatasetError(path, f"unreadable pickled table ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(frame, pd.DataFrame):
        raise DatasetError(path, f"holds a {type(frame).__name__}, not a pandas DataFrame")
    return frame


def load_npy(path: Path) -> np.ndarray:
    """An array from a `.npy` file: plain arrays as numpy reads them; object arrays (which numpy
    pickles) through the restricted unpickler, holding only strings and numbers."""
    path = Path(path)
    check_regular(path, DatasetError)
    try:
        with open(path, "rb") as f:
            version = npy_format.read_magic(f)
            read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            if not dtype.hasobject:
                f.seek(0)
                return np.load(f, allow_pickle=False)
            array = _Restricted(f, path, NUMPY_GLOBALS, "an array of strings").load()
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(path, "file is missing") from None
    except Exception as err:  # noqa: BLE001 - a damaged header or body: a bad file
        raise DatasetError(path, f"not a readable .npy file ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(array, np.ndarray) or array.shape != shape:
        raise DatasetError(path, "the pickled array does not match the file's header")
    if any(not isinstance(v, str | bytes | int | float) for v in array.ravel()):
        raise DatasetError(path, "the object array holds other things than strings and numbers")
    return array
