"""How much link time a dispatcher could still win by searching longer or
looking one batch ahead (issue 18's "know the headroom", beside
``dispatch_true_cost.py``'s per-batch gaps).

    python benchmarks/dispatch_horizon.py [--workload {iid,sessions}] [--iters 32]
        [--shares 229,158,109,16] [--out F.json]

A fresh cache directory (:class:`torchrec_esd.cache.CacheDirectory`, cold
caches, staleness 0) per variant is fed ``--iters`` global batches, each
dispatched by the variant on the directory's own state; the ground truth is the
directory's plan of every iteration (rows each worker pulls and pushes, per
kind, over its link, as in ``dispatch_true_cost.py``; no per-message latency),
summed after ``--warmup-skip`` iterations (beside it, the dirty rows left in every
cache after the last one, which the end of training writes back: ``end_to_end.py``'s
link time includes them).  Variants, all at the same shares:

* ``laia``, ``esd``: the product's dispatchers (``make_dispatcher``).
* ``esd+ils:K``: esd's answer, then ``K`` rounds of a perturbation (8 random
  swaps between workers) followed by esd's local search
  (:func:`torchrec_esd.dispatch.dedup_search.refine`), keeping the best
  predicted cost: what a longer search of the same objective buys.
* ``esd+next``: the batch decided together with the NEXT batch (one
  de-duplicated problem over both, the shares doubled: a row both batches use
  on one worker is pulled once), then the batch's own part brought back to
  its shares and refined on the batch alone: what a dispatcher that sees one
  batch ahead (the dispatch-ahead queue holds it) buys.
* ``esd+reuse:L``: esd with every gradient push of a shared row priced
  ``1 + L * q`` times, ``q`` the chance that the worker uses the row in the
  next batch (from its uses in this one): sharing a row now leaves every
  user's copy stale at its next use.

Two variants do not keep the shares:

* ``esd+shares``: esd with shares decided per batch
  (:class:`torchrec_esd.dispatch.shares.PerBatchShares`, online, around the
  ``--shares``), the workers' compute at ``--samples-per-s`` (one rate, the
  prior ``end_to_end.py`` gives it, or one per worker, e.g. the rates a run
  measured: its JSON's ``compute_samples_per_s_last``; a training job
  measures them as it goes, so its shares differ from these).
* ``laia@esd+shares``: LAIA at the shares ``esd+shares`` chose, batch by
  batch (``esd+shares`` runs first): ESD's per-batch-share method against
  LAIA given the same shares.

The default ``--shares`` are the planner's shares on the hetero mix that
``end_to_end.py`` measures (its JSON's ``shares`` for ``+plan`` methods);
``equal`` splits the batch evenly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dispatch_true_cost as dtc  # noqa: E402  (the same world and ground truth)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from torchrec_esd.apps.sessions import make_workload, make_workload_config  # noqa: E402
from torchrec_esd.cache import CacheDirectory  # noqa: E402
from torchrec_esd.cost import DedupCost  # noqa: E402
from torchrec_esd.dispatch import dedup_search, make_dispatcher  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=("iid", "sessions"), default="iid")
    p.add_argument("--iters", type=int, default=32)
    p.add_argument("--warmup-skip", type=int, default=2)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--bandwidths", default="1000,100,50,10")
    p.add_argument("--shares", default="229,158,109,16", help="samples per worker, or 'equal'")
    p.add_argument("--variants", default="laia,esd,esd+ils:5,esd+ils:20,esd+next,esd+reuse:0.5,esd+reuse:1")
    p.add_argument("--samples-per-s", default="5000",
                   help="esd+shares: the workers' compute rates (samples/s): one for all, or one per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def concat_batches(a: KeyedJaggedTensor, b: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """The samples of ``a`` then those of ``b`` as one KJT (same keys)."""
    da, db = a.to_dict(), b.to_dict()
    lengths, values = [], []
    for k in a.keys():
        lengths += [da[k].lengths(), db[k].lengths()]
        values += [da[k].values(), db[k].values()]
    return KeyedJaggedTensor(keys=a.keys(), values=torch.cat(values), lengths=torch.cat(lengths),
                             stride=a.stride() + b.stride())


def to_shares(a: np.ndarray, shares: List[int], rng: np.random.Generator) -> np.ndarray:
    """``a`` with samples moved from workers over their share to workers under it."""
    a = a.copy()
    surplus = np.bincount(a, minlength=len(shares)) - np.asarray(shares)
    for w in np.flatnonzero(surplus > 0):
        for s in rng.permutation(np.flatnonzero(a == w))[: surplus[w]]:
            v = int(np.flatnonzero(surplus < 0)[0])
            a[s] = v
            surplus[w] -= 1
            surplus[v] += 1
    return a


def ils(dedup, a: np.ndarray, rounds: int, rng: np.random.Generator) -> np.ndarray:
    """``rounds`` perturbations (8 swaps across workers) each refined, the best kept."""
    best, best_c = a, dedup.total(a)
    for _ in range(rounds):
        b = best.copy()
        for _ in range(8):
            i, j = rng.integers(0, b.size, 2)
            b[i], b[j] = b[j], b[i]
        b, info = dedup_search.refine(dedup, b)
        if info["cost"] < best_c - 1e-15:
            best, best_c = b, info["cost"]
    return best


def reuse_priced(dedup, shares: List[int], lam: float) -> DedupCost:
    """A copy of ``dedup`` with each push priced ``1 + lam * q[x, w]``, ``q`` the chance
    that worker ``w``'s next share of a batch like this one uses row ``x``."""
    n = dedup.uses[:, None] / dedup.num_samples
    q = 1.0 - (1.0 - np.minimum(n, 1.0)) ** np.asarray(shares, dtype=np.float64)[None, :]
    return DedupCost(dedup.num_samples, dedup.num_workers, dedup.occ_s, dedup.occ_k, dedup.pull,
                     dedup.push * (1.0 + lam * q), dedup.owner, dedup.owner_push)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_variant(name: str):
    """``name.partition(":")`` of a known variant; exits with the known ones otherwise."""
    kind, sep, param = name.partition(":")
    if not ((kind in ("laia", "esd", "esd+next", "esd+shares", "laia@esd+shares") and not sep)
            or (kind == "esd+ils" and param.isdigit()) or (kind == "esd+reuse" and _is_float(param))):
        raise SystemExit(f"unknown variant {name!r}: laia, esd, esd+ils:K, esd+next, esd+reuse:L, esd+shares or "
                         "laia@esd+shares")
    return kind, sep, param


