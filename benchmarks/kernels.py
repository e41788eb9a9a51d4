"""Benchmark of the torchrec_esd id-table kernels against their pure-PyTorch
references (torchrec_esd.reference_ops) on a Criteo-shaped batch.

Workload: B samples x F one-hot sparse features with Zipf-distributed ids
(torchrec_esd.apps.workload), turned into global row keys (table row offset + id)
laid out sample-major; W workers, each with a cache of ``--cache-keys``
distinct keys drawn from the same distribution (other steps of the workload).
A last case times the cache directory's iteration (``CacheDirectory.plan``,
every worker's cache step) with the C++ cache-step kernel against its PyTorch
code, on ``--dir-batch`` samples over W workers caching 10 % of every table.

    python benchmarks/kernels.py --out results.json

writes ``{"ops": [{"name", "ref_ms", "ext_ms", "speedup", ...}], ...}`` (median
times; ``*_min_ms``/``speedup_min`` from the fastest repeat, which is steadier
on a shared machine; ``env.load_avg_1m`` tells how busy the machine was).
Every extension result is checked against the reference before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torchrec_esd import ops, reference_ops as R  # noqa: E402
from torchrec_esd.apps.sessions import WORKLOADS, make_workload, make_workload_config  # noqa: E402
from torchrec_esd.apps.workload import SyntheticWorkload  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, repeats: int, warmup: int = 1):
    """(median, min) wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), min(samples)


def batch_keys(wl: SyntheticWorkload, step: int, batch: int) -> torch.Tensor:
    """Sample-major global row keys of one batch (one id per feature)."""
    kjt = wl.global_batch(step, batch).sparse_features
    F = len(wl.config.cardinalities)
    ids = kjt.values().reshape(F, batch)  # feature-major, one id per sample
    row_offset = torch.tensor([0] + list(wl.config.cardinalities[:-1])).cumsum(0)
    return (ids + row_offset[:, None]).t().contiguous().reshape(-1)


