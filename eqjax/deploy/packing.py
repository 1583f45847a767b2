"""Low-bit integers packed into bytes: int8 as is, int4 two per byte, int2 four per byte.

A ``b``-bit signed grid ``[-2^(b-1), 2^(b-1) - 1]`` is stored in the smallest container of 2, 4
or 8 bits that holds it (3 bits in 4, 5-7 bits in 8). Packed values are two's complement,
little-end first (value ``i`` of a byte sits at bits ``container * i``), the layout of ONNX's
INT4 tensors and of most int4 kernels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["container_bits", "packed_size", "pack", "unpack"]


def container_bits(bits: int) -> int:
    """Bits per stored value for a ``bits``-wide grid: 2, 4 or 8.

    Raises:
      ValueError: ``bits`` outside [2, 8].
    """
    if not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"integer artifacts hold 2- to 8-bit values, got bits={bits!r}")
    return 2 if bits == 2 else 4 if bits <= 4 else 8


def packed_size(num_values: int, bits: int) -> int:
    """Bytes that :func:`pack` writes for ``num_values`` values of ``bits`` bits."""
    per_byte = 8 // container_bits(bits)
    return -(-num_values // per_byte)


def pack(values: np.ndarray, bits: int, *, signed: bool = True) -> np.ndarray:
    """``values`` (integers on the ``bits`` grid, any shape) as a flat uint8 array of
    :func:`packed_size` bytes.

    Raises:
      ValueError: a value outside the grid (named, with its index), or non-integer input.
    """
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"pack needs integer values, got dtype {values.dtype}")
    width = container_bits(bits)
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    flat = values.reshape(-1).astype(np.int64)
    bad = np.flatnonzero((flat < low) | (flat > high))
    if bad.size:
        raise ValueError(f"value {int(flat[bad[0]])} at index {int(bad[0])} is outside the {bits}-bit "
                         f"{'signed' if signed else 'unsigned'} grid [{low}, {high}]")
    codes = (flat & ((1 << width) - 1)).astype(np.uint8)
    per_byte = 8 // width
    if per_byte == 1:
        return codes
    codes = np.concatenate([codes, np.zeros(-len(codes) % per_byte, np.uint8)]).reshape(-1, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * width)
    return np.bitwise_or.reduce(codes << shifts, axis=1).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int, shape: tuple[int, ...], *, signed: bool = True) -> np.ndarray:
    """The int8 array of ``shape`` that :func:`pack` stored in ``packed``.

    Raises:
      ValueError: ``packed`` holds fewer or more bytes than ``shape`` needs.
    """
    packed = np.asarray(packed, np.uint8).reshape(-1)
    count = int(np.prod(shape, dtype=np.int64))
    if packed.size != packed_size(count, bits):
        raise ValueError(f"{packed.size} packed bytes cannot hold {count} values of {bits} bits "
                         f"(expected {packed_size(count, bits)})")
    width = container_bits(bits)
    per_byte = 8 // width
    shifts = np.arange(per_byte, dtype=np.uint8) * width
    codes = ((packed[:, None] >> shifts) & ((1 << width) - 1)).reshape(-1)[:count].astype(np.int16)
    if signed:
        codes = np.where(codes >= 1 << (width - 1), codes - (1 << width), codes)
    return codes.astype(np.int8 if signed or bits < 8 else np.uint8).reshape(shape)
