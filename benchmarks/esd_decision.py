"""The ``esd`` decision: time (inputs + assign) and cost, C++ local search vs the numpy one.

    python benchmarks/esd_decision.py --out results.json [--workloads iid,sessions] [--batches 512,4096]

For every workload and batch size (W = 4 workers at 1000/100/50/10 Mbit/s, the
defaults of ``dispatch_true_cost.py``), a cache directory is fed ``--steps``
global batches from cold caches, each dispatched by ``esd`` (default budget)
with the C++ operators (:func:`torchrec_esd.ops.dedup_decide`: the start
and the local search in one call).  On every
batch after ``--warmup`` the same inputs are also decided in numpy (start
:func:`~torchrec_esd.dispatch.dedup_search.start_reference`, search
:func:`~torchrec_esd.dispatch.dedup_refine_reference.refine_reference`,
the path without the operators) and, for both, the script records the decision
time (inputs built from ``CacheDirectory.cache_state()``, what the runtime
passes, plus ``assign``), the predicted de-duplicated cost
(:meth:`DedupCost.total`) and the true link seconds of the assignment
(:meth:`CostModel.measure`, same state).  Run under ``flock
/tmp/esd_bench.lock`` on a shared machine.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from torchrec_esd import ops  # noqa: E402
from torchrec_esd.apps.sessions import make_workload, make_workload_config  # noqa: E402
from torchrec_esd.cache import CacheDirectory  # noqa: E402
from torchrec_esd.dispatch import make_dispatcher  # noqa: E402

import dispatch_true_cost as dtc  # noqa: E402


FLAGS = ("HAS_DEDUP_REFINE", "HAS_DEDUP_START", "HAS_DEDUP_DECIDE", "HAS_DEDUP_INPUTS")  # the esd operators


def decide(esd, cm, kjt, state, shares, native: bool):
    saved = {f: getattr(ops, f) for f in FLAGS}
    for f in FLAGS:
        setattr(ops, f, saved[f] and native)
    try:
        cm._last_state = None  # build the inputs afresh (no memo of an earlier call)
        t0 = time.perf_counter()
        cost, aux = esd.inputs(cm, kjt, state)
        t1 = time.perf_counter()
        r = esd.assign(cost, shares, aux=aux)
        t2 = time.perf_counter()
    finally:
        for f in FLAGS:
            setattr(ops, f, saved[f])
    dedup = aux["dedup"]
    return {"inputs_ms": (t1 - t0) * 1e3, "assign_ms": (t2 - t1) * 1e3, "decision_ms": (t2 - t0) * 1e3,
            "predicted_s": dedup.total(r.assignment.numpy()),
            "true_s": cm.measure(kjt, r.assignment, state)["total_s"],
            "at_deadline": r.info.get("stopped_at_deadline", 0.0), "assignment": r.assignment}


def run(workload: str, B: int, steps: int, warmup: int, args) -> dict:
    wl = make_workload(make_workload_config(workload))
    tables, config, cm, _ = dtc.build(args, wl, [1000.0, 100.0, 50.0, 10.0])
    shares = config.batch_shares(B)
    directory = CacheDirectory(config, tables)
    esd = make_dispatcher("esd")
    rec = {"cpp": [], "numpy": []}
    for step in range(steps):
        kjt = wl.global_batch(step, B).sparse_features
        state = directory.cache_state()
        cpp = decide(esd, cm, kjt, state, shares, True)
        if step >= warmup:
            rec["cpp"].append(cpp)
            rec["numpy"].append(decide(esd, cm, kjt, state, shares, False))
        directory.plan(kjt, cpp["assignment"])
    out = {"workload": workload, "B": B, "W": 4, "batches": steps - warmup}
    for name, rs in rec.items():
        for k in ("inputs_ms", "assign_ms", "decision_ms"):
            v = [r[k] for r in rs]
            out[f"{name}_{k}_median"] = statistics.median(v)
            out[f"{name}_{k}_max"] = max(v)
        for k in ("predicted_s", "true_s", "at_deadline"):
            out[f"{name}_{k}"] = sum(r[k] for r in rs)
    out["cpp_vs_numpy_predicted"] = out["cpp_predicted_s"] / out["numpy_predicted_s"]
    out["cpp_vs_numpy_true"] = out["cpp_true_s"] / out["numpy_true_s"]
    out["cpp_better_predicted_batches"] = sum(
        c["predicted_s"] < n["predicted_s"] for c, n in zip(rec["cpp"], rec["numpy"]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="esd_decision.json")
    p.add_argument("--workloads", default="iid,sessions")
    p.add_argument("--batches", default="512,4096")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=4, help="batches from cold caches left out")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if not ops.has_dedup_refine():
        raise SystemExit("the extension lacks dedup_refine: build it (python setup.py build_ext --inplace)")
    base = dtc.parse_args([])
    load0 = os.getloadavg()
    res = []
    for wl in args.workloads.split(","):
        for B in (int(b) for b in args.batches.split(",")):
            r = run(wl, B, args.steps, args.warmup, base)
            res.append(r)
            print(f"{wl:>8} B={B:>5} W=4 ({r['batches']} batches): decision ms median (max) = inputs + assign:"
                  f" C++ {r['cpp_decision_ms_median']:.1f} ({r['cpp_decision_ms_max']:.1f}) ="
                  f" {r['cpp_inputs_ms_median']:.1f} + {r['cpp_assign_ms_median']:.1f};"
                  f" numpy {r['numpy_decision_ms_median']:.1f} ({r['numpy_decision_ms_max']:.1f}) ="
                  f" {r['numpy_inputs_ms_median']:.1f} + {r['numpy_assign_ms_median']:.1f} |"
                  f" predicted s C++ {r['cpp_predicted_s']:.4f} numpy {r['numpy_predicted_s']:.4f}"
                  f" (x{r['cpp_vs_numpy_predicted']:.4f}, C++ lower on {r['cpp_better_predicted_batches']}"
                  f"/{r['batches']}); true s C++ {r['cpp_true_s']:.4f} numpy {r['numpy_true_s']:.4f}"
                  f" (x{r['cpp_vs_numpy_true']:.4f}); at deadline C++ {r['cpp_at_deadline']:.0f}"
                  f" numpy {r['numpy_at_deadline']:.0f}")
            sys.stdout.flush()
    with open(args.out, "w") as f:
        json.dump({"benchmark": "esd_decision", "args": vars(args), "results": res,
                   "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                               "torch": torch.__version__, "loadavg_at_start": load0,
                               "loadavg_at_end": os.getloadavg()}}, f, indent=1)


if __name__ == "__main__":
    main()
