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

from typing import Dict, List, Optional, Type

import torch
import torch.nn.functional as F
from torch import nn
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

from torchrec_esd.cache import IterationPlan, TablePlan
from torchrec_esd.config import EsdConfigError
from torchrec_esd.runtime import EsdRuntime

ESD_SHARDING_TYPE = "esd_ps_cache"
ESD_COMPUTE_KERNEL = "esd_cache"


class EsdContext:
    """Per-batch context (TorchRec's ShrdCtx)."""

    def __init__(self) -> None:
        self.plan: Optional[IterationPlan] = None

    def record_stream(self, stream) -> None:  # TorchRec pipelines call this
        pass


class _WorkerRowStore:
    """Row storage of one worker's cache: one ``[C_t, D]`` block per table plus
    optimizer state; slot numbers are the cache directory's."""

    def __init__(self, runtime: EsdRuntime) -> None:
        d, s = runtime.routing.dim, runtime.optimizer.state_dim
        w = runtime.worker_index
        self.rows: Dict[str, torch.Tensor] = {}
        self.state: Dict[str, torch.Tensor] = {}
        for t in runtime.tables:
            cap = runtime.config.workers[w].cache_rows_for(t.name)
            self.rows[t.name] = torch.zeros(cap, d)
            self.state[t.name] = torch.zeros(cap, s)


