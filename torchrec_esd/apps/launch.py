"""Run a function on every rank of a local gloo world (tests, one-run benchmarks).

``torchrun`` is the launcher for real jobs; this spawns ``world_size`` local
processes on localhost, initialises gloo in each, runs ``fn(*args)`` and
returns every rank's result.  A rank that fails makes the call raise with that
rank's traceback; a world that does not finish within ``timeout_s`` is killed.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchrec_esd.distributed.faults import close_open_monitors, fail_open_monitors


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, outdir: str, fn, args, timeout_s: float) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    # stdout / stderr into files the parent relays to its own (a fork server's
    # children would otherwise write wherever the fork server's fds pointed)
    for fd, name in ((1, "out"), (2, "err")):
        sys.stdout.flush() if fd == 1 else sys.stderr.flush()
        f = os.open(os.path.join(outdir, f"rank{rank}.{name}"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(f, fd)
        os.close(f)
    path = os.path.join(outdir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        result = fn(*args)
        close_open_monitors()  # a runtime fn left open: done, not silent
        torch.save({"ok": True, "result": result}, path)
        # a rank whose fn needs no peer could otherwise close its gloo pairs while
        # another rank still connects its mesh ("connection closed by peer" there)
        _linger(outdir, world)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        fail_open_monitors(e)  # every other rank ends with this message
        torch.save({"ok": False, "error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}, path)
        _linger(outdir, world)
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


LINGER_S = 3.0


def _linger(outdir: str, world: int) -> None:
    """A rank that is done stays up (at most :data:`LINGER_S`) until every
    rank has a result: a rank that fails, or finishes without talking to its
    peers, while others are still connecting (rank 0 hosts the rendezvous
    store, every rank is a peer of gloo's mesh) would otherwise hand them a
    'connection closed' instead of their own error or result."""
    end = time.monotonic() + LINGER_S
    while time.monotonic() < end:
        if all(os.path.exists(os.path.join(outdir, f"rank{r}.pt")) for r in range(world)):
            return
        time.sleep(0.02)


class _Relay:
    """Copies what the ranks wrote to their ``rank<r>.out`` / ``.err`` files to
    this process's stdout / stderr, as it arrives."""

    def __init__(self, outdir: str, world_size: int) -> None:
        self._files = [(os.path.join(outdir, f"rank{r}.{name}"), fd)
                       for r in range(world_size) for name, fd in (("out", 1), ("err", 2))]
        self._offsets = [0] * len(self._files)

    def __call__(self) -> None:
        for i, (path, fd) in enumerate(self._files):
            try:
                with open(path, "rb") as f:
                    f.seek(self._offsets[i])
                    data = f.read()
            except FileNotFoundError:
                continue
            if data:
                self._offsets[i] += len(data)
                os.write(fd, data)


class RankFailed(RuntimeError):
    def __init__(self, errors: dict) -> None:
        self.errors = errors  # rank -> message
        lines = [f"rank {r}: {e['error']}\n{e['tb']}" for r, e in sorted(errors.items())]
        super().__init__("\n".join(lines))


# modules every rank needs, imported once by the fork server (a rank then
# starts in well under a second instead of importing torch and torchrec anew)
PRELOAD = ["torch", "torchrec", "torchrec_esd.apps.trainer"]
_CONTEXT = None


def _context():
    """The multiprocessing context of the local worlds: a fork server that has
    imported :data:`PRELOAD` (``ESD_LAUNCH_START=spawn`` for fresh interpreters).
    The fork server starts at the first world and keeps the environment and
    ``sys.path`` of that moment for every later world."""
    global _CONTEXT
    if _CONTEXT is None:
        method = os.environ.get("ESD_LAUNCH_START", "forkserver")
        if method not in ("forkserver", "spawn"):
            raise ValueError(f"ESD_LAUNCH_START must be 'forkserver' or 'spawn', got {method!r}")
        _CONTEXT = mp.get_context(method)
        if method == "forkserver":
            _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def run_local_world(fn: Callable[..., Any], world_size: int, *args, timeout_s: float = 300.0) -> List[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; per-rank results."""
    with tempfile.TemporaryDirectory() as outdir:
        ctx = _context()
        port = free_port()
        procs = [
            ctx.Process(target=_entry, args=(r, world_size, port, outdir, fn, args, timeout_s), daemon=False)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        relay = _Relay(outdir, world_size)
        deadline = time.monotonic() + timeout_s + 60
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            relay()
            time.sleep(0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        relay()
        results, errors = [], {}
        for r in range(world_size):
            path = os.path.join(outdir, f"rank{r}.pt")
            if not os.path.exists(path):
                errors[r] = {"error": f"rank {r} died without a result (exit code {procs[r].exitcode})", "tb": ""}
                results.append(None)
                continue
            rec = torch.load(path, weights_only=False)
            if rec["ok"]:
                results.append(rec["result"])
            else:
                errors[r] = rec
                results.append(None)
        if errors:
            raise RankFailed(errors)
        return results
