"""Eviction policies under the TRUE transmission: LRU, LFU and lookahead.

    python benchmarks/eviction_policies.py --out results.json [--quick]

For every dispatcher of ``--dispatchers`` and every policy of ``--policies``,
a fresh replicated cache directory (cold caches, the policy as
``EsdConfig.cache_policy``) is fed ``--iters`` global batches of the default
Zipf workload, each dispatched by that dispatcher on the directory's own views,
exactly as ``benchmarks/dispatch_true_cost.py`` does.  The ``lookahead``
policy is handed the next ``--lookahead`` global batches at every plan (what
``EsdInputDist.dispatch_ahead`` hands it).  The ground truth is the
directory's plan: rows per kind each worker really moves, times the row
bytes, over the worker's bandwidth plus one latency per worker, kind and
iteration where a row moves (``dispatch_true_cost.link_seconds``).

Reported per (dispatcher, policy): total link seconds (sum over links and
iterations), makespan link seconds (sum over iterations of the slowest link),
both also over the steady state, rows per kind, and the cut of lookahead vs
the better of LRU and LFU.  Defaults: dispatch_true_cost.py's hetero mix
(1000/100/50/10 Mbit/s), batch 512, 10 % caches, 40 iterations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Dict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import dispatch_true_cost as dtc  # noqa: E402
from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig  # noqa: E402
from torchrec_esd.cache import KINDS, CacheDirectory  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="eviction_policies.json")
    p.add_argument("--quick", action="store_true", help="16 iterations, batch 256")
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--warmup-skip", type=int, default=10)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--bandwidths", default="1000,100,50,10")
    p.add_argument("--latency-ms", type=float, default=1.0)
    p.add_argument("--cache-ratio", type=float, default=0.10)
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--optimizer-state-bytes", type=int, default=4)
    p.add_argument("--alpha", type=float, default=1.1)
    p.add_argument("--max-cardinality", type=int, default=20000)
    p.add_argument("--staleness", type=int, default=0)
    p.add_argument("--objective", default="total", choices=["total", "makespan"])
    p.add_argument("--dispatchers", default="laia,esd")
    p.add_argument("--policies", default="lru,lfu,lookahead")
    p.add_argument("--lookahead", type=int, default=4, help="upcoming batches the lookahead policy sees")
    p.add_argument("--esd-budget-ms", type=float, default=None)
    p.add_argument("--hybrid-budget-ms", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.warmup_skip, args.batch = 16, 4, 256
    return args


def run(dispatcher: str, policy: str, args, wl, bws) -> Dict:
    tables, config, cm, rb = dtc.build(args, wl, bws)
    config = dataclasses.replace(config, cache_policy=policy, cache_lookahead=args.lookahead)
    W, B = config.num_workers, args.batch
    shares = config.batch_shares(B)
    d = dtc.make(dispatcher, args)
    directory = CacheDirectory(config, tables)
    reads = directory.policy.reads_upcoming
    batches = [wl.global_batch(s, B).sparse_features for s in range(args.iters + args.lookahead)]
    rows = torch.zeros(args.iters, W, len(KINDS), dtype=torch.float64)
    secs = torch.zeros(args.iters, W, dtype=torch.float64)
    plan_ms = []
    for step in range(args.iters):
        kjt = batches[step]
        cost, aux = d.inputs(cm, kjt, directory.views())
        r = d.assign(cost, shares, aux=aux)
        upcoming = batches[step + 1 : step + 1 + args.lookahead] if reads else ()
        t0 = time.perf_counter()
        plan = directory.plan(kjt, r.assignment, upcoming)
        plan_ms.append((time.perf_counter() - t0) * 1e3)
        rows[step] = dtc.plan_rows(plan)
        secs[step] = dtc.link_seconds(config, rows[step], rb)
    return {**dtc.link_summary(secs, rows, args.warmup_skip), "plan_ms_mean": sum(plan_ms) / len(plan_ms)}


def main(argv=None) -> Dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    wl = SyntheticWorkload(SyntheticWorkloadConfig(alpha=args.alpha, max_cardinality=args.max_cardinality,
                                                   seed=args.seed))
    bws = [float(x) for x in args.bandwidths.split(",")]
    policies = [p for p in args.policies.split(",") if p]
    res: Dict[str, Dict[str, Dict]] = {}
    print(f"{len(bws)} workers at {bws} Mbit/s, B={args.batch}, {args.iters} iterations from cold caches, "
          f"cache {args.cache_ratio:.0%} of every table, lookahead window {args.lookahead} batches; link seconds "
          "from the cache directory's plans")
    print(f"{'dispatcher':>10} {'policy':>9} | {'total_s':>8} {'makespan':>8} | {'steady':>8} {'st.mksp':>8} |"
          f" {'miss_pull':>9} {'miss_push':>9} {'upd_pull':>9} {'upd_push':>9} | {'plan ms':>7}")
    for dn in [n for n in args.dispatchers.split(",") if n]:
        res[dn] = {}
        for pol in policies:
            r = run(dn, pol, args, wl, bws)
            res[dn][pol] = r
            k = r["rows_per_kind"]
            print(f"{dn:>10} {pol:>9} | {r['total_s']:8.3f} {r['makespan_s']:8.3f} | {r['steady_total_s']:8.3f}"
                  f" {r['steady_makespan_s']:8.3f} | {k['miss_pull']:9.0f} {k['miss_push']:9.0f}"
                  f" {k['update_pull']:9.0f} {k['update_push']:9.0f} | {r['plan_ms_mean']:7.1f}")
            sys.stdout.flush()
        if "lookahead" in res[dn] and {"lru", "lfu"} & set(res[dn]):
            la = res[dn]["lookahead"]
            for key in ("total_s", "makespan_s", "steady_total_s", "steady_makespan_s"):
                best = min(res[dn][p][key] for p in ("lru", "lfu") if p in res[dn])
                res[dn].setdefault("lookahead_cut_pct", {})[key] = 100.0 * (1 - la[key] / best)
            print(f"{dn:>10} lookahead vs best of LRU/LFU: "
                  + ", ".join(f"{k} {v:+.1f} %" for k, v in res[dn]["lookahead_cut_pct"].items()))
    out = {"args": vars(args), "results": res}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
