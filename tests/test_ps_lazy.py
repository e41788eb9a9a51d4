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


def _hashed_jobs(steps=5, batch=32):
    from torchrec_esd.apps.hashed_workload import HashedWorkloadConfig
    from torchrec_esd.apps.trainer import JobConfig
    from torchrec_esd.apps.workload import SyntheticWorkloadConfig

    base = SyntheticWorkloadConfig(num_sparse=2, cardinalities=[400, 30], bag_size=(1, 3), alpha=1.1, seed=5)
    rows = (1 << 31, 1000)
    common = dict(steps=steps, global_batch=batch, sparse_optimizer="sgd", sparse_lr=0.1, dense_lr=0.1,
                  lazy_tables=True)
    cfg = EsdConfig([WorkerSpec(16, 1.0), WorkerSpec(16, 4.0)], num_ps=2)
    esd = JobConfig(method="esd", esd=cfg, dispatcher="heuristic", workload=HashedWorkloadConfig(base, rows),
                    collect_rows=True, **common)
    twin = JobConfig(method="vanilla", workload=HashedWorkloadConfig(base, rows, renumber=(steps, batch)),
                     collect_tables=True, **common)
    return esd, twin


def test_esd_job_trains_a_2_31_row_table_through_dmp_with_memory_bounded_by_touched_rows():
    """A DLRM with a 2^31-row table (hashed ids, built on the meta device)
    trained by the ESD job through DistributedModelParallel + the ESD sharder,
    lazy PS: the same model as vanilla TorchRec on the renumbered twin (small
    tables holding exactly the touched rows, same hashed initial values), and
    every rank's memory grows with the rows touched, not with the table."""
    from torchrec_esd.apps.hashed_workload import HashedWorkload
    from torchrec_esd.apps.launch import run_local_world
    from torchrec_esd.apps.trainer import run

    from equivalence import assert_close_rel

    esd_job, twin_job = _hashed_jobs()
    esd = run_local_world(run, 4, esd_job)
    vanilla = run_local_world(run, 2, twin_job)[0]
    twin = HashedWorkload(twin_job.workload)
    # the same model: losses, dense weights, and every touched row of both tables
    assert_close_rel(torch.tensor(vanilla["losses"]), torch.tensor(esd[0]["losses"]), "losses")
    for name, p in vanilla["dense"].items():
        assert_close_rel(p, esd[0]["dense"][name], f"dense {name}")
    for r in (0, 1):
        touched = esd[r]["touched_tables"]
        assert sorted(touched) == ["t_cat_0", "t_cat_1"]
        for name, (ids, rows) in touched.items():
            assert torch.equal(ids, twin.ids[name])  # the rows the twin's tables hold, in its order
            assert_close_rel(vanilla["tables"][name], rows, f"table {name}")
    big_ids = twin.ids["t_cat_0"]
    assert int(big_ids.max()) > 1 << 30 and big_ids.numel() < 400  # spread over the table, few touched
    # memory: the PS stores the touched rows only; no rank allocated anything table-sized
    table_bytes = (1 << 31) * 8 * 4
    ps = esd[2:]
    touched_rows = sum(r["touched_rows"] for r in ps)
    assert touched_rows == sum(i.numel() for i in twin.ids.values())
    for r in ps:
        # a 32 B row + its index, amortised: bytes follow the rows touched
        assert 32 * r["touched_rows"] <= r["storage_bytes"] <= 256 * max(r["touched_rows"], 64)
    for r in esd:
        assert r["max_rss_growth"] < 512 << 20, r["max_rss_growth"]  # vs table_bytes = 64 GiB
        assert r["max_rss_growth"] < table_bytes / 64
    for r in esd[:2]:
        assert r["directory_bytes"] < 256 * 1024  # O(cache rows + batch keys), whatever the table


def test_lazy_tables_refuse_checkpoints_clearly():
    """A checkpoint of a lazy table would pull and store every row: refused
    before anything is allocated, by the job and by the module's state."""
    from types import SimpleNamespace

    from torchrec_esd.apps.esd_job import _esd
    from torchrec_esd.distributed.checkpoint import EsdCheckpointError, TableCheckpoint
    from torchrec_esd.ps import SparseOptimizer as Opt

    esd_job, _ = _hashed_jobs()
    from dataclasses import replace

    with pytest.raises(EsdConfigError, match="lazy_tables with checkpoint_dir"):
        _esd(replace(esd_job, checkpoint_dir="/nonexistent"), None)
    tables = _tables([1 << 31], [8])
    rt = SimpleNamespace(keyspace=KeySpace(tables, 2), optimizer=Opt("sgd", 0.1), lazy_tables=True,
                         config=EsdConfig([WorkerSpec(4, 1.0), WorkerSpec(4, 1.0)], num_ps=2), worker_index=0)
    ck = TableCheckpoint(SimpleNamespace(_runtime=rt))  # O(1): no shard keys built
    for call in (ck.weights, ck.momentum, lambda: ck.load(weights={"t0": torch.zeros(1)})):
        with pytest.raises(EsdCheckpointError, match="lazy"):
            call()
