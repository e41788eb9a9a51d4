"""What the slowest worker's PS traffic waits for, per step (issue 19: prefetch and overlap).

    python benchmarks/pull_dependencies.py --out results.json [--workload {iid,sessions}]

At staleness 0 a worker's pull for batch ``i + 1`` can leave the PS only once the rows
it asks for have their batch-``i`` version.  This benchmark splits that pull, per step
and for the slowest worker, by what each row waits for:

* ``own_shared``: rows the worker itself used in batch ``i`` (shared with another worker,
  so its copy is outdated): they wait for its OWN gradient upload of ``i``;
* ``others_updated``: rows only other workers used in ``i``: they wait for the other
  workers' gradients of ``i`` only;
* ``others_pushed``: rows no worker used in ``i`` that another worker pushes (dirty)
  before ``i + 1``'s pulls;
* ``untouched``: the rest: nothing changes them after batch ``i``'s pulls, so a
  depth-1 prefetch moves them while ``i`` computes (the benchmark checks that they are
  exactly :func:`torchrec_esd.cache.prefetch_keys` of depth 1).

It also counts the worker's upload: its gradients of ``i`` and its dirty pushes before
``i + 1``.  From the bytes (row bytes, gradient bytes and an 8-byte key per row) over
the worker's link it models the embedding part of the step for three orders of the
exchange (the dense all-reduce is left out: it is a separate, already pipelined star):

* ``sequential`` (today, with prefetch): the upload, then the reply of everything but
  the untouched rows;
* ``split_reply``: the PS answers the rows that do not wait for this worker's upload
  while the upload runs, and the ``own_shared`` rows after it;
* ``others_sum``: as ``split_reply``, and for ``own_shared`` rows the worker receives
  the sum of the OTHER workers' gradients (``others' sum + own`` in the PS's order gives
  the same bits when this worker is the last in that order) instead of waiting for its
  own upload; only the larger of the two directions remains.

Every figure is a model of the embedding traffic from the cache directory's real plans
(the same simulation as ``dispatch_true_cost.py``), not a measured iteration.
Defaults: ``dispatch_true_cost.py``'s hetero mix (1000/100/50/10 Mbit/s), batch 512,
10 % caches, equal shares, HybridDis, 30 iterations, the first 10 left out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import dispatch_true_cost as dtc  # noqa: E402
from torchrec_esd.apps.sessions import WORKLOADS, make_workload, make_workload_config  # noqa: E402
from torchrec_esd.cache import CacheDirectory, IterationPlan, prefetch_keys  # noqa: E402

CATEGORIES = ("own_shared", "others_updated", "others_pushed", "untouched")
KEY_BYTES = 8


def classify_pulls(prev: IterationPlan, nxt: IterationPlan, worker: int) -> Dict[str, torch.Tensor]:
    """The pull keys of ``worker`` in ``nxt`` (the plan right after ``prev``) by what they
    wait for (module docstring): a partition of ``nxt.workers[worker].pull_keys``."""
    if nxt.iteration != prev.iteration + 1:
        raise ValueError(f"plans {prev.iteration} and {nxt.iteration} are not consecutive")
    W = len(prev.workers)
    pull = nxt.workers[worker].pull_keys
    mine = prev.workers[worker].used_keys
    others = torch.cat([prev.workers[v].used_keys for v in range(W) if v != worker])
    pushed = torch.cat([nxt.workers[v].push_keys for v in range(W) if v != worker])
    own = torch.isin(pull, mine)
    upd = ~own & torch.isin(pull, others)
    psh = ~own & ~upd & torch.isin(pull, pushed)
    return {"own_shared": pull[own], "others_updated": pull[upd], "others_pushed": pull[psh],
            "untouched": pull[~own & ~upd & ~psh]}


def step_model(rows: Dict[str, float], grads: float, pushes: float, row_bytes: float, grad_bytes: float,
               bytes_per_s: float) -> Dict[str, float]:
    """Seconds of one step's embedding exchange on the worker's link for the three orders
    of the module docstring (mean rows per step in, prefetched ``untouched`` rows left out)."""
    up = (grads * (grad_bytes + KEY_BYTES) + pushes * (row_bytes + KEY_BYTES)) / bytes_per_s
    down = {k: rows[k] * (row_bytes + KEY_BYTES) / bytes_per_s for k in CATEGORIES}
    waits_others = down["others_updated"] + down["others_pushed"]
    own = down["own_shared"]
    return {
        "up_s": up, **{f"down_{k}_s": v for k, v in down.items()},
        "sequential_s": up + waits_others + own,
        "split_reply_s": max(up, waits_others) + own,
        # the own-shared rows come down as the other workers' gradient sum (the same size
        # but for the optimizer state) while this worker's upload still runs
        "others_sum_s": max(up, waits_others + own * (grad_bytes + KEY_BYTES) / (row_bytes + KEY_BYTES)),
    }


def run(args) -> Dict:
    targs = dtc.parse_args(["--workload", args.workload, "--iters", str(args.iters), "--batch", str(args.batch),
                            "--bandwidths", args.bandwidths])
    wl = make_workload(make_workload_config(args.workload, max_cardinality=targs.max_cardinality,
                                            alpha=targs.alpha, seed=targs.seed))
    bws = [float(x) for x in args.bandwidths.split(",")]
    tables, config, cm, row_bytes = dtc.build(targs, wl, bws)
    W, B = config.num_workers, targs.batch
    shares = [int(x) for x in args.shares.split(",")] if args.shares else config.batch_shares(B)
    worker = args.worker if args.worker >= 0 else min(range(W), key=lambda w: (bws[w], -w))
    d = dtc.make(args.dispatcher, targs)
    directory = CacheDirectory(config, tables)
    plans: List[IterationPlan] = []
    for step in range(args.iters):
        kjt = wl.global_batch(step, B).sparse_features
        cost, aux = d.inputs(cm, kjt, directory.views())
        plans.append(directory.plan(kjt, d.assign(cost, shares, aux=aux).assignment))
    grad_bytes = float(args.embedding_dim * 4)
    sums = {k: 0.0 for k in CATEGORIES}
    grads = pushes = 0.0
    steps = range(args.warmup_skip, args.iters - 1)
    for i in steps:
        parts = classify_pulls(plans[i], plans[i + 1], worker)
        pre = prefetch_keys(worker, plans[i], [plans[i + 1]])[plans[i + 1].iteration]
        if not torch.equal(torch.sort(parts["untouched"]).values, torch.sort(pre).values):
            raise SystemExit(f"step {i}: the untouched pulls are not the depth-1 prefetch")
        for k in CATEGORIES:
            sums[k] += parts[k].numel()
        grads += plans[i].workers[worker].grad_pos.numel()
        pushes += plans[i + 1].workers[worker].push_keys.numel()
    n = len(steps)
    rows = {k: v / n for k, v in sums.items()}
    model = step_model(rows, grads / n, pushes / n, row_bytes, grad_bytes, bws[worker] * 1e6 / 8)
    return {"workload": args.workload, "dispatcher": args.dispatcher, "shares": list(shares), "worker": worker,
            "bandwidth_mbps": bws[worker], "steps": n, "pull_rows_per_step": rows,
            "grad_rows_per_step": grads / n, "push_rows_per_step": pushes / n, "row_bytes": row_bytes,
            "grad_bytes": grad_bytes, "model": model}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--workload", default="iid", choices=WORKLOADS)
    p.add_argument("--dispatcher", default="hybrid")
    p.add_argument("--bandwidths", default="1000,100,50,10")
    p.add_argument("--shares", default="", help="comma-separated samples per worker (default: equal)")
    p.add_argument("--worker", type=int, default=-1, help="default: the slowest link")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup-skip", type=int, default=10)
    p.add_argument("--embedding-dim", type=int, default=16)
    return p.parse_args(argv)


def main(argv: Sequence[str] = None) -> Dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    r = run(args)
    m, rows = r["model"], r["pull_rows_per_step"]
    print(f"{r['workload']}, {r['dispatcher']}, shares {r['shares']}: worker {r['worker']} at {r['bandwidth_mbps']:g}"
          f" Mbit/s, mean rows per step over {r['steps']} steps")
    print("  pull(i+1): " + ", ".join(f"{k} {rows[k]:.1f}" for k in CATEGORIES)
          + f"; upload: gradients {r['grad_rows_per_step']:.1f}, dirty pushes {r['push_rows_per_step']:.1f}")
    print("  ms: up {:.1f}; down {}".format(1e3 * m["up_s"], ", ".join(
        f"{k} {1e3 * m[f'down_{k}_s']:.1f}" for k in CATEGORIES)))
    print("  embedding exchange per step (untouched rows prefetched): sequential {:.1f} ms, split reply {:.1f} ms,"
          " others' sum {:.1f} ms".format(1e3 * m["sequential_s"], 1e3 * m["split_reply_s"], 1e3 * m["others_sum_s"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"benchmark": "pull_dependencies", "args": vars(args), **r}, f, indent=1)
        print(f"wrote {args.out}")
    return r


if __name__ == "__main__":
    main()
