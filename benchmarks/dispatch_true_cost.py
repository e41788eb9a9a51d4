"""Dispatch quality under the TRUE transmission: what the cache directory plans.

    python benchmarks/dispatch_true_cost.py --out results.json [--quick] [--workload {iid,sessions}]

For every dispatcher (``random`` = cache-only with random dispatch, ``laia``,
``heuristic``, ``optimal``, ``hybrid`` (all three on the expected cost
matrix), ``hybrid:additive`` (HybridDis on the additive matrix), ``esd``, and ``esd:0.1``: esd whose
budget is also at most 10 % of the predicted link makespan of its start), a fresh replicated cache
directory (:class:`torchrec_esd.cache.CacheDirectory`, cold caches) is fed
``--iters`` global batches of the default Zipf workload, each dispatched by that
dispatcher on the inputs it asks for (:meth:`Dispatcher.inputs`: additive
matrix, hit counts or the de-duplicated cost model, built from the directory's
own views).  The ground truth is the directory's plan of every iteration: the
rows each worker really pulls and pushes (per kind), times the row bytes, over
the worker's bandwidth (plus one latency per worker, kind and iteration when a
row moves, as in :meth:`CostModel.measure`).

Reported per dispatcher: total link seconds (sum over links and iterations),
makespan link seconds (sum over iterations of the slowest link), both over all
iterations and over the steady state (iterations after ``--warmup-skip``),
rows per kind, per-worker link seconds, mean/max decision ms and input-building
ms, and the reduction of the total vs the better of ``random`` and ``laia``.
A second part times the ``esd`` decision (and ``hybrid``'s) at
``B in {512, 4096}``, ``W in {4, 8}`` after a few iterations of history, with
the iteration's measured link makespan for scale, and the time esd needs to
reach its local optimum (no budget) with the predicted cost it gives up at
the default budget.

Gap to the best possible dispatch (:mod:`dispatch_gap`, solvers in
:mod:`torchrec_esd.dispatch.true_optimum`): on ``--gap-iters`` batches of each
``--gap-small`` size (default 16 and 64 samples, 4 workers) every dispatcher's
de-duplicated cost (total and slowest link) against the CP-SAT optimum (its
best dispatch found within ``--gap-exact-limit-s`` where optimality is not
proven, which the output says) and against the proven lower bound (the better
of the LP relaxation and CP-SAT's bound); at ``--batch`` (default 512) on
``--gap-default-iters`` batches against the LP-relaxation bound and the best
dispatcher.

``--workload sessions`` replaces the iid Zipf batches by the session workload
(:mod:`torchrec_esd.apps.sessions`: users, interest clusters, sessions of
consecutive samples; same tables and item popularity).

Defaults: 4 workers at 1000/100/50/10 Mbit/s, equal shares, batch 512, the
default Zipf workload (26 one-hot features, ``alpha`` 1.1, tables capped at
20 000 rows), embedding dim 16 with row-wise Adagrad state (4 bytes per row),
every worker caching 10 % of every table, staleness 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from torchrec_esd.cache import KINDS, CacheDirectory  # noqa: E402
from torchrec_esd.config import EsdConfig, heterogeneous_workers  # noqa: E402
from torchrec_esd.cost import CostModel  # noqa: E402
from torchrec_esd.dispatch import make_dispatcher  # noqa: E402
from torchrec_esd.apps.sessions import WORKLOADS, make_workload, make_workload_config  # noqa: E402

from dispatch_gap import format_gap, gap_study  # noqa: E402

DISPATCHERS = ["random", "laia", "heuristic", "optimal", "hybrid", "hybrid:additive", "esd", "esd:0.1"]
TARGET_PCT = 36.76


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results.json")
    p.add_argument("--quick", action="store_true", help="12 iterations, timing at W=4 only")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup-skip", type=int, default=10, help="iterations left out of the steady state")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--bandwidths", default="1000,100,50,10", help="Mbit/s, one per worker")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--cache-ratio", type=float, default=0.10)
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--optimizer-state-bytes", type=int, default=4, help="per row (row-wise Adagrad: 4)")
    p.add_argument("--alpha", type=float, default=1.1)
    p.add_argument("--max-cardinality", type=int, default=20000)
    p.add_argument("--staleness", type=int, default=0)
    p.add_argument("--objective", default="total", choices=["total", "makespan"])
    p.add_argument("--dispatchers", default=",".join(DISPATCHERS))
    p.add_argument("--esd-budget-ms", type=float, default=None,
                   help="esd decision budget (default: DedupSearchDispatcher's own)")
    p.add_argument("--hybrid-budget-ms", type=float, default=50.0)
    p.add_argument("--timing", default=None,
                   help="BxW configurations to time ('' = none; default 512x4,4096x4,512x8,4096x8,"
                        " --quick: 512x4,4096x4)")
    p.add_argument("--timing-iters", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workload", default="iid", choices=WORKLOADS,
                   help="iid Zipf ids, or sessions of users with interest clusters (torchrec_esd.apps.sessions)")
    p.add_argument("--locality", type=float, default=None, help="sessions: locality strength (default: the config's)")
    p.add_argument("--gap-small", default=None,
                   help="batch sizes of the exact-optimum gap study (CP-SAT), default 16,64 (--quick: 16,64)")
    p.add_argument("--gap-iters", type=int, default=None, help="batches per small gap study (default 4, --quick 2)")
    p.add_argument("--gap-exact-limit-s", type=float, default=20.0, help="CP-SAT limit per batch and objective")
    p.add_argument("--gap-default-iters", type=int, default=None,
                   help="batches of the LP-bound gap study at --batch (default 2, --quick 1; 0: none)")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.warmup_skip, args.timing_iters = 12, 4, 3
    if args.gap_small is None:
        args.gap_small = "16,64"
    if args.gap_iters is None:
        args.gap_iters = 2 if args.quick else 4
    if args.gap_default_iters is None:
        args.gap_default_iters = 1 if args.quick else 2
    if args.timing is None:
        args.timing = "512x4,4096x4" if args.quick else "512x4,4096x4,512x8,4096x8"
    return args


def build(args, wl, bws: List[float]):
    tables = wl.table_configs(args.embedding_dim)
    cache_rows = {t.name: max(1, int(args.cache_ratio * t.num_embeddings)) for t in tables}
    config = EsdConfig(
        workers=heterogeneous_workers(bws, cache_rows, latency_ms=args.latency_ms),
        staleness=args.staleness,
        objective=args.objective,
    )
    cm = CostModel(config, tables, optimizer_state_bytes_per_row=args.optimizer_state_bytes)
    rb = cm.row_bytes.unique()
    if rb.numel() != 1:
        raise SystemExit("this benchmark assumes one row size for every table")
    return tables, config, cm, float(rb[0])


def make(name: str, args, budget_ms=None):
    """``esd:F`` is esd with ``budget_fraction=F`` (its budget is also at
    most F times the predicted link makespan of its start assignment);
    ``hybrid:additive`` (also ``optimal:`` / ``heuristic:``) decides on the
    additive instead of the expected cost matrix."""
    kw = {"objective": args.objective}
    if name.startswith("esd:"):
        kw["budget_fraction"] = float(name.split(":", 1)[1])
        name = "esd"
    elif ":" in name:
        name, kw["cost_input"] = name.split(":", 1)
    if name in ("random", "laia"):
        kw["seed"] = args.seed
    if name == "hybrid":
        kw["time_budget_ms"] = args.hybrid_budget_ms
    if name == "esd" and (budget_ms or args.esd_budget_ms):
        kw["time_budget_ms"] = budget_ms or args.esd_budget_ms
    return make_dispatcher(name, **kw)


def link_seconds(config, rows_wk: torch.Tensor, row_bytes: float) -> torch.Tensor:
    """[W] seconds of one iteration from its [W, kinds] plan rows."""
    out = torch.zeros(rows_wk.shape[0], dtype=torch.float64)
    for w, spec in enumerate(config.workers):
        for k in range(rows_wk.shape[1]):
            r = float(rows_wk[w, k])
            if r > 0:
                out[w] += spec.link_time(r * row_bytes, 1.0)
    return out


def plan_rows(plan) -> torch.Tensor:
    """[W, kinds] rows one iteration's plan moves per worker and transmission kind."""
    return torch.tensor([[float(p.rows[kind]) for kind in KINDS] for p in plan.workers], dtype=torch.float64)


