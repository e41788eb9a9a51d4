"""Lazy parameter-server rows: created on first touch from a deterministic
per-(table, row) initialiser, so memory follows the rows touched, and a
vanilla model can be given the very same initial tables."""

import threading

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_esd.config import EsdConfig, EsdConfigError, WorkerSpec
from torchrec_esd.cache import CacheDirectory
from torchrec_esd.layout import KeySpace
from torchrec_esd.ps import ParameterServer, PsClient, SparseOptimizer
from torchrec_esd.ps.row_storage import DenseRowStorage, HashedUniformInit, LazyRowStorage

from test_ps_transport import QueueTransport, _Hub


def _tables(rows, dims):
    return [EmbeddingBagConfig(name=f"t{i}", embedding_dim=d, num_embeddings=n, feature_names=[f"f{i}"])
            for i, (n, d) in enumerate(zip(rows, dims))]


def test_hashed_init_is_deterministic_order_free_and_bounded():
    tables = _tables([1000, 50], [8, 4])
    init = HashedUniformInit(tables, seed=3)
    ids = torch.tensor([5, 999, 0, 5])
    a = init.rows_of(0, ids)
    assert a.shape == (4, 8) and a.dtype == torch.float32
    assert torch.equal(a[0], a[3]) and not torch.equal(a[0], a[1])
    assert torch.equal(init.rows_of(0, ids.flip(0)), a.flip(0))  # a row's values do not depend on the others
    assert torch.equal(init.table_weights("t0")[ids], a)
    assert float(a.abs().max()) <= (1 / 1000) ** 0.5
    other = HashedUniformInit(tables, seed=4)
    assert not torch.equal(other.rows_of(0, ids), a)
    assert not torch.equal(init.rows_of(1, torch.tensor([5]))[0], a[0, :4])
    w = init.table_weights("t1")  # near uniform: mean ~0, spread ~ bound / sqrt(3)
    b = (1 / 50) ** 0.5
    assert abs(float(w.mean())) < 0.1 * b and abs(float(w.std()) - b / 3 ** 0.5) < 0.1 * b
    with pytest.raises(EsdConfigError, match="outside"):
        init.rows_of(1, torch.tensor([50]))


@pytest.mark.parametrize("num_ps", [1, 3])
def test_lazy_storage_reads_and_writes_like_a_dense_one(num_ps):
    """Mixed dims, tables split over PS (one PS may own no rows of a table):
    the same random reads and writes give the same rows; memory follows touches."""
    tables = _tables([40, 2, 300], [4, 2, 4])
    ks = KeySpace(tables, num_ps, state_dim=1)
    init = HashedUniformInit(tables, seed=1)
    full = {t.name: init.table_weights(t.name) for t in tables}
    g = torch.Generator().manual_seed(0)
    for p in range(num_ps):
        dense = DenseRowStorage(ks, p, 1, full)
        lazy = LazyRowStorage(ks, p, 1, init)
        n = dense.num_rows
        touched = set()
        for step in range(40):
            loc = torch.randint(0, n, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g)
            touched |= set(loc.tolist())
            assert torch.equal(lazy.rows(loc), dense.rows(loc)) and torch.equal(lazy.state(loc), dense.state(loc))
            if step % 3 == 0:
                u = torch.unique(loc)
                w, s = torch.randn(u.numel(), ks.wire_dim, generator=g), torch.rand(u.numel(), 1, generator=g)
                dense.write(u, w, s)
                lazy.write(u, w, s)
            assert lazy.touched().tolist() == sorted(touched)
        assert all(torch.equal(a, b) for a, b in zip(lazy.full(), dense.full()))
        assert torch.equal(lazy.table_of(torch.arange(n)), dense.table_of(torch.arange(n)))
        every = torch.arange(n)
        assert torch.equal(lazy.row_dims(every), ks.dims[lazy.table_of(every)])
        assert lazy.touched().tolist() == sorted(touched)  # full() touched nothing


