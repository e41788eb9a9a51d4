"""Pure-PyTorch reference implementations of the torchrec_esd operators.

They define the operators' semantics: the C++/CUDA kernels must match them bit
for bit (tests compare the two), and ``torchrec_esd.ops`` falls back to them,
loudly, when the extension is not built.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

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


# ---------------------------------------------------------------------------
# Input checks shared by the references (same messages as the C++ kernels).
# ---------------------------------------------------------------------------

_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_index_vector(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise RuntimeError(f"torchrec_esd::{op}: {name} must be a Tensor, got {type(t)}")
    if t.dtype not in _INDEX_DTYPES:
        raise RuntimeError(f"torchrec_esd::{op}: {name} must be int32 or int64, got {t.dtype}")
    if t.dim() != 1:
        raise RuntimeError(f"torchrec_esd::{op}: {name} must be 1-D, got {t.dim()}-D")
    if not t.is_contiguous():
        raise RuntimeError(f"torchrec_esd::{op}: {name} must be contiguous")


def _check_non_negative(op: str, name: str, t: torch.Tensor) -> None:
    if t.numel() and int(t.min()) < 0:
        raise RuntimeError(
            f"torchrec_esd::{op}: {name} must be non-negative, got {int(t.min())}"
        )


def _check_same_device(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor):
    if t.device != ref.device:
        raise RuntimeError(
            f"torchrec_esd::{op}: {name} is on {t.device} but {ref_name} is on {ref.device};"
            " all tensors must be on the same device"
        )


def _check_slots(op: str, name: str, slots: torch.Tensor) -> None:
    if not isinstance(slots, torch.Tensor):
        raise RuntimeError(f"torchrec_esd::{op}: {name} must be a Tensor, got {type(slots)}")
    if slots.dtype != torch.int64:
        raise RuntimeError(f"torchrec_esd::{op}: {name} must be int64, got {slots.dtype}")
    if slots.dim() != 2 or slots.size(1) != 2:
        raise RuntimeError(
            f"torchrec_esd::{op}: {name} must have shape [cap, 2], got {list(slots.shape)}"
        )
    cap = slots.size(0)
    if cap < 2 or cap & (cap - 1):
        raise RuntimeError(
            f"torchrec_esd::{op}: {name} capacity must be a power of two >= 2, got {cap}"
        )
    if not slots.is_contiguous():
        raise RuntimeError(f"torchrec_esd::{op}: {name} must be contiguous")


def _check_offsets(op: str, offsets: torch.Tensor, n: int) -> None:
    _check_index_vector(op, "offsets", offsets)
    if offsets.numel() < 1:
        raise RuntimeError(f"torchrec_esd::{op}: offsets must have B+1 >= 1 entries, got 0")
    if int(offsets[0]) != 0:
        raise RuntimeError(f"torchrec_esd::{op}: offsets[0] must be 0, got {int(offsets[0])}")
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        raise RuntimeError(f"torchrec_esd::{op}: offsets must be non-decreasing")
    if int(offsets[-1]) != n:
        raise RuntimeError(
            f"torchrec_esd::{op}: offsets[-1] must equal keys.numel() = {n}, got"
            f" {int(offsets[-1])}"
        )


# ---------------------------------------------------------------------------
# Open-addressing id table (linear probing).
# ---------------------------------------------------------------------------


def id_table_capacity(num_keys: int) -> int:
    """Capacity of the table built for ``num_keys`` keys: the next power of two
    ``>= max(2, 2 * num_keys)`` (load factor <= 1/2)."""
    need = max(2, 2 * int(num_keys))
    return 1 << (need - 1).bit_length()


def _home_hash(keys64: torch.Tensor) -> torch.Tensor:
    """splitmix64 hash of the keys (``hash_feature_id(key, 0)``) as int64 bits."""
    z = keys64 + GOLDEN  # feature 0: salt is 0
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def id_table_build_ref(keys: torch.Tensor) -> torch.Tensor:
    """Linear-probing hash table of ``keys`` as an int64 ``[cap, 2]`` tensor of
    rows ``(key, index of key in keys)``; empty rows are ``(-1, -1)``.

    ``cap = id_table_capacity(len(keys))``; key ``k`` hashes to home slot
    ``splitmix64(k) & (cap - 1)`` and sits at the first slot reached by probing
    ``home, home + 1, ...`` (mod ``cap``) without crossing an empty slot, so a
    lookup probes from its home until it finds the key or an empty row.

    The layout is canonical (independent of thread scheduling): let ``e`` be the
    first slot minimising the prefix sum of ``(keys homed at slot - 1)``; ``e``
    is empty in every linear-probing table of these keys.  Keys are inserted in
    increasing order of ``((home - e - 1) mod cap, key)``, i.e. each probe
    cluster holds its keys sorted by home slot, then key (an ordered table).
    This is also what Robin Hood insertion with ties broken by key gives, in
    any insertion order (the CPU kernel builds it that way).
    """
    op = "id_table_build"
    _check_index_vector(op, "keys", keys)
    _check_non_negative(op, "keys", keys)
    n = keys.numel()
    cap = id_table_capacity(n)
    dev = keys.device
    slots = torch.full((cap, 2), -1, dtype=torch.int64, device=dev)
    if n == 0:
        return slots
    k64 = keys.to(torch.int64)
    sk, _ = torch.sort(k64)
    dup = sk[1:] == sk[:-1]
    if bool(dup.any()):
        raise RuntimeError(
            f"torchrec_esd::{op}: keys must be unique, found duplicate key"
            f" {int(sk[1:][dup][0])}"
        )
    mask = cap - 1
    home = _home_hash(k64) & mask
    counts = torch.bincount(home, minlength=cap)
    e = int(torch.argmin(torch.cumsum(counts - 1, 0)))  # first minimum: always empty
    start = (e + 1) & mask
    r = (home - start) & mask  # home in coordinates where the table starts after e
    order = torch.argsort(k64, stable=True)
    order = order[torch.argsort(r[order], stable=True)]  # sorted by (r, key)
    ar = torch.arange(n, device=dev)
    pos = ar + torch.cummax(r[order] - ar, 0).values  # pos_i = max(r_i, pos_{i-1} + 1)
    slot = (pos + start) & mask
    slots[slot, 0] = k64[order]
    slots[slot, 1] = order
    return slots


def _probe(slots: torch.Tensor, q64: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Index stored for every query in the table, -1 when absent; vectorised over
    the queries, one iteration per probe step (at most ``cap``)."""
    cap = slots.size(0)
    mask = cap - 1
    out = torch.full_like(q64, -1)
    active = torch.arange(q64.numel(), device=q64.device)
    s = h & mask
    tk, ti = slots[:, 0], slots[:, 1]
    for _ in range(cap):
        if active.numel() == 0:
            break
        k = tk[s]
        hit = k == q64[active]
        out[active[hit]] = ti[s[hit]]
        go = ~hit & (k != -1)
        active = active[go]
        s = (s[go] + 1) & mask
    return out


