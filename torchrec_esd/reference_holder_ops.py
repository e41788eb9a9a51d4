"""Pure-PyTorch references of the holder-index operators
(``csrc/cpu/holders_cpu.cpp``; :mod:`torchrec_esd.cache.holders` uses them).
Key-by-key loops over the same state, producing the same tensors as the C++
kernels; used when the extension is not built and by the kernel tests."""

from __future__ import annotations

from typing import Tuple

import torch

from torchrec_esd.reference_ops import id_table_assign_ref, id_table_lookup_ref

_E = torch.empty(0, dtype=torch.int64)


def _head_of(head: torch.Tensor, key: int) -> int:
    return int(id_table_lookup_ref(head, torch.tensor([key], dtype=torch.int64))[0])


def holder_index_sync_ref(head: torch.Tensor, next_: torch.Tensor, prev: torch.Tensor, gkey: torch.Tensor,
                          base: int, slot_keys: torch.Tensor) -> torch.Tensor:
    """In place: global slots ``[base, base + len(slot_keys))`` record
    ``slot_keys`` (negative: empty); a changed slot leaves its old key's list
    and goes to the head of its new key's list.  Returns the keys that left a
    slot, in slot order."""
    op = "holder_index_sync"
    n = gkey.numel()
    if base < 0 or base + slot_keys.numel() > n:
        raise RuntimeError(f"torchrec_esd::{op}: slots [{base}, {base + slot_keys.numel()}) outside the"
                           f" index's {n} global slots")
    nx, pv, gk = next_.tolist(), prev.tolist(), gkey.tolist()
    left = []
    for s, k in enumerate(slot_keys.tolist()):
        g, k = base + s, max(int(k), -1)
        old = gk[g]
        if old == k:
            continue
        if old >= 0:
            left.append(old)
            p, q = pv[g], nx[g]
            if p >= 0:
                nx[p] = q
            else:
                if _head_of(head, old) != g:
                    raise RuntimeError(f"torchrec_esd::{op}: corrupt index (slot {g} is not the head of key {old})")
                if q >= 0:
                    id_table_assign_ref(head, _E, torch.tensor([old]), torch.tensor([q]))
                else:
                    id_table_assign_ref(head, torch.tensor([old]), _E, _E)
            if q >= 0:
                pv[q] = p
        nx[g] = pv[g] = -1
        if k >= 0:
            h = _head_of(head, k)
            nx[g] = h
            if h >= 0:
                pv[h] = g
            id_table_assign_ref(head, _E, torch.tensor([k]), torch.tensor([g]))
        gk[g] = k
    next_.copy_(torch.tensor(nx, dtype=torch.int64))
    prev.copy_(torch.tensor(pv, dtype=torch.int64))
    gkey.copy_(torch.tensor(gk, dtype=torch.int64))
    return torch.tensor(left, dtype=torch.int64)


def holder_index_lookup_ref(head: torch.Tensor, next_: torch.Tensor,
                            queries: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every holder of every query key: (query position, global slot), queries
    in order, each key's holders in list order."""
    if queries.numel() and int(queries.min()) < 0:
        raise RuntimeError("torchrec_esd::holder_index_lookup: queries must be non-negative")
    first = id_table_lookup_ref(head, queries).tolist() if queries.numel() else []
    nx = next_.tolist()
    pos, slot = [], []
    for i, g in enumerate(first):
        while g >= 0:
            pos.append(i)
            slot.append(g)
            g = nx[g]
    return torch.tensor(pos, dtype=torch.int64), torch.tensor(slot, dtype=torch.int64)