class ShardedEsdEmbeddingBagCollection(
    ShardedModule[KeyedJaggedTensor, KeyedTensor, KeyedTensor, EsdContext]
):
    def __init__(self, module: EmbeddingBagCollection, runtime: EsdRuntime) -> None:
        super().__init__()
        if not runtime.is_worker:
            raise EsdConfigError("only worker ranks build the ESD embedding module")
        self._runtime = runtime
        self._configs = list(module.embedding_bag_configs())
        names = [t.name for t in self._configs]
        if names != runtime.routing.names:
            raise EsdConfigError(
                f"the EmbeddingBagCollection's tables {names} do not match the EsdRuntime's "
                f"tables {runtime.routing.names}"
            )
        for t in self._configs:
            if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
                raise EsdConfigError(
                    f"table {t.name!r} (features {t.feature_names}): ESD supports SUM and "
                    f"MEAN pooling, got {t.pooling}"
                )
        self._is_weighted = module.is_weighted()
        self._dim = runtime.routing.dim
        self._feature_table: Dict[str, int] = {}
        self._embedding_names: List[str] = []
        for ti, t in enumerate(self._configs):
            for f in t.feature_names:
                self._feature_table[f] = ti
                self._embedding_names.append(f)
        self._store = _WorkerRowStore(runtime)
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
        self._finish_pending_backward()
        plan = self._runtime.next_plan()
        ctx.plan = plan
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
    def _tplans(self, plan: IterationPlan) -> List[TablePlan]:
        mine = plan.tables[self._runtime.worker_index]
        return [mine[t.name] for t in self._configs]

    def _push_pull(self, tplans: List[TablePlan]) -> List[torch.Tensor]:
        rt, r = self._runtime, self._runtime.routing
        push_keys, push_vals, pull_keys = [], [], []
        for ti, (t, tp) in enumerate(zip(self._configs, tplans)):
            push_keys.append(r.keys(ti, tp.push_ids))
            push_vals.append(
                torch.cat([self._store.rows[t.name][tp.push_slots], self._store.state[t.name][tp.push_slots]], 1)
            )
            pull_keys.append(r.keys(ti, tp.pull_ids))
        pk, pv, qk = torch.cat(push_keys), torch.cat(push_vals), torch.cat(pull_keys)
        got = rt.client.push_pull(pk, pv, qk)  # type: ignore[union-attr]
        self._account_phase1(tplans, pk.numel(), qk.numel())
        return list(torch.split(got, [tp.pull_pos.numel() for tp in tplans]))

    def _account_phase1(self, tplans: List[TablePlan], n_push: int, n_pull: int) -> None:
        m, link = self._runtime.meter, self._runtime.link
        row = (self._dim + self._runtime.optimizer.state_dim) * 4
        for tp in tplans:
            m.add("miss_pull", tp.rows["miss_pull"], tp.rows["miss_pull"] * row)
            m.add("update_pull", tp.rows["update_pull"], tp.rows["update_pull"] * row)
            m.add("miss_push", tp.rows["miss_push"], tp.rows["miss_push"] * row)
            value_pushes = tp.push_ids.numel() - tp.rows["miss_push"]
            m.add("update_push", value_pushes, value_pushes * row)
        m.add_message(link, n_push * (row + 8))
        m.add_message(link, n_pull * 8)
        m.add_message(link, n_pull * row)

    def _lookup(self, plan: IterationPlan, kjt: KeyedJaggedTensor) -> KeyedTensor:
        tplans = self._tplans(plan)
        pulled = self._push_pull(tplans)
        # working set: the rows this batch uses, table after table
        parts, bases, base = [], [], 0
        for t, tp, got in zip(self._configs, tplans, pulled):
            store = self._store
            slot = tp.used_slot
            dst = slot[tp.pull_pos]
            cached = dst >= 0
            store.rows[t.name][dst[cached]] = got[cached, : self._dim]
            store.state[t.name][dst[cached]] = got[cached, self._dim :]
            ws = torch.empty(tp.used_ids.numel(), self._dim)
            inc = slot >= 0
            ws[inc] = store.rows[t.name][slot[inc]]
            ws[tp.pull_pos[~cached]] = got[~cached, : self._dim]
            parts.append(ws)
            bases.append(base)
            base += ws.shape[0]
        working_set = torch.cat(parts) if parts else torch.empty(0, self._dim)
        training = torch.is_grad_enabled()
        if training:
            working_set.requires_grad_(True)
        pooled = self._pool(kjt, tplans, bases, working_set)
        pending = {"plan": plan, "tplans": tplans, "bases": bases, "rows": working_set.shape[0], "done": False}
        self._pending = pending
        if training:
            working_set.register_hook(lambda g, p=pending: self._after_backward(p, g))
        else:
            self._finish_pending_backward()
        self._runtime.meter.iterations += 1
        return pooled

    def _pool(self, kjt: KeyedJaggedTensor, tplans, bases, working_set) -> KeyedTensor:
        keys = kjt.keys()
        b = kjt.stride()
        lengths = kjt.lengths().view(len(keys), b).to(torch.int64)
        values = kjt.values().to(torch.int64)
        weights = kjt.weights_or_none() if self._is_weighted else None
        idx_parts, offset = [], 0
        by_key = {}
        for i, key in enumerate(keys):
            n = int(lengths[i].sum())
            v = values[offset : offset + n]
            offset += n
            if key not in self._feature_table:
                continue
            ti = self._feature_table[key]
            used = tplans[ti].used_ids
            pos = torch.searchsorted(used, v).clamp_(max=max(used.numel() - 1, 0))
            if v.numel() and (used.numel() == 0 or not bool(torch.equal(used[pos], v))):
                raise EsdConfigError(
                    f"feature {key!r}: this batch is not the one EsdInputDist dispatched to "
                    "this worker (ids missing from the dispatch plan); keep batches in order"
                )
            by_key[key] = i
            idx_parts.append(pos + bases[ti])
        missing = [f for f in self._embedding_names if f not in by_key]
        if missing:
            raise EsdConfigError(f"batch has no feature(s) {missing} of the EmbeddingBagCollection")
        # pool every feature of the batch in KJT order, then reorder to EBC order
        order = [by_key[f] for f in self._embedding_names]
        sel_lengths = lengths[sorted(by_key.values())]
        idx = torch.cat(idx_parts) if idx_parts else torch.empty(0, dtype=torch.int64)
        offs = torch.zeros(sel_lengths.numel() + 1, dtype=torch.int64)
        offs[1:] = torch.cumsum(sel_lengths.reshape(-1), 0)
        psw = None
        if weights is not None:
            wparts, offset = [], 0
            for i, key in enumerate(keys):
                n = int(lengths[i].sum())
                if key in by_key:
                    wparts.append(weights[offset : offset + n])
                offset += n
            psw = torch.cat(wparts).to(working_set.dtype)
        modes = {self._configs[self._feature_table[f]].pooling for f in by_key}
        out_rows = []
        if len(modes) == 1:
            mode = "sum" if modes.pop() == PoolingType.SUM else "mean"
            out = F.embedding_bag(idx, working_set, offs, mode=mode, per_sample_weights=psw, include_last_offset=True)
            out_rows = out.view(len(by_key), b, self._dim)
        else:
            # mixed pooling: pool per feature
            per = []
            kpos = sorted(by_key.values())
            for j, i in enumerate(kpos):
                mode = "sum" if self._configs[self._feature_table[keys[i]]].pooling == PoolingType.SUM else "mean"
                lo, hi = int(offs[j * b]), int(offs[(j + 1) * b])
                o = offs[j * b : (j + 1) * b + 1] - lo
                per.append(
                    F.embedding_bag(idx[lo:hi], working_set, o, mode=mode,
                                    per_sample_weights=None if psw is None else psw[lo:hi], include_last_offset=True)
                )
            out_rows = torch.stack(per)
        kpos = sorted(by_key.values())
        rank_of = {i: j for j, i in enumerate(kpos)}
        out_rows = out_rows[[rank_of[i] for i in order]]
        pooled = out_rows.permute(1, 0, 2).reshape(b, len(order) * self._dim)
        return KeyedTensor(
            keys=list(self._embedding_names),
            length_per_key=[self._dim] * len(self._embedding_names),
            values=pooled,
        )

    def _after_backward(self, pending: Dict, grad: Optional[torch.Tensor]) -> None:
        if pending["done"]:
            return
        pending["done"] = True
        if grad is None:
            grad = torch.zeros(pending["rows"], self._dim)
        elif get_gradient_division():
            # TorchRec divides pooled-embedding gradients by the world size (to
            # match DDP's averaging of dense gradients); so does ESD, over workers
            grad = grad / self._runtime.config.num_workers
        rt, r = self._runtime, self._runtime.routing
        keys, grads = [], []
        for ti, (t, tp, base) in enumerate(zip(self._configs, pending["tplans"], pending["bases"])):
            g = grad[base : base + tp.used_ids.numel()]
            if tp.local_pos.numel():
                slots = tp.used_slot[tp.local_pos]
                rows = self._store.rows[t.name][slots]
                state = self._store.state[t.name][slots]
                rt.optimizer.apply_(rows, state, g[tp.local_pos])
                self._store.rows[t.name][slots] = rows
                self._store.state[t.name][slots] = state
            keys.append(r.keys(ti, tp.used_ids[tp.grad_pos]))
            grads.append(g[tp.grad_pos])
        k = torch.cat(keys)
        rt.client.push_grads(k, torch.cat(grads).detach())  # type: ignore[union-attr]
        rt.meter.add("update_push", k.numel(), k.numel() * self._dim * 4)
        rt.meter.add_message(rt.link, k.numel() * (self._dim * 4 + 8))
        self._pending = None

    def _finish_pending_backward(self) -> None:
        """A forward whose backward never ran (eval, skipped step) still owes
        the PS its gradient phase: a zero gradient changes no row."""
        if self._pending is not None and not self._pending["done"]:
            self._after_backward(self._pending, None)

    def flush(self) -> None:
        self._finish_pending_backward()
        rt = self._runtime
        assert rt.directory is not None
        fplans = rt.directory.flush_plan()
        mine = fplans[rt.worker_index]
        tplans = [mine[t.name] for t in self._configs]
        self._push_pull(tplans)


