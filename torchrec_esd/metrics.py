"""Transmission accounting: rows, bytes and link time per worker and kind.

Kinds follow Herald/LAIA: ``miss_pull``, ``miss_push``, ``update_pull``,
``update_push``; with DES-served misses also ``des_pull`` (the (row, bag)
pairs up and the bags' partial sums down; rows = rows served) and ``des_push``
(one gradient vector per bag and PS; rows = vectors).  ``bytes`` are payloads
(row values + optimizer state, partial sums, gradients); the keys that
address them (8 B per pulled / pushed row, :func:`~torchrec_esd.des_misses.pair_bytes`
per DES pair) are in ``key_bytes``; ``wire_bytes`` is both.  Link time of a worker is ``bytes / bandwidth + latency`` per
message actually sent (a phase with nothing to send costs no latency).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

from torchrec_esd.cache import KINDS as ROW_KINDS
from torchrec_esd.config import WorkerSpec

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
        }

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
        }
