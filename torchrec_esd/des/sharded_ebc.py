"""The DES-sharded ``EmbeddingBagCollection`` of one rank:
:class:`ShardedDesEmbeddingBagCollection` (built by the sharder of
:mod:`torchrec_esd.des.sharding`).

Per iteration (every rank keeps its own local batch, as in TorchRec):

1. ``input_dist``: each rank buckets its ids by owner and sends them with the
   per-(feature, sample) counts (one all-to-all for counts, one for ids).
2. ``compute``: each owner pools the ids it received per (source sample,
   feature) from its shard: one partial vector per *non-empty* bag part.
3. ``output_dist``: partial vectors go back to the samples' ranks (one
   all-to-all, autograd-aware) and are summed per (sample, feature); MEAN
   divides by the whole bag length there (a partial mean is not additive).
4. backward: the pooled gradient of a bag goes back to each owner that
   contributed to it (the same all-to-all, reversed); the gradient of a row is
   the sum of its bags' gradients (times per-sample weights), divided by the
   world size like TorchRec's pooled-embedding gradients
   (``get_gradient_division``), and the owner applies the sparse optimizer
   (:class:`torchrec_esd.ps.SparseOptimizer`, FBGEMM-exact ``sgd`` /
   ``rowwise_adagrad``) once per touched row during the backward, like
   TorchRec's fused optimizer.

It also computes factorization-machine sums next to the weights
(:meth:`ShardedDesEmbeddingBagCollection.fm_sums`).  Every rank counts the
bytes it sends to *other* ranks per kind in
``ShardedDesEmbeddingBagCollection.comm_bytes`` (ids + counts, forward
partials, backward partial gradients).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Type

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
    NoWait,
    ShardedModule,
    ShardingEnv,
)
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_esd.config import EsdConfigError
from torchrec_esd.des.plan import DES_ROW_WISE, DES_TABLE_WISE, validate_des_module
from torchrec_esd.ps import SparseOptimizer


class _PartialsAllToAll(torch.autograd.Function):
    """All-to-all of partial vectors whose backward is the reversed all-to-all
    (the pooled gradients go back to the shards that produced the partials)."""

    @staticmethod
    def forward(ctx, partials, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = partials.new_empty((sum(recv_splits),) + tuple(partials.shape[1:]))
        dist.all_to_all_single(out, partials.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty((sum(ctx.send_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return back, None, None, None


class DesContext:
    """Per-batch context: what this rank sent and received in input_dist."""

    def __init__(self) -> None:
        self.send_counts: Optional[torch.Tensor] = None  # [W, F, b] ids of (f, s) owned by r
        self.lengths: Optional[torch.Tensor] = None  # [F, b] total bag lengths
        self.recv_counts: List[torch.Tensor] = []  # per source rank: [F_me, b_src]
        self.recv_values: Optional[torch.Tensor] = None  # local row keys, src-major
        self.recv_weights: Optional[torch.Tensor] = None
        self.batch_size = 0
        self.partial_splits: List[int] = []  # partial vectors this owner sends to each rank

    def record_stream(self, stream) -> None:  # TorchRec pipelines call this
        pass


class ShardedDesEmbeddingBagCollection(
    ShardedModule[KeyedJaggedTensor, KeyedTensor, KeyedTensor, DesContext]
):
    def __init__(
        self,
        module: EmbeddingBagCollection,
        params: EmbeddingModuleShardingPlan,
        env: ShardingEnv,
        optimizer: SparseOptimizer,
        group=None,
    ) -> None:
        super().__init__()
        validate_des_module(module)
        self._configs = list(module.embedding_bag_configs())
        self._group = group if group is not None else env.process_group
        self._rank = dist.get_rank(self._group)
        self._world = dist.get_world_size(self._group)
        self._optimizer = optimizer
        self._is_weighted = module.is_weighted()
        self._dim = self._configs[0].embedding_dim
        W = self._world
        names = {t.name for t in self._configs}
        if set(params.keys()) != names:
            raise EsdConfigError(f"DES plan covers tables {sorted(params)} but the module has {sorted(names)}")
        # features (in output order) and their tables
        self._features: List[str] = []
        self._feature_table: List[int] = []
        for ti, t in enumerate(self._configs):
            for f in t.feature_names:
                self._features.append(f)
                self._feature_table.append(ti)
        self._mean = torch.tensor(
            [self._configs[ti].pooling == PoolingType.MEAN for ti in self._feature_table], dtype=torch.bool
        )
        # placement: row blocks per (rank, table); a table-wise table has one owner
        T = len(self._configs)
        self._row_wise = torch.zeros(T, dtype=torch.bool)
        self._tw_owner = torch.zeros(T, dtype=torch.int64)
        self._block = torch.zeros(T, dtype=torch.int64)
        owned = torch.zeros(W, T, dtype=torch.int64)  # rows of table t on rank r
        for ti, t in enumerate(self._configs):
            ps = params[t.name]
            n = t.num_embeddings
            if ps.sharding_type == DES_ROW_WISE:
                if sorted(ps.ranks or []) != list(range(W)):
                    raise EsdConfigError(f"DES row-wise table {t.name!r} must span all {W} ranks, got {ps.ranks}")
                self._row_wise[ti] = True
                b = (n + W - 1) // W
                self._block[ti] = b
                for r in range(W):
                    owned[r, ti] = max(0, min(b, n - r * b))
            elif ps.sharding_type == DES_TABLE_WISE:
                if not ps.ranks or len(ps.ranks) != 1 or not 0 <= ps.ranks[0] < W:
                    raise EsdConfigError(f"DES table-wise table {t.name!r} needs one owner rank, got {ps.ranks}")
                self._tw_owner[ti] = ps.ranks[0]
                self._block[ti] = n
                owned[ps.ranks[0], ti] = n
            else:
                raise EsdConfigError(
                    f"table {t.name!r}: sharding type {ps.sharding_type!r} is not a DES one "
                    f"({DES_TABLE_WISE!r}, {DES_ROW_WISE!r})"
                )
        self._owned = owned
        # features with rows on each rank (what that rank receives counts for)
        self._feats_on = [
            [fi for fi, ti in enumerate(self._feature_table) if owned[r, ti] > 0 or self._row_wise[ti]]
            for r in range(W)
        ]
        # this rank's shard: all owned rows, table after table
        me = self._rank
        self._base = torch.zeros(T, dtype=torch.int64)
        self._base[1:] = torch.cumsum(owned[me], 0)[:-1]
        rows = []
        for ti, t in enumerate(self._configs):
            w = module.embedding_bags[t.name].weight.detach()
            if w.device.type == "meta":
                raise EsdConfigError(f"table {t.name!r} has no initial values (meta device)")
            lo = me * int(self._block[ti]) if self._row_wise[ti] else 0
            rows.append(w[lo : lo + int(owned[me, ti])].to(torch.float32).clone())
        self._rows = torch.cat(rows) if rows else torch.zeros(0, self._dim)
        self._state = torch.zeros(self._rows.shape[0], optimizer.state_dim)
        self.comm_bytes: Dict[str, int] = {"ids": 0, "partials_fwd": 0, "partials_bwd": 0}
        self.iterations = 0

    # ------------------------------------------------------------ TorchRec API
    def create_context(self) -> DesContext:
        return DesContext()

    def embedding_bag_configs(self):
        return self._configs

    @property
    def unsharded_module_type(self) -> Type[EmbeddingBagCollection]:
        return EmbeddingBagCollection

    def input_dist(self, ctx: DesContext, features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        self._send_ids(ctx, features)
        return KJTListSplitsAwaitable([NoWait(NoWait(features))], ctx)

    def compute(self, ctx: DesContext, dist_input) -> torch.Tensor:
        return self._partials(ctx)

    def output_dist(self, ctx: DesContext, output: torch.Tensor) -> LazyAwaitable[KeyedTensor]:
        return LazyNoWait(self._combine(ctx, output))

    def compute_and_output_dist(self, ctx: DesContext, input) -> LazyAwaitable[KeyedTensor]:
        return self.output_dist(ctx, self.compute(ctx, input))

    # ------------------------------------------------------------ phases
    def _a2a(self, send: torch.Tensor, send_splits: List[int], recv_splits: List[int], kind: str) -> torch.Tensor:
        out = torch.empty((sum(recv_splits),) + tuple(send.shape[1:]), dtype=send.dtype)
        dist.all_to_all_single(out, send.contiguous(), recv_splits, send_splits, group=self._group)
        row = send[0].numel() * send.element_size() if send.dim() > 1 else send.element_size()
        self.comm_bytes[kind] += (sum(send_splits) - send_splits[self._rank]) * row
        return out

    def _send_ids(self, ctx: DesContext, kjt: KeyedJaggedTensor) -> None:
        W, me, Fn = self._world, self._rank, len(self._features)
        keys = kjt.keys()
        missing = [f for f in self._features if f not in keys]
        if missing:
            raise EsdConfigError(f"batch has no feature(s) {missing} of the EmbeddingBagCollection")
        b = kjt.stride()
        kidx = {k: i for i, k in enumerate(keys)}
        lengths_all = kjt.lengths().view(len(keys), b).to(torch.int64)
        offs = torch.zeros(len(keys) * b + 1, dtype=torch.int64)
        offs[1:] = torch.cumsum(lengths_all.reshape(-1), 0)
        weights = kjt.weights_or_none() if self._is_weighted else None
        vals, wts, owners, fis, samples = [], [], [], [], []
        lengths = torch.zeros(Fn, b, dtype=torch.int64)
        for fi, f in enumerate(self._features):
            k = kidx[f]
            lo, hi = int(offs[k * b]), int(offs[(k + 1) * b])
            v = kjt.values()[lo:hi].to(torch.int64)
            ti = self._feature_table[fi]
            n = self._configs[ti].num_embeddings
            if v.numel() and (int(v.min()) < 0 or int(v.max()) >= n):
                bad = int(v[(v < 0) | (v >= n)][0])
                raise EsdConfigError(
                    f"feature {f!r}: id {bad} is outside table {self._configs[ti].name!r} ({n} rows)"
                )
            lengths[fi] = lengths_all[k]
            if self._row_wise[ti]:
                o = v // self._block[ti]
                v = v - o * self._block[ti]
            else:
                o = torch.full_like(v, int(self._tw_owner[ti]))
            vals.append(v)
            owners.append(o)
            fis.append(torch.full_like(v, fi))
            samples.append(torch.repeat_interleave(torch.arange(b), lengths_all[k]))
            if weights is not None:
                wts.append(weights[lo:hi])
        cat = lambda xs, dt: torch.cat(xs) if xs else torch.zeros(0, dtype=dt)  # noqa: E731
        v, o, fi_, s = (cat(vals, torch.int64), cat(owners, torch.int64), cat(fis, torch.int64),
                        cat(samples, torch.int64))
        counts = torch.bincount((o * Fn + fi_) * b + s, minlength=W * Fn * b).view(W, Fn, b)
        order = torch.sort(o, stable=True).indices  # -> (owner, feature, sample) order
        ctx.send_counts, ctx.lengths, ctx.batch_size = counts, lengths, b
        # batch sizes of every rank (the owners need them to read the counts)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(W)]
        dist.all_gather(sizes, torch.tensor([b], dtype=torch.int64), group=self._group)
        self.comm_bytes["ids"] += 8 * (W - 1)
        bs = [int(x) for x in sizes]
        # counts (int32): owner r gets [F_r, b] per source
        send_c = torch.cat([counts[r, self._feats_on[r]].reshape(-1) for r in range(W)]).to(torch.int32)
        send_splits = [len(self._feats_on[r]) * b for r in range(W)]
        recv_splits = [len(self._feats_on[me]) * bs[r] for r in range(W)]
        got_c = self._a2a(send_c, send_splits, recv_splits, "ids").to(torch.int64)
        ctx.recv_counts = list(got_c.split(recv_splits))
        ctx.recv_counts = [c.view(len(self._feats_on[me]), bs[r]) for r, c in enumerate(ctx.recv_counts)]
        # ids (as local keys of the owner's table shard) and per-sample weights
        vsend = v[order]
        vsplits = [int(counts[r].sum()) for r in range(W)]
        vrecv = [int(c.sum()) for c in ctx.recv_counts]
        # ids travel as row numbers inside the owner's shard: int32 whenever
        # every shard has < 2^31 rows (half of TorchRec's int64 KJT values)
        id_dtype = torch.int32 if int(self._owned.max()) < 2**31 else torch.int64
        ctx.recv_values = self._a2a(vsend.to(id_dtype), vsplits, vrecv, "ids").to(torch.int64)
        if weights is not None:
            ctx.recv_weights = self._a2a(cat(wts, weights.dtype)[order], vsplits, vrecv, "ids")

    def _partials(self, ctx: DesContext) -> torch.Tensor:
        """Owner side: one pooled partial vector per non-empty received bag part."""
        counts, uniq, inv, psw = self._bag_keys(ctx)
        working_set = self._working_set(uniq)
        offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(counts, 0)
        pooled = F.embedding_bag(inv, working_set, offsets, mode="sum", per_sample_weights=psw,
                                 include_last_offset=True)
        nonempty = counts > 0
        ctx.partial_splits = [int((c > 0).sum()) for c in ctx.recv_counts]
        self.iterations += 1
        return pooled[nonempty]

    def _combine(self, ctx: DesContext, partials: torch.Tensor) -> KeyedTensor:
        """Sample side: receive partial vectors and sum them per (sample, feature)."""
        W, b, Fn = self._world, ctx.batch_size, len(self._features)
        idx, recv_splits = [], []
        for r in range(W):
            sub = ctx.send_counts[r, self._feats_on[r]]  # [F_r, b]
            nz = (sub > 0).nonzero()
            feats = torch.tensor(self._feats_on[r], dtype=torch.int64)
            idx.append(feats[nz[:, 0]] * b + nz[:, 1] if nz.numel() else torch.zeros(0, dtype=torch.int64))
            recv_splits.append(nz.shape[0])
        idx = torch.cat(idx)
        send_splits = ctx.partial_splits
        row = self._dim * 4
        off_rank = sum(send_splits) - send_splits[self._rank]
        self.comm_bytes["partials_fwd"] += off_rank * row
        if torch.is_grad_enabled() and partials.requires_grad:
            recv = _PartialsAllToAll.apply(partials, send_splits, recv_splits, self._group)
            back = sum(recv_splits) - recv_splits[self._rank]
            self.comm_bytes["partials_bwd"] += back * row  # the same all-to-all, reversed
        else:
            recv = partials.new_empty(sum(recv_splits), self._dim)
            dist.all_to_all_single(recv, partials.detach().contiguous(), recv_splits, send_splits, group=self._group)
        pooled = torch.zeros(Fn * b, self._dim, dtype=recv.dtype).index_add(0, idx, recv)
        pooled = pooled.view(Fn, b, self._dim)
        if bool(self._mean.any()):
            div = torch.where(self._mean[:, None], ctx.lengths.clamp(min=1), torch.ones_like(ctx.lengths))
            pooled = pooled / div[:, :, None].to(pooled.dtype)
        values = pooled.permute(1, 0, 2).reshape(b, Fn * self._dim)
        return KeyedTensor(keys=list(self._features), length_per_key=[self._dim] * Fn, values=values)

    # ------------------------------------------------------------ FM / LR partial sums
    def fm_sums(self, features: KeyedJaggedTensor):
        """First- and second-order sums of a factorization machine, per sample,
        computed next to the weights: ``s1[s] = sum_i x_i v_i`` (``[b, D]``) and
        ``s2[s] = sum_i x_i^2 ||v_i||^2`` (``[b]``) over every id ``i`` of every
        feature of sample ``s`` (``x_i``: per-sample weight, 1 if unweighted).
        Each owner sends one ``D + 1`` vector per sample (not one per feature
        or id); the FM interaction is ``0.5 * (||s1||^2 - s2)`` and an LR term
        is ``s1`` of a ``D = 1`` table.  Differentiable, with the same fused
        optimizer step on the owners during the backward.  SUM pooling only."""
        if bool(self._mean.any()):
            bad = [f for f, m in zip(self._features, self._mean.tolist()) if m]
            raise EsdConfigError(f"DES FM sums need SUM pooling; feature(s) {bad} use MEAN")
        ctx = self.create_context()
        self._send_ids(ctx, features)
        me, W, b, D = self._rank, self._world, ctx.batch_size, self._dim
        counts, uniq, inv, psw = self._bag_keys(ctx)
        working_set = self._working_set(uniq)
        offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(counts, 0)
        sq = working_set.pow(2).sum(1, keepdim=True)
        p1 = F.embedding_bag(inv, working_set, offsets, mode="sum", per_sample_weights=psw, include_last_offset=True)
        p2 = F.embedding_bag(inv, sq, offsets, mode="sum", per_sample_weights=None if psw is None else psw * psw,
                             include_last_offset=True)
        pooled = torch.cat([p1, p2], 1)  # per received bag part (src, feature, sample)
        nf = len(self._feats_on[me])
        send_splits = [c.shape[1] if nf else 0 for c in ctx.recv_counts]  # one row per source sample
        parts = [x.view(nf, n, D + 1).sum(0) for x, n in zip(pooled.split([nf * n for n in send_splits]), send_splits)
                 if n]
        send = torch.cat(parts) if parts else pooled.new_zeros(0, D + 1)
        recv_splits = [b if self._feats_on[r] else 0 for r in range(W)]
        self.comm_bytes["partials_fwd"] += (sum(send_splits) - send_splits[me]) * (D + 1) * 4
        if torch.is_grad_enabled():
            recv = _PartialsAllToAll.apply(send, send_splits, recv_splits, self._group)
            self.comm_bytes["partials_bwd"] += (sum(recv_splits) - recv_splits[me]) * (D + 1) * 4
        else:
            recv = send.new_empty(sum(recv_splits), D + 1)
            dist.all_to_all_single(recv, send.detach().contiguous(), recv_splits, send_splits, group=self._group)
        total = recv.view(-1, b, D + 1).sum(0)
        self.iterations += 1
        return total[:, :D], total[:, D]

    def _bag_keys(self, ctx: DesContext):
        """Received bag parts: counts per (src, feature, sample), unique shard
        rows, their positions per id, per-sample weights."""
        me = self._rank
        feats = torch.tensor(self._feats_on[me], dtype=torch.int64)
        counts = torch.cat([c.reshape(-1) for c in ctx.recv_counts])
        bag_feat = torch.cat([feats.repeat_interleave(c.shape[1]) for c in ctx.recv_counts])
        table = torch.tensor(self._feature_table, dtype=torch.int64)[bag_feat] if bag_feat.numel() else bag_feat
        keys = ctx.recv_values + torch.repeat_interleave(self._base[table], counts)
        uniq, inv = torch.unique(keys, return_inverse=True)
        psw = ctx.recv_weights.to(torch.float32) if ctx.recv_weights is not None else None
        return counts, uniq, inv, psw

    def _working_set(self, uniq: torch.Tensor) -> torch.Tensor:
        working_set = self._rows[uniq].clone()
        if torch.is_grad_enabled():
            working_set.requires_grad_(True)
            working_set.register_hook(lambda g, u=uniq: self._apply_grad(u, g))
        return working_set

    def _apply_grad(self, uniq: torch.Tensor, grad: Optional[torch.Tensor]) -> None:
        """Backward of the shard: rows' summed gradients -> sparse optimizer step."""
        if grad is None or uniq.numel() == 0:
            return
        g = grad.detach()
        if get_gradient_division():
            # TorchRec divides pooled-embedding gradients by the world size
            # (matching DDP's averaging of the dense gradients)
            g = g / self._world
        rows, state = self._rows[uniq], self._state[uniq]
        self._optimizer.apply_(rows, state, g)
        self._rows[uniq], self._state[uniq] = rows, state

    # ------------------------------------------------------------ inspection
    def gather_tables(self):
        """Full tables and optimizer state on every rank (tests, checkpoints)."""
        me = self._rank
        tables, states = {}, {}
        for ti, t in enumerate(self._configs):
            full = torch.zeros(t.num_embeddings, self._dim)
            st = torch.zeros(t.num_embeddings, self._state.shape[1])
            n = int(self._owned[me, ti])
            if n:
                lo = me * int(self._block[ti]) if self._row_wise[ti] else 0
                base = int(self._base[ti])
                full[lo : lo + n] = self._rows[base : base + n]
                st[lo : lo + n] = self._state[base : base + n]
            dist.all_reduce(full, group=self._group)  # each row has exactly one owner
            if st.numel():
                dist.all_reduce(st, group=self._group)
            tables[t.name], states[t.name] = full, st
        return tables, states
