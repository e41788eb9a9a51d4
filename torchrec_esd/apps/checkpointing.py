"""Checkpoints of a training job (vanilla TorchRec or ESD), through TorchRec's
``state_dict`` and ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a directory ``<dir>/step_<N>`` holding DCP's files of
``{"model": dmp.state_dict(), "optim": optimizer.state_dict()}`` (the
optimizer: the model's fused optimizer combined with the dense one, keyed as
TorchRec's ``CombinedOptimizer`` keys them) and ``esd_checkpoint.json``: the
step, the tables (name, rows, dim) and the sparse optimizer.  Layouts are
TorchRec's, so a vanilla TorchRec job and an ESD job (any worker and PS
count) load each other's checkpoints.

Writing is atomic: DCP writes into ``step_<N>.tmp``, worker 0 renames it and
then replaces ``<dir>/latest`` (an ``os.replace`` of a one-line file), so a
crash while writing leaves the previous checkpoint the one ``--resume`` loads.
The last :data:`KEEP` checkpoints are kept.

A checkpoint whose tables or sparse optimizer differ from the job's is an
:class:`~torchrec_esd.distributed.checkpoint.EsdCheckpointError` naming the
difference, raised before any state changes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from torchrec_esd.distributed.checkpoint import EsdCheckpointError

META = "esd_checkpoint.json"
LATEST = "latest"
KEEP = 2
FORMAT = 1


def dense_optimizer(dmp, lr: float) -> KeyedOptimizerWrapper:
    """SGD over the model's dense parameters, keyed by parameter name."""
    params = {n: p for n, p in dmp.named_parameters() if "embedding_bag_collection" not in n}
    return KeyedOptimizerWrapper(params, lambda ps: torch.optim.SGD(ps, lr=lr))


def job_meta(tables, optimizer) -> Dict:
    """What a checkpoint must share with the job that loads it."""
    return {
        "format": FORMAT,
        "tables": [{"name": t.name, "rows": int(t.num_embeddings), "dim": int(t.embedding_dim)} for t in tables],
        "sparse_optimizer": {"name": optimizer.name, "lr": optimizer.lr,
                             "eps": optimizer.eps if optimizer.name != "sgd" else None},
    }


def check_meta(saved: Dict, mine: Dict, path: str) -> None:
    """Raise :class:`EsdCheckpointError` naming the first difference."""
    if saved.get("format") != FORMAT:
        raise EsdCheckpointError(f"checkpoint {path}: format {saved.get('format')!r}, this version reads {FORMAT}")
    have = {t["name"]: t for t in saved["tables"]}
    want = {t["name"]: t for t in mine["tables"]}
    if set(have) != set(want):
        raise EsdCheckpointError(
            f"checkpoint {path} has tables {sorted(have)}, this model {sorted(want)} "
            f"(missing {sorted(set(want) - set(have))}, extra {sorted(set(have) - set(want))})"
        )
    for name, t in want.items():
        for field in ("rows", "dim"):
            if have[name][field] != t[field]:
                what = "embedding dim" if field == "dim" else "rows"
                raise EsdCheckpointError(
                    f"checkpoint {path}: table {name!r} has {what} {have[name][field]}, this model {t[field]}"
                )
    if saved["sparse_optimizer"]["name"] != mine["sparse_optimizer"]["name"]:
        raise EsdCheckpointError(
            f"checkpoint {path} was trained with the sparse optimizer {saved['sparse_optimizer']}, "
            f"this job runs {mine['sparse_optimizer']} (its state would not mean the same)"
        )


def latest_checkpoint(directory: str) -> Optional[str]:
    """The path ``<dir>/latest`` names, or ``None`` (no complete checkpoint)."""
    try:
        with open(os.path.join(directory, LATEST)) as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    path = os.path.join(directory, name)
    if not os.path.isfile(os.path.join(path, META)):
        raise EsdCheckpointError(f"{directory}/{LATEST} names {name!r}, which is not a complete checkpoint")
    return path


