"""Parameter servers: global embedding tables, sparse optimizer, pull/push.

PS ranks hold every ESD table split row-wise into contiguous blocks (like
TorchRec's row-wise sharding: block ``ceil(N / P)``), with the optimizer state.
Workers talk to them in lock-step *phases* with point-to-point messages over
one gloo group that spans all ranks: each phase, every worker sends every PS
one request (a fixed frame naming the phase and the payload's counts, then
the payload) and, for a push/pull, gets one reply, so that the PS loop
(:meth:`ParameterServer.serve`) follows the workers' program and checks that
they agree on it:

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
from datetime import timedelta
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
FRAME = 8  # int64 words of a request frame: command, payload bytes, up to 6 counts


def _pack(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``parts`` as one byte buffer, in order (what :class:`_Reader` takes apart)."""
    data = [t.detach().contiguous().view(-1).view(torch.uint8) for t in parts if t.numel()]
    return torch.cat(data) if data else torch.empty(0, dtype=torch.uint8)


class _Reader:
    """Typed slices of one received payload, in the order they were packed."""

    def __init__(self, buf: torch.Tensor) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int, dtype: torch.dtype, row=()) -> torch.Tensor:
        width = math.prod(row) if row else 1
        nbytes = n * width * dtype.itemsize
        part = self.buf[self.pos : self.pos + nbytes]
        if part.numel() != nbytes:
            raise EsdRemoteError(f"a payload of {self.buf.numel()} bytes is shorter than its counts say")
        self.pos += nbytes
        # clone: a typed view needs an aligned start
        return part.clone().view(dtype).view((n,) + tuple(row))

    def done(self) -> None:
        if self.pos != self.buf.numel():
            raise EsdRemoteError(f"a payload of {self.buf.numel()} bytes is longer than its counts say")


