"""Fault monitor: a rank that dies, stops or fails ends every rank of the job,
within a bounded time, with one line naming it.

Every rank of an ESD job (workers and parameter servers) runs one
:class:`FaultMonitor` thread on its own connection to the c10d store of the
default process group.  Each tick (``interval_s``, a tenth of the timeout) it

* writes this rank's record ``beat|state|progress|message`` (``beat`` counts
  ticks, ``state`` is ``running``, ``finishing`` (no more batches), ``done``
  or ``failed``; ``progress`` is a worker's dispatched batches);
* reads every rank's record and ends this rank when

  - a rank's beat has not changed for ``timeout_s`` (it was killed, stopped
    with SIGSTOP, or its host is gone),
  - a rank published a failure (any exception it raised) and this rank has not
    ended itself within ``grace_s``,
  - a worker ran out of batches: it finished after ``N`` batches while another
    worker started batch ``N + 1`` (which can never complete),
  - the store itself is lost (its host died) or does not answer within
    ``timeout_s``, while no rank has finished yet.

Ending a rank: one line ``ESD fault monitor on rank R (worker i): <cause>`` on
stderr, then ``os._exit(FAULT_EXIT_CODE)``, from the monitor thread: the main
thread may be blocked inside a gloo collective and is not waited for.

Bounded time (``T = timeout_s``, default ``EsdConfig.fault_timeout_s = 30``):
a killed or stopped rank ends every other rank within ``T + 2 * T / 10`` (the
last beat may be one tick old, the check runs once a tick); a failure record
within ``T / 10 + grace_s`` (``grace_s = min(5, T / 4)``).  A rank whose
process hosts the store (rank 0 without a launcher) ends two ticks later, so
that the others read its record first.  A rank that ends
normally publishes ``done`` and is no longer timed, so ranks that finish at
different times raise no false alarm.

Cost: one store write and one multi-get of ``W + P`` short keys per rank and tick.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Sequence

FAULT_EXIT_CODE = 17
MAX_MESSAGE_CHARS = 2000
_STATES = ("running", "finishing", "done", "failed")

_OPEN: List["FaultMonitor"] = []  # monitors of this process not closed yet
_OPEN_LOCK = threading.Lock()
_HOOKED = False
_JOBS = [0]  # per-process count of monitored jobs: every rank creates them in the same order


@dataclass
class RankRecord:
    """What one rank published (see the module docstring)."""

    beat: int
    state: str
    progress: int = 0
    message: str = ""

    def encode(self) -> str:
        return f"{self.beat}|{self.state}|{self.progress}|{self.message[:MAX_MESSAGE_CHARS]}"

    @staticmethod
    def decode(raw: bytes) -> "RankRecord":
        beat, state, progress, message = raw.decode(errors="replace").split("|", 3)
        return RankRecord(int(beat), state, int(progress), message)


def rank_roles(num_workers: int) -> Callable[[int], str]:
    """``rank -> "worker i" / "PS j"`` of an ESD world (workers first)."""
    return lambda r: f"worker {r}" if r < num_workers else f"PS {r - num_workers}"


def describe_exception(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _default_fault(line: str) -> None:
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - ending anyway
        pass
    try:
        sys.stderr.write("\n" + line + "\n")  # after a progress bar's line
        sys.stderr.flush()
    except Exception:  # noqa: BLE001
        os.write(2, (line + "\n").encode(errors="replace"))
    os._exit(FAULT_EXIT_CODE)


def job_prefix() -> str:
    """A store-key prefix for the next monitored job of this process (every
    rank creates its runtimes in the same order, so every rank gets the same)."""
    _JOBS[0] += 1
    return f"esd_faults/{_JOBS[0]}/"


class FaultMonitor:
    """This rank's heartbeat and watcher (see the module docstring).

    Args:
        store: a c10d store every rank reaches (default: the default process
            group's); the monitor talks through its own clone of it.
        rank, world_size: this rank and the number of ranks.
        role: ``rank -> name`` for messages (:func:`rank_roles`).
        timeout_s: a rank silent for this long ends the job.
        prefix: store-key prefix unique to this job (:func:`job_prefix`).
        workers: ranks whose ``progress`` counts batches (run-out check).
        progress: this rank's dispatched batches (workers), read each tick.
        on_fault: called with the line instead of printing it and exiting (tests).
        hosts_store: this rank's process hosts the store (rank 0 of a world
            without a launcher): it lingers two ticks before ending, so that the
            others read its failure record before the store goes down with it.
    """

    def __init__(
        self,
        store,
        rank: int,
        world_size: int,
        role: Callable[[int], str],
        timeout_s: float,
        prefix: str,
        workers: Sequence[int] = (),
        progress: Optional[Callable[[], int]] = None,
        on_fault: Optional[Callable[[str], None]] = None,
        interval_s: Optional[float] = None,
        grace_s: Optional[float] = None,
        hosts_store: bool = False,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"fault timeout must be > 0 s, got {timeout_s!r}")
        self.rank, self.world_size, self.role = rank, world_size, role
        self.timeout_s = float(timeout_s)
        self.interval_s = float(interval_s) if interval_s is not None else self.timeout_s / 10
        self.grace_s = float(grace_s) if grace_s is not None else min(5.0, self.timeout_s / 4)
        self.workers = list(workers)
        self.progress = progress or (lambda: 0)
        self.on_fault = on_fault or _default_fault
        self.prefix = prefix
        self.hosts_store = hosts_store
        try:
            self.store = store.clone()  # own connection: the main thread may block in the shared one
        except Exception:  # noqa: BLE001 - a store without a clone (e.g. HashStore): share it
            self.store = store
        try:
            self.store.set_timeout(timedelta(seconds=self.timeout_s))
        except (AttributeError, RuntimeError):
            pass
        self._keys = [f"{prefix}{r}" for r in range(world_size)]
        self._state, self._message, self._beat = "running", "", 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._seen: Dict[int, RankRecord] = {}
        self._changed: Dict[int, float] = {}  # monotonic time each rank's beat last changed
        self._failed_seen: Dict[int, float] = {}
        self.fault: Optional[str] = None  # the cause this monitor ended the rank with

    def name(self, r: int) -> str:
        return f"rank {r} ({self.role(r)})"

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "FaultMonitor":
        self._publish()
        now = time.monotonic()
        self._changed = {r: now for r in range(self.world_size)}
        self._thread = threading.Thread(target=self._run, name=f"esd-fault-monitor-{self.rank}", daemon=True)
        self._thread.start()
        with _OPEN_LOCK:
            _OPEN.append(self)
        _install_hooks()
        return self

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def end_of_batches(self) -> None:
        """This worker has no more batches (its progress is final)."""
        with self._lock:
            if self._state == "running":
                self._state = "finishing"
        self._publish()

    def fail(self, error: "BaseException | str") -> None:
        """This rank failed with ``error``: publish it and stop.  A lost
        connection (:func:`lost_connection`) is usually another rank's death:
        then the monitor first waits (at most the time it needs to see a rank
        go silent) for the cause, so that this rank ends naming the lost rank
        rather than with a bare "connection reset"."""
        if self.fault is not None:  # the monitor thread is ending this rank: let it
            time.sleep(2 * self.interval_s + 1.0)
            return
        if isinstance(error, BaseException) and lost_connection(error) and not self.closed:
            self._stop.wait(self.timeout_s + 2 * self.interval_s + self.grace_s)
            if self.fault is not None:
                time.sleep(2 * self.interval_s + 1.0)
                return
        self.close(error=error if isinstance(error, str) else describe_exception(error))

    def close(self, error: Optional[str] = None) -> None:
        """Publish ``done`` (or the failure ``error``) and stop; idempotent."""
        with self._lock:
            if self._stop.is_set():
                return
            self._state, self._message = ("failed", error) if error is not None else ("done", "")
            self._stop.set()
        try:
            self._publish()
        except Exception:  # noqa: BLE001 - the store may be gone; the beat stops either way
            pass
        else:
            if error is not None and self.hosts_store:
                # the store dies with this process: let the others read the failure first
                time.sleep(2 * self.interval_s)
        with _OPEN_LOCK:
            if self in _OPEN:
                _OPEN.remove(self)
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=self.interval_s + 1.0)

    # ------------------------------------------------------------ the thread
    def _publish(self) -> None:
        with self._lock:
            self._beat += 1
            rec = RankRecord(self._beat, self._state, int(self.progress()), self._message)
        self.store.set(self._keys[self.rank], rec.encode())

    def _read(self) -> Dict[int, RankRecord]:
        present = [r for r in range(self.world_size) if r in self._seen or self.store.check([self._keys[r]])]
        raw = self.store.multi_get([self._keys[r] for r in present]) if present else []
        return {r: RankRecord.decode(v) for r, v in zip(present, raw)}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._publish()
                records = self._read()
            except Exception as e:  # noqa: BLE001 - the store's host died or hangs
                failed = [r for r, rec in sorted(self._seen.items()) if r != self.rank and rec.state == "failed"]
                if not failed and any(rec.state in ("done", "finishing") for rec in self._seen.values()):
                    # the store's host may be a rank that finished normally (rank 0
                    # of a world without a launcher): nothing is left to watch with
                    return
                self._stop.wait(self.grace_s)  # this rank may be ending on its own
                if failed:  # the store's host may be the failed rank: its failure is the cause
                    cause = f"{self.name(failed[0])} failed: {self._seen[failed[0]].message}"
                else:
                    cause = (f"lost the c10d store the fault monitor runs on (its host died or does not "
                             f"answer within {self.timeout_s:g} s): {describe_exception(e).splitlines()[0]}")
            else:
                cause = self.check(records, time.monotonic())
            if cause is not None and not self._stop.is_set():
                self._end(cause)
                return

    def _end(self, cause: str) -> None:
        self.fault = cause
        try:
            with self._lock:
                self._state, self._message = "failed", f"ended by its fault monitor: {cause}"
            self._publish()  # tells ranks that started later, without waiting for their own timeout
        except Exception:  # noqa: BLE001
            pass
        one_line = " ".join(cause.split())  # a multi-line message (a traceback) on one line
        line = (f"ESD fault monitor on {self.name(self.rank)}: {one_line}; ending this rank "
                f"(exit code {FAULT_EXIT_CODE}, fault timeout {self.timeout_s:g} s)")
        self._stop.set()
        if self.hosts_store:
            time.sleep(2 * self.interval_s)
        self.on_fault(line)
        with _OPEN_LOCK:  # on_fault returned (tests): this monitor is done
            if self in _OPEN:
                _OPEN.remove(self)

    # ------------------------------------------------------------ the checks
    def check(self, records: Dict[int, RankRecord], now: float) -> Optional[str]:
        """The cause to end this rank for, given every rank's record at ``now``."""
        for r, rec in records.items():
            if rec.state not in _STATES:
                return f"{self.name(r)} published an unknown state {rec.state!r}"
            old = self._seen.get(r)
            if old is None or old.beat != rec.beat:
                self._changed[r] = now
            self._seen[r] = rec
        others = [r for r in range(self.world_size) if r != self.rank]
        for r in others:
            rec = self._seen.get(r)
            if rec is not None and rec.state == "failed":
                first = self._failed_seen.setdefault(r, now)
                if now - first >= self.grace_s:
                    return f"{self.name(r)} failed: {rec.message}"
        cause = self._ran_out()
        if cause is not None:
            return cause
        for r in others:
            rec = self._seen.get(r)
            if rec is not None and rec.state in ("done", "failed"):
                continue
            silent = now - self._changed[r]
            if silent > self.timeout_s:
                if rec is None:
                    return f"{self.name(r)} never started its heartbeat ({silent:.1f} s; it died or hangs before it)"
                return (f"{self.name(r)} is silent: no heartbeat for {silent:.1f} s (killed, stopped, "
                        "or its host is unreachable)")
        return None

    def _ran_out(self) -> Optional[str]:
        progress = {r: rec.progress for r, rec in self._seen.items() if r in self.workers}
        if self.rank in self.workers:
            progress[self.rank] = int(self.progress())
        ended = {r: rec.progress for r, rec in self._seen.items()
                 if r in self.workers and rec.state in ("finishing", "done")}
        for r, n in sorted(ended.items()):
            ahead = [q for q, p in progress.items() if p > n]
            if ahead:
                q = ahead[0]
                return (f"{self.name(r)} ran out of batches: it ended after {n} batches while "
                        f"{self.name(q)} started batch {progress[q]} (every worker must get the same "
                        "number of global batches)")
        return None


