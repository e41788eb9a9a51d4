"""The stake rule's two sides, offline: the link time at stake vs the decision's CPU time.

    python benchmarks/stake.py [--batch 512] [--steps 12] [--skip 4] [--out F.json]

For each workload (``iid``, ``sessions``), link mix (``homo``: 4 x 1000 Mbit/s at
equal shares; ``hetero+plan``: 1000/100/50/10 Mbit/s at the shares the planner gives
that mix, [229, 158, 109, 16] of 512) and dispatcher (``hybrid``, ``esd``, built with
``stake_ratio=0`` so that every batch is decided), a fresh cache directory is fed
``--steps`` batches, each decided through ``Dispatcher.decide`` (what the runtime
calls) and planned.  Reported per case, medians over the steps from ``--skip`` on:

* ``stake_ms``: the plain split's predicted slowest link (``info["stake_s"]``);
* ``decided_ms``: the decided assignment's predicted slowest link on the same model;
* ``gain_ms``: their difference;
* ``decision_cpu_ms`` / ``decision_wall_ms``: the full decision's CPU time in this
  thread and its wall time.

:mod:`torchrec_esd.dispatch.stake` takes the plain split while ``stake_ms <
stake_ratio * decision_cpu_ms`` (default ratio 1), so the ratio of the two
columns says how far each case is from the rule's threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dispatch_true_cost as dtc  # noqa: E402
from torchrec_esd.apps.sessions import make_workload, make_workload_config  # noqa: E402
from torchrec_esd.cache import CacheDirectory  # noqa: E402
from torchrec_esd.dispatch import make_dispatcher  # noqa: E402
from torchrec_esd.dispatch.base import objective_value  # noqa: E402

MIXES = {"homo": ([1000.0] * 4, [128] * 4), "hetero+plan": ([1000.0, 100.0, 50.0, 10.0], [229, 158, 109, 16])}


def decided_makespan(name: str, result, cost: torch.Tensor, aux) -> float:
    if name == "esd":
        return float(aux["dedup"].per_worker(result.assignment.numpy()).max())
    return objective_value(cost, result.assignment, "makespan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.batch != 512:
        raise SystemExit("the hetero+plan shares are the planner's for a batch of 512")
    if not 0 <= args.skip < args.steps:
        raise SystemExit("need 0 <= --skip < --steps")
    torch.set_num_threads(1)
    base = dtc.parse_args(["--quick"])
    rows = []
    for wl_name in ("iid", "sessions"):
        wl = make_workload(make_workload_config(wl_name))
        for mix, (bws, shares) in MIXES.items():
            tables, config, cm, _ = dtc.build(base, wl, bws)
            for name in ("hybrid", "esd"):
                d = make_dispatcher(name, stake_ratio=0.0)
                directory = CacheDirectory(config, tables)
                rec = []
                for step in range(args.steps):
                    kjt = wl.global_batch(step, args.batch).sparse_features
                    r = d.decide(cm, kjt, directory.cache_state, shares)
                    cost, aux = d.inputs(cm, kjt, directory.cache_state)  # the same inputs, for the decided makespan
                    dec = decided_makespan(name, r, cost, aux)
                    directory.plan(kjt, r.assignment)
                    if step >= args.skip:
                        rec.append((r.info["stake_s"], dec, r.info["full_decision_cpu_s"], r.info["full_decision_s"]))
                med = [statistics.median(x[i] for x in rec) * 1e3 for i in range(4)]
                row = {"workload": wl_name, "mix": mix, "dispatcher": name, "stake_ms": med[0], "decided_ms": med[1],
                       "gain_ms": statistics.median((x[0] - x[1]) * 1e3 for x in rec),
                       "decision_cpu_ms": med[2], "decision_wall_ms": med[3]}
                rows.append(row)
                print(f"{wl_name:8s} {mix:12s} {name:6s} stake {row['stake_ms']:6.2f} ms"
                      f"  decided {row['decided_ms']:6.2f} ms  gain {row['gain_ms']:6.2f} ms"
                      f"  decision cpu {row['decision_cpu_ms']:5.2f} ms (wall {row['decision_wall_ms']:5.2f} ms)"
                      f"  stake/cpu {row['stake_ms'] / row['decision_cpu_ms']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
