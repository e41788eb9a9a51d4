"""Seeded synthetic DLRM workload: Criteo-shaped batches with Zipf-skewed ids.

Every batch is a function of ``(seed, step)`` only, so that every rank (and
every method of a side-by-side benchmark) sees exactly the same global batches.
Batches are TorchRec :class:`~torchrec.datasets.utils.Batch` objects whose
``sparse_features`` is a :class:`KeyedJaggedTensor` (one key per sparse
feature, feature-major values as TorchRec expects).

Ids of feature ``f`` follow a Zipf law truncated to the feature's cardinality
``N_f``: rank ``k`` (1-based) is drawn with probability ``∝ k^-alpha``, then
mapped to an id by a fixed per-feature bijection of ``[0, N_f)`` so that hot
ids are scattered over the table like in real data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd.batch_select import select_kjt_samples, select_samples
from torchrec_esd.config import EsdConfigError

# select_samples / select_kjt_samples live in torchrec_esd.batch_select and are
# re-exported here, where callers have imported them from
__all__ = [
    "CRITEO_KAGGLE_CARDINALITIES",
    "SyntheticWorkload",
    "SyntheticWorkloadConfig",
    "access_share_of_top",
    "feature_table_configs",
    "resolve_cardinalities",
    "select_kjt_samples",
    "select_samples",
    "slice_batch",
]

# Cardinalities of the 26 categorical features of the Criteo Kaggle display-ads
# data set; ``max_cardinality`` caps them to keep tables trainable on a laptop.
CRITEO_KAGGLE_CARDINALITIES: Tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593,
    3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105,
    142572,
)


def resolve_cardinalities(
    cardinalities: Optional[Sequence[int]], num_sparse: int, max_cardinality: int
) -> Tuple[int, ...]:
    """Rows of each sparse feature's table: ``cardinalities`` checked (one
    positive int per feature), or by default Criteo Kaggle's capped at
    ``max_cardinality``; raises :class:`EsdConfigError` otherwise."""
    if cardinalities is None:
        base = CRITEO_KAGGLE_CARDINALITIES
        return tuple(min(base[i % len(base)], max_cardinality) for i in range(num_sparse))
    cardinalities = tuple(cardinalities)
    if len(cardinalities) != num_sparse:
        raise EsdConfigError(f"{len(cardinalities)} cardinalities given for {num_sparse} sparse features")
    for i, c in enumerate(cardinalities):
        if not (isinstance(c, int) and c > 0):
            raise EsdConfigError(f"cardinality of feature {i} must be a positive int, got {c!r}")
    return cardinalities


@dataclass
class SyntheticWorkloadConfig:
    """Shape and skew of the synthetic workload.

    Args:
        num_dense: dense features per sample (Criteo: 13).
        num_sparse: sparse (categorical) features per sample (Criteo: 26).
        cardinalities: rows of each feature's table; default Criteo Kaggle's,
            capped at ``max_cardinality``.
        max_cardinality: cap applied to the default cardinalities.
        alpha: Zipf exponent (> 0; 1.05-1.2 is Criteo-like).
        bag_size: ids per sample per feature, ``(min, max)`` inclusive;
            ``(1, 1)`` is one-hot (Criteo), e.g. ``(10, 50)`` multi-hot.
        seed: seeds everything.
    """

    num_dense: int = 13
    num_sparse: int = 26
    cardinalities: Optional[Sequence[int]] = None
    max_cardinality: int = 100_000
    alpha: float = 1.05
    bag_size: Tuple[int, int] = (1, 1)
    seed: int = 0
    feature_prefix: str = "cat_"

    def __post_init__(self) -> None:
        def req(cond: bool, msg: str) -> None:
            if not cond:
                raise EsdConfigError(msg)

        req(
            isinstance(self.num_dense, int) and self.num_dense >= 0,
            f"num_dense must be an int >= 0, got {self.num_dense!r}",
        )
        req(
            isinstance(self.num_sparse, int) and self.num_sparse > 0,
            f"num_sparse must be an int > 0 (zero sparse features leaves nothing"
            f" to dispatch), got {self.num_sparse!r}",
        )
        req(
            isinstance(self.max_cardinality, int) and self.max_cardinality > 0,
            f"max_cardinality must be a positive int, got {self.max_cardinality!r}",
        )
        req(
            isinstance(self.alpha, (int, float))
            and math.isfinite(self.alpha)
            and self.alpha > 0,
            f"alpha must be > 0, got {self.alpha!r}",
        )
        lo, hi = self.bag_size
        req(
            isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi and hi > 0,
            f"bag_size must be (min, max) with 0 <= min <= max and max > 0, got {self.bag_size!r}",
        )
        self.cardinalities = resolve_cardinalities(self.cardinalities, self.num_sparse, self.max_cardinality)

    @property
    def feature_names(self) -> List[str]:
        return [f"{self.feature_prefix}{i}" for i in range(self.num_sparse)]


def _zipf_cdf(n: int, alpha: float) -> torch.Tensor:
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    pmf = ranks.pow(-alpha)
    cdf = torch.cumsum(pmf, 0)
    return cdf / cdf[-1]


def _coprime_multiplier(n: int, gen: torch.Generator) -> int:
    if n <= 2:
        return 1
    while True:
        a = int(torch.randint(1, n, (1,), generator=gen))
        if math.gcd(a, n) == 1:
            return a


def feature_table_configs(
    feature_names: Sequence[str], cardinalities: Sequence[int], embedding_dim: int,
    pooling: PoolingType = PoolingType.SUM,
) -> List[EmbeddingBagConfig]:
    """One table per sparse feature, named ``t_<feature>`` (every workload's layout)."""
    if embedding_dim <= 0:
        raise EsdConfigError(f"embedding_dim must be > 0, got {embedding_dim}")
    return [
        EmbeddingBagConfig(
            name=f"t_{f}", embedding_dim=embedding_dim, num_embeddings=n, feature_names=[f], pooling=pooling
        )
        for f, n in zip(feature_names, cardinalities)
    ]


class SyntheticWorkload:
    """Generates global batches ``step -> Batch`` deterministically."""

    def __init__(self, config: Optional[SyntheticWorkloadConfig] = None) -> None:
        self.config = config or SyntheticWorkloadConfig()
        c = self.config
        gen = torch.Generator().manual_seed(c.seed)
        self._cdfs: List[torch.Tensor] = [_zipf_cdf(n, c.alpha) for n in c.cardinalities]
        # bijection rank -> id per feature: id = (a * rank + b) mod n
        self._perm: List[Tuple[int, int]] = [
            (_coprime_multiplier(n, gen), int(torch.randint(0, n, (1,), generator=gen)))
            for n in c.cardinalities
        ]
        # hidden logistic model that generates the labels (so training can learn)
        self._dense_w = torch.randn(c.num_dense, generator=gen, dtype=torch.float64) * 0.5
        self._id_effect_salt = [
            int(torch.randint(1, 2**31 - 1, (1,), generator=gen)) for _ in range(c.num_sparse)
        ]
        # per-feature constants as tensors, for the vectorised batch (global_batch, make_batch)
        self._salt_t = torch.tensor(self._id_effect_salt, dtype=torch.int64)
        self._id_map_t = torch.tensor([[a, b, n] for (a, b), n in zip(self._perm, c.cardinalities)],
                                      dtype=torch.int64).view(-1, 3)

    # ------------------------------------------------------------------ tables
    def table_configs(
        self, embedding_dim: int, pooling: PoolingType = PoolingType.SUM
    ) -> List[EmbeddingBagConfig]:
        """One table per sparse feature, named ``t_<feature>``."""
        return feature_table_configs(self.config.feature_names, self.config.cardinalities, embedding_dim, pooling)

    # ------------------------------------------------------------------ ids
    def sample_ids(self, feature: int, count: int, gen: torch.Generator) -> torch.Tensor:
        """``count`` ids of feature ``feature`` (int64), Zipf distributed."""
        return self._sample_features([feature], torch.tensor([count], dtype=torch.int64), gen)[0]

    def _generator(self, step: int) -> torch.Generator:
        if step < 0:
            raise EsdConfigError(f"step must be >= 0, got {step}")
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + step + 1)

    def global_batch(self, step: int, batch_size: int) -> Batch:
        """The global batch of iteration ``step`` (``batch_size`` samples)."""
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise EsdConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        c = self.config
        gen = self._generator(step)
        lo, hi = c.bag_size
        dense = torch.randn(batch_size, c.num_dense, generator=gen)
        lengths = torch.randint(lo, hi + 1, (c.num_sparse, batch_size), generator=gen)
        return self.make_batch(dense, lengths, self._sample_features(range(c.num_sparse), lengths.sum(1), gen), gen)

    def _sample_features(self, features: Sequence[int], counts: torch.Tensor,
                         gen: torch.Generator) -> List[torch.Tensor]:
        """Zipf ids of ``features`` in turn (``counts[i]`` ids of
        ``features[i]``): the rank of a uniform in the feature's CDF, mapped
        to an id by the feature's bijection.  One draw of the uniforms for
        all (the CPU generator draws them one after the other either way),
        one search per feature, the rank -> id map for all at once: a global
        batch costs ~26 operator calls instead of ~130 feature by feature
        (every rank builds every step's batch, so this is CPU inside every
        measured step)."""
        u = torch.rand(int(counts.sum()), generator=gen, dtype=torch.float64)
        return list(self.zipf_ids(features, counts, u).split(counts.tolist()))

    def zipf_ids(self, features: Sequence[int], counts: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The Zipf ids whose ranks are the inverse CDF of the uniforms ``u``
        (``counts[i]`` of them, in turn, for ``features[i]``): one search per
        feature, the rank -> id bijections for all at once.  (One batched
        search over a padded ``[F, max n]`` CDF table measured slower.)"""
        features = list(features)
        sizes = counts.tolist()
        ranks = torch.cat([torch.searchsorted(self._cdfs[f], part) for f, part in zip(features, u.split(sizes))]
                          or [torch.zeros(0, dtype=torch.int64)])
        # [total, 3]: a, b, n of every id's feature
        abn = self._id_map_t[torch.as_tensor(features, dtype=torch.int64)].repeat_interleave(counts, dim=0)
        a, b, n = abn.unbind(1)
        return (torch.minimum(ranks, n - 1) * a + b) % n

    def make_batch(self, dense: torch.Tensor, lengths: torch.Tensor, values: List[torch.Tensor],
                   gen: torch.Generator) -> Batch:
        """The Batch of the given dense features, per-feature bag ``lengths``
        ``[F, B]`` and per-feature ids, labelled by the hidden logistic model
        (its last draw from ``gen``)."""
        c = self.config
        batch_size = dense.shape[0]
        lo, hi = c.bag_size
        logit = dense.double() @ self._dense_w
        ids = torch.cat(values)
        nf = c.num_sparse
        # per-id effect in [-0.5, 0.5) from a salted multiplicative hash (each feature its salt)
        salt = self._salt_t.repeat_interleave(torch.tensor([v.numel() for v in values], dtype=torch.int64))
        eff = ((ids * 2654435761 + salt) % 1000).double() / 1000 - 0.5
        # every (feature, sample) bag's sum, each summed in its ids' order; added feature by feature
        seg = torch.repeat_interleave(torch.arange(nf * batch_size), lengths.reshape(-1))
        bags = torch.zeros(nf * batch_size, dtype=torch.float64).index_add_(0, seg, eff).view(nf, batch_size)
        for f in range(nf):
            logit += bags[f] / max(1.0, (lo + hi) / 2)
        noise = torch.rand(batch_size, generator=gen, dtype=torch.float64)
        labels = (noise < torch.sigmoid(logit)).float()
        kjt = KeyedJaggedTensor(
            keys=c.feature_names,
            values=ids,
            lengths=lengths.reshape(-1).to(torch.int32),
        )
        return Batch(dense_features=dense, sparse_features=kjt, labels=labels)

    def local_batch(self, step: int, batch_size: int, rank: int, world_size: int) -> Batch:
        """Rank ``rank``'s contiguous slice of the global batch (vanilla TorchRec
        data-parallel loading: every rank reads ``batch_size / world_size``)."""
        if batch_size % world_size != 0:
            raise EsdConfigError(
                f"global batch {batch_size} is not divisible by {world_size} ranks"
            )
        per = batch_size // world_size
        return slice_batch(self.global_batch(step, batch_size), rank * per, (rank + 1) * per)


def slice_batch(batch: Batch, start: int, end: int) -> Batch:
    """Samples ``[start, end)`` of a batch, as a new Batch."""
    return select_samples(batch, torch.arange(start, end))


def access_share_of_top(ids: torch.Tensor, top_fraction: float, num_ids: int) -> float:
    """Share of accesses that go to the ``top_fraction`` most accessed ids out of
    a universe of ``num_ids`` (the skew statistic the tests and planner use)."""
    counts = torch.bincount(ids, minlength=num_ids).sort(descending=True).values
    k = max(1, int(round(top_fraction * num_ids)))
    return float(counts[:k].sum()) / max(1, int(counts.sum()))
