"""Transmission accounting: rows, bytes and link time per worker and kind.

Kinds follow Herald/LAIA: ``miss_pull``, ``miss_push``, ``update_pull``,
``update_push``; with DES-served misses also ``des_pull`` (the (row, bag)
pairs up and the bags' partial sums down; rows = rows served) and ``des_push``
(one gradient vector per bag and PS; rows = vectors).

Rows per kind come from the iteration plan; everything else is measured: a
worker's :class:`~torchrec_esd.ps.PsClient` reports what each exchange with
the PS really moved (:class:`~torchrec_esd.ps.Traffic`: bytes and messages
from the transport's :class:`~torchrec_esd.ps.LinkMeter`, payload sections
as packed), recorded with :meth:`TransmissionMeter.record_push_pull` /
:meth:`~TransmissionMeter.record_grads`.  ``bytes`` are payloads (row values
+ optimizer state, partial sums, gradients), a section's bytes split over its
kinds by their rows (a section's rows all have one width); ``key_bytes`` is
the rest of the wire (keys, DES pairs and weights, frames); ``wire_bytes``
(both) is what the transport sent and received.  ``messages`` are
point-to-point transfers (a request's frame and payload are two).  Link time
of a worker: per exchange ``bytes / bandwidth + latency`` for what it sent
to all PS together and the same for what it received (one request and one
reply on its link; a direction with nothing in it costs no latency).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping

from torchrec_esd.cache import KINDS as ROW_KINDS
from torchrec_esd.config import WorkerSpec
from torchrec_esd.ps.protocol import Section, SectionSize
from torchrec_esd.ps.transport import Traffic

KINDS = ROW_KINDS + ("des_pull", "des_push")


@dataclass
class TransmissionMeter:
    """Counters of one worker's link (or of a whole job, see :meth:`merge`)."""

    rows: Dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    bytes: Dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    messages: int = 0
    key_bytes: int = 0
    link_s: float = 0.0
    iterations: int = 0
    # pulled rows (counted in miss_pull / update_pull) that were prefetched while an
    # earlier batch computed (EsdConfig.prefetch_depth)
    prefetched_rows: int = 0
    # push/pulls posted right after the previous batch's gradients (EsdConfig.early_pull)
    early_pulls: int = 0
    # of those, posted with this batch's gradients as one split exchange (EsdConfig.split_reply)
    split_replies: int = 0
    sum_replies: int = 0  # split replies whose second part came as gradient sums (EsdConfig.split_sums)
    # padding the PS added to small timed replies so that the link is measured on enough bytes
    # (EsdConfig.online_links, PushPullFrame.probe); on the wire and in key_bytes, not a payload
    probe_bytes: int = 0
    # dirty rows written back after the worker's link slowed down (EsdConfig.flush_on_slowdown),
    # counted in update_push too
    flushed_rows: int = 0
    # pushed rows (counted in their kinds with the push/pull they belong to) sent right after the
    # previous push/pull, while the previous batch computed (EsdConfig.pre_push)
    pre_pushed_rows: int = 0

    def add(self, kind: str, rows: int, num_bytes: int) -> None:
        if kind not in self.rows:
            raise KeyError(f"unknown transmission kind {kind!r}; kinds are {KINDS}")
        self.rows[kind] += int(rows)
        self.bytes[kind] += int(num_bytes)

    def add_keys(self, num_bytes: int) -> None:
        """Bytes of keys / ids that address the payloads."""
        self.key_bytes += int(num_bytes)

    def add_message(self, link: WorkerSpec, num_bytes: int) -> None:
        """One message of ``num_bytes`` on ``link`` (nothing if empty)."""
        if num_bytes > 0:
            self.messages += 1
            self.link_s += link.link_time(num_bytes, 1)

    def record_push_pull(self, plan_rows: Mapping[str, int], traffic: Traffic, link: WorkerSpec) -> None:
        """A push/pull exchange: ``plan_rows`` (the plan's rows per kind) says
        which pushed rows were evictions (``miss_push``) and which pulled rows
        were misses / updates; ``des_rows`` rows were served as partial sums."""
        pushed = traffic.section(Section.PUSH_ROWS)
        miss_push = int(plan_rows.get("miss_push", 0))
        self._add_split(pushed, {"miss_push": miss_push, "update_push": pushed.rows - miss_push})
        pulled = traffic.section(Section.PULL_ROWS)
        self._add_split(pulled, {k: int(plan_rows.get(k, 0)) for k in ("miss_pull", "update_pull")})
        self.add("des_pull", int(plan_rows.get("des_rows", 0)), traffic.section(Section.DES_PARTIALS).bytes)
        self.probe_bytes += traffic.section(Section.PROBE).bytes
        self._add_wire(traffic, link)

    def record_grads(self, traffic: Traffic, link: WorkerSpec) -> None:
        """A gradient exchange: row gradients (``update_push``), DES bag gradients (``des_push``)."""
        for kind, section in (("update_push", Section.ROW_GRADS), ("des_push", Section.BAG_GRADS)):
            s = traffic.section(section)
            self.add(kind, s.rows, s.bytes)
        self._add_wire(traffic, link)

    def _add_split(self, section: SectionSize, rows: Mapping[str, int]) -> None:
        if sum(rows.values()) != section.rows or any(r < 0 for r in rows.values()):
            raise ValueError(f"rows per kind {dict(rows)} do not add up to the {section.rows} rows sent")
        width = section.bytes // section.rows if section.rows else 0
        for kind, r in rows.items():
            self.add(kind, r, r * width)

    def _add_wire(self, traffic: Traffic, link: WorkerSpec) -> None:
        self.key_bytes += traffic.wire_bytes - traffic.payload_bytes
        self.messages += traffic.messages
        for n in (traffic.link.bytes_sent, traffic.link.bytes_received):
            if n > 0:
                self.link_s += link.link_time(n, 1)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    def as_dict(self) -> Dict:
        return {
            "rows": dict(self.rows),
            "bytes": dict(self.bytes),
            "total_bytes": self.total_bytes,
            "key_bytes": self.key_bytes,
            "wire_bytes": self.total_bytes + self.key_bytes,
            "messages": self.messages,
            "link_s": self.link_s,
            "iterations": self.iterations,
            "prefetched_rows": self.prefetched_rows,
            "early_pulls": self.early_pulls,
            "split_replies": self.split_replies,
            "sum_replies": self.sum_replies,
            "probe_bytes": self.probe_bytes,
            "flushed_rows": self.flushed_rows,
            "pre_pushed_rows": self.pre_pushed_rows,
        }

    @staticmethod
    def difference(later: Dict, earlier: Dict) -> Dict:
        """The traffic between two :meth:`as_dict` snapshots of one meter
        (``later`` taken after ``earlier``): every counter less its earlier
        value, the per-kind ``rows`` and ``bytes`` kind by kind.  A counter
        that went down means the snapshots are not of one meter in order."""
        out: Dict = {}
        for k, v in later.items():
            if isinstance(v, dict):
                out[k] = {kind: n - earlier[k][kind] for kind, n in v.items()}
                bad = [kind for kind, n in out[k].items() if n < 0]
            else:
                out[k] = v - earlier[k]
                bad = [k] if out[k] < 0 else []
            if bad:
                raise ValueError(f"meter snapshots out of order: {k} {bad} went down")
        return out

    @staticmethod
    def summarize(per_worker: List[Dict]) -> Dict:
        """Job-level view of per-worker ``as_dict()`` results."""
        return {
            "per_worker": per_worker,
            "total_bytes": sum(w["total_bytes"] for w in per_worker),
            "total_wire_bytes": sum(w["wire_bytes"] for w in per_worker),
            "total_link_s": sum(w["link_s"] for w in per_worker),
            "makespan_link_s": max((w["link_s"] for w in per_worker), default=0.0),
            "rows": {k: sum(w["rows"][k] for w in per_worker) for k in KINDS},
            "prefetched_rows": sum(w.get("prefetched_rows", 0) for w in per_worker),
            "early_pulls": sum(w.get("early_pulls", 0) for w in per_worker),
            "split_replies": sum(w.get("split_replies", 0) for w in per_worker),
            "sum_replies": sum(w.get("sum_replies", 0) for w in per_worker),
            "probe_bytes": sum(w.get("probe_bytes", 0) for w in per_worker),
            "flushed_rows": sum(w.get("flushed_rows", 0) for w in per_worker),
            "pre_pushed_rows": sum(w.get("pre_pushed_rows", 0) for w in per_worker),
        }
