"""ESD sharding of ``EmbeddingBagCollection``: worker cache + parameter servers.

:class:`EsdEmbeddingBagCollectionSharder` plugs into TorchRec's sharder API, so
``DistributedModelParallel`` (on the workers' process group) replaces every
``EmbeddingBagCollection`` it is given a plan for with a
:class:`ShardedEsdEmbeddingBagCollection`.  That module's lookups go cache ->
PS following the iteration plan queued by :class:`~torchrec_esd.input_dist.EsdInputDist`:

* ``input_dist`` is local (the samples were already dispatched), so TorchRec's
  train pipelines may run it ahead without touching the PS;
* ``compute`` pushes dirty rows and pulls missing/outdated rows (one
  PS round trip), then pools from a working set of the rows the batch uses;
* the backward hook of the working set applies local updates to cached rows
  and pushes the other rows' gradients to the PS (the fused-optimizer style
  of TorchRec: embeddings are updated during the backward).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Type

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.distributed.comm_ops import get_gradient_division
from torchrec.distributed.embedding_sharding import KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import KJTList
from torchrec.distributed.types import (
    Awaitable,
    EmbeddingModuleShardingPlan,
    LazyAwaitable,
    LazyNoWait,
    ModuleSharder,
    NoWait,
    ParameterSharding,
    ShardedModule,
    ShardingEnv,
)
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_esd.cache import IterationPlan, WorkerPlan
from torchrec_esd.config import EsdConfigError
from torchrec_esd.fused_config import check_fused_optimizer
from torchrec_esd.ps import DesRequest
from torchrec_esd.runtime import EsdRuntime, initial_weight, select_kjt_keys

ESD_SHARDING_TYPE = "esd_ps_cache"
ESD_COMPUTE_KERNEL = "esd_cache"
REPLICATED_SHARDING_TYPE = "data_parallel"  # whole table on every worker, all-reduced gradients


class EsdContext:
    """Per-batch context (TorchRec's ShrdCtx)."""

    def __init__(self) -> None:
        self.plan: Optional[IterationPlan] = None

    def record_stream(self, stream) -> None:  # TorchRec pipelines call this
        pass


class _WorkerRowStore:
    """Row storage of one worker's cache: ``[C, D]`` rows plus optimizer state,
    slot numbers are the cache directory's (table-major blocks)."""

    def __init__(self, runtime: EsdRuntime) -> None:
        d, s = runtime.routing.dim, runtime.optimizer.state_dim
        w = runtime.worker_index
        cap = sum(runtime.config.workers[w].cache_rows_for(t.name) for t in runtime.tables)
        self.rows = torch.zeros(cap, d)
        self.state = torch.zeros(cap, s)


class ShardedEsdEmbeddingBagCollection(
    ShardedModule[KeyedJaggedTensor, KeyedTensor, KeyedTensor, EsdContext]
):
    def __init__(self, module: EmbeddingBagCollection, runtime: EsdRuntime) -> None:
        super().__init__()
        if not runtime.is_worker:
            raise EsdConfigError("only worker ranks build the ESD embedding module")
        self._runtime = runtime
        self._configs = list(module.embedding_bag_configs())
        names = sorted(t.name for t in self._configs)
        expected = sorted(runtime.routing.names + [t.name for t in runtime.replicated_tables])
        if names != expected:
            raise EsdConfigError(
                f"the EmbeddingBagCollection's tables {names} do not match the EsdRuntime's "
                f"ESD + replicated tables {expected}"
            )
        for t in self._configs:
            if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
                raise EsdConfigError(
                    f"table {t.name!r} (features {t.feature_names}): ESD supports SUM and "
                    f"MEAN pooling, got {t.pooling}"
                )
        self._is_weighted = module.is_weighted()
        self._dim = runtime.routing.dim
        self._embedding_names: List[str] = [f for t in self._configs for f in t.feature_names]
        self._feature_set = frozenset(self._embedding_names)
        self._feature_mode = {
            f: ("sum" if t.pooling == PoolingType.SUM else "mean") for t in self._configs for f in t.feature_names
        }
        self._modes = sorted(set(self._feature_mode.values()))
        self._store = _WorkerRowStore(runtime)
        # replicated tables: whole on every worker, data parallel (all-reduced
        # gradients, the same optimizer step everywhere), never through the PS
        self._replicas: Dict[str, torch.Tensor] = {}
        self._replica_state: Dict[str, torch.Tensor] = {}
        for t in runtime.replicated_tables:
            weight = module.embedding_bags[t.name].weight
            w = initial_weight(weight, t).to(torch.float32).clone()
            if weight.is_meta:  # drawn here: the same rows on every worker, as DDP would sync them
                dist.broadcast(w, src=0, group=runtime.worker_group)
            self._replicas[t.name] = w
            self._replica_state[t.name] = torch.zeros(t.num_embeddings, runtime.optimizer.state_dim)
        self._replica_of_feature = {f: t.name for t in runtime.replicated_tables for f in t.feature_names}
        self._pending: Optional[Dict] = None
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
        plan = self._runtime.next_plan()
        ctx.plan = plan
        problem = self._runtime.loss_scaling.forward(plan.iteration, kjt.stride(), torch.is_grad_enabled())
        if problem is not None:
            self._runtime.fail(problem)
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

    # ------------------------------------------------------------ phases
    def _push_pull(self, wp: WorkerPlan, des: Optional[DesRequest] = None):
        """Phase 1: push dirty values, pull missing/outdated rows (value + state)
        and, with DES-served misses, get the bags' pooled partial sums."""
        rt, store = self._runtime, self._store
        values = torch.cat([store.rows[wp.push_slots], store.state[wp.push_slots]], 1)
        pull_keys = wp.pull_keys
        got, partial, route = rt.client.push_pull(wp.push_keys, values, pull_keys, des)  # type: ignore[union-attr]
        # metering: rows per kind from the plan, bytes / messages as the transport moved them
        rt.meter.record_push_pull(wp.rows, rt.client.last_traffic, rt.link)  # type: ignore[union-attr]
        return got, partial, route

    def _lookup(self, plan: IterationPlan, kjt: KeyedJaggedTensor) -> KeyedTensor:
        wp = plan.workers[self._runtime.worker_index]
        if kjt.stride() != wp.num_samples:
            raise EsdConfigError(
                f"this worker got a batch of {kjt.stride()} samples but EsdInputDist dispatched "
                f"{wp.num_samples} to it; keep batches in the order they were dispatched"
            )
        layout = self._layout(kjt, wp)
        des = self._des_request(kjt, wp, layout) if self._runtime.config.des_misses else None
        got, partial, route = self._push_pull(wp, des)
        store, slot = self._store, wp.used_slot
        dst = slot[wp.pull_pos]
        cached = dst >= 0
        store.rows[dst[cached]] = got[cached, : self._dim]
        store.state[dst[cached]] = got[cached, self._dim :]
        # working set: the rows this batch uses, in used_keys order (DES-served rows
        # stay zero: no value points at them, their bags read the partial sums)
        working_set = torch.zeros(wp.used_keys.numel(), self._dim)
        inc = slot >= 0
        working_set[inc] = store.rows[slot[inc]]
        working_set[wp.pull_pos[~cached]] = got[~cached, : self._dim]
        n_esd = working_set.shape[0]
        parts = [working_set] + list(self._replicas.values())
        des_base = sum(p.shape[0] for p in parts)
        if partial.shape[0]:
            parts.append(partial)  # rows des_base.. : one partial sum per DES bag
        if len(parts) > 1:
            working_set = torch.cat(parts)
        training = torch.is_grad_enabled()
        if training:
            working_set.requires_grad_(True)
        pooled = self._pool(kjt, layout, working_set, des_base)
        pending = {"plan": wp, "rows": working_set.shape[0], "esd_rows": n_esd, "done": False,
                   "des_base": des_base, "des_route": route}
        self._pending = pending
        if training:
            working_set.register_hook(lambda g, p=pending: self._after_backward(p, g))
        else:
            self._finish_pending_backward()
        self._runtime.meter.iterations += 1
        return pooled

    def _layout(self, kjt: KeyedJaggedTensor, wp: WorkerPlan) -> Dict:
        """Where every KJT value reads its row: ``pos`` (all values) indexes the
        working set ``[ESD rows (used_keys order) | replicated tables]``."""
        keys = kjt.keys()
        b = kjt.stride()
        missing = [f for f in self._embedding_names if f not in keys]
        if missing:
            raise EsdConfigError(f"batch has no feature(s) {missing} of the EmbeddingBagCollection")
        rt = self._runtime
        directory = rt.directory
        gkeys, _ = directory.batch_keys(rt.esd_view(kjt))  # type: ignore[union-attr]
        used = wp.used_keys
        epos = torch.searchsorted(used, gkeys).clamp_(max=max(used.numel() - 1, 0))
        if gkeys.numel() and (used.numel() == 0 or not bool(torch.equal(used[epos], gkeys))):
            raise EsdConfigError(
                "this batch is not the one EsdInputDist dispatched to this worker (ids missing "
                "from the dispatch plan); keep batches in the order they were dispatched"
            )
        lengths = kjt.lengths().view(len(keys), b).to(torch.int64)
        esd_val = None  # ESD values among all values (None: all of them)
        if self._replicas:
            # positions of every value (KJT order) in [ESD working set | replicas]
            per_key = lengths.sum(1)
            is_rep = torch.tensor([k in self._replica_of_feature for k in keys])
            seg = torch.repeat_interleave(torch.arange(len(keys)), per_key)
            rep_val = is_rep[seg]
            base, bases = wp.used_keys.numel(), {}
            for name, rows in self._replicas.items():
                bases[name] = base
                base += rows.shape[0]
            feat_base = torch.tensor([bases.get(self._replica_of_feature.get(k, ""), 0) for k in keys])
            pos = torch.empty(kjt.values().numel(), dtype=torch.int64)
            pos[~rep_val] = epos
            pos[rep_val] = feat_base[seg[rep_val]] + kjt.values()[rep_val].to(torch.int64)
            esd_val = ~rep_val
        else:
            pos = epos
        return {"lengths": lengths, "pos": pos, "epos": epos, "gkeys": gkeys, "esd_val": esd_val,
                "value_bag": None, "des_val": None, "des_bags": None}

    def _des_request(self, kjt: KeyedJaggedTensor, wp: WorkerPlan, layout: Dict) -> DesRequest:
        """The DES-served rows of this batch as distinct (row, bag) pairs with
        their pooling weights; marks their values in ``layout``."""
        if wp.des_pos.numel() == 0:
            return DesRequest.empty()
        mark = torch.zeros(wp.used_keys.numel(), dtype=torch.bool)
        mark[wp.des_pos] = True
        occ = mark[layout["epos"]]  # over ESD values
        lengths = layout["lengths"]
        nbags = lengths.numel()
        value_bag = torch.repeat_interleave(torch.arange(nbags), lengths.reshape(-1))  # bag of every value
        layout["value_bag"] = value_bag
        psw = kjt.weights_or_none() if self._is_weighted else None
        w = psw.to(torch.float32) if psw is not None else torch.ones(value_bag.numel())
        esd_val = layout["esd_val"]
        if esd_val is not None:
            value_bag, w = value_bag[esd_val], w[esd_val]
            des_val = torch.zeros(esd_val.numel(), dtype=torch.bool)
            des_val[esd_val.nonzero().view(-1)[occ]] = True
        else:
            des_val = occ
        pair, inv = torch.unique(layout["gkeys"][occ] * nbags + value_bag[occ], return_inverse=True)
        weights = torch.zeros(pair.numel()).index_add_(0, inv, w[occ])
        bags, bag_idx = torch.unique(pair % nbags, return_inverse=True)
        layout["des_val"], layout["des_bags"] = des_val, bags
        return DesRequest(pair // nbags, bag_idx.view(-1), weights, bags.numel())

    def _pool(self, kjt: KeyedJaggedTensor, layout: Dict, working_set: torch.Tensor, des_base: int) -> KeyedTensor:
        keys = kjt.keys()
        b = kjt.stride()
        lengths, pos = layout["lengths"], layout["pos"]
        offs = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
        offs[1:] = torch.cumsum(lengths.reshape(-1), 0)
        psw = kjt.weights_or_none() if self._is_weighted else None
        if psw is not None:
            psw = psw.to(working_set.dtype)
        des_bags = layout["des_bags"]
        if des_bags is not None and des_bags.numel():
            per_key = self._pool_with_partials(keys, b, layout, working_set, des_base, psw)
        elif len(self._modes) == 1:
            mode = self._modes[0]
            out = F.embedding_bag(pos, working_set, offs, mode=mode, per_sample_weights=psw, include_last_offset=True)
            per_key = out.view(len(keys), b, self._dim)
        else:  # tables with different poolings: pool feature by feature
            per = []
            for i, k in enumerate(keys):
                mode = self._feature_mode.get(k, "sum")
                lo, hi = int(offs[i * b]), int(offs[(i + 1) * b])
                per.append(
                    F.embedding_bag(pos[lo:hi], working_set, offs[i * b : (i + 1) * b + 1] - lo, mode=mode,
                                    per_sample_weights=None if psw is None else psw[lo:hi], include_last_offset=True)
                )
            per_key = torch.stack(per)
        index = {k: i for i, k in enumerate(keys)}
        order = [index[f] for f in self._embedding_names]
        pooled = per_key[order].permute(1, 0, 2).reshape(b, len(order) * self._dim)
        return KeyedTensor(
            keys=list(self._embedding_names),
            length_per_key=[self._dim] * len(self._embedding_names),
            values=pooled,
        )

    def _pool_with_partials(self, keys, b: int, layout: Dict, working_set: torch.Tensor, des_base: int, psw):
        """Pooling when some rows are DES-served: each bag sums its other rows
        (weighted) plus its partial sum from the PS; MEAN divides by the bag's length."""
        lengths, pos, des_val, des_bags = layout["lengths"], layout["pos"], layout["des_val"], layout["des_bags"]
        nbags, value_bag = lengths.numel(), layout["value_bag"]
        keep = ~des_val
        w = psw if psw is not None else torch.ones(pos.numel(), dtype=working_set.dtype)
        nb = des_bags.numel()
        bag2 = torch.cat([value_bag[keep], des_bags])
        pos2 = torch.cat([pos[keep], des_base + torch.arange(nb)])
        w2 = torch.cat([w[keep], torch.ones(nb, dtype=working_set.dtype)])
        order = torch.argsort(bag2, stable=True)
        offs2 = torch.zeros(nbags + 1, dtype=torch.int64)
        offs2[1:] = torch.cumsum(torch.bincount(bag2, minlength=nbags), 0)
        out = F.embedding_bag(pos2[order], working_set, offs2, mode="sum", per_sample_weights=w2[order],
                              include_last_offset=True)
        mean_key = torch.tensor([self._feature_mode.get(k, "sum") == "mean" for k in keys])
        if bool(mean_key.any()):
            is_mean = mean_key.repeat_interleave(b)
            denom = torch.where(is_mean, lengths.reshape(-1).clamp(min=1), torch.ones_like(lengths.reshape(-1)))
            out = out / denom.to(out.dtype).view(-1, 1)
        return out.view(len(keys), b, self._dim)

    def _after_backward(self, pending: Dict, grad: Optional[torch.Tensor]) -> None:
        """Phase 2: local updates of sole-user cached rows, gradient push of the
        rest (and of the DES bags' partial sums)."""
        if pending["done"]:
            return
        pending["done"] = True
        wp: WorkerPlan = pending["plan"]
        rt = self._runtime
        if grad is None:
            grad = torch.zeros(pending["rows"], self._dim)
        elif get_gradient_division():
            # TorchRec divides pooled-embedding gradients by the world size (to
            # match DDP's averaging of dense gradients); so does ESD, over workers
            grad = grad / rt.config.num_workers
        des_grad = grad[pending["des_base"] :].detach()
        grad = grad[: pending["des_base"]]
        if self._replicas:
            self._update_replicas(grad[pending["esd_rows"] :])
            grad = grad[: pending["esd_rows"]]
        if wp.local_pos.numel():
            slots = wp.used_slot[wp.local_pos]
            rows, state = self._store.rows[slots], self._store.state[slots]
            rt.optimizer.apply_(rows, state, grad[wp.local_pos])
            self._store.rows[slots], self._store.state[slots] = rows, state
        keys = wp.used_keys[wp.grad_pos]
        route = pending["des_route"]
        rt.client.push_grads(keys, grad[wp.grad_pos].detach(), route, des_grad)  # type: ignore[union-attr]
        rt.meter.record_grads(rt.client.last_traffic, rt.link)  # type: ignore[union-attr]
        self._pending = None

    def _update_replicas(self, grad: torch.Tensor) -> None:
        """Data-parallel step of the replicated tables: sum the workers' gradients
        (the same division as ESD rows is already applied), same update everywhere."""
        rt = self._runtime
        g = grad.detach().contiguous()
        dist.all_reduce(g, group=rt.worker_group)
        W = rt.config.num_workers
        rt.meter.add_message(rt.link, int(2 * (W - 1) / W * g.numel() * 4))
        off = 0
        for name, rows in self._replicas.items():
            n = rows.shape[0]
            gt = g[off : off + n]
            off += n
            touched = (gt != 0).any(dim=1).nonzero().view(-1)
            if touched.numel():
                r, st = rows[touched], self._replica_state[name][touched]
                rt.optimizer.apply_(r, st, gt[touched])
                rows[touched], self._replica_state[name][touched] = r, st

    def replica_tables(self) -> Dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._replicas.items()}

    def _finish_pending_backward(self) -> None:
        """A forward whose backward never ran (eval, skipped step) still owes
        the PS its gradient phase: a zero gradient changes no row."""
        if self._pending is not None and not self._pending["done"]:
            self._after_backward(self._pending, None)

    def flush(self) -> None:
        self._finish_pending_backward()
        rt = self._runtime
        assert rt.directory is not None
        self._push_pull(rt.directory.flush_plan()[rt.worker_index])  # no DES request: pushes only


class EsdEmbeddingBagCollectionSharder(ModuleSharder[EmbeddingBagCollection]):
    """Shards ``EmbeddingBagCollection`` s onto worker caches + parameter servers.

    ``fused_params`` is TorchRec's fused embedding-optimizer config (as for
    TorchRec's sharders), like ``apply_optimizer_in_backward`` on the tables: it
    must mean the EsdRuntime's optimizer, which the parameter servers apply
    (:mod:`torchrec_esd.fused_config`); anything else fails every rank.
    """

    def __init__(self, runtime: EsdRuntime, fused_params: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        self._runtime = runtime
        self._fused_params = dict(fused_params) if fused_params is not None else None

    @property
    def fused_params(self) -> Optional[Dict[str, Any]]:
        return self._fused_params

    @property
    def module_type(self) -> Type[EmbeddingBagCollection]:
        return EmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return [ESD_SHARDING_TYPE, REPLICATED_SHARDING_TYPE]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return [ESD_COMPUTE_KERNEL]

    def shard(
        self,
        module: EmbeddingBagCollection,
        params: EmbeddingModuleShardingPlan,
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedEsdEmbeddingBagCollection:
        rt = self._runtime
        problem = self._env_problem(env) or check_fused_optimizer(module, self._fused_params, rt.optimizer)
        if problem is not None:  # every worker builds the model alike: all of them fail here
            rt.fail(problem)
        replicated = {t.name for t in rt.replicated_tables}
        for name, ps in params.items():
            want = REPLICATED_SHARDING_TYPE if name in replicated else ESD_SHARDING_TYPE
            if ps.sharding_type != want:
                rt.fail(
                    f"table {name!r}: the plan says {ps.sharding_type!r} but the EsdRuntime treats it as "
                    f"{want!r} (build the runtime and the plan from the same EsdPlan / esd_module_plan)"
                )
        return ShardedEsdEmbeddingBagCollection(module, rt)

    def _env_problem(self, env: ShardingEnv) -> Optional[str]:
        """The model of an ESD job runs on the workers only: DMP's env must be
        the workers' (``runtime.sharding_env()``); with the default (the whole
        world) DMP's collectives would wait for the parameter servers forever."""
        rt = self._runtime
        W = rt.config.num_workers
        pg = env.process_group
        if env.world_size == W and env.rank == rt.worker_index and pg is not None and dist.get_world_size(pg) == W:
            return None
        return (
            f"DistributedModelParallel got a ShardingEnv of {env.world_size} ranks (rank {env.rank}), but "
            f"the model of an ESD job runs on its {W} workers only, not on the parameter servers: pass "
            "env=runtime.sharding_env() to DistributedModelParallel (without it DMP uses the whole "
            "world, and its collectives would wait for the parameter servers forever)"
        )


def esd_module_plan(module: EmbeddingBagCollection, runtime: EsdRuntime) -> EmbeddingModuleShardingPlan:
    """The per-module plan that puts every table of ``module`` on ESD."""
    ranks = list(range(runtime.config.num_workers))
    replicated = {t.name for t in runtime.replicated_tables}
    return EmbeddingModuleShardingPlan(
        {
            t.name: ParameterSharding(
                sharding_type=REPLICATED_SHARDING_TYPE if t.name in replicated else ESD_SHARDING_TYPE,
                compute_kernel=ESD_COMPUTE_KERNEL,
                ranks=ranks,
            )
            for t in module.embedding_bag_configs()
        }
    )