def lost_connection(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it chains) is a broken link to a
    peer: the PS transport's :class:`EsdPeerLostError`, or a c10d / gloo
    network error (a collective's peer died)."""
    from torchrec_esd.ps.protocol import EsdPeerLostError

    seen = set()
    e: Optional[BaseException] = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if isinstance(e, EsdPeerLostError) or type(e).__name__ in ("DistNetworkError", "DistBackendError"):
            return True
        if isinstance(e, RuntimeError) and any(k in text for k in _LOST_LINK_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


_LOST_LINK_TEXT = ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "Broken pipe")


def fail_open_monitors(error: BaseException | str) -> None:
    """Publish ``error`` as this process's failure on every open monitor
    (a rank that hits any exception; called by the trainer, the test launcher
    and the ``sys.excepthook`` installed with the first monitor)."""
    with _OPEN_LOCK:
        monitors = list(_OPEN)
    for m in monitors:
        m.fail(error)


def close_open_monitors() -> None:
    """Publish ``done`` on every open monitor (normal interpreter exit)."""
    with _OPEN_LOCK:
        monitors = list(_OPEN)
    for m in monitors:
        m.close()


def _install_hooks() -> None:
    global _HOOKED
    if _HOOKED:
        return
    _HOOKED = True
    previous = sys.excepthook

    def hook(typ, value, tb):
        previous(typ, value, tb)
        fail_open_monitors(value if value is not None else typ.__name__)

    sys.excepthook = hook
    atexit.register(close_open_monitors)
