"""Cost-model inputs for two-level (grouped) dispatch without the ``[B, W]``
matrix: a cheap ``[B, G]`` matrix for assigning samples to worker groups,
then, per group, the ``[B_g, |g|]`` matrix of only the group's samples on
only the group's workers (:class:`GroupInputs`; read by
:class:`~torchrec_esd.dispatch.grouped.GroupedDispatcher.decide`).

Per batch (``N`` row keys, ``U`` distinct, ``B`` samples, ``W`` workers in
``G`` groups):

* construction: the batch read against the caches (:func:`read_batch`: one
  sort, then the directory's holder index, :mod:`~torchrec_esd.cache.holders`,
  lists the ``H`` cached (worker, key) pairs in ``O(U + H)``), the dirty
  owner of every key and the distinct (sample, key) pairs: ``O(N log N + U +
  H)``, no ``[W, U]`` or ``[B, W]`` array;
* :meth:`GroupInputs.group_matrix`: ``O(H + U G + N G)``;
* :meth:`GroupInputs.sub_matrix` for a group: ``O(N_g log N_g + H_g + U_g
  |g|)`` (``N_g``/``U_g`` the keys of the group's samples, ``H_g`` the hits
  of its workers; the hits are put in worker order once, ``O(H + W)``,
  :meth:`GroupInputs.prepare_groups`), so all groups together ``O(N log N + H
  + U group_size)`` (the expected slice in C++: ``O(N + H + U group_size)``).

**Exactness.** ``sub_matrix(samples, workers, kind)`` is, entry for entry,
the slice ``[samples][:, workers]`` of the full matrix the flat dispatchers
read (``CostModel.matrix`` for ``"additive"``, ``CostModel.expected_matrix``
for ``"expected"``, ``CostModel.hit_matrix`` for the hits): it is built from
the same per-key terms (:func:`~torchrec_esd.cost.dedup.amortised_key_costs`
is elementwise per (row, worker)) summed in the same order, which
``tests/test_dispatch.py`` checks against the full matrices.  It needs the
whole batch's key counts and every key's dirty owner, which construction
computes once.

The group matrix (stage 1, a heuristic price, not a slice of anything): key
``x`` on group ``g`` costs ``0`` if some worker of ``g`` holds it fresh,
``rt_g`` (the group's fastest link's row time) if some holds it outdated,
else ``rt_g + e_g`` (miss-pull plus the group's lowest expected eviction
push), divided by the expected number of samples of the batch sharing it on
one worker of the group (``1 + (n_x - 1)(B_g / |g| - 1)/(B - 1)``, as in the
expected matrix); a sample's group cost sums its distinct keys.
DES-served misses are not modelled here (the grouped dispatcher falls back
to the full matrix with them).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd import ops
from torchrec_esd.cost.batch import read_batch
from torchrec_esd.cost.dedup import amortised_key_costs, segment_sum


def link_groups(bytes_per_second: torch.Tensor, workers: Sequence[int], group_size: int) -> List[List[int]]:
    """``workers`` ordered by link speed (fastest first, ties by index) and cut
    into ``ceil(len(workers) / group_size)`` contiguous groups (each sorted)."""
    bps = bytes_per_second.tolist()
    order = sorted(workers, key=lambda w: (-bps[w], w))
    return [sorted(order[i:i + group_size]) for i in range(0, len(order), group_size)]


def sample_segments(offsets: torch.Tensor, samples: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions of the keys of ``samples`` (ascending) in a sample-major key
    array with ``offsets``, and the offsets of the selection."""
    lens = offsets[1:] - offsets[:-1]
    sel = lens[samples]
    sub_off = torch.zeros(samples.numel() + 1, dtype=torch.int64)
    sub_off[1:] = torch.cumsum(sel, 0)
    n = int(sub_off[-1])
    pos = torch.repeat_interleave(offsets[samples] - sub_off[:-1], sel, output_size=n) + torch.arange(n)
    return pos, sub_off