def run_variant(name: str, args, wl, bws: List[float], replay: Optional[List[List[int]]] = None) -> Dict:
    """One variant's run; ``replay``: the per-step shares ``laia@esd+shares`` takes."""
    kind, _, param = check_variant(name)
    if kind == "laia@esd+shares" and (replay is None or len(replay) < args.iters):
        raise SystemExit("laia@esd+shares needs the shares of an esd+shares run of as many iterations")
    base_args = dtc.parse_args(["--workload", args.workload, "--batch", str(args.batch),
                                "--bandwidths", args.bandwidths, "--seed", str(args.seed)])
    tables, config, cm, rb = dtc.build(base_args, wl, bws)
    B, W = args.batch, config.num_workers
    shares = (config.batch_shares(B) if args.shares == "equal"
              else [int(x) for x in args.shares.split(",")])
    if len(shares) != W or sum(shares) != B:
        raise SystemExit(f"--shares {shares} must be {W} counts summing to {B}")
    if kind == "esd+shares":
        rates = [float(x) for x in str(args.samples_per_s).split(",")]
        if len(rates) not in (1, W):
            raise SystemExit(f"--samples-per-s: one rate or {W}, got {args.samples_per_s}")
        d = make_dispatcher("shares", inner="esd", samples_per_s=rates * W if len(rates) == 1 else rates,
                            measured_compute=False)
    else:
        d = dtc.make("laia" if kind.startswith("laia") else "esd", base_args)
    taken = []  # samples per worker, every step
    directory = CacheDirectory(config, tables)
    rng = np.random.default_rng(args.seed)
    secs = torch.zeros(args.iters, W, dtype=torch.float64)
    dec_ms, predicted = [], []
    for step in range(args.iters):
        kjt = wl.global_batch(step, B).sparse_features
        at = replay[step] if kind == "laia@esd+shares" else shares  # the shares this step keeps
        t0 = time.perf_counter()
        if kind == "esd+next":
            both = concat_batches(kjt, wl.global_batch(step + 1, B).sparse_features)
            _, aux2 = d.inputs(cm, both, directory.cost_views())
            a2, _ = dedup_search.start_and_refine(aux2["dedup"], [2 * s for s in shares])
            _, aux = d.inputs(cm, kjt, directory.cost_views())
            a, _ = dedup_search.refine(aux["dedup"], to_shares(a2[:B], shares, rng))
        else:
            cost, aux = d.inputs(cm, kjt, directory.cost_views())
            priced = aux
            if kind == "esd+reuse":
                priced = {**aux, "dedup": reuse_priced(aux["dedup"], shares, float(param))}
            a = d.assign(cost, at, aux=priced).assignment.numpy()
            if kind == "esd+ils":
                a = ils(aux["dedup"], a, int(param), rng)
        dec_ms.append((time.perf_counter() - t0) * 1e3)
        if not kind.startswith("laia"):
            # the batch's predicted cost on the unpriced model (what the search optimises)
            predicted.append(aux["dedup"].total(a))
        taken.append(np.bincount(a, minlength=W).tolist())
        if kind != "esd+shares" and taken[-1] != list(at):
            raise AssertionError(f"{name}: assignment off its shares at step {step}")
        rows = dtc.plan_rows(directory.plan(kjt, torch.from_numpy(np.ascontiguousarray(a))))
        secs[step] = dtc.link_seconds(config, rows, rb)
    steady = secs[args.warmup_skip:]
    # the dirty rows left in every cache after the last iteration, which the end of training writes
    # back (in a training job's link time, not in total_s), priced as one push per link
    dirty = directory.cache_state().ndirty.sum(1).to(torch.float64)
    return {"total_s": float(steady.sum()), "per_worker_s": steady.sum(0).tolist(),
            "final_dirty_rows": dirty.tolist(), "final_write_back_s": dtc.link_seconds(config, dirty.view(-1, 1), rb).tolist(),
            "decision_ms_mean": float(np.mean(dec_ms)),
            "predicted_total_s": float(sum(predicted)) if predicted else None, "shares": shares,
            "shares_per_step": taken, "mean_shares": np.mean(taken[args.warmup_skip:], 0).tolist()}


