"""Per-step metrics of a training job: JSON lines, and TensorBoard when installed.

``JobConfig(metrics_jsonl=PATH)`` (the example's ``--metrics-jsonl PATH``)
appends one JSON object per step to ``PATH``, written by worker 0 at the end
of the job (every worker's numbers are gathered once, so training does no
extra collective per step).  Keys of a record:

* ``job``: ``"vanilla"``, ``"esd:<dispatcher>"`` or ``"des:<sharding>"``;
* ``step`` (from 0), ``loss`` (the step's mean loss over the global batch),
  ``iter_ms`` (worker 0's wall time from the previous step's end, step 0: from
  the start of the loop);
* ESD only: ``dispatch_ms`` and ``solver`` (the decision of this step's batch:
  which solver HybridDis used, ``"exact"``, ``"heuristic"``, ...);
  ``link_s_max`` (the slowest worker's link time of this step) and ``workers``,
  one entry per worker with this step's ``bytes`` and ``rows`` per kind
  (``miss_pull``, ``miss_push``, ``update_pull``, ``update_push``,
  ``des_pull``, ``des_push``; see :mod:`torchrec_esd.metrics`),
  ``key_bytes``, ``messages``, ``link_s`` (bytes / bandwidth + latency per
  message, modelled from the configured link) and ``bandwidth_mbps``.

``JobConfig(tensorboard_dir=DIR)`` writes the same numbers as TensorBoard
scalars (``<job>/loss``, ``<job>/iter_ms``, ``<job>/link_s/w<i>``, ...); it
needs the ``tensorboard`` package and fails with :class:`EsdConfigError` on
every rank when it is missing.  ``scripts/plot_metrics.py`` plots the JSON lines.
"""

from __future__ import annotations

import json
import time
from typing import Dict, List, Optional, Sequence

import torch.distributed as dist

from torchrec_esd.config import EsdConfigError

METRIC_KEYS = ("job", "step", "loss", "iter_ms")
ESD_METRIC_KEYS = ("dispatch_ms", "solver", "link_s_max", "workers")
_METER_FIELDS = ("key_bytes", "messages", "link_s")


def require_tensorboard() -> None:
    """Raise :class:`EsdConfigError` unless TensorBoard can be written."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise EsdConfigError(
            f"TensorBoard output was asked for, but the tensorboard package is not installed ({e}); "
            "install it (pip install tensorboard, or pip install 'torchrec_esd[tensorboard]') or drop "
            "the TensorBoard option; --metrics-jsonl writes the same numbers as JSON lines"
        ) from e


def _meter_delta(now: Dict, before: Optional[Dict]) -> Dict:
    """One step's numbers from two ``TransmissionMeter.as_dict()`` snapshots."""
    out = {
        "bytes": {k: v - (before["bytes"][k] if before else 0) for k, v in now["bytes"].items()},
        "rows": {k: v - (before["rows"][k] if before else 0) for k, v in now["rows"].items()},
    }
    for k in _METER_FIELDS:
        out[k] = now[k] - (before[k] if before else 0)
    return out


class StepMetrics:
    """Collects one job's per-step numbers on every worker of ``group``;
    :meth:`close` gathers them and worker 0 (rank 0 of ``group``) writes."""

    def __init__(self, job_label: str, group, jsonl_path: Optional[str], tensorboard_dir: Optional[str],
                 bandwidths_mbps: Optional[Sequence[float]] = None) -> None:
        if tensorboard_dir is not None:
            require_tensorboard()
        self.label, self.group = job_label, group
        self.jsonl_path, self.tensorboard_dir = jsonl_path, tensorboard_dir
        self.bandwidths = list(bandwidths_mbps) if bandwidths_mbps is not None else None
        self.records: List[Dict] = []
        self._last_meter: Optional[Dict] = None
        self._last_end = time.perf_counter()

    def step(self, loss: float, meter: Optional[Dict] = None, decision: Optional[Dict] = None) -> None:
        """This worker's numbers of the step that just ended (``meter``: its
        ``TransmissionMeter.as_dict()`` now; ``decision``: ``{"solver", "ms"}``)."""
        now = time.perf_counter()
        rec: Dict = {"step": len(self.records), "loss": loss, "iter_ms": (now - self._last_end) * 1e3}
        self._last_end = now
        if meter is not None:
            rec["meter"] = _meter_delta(meter, self._last_meter)
            self._last_meter = meter
        if decision is not None:
            rec["dispatch_ms"], rec["solver"] = decision["ms"], decision["solver"]
        self.records.append(rec)

    def close(self) -> List[Dict]:
        """Gather every worker's records (collective on ``group``); on its
        rank 0, write them; returns the merged records (empty elsewhere)."""
        everyone: List = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, self.records, group=self.group)
        if dist.get_rank(self.group) != 0:
            return []
        merged = []
        for step, mine in enumerate(everyone[0]):
            rec = {"job": self.label, "step": step, "loss": mine["loss"], "iter_ms": mine["iter_ms"]}
            if "dispatch_ms" in mine:
                rec["dispatch_ms"], rec["solver"] = mine["dispatch_ms"], mine["solver"]
            if "meter" in mine:
                workers = []
                for w, recs in enumerate(everyone):
                    entry = {"worker": w, **recs[step]["meter"]}
                    if self.bandwidths is not None:
                        entry["bandwidth_mbps"] = self.bandwidths[w]
                    workers.append(entry)
                rec["link_s_max"] = max(e["link_s"] for e in workers)
                rec["workers"] = workers
            merged.append(rec)
        if self.jsonl_path is not None:
            with open(self.jsonl_path, "a") as f:
                for rec in merged:
                    f.write(json.dumps(rec) + "\n")
        if self.tensorboard_dir is not None:
            self._write_tensorboard(merged)
        return merged

    def _write_tensorboard(self, merged: List[Dict]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(self.tensorboard_dir) as tb:
            for rec in merged:
                s = rec["step"]
                tb.add_scalar(f"{self.label}/loss", rec["loss"], s)
                tb.add_scalar(f"{self.label}/iter_ms", rec["iter_ms"], s)
                if "dispatch_ms" in rec:
                    tb.add_scalar(f"{self.label}/dispatch_ms", rec["dispatch_ms"], s)
                for w in rec.get("workers", []):
                    tb.add_scalar(f"{self.label}/link_s/w{w['worker']}", w["link_s"], s)
                    tb.add_scalar(f"{self.label}/bytes/w{w['worker']}", sum(w["bytes"].values()), s)
