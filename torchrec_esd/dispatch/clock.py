"""Where a decision's wall time goes, in the thread that decides: its CPU
time, and (Linux) the time it waited, runnable, for a core.

A decision in the dispatch-ahead thread shares the machine with the training
threads of every rank on it; on a small machine its wall time then measures
the machine as much as the decision.  :class:`DecisionClock` separates the
two: ``time.thread_time`` is the thread's CPU, and the second field of
``/proc/thread-self/schedstat`` is the time the thread spent runnable on a run
queue, waiting for a core (the kernel's scheduler statistics; ``None`` where
the file does not exist).  Wall minus both is what the thread waited for
otherwise (the GIL, a lock, I/O).
"""

from __future__ import annotations

import time
from typing import Dict, Optional

_SCHEDSTAT = "/proc/thread-self/schedstat"


def runqueue_wait_s() -> Optional[float]:
    """The calling thread's total time runnable but waiting for a core, in
    seconds (``/proc/thread-self/schedstat``), or ``None`` where it cannot be read."""
    try:
        with open(_SCHEDSTAT, "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


class DecisionClock:
    """Started at construction; :meth:`read` gives ``wall_s``, ``cpu_s`` and
    (where known) ``runqueue_s`` since then, for the calling thread."""

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._cpu = time.thread_time()
        self._wait = runqueue_wait_s()

    def info(self) -> Dict[str, float]:
        """The ``DispatchResult.info`` entries of a whole decision timed by this
        clock: ``full_decision_s`` (wall), ``full_decision_cpu_s`` (the deciding
        thread's CPU) and, where the kernel reports it, ``full_decision_runqueue_s``
        (its time runnable but waiting for a core)."""
        t = self.read()
        out = {"full_decision_s": t["wall_s"], "full_decision_cpu_s": t["cpu_s"]}
        if "runqueue_s" in t:
            out["full_decision_runqueue_s"] = t["runqueue_s"]
        return out

    def read(self) -> Dict[str, float]:
        out = {"wall_s": time.perf_counter() - self._wall, "cpu_s": time.thread_time() - self._cpu}
        if self._wait is not None:
            now = runqueue_wait_s()
            if now is not None:
                out["runqueue_s"] = now - self._wait
        return out