def link_summary(secs: torch.Tensor, rows: torch.Tensor, warmup_skip: int) -> Dict:
    """Link seconds of a run from its per-iteration [iters, W] seconds and
    [iters, W, kinds] rows: totals, slowest-link sums, steady state (from
    iteration ``warmup_skip``), per worker and per kind."""
    ss = slice(min(warmup_skip, secs.shape[0] - 1), secs.shape[0])
    return {
        "total_s": float(secs.sum()),
        "makespan_s": float(secs.max(1).values.sum()),
        "steady_total_s": float(secs[ss].sum()),
        "steady_makespan_s": float(secs[ss].max(1).values.sum()),
        "per_worker_s": secs.sum(0).tolist(),
        "rows_per_kind": {k: float(rows[:, :, i].sum()) for i, k in enumerate(KINDS)},
    }


def run_dispatcher(name: str, args, wl, bws) -> Dict:
    tables, config, cm, rb = build(args, wl, bws)
    W, B = config.num_workers, args.batch
    shares = config.batch_shares(B)
    d = make(name, args)
    directory = CacheDirectory(config, tables)
    rows = torch.zeros(args.iters, W, len(KINDS), dtype=torch.float64)
    secs = torch.zeros(args.iters, W, dtype=torch.float64)
    measured, predicted, dec_ms, in_ms, solvers = [], [], [], [], {}
    for step in range(args.iters):
        kjt = wl.global_batch(step, B).sparse_features
        views = directory.views()
        t0 = time.perf_counter()
        cost, aux = d.inputs(cm, kjt, views)
        in_ms.append((time.perf_counter() - t0) * 1e3)
        r = d.assign(cost, shares, aux=aux)
        dec_ms.append(r.decision_s * 1e3)
        solvers[r.solver] = solvers.get(r.solver, 0) + 1
        measured.append(cm.measure(kjt, r.assignment, views)["total_s"])
        if aux and "dedup" in aux:
            predicted.append(aux["dedup"].total(r.assignment.numpy()))
        rows[step] = plan_rows(directory.plan(kjt, r.assignment))
        secs[step] = link_seconds(config, rows[step], rb)
    out = {
        **link_summary(secs, rows, args.warmup_skip),
        "rows_per_worker_kind": {k: rows[:, :, i].sum(0).tolist() for i, k in enumerate(KINDS)},
        "per_iteration_total_s": secs.sum(1).tolist(),
        "measure_total_s": float(sum(measured)),
        "decision_ms_mean": sum(dec_ms) / len(dec_ms),
        "decision_ms_max": max(dec_ms),
        "inputs_ms_mean": sum(in_ms) / len(in_ms),
        "solvers": solvers,
    }
    if predicted:
        out["dedup_predicted_total_s"] = float(sum(predicted))
    return out