def id_table_lookup_ref(slots: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Index of every query key in the table built by :func:`id_table_build_ref`
    (its position in the ``keys`` the table was built from), or -1 if absent."""
    op = "id_table_lookup"
    _check_slots(op, "slots", slots)
    _check_index_vector(op, "queries", queries)
    _check_same_device(op, "queries", queries, "slots", slots)
    _check_non_negative(op, "queries", queries)
    q64 = queries.to(torch.int64)
    return _probe(slots, q64, _home_hash(q64))


# ---------------------------------------------------------------------------
# Per-sample, per-worker cost of a batch.
# ---------------------------------------------------------------------------


def _first_in_bag(keys64: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """True at the first occurrence of each key inside its bag."""
    n = keys64.numel()
    order = torch.argsort(keys64, stable=True)
    order = order[torch.argsort(sample[order], stable=True)]  # by (sample, key, position)
    sk, ss = keys64[order], sample[order]
    first_sorted = torch.ones(n, dtype=torch.bool, device=keys64.device)
    first_sorted[1:] = (sk[1:] != sk[:-1]) | (ss[1:] != ss[:-1])
    first = torch.empty_like(first_sorted)
    first[order] = first_sorted
    return first


def sample_cost_matrix_ref(
    keys: torch.Tensor,
    offsets: torch.Tensor,
    slots: List[torch.Tensor],
    weights: List[torch.Tensor],
    miss_weight: torch.Tensor,
) -> torch.Tensor:
    """``out[b, w]`` (float64 ``[B, W]``) = sum over the distinct keys of bag
    ``b`` (``keys[offsets[b]:offsets[b+1]]``) of ``weights[w][idx]`` when the key
    is in table ``slots[w]`` at index ``idx``, else ``miss_weight[w]``."""
    op = "sample_cost_matrix"
    _check_index_vector(op, "keys", keys)
    _check_same_device(op, "offsets", offsets, "keys", keys)
    _check_offsets(op, offsets, keys.numel())
    _check_non_negative(op, "keys", keys)
    W = len(slots)
    if len(weights) != W:
        raise RuntimeError(
            f"torchrec_esd::{op}: slots and weights must have the same length, got"
            f" {W} and {len(weights)}"
        )
    if not isinstance(miss_weight, torch.Tensor) or miss_weight.dtype != torch.float64:
        raise RuntimeError(f"torchrec_esd::{op}: miss_weight must be a float64 tensor")
    if miss_weight.dim() != 1 or miss_weight.numel() != W:
        raise RuntimeError(
            f"torchrec_esd::{op}: miss_weight must be 1-D with one entry per worker"
            f" ({W}), got shape {list(miss_weight.shape)}"
        )
    _check_same_device(op, "miss_weight", miss_weight, "keys", keys)
    for w in range(W):
        _check_slots(op, f"slots[{w}]", slots[w])
        _check_same_device(op, f"slots[{w}]", slots[w], "keys", keys)
        wt = weights[w]
        if not isinstance(wt, torch.Tensor) or wt.dtype != torch.float64:
            raise RuntimeError(f"torchrec_esd::{op}: weights[{w}] must be a float64 tensor")
        if wt.dim() != 1:
            raise RuntimeError(f"torchrec_esd::{op}: weights[{w}] must be 1-D, got {wt.dim()}-D")
        if not wt.is_contiguous():
            raise RuntimeError(f"torchrec_esd::{op}: weights[{w}] must be contiguous")
        _check_same_device(op, f"weights[{w}]", wt, "keys", keys)
    B = offsets.numel() - 1
    dev = keys.device
    out = torch.zeros(B, W, dtype=torch.float64, device=dev)
    n = keys.numel()
    if n == 0 or W == 0:
        return out
    k64 = keys.to(torch.int64)
    off64 = offsets.to(torch.int64)
    sample = torch.repeat_interleave(torch.arange(B, device=dev), off64[1:] - off64[:-1])
    first = _first_in_bag(k64, sample)
    k64, sample = k64[first], sample[first]  # distinct keys of every bag
    h = _home_hash(k64)
    cols = []
    for w in range(W):
        idx = _probe(slots[w], k64, h)
        hit = idx >= 0
        if hit.any() and int(idx.max()) >= weights[w].numel():
            raise RuntimeError(
                f"torchrec_esd::{op}: table slots[{w}] stores index {int(idx.max())} but"
                f" weights[{w}] has only {weights[w].numel()} entries"
            )
        cols.append(torch.where(hit, weights[w][idx.clamp(min=0)], miss_weight[w]))
    out.index_add_(0, sample, torch.stack(cols, 1))
    return out


def cache_hit_counts_ref(
    keys: torch.Tensor, offsets: torch.Tensor, slots: List[torch.Tensor]
) -> torch.Tensor:
    """int64 ``[B, W]``: distinct keys of every bag found in every worker's table."""
    W = len(slots)
    dev = keys.device if isinstance(keys, torch.Tensor) else None
    weights = [
        torch.ones(s.size(0) // 2 if isinstance(s, torch.Tensor) and s.dim() == 2 else 0,
                   dtype=torch.float64, device=dev)
        for s in slots
    ]
    miss = torch.zeros(W, dtype=torch.float64, device=dev)
    return sample_cost_matrix_ref(keys, offsets, slots, weights, miss).to(torch.int64)


# ---------------------------------------------------------------------------
# In-batch de-duplication per worker.
# ---------------------------------------------------------------------------


def unique_keys_per_group_ref(
    keys: torch.Tensor, group: torch.Tensor, num_groups: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct ``(group, key)`` pairs sorted by ``(group, key)``: returns
    ``(unique_keys (keys.dtype), unique_group (int64), counts (int64))``."""
    op = "unique_keys_per_group"
    _check_index_vector(op, "keys", keys)
    _check_index_vector(op, "group", group)
    _check_same_device(op, "group", group, "keys", keys)
    if keys.numel() != group.numel():
        raise RuntimeError(
            f"torchrec_esd::{op}: keys and group must have the same length, got"
            f" {keys.numel()} and {group.numel()}"
        )
    if num_groups < 0:
        raise RuntimeError(f"torchrec_esd::{op}: num_groups must be >= 0, got {num_groups}")
    _check_non_negative(op, "keys", keys)
    if group.numel() and (int(group.min()) < 0 or int(group.max()) >= num_groups):
        bad = int(group.min()) if int(group.min()) < 0 else int(group.max())
        raise RuntimeError(
            f"torchrec_esd::{op}: group values must be in [0, num_groups = {num_groups}), got"
            f" {bad}"
        )
    dev = keys.device
    n = keys.numel()
    if n == 0:
        e = torch.empty(0, dtype=torch.int64, device=dev)
        return keys.new_empty(0), e, e.clone()
    k64, g64 = keys.to(torch.int64), group.to(torch.int64)
    order = torch.argsort(k64, stable=True)
    order = order[torch.argsort(g64[order], stable=True)]
    sk, sg = k64[order], g64[order]
    new = torch.ones(n, dtype=torch.bool, device=dev)
    new[1:] = (sk[1:] != sk[:-1]) | (sg[1:] != sg[:-1])
    starts = torch.nonzero(new).flatten()
    ends = torch.cat([starts[1:], torch.tensor([n], device=dev)])
    return sk[starts].to(keys.dtype), sg[starts], ends - starts


def id_table_assign_ref(table: torch.Tensor, erase_keys: torch.Tensor, keys: torch.Tensor,
                        values: torch.Tensor) -> None:
    """In place: erase ``erase_keys`` from the linear-probing id table (absent
    keys ignored; backward-shift deletion keeps every key reachable from its
    home without an empty row in between), then map ``keys[i] -> values[i]``
    (overwriting a present key's value).  A key-by-key loop: the reference of
    the C++ ``id_table_assign``."""
    op = "id_table_assign"
    cap = table.size(0)
    if table.dtype != torch.int64 or table.dim() != 2 or table.size(1) != 2 or cap < 2 or cap & (cap - 1):
        raise RuntimeError(f"torchrec_esd::{op}: table must be int64 [cap, 2], cap a power of two")
    if keys.numel() != values.numel():
        raise RuntimeError(f"torchrec_esd::{op}: {keys.numel()} keys for {values.numel()} values")
    mask = cap - 1
    tk = table[:, 0].tolist()
    tv = table[:, 1].tolist()
    ek, kk, vv = erase_keys.tolist(), keys.tolist(), values.tolist()
    every = sorted(set(ek + kk + [x for x in tk if x >= 0]) or [0])
    home_of = dict(zip(every, (_home_hash(torch.tensor(every, dtype=torch.int64)) & mask).tolist()))

    def probe(key: int) -> Optional[int]:
        """The slot holding ``key``, else the first empty slot of its probe
        path; ``None`` when the table is full without either."""
        i = home_of[key]
        for _ in range(cap):
            if tk[i] == -1 or tk[i] == key:
                return i
            i = (i + 1) & mask
        return None

    for key in ek:
        if key < 0:
            raise RuntimeError(f"torchrec_esd::{op}: negative key {key}")
        i = probe(key)
        if i is None or tk[i] != key:
            continue
        j = i
        while True:
            j = (j + 1) & mask
            if tk[j] == -1:
                break
            h = home_of[tk[j]]
            stays = (i < h <= j) if i < j else (h > i or h <= j)
            if not stays:
                tk[i], tv[i], i = tk[j], tv[j], j
        tk[i], tv[i] = -1, -1
    for key, val in zip(kk, vv):
        if key < 0:
            raise RuntimeError(f"torchrec_esd::{op}: negative key {key}")
        i = probe(key)
        if i is None:
            raise RuntimeError(f"torchrec_esd::{op}: the table is full ({cap} rows)")
        tk[i], tv[i] = key, val
    table[:, 0] = torch.tensor(tk, dtype=torch.int64)
    table[:, 1] = torch.tensor(tv, dtype=torch.int64)


def fingerprint_mix(x: torch.Tensor) -> torch.Tensor:
    """int64 ``x`` mixed by splitmix64's two multiply-xorshift steps, wrapping in int64
    with arithmetic shifts: the mix of the batch fingerprints
    (:func:`torchrec_esd.distributed.plan_channel.batch_fingerprint`,
    :func:`positioned_mix_sum_ref`; ``csrc/cpu/fingerprint_cpu.cpp`` repeats it in C++)."""
    x = x * -0x61C8864680B583EB
    x = x ^ (x >> 31)
    x = x * -0x40A7B892E31B1A47
    return x ^ (x >> 29)


def positioned_mix_sum_ref(values: torch.Tensor, salt: int) -> torch.Tensor:
    """0-d int64: the wrapping sum over ``i`` of ``mix(values[i] * C + i * P + salt)``
    (``values`` as int64; ``mix``: :func:`fingerprint_mix`): the reference of
    ``torchrec_esd::positioned_mix_sum``."""
    v = values.reshape(-1).to(torch.int64)
    pos = torch.arange(v.numel(), device=v.device, dtype=torch.int64)
    return fingerprint_mix(v * -0x4B47D5B1A37C3C43 + pos * 0x2545F4914F6CDD1D + int(salt)).sum()


# ---------------------------------------------------------------------------
# Cache slots per table.
# ---------------------------------------------------------------------------


def counts_in_ranges(mask: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """``[R]`` the set entries of ``mask`` in each contiguous range
    ``starts[r]:starts[r + 1]``: differences of ``mask``'s running count (O(len(mask)))."""
    run = torch.zeros(mask.numel() + 1, dtype=torch.int64)
    torch.cumsum(mask.view(-1), 0, out=run[1:])
    return run[starts[1:]] - run[starts[:-1]]


def slot_table_counts(keys: torch.Tensor, dirty: torch.Tensor, table_start: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``torchrec_esd::slot_table_counts``: per table (slots
    ``table_start[t]:table_start[t + 1]``), the slots holding a key and the
    dirty ones, as differences of two running counts (same checks and
    messages as the kernel)."""
    op = "slot_table_counts"
    for name, t, dtype in (("keys", keys, torch.int64), ("dirty", dirty, torch.bool),
                           ("table_start", table_start, torch.int64)):
        if t.device.type != "cpu":
            raise RuntimeError(f"torchrec_esd::{op}: {name} must be a CPU tensor")
        if t.dtype != dtype:
            raise RuntimeError(f"torchrec_esd::{op}: {name} must be {dtype}, got {t.dtype}")
        if t.dim() != 1 or not t.is_contiguous():
            raise RuntimeError(f"torchrec_esd::{op}: {name} must be a contiguous 1-D tensor")
    S = keys.numel()
    if dirty.numel() != S:
        raise RuntimeError(f"torchrec_esd::{op}: dirty must have one flag per slot ({S}), got {dirty.numel()}")
    if table_start.numel() < 1:
        raise RuntimeError(f"torchrec_esd::{op}: table_start must hold at least one entry")
    if int(table_start[0]) != 0 or int(table_start[-1]) != S:
        raise RuntimeError(f"torchrec_esd::{op}: table_start must run from 0 to the {S} slots, got"
                           f" {int(table_start[0])} to {int(table_start[-1])}")
    steps = table_start[1:] - table_start[:-1]
    if steps.numel() and bool((steps < 0).any()):
        t = int((steps < 0).nonzero()[0])
        raise RuntimeError(f"torchrec_esd::{op}: table_start must not decrease (table {t})")
    return counts_in_ranges(keys >= 0, table_start), counts_in_ranges(dirty, table_start)