class Checkpointer:
    """Save and resume one job's ``dmp`` and ``optimizer`` over the worker
    ``group`` (every worker calls every method at the same step; ``fail``
    stops the job's other ranks, e.g. the PS ranks, before raising)."""

    def __init__(self, directory: str, every: int, dmp, optimizer, group, meta: Dict,
                 fail: Optional[Callable[[str], None]] = None) -> None:
        if every < 0:
            raise EsdCheckpointError(f"checkpoint_every must be >= 0, got {every}")
        self.directory, self.every = directory, int(every)
        self.dmp, self.optimizer, self.group, self.meta = dmp, optimizer, group, meta
        self._fail = fail
        self.rank = dist.get_rank(group)
        if self.rank == 0:
            os.makedirs(directory, exist_ok=True)

    def _state(self) -> Dict:
        return {"model": self.dmp.state_dict(), "optim": self.optimizer.state_dict()}

    def due(self, step: int) -> bool:
        """Is a checkpoint due after ``step`` steps were trained?"""
        return self.every > 0 and step > 0 and step % self.every == 0

    def save(self, step: int) -> str:
        final = os.path.join(self.directory, f"step_{step:08d}")
        tmp = final + ".tmp"
        if self.rank == 0 and os.path.exists(tmp):
            shutil.rmtree(tmp)  # a crash's leftovers
        dist.barrier(group=self.group)
        dcp.save(self._state(), checkpoint_id=tmp, process_group=self.group)
        if self.rank == 0:
            with open(os.path.join(tmp, META), "w") as f:
                json.dump(dict(self.meta, step=step), f)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            with open(os.path.join(self.directory, LATEST + ".tmp"), "w") as f:
                f.write(os.path.basename(final) + "\n")
            os.replace(os.path.join(self.directory, LATEST + ".tmp"), os.path.join(self.directory, LATEST))
            self._prune(os.path.basename(final))
        dist.barrier(group=self.group)
        return final

    def _prune(self, keep_last: str) -> None:
        done = sorted(d for d in os.listdir(self.directory) if d.startswith("step_") and not d.endswith(".tmp"))
        for old in done[:-KEEP]:
            if old != keep_last:
                shutil.rmtree(os.path.join(self.directory, old), ignore_errors=True)

    def resume(self) -> int:
        """Load the latest checkpoint; returns its step (0: none yet)."""
        try:
            path = latest_checkpoint(self.directory)
            if path is None:
                return 0
            with open(os.path.join(path, META)) as f:
                saved = json.load(f)
            check_meta(saved, self.meta, path)
        except EsdCheckpointError as e:
            if self._fail is not None:
                self._fail(str(e))
            raise
        state = self._state()
        dcp.load(state, checkpoint_id=path, process_group=self.group)
        self.dmp.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        return int(saved["step"])


def checkpointer(job, dmp, dense: KeyedOptimizerWrapper, group, tables, sparse_optimizer,
                 fail: Optional[Callable[[str], None]] = None) -> Optional[Checkpointer]:
    """The job's :class:`Checkpointer` (``None`` without ``job.checkpoint_dir``):
    the model, its fused embedding optimizer and the dense one, combined as
    TorchRec combines them."""
    if not job.checkpoint_dir:
        if job.resume or job.checkpoint_every:
            raise EsdCheckpointError("resume and checkpoint_every need a checkpoint_dir")
        return None
    optimizer = CombinedOptimizer([dmp.fused_optimizer, ("dense", dense)])
    return Checkpointer(job.checkpoint_dir, job.checkpoint_every, dmp, optimizer, group,
                        job_meta(tables, sparse_optimizer), fail=fail)


class LaggedStepSum:
    """The sum of a step's scalar (the loss) over ``group`` with the
    preemption flag riding along (no extra collective), one step late,
    without a barrier per step.

    A step's all-reduce (its scalar and the flag) starts at the
    step's end and is read at the end of the next one (:meth:`push`) or at
    :meth:`settle`, so a worker goes on with its next step instead of
    waiting there for the slowest worker of this one (the training's own
    exchanges still order the workers; only the bookkeeping stops
    synchronising them).  Every rank reads the same sums at the same step,
    so they still agree on a preemption (one step later)."""

    def __init__(self, preemption: Optional["Preemption"], group) -> None:
        self.preemption, self.group = preemption, group
        self._pending: Optional[Tuple[object, torch.Tensor, object]] = None

    def push(self, value: torch.Tensor, payload=None) -> Optional[Tuple[float, bool, object]]:
        """Start the sum of this step's ``value``; returns the previous
        step's (sum, preempted, its ``payload``), or None at the first."""
        flag = 1.0 if self.preemption is not None and self.preemption.requested else 0.0
        g = torch.stack([value.detach().reshape(()).to(torch.float32), torch.tensor(flag)])
        work = dist.all_reduce(g, group=self.group, async_op=True)
        done = self.settle()
        self._pending = (work, g, payload)
        return done

    def settle(self) -> Optional[Tuple[float, bool, object]]:
        """Wait for the step in flight: (sum, preempted, payload), or None."""
        if self._pending is None:
            return None
        work, g, payload = self._pending
        self._pending = None
        work.wait()  # type: ignore[attr-defined]
        return float(g[0]), float(g[1]) > 0, payload


class Preemption:
    """SIGTERM -> a flag the training loop reads at step boundaries (the loop
    makes every worker agree before acting on it, :class:`LaggedStepSum`)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: List = []

    def install(self) -> "Preemption":
        self._previous.append(signal.signal(signal.SIGTERM, self._on_signal))
        return self

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def uninstall(self) -> None:
        while self._previous:
            signal.signal(signal.SIGTERM, self._previous.pop())


def checkpoint_tensors(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, whole, by flattened key (single process,
    no process group; for inspection and comparisons, not for training)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ckpt.pt")
        dcp_to_torch_save(path, out)
        state = torch.load(out, weights_only=False)
    flat: Dict[str, torch.Tensor] = {}

    def walk(prefix: str, v) -> None:
        if isinstance(v, torch.Tensor):
            flat[prefix] = v
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)

    walk("", state)
    return flat


def max_differences(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Largest absolute difference per kind (``tables``, ``optimizer``,
    ``dense``) between two checkpoints' tensors; their keys must match."""
    if set(a) != set(b):
        raise EsdCheckpointError(f"the checkpoints hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    out = {"tables": 0.0, "optimizer": 0.0, "dense": 0.0}
    for k in a:
        kind = "optimizer" if k.startswith("optim.") else "tables" if "embedding_bags" in k else "dense"
        if a[k].numel():
            out[kind] = max(out[kind], float((a[k].double() - b[k].double()).abs().max()))
    return out