def sample_key_pairs_reference(offsets: torch.Tensor, kidx: torch.Tensor,
                               u: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(occ_s, occ_k, pair_ptr, uses)``: the distinct (sample, key) pairs of
    sample-major key indices ``kidx`` (``u`` keys), sorted, their per-sample
    offsets and each key's use count (:func:`torchrec_esd.ops.sample_key_pairs`'
    reference).  ``O(N log N)``."""
    b = offsets.numel() - 1
    sample = torch.repeat_interleave(torch.arange(b), offsets[1:] - offsets[:-1])
    pair = torch.unique(sample * max(u, 1) + kidx)
    occ_s, occ_k = pair // max(u, 1), pair % max(u, 1)
    return occ_s, occ_k, torch.searchsorted(occ_s, torch.arange(b + 1)), torch.bincount(occ_k, minlength=u).double()


def group_price(held: torch.Tensor, fresh: torch.Tensor, table_of: torch.Tensor, row_time: torch.Tensor,
                evict_time: torch.Tensor, groups: Sequence[Sequence[int]], shares: Sequence[int],
                uses: torch.Tensor, b: int, occ_s: torch.Tensor, occ_k: torch.Tensor) -> torch.Tensor:
    """float64 ``[B, G]`` stage-1 price (module docstring) from bool ``[U, G]`` ``held`` /
    ``fresh`` (some worker of the group caches the key / caches it fresh), the keys' tables,
    the workers' ``[W, T]`` row and eviction-push times, the per-worker ``shares``, the
    keys' use counts and the distinct (sample, key) pairs.  ``O(U G + N G)``."""
    G = len(groups)
    # per group, its fastest link's row time and lowest eviction push per table: [T, G] -> [U, G]
    rt = torch.stack([row_time[g].min(0).values for g in groups], 1).index_select(0, table_of)
    ev = torch.stack([evict_time[g].min(0).values for g in groups], 1).index_select(0, table_of)
    c = torch.where(fresh, 0.0, torch.where(held, rt, rt + ev))  # 0 fresh, rt held outdated, rt + ev
    per = torch.tensor([max(sum(int(shares[w]) for w in g) / len(g) - 1.0, 0.0) for g in groups],
                       dtype=torch.float64)
    cost = c / (1.0 + (uses - 1.0).view(-1, 1) * per.view(1, -1) / max(1, b - 1))
    # a sample's price on a group: the sum over its distinct keys
    return torch.zeros(b, G, dtype=torch.float64).index_add_(0, occ_s, cost.index_select(0, occ_k))


