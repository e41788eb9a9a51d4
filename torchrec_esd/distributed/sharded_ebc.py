"""The ESD-sharded ``EmbeddingBagCollection`` of one worker.

Composed like TorchRec's sharded modules, of three parts:

* a :class:`~torchrec_esd.distributed.row_store.WorkerRowStore`: the rows of
  this worker's cache, on the module's ``device``;
* a lookup backend (:mod:`~torchrec_esd.distributed.lookup`), chosen by the
  plan's ``compute_kernel``, that pools the batch's working set;
* the PS sync (:class:`~torchrec_esd.distributed.ps_sync.PsSync`).

Each batch follows the iteration plan the input dist put in the runtime's plan
channel (:mod:`~torchrec_esd.distributed.plan_channel`):

* ``input_dist`` is local (the samples were already dispatched), so TorchRec's
  train pipelines may run it ahead without touching the PS;
* ``compute`` takes the plan of the next iteration, checks that the batch is
  the one that plan was made for, pushes dirty rows and pulls missing/outdated
  rows (one PS round trip; with ``EsdConfig.prefetch_depth`` the rows
  prefetched while the previous batches computed are not pulled again, and
  the next batches' prefetch is posted right after), then pools from a
  working set of the rows the batch uses;
* the backward hook of the working set applies local updates to cached rows
  and pushes the other rows' gradients to the PS (the fused-optimizer style
  of TorchRec: embeddings are updated during the backward).

Replicated tables (``data_parallel`` in the plan) stay whole on every worker:
their gradients are all-reduced over the workers and every worker applies the
same optimizer step.  Tables of different embedding dims share one working set
``width`` wide (narrower rows zero-padded; see :mod:`~torchrec_esd.layout`).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Type

import torch
import torch.distributed as dist
from torchrec.distributed.comm_ops import get_gradient_division
from torchrec.distributed.embedding_sharding import KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import KJTList
from torchrec.distributed.types import Awaitable, LazyAwaitable, LazyNoWait, NoWait, ShardedModule
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_esd.batch_select import select_kjt_keys
from torchrec_esd.cache import IterationPlan, WorkerPlan
from torchrec_esd.config import EsdConfigError
from torchrec_esd.distributed.checkpoint import EsdCheckpointError, EsdFusedOptimizer, TableCheckpoint
from torchrec_esd.distributed.lookup import ESD_COMPUTE_KERNEL, BatchLayout, lookup_backend
from torchrec_esd.distributed.plan_channel import batch_fingerprint
from torchrec_esd.distributed.ps_sync import PsSync
from torchrec_esd.distributed.row_store import WorkerRowStore
from torchrec_esd.distributed.runtime import initial_weight
from torchrec_esd.ps import DesRequest

_CPU = torch.device("cpu")


class EsdContext:
    """Per-batch context (TorchRec's ShrdCtx)."""

    def __init__(self) -> None:
        self.plan: Optional[IterationPlan] = None

    def record_stream(self, stream) -> None:  # TorchRec pipelines call this
        pass


class ShardedEsdEmbeddingBagCollection(
    ShardedModule[KeyedJaggedTensor, KeyedTensor, KeyedTensor, EsdContext], FusedOptimizerModule
):
    def __init__(self, module: EmbeddingBagCollection, runtime, compute_kernel: str = ESD_COMPUTE_KERNEL,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        if not runtime.is_worker:
            raise EsdConfigError("only worker ranks build the ESD embedding module")
        self._runtime = runtime
        self._device = torch.device(device) if device is not None else _CPU
        self._configs = list(module.embedding_bag_configs())
        keyspace = runtime.keyspace
        names = sorted(t.name for t in self._configs)
        expected = sorted(keyspace.names + [t.name for t in runtime.replicated_tables])
        if names != expected:
            raise EsdConfigError(
                f"the EmbeddingBagCollection's tables {names} do not match the EsdRuntime's "
                f"ESD + replicated tables {expected}"
            )
        self._is_weighted = module.is_weighted()
        self._embedding_names: List[str] = [f for t in self._configs for f in t.feature_names]
        self._feature_set = frozenset(self._embedding_names)
        self._lookup_backend = lookup_backend(compute_kernel, self._configs, self._embedding_names)
        self._wire_dim = keyspace.wire_dim
        self._width = max(t.embedding_dim for t in self._configs)  # working-set columns
        caps = [runtime.config.workers[runtime.worker_index].cache_rows_for(n) for n in keyspace.names]
        self._store = WorkerRowStore(keyspace, caps, self._device)
        self._ps = PsSync(runtime)
        # replicated tables: whole on every worker, data parallel (all-reduced
        # gradients, the same optimizer step everywhere), never through the PS
        self._replicas: Dict[str, torch.Tensor] = {}
        self._replica_state: Dict[str, torch.Tensor] = {}
        self._replica_dim: Dict[str, int] = {}
        for t in runtime.replicated_tables:
            weight = module.embedding_bags[t.name].weight
            w = initial_weight(weight, t).to(torch.float32).clone()
            if weight.is_meta:  # drawn here: the same rows on every worker, as DDP would sync them
                dist.broadcast(w, src=0, group=runtime.worker_group)
            padded = torch.zeros(t.num_embeddings, self._width, device=self._device)
            padded[:, : t.embedding_dim] = w.to(self._device)
            self._replicas[t.name] = padded
            self._replica_state[t.name] = torch.zeros(t.num_embeddings, runtime.optimizer.state_dim,
                                                      device=self._device)
            self._replica_dim[t.name] = t.embedding_dim
        self._replica_of_feature = {f: t.name for t in runtime.replicated_tables for f in t.feature_names}
        self._pending: Optional[Dict] = None
        self._checkpoint = TableCheckpoint(self)
        self._fused_optimizer = EsdFusedOptimizer(self._checkpoint, self._replicas, self._replica_state,
                                                  runtime.optimizer)
        runtime.attach(self)

    # ------------------------------------------------------------ TorchRec API
    def create_context(self) -> EsdContext:
        return EsdContext()

    def input_dist(self, ctx: EsdContext, features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        # The samples were dispatched before the model (EsdInputDist): nothing
        # moves here.  TorchRec's awaitable structure (one local "split") lets
        # the train pipelines run it ahead like any other input dist.
        return KJTListSplitsAwaitable([NoWait(NoWait(features))], ctx)

    def compute(self, ctx: EsdContext, dist_input) -> KeyedTensor:
        kjt = dist_input[0] if isinstance(dist_input, KJTList) else dist_input
        if not all(k in self._feature_set for k in kjt.keys()):
            # features no table reads: TorchRec's EmbeddingBagCollection ignores them
            kjt = select_kjt_keys(kjt, [k for k in kjt.keys() if k in self._feature_set])
        self._finish_pending_backward()
        self._checkpoint.release()
        rt = self._runtime
        plan = rt.next_plan()
        ctx.plan = plan
        problem = rt.loss_scaling.forward(plan.iteration, kjt.stride(), torch.is_grad_enabled())
        if problem is not None:
            rt.fail(problem)
        return self._lookup(plan, kjt)

    def output_dist(self, ctx: EsdContext, output: KeyedTensor) -> LazyAwaitable[KeyedTensor]:
        return LazyNoWait(output)

    def compute_and_output_dist(self, ctx: EsdContext, input) -> LazyAwaitable[KeyedTensor]:
        return self.output_dist(ctx, self.compute(ctx, input))

    def embedding_bag_configs(self):
        return self._configs

    @property
    def unsharded_module_type(self) -> Type[EmbeddingBagCollection]:
        return EmbeddingBagCollection

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        return self._fused_optimizer

    # ------------------------------------------------------------ checkpoints (distributed/checkpoint.py)
    def _save_to_state_dict(self, destination, prefix: str, keep_vars: bool) -> None:
        # collective over the workers: the ESD tables are row-wise ShardedTensors
        for name, st in self._checkpoint.weights().items():
            destination[f"{prefix}embedding_bags.{name}.weight"] = st
        for name, rows in self._replicas.items():
            destination[f"{prefix}embedding_bags.{name}.weight"] = rows[:, : self._replica_dim[name]].clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        keys = {name: f"{prefix}embedding_bags.{name}.weight" for name in self._checkpoint.names}
        rep_keys = {name: f"{prefix}embedding_bags.{name}.weight" for name in self._replicas}
        absent = [k for k in list(keys.values()) + list(rep_keys.values()) if k not in state_dict]
        if absent:
            if strict:
                missing_keys.extend(absent)
            if len(absent) < len(keys) + len(rep_keys):
                # a partial load would leave tables of two checkpoints; all or none
                raise EsdCheckpointError(f"the state dict has some ESD tables but not {absent}")
            return
        for name, key in rep_keys.items():
            v = state_dict[key]
            shape = (self._replicas[name].shape[0], self._replica_dim[name])
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
                raise EsdCheckpointError(f"replicated table {name!r}: the checkpoint has "
                                         f"{tuple(getattr(v, 'shape', ()))}, this model {shape}")
        self._checkpoint.load(weights={name: state_dict[key] for name, key in keys.items()})
        for name, key in rep_keys.items():
            self._replicas[name][:, : self._replica_dim[name]] = state_dict[key].to(self._device)

    def _restart_caches_cold(self) -> None:
        """Empty the cache (this worker's rows and the replicated directory)."""
        rt = self._runtime
        if rt.plans.pending:
            raise EsdCheckpointError(f"{rt.plans.pending} dispatched batch(es) not trained yet")
        rt.directory.reset_caches()
        self._store.clear()

    # ------------------------------------------------------------ forward
    def _lookup(self, plan: IterationPlan, kjt: KeyedJaggedTensor) -> KeyedTensor:
        rt = self._runtime
        wp = plan.workers[rt.worker_index]
        if kjt.stride() != wp.num_samples:
            raise EsdConfigError(
                f"this worker got a batch of {kjt.stride()} samples but EsdInputDist dispatched "
                f"{wp.num_samples} to it for iteration {plan.iteration}; keep batches in the order "
                "they were dispatched"
            )
        layout, gkeys, epos = self._layout(kjt, wp, plan.iteration)
        des = self._des_request(wp, layout, gkeys, epos) if rt.config.des_misses else None
        store = self._store
        push = None if self._ps.posted(plan.iteration) else store.read(wp.push_slots)  # (posted: pushed already)
        got, partial, route = self._ps.push_pull(wp, push, des, plan.iteration)
        if rt.config.prefetch_depth:  # the next batches' safe pulls move while this one computes
            self._ps.prefetch(plan)
        clock = rt.compute_estimates
        if clock is not None and torch.is_grad_enabled():
            clock.start()  # this worker's compute, up to the embedding gradients (compute_estimates)
        got = got.to(self._device)
        slot = wp.used_slot.to(self._device)
        pull_pos = wp.pull_pos.to(self._device)
        dst = slot[pull_pos]
        cached = dst >= 0
        store.write(dst[cached], got[cached])
        self._ps.pre_push(plan, store)  # (EsdConfig.pre_push) the next batch's pushes leave now
        self._ps.post_head(plan)  # (EsdConfig.split_reply) the keys of this backward and of the next push/pull
        # working set: the rows this batch uses, in used_keys order (DES-served rows
        # stay zero: no value points at them, their bags read the partial sums)
        d = self._wire_dim
        working_set = torch.zeros(wp.used_keys.numel(), self._width, device=self._device)
        inc = slot >= 0
        working_set[inc, :d] = store.rows[slot[inc]]
        working_set[pull_pos[~cached], :d] = got[~cached, :d]
        old = self._gradient_rows(wp, working_set, slot, pull_pos, cached, got) if self._ps.sums else None
        n_esd = working_set.shape[0]
        parts = [working_set] + list(self._replicas.values())
        des_base = sum(p.shape[0] for p in parts)
        if partial.shape[0]:  # rows des_base.. : one partial sum per DES bag
            parts.append(torch.nn.functional.pad(partial.to(self._device), (0, self._width - d)))
        if len(parts) > 1:
            working_set = torch.cat(parts)
        layout.des_base = des_base
        training = torch.is_grad_enabled()
        if training:
            working_set.requires_grad_(True)
        pooled = self._lookup_backend(layout, working_set)
        pending = {"plan": wp, "rows": working_set.shape[0], "esd_rows": n_esd, "done": False,
                   "des_base": des_base, "des_route": route, "iteration": plan.iteration, "old": old}
        self._pending = pending
        if training:
            working_set.register_hook(lambda g, p=pending: self._after_backward(p, g))
        else:
            self._finish_pending_backward()
        rt.meter.iterations += 1
        return pooled

    def _gradient_rows(self, wp: WorkerPlan, working_set: torch.Tensor, slot: torch.Tensor, pull_pos: torch.Tensor,
                       cached: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
        """The rows (value + optimizer state) this batch's gradient pushes are
        computed on, in ``wp.grad_pos`` order: what ``EsdConfig.split_sums``
        turns the others' gradient sums into new rows with.  At staleness 0
        they are the PS's: a used row is read fresh (cached or pulled), and
        no local update touches a row whose gradient is pushed."""
        d = self._wire_dim
        S = self._store.state.shape[1]
        state = torch.empty(working_set.shape[0], S, device=self._device)
        inc = slot >= 0
        state[inc] = self._store.state[slot[inc]]
        state[pull_pos[~cached]] = got[~cached, d:]
        gp = wp.grad_pos.to(self._device)
        return torch.cat([working_set[gp, :d], state[gp]], dim=1)

    def _layout(self, kjt: KeyedJaggedTensor, wp: WorkerPlan, iteration: int):
        """Where every KJT value reads its row: ``pos`` (all values) indexes the
        working set ``[ESD rows (used_keys order) | replicated tables]``; also
        the ESD values' global keys and their positions in ``wp.used_keys`` (CPU)."""
        keys = kjt.keys()
        b = kjt.stride()
        missing = [f for f in self._embedding_names if f not in keys]
        if missing:
            raise EsdConfigError(f"batch has no feature(s) {missing} of the EmbeddingBagCollection")
        rt = self._runtime
        ekjt = rt.esd_view(kjt if kjt.values().device == _CPU else kjt.to(_CPU))
        gkeys = rt.keyspace.decode(ekjt).keys
        if wp.fingerprint is not None and batch_fingerprint(gkeys) != wp.fingerprint:
            raise EsdConfigError(
                f"this batch is not the one EsdInputDist dispatched to this worker for iteration "
                f"{iteration} (its ids differ from the plan's); train every dispatched batch once, "
                "in the order it was dispatched"
            )
        used = wp.used_keys
        epos = torch.searchsorted(used, gkeys).clamp_(max=max(used.numel() - 1, 0))
        if gkeys.numel() and (used.numel() == 0 or not bool(torch.equal(used[epos], gkeys))):
            raise EsdConfigError(
                "this batch is not the one EsdInputDist dispatched to this worker (ids missing "
                "from the dispatch plan); keep batches in the order they were dispatched"
            )
        lengths = kjt.lengths().view(len(keys), b).to(torch.int64).cpu()
        esd_val = None  # ESD values among all values (None: all of them)
        if self._replicas:
            # positions of every value (KJT order) in [ESD working set | replicas]
            per_key = lengths.sum(1)
            is_rep = torch.tensor([k in self._replica_of_feature for k in keys])
            seg = torch.repeat_interleave(torch.arange(len(keys)), per_key)
            rep_val = is_rep[seg]
            base, bases = used.numel(), {}
            for name, rows in self._replicas.items():
                bases[name] = base
                base += rows.shape[0]
            feat_base = torch.tensor([bases.get(self._replica_of_feature.get(k, ""), 0) for k in keys])
            values = kjt.values().cpu().to(torch.int64)
            pos = torch.empty(values.numel(), dtype=torch.int64)
            pos[~rep_val] = epos
            pos[rep_val] = feat_base[seg[rep_val]] + values[rep_val]
            esd_val = ~rep_val
        else:
            pos = epos
        psw = kjt.weights_or_none() if self._is_weighted else None
        layout = BatchLayout(list(keys), lengths.to(self._device), pos.to(self._device),
                             psw.to(self._device) if psw is not None else None, esd_val=esd_val)
        return layout, gkeys, epos

    def _des_request(self, wp: WorkerPlan, layout: BatchLayout, gkeys: torch.Tensor,
                     epos: torch.Tensor) -> DesRequest:
        """The DES-served rows of this batch as distinct (row, bag) pairs with
        their pooling weights; marks their values in ``layout``."""
        if wp.des_pos.numel() == 0:
            return DesRequest.empty()
        mark = torch.zeros(wp.used_keys.numel(), dtype=torch.bool)
        mark[wp.des_pos] = True
        occ = mark[epos]  # over ESD values
        lengths = layout.lengths.cpu()
        nbags = lengths.numel()
        value_bag = torch.repeat_interleave(torch.arange(nbags), lengths.reshape(-1))  # bag of every value
        psw = layout.weights.cpu() if layout.weights is not None else None
        w = psw.to(torch.float32) if psw is not None else torch.ones(value_bag.numel())
        esd_val = layout.esd_val
        all_bags = value_bag
        if esd_val is not None:
            value_bag, w = value_bag[esd_val], w[esd_val]
            des_val = torch.zeros(esd_val.numel(), dtype=torch.bool)
            des_val[esd_val.nonzero().view(-1)[occ]] = True
        else:
            des_val = occ
        pair, inv = torch.unique(gkeys[occ] * nbags + value_bag[occ], return_inverse=True)
        weights = torch.zeros(pair.numel()).index_add_(0, inv, w[occ])
        bags, bag_idx = torch.unique(pair % nbags, return_inverse=True)
        layout.value_bag = all_bags.to(self._device)
        layout.des_val = des_val.to(self._device)
        layout.des_bags = bags.to(self._device)
        return DesRequest(pair // nbags, bag_idx.view(-1), weights, bags.numel())

    # ------------------------------------------------------------ backward
    def _after_backward(self, pending: Dict, grad: Optional[torch.Tensor]) -> None:
        """Phase 2: local updates of sole-user cached rows, gradient push of the
        rest (and of the DES bags' partial sums)."""
        if pending["done"]:
            return
        pending["done"] = True
        wp: WorkerPlan = pending["plan"]
        rt = self._runtime
        if grad is not None and rt.compute_estimates is not None:
            rt.compute_estimates.stop(wp.num_samples)
        if grad is None:
            grad = torch.zeros(pending["rows"], self._width, device=self._device)
        elif get_gradient_division():
            # TorchRec divides pooled-embedding gradients by the world size (to
            # match DDP's averaging of dense gradients); so does ESD, over workers
            grad = grad / rt.config.num_workers
        if rt.config.check_finite and not bool(torch.isfinite(grad).all()):
            raise EsdConfigError(
                f"check_finite: a non-finite embedding gradient at iteration {pending['iteration']} on worker "
                f"{rt.worker_index}; the job stops before it reaches the parameter servers (the only copy "
                "of the tables)"
            )
        d = self._wire_dim
        des_grad = grad[pending["des_base"] :, :d].detach()
        grad = grad[: pending["des_base"]]
        if self._replicas:
            self._update_replicas(grad[pending["esd_rows"] :])
            grad = grad[: pending["esd_rows"]]
        grad = grad[:, :d]
        if wp.local_pos.numel():
            local_pos = wp.local_pos.to(self._device, torch.int64)
            slots = wp.used_slot[wp.local_pos].to(self._device, torch.int64)
            # index_select / index_copy_ (slots are distinct): the same rows as
            # advanced indexing, less CPU per step
            rows, state = self._store.rows.index_select(0, slots), self._store.state.index_select(0, slots)
            dims = rt.keyspace.row_dims(wp.used_keys[wp.local_pos])
            rt.optimizer.apply_(rows, state, grad.index_select(0, local_pos), None if dims is None else dims.to(self._device))
            self._store.rows.index_copy_(0, slots, rows)
            self._store.state.index_copy_(0, slots, state)
        keys = wp.used_keys[wp.grad_pos]
        self._pending = None
        # the next batch's push/pull goes now (EsdConfig.early_pull): its reply comes down while this
        # backward, the dense all-reduce and the optimizer step run (EsdConfig.split_reply: the rows
        # this worker sent no gradient for even while its gradient values still go up)
        self._ps.push_grads_and_next(keys, grad[wp.grad_pos.to(self._device)], pending["des_route"], des_grad,
                                     pending["iteration"], self._store, pending["old"])

    def _update_replicas(self, grad: torch.Tensor) -> None:
        """Data-parallel step of the replicated tables: sum the workers' gradients
        (the same division as ESD rows is already applied), same update everywhere."""
        rt = self._runtime
        g = grad.detach().contiguous()
        dist.all_reduce(g, group=rt.worker_group)
        W = rt.config.num_workers
        # ring all-reduce over the workers' group (not the PS transport): its bytes by formula
        rt.meter.add_message(rt.link, int(2 * (W - 1) / W * g.numel() * g.element_size()))
        off = 0
        for name, rows in self._replicas.items():
            n = rows.shape[0]
            gt = g[off : off + n]
            off += n
            touched = (gt != 0).any(dim=1).nonzero().view(-1)
            if touched.numel():
                r, st = rows[touched], self._replica_state[name][touched]
                dims = None
                if self._replica_dim[name] != self._width:
                    dims = torch.full((touched.numel(),), self._replica_dim[name], device=self._device)
                rt.optimizer.apply_(r, st, gt[touched], dims)
                rows[touched], self._replica_state[name][touched] = r, st

    def replica_tables(self) -> Dict[str, torch.Tensor]:
        return {k: v[:, : self._replica_dim[k]].cpu().clone() for k, v in self._replicas.items()}

    def _finish_pending_backward(self) -> None:
        """A forward whose backward never ran (eval, skipped step) still owes
        the PS its gradient phase: a zero gradient changes no row."""
        if self._pending is not None and not self._pending["done"]:
            self._after_backward(self._pending, None)

    def flush(self) -> None:
        """Push every dirty cached row to the PS (no DES request: pushes only)."""
        self._finish_pending_backward()
        rt = self._runtime
        wp = rt.directory.flush_plan()[rt.worker_index]
        self._ps.push_pull(wp, self._store.read(wp.push_slots))
