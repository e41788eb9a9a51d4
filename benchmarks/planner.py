"""Planned vs equal caches and shares on a heterogeneous topology.

Both deployments run the same global batches through the real cache directory
(the runtime's own plans: rows pulled and pushed per worker) with HybridDis
dispatch, on workers that differ in memory, bandwidth and compute:

* ``planned``: EsdShardingPlanner's replicated tables, caches and shares;
* ``equal``: every table through PS + cache, the same cache on every worker
  (the smallest worker's budget, so that it fits everywhere, split in
  proportion to table rows) and equal shares.

Reports per deployment the link time per worker (bytes / bandwidth + latency
per message; replicated tables' all-reduce included), the total, the makespan
(slowest link), and the estimated iteration time max_w(B_w / samples_per_s_w +
link_w).  ``python benchmarks/planner.py --out results.json``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torchrec_esd.cache import CacheDirectory  # noqa: E402
from torchrec_esd.config import EsdConfig, WorkerSpec  # noqa: E402
from torchrec_esd.cost import CostModel  # noqa: E402
from torchrec_esd.dispatch import make_dispatcher  # noqa: E402
from torchrec_esd.distributed.planner import DIRECTORY_BYTES_PER_ROW, EsdShardingPlanner, PsResources, WorkerResources  # noqa: E402
from torchrec_esd.batch_select import select_kjt_keys  # noqa: E402
from torchrec_esd.apps.sessions import WORKLOADS, make_workload, make_workload_config  # noqa: E402

MiB = 2**20


def simulate(cfg: EsdConfig, tables, replicated, workload, steps, batch, row_bytes, workers, dispatcher="hybrid"):
    esd_tables = [t for t in tables if t.name not in replicated]
    rep_tables = [t for t in tables if t.name in replicated]
    directory = CacheDirectory(cfg, esd_tables)
    cost = CostModel(cfg, esd_tables, optimizer_state_bytes_per_row=row_bytes - esd_tables[0].embedding_dim * 4)
    disp = make_dispatcher(dispatcher)
    features = [f for t in esd_tables for f in t.feature_names]
    W = cfg.num_workers
    link = [0.0] * W
    kinds = {}
    shares = cfg.batch_shares(batch)
    rep_bytes = sum(t.num_embeddings * t.embedding_dim * 4 for t in rep_tables)
    compute = [0.0] * W
    for step in range(steps):
        kjt = select_kjt_keys(workload.global_batch(step, batch).sparse_features, features)
        c = cost.matrix(kjt, directory.views())
        aux = {"hits": cost.hit_matrix(kjt, directory.views())} if dispatcher == "laia" else None
        a = disp.assign(c, shares, aux=aux).assignment
        plan = directory.plan(kjt, a)
        for w, wp in enumerate(plan.workers):
            spec = cfg.workers[w]
            b = sum(wp.rows.values()) * row_bytes
            msgs = sum(1 for v in wp.rows.values() if v)
            if rep_bytes:  # ring all-reduce of the replicated tables' gradients
                b += 2 * (W - 1) / W * rep_bytes
                msgs += 1
            link[w] += spec.link_time(b, msgs)
            compute[w] += wp.num_samples / workers[w].samples_per_s
            for k, v in wp.rows.items():
                kinds[k] = kinds.get(k, 0) + v
    iter_s = max(l + c for l, c in zip(link, compute)) / steps
    return {
        "shares": shares,
        "link_s_per_worker": link,
        "total_link_s": sum(link),
        "makespan_link_s": max(link),
        "est_iteration_s": iter_s,
        "rows": kinds,
        "replicated": sorted(replicated),
    }


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--workload", default="iid", choices=WORKLOADS, help="iid Zipf ids or sessions (apps.sessions)")
    args = p.parse_args(argv)
    t0 = time.time()
    wl = make_workload(make_workload_config(args.workload, max_cardinality=20000, alpha=1.1, seed=0))
    tables = wl.table_configs(args.dim)
    workers = [
        WorkerResources(6 * MiB, 1000, latency_ms=0.5, samples_per_s=4000),
        WorkerResources(5 * MiB, 100, latency_ms=2, samples_per_s=3000),
        WorkerResources(4 * MiB, 50, latency_ms=5, samples_per_s=3000),
        WorkerResources(5 * MiB, 10, latency_ms=10, samples_per_s=2000),
    ]
    sample = [wl.global_batch(10_000 + s, args.batch).sparse_features for s in range(4)]
    planner = EsdShardingPlanner(workers, [PsResources(256 * MiB)], tables, sample=sample, global_batch_size=args.batch)
    plan = planner.plan()
    row_bytes = (args.dim + 1) * 4
    planned = simulate(plan.esd_config(), tables, set(plan.replicated), wl, args.steps, args.batch, row_bytes, workers)
    # equal: smallest budget for everyone, proportional to table rows, equal shares
    total_rows = sum(t.num_embeddings for t in tables)
    budget = (min(w.memory_bytes for w in workers) - DIRECTORY_BYTES_PER_ROW * total_rows) // row_bytes
    eq_cache = {t.name: max(1, int(budget * t.num_embeddings / total_rows)) for t in tables}
    equal_cfg = EsdConfig(
        [WorkerSpec(eq_cache, w.bandwidth_mbps, w.latency_ms) for w in workers]
    )
    equal = simulate(equal_cfg, tables, set(), wl, args.steps, args.batch, row_bytes, workers)
    result = {
        "topology": [vars(w) for w in workers],
        "steps": args.steps,
        "batch": args.batch,
        "planned": planned,
        "equal": equal,
        "ratio_total_link": planned["total_link_s"] / equal["total_link_s"],
        "ratio_makespan_link": planned["makespan_link_s"] / equal["makespan_link_s"],
        "ratio_iteration": planned["est_iteration_s"] / equal["est_iteration_s"],
        "wall_s": time.time() - t0,
    }
    print(plan)
    print()
    print(f"{'deployment':<10}{'shares':>26}{'total link s':>14}{'makespan s':>12}{'est. iter s':>13}")
    for name in ("planned", "equal"):
        r = result[name]
        print(f"{name:<10}{str(r['shares']):>26}{r['total_link_s']:>14.3f}{r['makespan_link_s']:>12.3f}{r['est_iteration_s']:>13.4f}")
    print(
        f"planned / equal: total link {result['ratio_total_link']:.3f}, makespan {result['ratio_makespan_link']:.3f}, "
        f"iteration {result['ratio_iteration']:.3f}  ({result['wall_s']:.0f} s)"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
