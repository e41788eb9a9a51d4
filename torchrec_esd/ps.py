"""Parameter servers: global embedding tables, sparse optimizer, pull/push.

PS ranks hold every ESD table split row-wise into contiguous blocks (like
TorchRec's row-wise sharding: block ``ceil(N / P)``), with the optimizer state.
Workers talk to them in lock-step *phases* over one process group that spans
all ranks; rank 0 announces each phase with a small header so that the PS
loop (:meth:`ParameterServer.serve`) follows the workers' program:

* ``PHASE_PUSH_PULL``: workers push values (+ optimizer state) of dirty rows,
  the PS stores them, then answers the workers' pulls (value + state) and,
  with DES-served misses (``des=True``), their DES requests: per bag, the
  pooled partial sum of the bag's rows it owns (see :mod:`torchrec_esd.des_misses`);
* ``PHASE_GRADS``: workers push gradients (per row, and with DES per bag);
  the PS scatters bag gradients to the bags' rows, sums all workers'
  gradients per row and applies the optimizer once per row (synchronous
  semantics);
* ``GATHER``: the PS sends its tables (tests, checkpoints); ``STOP``; ``ABORT``.

Every message is self-describing (counts first, then keys, then payloads), so
the PS needs no copy of the workers' cache directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_esd.config import EsdConfigError
from torchrec_esd.des_misses import pair_bytes

PHASE_PUSH_PULL = 1
PHASE_GRADS = 2
GATHER = 3
STOP = 8
ABORT = 9


class EsdRemoteError(RuntimeError):
    """Another rank of the ESD job failed; this rank stops too."""


# ---------------------------------------------------------------- optimizer
@dataclass(frozen=True)
class SparseOptimizer:
    """Row-sparse optimizer with FBGEMM's fused-optimizer semantics.

    * ``"sgd"``: ``w -= lr * g``
    * ``"rowwise_adagrad"`` (FBGEMM ``EXACT_ROWWISE_ADAGRAD``):
      ``m += mean(g * g)``; ``w -= lr * g / (sqrt(m) + eps)``

    ``g`` is the row's gradient summed over the whole global batch.
    """

    name: str = "sgd"
    lr: float = 0.01
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "rowwise_adagrad"):
            raise EsdConfigError(
                f"sparse optimizer must be 'sgd' or 'rowwise_adagrad', got {self.name!r}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise EsdConfigError(f"sparse optimizer lr must be > 0, got {self.lr!r}")

    @property
    def state_dim(self) -> int:
        return 1 if self.name == "rowwise_adagrad" else 0

    def apply_(self, rows: torch.Tensor, state: torch.Tensor, grad: torch.Tensor) -> None:
        """Update ``rows`` [n, D] and ``state`` [n, S] in place with ``grad``."""
        if self.name == "sgd":
            rows.add_(grad, alpha=-self.lr)
        else:
            state[:, 0].add_(grad.pow(2).mean(dim=1))
            rows.addcdiv_(grad, state[:, 0:1].sqrt() + self.eps, value=-self.lr)


# ---------------------------------------------------------------- routing
class RowRouting:
    """Global row keys and their placement over PS ranks.

    A row of table ``t`` with id ``i`` has the global key
    ``table_offset[t] + i``; PS ``p`` owns ids ``[p * block_t, (p+1) * block_t)``
    of every table and stores them contiguously, table after table.
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig], num_ps: int) -> None:
        if not tables:
            raise EsdConfigError("no embedding tables for the parameter servers")
        dims = {t.embedding_dim for t in tables}
        if len(dims) != 1:
            raise EsdConfigError(
                f"ESD tables must share one embedding_dim, got {sorted(dims)} "
                f"({[(t.name, t.embedding_dim) for t in tables]})"
            )
        self.dim = dims.pop()
        self.num_ps = num_ps
        self.names = [t.name for t in tables]
        self.rows = torch.tensor([t.num_embeddings for t in tables], dtype=torch.int64)
        self.offsets = torch.zeros(len(tables) + 1, dtype=torch.int64)
        self.offsets[1:] = torch.cumsum(self.rows, 0)
        self.block = (self.rows + num_ps - 1) // num_ps
        # rows of each table on each PS, and where each table starts on each PS
        owned = torch.stack(
            [
                (self.rows - p * self.block).clamp(min=0).minimum(self.block)
                for p in range(num_ps)
            ]
        )  # [P, T]
        self.owned = owned
        self.ps_table_base = torch.zeros(num_ps, len(tables), dtype=torch.int64)
        self.ps_table_base[:, 1:] = torch.cumsum(owned, 1)[:, :-1]
        self.ps_rows = owned.sum(1)  # [P]

    def table_index(self, name: str) -> int:
        return self.names.index(name)

    def keys(self, table: int, ids: torch.Tensor) -> torch.Tensor:
        return ids + self.offsets[table]

    def locate(self, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(PS index, row index inside that PS's storage) of each key."""
        t = torch.searchsorted(self.offsets, keys, right=True) - 1
        ids = keys - self.offsets[t]
        p = ids // self.block[t]
        local = self.ps_table_base[p, t] + ids - p * self.block[t]
        return p, local


# ---------------------------------------------------------------- wire
class _Wire:
    """Collectives of the ESD protocol on the all-ranks group (with timeout)."""

    def __init__(self, group, world_size: int, ps_ranks: Sequence[int]) -> None:
        self.group = group
        self.world = world_size
        self.ps_ranks = list(ps_ranks)

    def header(self, cmd: int = 0, arg: int = 0) -> Tuple[int, int]:
        h = torch.tensor([cmd, arg], dtype=torch.int64)
        dist.broadcast(h, src=0, group=self.group)
        return int(h[0]), int(h[1])

    def exchange(self, send: torch.Tensor, send_counts: List[int], recv_counts: List[int], row_shape) -> torch.Tensor:
        out = torch.empty((sum(recv_counts),) + tuple(row_shape), dtype=send.dtype)
        dist.all_to_all_single(out, send.contiguous(), recv_counts, send_counts, group=self.group)
        return out

    def counts(self, mine: torch.Tensor) -> torch.Tensor:
        """mine: [world, k] counts this rank sends to each rank -> [world, k] received."""
        out = torch.empty_like(mine)
        dist.all_to_all_single(out, mine.contiguous(), group=self.group)
        return out

    def abort_message(self, msg: str = "") -> str:
        """Broadcast rank 0's ``msg`` (fixed 4 KiB frame); returns it."""
        data = torch.zeros(4096, dtype=torch.uint8)
        raw = msg.encode()[:4096]
        data[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        dist.broadcast(data, src=0, group=self.group)
        return bytes(data.tolist()).rstrip(b"\0").decode(errors="replace")


# ---------------------------------------------------------------- server
class ParameterServer:
    """One PS rank: its blocks of every table, optimizer state, serve loop."""

    def __init__(
        self,
        ps_index: int,
        routing: RowRouting,
        optimizer: SparseOptimizer,
        wire: _Wire,
        initial_weights: Dict[str, torch.Tensor],
        des: bool = False,
    ) -> None:
        self.ps_index = ps_index
        self.des = des
        # DES requests of the last push/pull phase, until their bag gradients arrive:
        # (storage rows, bag of each pair (global over senders), pair weights, bags per sender)
        self._des_pending: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[int]]] = None
        self.routing = routing
        self.optimizer = optimizer
        self.wire = wire
        n = int(routing.ps_rows[ps_index])
        self.weights = torch.empty(n, routing.dim)
        self.state = torch.zeros(n, optimizer.state_dim)
        for t, name in enumerate(routing.names):
            if name not in initial_weights:
                raise EsdConfigError(f"parameter server got no initial weights for table {name!r}")
            w = initial_weights[name]
            if tuple(w.shape) != (int(routing.rows[t]), routing.dim):
                raise EsdConfigError(
                    f"table {name!r}: initial weights of shape {tuple(w.shape)}, expected "
                    f"({int(routing.rows[t])}, {routing.dim})"
                )
            lo = ps_index * int(routing.block[t])
            cnt = int(routing.owned[ps_index, t])
            base = int(routing.ps_table_base[ps_index, t])
            self.weights[base : base + cnt] = w[lo : lo + cnt].detach().float()
        self.iterations = 0

    def serve(self) -> None:
        """Follow the workers' phases until STOP (or raise on ABORT)."""
        while True:
            cmd, arg = self.wire.header()
            if cmd == PHASE_PUSH_PULL:
                self._push_pull()
            elif cmd == PHASE_GRADS:
                self._grads()
                self.iterations += 1
            elif cmd == GATHER:
                self._gather()
            elif cmd == STOP:
                return
            elif cmd == ABORT:
                raise EsdRemoteError(f"ESD job aborted by the workers: {self.wire.abort_message()}")
            else:
                raise EsdRemoteError(f"parameter server got unknown command {cmd}")

    def _recv_keys(self, k: int, key_weights: Sequence[int]):
        """Per-sender counts ``[world, k]``, then the keys: ``sum_j
        key_weights[j] * counts[:, j]`` int64 values from each sender."""
        world = self.wire.world
        counts = self.wire.counts(torch.zeros(world, k, dtype=torch.int64))
        recv = (counts * torch.tensor(key_weights, dtype=torch.int64)).sum(1).tolist()
        keys = self.wire.exchange(torch.empty(0, dtype=torch.int64), [0] * world, recv, ())
        return counts, keys

    def _push_pull(self) -> None:
        world, row, dim = self.wire.world, self.routing.dim + self.optimizer.state_dim, self.routing.dim
        if self._des_pending is not None and sum(self._des_pending[3]):
            raise EsdRemoteError(
                f"PS {self.ps_index}: a new push/pull phase began before the gradients of the "
                "previous DES partial sums arrived (their updates would be lost)"
            )
        # [world, (push, pull)] or, with DES, [world, (push, pull, des pairs, des bags)]
        # counts per sender: (push, pull) or, with DES, (push, pull, DES pairs, DES bags,
        # pair weights sent?); keys: pushes, pulls, then one packed int64 per DES pair
        counts, keys = self._recv_keys(5, (1, 1, 1, 0, 0)) if self.des else self._recv_keys(2, (1, 1))
        n_push = counts[:, 0].tolist()
        vals = self.wire.exchange(torch.empty(0, row), [0] * world, n_push, (row,))
        if self.des:
            n_w = (counts[:, 2] * counts[:, 4]).tolist()
            sent_w = torch.split(self.wire.exchange(torch.empty(0), [0] * world, n_w, ()), n_w)
        # split keys of each sender into its pushes, pulls (and DES pairs)
        push_keys, pull_keys, des_keys, des_bags, des_w, pos = [], [], [], [], [], 0
        bag_base, bags_per_sender = 0, []
        for r in range(world):
            a, b = int(counts[r, 0]), int(counts[r, 1])
            push_keys.append(keys[pos : pos + a])
            pull_keys.append(keys[pos + a : pos + a + b])
            pos += a + b
            if self.des:
                c, nb = int(counts[r, 2]), int(counts[r, 3])
                packed = keys[pos : pos + c]
                pos += c
                if c and (nb <= 0 or int(packed.min()) < 0):
                    raise EsdRemoteError(f"PS {self.ps_index}: rank {r} sent a malformed DES request")
                des_keys.append(packed // max(nb, 1))
                des_bags.append(packed % max(nb, 1) + bag_base)
                des_w.append(sent_w[r] if int(counts[r, 4]) else torch.ones(c))
                bag_base += nb
                bags_per_sender.append(nb)
        pk = torch.cat(push_keys)
        if pk.numel():
            local = self._local(pk)
            self.weights[local] = vals[:, :dim]
            self.state[local] = vals[:, dim:]
        ql = torch.cat(pull_keys)
        local = self._local(ql)
        reply = torch.cat([self.weights[local], self.state[local]], dim=1)
        self.wire.exchange(reply, counts[:, 1].tolist(), [0] * world, (row,))
        if self.des:
            # pooled partial sums, after the pushes above are stored
            dl = self._local(torch.cat(des_keys))
            db = torch.cat(des_bags)
            pair_w = torch.cat(des_w)
            partial = torch.zeros(bag_base, dim).index_add_(0, db, self.weights[dl] * pair_w.view(-1, 1))
            self.wire.exchange(partial, bags_per_sender, [0] * world, (dim,))
            self._des_pending = (dl, db, pair_w, bags_per_sender)

    def _grads(self) -> None:
        world, dim = self.wire.world, self.routing.dim
        counts, keys = self._recv_keys(2, (1, 0)) if self.des else self._recv_keys(1, (1,))
        grads = self.wire.exchange(torch.empty(0, dim), [0] * world, counts[:, 0].tolist(), (dim,))
        local = self._local(keys)
        if self.des:
            n_bags = counts[:, 1].tolist()
            dl, db, pair_w, expected = self._des_pending or (None, None, None, [0] * world)
            if n_bags != expected:
                raise EsdRemoteError(
                    f"PS {self.ps_index}: DES bag gradients per rank {n_bags} do not match the bags "
                    f"served in the forward {expected}"
                )
            bag_grads = self.wire.exchange(torch.empty(0, dim), [0] * world, n_bags, (dim,))
            self._des_pending = None
            if dl is not None and dl.numel():
                # d(sum_i w_i row_i)/d row_i = w_i: each pair's row gets w_i x its bag's gradient
                local = torch.cat([local, dl])
                grads = torch.cat([grads, bag_grads[db] * pair_w.view(-1, 1)])
        if local.numel() == 0:
            return
        uniq, inv = torch.unique(local, return_inverse=True)
        total = torch.zeros(uniq.numel(), dim).index_add_(0, inv, grads)
        rows, state = self.weights[uniq], self.state[uniq]
        self.optimizer.apply_(rows, state, total)
        self.weights[uniq], self.state[uniq] = rows, state

    def _gather(self) -> None:
        # every rank joins every PS's broadcasts, in PS order (see PsClient.gather_tables)
        for i, src in enumerate(self.wire.ps_ranks):
            mine = i == self.ps_index
            rows = int(self.routing.ps_rows[i])
            w = self.weights.contiguous() if mine else torch.empty(rows, self.routing.dim)
            s = self.state.contiguous() if mine else torch.empty(rows, self.optimizer.state_dim)
            dist.broadcast(w, src=src, group=self.wire.group)
            dist.broadcast(s, src=src, group=self.wire.group)

    def _local(self, keys: torch.Tensor) -> torch.Tensor:
        p, local = self.routing.locate(keys)
        if keys.numel() and bool((p != self.ps_index).any()):
            raise EsdRemoteError(f"PS {self.ps_index} received keys it does not own")
        return local


# ---------------------------------------------------------------- DES requests
@dataclass
class DesRequest:
    """A worker's DES-served rows for one forward: distinct ``(row key, bag)``
    pairs with their pooling weights; bags are numbered ``0..num_bags-1``."""

    keys: torch.Tensor  # [N] int64 global row keys
    bags: torch.Tensor  # [N] int64 bag of each pair
    weights: torch.Tensor  # [N] float32 pooling weight of each pair
    num_bags: int

    @staticmethod
    def empty() -> "DesRequest":
        e = torch.empty(0, dtype=torch.int64)
        return DesRequest(e, e, torch.empty(0), 0)


@dataclass
class DesRoute:
    """A :class:`DesRequest` split over the PS ranks: per PS, its pairs packed
    as ``key * bags + bag`` with bag indices local to that PS, their weights
    (sent only if some weight is not 1), and which request bag each of that
    PS's bags is (``ps_bags``)."""

    packed: List[torch.Tensor]
    weights: List[torch.Tensor]
    weighted: List[bool]
    ps_bags: List[torch.Tensor]
    pairs_per_ps: torch.Tensor
    bags_per_ps: torch.Tensor
    num_bags: int

    @staticmethod
    def build(routing: RowRouting, req: DesRequest) -> "DesRoute":
        p, _ = routing.locate(req.keys)
        total_rows = int(routing.offsets[-1])
        packed, weights, weighted, ps_bags = [], [], [], []
        for i in range(routing.num_ps):
            m = p == i
            bags, inv = torch.unique(req.bags[m], return_inverse=True)
            nb = bags.numel()
            if total_rows * max(nb, 1) >= 2**63:
                raise EsdConfigError(
                    f"DES request of {nb} bags over tables of {total_rows} rows does not fit the int64 "
                    "(row key, bag) packing; use smaller batches or disable EsdConfig.des_misses"
                )
            packed.append(req.keys[m] * nb + inv.view(-1))
            w = req.weights[m].to(torch.float32)
            weights.append(w)
            weighted.append(bool((w != 1).any()))
            ps_bags.append(bags)
        return DesRoute(
            packed, weights, weighted, ps_bags,
            torch.tensor([k.numel() for k in packed], dtype=torch.int64),
            torch.tensor([b.numel() for b in ps_bags], dtype=torch.int64),
            req.num_bags,
        )

    def wire_bytes(self) -> int:
        """Bytes of the request on the wire (packed pairs, weights where sent)."""
        return sum(pair_bytes(wt) * k.numel() for k, wt in zip(self.packed, self.weighted))


# ---------------------------------------------------------------- client
class PsClient:
    """Worker side of the protocol (every worker calls the same phases)."""

    def __init__(
        self, routing: RowRouting, optimizer: SparseOptimizer, wire: _Wire, rank: int, des: bool = False
    ) -> None:
        self.routing = routing
        self.optimizer = optimizer
        self.wire = wire
        self.rank = rank
        self.des = des

    def _by_ps(self, keys: torch.Tensor):
        p, _ = self.routing.locate(keys)
        order = torch.argsort(p, stable=True)
        per = torch.bincount(p, minlength=self.routing.num_ps)
        return order, per

    def _to_world(self, per_ps: torch.Tensor) -> List[int]:
        out = [0] * self.wire.world
        for i, r in enumerate(self.wire.ps_ranks):
            out[r] = int(per_ps[i])
        return out

    def push_pull(
        self,
        push_keys: torch.Tensor,
        push_vals: torch.Tensor,
        pull_keys: torch.Tensor,
        des: Optional["DesRequest"] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional["DesRoute"]]:
        """Store ``push_vals`` [n, D+S] at ``push_keys``, then return the rows
        (value + state) of ``pull_keys`` in their order, and (with DES) the
        pooled partial sums ``[des.num_bags, D]`` of the DES request plus the
        route that :meth:`push_grads` needs for the bags' gradients."""
        row, dim, world = self.routing.dim + self.optimizer.state_dim, self.routing.dim, self.wire.world
        if des is not None and not self.des:
            raise EsdConfigError("a DES request on a PS client built without des_misses")
        if self.rank == 0:
            self.wire.header(PHASE_PUSH_PULL)
        else:
            self.wire.header()
        po, pper = self._by_ps(push_keys)
        qo, qper = self._by_ps(pull_keys)
        counts = torch.zeros(world, 5 if self.des else 2, dtype=torch.int64)
        route: Optional[DesRoute] = None
        if self.des:
            route = DesRoute.build(self.routing, des if des is not None else DesRequest.empty())
        for i, r in enumerate(self.wire.ps_ranks):
            counts[r, 0], counts[r, 1] = pper[i], qper[i]
            if route is not None:
                counts[r, 2], counts[r, 3] = route.pairs_per_ps[i], route.bags_per_ps[i]
                counts[r, 4] = int(route.weighted[i])
        self.wire.counts(counts)
        # keys: for each PS, its pushes, its pulls (then its packed DES pairs)
        pk, qk = push_keys[po], pull_keys[qo]
        psplit, qsplit = pper.tolist(), qper.tolist()
        key_parts = []
        for i, (a, b) in enumerate(zip(torch.split(pk, psplit), torch.split(qk, qsplit))):
            key_parts += [a, b]
            if route is not None:
                key_parts.append(route.packed[i])
        keys = torch.cat(key_parts) if key_parts else torch.empty(0, dtype=torch.int64)
        sent = pper + qper + (route.pairs_per_ps if route is not None else 0)
        self.wire.exchange(keys, self._to_world(sent), [0] * world, ())
        self.wire.exchange(push_vals[po], self._to_world(pper), [0] * world, (row,))
        if route is not None:
            w_parts = [w for w, wt in zip(route.weights, route.weighted) if wt]
            n_w = torch.tensor([w.numel() if wt else 0 for w, wt in zip(route.weights, route.weighted)])
            send_w = torch.cat(w_parts) if w_parts else torch.empty(0)
            self.wire.exchange(send_w, self._to_world(n_w), [0] * world, ())
        got = self.wire.exchange(torch.empty(0, row), [0] * world, self._to_world(qper), (row,))
        out = torch.empty_like(got)
        out[qo] = got
        partial = torch.empty(0, dim)
        if route is not None:
            parts = self.wire.exchange(torch.empty(0, dim), [0] * world, self._to_world(route.bags_per_ps), (dim,))
            # every PS summed the rows it owns; the bag's partial sum is the sum over PS
            partial = torch.zeros(route.num_bags, dim).index_add_(0, torch.cat(route.ps_bags), parts)
        return out, partial, route

    def push_grads(
        self, keys: torch.Tensor, grads: torch.Tensor, des_route: Optional["DesRoute"] = None,
        des_grads: Optional[torch.Tensor] = None,
    ) -> None:
        """Send row gradients ``grads`` [n, D] of ``keys`` and (with DES) the
        gradients ``des_grads`` [num_bags, D] of the bags served in the forward."""
        if self.rank == 0:
            self.wire.header(PHASE_GRADS)
        else:
            self.wire.header()
        world, dim = self.wire.world, self.routing.dim
        order, per = self._by_ps(keys)
        counts = torch.zeros(world, 2 if self.des else 1, dtype=torch.int64)
        if self.des and des_route is None:
            des_route = DesRoute.build(self.routing, DesRequest.empty())
        for i, r in enumerate(self.wire.ps_ranks):
            counts[r, 0] = per[i]
            if self.des:
                counts[r, 1] = des_route.bags_per_ps[i]
        self.wire.counts(counts)
        split = self._to_world(per)
        self.wire.exchange(keys[order], split, [0] * world, ())
        self.wire.exchange(grads[order], split, [0] * world, (dim,))
        if self.des:
            if des_grads is None:
                des_grads = torch.zeros(des_route.num_bags, dim)
            if tuple(des_grads.shape) != (des_route.num_bags, dim):
                raise EsdConfigError(
                    f"DES bag gradients of shape {tuple(des_grads.shape)}, expected ({des_route.num_bags}, {dim})"
                )
            send = des_grads[torch.cat(des_route.ps_bags)] if des_route.num_bags else torch.empty(0, dim)
            self.wire.exchange(send, self._to_world(des_route.bags_per_ps), [0] * world, (dim,))

    def gather_tables(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Full tables and optimizer states, assembled from all PS ranks."""
        if self.rank == 0:
            self.wire.header(GATHER)
        else:
            self.wire.header()
        r = self.routing
        parts_w, parts_s = [], []
        for i, src in enumerate(self.wire.ps_ranks):
            w = torch.empty(int(r.ps_rows[i]), r.dim)
            s = torch.empty(int(r.ps_rows[i]), self.optimizer.state_dim)
            dist.broadcast(w, src=src, group=self.wire.group)
            dist.broadcast(s, src=src, group=self.wire.group)
            parts_w.append(w)
            parts_s.append(s)
        weights, states = {}, {}
        for t, name in enumerate(r.names):
            keys = r.keys(t, torch.arange(int(r.rows[t])))
            p, local = r.locate(keys)
            weights[name] = torch.empty(int(r.rows[t]), r.dim)
            states[name] = torch.empty(int(r.rows[t]), self.optimizer.state_dim)
            for i in range(r.num_ps):
                m = p == i
                weights[name][m] = parts_w[i][local[m]]
                states[name][m] = parts_s[i][local[m]]
        return weights, states

    def stop(self) -> None:
        if self.rank == 0:
            self.wire.header(STOP)
        else:
            self.wire.header()

    def abort(self, msg: str) -> None:
        """Make the PS ranks fail with ``msg``.  Every worker calls it (it is a
        collective); the message of worker 0 is the one the PS ranks raise."""
        self.wire.header(ABORT if self.rank == 0 else 0)
        self.wire.abort_message(msg)

