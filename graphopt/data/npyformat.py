"""The .npy format: array headers, read without the data, and rows read from a stream."""

from __future__ import annotations

import ast
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from graphopt.data.checks import error_detail, pickle_error, unreadable
from graphopt.data.stream import Column
from graphopt.errors import DataError


@dataclass(frozen=True)
class Header:
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype


def read_header(stream: IO[bytes], where: str) -> Header:
    """Read the magic and header of an .npy stream, leaving it at the first data byte."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(stream)
        else:
            shape, fortran, dtype = _read_later_header(stream, version)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise unreadable(where, e) from None
    if dtype.hasobject:
        raise pickle_error(where)
    return Header(tuple(int(d) for d in shape), bool(fortran), dtype)


def _read_later_header(stream: IO[bytes], version: tuple[int, int]) -> tuple[Any, Any, np.dtype]:
    """Header of format version 3.0 (utf-8 field names) or later: (shape, fortran, dtype).

    numpy has no public reader for these: `read_array_header_1_0`/`_2_0` are the only public
    ones, and `np.load` reads whole arrays. Its private `_read_array_header` (numpy 2:
    `numpy.lib._format_impl`; numpy 1.x: `numpy.lib.format`) reads every version and knows
    about versions we do not, so it is used when it is there; should numpy move or drop it,
    the fallback parses the documented 3.0 layout: a little-endian uint32 length, then a
    utf-8 Python dict literal with 'descr', 'fortran_order' and 'shape'.
    """
    try:
        from numpy.lib import _format_impl as private
    except ImportError:
        private = np.lib.format  # numpy 1.x
    reader = getattr(private, "_read_array_header", None)
    if reader is not None:
        return reader(stream, version)
    if version != (3, 0):
        raise ValueError(f"unsupported .npy format version {version}")
    (length,) = struct.unpack("<I", _read_exactly(stream, 4))
    try:
        fields = ast.literal_eval(_read_exactly(stream, length).decode("utf-8"))
    except SyntaxError as exc:
        raise ValueError(f"malformed .npy header ({exc})") from None
    if not isinstance(fields, dict) or set(fields) != {"descr", "fortran_order", "shape"}:
        raise ValueError(f"malformed .npy header {fields!r}")
    return fields["shape"], fields["fortran_order"], np.lib.format.descr_to_dtype(fields["descr"])


def _read_exactly(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError("the .npy header ends early")
    return data


def npy_header(path: Path, where: str) -> Header:
    """Header of an .npy file."""
    try:
        with open(path, "rb") as stream:
            return read_header(stream, where)
    except OSError as exc:
        raise unreadable(where, exc) from None


def npz_headers(path: Path, where: str) -> dict[str, Header]:
    """Header of every array in an .npz, read without reading any data."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                with archive.open(member) as stream:
                    headers[member[:-4]] = read_header(stream, f"array '{member[:-4]}' of {where}")
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(
            f"{where} is not a readable .npz archive ({error_detail(exc)}).",
            hint="Write it again with numpy.savez or numpy.savez_compressed.",
        ) from None
    return headers


def read_into(stream: IO[bytes], out: np.ndarray, where: str) -> np.ndarray:
    """Fill the C-contiguous `out` with the next bytes of the stream, without seeking."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    filled = 0
    try:
        while filled < len(view):
            got = stream.readinto(view[filled:])
            if not got:
                break
            filled += got
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise unreadable(where, exc) from None
    if filled < len(view):
        raise DataError(
            f"{where} ends early: it is truncated or corrupt.", hint="Write the file again."
        )
    return out


class StreamColumn(Column):
    """Rows of a C-order .npy stream (an .npz member), read sequentially without seeking."""

    def __init__(self, stream: IO[bytes], header: Header, where: str, single: bool) -> None:
        self.stream = stream
        self.header = header
        self.where = where
        self.trailing = header.shape if single else header.shape[1:]

    def read(self, n: int) -> np.ndarray:
        out = np.empty((n, *self.trailing), dtype=self.header.dtype)
        return read_into(self.stream, out, self.where)