def time_config(args, wl, B: int, W: int) -> Dict:
    base = [float(x) for x in args.bandwidths.split(",")]
    bws = [base[i % len(base)] for i in range(W)]
    tables, config, cm, rb = build(args, wl, bws)
    shares = config.batch_shares(B)
    directory = CacheDirectory(config, tables)
    esd, hyb, esd_f = make("esd", args), make("hybrid", args), make("esd:0.1", args)
    esd_inf = make_dispatcher("esd", objective=args.objective, time_budget_ms=60_000)
    rec = {"esd_ms": [], "esd_inputs_ms": [], "esd_rounds": [], "esd_at_deadline": [], "hybrid_ms": [],
           "hybrid_inputs_ms": [], "esd_0.1_ms": [], "esd_0.1_predicted_cost_vs_esd": [],
           "esd_converged_ms": [], "esd_predicted_cost_vs_converged": [],
           "iteration_link_makespan_s": []}
    for step in range(args.timing_iters):
        kjt = wl.global_batch(1000 + step, B).sparse_features
        views = directory.views()
        t0 = time.perf_counter()
        cost, aux = hyb.inputs(cm, kjt, views)
        rec["hybrid_inputs_ms"].append((time.perf_counter() - t0) * 1e3)
        rec["hybrid_ms"].append(hyb.assign(cost, shares, aux=aux).decision_s * 1e3)
        t0 = time.perf_counter()
        cost, aux = esd.inputs(cm, kjt, views)
        rec["esd_inputs_ms"].append((time.perf_counter() - t0) * 1e3)
        r = esd.assign(cost, shares, aux=aux)
        rf = esd_f.assign(cost, shares, aux=aux)
        rec["esd_0.1_ms"].append(rf.decision_s * 1e3)
        rec["esd_0.1_predicted_cost_vs_esd"].append(rf.info["cost"] / r.info["cost"])
        ri = esd_inf.assign(cost, shares, aux=aux)
        rec["esd_converged_ms"].append(ri.decision_s * 1e3)
        rec["esd_predicted_cost_vs_converged"].append(r.info["cost"] / ri.info["cost"])
        rec["esd_ms"].append(r.decision_s * 1e3)
        rec["esd_rounds"].append(r.info.get("rounds", 0.0))
        rec["esd_at_deadline"].append(r.info.get("stopped_at_deadline", 0.0))
        plan = directory.plan(kjt, r.assignment)
        rows = torch.tensor([[p.rows[k] for k in KINDS] for p in plan.workers], dtype=torch.float64)
        rec["iteration_link_makespan_s"].append(float(link_seconds(config, rows, rb).max()))
    # the first iterations run from cold caches (more rows): time the later ones
    keep = slice(1 if args.timing_iters > 1 else 0, None)
    out = {"B": B, "W": W}
    for k, v in rec.items():
        v = v[keep]
        out[k] = sum(v) / len(v)
        if k.endswith("_ms"):
            out[k + "_max"] = max(v)
    out["esd_pct_of_iteration_link_makespan"] = 100.0 * out["esd_ms"] / 1e3 / out["iteration_link_makespan_s"]
    return out


