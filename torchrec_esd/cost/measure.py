"""The true (de-duplicated) transmission of an assignment, and its report per
worker and kind: what :meth:`~torchrec_esd.cost.model.CostModel.measure`
returns, read by the benchmarks and the tests."""

from __future__ import annotations

from typing import Dict, Sequence

import torch

from torchrec_esd import ops
from torchrec_esd.cache.plans import KINDS, TransmissionKind
from torchrec_esd.config import WorkerSpec
from torchrec_esd.cost.batch import BatchState


def measured_rows(st: BatchState, assignment: torch.Tensor, row_offset: torch.Tensor,
                  num_workers: int) -> Dict[TransmissionKind, torch.Tensor]:
    """Rows of every transmission kind per ``(worker, table)`` (float64
    ``[W, T]``; evictions of dirty rows are an expectation) when the batch is
    dispatched by ``assignment``; see :meth:`CostModel.measure`."""
    W = num_workers
    T = row_offset.numel() - 1
    u = st.uniq.numel()
    used = torch.zeros(W, u, dtype=torch.bool)
    if st.keys.numel():
        owner = torch.repeat_interleave(assignment, st.offsets[1:] - st.offsets[:-1])
        uk, ug, _ = ops.unique_keys_per_group(st.keys, owner, W)
        pos = ops.id_table_lookup(st.slots, uk)
        used[ug, pos] = True
    users = used.sum(0)  # [U]
    cached = st.cached
    tab = st.table_of.view(1, -1).expand(W, -1)
    flat_seg = (torch.arange(W).view(-1, 1) * T + tab).reshape(-1)

    def per_wt(mask: torch.Tensor) -> torch.Tensor:
        """[W, U] bool -> [W, T] counts."""
        return torch.bincount(flat_seg[mask.reshape(-1)], minlength=W * T).view(W, T).double()

    miss = used & ~cached
    rows = {
        TransmissionKind.MISS_PULL: per_wt(miss),
        TransmissionKind.UPDATE_PULL: per_wt(used & cached & st.outdated),
        # a dirty copy that another worker uses is pushed first (once) ...
        # ... and every id with more than one user gets one gradient push per user
        TransmissionKind.UPDATE_PUSH: per_wt(st.dirty & ((users.view(1, -1) - used.long()) > 0))
        + per_wt(used & (users.view(1, -1) > 1)),
    }
    # evictions: misses beyond the free slots evict rows w does not use
    n_miss = rows[TransmissionKind.MISS_PULL]
    occupied = st.occupied.double()
    free = (st.cap.double() - occupied).clamp(min=0)
    unpinned = occupied - per_wt(used & cached)
    k = torch.minimum((n_miss - free).clamp(min=0), unpinned)
    dirty_unused = st.ndirty.double() - per_wt(st.dirty & (users.view(1, -1) > 0))
    rows[TransmissionKind.MISS_PUSH] = torch.where(
        unpinned > 0, k * dirty_unused / unpinned.clamp(min=1), torch.zeros_like(k)
    )
    # misses beyond the slots stay transient (smallest ids get the slots) and
    # their gradient goes to the PS (if not already counted as shared)
    n_slot = free + k
    if u:
        cs = torch.cumsum(miss.long(), 1)  # [W, U]
        tstart = torch.searchsorted(st.uniq, row_offset[:-1])  # [T]
        before = torch.where(
            tstart.view(1, -1) > 0,
            cs[:, (tstart - 1).clamp(min=0)],
            torch.zeros(W, T, dtype=torch.long),
        )
        rank = cs - torch.gather(before, 1, tab)  # 1-based rank of a miss in its (w, t)
        slots_wt = torch.gather(n_slot, 1, tab)
        transient = miss & (rank.double() > slots_wt) & (users.view(1, -1) == 1)
        rows[TransmissionKind.UPDATE_PUSH] = rows[TransmissionKind.UPDATE_PUSH] + per_wt(transient)
    return rows


def summarize(rows: Dict[TransmissionKind, torch.Tensor], row_bytes: torch.Tensor,
              workers: Sequence[WorkerSpec]) -> Dict:
    """The report of :meth:`CostModel.measure` from :func:`measured_rows`
    (``row_bytes``: ``[T]`` bytes per row of every table)."""
    per_worker = []
    per_kind = {k: {"rows": 0.0, "bytes": 0.0, "seconds": 0.0} for k in KINDS}
    link = []
    for w, spec in enumerate(workers):
        d: Dict = {}
        tot_rows = tot_bytes = tot_s = 0.0
        for k in KINDS:
            r = float(rows[k][w].sum())
            by = float((rows[k][w] * row_bytes).sum())
            s = spec.link_time(by, 1.0) if r > 0 else 0.0
            d[k] = {"rows": r, "bytes": by, "seconds": s}
            per_kind[k]["rows"] += r
            per_kind[k]["bytes"] += by
            per_kind[k]["seconds"] += s
            tot_rows += r
            tot_bytes += by
            tot_s += s
        d.update(rows=tot_rows, bytes=tot_bytes, seconds=tot_s)
        per_worker.append(d)
        link.append(tot_s)
    return {
        "per_worker": per_worker,
        "per_kind": per_kind,
        "link_s": link,
        "rows": sum(p["rows"] for p in per_worker),
        "bytes": sum(p["bytes"] for p in per_worker),
        "total_s": float(sum(link)),
        "makespan_s": float(max(link)) if link else 0.0,
    }