def directory_step(wl: SyntheticWorkload, args) -> dict:
    """One iteration of the cache directory (every worker's cache step) with
    the C++ kernel (ops.plan_worker_cache) against its PyTorch reference:
    two directories fed the same batches and random assignments, plans
    checked equal, every step timed (median and fastest)."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from torchrec_esd.cache import directory as cache_mod
    from torchrec_esd.config import EsdConfig, WorkerSpec

    B, W = args.dir_batch, args.workers
    cards = wl.config.cardinalities
    tables = [EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=16, num_embeddings=n, feature_names=[f"cat_{i}"])
              for i, n in enumerate(cards)]
    cfg = EsdConfig([WorkerSpec({t.name: max(1, t.num_embeddings // 10) for t in tables}, 100.0)] * W)
    dirs = {}
    for use in (False, True):
        cache_mod.USE_PLAN_KERNEL = use
        dirs[use] = cache_mod.CacheDirectory(cfg, tables, optimizer_state_dim=1)
    gen = torch.Generator().manual_seed(3)
    times = {False: [], True: []}
    for step in range(args.dir_steps):
        kjt = wl.global_batch(step, B).sparse_features
        a = torch.randint(0, W, (B,), generator=gen)
        plans = {}
        for use in (False, True):
            cache_mod.USE_PLAN_KERNEL = use
            t0 = time.perf_counter()
            plans[use] = dirs[use].plan(kjt, a)
            times[use].append((time.perf_counter() - t0) * 1e3)
        for x, y in zip(plans[False].workers, plans[True].workers):
            assert all(torch.equal(getattr(x, f), getattr(y, f)) for f in
                       ("used_keys", "used_slot", "push_keys", "push_slots", "pull_pos", "local_pos", "grad_pos"))
    cache_mod.USE_PLAN_KERNEL = True
    warm = args.dir_steps // 3  # caches fill first; steady state after
    ref, ext = statistics.median(times[False][warm:]), statistics.median(times[True][warm:])
    ref_min, ext_min = min(times[False][warm:]), min(times[True][warm:])
    print(f"{'directory plan (all workers)':30s} ref {ref:9.2f} ms   ext {ext:8.2f} ms   speedup {ref / ext:6.1f}x"
          f"   (min: {ref_min:8.2f} / {ext_min:7.2f} ms = {ref_min / ext_min:6.1f}x)", flush=True)
    return {"name": "directory_plan", "ref_ms": round(ref, 3), "ext_ms": round(ext, 3),
            "speedup": round(ref / ext, 2), "ref_min_ms": round(ref_min, 3), "ext_min_ms": round(ext_min, 3),
            "speedup_min": round(ref_min / ext_min, 2), "B": B, "W": W, "steps": args.dir_steps,
            "cache_fraction": 0.1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write results as JSON here")
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--features", type=int, default=26)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--cache-keys", type=int, default=20000)
    p.add_argument("--alpha", type=float, default=1.05)
    p.add_argument("--workload", default="iid", choices=WORKLOADS, help="iid Zipf ids or sessions (apps.sessions)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="int64", choices=["int32", "int64"])
    p.add_argument("--dir-batch", type=int, default=4096, help="global batch of the directory-plan case")
    p.add_argument("--dir-steps", type=int, default=15, help="iterations of the directory-plan case")
    args = p.parse_args()

    if not ops.EXTENSION_LOADED:
        raise SystemExit(f"torchrec_esd._C is not built: {ops.EXTENSION_ERROR}")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    B, F, W = args.batch, args.features, args.workers

    wl = make_workload(make_workload_config(args.workload, num_sparse=F, alpha=args.alpha, seed=0))
    keys = batch_keys(wl, 0, B)
    offsets = torch.arange(0, B * F + 1, F, dtype=torch.int64)
    gen = torch.Generator().manual_seed(1)
    cache_keys = []
    for w in range(W):
        pool = torch.unique(batch_keys(wl, 1000 + w, B))
        cache_keys.append(pool[torch.randperm(pool.numel(), generator=gen)[: args.cache_keys]])
    weights = [torch.rand(c.numel(), generator=gen, dtype=torch.float64) for c in cache_keys]
    miss = 1.0 + torch.rand(W, generator=gen, dtype=torch.float64)
    group = torch.randint(0, W, (B,), generator=gen).repeat_interleave(F)  # worker per sample

    to = lambda t: t.to(device)  # noqa: E731
    keys, offsets, group, miss = to(keys.to(dtype)), to(offsets), to(group), to(miss)
    cache_keys = [to(c.to(dtype)) for c in cache_keys]
    weights = [to(w) for w in weights]
    tables = [ops.id_table_build(c) for c in cache_keys]
    batch_unique = torch.unique(keys)

    cases = [
        ("id_table_build[cache]", lambda: R.id_table_build_ref(cache_keys[0]),
         lambda: ops.id_table_build(cache_keys[0]), {"keys": cache_keys[0].numel()}),
        ("id_table_build[batch_unique]", lambda: R.id_table_build_ref(batch_unique),
         lambda: ops.id_table_build(batch_unique), {"keys": batch_unique.numel()}),
        ("id_table_lookup", lambda: R.id_table_lookup_ref(tables[0], keys),
         lambda: ops.id_table_lookup(tables[0], keys),
         {"queries": keys.numel(), "table_keys": cache_keys[0].numel()}),
        ("sample_cost_matrix", lambda: R.sample_cost_matrix_ref(keys, offsets, tables, weights, miss),
         lambda: ops.sample_cost_matrix(keys, offsets, tables, weights, miss),
         {"B": B, "W": W, "keys": keys.numel()}),
        ("cache_hit_counts", lambda: R.cache_hit_counts_ref(keys, offsets, tables),
         lambda: ops.cache_hit_counts(keys, offsets, tables), {"B": B, "W": W}),
        ("unique_keys_per_group", lambda: R.unique_keys_per_group_ref(keys, group, W),
         lambda: ops.unique_keys_per_group(keys, group, W), {"keys": keys.numel(), "groups": W}),
    ]

    results = []
    for name, ref, ext, extra in cases:
        want, got = ref(), ext()
        if isinstance(want, tuple):
            assert all(torch.equal(a, b) for a, b in zip(got, want)), name
        elif want.dtype == torch.float64:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-9)
        else:
            assert torch.equal(got, want), name
        ref_ms, ref_min = time_ms(ref, device, args.repeats)
        ext_ms, ext_min = time_ms(ext, device, args.repeats)
        row = {"name": name, "ref_ms": round(ref_ms, 3), "ext_ms": round(ext_ms, 3),
               "speedup": round(ref_ms / ext_ms, 2), "ref_min_ms": round(ref_min, 3),
               "ext_min_ms": round(ext_min, 3), "speedup_min": round(ref_min / ext_min, 2),
               **extra}
        results.append(row)
        print(f"{name:30s} ref {ref_ms:9.2f} ms   ext {ext_ms:8.2f} ms   speedup {ref_ms / ext_ms:6.1f}x"
              f"   (min: {ref_min:8.2f} / {ext_min:7.2f} ms = {ref_min / ext_min:6.1f}x)",
              flush=True)

    if device.type == "cpu":
        results.append(directory_step(wl, args))

    hits = ops.cache_hit_counts(keys, offsets, tables)
    hit_rate = float(hits.sum()) / float(B * F * W)
    print(f"mean cache hit rate per (sample, worker): {hit_rate:.3f}")
    out = {
        "ops": results,
        "config": {"batch": B, "features": F, "workers": W, "cache_keys": args.cache_keys,
                   "alpha": args.alpha, "dtype": args.dtype, "device": str(device),
                   "threads": torch.get_num_threads(), "repeats": args.repeats,
                   "hit_rate": round(hit_rate, 4)},
        "env": {"torch": torch.__version__, "python": platform.python_version(),
                "machine": platform.machine(), "cpus": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