def group_matrix_from_bits(cost_model, kjt: Optional[KeyedJaggedTensor], caches, groups: Sequence[Sequence[int]],
                           shares: Sequence[int], kernel: bool = True,
                           row_keys: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """:meth:`GroupInputs.group_matrix` of ``kjt`` without reading a cached copy: which
    groups hold each key (fresh) come from the group bits ``caches.group_bits`` keeps
    (:meth:`~torchrec_esd.cache.holders.HolderIndex.group_bits`, one probe per key), the
    eviction pushes from the caches' occupancy (``row_keys``: ``kjt`` decoded already, as
    :meth:`GroupInputs` takes it).  With ``kernel`` (and the extension built) one
    C++ pass (:func:`~torchrec_esd.ops.group_price_bits`), else the distinct keys and pairs in
    PyTorch and :func:`~torchrec_esd.ops.group_price` on one entry per (key, group) held (or
    :func:`group_price`).  The same matrix, bit for bit (``tests/test_dispatch.py``).
    ``O(N log N + U G + N G)``: nothing per cached copy."""
    cm = cost_model
    state = cm.cache_state(caches)
    keys, offsets = row_keys if row_keys is not None else cm.row_keys(kjt)
    b = offsets.numel() - 1
    G = len(groups)
    if keys.numel() == 0:
        return torch.zeros(b, G, dtype=torch.float64)
    evict_time = cm._evict_fraction(_Occupancy(state.occupied, state.ndirty, state.capacity)) * cm.row_time
    group_of, rt, ev, per = _group_terms(cm.row_time, evict_time, groups, shares)
    if kernel and ops.HAS_GROUP_PRICE_BITS and hasattr(caches, "group_bits_table"):  # one C++ pass
        return ops.group_price_bits(keys.to(torch.int64), offsets.to(torch.int64),
                                    caches.group_bits_table(group_of), cm.row_offset.to(torch.int64), rt, ev, per)
    uniq, _ = ops.sorted_distinct(keys)
    u = uniq.numel()
    table_of = torch.searchsorted(cm.row_offset, uniq, right=True) - 1
    kidx = ops.id_table_lookup(ops.id_table_build(uniq), keys)
    if ops.has_grouped_kernels():
        occ_s, occ_k, _, uses = ops.sample_key_pairs(offsets, kidx, u)
    else:
        occ_s, occ_k, _, uses = sample_key_pairs_reference(offsets, kidx, u)
    held_bits, fresh_bits = caches.group_bits(uniq, group_of)
    bit = torch.ones(G, dtype=torch.int64) << torch.arange(G)
    held = (held_bits.view(-1, 1) & bit) != 0
    fresh = (fresh_bits.view(-1, 1) & bit) != 0
    if not ops.has_grouped_kernels():
        return group_price(held, fresh, table_of, cm.row_time, evict_time, groups, shares, uses, b, occ_s, occ_k)
    # the kernel reads cached copies: one per (key, group) held, outdated where not fresh
    key, g = held.nonzero(as_tuple=True)
    return ops.group_price(key, g, ~fresh[key, g], table_of, rt, ev, uses, per, b, occ_s, occ_k)


def _group_terms(row_time: torch.Tensor, evict_time: torch.Tensor, groups: Sequence[Sequence[int]],
                 shares: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(group_of [W], rt [T, G], ev [T, G], per [G])``: every worker's group (-1: none),
    per group its fastest link's row time and lowest eviction push per table, and its
    amortisation factor (the group's mean share less one, at least 0)."""
    W, T, G = row_time.shape[0], row_time.shape[1], len(groups)
    group_of = group_index(groups, W)
    member = group_of >= 0
    gm = group_of[member]
    idx = gm.view(-1, 1).expand(-1, T)
    inf = torch.full((G, T), float("inf"), dtype=torch.float64)
    rt = inf.scatter_reduce(0, idx, row_time[member], "amin").t().contiguous()
    ev = inf.scatter_reduce(0, idx, evict_time[member], "amin").t().contiguous()
    # the group's mean share less one (integer sums: exact in float64, as the Python sums)
    total = torch.zeros(G, dtype=torch.float64).index_add_(
        0, gm, torch.as_tensor([int(x) for x in shares], dtype=torch.float64)[member])
    per = (total / torch.tensor([len(g) for g in groups], dtype=torch.float64) - 1.0).clamp(min=0.0)
    return group_of, rt, ev, per


def group_index(groups: Sequence[Sequence[int]], num_workers: int) -> torch.Tensor:
    """int64 ``[num_workers]``: every worker's index in ``groups`` (-1: in none)."""
    sizes = torch.tensor([len(g) for g in groups], dtype=torch.int64)
    group_of = torch.full((num_workers,), -1, dtype=torch.int64)
    group_of[torch.tensor([int(w) for g in groups for w in g], dtype=torch.int64)] = torch.repeat_interleave(
        torch.arange(len(groups)), sizes)
    return group_of


class _Occupancy:
    """What :meth:`CostModel._evict_fraction` reads of a batch state."""

    def __init__(self, occupied: torch.Tensor, ndirty: torch.Tensor, cap: torch.Tensor) -> None:
        self.occupied, self.ndirty, self.cap = occupied, ndirty, cap


class GroupInputs:
    """One batch read against the caches for grouped dispatch; see the module
    docstring.  ``caches``: what :class:`~torchrec_esd.cost.CostModel` reads;
    ``shares``: the per-worker shares the expected matrix amortises over (default
    the configuration's split of this batch; a group reading only its own samples
    passes its workers' shares and 0 elsewhere); ``row_keys``: ``(keys, offsets)``,
    the batch as :meth:`CostModel.row_keys` gives it, instead of ``kjt`` (a group of
    the split decision gets its samples' keys from the stage-1 slices that decoded
    them)."""

    def __init__(self, cost_model, kjt: Optional[KeyedJaggedTensor], caches, shares: Optional[Sequence[int]] = None,
                 row_keys: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> None:
        cm = self.cm = cost_model
        if row_keys is not None:  # the batch's sample-major row keys and offsets, decoded already
            st = read_batch(row_keys[0], row_keys[1], cm.cache_state(caches), cm.row_offset)
        else:
            st = cm._state(kjt, caches)
        self.st = st
        self.num_samples = st.num_samples
        u = st.uniq.numel()
        self.kidx = ops.id_table_lookup(st.slots, st.keys) if st.keys.numel() else st.keys.clone()
        # the dirty owner of every key (the only up-to-date copy: at most one; the
        # lowest worker if ever several), from the dirty (worker, key) pairs
        self.hits = h = st.look.hits
        W = st.look.shape[0]
        if hasattr(caches, "dirty_owner"):  # a group's view: the owners over every worker are kept
            self.owner = caches.dirty_owner(st.uniq)
            self.has_owner = self.owner >= 0
        else:
            first = torch.full((u,), W, dtype=torch.int64).scatter_reduce_(0, h.key[h.dirty], h.worker[h.dirty],
                                                                          "amin")
            self.has_owner = first < W
            self.owner = torch.where(self.has_owner, first, torch.full_like(first, -1))
        self.row_time = cm.row_time  # [W, T]
        self.evict_time = cm._evict_fraction(st) * cm.row_time  # [W, T]
        T = self.row_time.shape[1]
        rt_owner = self.row_time.reshape(-1).index_select(0, self.owner.clamp(min=0) * T + st.table_of)
        self.owner_push = torch.where(self.has_owner, rt_owner, torch.zeros_like(rt_owner))
        # distinct (sample, key) pairs, by sample: the batch's use count of every key
        b = self.num_samples
        if ops.has_grouped_kernels():
            self.occ_s, self.occ_k, self.pair_ptr, self.uses = ops.sample_key_pairs(st.offsets, self.kidx, u)
        else:
            self.occ_s, self.occ_k, self.pair_ptr, self.uses = sample_key_pairs_reference(st.offsets, self.kidx, u)
        self._by_worker = None  # the hits in worker order, built by the first _group_state
        if shares is None:
            shares = cm.config.batch_shares(b)
        elif len(shares) != cm.num_workers or sum(int(x) for x in shares) != b:
            raise ValueError(f"GroupInputs: shares {list(shares)} do not split {b} samples over {cm.num_workers} workers")
        self.shares = np.asarray(shares, dtype=np.float64)  # the expected matrix's shares
        self._shares_t = torch.from_numpy(self.shares)
        self._uses_table = None  # (distinct use counts, each key's index in them), built by sub_matrix

    # ------------------------------------------------------------- stage 1
    def group_matrix(self, groups: Sequence[Sequence[int]], shares: Sequence[int]) -> torch.Tensor:
        """float64 ``[B, G]`` stage-1 price of every sample on every group
        (module docstring); ``shares`` per worker.  The C++ kernel
        :func:`~torchrec_esd.ops.group_price` when built (equal bit for bit to
        :meth:`group_matrix_reference`), ``O(H + U G + N G)``."""
        st, b = self.st, self.num_samples
        if not ops.has_grouped_kernels() or st.keys.numel() == 0:
            return self.group_matrix_reference(groups, shares)
        group_of, rt, ev, per = _group_terms(self.row_time, self.evict_time, groups, shares)
        h = self.hits
        return ops.group_price(h.key, group_of.index_select(0, h.worker), h.outdated, st.table_of, rt, ev,
                               self.uses, per, b, self.occ_s, self.occ_k)

    def group_matrix_reference(self, groups: Sequence[Sequence[int]], shares: Sequence[int]) -> torch.Tensor:
        """:meth:`group_matrix` in PyTorch (the kernel's reference)."""
        st, b = self.st, self.num_samples
        if st.keys.numel() == 0:
            return torch.zeros(b, len(groups), dtype=torch.float64)
        G, u = len(groups), st.uniq.numel()
        group_of = torch.full((st.look.shape[0],), -1, dtype=torch.int64)
        for gi, g in enumerate(groups):
            group_of[torch.tensor(g, dtype=torch.int64)] = gi
        # which groups hold each key, and hold it fresh: from the (worker, key) hits, O(hits)
        h = self.hits
        hg = group_of[h.worker]
        ok = hg >= 0
        hu, hg, fresh_hit = h.key[ok], hg[ok], ~h.outdated[ok]
        # [U, G] layout (key-major: the per-pair gather below reads whole rows)
        flat = hu * G + hg
        held = torch.zeros(u * G, dtype=torch.bool)
        held[flat] = True
        fresh = torch.zeros(u * G, dtype=torch.bool)
        fresh[flat[fresh_hit]] = True
        return group_price(held.view(u, G), fresh.view(u, G), st.table_of, self.row_time, self.evict_time,
                           groups, shares, self.uses, b, self.occ_s, self.occ_k)

    # ------------------------------------------------------------- stage 2
    def _hits_by_worker(self) -> Tuple[torch.Tensor, ...]:
        """``(ptr [W + 1], worker, key, outdated, dirty)``: the hits in worker
        order (stable), built once (a counting sort, ``O(H + W)``)."""
        if self._by_worker is None:
            h = self.hits
            order, ptr = ops.bucket_order(h.worker, self.st.look.shape[0])
            self._by_worker = (ptr,) + tuple(t.index_select(0, order) for t in (h.worker, h.key, h.outdated, h.dirty))
        return self._by_worker

    def prepare_groups(self) -> None:
        """Build what every group's :meth:`sub_matrix` shares, once: the hits
        in worker order and the batch's distinct use counts (``O(H + W + U
        log U)``; otherwise the first group's slice builds them)."""
        self._hits_by_worker()
        if self._uses_table is None:
            # the use counts are integers <= B: torch.unique(uses, return_inverse=True) by a
            # bincount, O(U + B) instead of a sort
            n = self.uses.to(torch.int64)
            present = torch.bincount(n, minlength=1) > 0
            nd = present.nonzero().view(-1).to(torch.float64)
            inv = (torch.cumsum(present.to(torch.int64), 0) - 1)[n]
            self._uses_table = (nd.numpy(), inv)

    def _group_state(self, gw: torch.Tensor, ku: torch.Tensor, slots: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Bool ``[U_g, |g|]`` cached / outdated / dirty of the ascending keys
        ``ku`` (id table ``slots`` of their row keys) on the workers ``gw``, from
        the hits of those workers (``O(H_g)``; the hits are put in worker order
        once, ``O(H + W)``)."""
        ptr, hw, hk, hod, hdt = self._hits_by_worker()
        order = torch.argsort(gw)
        pos, off = sample_segments(ptr, gw[order])
        row = order[torch.repeat_interleave(torch.arange(gw.numel()), off[1:] - off[:-1], output_size=pos.numel())]
        col = ops.id_table_lookup(slots, self.st.uniq[hk[pos]])
        ok = col >= 0
        row, col, pos = row[ok], col[ok], pos[ok]
        # one scatter of a 3-bit code (cached | outdated << 1 | dirty << 2), then three compares
        code = torch.zeros(ku.numel() * gw.numel(), dtype=torch.uint8)
        code[col * gw.numel() + row] = (1 + 2 * hod[pos].to(torch.uint8) + 4 * hdt[pos].to(torch.uint8))
        code = code.view(ku.numel(), gw.numel())
        return code != 0, (code & 2) != 0, (code & 4) != 0

    def sub_matrix(self, samples: torch.Tensor, workers: Sequence[int], kind: str,
                   hits: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(cost, hits)`` of the ascending ``samples`` on ``workers``: the
        slices of the full cost matrix of ``kind`` (``"additive"``,
        ``"expected"``, or ``"none"`` for zeros) and, with ``hits``, of the
        hit matrix.  ``O(N_g log N_g + U_g |g|)``.  The expected slice without
        hits (what the regret heuristic reads) comes from the C++ kernel
        :func:`~torchrec_esd.ops.group_slice_expected` when built, ``O(N_g +
        H_g + U_g |g|)``, equal bit for bit to :meth:`sub_matrix_reference`."""
        samples = samples.to(torch.int64)
        if (kind != "expected" or hits or not ops.has_grouped_kernels() or self.st.keys.numel() == 0
                or samples.numel() == 0):
            return self.sub_matrix_reference(samples, workers, kind, hits)
        gw = torch.tensor(list(workers), dtype=torch.int64)
        self.prepare_groups()
        nd, inv = self._uses_table
        # numpy's pow, in the reference's layout (amortised_key_costs): rows = distinct use counts
        sh = np.asarray(self.shares[gw.numpy()], dtype=np.float64).reshape(1, -1)
        n = nd[:, None]
        p_shared = 1.0 - (sh / max(1, self.num_samples)) ** np.maximum(n - 1.0, 0.0)
        ptr, _, hk, hod, _ = self._hits_by_worker()
        cost = ops.group_slice_expected(
            samples, gw, self.pair_ptr, self.occ_k, ptr, hk, hod, self.st.table_of, self.row_time,
            self.evict_time, self.uses, self.owner, self.owner_push, self._shares_t,
            torch.from_numpy(np.ascontiguousarray(p_shared)), inv, self.num_samples)
        return cost, None

    def sub_matrix_reference(self, samples: torch.Tensor, workers: Sequence[int], kind: str,
                             hits: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:meth:`sub_matrix` in PyTorch / numpy (the kernel's reference)."""
        st, cm = self.st, self.cm
        samples = samples.to(torch.int64)
        bg, nw = samples.numel(), len(workers)
        zeros = torch.zeros(bg, nw, dtype=torch.float64)
        if st.keys.numel() == 0 or bg == 0:
            return zeros, (zeros.clone() if hits else None)
        gw = torch.tensor(list(workers), dtype=torch.int64)
        pos, sub_off = sample_segments(st.offsets, samples)
        keys = st.keys[pos]
        ku = torch.unique(self.kidx[pos])  # the group's distinct keys (indices into uniq), ascending
        slots = ops.id_table_build(st.uniq[ku])
        cached, outdated, dirty = self._group_state(gw, ku, slots)  # [U_g, |g|] each (key-major)
        tab = st.table_of[ku]
        miss = torch.zeros(nw, dtype=torch.float64)

        def summed(w: torch.Tensor) -> torch.Tensor:
            return ops.sample_cost_matrix(keys, sub_off, [slots] * nw, [w[:, j].contiguous() for j in range(nw)], miss)

        hit = summed(cached.double()) if hits else None
        if kind == "none":
            return zeros, hit
        rt = self.row_time[gw].t().contiguous().index_select(0, tab)  # [U_g, |g|]
        ev = self.evict_time[gw].t().contiguous().index_select(0, tab)
        own = torch.where(cached, outdated.double() * rt, rt + ev)
        if kind == "additive":
            push_elsewhere = self.owner_push[ku].view(-1, 1) - dirty.double() * rt
            return summed(own + push_elsewhere), hit
        if kind != "expected":
            raise ValueError(f"sub_matrix kind must be 'additive', 'expected' or 'none', got {kind!r}")
        col = torch.full((cm.num_workers,), -1, dtype=torch.int64)
        col[gw] = torch.arange(nw)
        owner = self.owner[ku]
        owner_col = torch.where(owner >= 0, col[owner.clamp(min=0)], torch.full_like(owner, -1))
        shares = self.shares[gw.numpy()]
        h = amortised_key_costs(own.numpy(), rt.numpy(), self.uses[ku].numpy(),
                                self.has_owner[ku].numpy(), owner_col.numpy(), self.owner_push[ku].numpy(),
                                shares, self.num_samples)
        # the group's distinct (sample, key) pairs, in the full model's order
        ppos, poff = sample_segments(self.pair_ptr, samples)
        ls = torch.repeat_interleave(torch.arange(bg), poff[1:] - poff[:-1], output_size=ppos.numel())
        lk = ops.id_table_lookup(slots, st.uniq[self.occ_k[ppos]])
        return torch.from_numpy(segment_sum(h[lk.numpy()], ls.numpy(), bg)), hit