def main(argv=None) -> Dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    wl = make_workload(make_workload_config(args.workload, alpha=1.1, max_cardinality=20000, seed=args.seed))
    bws = [float(x) for x in args.bandwidths.split(",")]
    names = [n for n in args.variants.split(",") if n]
    for n in names:  # every name checked before any run
        check_variant(n)
    res = {}
    print(f"workload {args.workload}, {args.iters} iterations from cold caches (first {args.warmup_skip} left"
          f" out), B={args.batch}, links {bws} Mbit/s, shares {args.shares}; link seconds from the"
          " directory's plans")
    if "laia@esd+shares" in names and "esd+shares" not in names:  # the shares it replays
        names.insert(names.index("laia@esd+shares"), "esd+shares")
    for n in sorted(names, key=lambda n: n == "laia@esd+shares"):  # after esd+shares
        res[n] = run_variant(n, args, wl, bws, replay=res.get("esd+shares", {}).get("shares_per_step"))
    res = {n: res[n] for n in names}
    ref = res.get("laia", {}).get("total_s")
    for n, r in res.items():
        cut = f"{100 * (1 - r['total_s'] / ref):6.2f} %" if ref else "-"
        pred = f"{r['predicted_total_s']:.4f}" if r["predicted_total_s"] is not None else "-"
        print(f"{n:>14}: link {r['total_s']:.4f} s, {cut} less than laia, predicted {pred},"
              f" decision {r['decision_ms_mean']:.1f} ms, per worker {[round(x, 3) for x in r['per_worker_s']]}")
        if ref:
            r["cut_vs_laia_pct"] = 100 * (1 - r["total_s"] / ref)
    if "laia@esd+shares" in res:
        same = res["esd+shares"]["cut_vs_laia_same_shares_pct"] = \
            100 * (1 - res["esd+shares"]["total_s"] / res["laia@esd+shares"]["total_s"])
        print(f"esd+shares vs laia at the same per-batch shares: {same:.2f} % less link time (mean shares "
              f"{[round(x, 1) for x in res['esd+shares']['mean_shares']]})")
    out = {"args": vars(args), "results": res}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
