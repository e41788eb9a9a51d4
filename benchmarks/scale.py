"""Scale: ESD's dispatch and cache planning at W in {4, 16, 64, 256} workers.

    python benchmarks/scale.py --out results.json [--quick]

A single-process simulation with the real pieces and no training: the real
cache directory (:class:`torchrec_esd.cache.CacheDirectory`), the real cost
model and the real dispatchers.  Per worker count ``W``:

* links drawn log-uniform in ``[--bw-min, --bw-max]`` Mbit/s (seeded, the same
  draw prefix for every ``W``);
* the global batch scales with ``W`` (``--per-worker-batch`` samples per
  worker, equal shares);
* ``--tables`` tables of up to ``--max-rows`` rows (default 13 tables from 1e9
  rows down by sqrt(10) steps, ~1.4e9 rows in all), one-hot features whose
  raw ids are Zipf(``--alpha``) and hashed into the table
  (:func:`torchrec_esd.ops.hash_ids`): nothing table-sized is allocated;
* every worker caches ``--cache-rows`` rows (split evenly over the tables).

For each ``W`` and dispatcher a fresh (cold) directory is fed ``--iters``
batches; per iteration the dispatcher reads the cost model's inputs from the
directory and decides (:meth:`Dispatcher.decide`; ``decision ms`` = inputs +
solve: what the dispatcher rank spends; ``grouped`` builds a ``[B, G]`` input
and per-group slices instead of the ``[B, W]`` matrix), the directory plans, and the plans' rows per kind times the row
bytes over each worker's link give its link seconds (ground truth, as in
``dispatch_true_cost.py``).  The modelled iteration is the link makespan (the
slowest link; compute left out, which makes the decision's share larger); a
second figure adds a stated compute time per sample
(``--compute-us-per-sample``) to every worker's link seconds, without overlap
(``iteration_compute_s``, the largest worker's sum).  ``critical ms``: for
``grouped``, the decision with its groups' slices and inner solves on ranks
of their own (everything else plus the slowest group; what moving the
samples and results between ranks would cost is not counted); for
``grouped-split`` (``--grouped-slices`` stage-1 slices of the batch, each priced
on the groups from the directory's group bits and put on them on its own, then
each group reading only its samples and its workers' cached copies:
:meth:`GroupedDispatcher._decide_split`) the slowest slice plus the slowest
group; for the other dispatchers it equals the decision.  ``directory plan ms``
is the dispatcher's whole-directory step (every worker's cache step, the holder
index and, for ``grouped-split``, the group bits it keeps); ``summaries ms`` the
workers' :class:`StepSummary` it builds first.  ``split crit`` / ``split all`` (for the
``--split-step`` dispatchers): the same step and summaries split over a group
rank per group and as many row shards (:mod:`torchrec_esd.cache.split_step`),
the slowest rank of each of its four phases summed / every rank's time summed,
checked at every step against the whole-directory step's plans, summaries and
group bits (messages between the ranks not timed; ``split_*_sent_kb``: the most
one rank sends in each phase, as the tensors are).

Per-worker planning: ``--sample-workers`` workers also run a directory that
tracks themselves alone, fed (a) their :class:`StepSummary` (``plan ms``,
:meth:`CacheDirectory.plan_from_summary`: what a worker does per step in the
summary design) and (b) the global batch (``self ms``: the same worker
deriving everything from the global batch, the runtime's path before
``EsdInputDist`` shipped summaries).  Directory
bytes per worker are measured on the tensors (:meth:`CacheDirectory.nbytes`).

Headline memory figure: one worker's directory at ``--big-table-rows`` rows
with a ``--big-cache-rows`` cache (defaults 1e9 and 1e6), built and planned a
few steps; the design it replaces needed 4 B (slot map) + 8 B (latest
version) per row and tracked worker, plus an 8 B per row bincount per step.

Steady-state figures are means over iterations after the first
``--warmup`` ones.  Python's cyclic garbage collector is off while an
iteration is timed and runs between iterations (as ``timeit`` does): the
simulation's heap of up to 256 directories made a collection cost ~120 ms,
landing on whichever step it fell in.  Results JSON + a plot (skipped without matplotlib).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from typing import Dict, List

import numpy as np
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torchrec_esd import ops  # noqa: E402
from torchrec_esd.cache import KINDS, CacheDirectory  # noqa: E402
from torchrec_esd.cache.split_step import make_split_ranks, shard_of, split_step  # noqa: E402
from torchrec_esd.cost.group_inputs import link_groups  # noqa: E402
from torchrec_esd.config import EsdConfig, heterogeneous_workers  # noqa: E402
from torchrec_esd.cost import CostModel  # noqa: E402
from torchrec_esd.dispatch import make_dispatcher  # noqa: E402

OLD_BYTES_PER_ROW = 12  # int32 slot map + int64 latest version per row (the replaced design)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="scale.json")
    p.add_argument("--quick", action="store_true", help="W in {4, 16}, 4 iterations")
    p.add_argument("--workers", default="4,16,64,256")
    p.add_argument("--dispatchers", default="random,laia,heuristic,hybrid,esd,grouped")
    p.add_argument("--optimal-max-w", type=int, default=16, help="run 'optimal' only up to this W")
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--per-worker-batch", type=int, default=64)
    p.add_argument("--tables", type=int, default=13)
    p.add_argument("--max-rows", type=float, default=1e9)
    p.add_argument("--alpha", type=float, default=1.1)
    p.add_argument("--cache-rows", type=int, default=16384, help="per worker, all tables")
    p.add_argument("--bw-min", type=float, default=5.0)
    p.add_argument("--bw-max", type=float, default=1000.0)
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--optimizer-state-bytes", type=int, default=4)
    p.add_argument("--sample-workers", type=int, default=4)
    p.add_argument("--big-table-rows", type=float, default=1e9)
    p.add_argument("--big-cache-rows", type=int, default=1_000_000)
    p.add_argument("--hybrid-budget-ms", type=float, default=50.0)
    p.add_argument("--group-size", type=int, default=16, help="workers per group of 'grouped'")
    p.add_argument("--grouped-inner", default="heuristic", help="dispatcher inside each group of 'grouped'")
    p.add_argument("--grouped-slices", type=int, default=16,
                   help="stage-1 sample slices of 'grouped-split' (grouped with no step reading the whole batch)")
    p.add_argument("--split-step", default="grouped,grouped-split",
                   help="dispatchers whose runs also run the split directory step (cache/split_step.py):"
                        " a group rank per group of --group-size workers, as many row shards")
    p.add_argument("--grouped-cost-input", default=None, choices=["additive", "expected"],
                   help="cost matrix 'grouped' reads (default: its inner dispatcher's)")
    p.add_argument("--compute-us-per-sample", type=float, default=100.0,
                   help="stated per-sample compute for the 'with compute' iteration (default 100 us = 1e4 samples/s:"
                        " the DLRM end-to-end workers measured 5e3-2e4 samples/s on this CPU,"
                        " benchmarks/results/issue18_overhead_and_measured_shares.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.quick:
        args.workers, args.iters, args.warmup = "4,16", 4, 1
    return args


def make_tables(args) -> List[EmbeddingBagConfig]:
    rows = [max(1000, int(args.max_rows / math.sqrt(10) ** i)) for i in range(args.tables)]
    return [EmbeddingBagConfig(name=f"t{i}", embedding_dim=args.embedding_dim, num_embeddings=n,
                               feature_names=[f"f{i}"]) for i, n in enumerate(rows)]


def link_bandwidths(args, W: int) -> List[float]:
    rng = np.random.default_rng(args.seed)
    u = rng.random(max(W, 256))[:W]  # the same prefix for every W
    return list(np.exp(np.log(args.bw_min) + u * (np.log(args.bw_max) - np.log(args.bw_min))))


def global_batch(tables, B: int, step: int, alpha: float, seed: int) -> KeyedJaggedTensor:
    """One-hot features; raw ids Zipf(alpha) hashed into each table."""
    rng = np.random.default_rng([seed, step])
    vals = []
    for i, t in enumerate(tables):
        raw = np.minimum(rng.zipf(alpha, B), 1 << 62).astype(np.int64)
        vals.append(ops.hash_ids(torch.from_numpy(raw), i + 1, t.num_embeddings))
    return KeyedJaggedTensor(keys=[t.feature_names[0] for t in tables], values=torch.cat(vals),
                             lengths=torch.ones(len(tables) * B, dtype=torch.int32))


def make_config(args, tables, W: int) -> EsdConfig:
    per = max(1, args.cache_rows // len(tables))
    cache = {t.name: min(per, t.num_embeddings) for t in tables}
    return EsdConfig(workers=heterogeneous_workers(link_bandwidths(args, W), cache))


def make(name: str, args):
    kw = {}
    if name in ("random", "laia"):
        kw["seed"] = args.seed
    if name == "hybrid":
        kw["time_budget_ms"] = args.hybrid_budget_ms
        kw["stake_ratio"] = 0.0  # time every decision: no plain-split batches (dispatch/stake.py)
    if name == "esd":
        kw["stake_ratio"] = 0.0
    if name in ("grouped", "grouped-split"):
        kw["group_size"], kw["inner"] = args.group_size, args.grouped_inner
        kw["cost_input"] = args.grouped_cost_input
        if name == "grouped-split":  # no step reads the whole batch (GroupedDispatcher.stage1_slices)
            name, kw["stage1_slices"] = "grouped", args.grouped_slices
    return make_dispatcher(name, **kw)


def link_seconds(config: EsdConfig, rows_wk: torch.Tensor, row_bytes: float) -> torch.Tensor:
    return torch.tensor([sum(spec.link_time(float(r) * row_bytes, 1.0) for r in rows_wk[w] if r > 0)
                         for w, spec in enumerate(config.workers)], dtype=torch.float64)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def one_iteration(args, W: int, name: str, step: int, d, cm, config, directory, tables, B: int, shares, sample,
                  alone, selfd, row_bytes: float, split, rec: Dict[str, List]) -> None:
    """One timed iteration of :func:`run` (its records appended to ``rec``)."""
    kjt = global_batch(tables, B, step, args.alpha, args.seed)
    t0 = time.perf_counter()
    r = d.decide(cm, kjt, directory.cache_state(), shares)  # what the dispatcher rank runs
    t_dec = _ms(t0)
    rec["inputs_ms"].append(t_dec - r.decision_s * 1e3)
    rec["solve_ms"].append(r.decision_s * 1e3)
    rec["decision_ms"].append(t_dec)
    # grouped: the groups' slices and inner solves are independent; on ranks of their own the
    # decision would take everything else plus the slowest group (transfers not counted)
    info = r.info or {}
    if "critical_s" in info:  # grouped-split: the slowest stage-1 slice plus the slowest group
        rec["critical_ms"].append(1e3 * info["critical_s"])
    else:
        rec["critical_ms"].append(t_dec - 1e3 * (info.get("group_s_sum", 0.0) - info.get("group_s_max", 0.0)))
    t0 = time.perf_counter()
    sums = directory.step_summaries(kjt, r.assignment)
    rec["summaries_ms"].append(_ms(t0))
    t0 = time.perf_counter()
    plan = directory.plan(kjt, r.assignment)
    rec["directory_plan_ms"].append(_ms(t0))
    if split:
        check_split_step(W, name, step, directory, *split, kjt, r.assignment, plan, sums, rec)
    pm, sm, sb = [], [], []
    for w in sample:
        t0 = time.perf_counter()
        pw = alone[w].plan_from_summary(sums[w])
        pm.append(_ms(t0))
        sb.append(sums[w].nbytes())
        t0 = time.perf_counter()
        selfd[w].plan(kjt, r.assignment)
        sm.append(_ms(t0))
        if not torch.equal(pw.used_slot, plan.workers[w].used_slot) or pw.rows != plan.workers[w].rows:
            raise SystemExit(f"W={W} {name} step {step}: worker {w}'s plan from its summary differs")
    rec["plan_ms"].append(float(np.mean(pm)))
    rec["self_ms"].append(float(np.mean(sm)))
    rec["summary_bytes"].append(float(np.mean(sb)))
    rows = torch.tensor([[p.rows[k] for k in KINDS] for p in plan.workers], dtype=torch.float64)
    secs = link_seconds(config, rows, row_bytes)
    rec["makespan_s"].append(float(secs.max()))
    n_w = torch.bincount(r.assignment, minlength=W).double()
    rec["iteration_compute_s"].append(float((secs + n_w * args.compute_us_per_sample * 1e-6).max()))
    rec["total_s"].append(float(secs.sum()))
    rec["per_worker_s"].append(secs.tolist())


def run(args, tables, W: int, name: str) -> Dict:
    config = make_config(args, tables, W)
    cm = CostModel(config, tables, optimizer_state_bytes_per_row=args.optimizer_state_bytes)
    row_bytes = float(cm.row_bytes[0])
    B = args.per_worker_batch * W
    shares = config.batch_shares(B)
    d = make(name, args)
    directory = CacheDirectory(config, tables)
    sample = sorted({int(round(i * (W - 1) / max(1, args.sample_workers - 1))) for i in range(args.sample_workers)})
    alone = {w: CacheDirectory(config, tables, track=[w]) for w in sample}  # plans from summaries
    selfd = {w: CacheDirectory(config, tables, track=[w]) for w in sample}  # plans from the global batch
    split = name in [x for x in args.split_step.split(",") if x]
    if split:  # the grouped dispatcher's groups (link_groups), a row shard per group
        groups = link_groups(cm.bytes_per_second, list(range(W)), args.group_size)
        ranks, shards, group_of = make_split_ranks(config, tables, groups, len(groups), keyspace=directory.keyspace)
    rec: Dict[str, List] = {k: [] for k in ("decision_ms", "inputs_ms", "solve_ms", "critical_ms",
                                            "split_critical_ms", "split_total_ms", "split_count_ms",
                                            "split_route_ms", "split_step_ms", "split_apply_ms",
                                            "split_count_sent_kb", "split_route_sent_kb", "split_step_sent_kb",
                                            "iteration_compute_s", "directory_plan_ms",
                                            "summaries_ms", "plan_ms", "self_ms", "summary_bytes",
                                            "makespan_s", "total_s", "per_worker_s")}
    gc.disable()  # collected between iterations, untimed (as timeit does): see the module docstring
    try:
        for step in range(args.iters):
            gc.collect()
            one_iteration(args, W, name, step, d, cm, config, directory, tables, B, shares, sample, alone, selfd,
                          row_bytes, split and (ranks, shards, group_of), rec)
    finally:
        gc.enable()
    ss = slice(min(args.warmup, args.iters - 1), None)
    out = {k: float(np.mean(v[ss])) if v else None for k, v in rec.items() if k != "per_worker_s"}
    if split:
        out["split_group_rank_bytes_max"] = max(rk.nbytes() for rk in ranks)
        out["split_shard_bytes_max"] = max(sh.nbytes() for sh in shards)
        out["split_ranks"] = [len(ranks), len(shards)]
    out["decision_ms_max"] = float(np.max(rec["decision_ms"][ss]))
    out["per_worker_s"] = np.mean(np.array(rec["per_worker_s"][ss]), 0).tolist()
    out["decision_pct_of_iteration"] = 100.0 * out["decision_ms"] / 1e3 / max(out["makespan_s"], 1e-12)
    out["critical_pct_of_iteration"] = 100.0 * out["critical_ms"] / 1e3 / max(out["makespan_s"], 1e-12)
    out["decision_pct_of_iteration_compute"] = 100.0 * out["decision_ms"] / 1e3 / max(out["iteration_compute_s"], 1e-12)
    out["critical_pct_of_iteration_compute"] = 100.0 * out["critical_ms"] / 1e3 / max(out["iteration_compute_s"], 1e-12)
    out["directory_bytes_per_worker"] = directory.nbytes(0)
    out["dispatcher_directory_bytes"] = directory.nbytes()
    out["old_design_bytes_per_worker"] = OLD_BYTES_PER_ROW * directory.total_rows
    out["B"] = B
    out["sampled_workers"] = sample
    return out


def check_split_step(W: int, name: str, step: int, directory: CacheDirectory, ranks, shards, group_of, kjt,
                     assignment: torch.Tensor, plan, sums, rec: Dict[str, List]) -> None:
    """The split directory step (cache/split_step.py) of this batch, timed rank by rank,
    and checked against the dispatcher directory that just planned it: every worker's plan
    and summary, and the shards' group bits and owners of the batch's rows."""
    keys, sample = directory.batch_keys(kjt)
    res = split_step(ranks, shards, keys, assignment[sample], torch.bincount(assignment, minlength=W).tolist(),
                     summaries=True)
    rec["split_critical_ms"].append(1e3 * res.critical_s)
    rec["split_total_ms"].append(1e3 * res.total_s)
    for ph, v in res.phase_s.items():
        rec[f"split_{ph}_ms"].append(1e3 * max(v))
    for ph, v in res.sent_bytes.items():  # the most one rank sends in the phase
        rec[f"split_{ph}_sent_kb"].append(max(v) / 1024)
    for w in range(W):
        p, q, s, e = res.plans[w], plan.workers[w], res.summaries[w], sums[w]
        if not (torch.equal(p.used_slot, q.used_slot) and p.rows == q.rows and torch.equal(p.push_keys, q.push_keys)
                and torch.equal(s.user_keys, e.user_keys) and torch.equal(s.user_counts, e.user_counts)):
            raise SystemExit(f"W={W} {name} step {step}: the split step's plan or summary of worker {w} differs")
    u = torch.unique(keys)
    held, fresh = directory.holder_index().group_bits(group_of, u)
    owner = directory.holder_index().dirty_owner(group_of, u)
    where = shard_of(u, len(shards))
    for j, sh in enumerate(shards):
        m = where == j
        h, f = sh.group_bits(u[m])
        if not (torch.equal(h, held[m]) and torch.equal(f, fresh[m]) and torch.equal(sh.dirty_owner(u[m]), owner[m])):
            raise SystemExit(f"W={W} {name} step {step}: shard {j}'s group bits or owners differ")


def big_directory(args) -> Dict:
    """One worker's directory at the headline size, planned a few steps."""
    rows = int(args.big_table_rows)
    tables = [EmbeddingBagConfig(name="big", embedding_dim=args.embedding_dim, num_embeddings=rows, feature_names=["f0"])]
    config = EsdConfig(workers=heterogeneous_workers([100.0, 100.0], args.big_cache_rows))
    full = CacheDirectory(config, tables)
    mine = CacheDirectory(config, tables, track=[0])
    B = 2 * args.per_worker_batch * 16
    ms = []
    for step in range(6):
        kjt = global_batch(tables, B, step, args.alpha, args.seed)
        a = torch.arange(B) % 2
        sums = full.step_summaries(kjt, a)
        full.plan(kjt, a)
        t0 = time.perf_counter()
        mine.plan_from_summary(sums[0])
        ms.append(_ms(t0))
    return {"table_rows": rows, "cache_rows": args.big_cache_rows, "dense_map": mine._w[0].dense,
            "directory_bytes": mine.nbytes(0), "old_design_bytes": OLD_BYTES_PER_ROW * rows,
            "plan_ms": float(np.mean(ms[2:]))}