class EsdEmbeddingBagCollectionSharder(ModuleSharder[EmbeddingBagCollection]):
    """Shards ``EmbeddingBagCollection`` s onto worker caches + parameter servers."""

    def __init__(self, runtime: EsdRuntime) -> None:
        super().__init__()
        self._runtime = runtime

    @property
    def module_type(self) -> Type[EmbeddingBagCollection]:
        return EmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return [ESD_SHARDING_TYPE]

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
        for name, ps in params.items():
            if ps.sharding_type != ESD_SHARDING_TYPE:
                raise EsdConfigError(
                    f"table {name!r}: the ESD sharder got sharding type {ps.sharding_type!r}; "
                    f"plan it as {ESD_SHARDING_TYPE!r} (see esd_sharding_plan)"
                )
        return ShardedEsdEmbeddingBagCollection(module, self._runtime)


def esd_module_plan(module: EmbeddingBagCollection, runtime: EsdRuntime) -> EmbeddingModuleShardingPlan:
    """The per-module plan that puts every table of ``module`` on ESD."""
    ranks = list(range(runtime.config.num_workers))
    return EmbeddingModuleShardingPlan(
        {
            t.name: ParameterSharding(
                sharding_type=ESD_SHARDING_TYPE, compute_kernel=ESD_COMPUTE_KERNEL, ranks=ranks
            )
            for t in module.embedding_bag_configs()
        }
    )


