"""Thin Python entry points of the torchrec_esd C++/CUDA operators.

Each operator's schema is in ``csrc/esd_ops.cpp``; this module registers its
fake (meta) kernel so it works under ``torch.compile`` / FakeTensor, and calls
it through ``torch.ops.torchrec_esd``.  If the extension is not built, the
pure-PyTorch references of :mod:`torchrec_esd.reference_ops` are used instead
and a loud warning says so (tests fail in that state unless explicitly allowed).
"""

from __future__ import annotations

import warnings

import torch

from torchrec_esd import reference_ops

try:
    from torchrec_esd import _C  # noqa: F401  (registers the operators)

    EXTENSION_LOADED = True
    EXTENSION_ERROR = None
except ImportError as e:  # pragma: no cover - exercised on broken installs only
    EXTENSION_LOADED = False
    EXTENSION_ERROR = e
    warnings.warn(
        "torchrec_esd: the C++ extension torchrec_esd._C is NOT built/loadable "
        f"({e}); falling back to the slow pure-PyTorch reference operators. "
        "Build it with `pip install -e . --no-build-isolation` (see README).",
        RuntimeWarning,
        stacklevel=2,
    )


if EXTENSION_LOADED:

    @torch.library.register_fake("torchrec_esd::hash_ids")
    def _hash_ids_fake(ids: torch.Tensor, feature: int, num_buckets: int) -> torch.Tensor:
        torch._check(ids.dim() == 1, lambda: "hash_ids: ids must be 1-D")
        torch._check(
            ids.dtype in (torch.int32, torch.int64), lambda: "hash_ids: ids must be int32/int64"
        )
        return torch.empty_like(ids, dtype=torch.int64)


def hash_ids(ids: torch.Tensor, feature: int = 0, num_buckets: int = 0) -> torch.Tensor:
    """Stable 64-bit hash of every ``(feature, id)`` pair (int64 bit pattern), or
    its bucket in ``[0, num_buckets)`` when ``num_buckets > 0``.

    The same on every run, process and device: use it for PS shard routing and
    cache-set selection.  ``ids`` is a 1-D int32/int64 tensor of ids >= 0.
    """
    if EXTENSION_LOADED:
        return torch.ops.torchrec_esd.hash_ids(ids, int(feature), int(num_buckets))
    return reference_ops.hash_ids_ref(ids, int(feature), int(num_buckets))