class _Wire:
    """Point-to-point messages of the ESD protocol between workers and PS
    ranks, on the all-ranks gloo group (every wait has the job's timeout).

    A worker talks to a PS with a *request* (a fixed frame: command, payload
    bytes, counts; then the payload, all tensors packed as bytes) and, where
    the phase has one, gets a *reply* whose size both sides derive from the
    counts.  Workers never exchange messages with each other here, and a PS
    hears from every worker each phase (which checks that they agree on it).
    """

    def __init__(self, group, world_size: int, ps_ranks: Sequence[int], timeout_s: float = 120.0) -> None:
        self.group = group
        self.ps_ranks = list(ps_ranks)
        self.worker_ranks = [r for r in range(world_size) if r not in self.ps_ranks]
        self.timeout = timedelta(seconds=timeout_s)
        # sends of a request that expects no reply (gradients): waited for at the
        # next request, so that the worker goes on while the PS still collects
        self._unsent: List = []

    def _wait(self, works) -> None:
        for w in works:
            w.wait(self.timeout)

    # ---- worker side
    def request(
        self,
        cmd: int,
        counts: Sequence[Sequence[int]],
        parts: Sequence[Sequence[torch.Tensor]],
        reply_bytes: Optional[Sequence[int]] = None,
        wait: bool = True,
    ) -> List[torch.Tensor]:
        """Send every PS ``i`` the frame ``(cmd, counts[i])`` and the payload
        ``parts[i]`` packed; returns the replies (``reply_bytes[i]`` bytes from
        PS ``i``, nothing where 0).  With ``wait=False`` (a request without
        reply) it returns before its sends complete; they complete, in order,
        before the next request's, and an error surfaces there."""
        self._wait(self._unsent)
        self._unsent = []
        works, replies = [], []
        for i, dst in enumerate(self.ps_ranks):
            data = _pack(parts[i])
            frame = torch.zeros(FRAME, dtype=torch.int64)
            frame[0], frame[1] = cmd, data.numel()
            frame[2 : 2 + len(counts[i])] = torch.as_tensor(list(counts[i]), dtype=torch.int64)
            works.append(dist.isend(frame, dst, group=self.group))
            if data.numel():
                works.append(dist.isend(data, dst, group=self.group))
        for i, src in enumerate(self.ps_ranks):
            n = int(reply_bytes[i]) if reply_bytes is not None else 0
            buf = torch.empty(n, dtype=torch.uint8)
            if n:
                works.append(dist.irecv(buf, src, group=self.group))
            replies.append(buf)
        if not wait and reply_bytes is None:
            self._unsent = works
        else:
            self._wait(works)
        return replies

    # ---- PS side
    def receive(self) -> Tuple[int, torch.Tensor, List[torch.Tensor]]:
        """(command, counts ``[workers, 6]``, payload of each worker) of the
        next request; raises if the workers are not in the same phase."""
        frames = [torch.empty(FRAME, dtype=torch.int64) for _ in self.worker_ranks]
        pending = [dist.irecv(f, src, group=self.group) for f, src in zip(frames, self.worker_ranks)]
        payloads, works = [], []
        for f, src, work in zip(frames, self.worker_ranks, pending):
            work.wait(self.timeout)  # each payload is taken as soon as its frame is in
            buf = torch.empty(int(f[1]), dtype=torch.uint8)
            if buf.numel():
                works.append(dist.irecv(buf, src, group=self.group))
            payloads.append(buf)
        self._wait(works)
        cmds = [int(f[0]) for f in frames]
        if len(set(cmds)) != 1 and ABORT not in cmds:
            raise EsdRemoteError(f"the workers are in different protocol phases (commands {cmds})")
        cmd = ABORT if ABORT in cmds else cmds[0]
        return cmd, torch.stack(frames)[:, 2:], payloads

    def reply(self, parts: Sequence[Sequence[torch.Tensor]]) -> None:
        """Send worker ``r`` the tensors ``parts[r]`` packed (nothing if empty)."""
        works = []
        for r, dst in enumerate(self.worker_ranks):
            data = _pack(parts[r])
            if data.numel():
                works.append(dist.isend(data, dst, group=self.group))
        self._wait(works)


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
            cmd, counts, payloads = self.wire.receive()
            if cmd == PHASE_PUSH_PULL:
                self._push_pull(counts, payloads)
            elif cmd == PHASE_GRADS:
                self._grads(counts, payloads)
                self.iterations += 1
            elif cmd == GATHER:
                self._gather()
            elif cmd == STOP:
                return
            elif cmd == ABORT:
                # every worker sends the message; the first non-empty one is raised
                msg = next((bytes(p.tolist()).decode(errors="replace") for p in payloads if p.numel()), "")
                raise EsdRemoteError(f"ESD job aborted by the workers: {msg}")
            else:
                raise EsdRemoteError(f"parameter server got unknown command {cmd}")

    def _push_pull(self, counts: torch.Tensor, payloads: List[torch.Tensor]) -> None:
        """counts per worker: (pushes, pulls, DES pairs, DES bags, pair weights
        sent?); payload: push keys, pull keys, packed DES pairs (int64), pushed
        rows (value + state), pair weights.  Reply: pulled rows, then (DES) one
        partial sum per bag."""
        row, dim = self.routing.dim + self.optimizer.state_dim, self.routing.dim
        if self._des_pending is not None and sum(self._des_pending[3]):
            raise EsdRemoteError(
                f"PS {self.ps_index}: a new push/pull phase began before the gradients of the "
                "previous DES partial sums arrived (their updates would be lost)"
            )
        push_keys, push_vals, pull_keys, des_keys, des_bags, des_w = [], [], [], [], [], []
        bag_base, bags_per_sender = 0, []
        for r, buf in enumerate(payloads):
            a, b, c, nb, weighted = (int(x) for x in counts[r, :5])
            if not self.des and (c or nb):
                raise EsdRemoteError(f"PS {self.ps_index}: rank {r} sent a DES request to a PS without DES")
            rd = _Reader(buf)
            keys = rd.take(a + b + c, torch.int64)
            push_keys.append(keys[:a])
            pull_keys.append(keys[a : a + b])
            push_vals.append(rd.take(a, torch.float32, (row,)))
            if self.des:
                packed = keys[a + b :]
                if c and (nb <= 0 or int(packed.min()) < 0):
                    raise EsdRemoteError(f"PS {self.ps_index}: rank {r} sent a malformed DES request")
                des_keys.append(packed // max(nb, 1))
                des_bags.append(packed % max(nb, 1) + bag_base)
                des_w.append(rd.take(c, torch.float32) if weighted else torch.ones(c))
                bag_base += nb
                bags_per_sender.append(nb)
            rd.done()
        pk = torch.cat(push_keys)
        if pk.numel():
            local = self._local(pk)
            vals = torch.cat(push_vals)
            self.weights[local] = vals[:, :dim]
            self.state[local] = vals[:, dim:]
        local = self._local(torch.cat(pull_keys))
        pulled = torch.cat([self.weights[local], self.state[local]], dim=1)
        replies = [[rows] for rows in torch.split(pulled, [q.numel() for q in pull_keys])]
        if self.des:
            # pooled partial sums, after the pushes above are stored
            dl = self._local(torch.cat(des_keys))
            db = torch.cat(des_bags)
            pair_w = torch.cat(des_w)
            partial = torch.zeros(bag_base, dim).index_add_(0, db, self.weights[dl] * pair_w.view(-1, 1))
            for r, part in enumerate(torch.split(partial, bags_per_sender)):
                replies[r].append(part)
            self._des_pending = (dl, db, pair_w, bags_per_sender)
        self.wire.reply(replies)

    def _grads(self, counts: torch.Tensor, payloads: List[torch.Tensor]) -> None:
        """counts per worker: (rows, DES bags); payload: row keys, row
        gradients, bag gradients.  No reply."""
        dim = self.routing.dim
        keys, grads, bag_grads = [], [], []
        for r, buf in enumerate(payloads):
            n, nb = int(counts[r, 0]), int(counts[r, 1])
            rd = _Reader(buf)
            keys.append(rd.take(n, torch.int64))
            grads.append(rd.take(n, torch.float32, (dim,)))
            bag_grads.append(rd.take(nb, torch.float32, (dim,)))
            rd.done()
        local = self._local(torch.cat(keys))
        grads = torch.cat(grads)
        n_bags = counts[:, 1].tolist()
        if self.des:
            dl, db, pair_w, expected = self._des_pending or (None, None, None, [0] * len(payloads))
            if n_bags != expected:
                raise EsdRemoteError(
                    f"PS {self.ps_index}: DES bag gradients per rank {n_bags} do not match the bags "
                    f"served in the forward {expected}"
                )
            self._des_pending = None
            if dl is not None and dl.numel():
                # d(sum_i w_i row_i)/d row_i = w_i: each pair's row gets w_i x its bag's gradient
                local = torch.cat([local, dl])
                grads = torch.cat([grads, torch.cat(bag_grads)[db] * pair_w.view(-1, 1)])
        elif any(n_bags):
            raise EsdRemoteError(f"PS {self.ps_index}: DES bag gradients sent to a PS without DES")
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
        self, routing: RowRouting, optimizer: SparseOptimizer, wire: _Wire, des: bool = False
    ) -> None:
        self.routing = routing
        self.optimizer = optimizer
        self.wire = wire
        self.des = des

    def _by_ps(self, keys: torch.Tensor):
        p, _ = self.routing.locate(keys)
        order = torch.argsort(p, stable=True)
        per = torch.bincount(p, minlength=self.routing.num_ps)
        return order, per

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
        route that :meth:`push_grads` needs for the bags' gradients.  One
        request to and one reply from each PS."""
        row, dim = self.routing.dim + self.optimizer.state_dim, self.routing.dim
        if des is not None and not self.des:
            raise EsdConfigError("a DES request on a PS client built without des_misses")
        po, pper = self._by_ps(push_keys)
        qo, qper = self._by_ps(pull_keys)
        route: Optional[DesRoute] = None
        if self.des:
            route = DesRoute.build(self.routing, des if des is not None else DesRequest.empty())
        pk = torch.split(push_keys[po], pper.tolist())
        pv = torch.split(push_vals[po].to(torch.float32), pper.tolist())
        qk = torch.split(pull_keys[qo], qper.tolist())
        counts, parts, reply = [], [], []
        for i in range(self.routing.num_ps):
            a, b = int(pper[i]), int(qper[i])
            if route is None:
                counts.append((a, b))
                parts.append([pk[i], qk[i], pv[i]])
                reply.append(b * row * 4)
            else:
                c, nb, wt = int(route.pairs_per_ps[i]), int(route.bags_per_ps[i]), route.weighted[i]
                counts.append((a, b, c, nb, int(wt)))
                parts.append([pk[i], qk[i], route.packed[i], pv[i]] + ([route.weights[i]] if wt else []))
                reply.append((b * row + nb * dim) * 4)
        got = self.wire.request(PHASE_PUSH_PULL, counts, parts, reply)
        rows, partial_parts = [], []
        for i, buf in enumerate(got):
            rd = _Reader(buf)
            rows.append(rd.take(int(qper[i]), torch.float32, (row,)))
            if route is not None:
                partial_parts.append(rd.take(int(route.bags_per_ps[i]), torch.float32, (dim,)))
            rd.done()
        out = torch.empty(pull_keys.numel(), row)
        out[qo] = torch.cat(rows)
        partial = torch.empty(0, dim)
        if route is not None:
            # every PS summed the rows it owns; the bag's partial sum is the sum over PS
            partial = torch.zeros(route.num_bags, dim).index_add_(
                0, torch.cat(route.ps_bags), torch.cat(partial_parts)
            )
        return out, partial, route

    def push_grads(
        self, keys: torch.Tensor, grads: torch.Tensor, des_route: Optional["DesRoute"] = None,
        des_grads: Optional[torch.Tensor] = None,
    ) -> None:
        """Send row gradients ``grads`` [n, D] of ``keys`` and (with DES) the
        gradients ``des_grads`` [num_bags, D] of the bags served in the forward
        (one request to each PS, no reply)."""
        dim = self.routing.dim
        order, per = self._by_ps(keys)
        if self.des and des_route is None:
            des_route = DesRoute.build(self.routing, DesRequest.empty())
        send_bags: List[torch.Tensor] = [torch.empty(0, dim)] * self.routing.num_ps
        if self.des:
            if des_grads is None:
                des_grads = torch.zeros(des_route.num_bags, dim)
            if tuple(des_grads.shape) != (des_route.num_bags, dim):
                raise EsdConfigError(
                    f"DES bag gradients of shape {tuple(des_grads.shape)}, expected ({des_route.num_bags}, {dim})"
                )
            send_bags = [des_grads[b] for b in des_route.ps_bags]
        ks = torch.split(keys[order], per.tolist())
        gs = torch.split(grads[order].to(torch.float32), per.tolist())
        counts = [(int(per[i]), int(send_bags[i].shape[0])) for i in range(self.routing.num_ps)]
        parts = [[ks[i], gs[i], send_bags[i]] for i in range(self.routing.num_ps)]
        self.wire.request(PHASE_GRADS, counts, parts, wait=False)  # the worker goes on meanwhile

    def gather_tables(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Full tables and optimizer states, assembled from all PS ranks."""
        self._command(GATHER)
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

    def _command(self, cmd: int, payload: Optional[torch.Tensor] = None) -> None:
        n = self.routing.num_ps
        self.wire.request(cmd, [()] * n, [[payload] if payload is not None else []] * n)

    def stop(self) -> None:
        self._command(STOP)

    def abort(self, msg: str) -> None:
        """Make the PS ranks fail with ``msg``.  Every worker calls it (it is a
        collective); the message of worker 0 is the one the PS ranks raise."""
        self._command(ABORT, torch.tensor(list(msg.encode()[:4096]), dtype=torch.uint8))

