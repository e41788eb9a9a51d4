"""Pure-PyTorch reference implementations of the torchrec_esd operators.

They define the operators' semantics: the C++/CUDA kernels must match them bit
for bit (tests compare the two), and ``torchrec_esd.ops`` falls back to them,
loudly, when the extension is not built.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _s64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


GOLDEN = _s64(0x9E3779B97F4A7C15)
_M1 = _s64(0xBF58476D1CE4E5B9)
_M2 = _s64(0x94D049BB133111EB)


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 bits."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _umod(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x mod n`` reading the int64 bits of ``x`` as unsigned."""
    half = _srl(x, 1)  # x = 2 * half + low, both non-negative
    return ((half % n) * 2 + (x & 1)) % n


def hash_ids_ref(ids: torch.Tensor, feature: int, num_buckets: int) -> torch.Tensor:
    if ids.dtype not in (torch.int32, torch.int64):
        raise RuntimeError(f"hash_ids: ids must be int32 or int64, got {ids.dtype}")
    if ids.dim() != 1:
        raise RuntimeError(f"hash_ids: ids must be 1-D, got {ids.dim()}-D")
    if feature < 0 or num_buckets < 0:
        raise RuntimeError("hash_ids: feature and num_buckets must be >= 0")
    if ids.numel() and int(ids.min()) < 0:
        raise RuntimeError("hash_ids: ids must be non-negative")
    z = ids.to(torch.int64) ^ _salt(feature)
    z = z + GOLDEN
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    z = z ^ _srl(z, 31)
    return z if num_buckets == 0 else _umod(z, num_buckets)


def _salt(feature: int) -> int:
    return _s64(feature * 0x9E3779B97F4A7C15)