def test_training_a_2_31_row_table_keeps_worker_and_ps_memory_bounded_by_touched_rows():
    """A 2^31-row table (ids hashed over all of it) trained through the real
    PS protocol: the PS stores only touched rows, a worker's cache directory
    only its cache, and the PS rows follow exact SGD from the hashed
    initialiser (checked against a dict-of-rows model of the same steps)."""
    rows = 1 << 31
    tables = _tables([rows, 1000], [8, 8])
    ks = KeySpace(tables, 2, state_dim=0)
    opt = SparseOptimizer("sgd", lr=0.5)
    init = HashedUniformInit(tables, seed=7)
    hub = _Hub()
    workers, ps = [0, 1], [2, 3]
    tr = {r: QueueTransport(hub, r, ps, workers) for r in workers + ps}
    servers = [ParameterServer(i, ks, opt, tr[r], storage=LazyRowStorage(ks, i, 0, init)) for i, r in enumerate(ps)]
    directory = CacheDirectory(EsdConfig([WorkerSpec(64, 1.0), WorkerSpec(64, 1.0)]), tables, track=[0], keyspace=ks)
    g = torch.Generator().manual_seed(1)
    steps = [[(torch.randint(0, rows, (20,), generator=g) * 1).unique(), torch.randn(1, 8, generator=g)]
             for _ in range(6)]
    steps = [(torch.cat([k, torch.tensor([rows + 3])]), gr) for k, gr in steps]  # + row 3 of table t1
    errors = []

    def worker(w, c):
        try:
            for keys, grad in steps:
                got, _, _ = c.push_pull(torch.empty(0, dtype=torch.int64), torch.empty(0, 8), keys)
                c.push_grads(keys, grad.expand(keys.numel(), 8) * (w + 1))
            c.push_pull(torch.empty(0, dtype=torch.int64), torch.empty(0, 8), steps[0][0])
            out[w] = c.push_pull(torch.empty(0, dtype=torch.int64), torch.empty(0, 8), torch.cat([k for k, _ in steps]))[0]
            c.stop()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    out = {}
    threads = [threading.Thread(target=s.serve) for s in servers]
    clients = {w: PsClient(ks, opt, tr[w]) for w in workers}
    threads += [threading.Thread(target=worker, args=(w, clients[w])) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads), errors
    # exact model: each step both workers' gradients (1x and 2x) are summed, SGD once per row
    truth = {}
    for keys, grad in steps:
        for k in keys.tolist():
            t = 1 if k >= rows else 0
            v = truth.get(k, init.rows_of(t, torch.tensor([k - rows * t]))[0].clone())
            truth[k] = v - 0.5 * (grad[0] * 3)
    want = torch.stack([truth[k] for k in torch.cat([k for k, _ in steps]).tolist()])
    assert torch.allclose(out[0], want, atol=1e-6) and torch.equal(out[0], out[1])
    touched = sum(s.storage.touched().numel() for s in servers)
    assert touched == len(truth)
    assert sum(s.storage.nbytes() for s in servers) < 64 * 1024  # not 2^31 * 32 B
    for kjt_step in range(3):  # the worker's directory: O(cache), whatever the table
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        ids = torch.randint(0, rows, (8,), generator=g)
        kjt = KeyedJaggedTensor(keys=["f0", "f1"], values=torch.cat([ids, ids % 1000]),
                                lengths=torch.ones(16, dtype=torch.int32))
        directory.plan(kjt, torch.arange(8) % 2)
    assert directory.nbytes() < 64 * 1024


def test_equivalence_lazy_ps_rows_against_vanilla_torchrec():
    """Vanilla TorchRec given HashedUniformInit's tables and ESD whose PS
    creates the same rows on first touch train the same model."""
    from torchrec_esd.apps.launch import run_local_world
    from torchrec_esd.apps.trainer import JobConfig, run
    from torchrec_esd.apps.workload import SyntheticWorkloadConfig

    from equivalence import assert_same_model

    wl = SyntheticWorkloadConfig(num_sparse=3, cardinalities=[60, 150, 25], bag_size=(1, 3), alpha=1.1, seed=3)
    common = dict(steps=8, global_batch=24, workload=wl, collect_tables=True, sparse_optimizer="sgd",
                  sparse_lr=0.1, dense_lr=0.1, lazy_tables=True)
    vanilla = run_local_world(run, 2, JobConfig(method="vanilla", **common))
    cfg = EsdConfig([WorkerSpec(10, 1.0), WorkerSpec(10, 4.0)], num_ps=2)
    esd = run_local_world(run, 4, JobConfig(method="esd", esd=cfg, dispatcher="heuristic", **common))
    assert_same_model(vanilla[0], esd, 2)
    init = HashedUniformInit([EmbeddingBagConfig(name="t_cat_0", embedding_dim=8, num_embeddings=60,
                                                 feature_names=["cat_0"])], seed=0)
    # the vanilla tables did start from the hashed initialiser (rows never trained keep it)
    start = init.rows_of(0, torch.arange(60))
    assert int((vanilla[0]["tables"]["t_cat_0"] == start).all(1).sum()) > 0