def plot(res: Dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    Ws = sorted({int(w) for w in res})
    names = list(next(iter(res.values())).keys())
    fig, ax = plt.subplots(1, 4, figsize=(20, 4))
    for n in names:
        ax[0].plot(Ws, [res[str(w)][n]["decision_pct_of_iteration"] if n in res[str(w)] else np.nan for w in Ws], "o-", label=n)
        ax[1].plot(Ws, [res[str(w)][n]["makespan_s"] if n in res[str(w)] else np.nan for w in Ws], "o-", label=n)
    ax[0].axhline(10, color="k", ls=":")
    ax[0].set(xscale="log", yscale="log", xlabel="workers W", ylabel="decision / link makespan (%)")
    ax[1].set(xscale="log", yscale="log", xlabel="workers W", ylabel="link makespan per iteration (s)")
    n0 = names[0]
    ax[2].plot(Ws, [res[str(w)][n0]["plan_ms"] for w in Ws], "o-", label="plan from summary")
    ax[2].plot(Ws, [res[str(w)][n0]["self_ms"] for w in Ws], "s--", label="plan from global batch")
    ax[2].set(xscale="log", yscale="log", xlabel="workers W", ylabel="per-worker planning ms")
    for n in names:  # the dispatcher's directory step: one directory, or split over ranks
        if all(res[str(w)].get(n, {}).get("split_critical_ms") for w in Ws):
            ax[3].plot(Ws, [res[str(w)][n]["directory_plan_ms"] + res[str(w)][n]["summaries_ms"] for w in Ws], "s--",
                       label=f"{n}: one directory")
            ax[3].plot(Ws, [res[str(w)][n]["split_critical_ms"] for w in Ws], "o-", label=f"{n}: split, critical path")
    ax[3].set(xscale="log", yscale="log", xlabel="workers W", ylabel="directory step + summaries ms")
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> Dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    load0 = os.getloadavg()
    tables = make_tables(args)
    print(f"{len(tables)} tables, {sum(t.num_embeddings for t in tables):.3g} rows (largest"
          f" {tables[0].num_embeddings:.3g}), links log-uniform {args.bw_min}-{args.bw_max} Mbit/s,"
          f" {args.per_worker_batch} samples per worker, {args.cache_rows} cache rows per worker")
    print(f"{'W':>4} {'dispatcher':>10} | {'B':>6} {'mksp s':>7} {'total s':>8} | {'dec ms':>8} {'% iter':>7}"
          f" | {'crit ms':>8} {'% iter':>7} | {'+cmp s':>7} {'% dec':>6} {'% crit':>6}"
          f" | {'dir MB/w':>8} {'old MB/w':>9} | {'plan ms':>7} {'self ms':>7} {'sum KB':>6} | {'disp plan ms':>12}"
          f" {'split crit':>10} {'split all':>9}")
    res: Dict[str, Dict] = {}
    for W in [int(x) for x in args.workers.split(",")]:
        res[str(W)] = {}
        for n in [x for x in args.dispatchers.split(",") if x]:
            if n == "optimal" and W > args.optimal_max_w:
                continue
            r = run(args, tables, W, n)
            res[str(W)][n] = r
            print(f"{W:>4} {n:>10} | {r['B']:>6} {r['makespan_s']:7.3f} {r['total_s']:8.2f} | {r['decision_ms']:8.1f}"
                  f" {r['decision_pct_of_iteration']:7.2f} | {r['critical_ms']:8.1f} {r['critical_pct_of_iteration']:7.2f}"
                  f" | {r['iteration_compute_s']:7.3f} {r['decision_pct_of_iteration_compute']:6.1f}"
                  f" {r['critical_pct_of_iteration_compute']:6.1f} | {r['directory_bytes_per_worker'] / 2**20:8.2f}"
                  f" {r['old_design_bytes_per_worker'] / 2**20:9.0f} | {r['plan_ms']:7.2f} {r['self_ms']:7.2f}"
                  f" {r['summary_bytes'] / 1024:6.1f} | {r['directory_plan_ms']:12.1f}"
                  + (f" {r['split_critical_ms']:10.1f} {r['split_total_ms']:9.1f}" if r["split_critical_ms"] else ""))
            sys.stdout.flush()
    big = big_directory(args)
    print(f"one worker's directory, {big['table_rows']:.3g}-row table, {big['cache_rows']} cache rows:"
          f" {big['directory_bytes'] / 2**20:.1f} MiB (replaced design: {big['old_design_bytes'] / 2**20:.0f} MiB),"
          f" plan from summary {big['plan_ms']:.2f} ms")
    result = {"benchmark": "scale", "args": vars(args), "results": res, "big_directory": big,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                          "threads": args.threads, "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg()},
              "wall_s": time.perf_counter() - t_all}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} in {result['wall_s']:.0f} s")
    plot(res, os.path.splitext(args.out)[0] + ".png")
    return result


if __name__ == "__main__":
    main()
