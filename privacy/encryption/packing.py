"""Fixed-point quantisation and balanced base-B digit packing (pure numpy, no keys).

A client's float update becomes integers on the shared grid by clipping, folding in its integer
weight and stochastic rounding (unbiased: E[round(y)] = y; Gupta et al., "Deep Learning with Limited
Numerical Precision", 2015). Several integers then share one plaintext slot as the digits of a balanced
base-B number: ``slot = sum_j value[j] * B**j`` with ``B = 2 * sum_bound + 1``. Because every digit of a
sum of at most max_clients clients stays within +-sum_bound, sums of packed slots never carry between
digits and unpacking the centred decryption recovers each digit's sum exactly.
"""

from __future__ import annotations

import numpy as np

from privacy.errors import EncryptionError


def quantise(
    values: np.ndarray,
    *,
    weight: int,
    clip: float,
    grid_clip: float,
    precision_bits: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Clip to [-clip, clip], scale ``weight * value / quantum`` and round stochastically to int64.

    ``quantum = grid_clip * 2**-precision_bits``; since ``clip <= grid_clip`` every result lies in
    ``[-weight * 2**precision_bits, weight * 2**precision_bits]``.

    Raises:
        EncryptionError: a value is NaN or infinite.
    """
    flat = np.asarray(values, dtype=np.float64)
    if not np.isfinite(flat).all():
        bad = int(np.flatnonzero(~np.isfinite(flat))[0])
        raise EncryptionError(f"update value at flat index {bad} is {flat[bad]}: expected finite values")
    scale = weight * np.ldexp(1.0, precision_bits) / grid_clip
    scaled = np.clip(flat, -clip, clip) * scale
    floor = np.floor(scaled)
    out = floor + (rng.random(flat.shape) < (scaled - floor))
    bound = weight * 2**precision_bits
    # Guards float rounding at the clip edge: the grid bound is an integer, so this never biases.
    np.clip(out, -bound, bound, out=out)
    return out.astype(np.int64)


def pack_digits(values: np.ndarray, *, digits: int, base: int, slots: int) -> np.ndarray:
    """Pack ``values`` (length <= digits*slots) digit-major into ``slots`` balanced base-``base`` numbers.

    Value ``i`` goes to digit ``i // slots`` of slot ``i % slots``; missing values are zeros.
    """
    ints = np.asarray(values, dtype=np.int64)
    if ints.ndim != 1 or ints.size > digits * slots:
        raise EncryptionError(f"pack_digits: {ints.size} values do not fit {digits} digits x {slots} slots")
    if base**digits >= 2**63:
        raise EncryptionError(f"pack_digits: base {base} ** {digits} digits exceeds int64")
    half = (base - 1) // 2
    if ints.size and int(np.abs(ints).max()) > half:
        raise EncryptionError(f"pack_digits: a value exceeds the digit bound {half}")
    grid = np.zeros(digits * slots, dtype=np.int64)
    grid[: ints.size] = ints
    grid = grid.reshape(digits, slots)
    packed = grid[digits - 1].copy()
    for j in range(digits - 2, -1, -1):
        packed *= base
        packed += grid[j]
    return packed


def unpack_digits(packed: np.ndarray, *, digits: int, base: int) -> np.ndarray:
    """Inverse of :func:`pack_digits` for centred integers: digit-major values, ``digits * len(packed)``."""
    rest = np.asarray(packed, dtype=np.int64).copy()
    half = (base - 1) // 2
    out = np.empty((digits, rest.size), dtype=np.int64)
    for j in range(digits):
        digit = (rest + half) % base - half
        out[j] = digit
        rest = (rest - digit) // base
    if rest.any():
        raise EncryptionError("unpack_digits: decrypted slots exceed the packing range (corrupted aggregate)")
    return out.reshape(-1)
