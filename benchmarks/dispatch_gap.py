"""Every dispatcher's gap to the best possible dispatch on the true cost
(used by ``dispatch_true_cost.py``; the solvers are in
:mod:`torchrec_esd.dispatch.true_optimum`).

One study: a fresh cache directory is warmed by ``warmup`` iterations of the
``esd`` dispatcher, then on each of ``iters`` further batches (the directory
advanced by esd's decision, so every dispatcher faces the same cache state)
every dispatcher decides, its assignment is priced on the batch's
de-duplicated model (:class:`~torchrec_esd.cost.DedupCost`: total link
seconds, and the slowest link's), and the batch's optimum is computed:

* ``exact=True``: CP-SAT (:func:`exact_optimum`, ``exact_limit_s`` per batch
  and objective, started from the best dispatcher's answer); where it does not
  prove optimality within the limit its incumbent is the best KNOWN dispatch
  (``proven`` counts the batches proven optimal);
* always: the LP-relaxation bound (:func:`lp_lower_bound`), a proven lower
  bound; with ``exact`` the better of it and CP-SAT's bound.

Gaps are ``100 * (sum of the dispatcher's costs / sum of the reference - 1)``
over the batches.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

from torchrec_esd.cache import CacheDirectory
from torchrec_esd.dispatch.true_optimum import exact_optimum, lp_lower_bound, true_value

OBJECTIVES = ("total", "makespan")


def gap_study(names: Sequence[str], make: Callable[[str], object], build: Callable, wl, B: int, iters: int,
              warmup: int, exact: bool, exact_limit_s: float = 20.0, step0: int = 5000) -> Dict:
    """See the module docstring; ``build() -> (tables, config, cost_model)``,
    ``make(name) -> dispatcher``."""
    tables, config, cm = build()
    shares = config.batch_shares(B)
    directory = CacheDirectory(config, tables)
    esd = make("esd")
    dispatchers = {n: make(n) for n in names}
    for step in range(warmup):
        kjt = wl.global_batch(step0 + step, B).sparse_features
        cost, aux = esd.inputs(cm, kjt, directory.views())
        directory.plan(kjt, esd.assign(cost, shares, aux=aux).assignment)
    costs = {n: {o: 0.0 for o in OBJECTIVES} for n in names}
    best = {o: 0.0 for o in OBJECTIVES}
    bound = {o: 0.0 for o in OBJECTIVES}
    proven = {o: 0 for o in OBJECTIVES}
    solve_s: Dict[str, List[float]] = {"exact": [], "lp": []}
    for step in range(iters):
        kjt = wl.global_batch(step0 + warmup + step, B).sparse_features
        views = directory.views()
        dedup = cm.dedup_cost(kjt, views)
        answers = {}
        for n, d in dispatchers.items():
            cost, aux = d.inputs(cm, kjt, views)
            answers[n] = d.assign(cost, shares, aux=aux).assignment.numpy()
        for o in OBJECTIVES:
            vals = {n: true_value(dedup, a, o) for n, a in answers.items()}
            for n, v in vals.items():
                costs[n][o] += v
            top = min(vals, key=vals.get)
            t0 = time.perf_counter()
            lb = lp_lower_bound(dedup, shares, o).lower_bound
            solve_s["lp"].append(time.perf_counter() - t0)
            known = vals[top]
            if exact:
                t0 = time.perf_counter()
                r = exact_optimum(dedup, shares, o, time_limit_s=exact_limit_s, hint=answers[top])
                solve_s["exact"].append(time.perf_counter() - t0)
                known = min(known, r.value)
                lb = max(lb, r.lower_bound)
                proven[o] += int(r.optimal)
            best[o] += known
            bound[o] += min(lb, known)
        if "esd" in answers:
            advance = answers["esd"]
        else:
            cost, aux = esd.inputs(cm, kjt, views)
            advance = esd.assign(cost, shares, aux=aux).assignment.numpy()
        directory.plan(kjt, torch.from_numpy(advance))
    out = {"B": B, "W": config.num_workers, "shares": list(shares), "iterations": iters, "warmup": warmup,
           "exact": exact, "exact_limit_s": exact_limit_s if exact else None,
           "best_known": best, "lower_bound": bound, "proven_optimal": proven if exact else None,
           "solve_s_mean": {k: (float(np.mean(v)) if v else None) for k, v in solve_s.items()},
           "dispatchers": {}}
    for n in names:
        out["dispatchers"][n] = {
            "cost": costs[n],
            "gap_to_best_known_pct": {o: 100.0 * (costs[n][o] / best[o] - 1.0) for o in OBJECTIVES},
            "gap_to_bound_pct": {o: 100.0 * (costs[n][o] / bound[o] - 1.0) for o in OBJECTIVES},
        }
    return out


def format_gap(g: Dict) -> List[str]:
    """Printable lines of a :func:`gap_study` result."""
    ex = g["exact"]
    pr = g["proven_optimal"]
    head = (f"gap study B={g['B']} W={g['W']} shares {g['shares']}, {g['iterations']} batches after {g['warmup']}"
            f" warm-up: reference = {'CP-SAT optimum' if ex else 'none'}"
            + (f" (proven on {pr['total']}/{g['iterations']} batches for total, {pr['makespan']} for makespan;"
               f" else its best dispatch found in {g['exact_limit_s']:.0f} s)" if ex else "")
            + f"; bound = {'max(LP, CP-SAT bound)' if ex else 'LP relaxation'}"
            f" (mean solve s: {g['solve_s_mean']})")
    lines = [head, f"  {'dispatcher':>16} | {'total_s':>9} {'vs ref%':>8} {'vs LB%':>8} |"
                   f" {'mksp_s':>9} {'vs ref%':>8} {'vs LB%':>8}"]
    for n, d in g["dispatchers"].items():
        lines.append(f"  {n:>16} | {d['cost']['total']:9.4f} {d['gap_to_best_known_pct']['total']:8.2f}"
                     f" {d['gap_to_bound_pct']['total']:8.2f} | {d['cost']['makespan']:9.4f}"
                     f" {d['gap_to_best_known_pct']['makespan']:8.2f} {d['gap_to_bound_pct']['makespan']:8.2f}")
    lines.append(f"  {'best known':>16} | {g['best_known']['total']:9.4f} {'':>8} "
                 f"{100 * (g['best_known']['total'] / g['lower_bound']['total'] - 1):8.2f} |"
                 f" {g['best_known']['makespan']:9.4f} {'':>8}"
                 f" {100 * (g['best_known']['makespan'] / g['lower_bound']['makespan'] - 1):8.2f}")
    return lines