def main(argv=None) -> Dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    wkw = dict(alpha=args.alpha, max_cardinality=args.max_cardinality, seed=args.seed)
    if args.workload == "sessions" and args.locality is not None:
        wkw["locality"] = args.locality
    wl = make_workload(make_workload_config(args.workload, **wkw))
    bws = [float(x) for x in args.bandwidths.split(",")]
    names = [n for n in args.dispatchers.split(",") if n]
    res: Dict[str, Dict] = {}
    print(f"workload {args.workload}; {len(bws)} workers at {bws} Mbit/s, B={args.batch}, {args.iters} iterations"
          " from cold caches,"
          f" staleness {args.staleness}, objective {args.objective}; link seconds from the cache"
          " directory's plans (ground truth)")
    print(f"{'dispatcher':>10} | {'total_s':>8} {'makespan':>8} | {'steady':>8} {'st.mksp':>8} |"
          f" {'miss_pull':>9} {'miss_push':>9} {'upd_pull':>9} {'upd_push':>9} | {'dec ms':>7} {'in ms':>6}"
          "  per-worker s")
    for n in names:
        r = run_dispatcher(n, args, wl, bws)
        res[n] = r
        k = r["rows_per_kind"]
        print(f"{n:>10} | {r['total_s']:8.3f} {r['makespan_s']:8.3f} | {r['steady_total_s']:8.3f}"
              f" {r['steady_makespan_s']:8.3f} | {k['miss_pull']:9.0f} {k['miss_push']:9.0f}"
              f" {k['update_pull']:9.0f} {k['update_push']:9.0f} | {r['decision_ms_mean']:7.1f}"
              f" {r['inputs_ms_mean']:6.1f}  {[round(x, 3) for x in r['per_worker_s']]}")
        sys.stdout.flush()
    summary = {}
    base = [b for b in ("random", "laia") if b in res]
    if base:
        for key in ("total_s", "makespan_s", "steady_total_s", "steady_makespan_s"):
            ref_name = min(base, key=lambda b: res[b][key])
            ref = res[ref_name][key]
            summary[key] = {
                "baseline": ref_name,
                "baseline_value": ref,
                "reduction_pct": {n: 100.0 * (1.0 - res[n][key] / ref) for n in names},
            }
        print("reduction vs the better of " + "/".join(base) + " (%):")
        for key, s in summary.items():
            print(f"  {key:>17} (vs {s['baseline']:>6}): "
                  + "  ".join(f"{n} {v:6.2f}" for n, v in s["reduction_pct"].items()))
        if "esd" in res:
            best = summary["total_s"]["reduction_pct"]["esd"]
            print(f"target: >= {TARGET_PCT} % less total link time than the better baseline;"
                  f" esd: {best:.2f} % -> {'MET' if best >= TARGET_PCT else 'NOT met'}")
    gaps = []
    gap_names = [n for n in names if n != "random"] + (["random"] if "random" in names else [])
    studies = [(int(b), args.gap_iters, True) for b in args.gap_small.split(",") if b]
    if args.gap_default_iters > 0:
        studies.append((args.batch, args.gap_default_iters, False))
    for B, iters, exact in studies:
        g = gap_study(gap_names, lambda n: make(n, args), lambda: build(args, wl, bws)[:3], wl, B, iters,
                      warmup=4, exact=exact, exact_limit_s=args.gap_exact_limit_s)
        gaps.append(g)
        print("\n".join(format_gap(g)))
        sys.stdout.flush()
    timing = []
    for cfgs in [c for c in args.timing.split(",") if c]:
        B, W = (int(x) for x in cfgs.split("x"))
        t = time_config(args, wl, B, W)
        timing.append(t)
        print(f"timing B={B:>5} W={W}: esd decision {t['esd_ms']:7.1f} ms (max {t['esd_ms_max']:.1f},"
              f" rounds {t['esd_rounds']:.1f}, at deadline {t['esd_at_deadline']:.0%}) + inputs"
              f" {t['esd_inputs_ms']:.1f} ms; hybrid {t['hybrid_ms']:.1f} + {t['hybrid_inputs_ms']:.1f} ms;"
              f" iteration link makespan {t['iteration_link_makespan_s'] * 1e3:.0f} ms"
              f" (esd decision = {t['esd_pct_of_iteration_link_makespan']:.1f} % of it); esd:0.1"
              f" {t['esd_0.1_ms']:.1f} ms, predicted cost x{t['esd_0.1_predicted_cost_vs_esd']:.4f} of esd's;"
              f" esd to a local optimum {t['esd_converged_ms']:.1f} ms (esd's predicted cost"
              f" x{t['esd_predicted_cost_vs_converged']:.4f} of it)")
        sys.stdout.flush()
    result = {
        "benchmark": "dispatch_true_cost",
        "args": vars(args),
        "dispatchers": res,
        "reduction_vs_best_baseline": summary,
        "target_pct": TARGET_PCT,
        "target_met": bool(summary and "esd" in res
                           and summary["total_s"]["reduction_pct"]["esd"] >= TARGET_PCT),
        "timing": timing,
        "gap_studies": gaps,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": args.threads, "loadavg_at_start": load0,
                    "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "wall_s": time.perf_counter() - t_all,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} in {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
