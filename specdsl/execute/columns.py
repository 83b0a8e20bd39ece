"""Python values -> Arrow arrays for the store, without ``pyarrow.array`` where a column is plain.

``pyarrow.array`` on a Python list asks pyarrow's pandas shim whether the list is a pandas object, and
the first such question imports pandas when it is installed: 0.3 s of every run on a quiet machine,
over 1 s on a loaded one, for a library the run never uses. A column of one plain type (str, int,
float or bool, with or without None, or only None) is built here from its buffers instead: the same
type and values ``pyarrow.array`` infers, proved equal by tests. Anything else returns None and the
caller keeps ``pyarrow.array``.

pyarrow and numpy (which pyarrow imports anyway) are imported inside the functions.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any, Sequence

_INT32_MAX = 2**31 - 1  # string offsets are int32; a larger column is left to pyarrow (large chunks)


def plain_array(values: Sequence[Any]) -> Any | None:
    """``pyarrow.array(values)`` for a column of one plain Python type (see the module docstring), or
    None when the column is anything else (nested values, mixed types, an int outside int64, a string
    that is not valid Unicode)."""
    import numpy as np
    import pyarrow as pa

    n = len(values)
    kinds = set(map(type, values))
    has_null = type(None) in kinds
    kinds.discard(type(None))
    if not kinds:
        return pa.nulls(n)
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    validity, null_count = None, 0
    if has_null:
        present = np.fromiter((v is not None for v in values), dtype=np.bool_, count=n)
        null_count = n - int(present.sum())
        validity = pa.py_buffer(np.packbits(present, bitorder="little"))
    try:
        if kind is str:
            encoded = [b"" if v is None else v.encode("utf-8") for v in values]
            offsets = np.fromiter(accumulate(map(len, encoded), initial=0), dtype=np.int64, count=n + 1)
            if offsets[-1] > _INT32_MAX:
                return None
            return pa.Array.from_buffers(pa.string(), n, [validity, pa.py_buffer(offsets.astype(np.int32)),
                                                          pa.py_buffer(b"".join(encoded))], null_count=null_count)
        if kind is int:
            data = np.fromiter((0 if v is None else v for v in values), dtype=np.int64, count=n)
            return pa.Array.from_buffers(pa.int64(), n, [validity, pa.py_buffer(data)], null_count=null_count)
        if kind is float:
            data = np.fromiter((0.0 if v is None else v for v in values), dtype=np.float64, count=n)
            return pa.Array.from_buffers(pa.float64(), n, [validity, pa.py_buffer(data)], null_count=null_count)
        if kind is bool:
            data = np.packbits(np.fromiter((v is True for v in values), dtype=np.bool_, count=n), bitorder="little")
            return pa.Array.from_buffers(pa.bool_(), n, [validity, pa.py_buffer(data)], null_count=null_count)
    except (OverflowError, UnicodeEncodeError):
        return None
    return None


def string_array(values: Sequence[str | None]) -> Any:
    """``pyarrow.array(values, type=pyarrow.string())`` for str-or-None values."""
    import pyarrow as pa

    return _plain_as(values, pa.string())


def _plain_as(values: Sequence[Any], arrow_type: Any) -> Any:
    """``pyarrow.array(values, type=arrow_type)``, from buffers when the values are of one plain type."""
    import pyarrow as pa

    array = plain_array(values)
    if array is not None and pa.types.is_null(array.type):
        return pa.nulls(len(values), arrow_type)
    if array is None or not array.type.equals(arrow_type):
        array = pa.array(values, type=arrow_type)
    return array


def string_scalar(value: str) -> Any:
    """``pyarrow.scalar(value, type=pyarrow.string())`` (which also asks the pandas shim) from buffers."""
    return string_array([value])[0]


def joined_text(array: Any) -> bytes:
    """The UTF-8 bytes of every value of a null-free string array, concatenated in order: what
    ``"".join(array.to_pylist())`` encodes, read straight from the array's data buffer."""
    import numpy as np

    if array.null_count:
        raise ValueError("joined_text needs a string array without nulls")
    if len(array) == 0:
        return b""
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset: array.offset + len(array) + 1]
    return array.buffers()[2].to_pybytes()[int(offsets[0]): int(offsets[-1])]


def bool_array(values: Sequence[bool | None]) -> Any:
    """``pyarrow.array(values, type=pyarrow.bool_())`` for bool-or-None values or a numpy bool array."""
    import numpy as np
    import pyarrow as pa

    if isinstance(values, np.ndarray) and values.dtype == np.bool_ and values.ndim == 1:
        bits = pa.py_buffer(np.packbits(values, bitorder="little"))
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, bits], null_count=0)
    return _plain_as(values, pa.bool_())


def numpy_of(column: Any) -> Any:
    """A null-free integer, float or boolean Arrow array (or chunked array) as a numpy array, read from
    its buffers: ``to_numpy()`` also asks the pandas shim (and imports pandas)."""
    import numpy as np
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        chunks = [numpy_of(chunk) for chunk in column.chunks]
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=column.type.to_pandas_dtype())
    if column.null_count:
        raise ValueError("numpy_of needs an array without nulls")
    start, n = column.offset, len(column)
    data = column.buffers()[1]
    if pa.types.is_boolean(column.type):
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
        return bits[start: start + n].astype(np.bool_)
    dtype = np.dtype(column.type.to_pandas_dtype())
    return np.frombuffer(data, dtype=dtype)[start: start + n]
