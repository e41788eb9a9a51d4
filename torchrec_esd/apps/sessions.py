"""Seeded session workload: users, interest clusters and sessions of
consecutive samples, beside the iid Zipf workload of :mod:`~torchrec_esd.apps.workload`.

Real recommendation traffic is not iid: a user's consecutive samples share the
user's id and profile, and the items of one session come from a few interests.
:class:`SessionWorkload` generates such batches with the same interface as
:class:`~torchrec_esd.apps.workload.SyntheticWorkload` (``global_batch(step,
B)`` -> TorchRec ``Batch`` with a ``KeyedJaggedTensor``, a function of
``(seed, step)`` only; same tables, dense features and hidden label model).

Model.  A global batch is a run of sessions (the last one cut at the batch
end).  A session belongs to a user drawn uniformly from ``num_users``
persistent users; its length is a log-normal draw, rounded and clipped to
``[min_session, max_session]``.  The first ``num_user_features`` sparse
features are the user side, the others the item side.  Every id of every
sample is, independently, with probability ``1 - locality`` the iid Zipf draw
of the iid workload, and with probability ``locality``:

* user side: the user's own value of the feature (a fixed Zipf draw per user,
  feature and bag position: persistent over batches);
* item side: one of the ``cluster_items`` ids of the user's interest cluster
  (user ``u`` belongs to cluster ``hash(u) mod num_clusters``; a cluster's ids
  of a feature are fixed Zipf draws), uniformly: a session revisits the items
  of its interest, which gives the within-session repeat rate
  (:func:`session_repeat_rate`).

Each local id is itself a draw from the feature's Zipf law, so an id's
marginal probability stays the iid workload's Zipf law (in expectation over the
users' and clusters' draws): item popularity is unchanged, only which
samples share ids changes.  ``locality=0`` generates exactly the iid
workload's batches.

Default parameters and where they come from:

* session length: OTTO session data set (Otto webshop and app logs, 12.9 M
  sessions, 216.7 M events, 1.86 M items; published statistics: events per
  session mean 16.80, median 6, minimum 2, maximum 500, github.com/otto-de/recsys-dataset):
  ``session_median=6``, ``session_mean=16.8`` (log-normal with that median and
  mean: ``sigma = sqrt(2 ln(mean / median))``), clipped to ``[2, 500]``;
  YOOCHOOSE (RecSys Challenge 2015) describes sessions of "one click or
  hundreds of clicks" in the same range.
* users: Taobao UserBehavior (Tianchi, about 1 million users' ~100 M
  click / cart / favourite / purchase events, 25 Nov - 3 Dec 2017):
  ``num_users=1_000_000``.
* ``num_user_features=13`` of Criteo's 26 anonymous features,
  ``num_clusters=1000`` and ``cluster_items=50`` are modelling choices (Criteo
  does not say which features are user side; no published statistic fixes the
  size of an interest), and ``locality=1.0``: set ``locality`` lower to mix in
  iid traffic.  None of them was tuned for a dispatcher's benefit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torchrec.datasets.utils import Batch

from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig
from torchrec_esd.config import EsdConfigError

__all__ = ["SessionWorkload", "SessionWorkloadConfig", "session_repeat_rate", "WORKLOADS", "make_workload_config"]

_P = 2_147_483_647  # 2^31 - 1, prime: hashes below stay in int64


@dataclass
class SessionWorkloadConfig(SyntheticWorkloadConfig):
    """:class:`SyntheticWorkloadConfig` plus the session model (see the module
    docstring for the defaults' sources)."""

    locality: float = 1.0
    num_users: int = 1_000_000
    num_user_features: int = 13
    session_median: float = 6.0
    session_mean: float = 16.8
    min_session: int = 2
    max_session: int = 500
    num_clusters: int = 1000
    cluster_items: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()

        def req(cond: bool, msg: str) -> None:
            if not cond:
                raise EsdConfigError(msg)

        req(isinstance(self.locality, (int, float)) and 0.0 <= self.locality <= 1.0,
            f"locality must be in [0, 1], got {self.locality!r}")
        for name in ("num_users", "num_clusters", "cluster_items", "min_session", "max_session"):
            v = getattr(self, name)
            req(isinstance(v, int) and v > 0, f"{name} must be a positive int, got {v!r}")
        req(isinstance(self.num_user_features, int) and 0 <= self.num_user_features <= self.num_sparse,
            f"num_user_features must be an int in [0, {self.num_sparse}], got {self.num_user_features!r}")
        req(self.min_session <= self.max_session,
            f"min_session {self.min_session} > max_session {self.max_session}")
        req(self.session_median > 0 and self.session_mean >= self.session_median,
            f"need 0 < session_median <= session_mean, got {self.session_median}, {self.session_mean}")

    @property
    def session_sigma(self) -> float:
        return math.sqrt(2.0 * math.log(self.session_mean / self.session_median))

    def make_workload(self) -> "SessionWorkload":
        return SessionWorkload(self)


def _hash(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """``(a x + b) mod p`` twice (``x`` int64 in ``[0, p)``): a seeded mixing
    of ``x`` into ``[0, p)``."""
    h = (x % _P * a + b) % _P
    return (h * 48271 + a) % _P


class SessionWorkload(SyntheticWorkload):
    """Global batches of sessions (see the module docstring)."""

    def __init__(self, config: Optional[SessionWorkloadConfig] = None) -> None:
        config = config or SessionWorkloadConfig()
        if not isinstance(config, SessionWorkloadConfig):
            raise EsdConfigError(f"SessionWorkload needs a SessionWorkloadConfig, got {type(config).__name__}")
        super().__init__(config)
        gen = torch.Generator().manual_seed(config.seed * 7919 + 17)
        # per feature: salts of the user-profile and cluster-member hashes
        self._salt = torch.randint(1, _P - 1, (config.num_sparse, 4), generator=gen).tolist()
        self._user_salt = int(torch.randint(1, _P - 1, (1,), generator=gen))

    # ------------------------------------------------------------ sessions
    def session_lengths(self, count: int, gen: torch.Generator) -> torch.Tensor:
        """``count`` session lengths (int64): log-normal, rounded, clipped."""
        c = self.config
        z = torch.randn(count, generator=gen, dtype=torch.float64)
        raw = torch.exp(math.log(c.session_median) + c.session_sigma * z)
        return raw.round().clamp_(c.min_session, c.max_session).to(torch.int64)

    def sessions(self, step: int, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(session_of [B], user_of_session [S])`` of the global batch of
        ``step``: the session of every sample (consecutive samples, the last
        session cut at the batch end) and the user of every session."""
        gen = self._session_generator(step)
        lengths = self.session_lengths(batch_size, gen)  # more than enough: every length >= 1
        ends = torch.cumsum(lengths, 0)
        n = int(torch.searchsorted(ends, torch.tensor([batch_size])).item()) + 1
        session_of = torch.repeat_interleave(torch.arange(n), lengths[:n])[:batch_size]
        users = torch.randint(0, self.config.num_users, (n,), generator=gen)
        return session_of, users

    def _session_generator(self, step: int) -> torch.Generator:
        if step < 0:
            raise EsdConfigError(f"step must be >= 0, got {step}")
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + step + 1 + (1 << 40))

    def zipf_ids_from_uniform(self, feature: int, u: torch.Tensor) -> torch.Tensor:
        """Ids of ``feature`` whose Zipf ranks are the inverse CDF of ``u`` in [0, 1)."""
        return self.zipf_ids([feature], torch.tensor([u.numel()], dtype=torch.int64), u)

    def local_ids(self, feature: int, users: torch.Tensor, position: torch.Tensor,
                  member: torch.Tensor) -> torch.Tensor:
        """The local id of ``feature`` for samples of ``users`` at bag
        ``position``: the user's own value (user side) or cluster member
        ``member`` of the user's cluster (item side)."""
        c = self.config
        s0, s1, s2, s3 = self._salt[feature]
        if feature < c.num_user_features:
            key = users * 64 + position
            h = _hash(key, s0, s1)
        else:
            cluster = _hash(users, self._user_salt, 12345) % c.num_clusters
            key = cluster * c.cluster_items + member
            h = _hash(key, s2, s3)
        return self.zipf_ids_from_uniform(feature, (h.double() + 0.5) / _P)

    # ------------------------------------------------------------ batches
    def global_batch(self, step: int, batch_size: int) -> Batch:
        """The global batch of ``step``: every id the iid Zipf draw or, with
        probability ``locality``, its sample's user-profile or cluster id.

        Vectorised over the features (every rank builds every step's global
        batch, so this runs inside every measured step): the per-feature
        random draws keep their order on both generators (the iid uniforms of
        every feature from ``gen`` in one draw, as :meth:`_sample_features`
        does; the locality and member draws from ``sgen``, feature by
        feature), the hashes and the rank -> id maps run once over all the
        ids, and only the CDF searches stay per feature.  The same batches as
        the feature-by-feature loop (``tests/test_sessions.py`` compares
        them bit for bit)."""
        c = self.config
        if c.locality == 0:  # exactly the iid workload
            return super().global_batch(step, batch_size)
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise EsdConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        gen = self._generator(step)
        lo, hi = c.bag_size
        dense = torch.randn(batch_size, c.num_dense, generator=gen)
        lengths = torch.randint(lo, hi + 1, (c.num_sparse, batch_size), generator=gen)
        session_of, users = self.sessions(step, batch_size)
        sgen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step + 1 + (2 << 40))
        sample_user = users[session_of]
        counts = lengths.sum(1)
        sizes = counts.tolist()
        # the iid ids' uniforms (what _sample_features draws from gen), then per feature
        # which ids are local and their cluster member (from sgen)
        u_iid = torch.rand(int(counts.sum()), generator=gen, dtype=torch.float64)
        draws = [(torch.rand(n, generator=sgen, dtype=torch.float64) < c.locality,
                  torch.randint(0, c.cluster_items, (n,), generator=sgen)) for n in sizes]
        local = torch.cat([d[0] for d in draws])
        member = torch.cat([d[1] for d in draws])
        # every id's (feature, sample) bag and its position in the bag; ids are
        # feature-major, so the user-side features' ids come first
        flat = lengths.reshape(-1)
        bag = torch.repeat_interleave(torch.arange(flat.numel()), flat)
        position = torch.arange(bag.numel()) - (torch.cumsum(flat, 0) - flat)[bag]
        feature = bag // batch_size
        user = sample_user[bag % batch_size]
        salt = torch.tensor(self._salt, dtype=torch.int64)[feature]  # [N, 4]
        nu = sum(sizes[:c.num_user_features])
        cluster = _hash(user[nu:], self._user_salt, 12345) % c.num_clusters
        h = torch.cat([_hash(user[:nu] * 64 + position[:nu], salt[:nu, 0], salt[:nu, 1]),
                       _hash(cluster * c.cluster_items + member[nu:], salt[nu:, 2], salt[nu:, 3])])
        # a local id is the Zipf id whose uniform is its hash: one CDF search per
        # feature for the local and the iid ids together, one rank -> id map
        u = torch.where(local, (h.double() + 0.5) / _P, u_iid)
        ids = self.zipf_ids(range(c.num_sparse), counts, u)
        return self.make_batch(dense, lengths, list(ids.split(sizes)), gen)


def session_repeat_rate(ids: torch.Tensor, session_of: torch.Tensor) -> float:
    """Share of the samples whose id (one-hot feature: ``ids[s]``) already
    occurred earlier in the same session."""
    if ids.numel() != session_of.numel():
        raise EsdConfigError("session_repeat_rate needs one id per sample (a one-hot feature)")
    key = session_of.to(torch.int64) * (int(ids.max()) + 1) + ids.to(torch.int64)
    seen = set()
    rep = 0
    for k in key.tolist():
        rep += k in seen
        seen.add(k)
    return rep / max(1, key.numel())


WORKLOADS = ("iid", "sessions")


def make_workload_config(kind: str, **kw) -> SyntheticWorkloadConfig:
    """The config of workload ``kind`` (``"iid"``: :class:`SyntheticWorkloadConfig`,
    ``"sessions"``: :class:`SessionWorkloadConfig`); ``kw`` go to it."""
    if kind == "iid":
        return SyntheticWorkloadConfig(**kw)
    if kind == "sessions":
        return SessionWorkloadConfig(**kw)
    raise EsdConfigError(f"unknown workload {kind!r}; choose one of {WORKLOADS}")


def make_workload(config: SyntheticWorkloadConfig) -> SyntheticWorkload:
    """The workload a config describes (its ``make_workload()`` if it has one)."""
    make = getattr(config, "make_workload", None)
    return make() if make is not None else SyntheticWorkload(config)
