"""End to end: vanilla TorchRec vs ESD dispatchers over real heterogeneous links.

    python benchmarks/end_to_end.py --out results_e2e.json [--quick] [--no-netns]

One invocation trains the same DLRM on the same seeded global batches with

* ``vanilla``   TorchRec ``DistributedModelParallel`` (table-wise plan from
                TorchRec's planner, fused embedding optimizer) on the W worker ranks;
* ``cache-only`` ESD runtime with the ``random`` dispatcher (HET-like LRU caches, no dispatch);
* ``laia``      LAIA-style greedy by cache hits (bandwidth-blind);
* ``heuristic``, ``optimal``, ``hybrid`` (HybridDis) ESD dispatchers,
* opt-in variants ``<dispatcher>+des`` and ``<dispatcher>+plan`` (e.g.
  ``--methods ...,hybrid+plan,laia+plan,hybrid+des``): ``+des`` sets
  ``EsdConfig(des_misses=True)`` (misses served as pooled partial sums);
  ``+plan`` gives the workers the shares ``B_w`` of ``EsdShardingPlanner.shares_for``
  (compute ``--samples-per-s``, each link's rows replayed at the planned shares
  and the dense all-reduce of ``--dense-sync``, with the same caches as every
  other method) instead of equal shares,

for every bandwidth mix (default: heterogeneous 1000/100/50/10 Mbit/s and
homogeneous 4x1000 Mbit/s; W = 4 workers + 1 parameter server, staleness 0).

Links.  As root with iproute2 every rank runs in its own network namespace
behind a veth pair to a bridge (``benchmarks/netns.py``); each worker's link is
rate-limited with ``tc`` TBF in both directions (and delayed with netem when
the kernel has it); the PS link is unshaped.  All ranks of one torch.distributed
world (gloo over the namespaces' own 10.231.0.0/24 addresses) run all mixes and
methods in sequence; between mixes the parent re-shapes the links.  Reported
per method and mix: the embedding transmission the ESD runtime accounts for
(bytes and link time per worker, *modelled* from the configured bandwidth), the
bytes that really crossed each worker's shaped link (interface counters, every
kind of traffic: vanilla's all-to-alls, ESD's PS round trips, dispatch, dense
all-reduce), wall-clock iteration time and samples/s over the shaped links,
final loss and AUC, and ratios vs vanilla and vs cache-only.
Without root/``ip`` (or with ``--no-netns``) the ranks are plain local
processes on loopback: link times are then only modelled, which the output and
the JSON say (``"links": "modelled"`` instead of ``"emulated-tc"``).

Also written: a PNG next to ``--out`` (or ``--png``) and a Markdown table
(printed, and ``--markdown``) for the README.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import netns  # noqa: E402
import rate_change  # noqa: E402

METHODS = ["vanilla", "random", "laia", "heuristic", "optimal", "hybrid", "esd"]
VARIANTS = ("des", "plan", "shares", "online", "prefetch", "latepull", "wholereply", "sums", "prepush",
            "lookahead")  # "+des": DES-served misses; "+plan": the planner's
# shares; "+shares": shares decided per batch around the (planned or equal) shares (torchrec_esd.dispatch.shares);
# "+online": links measured on the PS exchanges (EsdConfig.online_links, shares from the estimates);
# "+prefetch": EsdConfig.prefetch_depth = --dispatch-ahead (at least 1): the next batches' safe rows are
# pulled while a batch computes; "+latepull": EsdConfig.early_pull=False (a batch's push/pull in its forward,
# not right after the previous batch's gradients); "+wholereply": EsdConfig.split_reply=False (the early
# push/pull goes after the whole gradients and its reply waits for every worker's); "+sums":
# EsdConfig.split_sums=True (the slowest worker's split reply brings the others' gradient sums of the rows it
# updates, not waiting for its values, instead of those rows after its values are in); "+prepush": EsdConfig.pre_push (the next batch's dirty
# pushes leave right after this batch's push/pull, while it computes); "+lookahead": EsdConfig.cache_policy
# "lookahead" (evict by next use in the upcoming batches) for any method, LAIA's included
LABEL = {
    "vanilla": "vanilla TorchRec",
    "random": "cache-only (random)",
    "laia": "LAIA-style greedy",
    "heuristic": "ESD heuristic",
    "optimal": "ESD optimal",
    "hybrid": "HybridDis",
    "esd": "ESD de-dup local search",
}


def method_label(method: str) -> str:
    base, *variants = method.split("+")
    extra = {"des": "DES misses", "plan": "planned shares", "shares": "per-batch shares",
             "online": "online link estimates", "prefetch": "prefetch", "latepull": "push/pull in the forward", "wholereply": "whole replies",
             "sums": "gradient sums", "prepush": "pre-push",
             "lookahead": "lookahead eviction"}
    return " + ".join([LABEL.get(base, base)] + [extra.get(v, v) for v in variants])


DEFAULT_MIXES = "hetero=1000,100,50,10;homo=1000,1000,1000,1000"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results_e2e.json")
    p.add_argument("--png", default=None, help="plot path (default: --out with .png)")
    p.add_argument("--markdown", default=None, help="also write the Markdown table here")
    p.add_argument("--quick", action="store_true", help="smoke size: 6 steps, batch 256, cardinality <= 5000, 1 repeat")
    p.add_argument("--no-netns", action="store_true", help="plain local processes, modelled links only")
    p.add_argument("--mixes", default=DEFAULT_MIXES, help="name=Mbit/s per worker;... (W = entries)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--num-ps", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="default 40 (--quick: 6)")
    p.add_argument("--batch", type=int, default=None, help="global batch, default 512 (--quick: 256)")
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--max-cardinality", type=int, default=None, help="default 20000 (--quick: 5000)")
    p.add_argument("--alpha", type=float, default=1.1, help="Zipf exponent of the ids")
    p.add_argument("--workload", default="iid", choices=["iid", "sessions"],
                   help="iid Zipf ids, or sessions of users with interest clusters (torchrec_esd.apps.sessions)")
    p.add_argument("--cache-fraction", type=float, default=0.1, help="cache rows per table / table rows")
    p.add_argument("--delay-ms", type=float, default=1.0,
                   help="one-way delay per worker link (netem; where the kernel lacks netem none is "
                        "applied and the ESD model uses the applied 0 ms)")
    p.add_argument("--repeats", type=int, default=None,
                   help="run every method this often, default 2 (--quick: 1); odd repeats in reverse order; "
                        "iteration time = median")
    p.add_argument("--warmup-steps", type=int, default=2,
                   help="first steps left out of the steady-state iteration time")
    p.add_argument("--link-warmup-steps", type=int, default=None,
                   help="first steps left out of the steady-state embedding link time (emb.steady_link_s: the "
                        "caches fill, and no end-of-training write-back), default: those of the iteration time")
    p.add_argument("--samples-per-s", type=float, default=5000.0,
                   help="per-worker compute throughput the +plan shares assume (vanilla TorchRec measured "
                        "about 24 ms CPU per 128-sample step per worker on the 2-core machine); +shares: the "
                        "prior of the compute rates the workers measure online")
    p.add_argument("--staleness", type=int, default=0)
    p.add_argument("--dense-sync", default="star", choices=["ring", "star"],
                   help="ESD methods' dense-gradient all-reduce: star through the fastest worker, or DDP's ring "
                        "(vanilla TorchRec always uses DDP's ring)")
    p.add_argument("--dispatch-ahead", type=int, default=1,
                   help="ESD methods dispatch this many batches ahead in a background thread (0: inline)")
    p.add_argument("--sparse-optimizer", default="rowwise_adagrad", choices=["sgd", "rowwise_adagrad"])
    p.add_argument("--input-mode", default="global", choices=["global", "local"],
                   help="ESD input: every worker reads the global batch (global) or its slice, ids "
                        "all-gathered over the links (local)")
    p.add_argument("--rate-change", default=None,
                   help="WORKER:STEP=MBIT[,STEP=MBIT...]: change that worker's tc rate mid-run, e.g. 3:20=10,40=100 "
                        "(benchmarks/rate_change.py; also written: iteration time per step)")
    p.add_argument("--reference-methods", default=None,
                   help="with --rate-change: also run these ESD methods (e.g. esd,esd+online) on one mix per rate "
                        "the changing worker has (no change, configured with that rate), interleaved repeat by "
                        "repeat with the main run; each phase's reference level is the lowest of theirs over "
                        "the phase's steps (benchmarks/rate_change.py)")
    p.add_argument("--fault-timeout-s", type=float, default=30.0,
                   help="EsdConfig.fault_timeout_s of the ESD methods: a rank whose heartbeat is silent this long "
                        "ends the job (the rate-change runs use 120: a 10 Mbit/s link queueing several MB of "
                        "vanilla's or LAIA's traffic stalled a worker's store connection for 30 s, see "
                        "benchmarks/results/rate_change_v10_v11.md)")
    p.add_argument("--timeout-s", type=float, default=1500.0, help="kill the world after this long")
    p.add_argument("--keep-logs", action="store_true")
    p.add_argument("--_rank", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    # defaults: full size, or --quick's smoke-test size; explicit values win
    size = {"steps": 6, "batch": 256, "max_cardinality": 5000, "repeats": 1} if a.quick else \
        {"steps": 40, "batch": 512, "max_cardinality": 20_000, "repeats": 2}
    for k, v in size.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def parse_mixes(text: str) -> List[Dict]:
    mixes = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, _, bws = part.partition("=")
        mixes.append({"name": name.strip(), "bandwidths": [float(b) for b in bws.split(",")]})
    if not mixes or len({len(m["bandwidths"]) for m in mixes}) != 1:
        raise SystemExit("--mixes: give every mix the same number of workers, e.g. 'a=1000,10;b=1000,1000'")
    return mixes


# ====================================================================== rank side
def _iface_counters() -> Optional[Dict[str, int]]:
    base = f"/sys/class/net/{netns.IFACE}/statistics"
    if os.environ.get("ESD_BENCH_LINKS") != "emulated-tc" or not os.path.isdir(base):
        return None
    out = {}
    for k in ("tx_bytes", "rx_bytes"):
        with open(os.path.join(base, k)) as f:
            out[k] = int(f.read())
    return out


def planned_workers(spec: Dict, mix: Dict, cache: Dict[str, int], latency_ms: float, workload):
    """The mix's workers with EsdShardingPlanner's shares for these caches
    (every rank computes the same, from batches outside the trained steps)."""
    from torchrec_esd.config import heterogeneous_workers
    from torchrec_esd.distributed.planner import EsdShardingPlanner, PsResources, WorkerResources
    from torchrec_esd.apps.trainer import JobConfig, dense_param_bytes
    from torchrec_esd.apps.sessions import make_workload

    wl = make_workload(workload)
    dense = dense_param_bytes(JobConfig(embedding_dim=spec["embedding_dim"], workload=workload), wl)
    big = 1 << 40  # memory is not what this plan is about: the caches are given
    planner = EsdShardingPlanner(
        [WorkerResources(big, bw, latency_ms, spec["samples_per_s"]) for bw in mix["bandwidths"]],
        [PsResources(big)] * spec["num_ps"],
        wl.table_configs(spec["embedding_dim"]),
        sample=[wl.global_batch(10_000 + i, spec["batch"]).sparse_features for i in range(4)],
        global_batch_size=spec["batch"],
        optimizer_state_per_row=1 if spec["sparse_optimizer"] == "rowwise_adagrad" else 0,
        dense_param_bytes=dense,
        dense_sync=spec["dense_sync"],
    )
    shares = planner.shares_for([cache] * len(mix["bandwidths"]))
    return heterogeneous_workers(mix["bandwidths"], cache, latency_ms=latency_ms, shares=shares)


def rank_main(spec_path: str) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from torchrec_esd.config import EsdConfig, heterogeneous_workers
    from torchrec_esd.apps.trainer import JobConfig, run
    from torchrec_esd.apps.sessions import make_workload_config

    torch.set_num_threads(1)
    with open(spec_path) as f:
        spec = json.load(f)
    outdir = os.path.dirname(spec_path)
    dist.init_process_group("gloo", timeout=timedelta(seconds=spec["barrier_timeout_s"]))
    rank = dist.get_rank()
    workload = make_workload_config(spec.get("workload", "iid"), max_cardinality=spec["max_cardinality"],
                                    alpha=spec["alpha"], seed=0)
    cache = {f"t_cat_{i}": max(1, int(spec["cache_fraction"] * n)) for i, n in enumerate(workload.cardinalities)}

    def progress(msg: str) -> None:
        if rank == 0:
            with open(os.path.join(outdir, "progress.txt"), "a") as f:
                f.write(msg + "\n")

    records = []
    rate_requests = 0  # numbered in the same order on every worker rank
    switches = 0  # mix switches, numbered in the schedule's order
    current, planned_by_mix = None, {}
    for k, rep, method in spec["schedule"]:
        mix = spec["mixes"][k]
        if k != current:
            # the launcher (re)shapes the links whenever the schedule moves to another mix
            dist.barrier()
            n, switches = switches, switches + 1
            if rank == 0:
                with open(os.path.join(outdir, f"mix{n}.request.tmp"), "w") as f:
                    json.dump({"mix": k}, f)
                os.replace(os.path.join(outdir, f"mix{n}.request.tmp"), os.path.join(outdir, f"mix{n}.request"))
                rate_change.wait_for_file(os.path.join(outdir, f"mix{n}.ready"), 120, "answer", poll_s=0.05)
            dist.barrier()
            with open(os.path.join(outdir, f"mix{n}.ready")) as f:
                latency_ms = json.load(f)["latency_ms_model"]
            esd = EsdConfig(
                heterogeneous_workers(mix["bandwidths"], cache, latency_ms=latency_ms),
                num_ps=spec["num_ps"], staleness=spec["staleness"],
                collective_timeout_s=spec["barrier_timeout_s"], fault_timeout_s=spec["fault_timeout_s"],
            )
            base = dict(steps=spec["steps"], global_batch=spec["batch"], embedding_dim=spec["embedding_dim"],
                        workload=workload, sparse_optimizer=spec["sparse_optimizer"], esd=esd,
                        input_mode=spec["input_mode"])
            current = k
        dispatcher, *variants = method.split("+")
        if method == "vanilla":
            job = JobConfig(method="vanilla", **base)
        else:
            cfg = esd
            if "des" in variants:
                cfg = dataclasses.replace(cfg, des_misses=True)
            if "plan" in variants:
                if k not in planned_by_mix:  # the planner's workers for this mix, computed once on first use
                    planned_by_mix[k] = planned_workers(spec, mix, cache, latency_ms, workload)
                cfg = dataclasses.replace(cfg, workers=planned_by_mix[k])
            kw = {}
            if "shares" in variants:  # the planner's compute rate: the prior of the measured rates
                kw = dict(dispatcher_kwargs={"inner": dispatcher,
                                             "samples_per_s": [spec["samples_per_s"]] * len(mix["bandwidths"])})
                dispatcher = "shares"
            if "online" in variants:
                cfg = dataclasses.replace(cfg, online_links=True, compute_s_per_sample=1.0 / spec["samples_per_s"])
            ahead = spec["dispatch_ahead"]
            if "latepull" in variants:
                cfg = dataclasses.replace(cfg, early_pull=False)
            if "wholereply" in variants:
                cfg = dataclasses.replace(cfg, split_reply=False)
            if "sums" in variants:
                cfg = dataclasses.replace(cfg, split_sums=True)
            if "prepush" in variants:
                cfg = dataclasses.replace(cfg, pre_push=True)
            if "lookahead" in variants:  # eviction by next use within the dispatched-ahead batches
                cfg = dataclasses.replace(cfg, cache_policy="lookahead")
            if "prefetch" in variants:
                ahead = max(1, ahead)
                cfg = dataclasses.replace(cfg, prefetch_depth=ahead)
            job = JobConfig(method="esd", dispatcher=dispatcher, dispatch_ahead=ahead,
                            dense_sync=spec["dense_sync"], steady_from_step=spec.get("steady_from_step"),
                            **{**base, "esd": cfg}, **kw)
        hook = None
        if spec.get("rate_change") and k == 0 and rank < len(mix["bandwidths"]):  # references: no change
            hook = rate_change.RateHook(outdir, rank, spec["rate_change"])
            hook.count = rate_requests
            hook.request(mix["bandwidths"][hook.worker])  # every method starts at the mix's rate
            job = dataclasses.replace(job, on_step=hook)
        dist.barrier()
        c0, t0, p0 = _iface_counters(), time.perf_counter(), time.process_time()
        r = run(job)
        cpu_s = time.process_time() - p0  # this rank's CPU (all threads) for the whole job
        dist.barrier()  # PS and idle ranks wait here, with the world's long timeout
        wall, c1 = time.perf_counter() - t0, _iface_counters()
        rec = {"mix": mix["name"], "method": method, "rep": rep, "rank": rank, "wall_s": wall, "cpu_s": cpu_s,
               "role": r.get("role", "worker"),
               "shares": job.esd.batch_shares(spec["batch"]) if job.esd is not None and method != "vanilla"
               else None}
        if c0 is not None:
            rec["wire"] = {k2: c1[k2] - c0[k2] for k2 in c0}
        if hook is not None:
            rate_requests = hook.count
            rec["rate_waits"] = hook.waits
        if "local_samples" in r:
            rec.update(local_samples=r["local_samples"], link_estimates_mbps=r["link_estimates_mbps"],
                       link_observations=r["link_observations"],
                       compute_estimates_sps=r.get("compute_estimates_sps") or [])
        if "losses" in r:
            # per-step wall and CPU times between consecutive step ends (the
            # training thread's clock; CPU counts every thread of the process)
            ts, cs = r["step_end_s"], r["step_end_cpu_s"]
            rec.update(losses=r["losses"], auc=r["auc"], elapsed_s=r["elapsed_s"],
                       step_s=[b - a for a, b in zip(ts, ts[1:])],
                       step_cpu_s=[b - a for a, b in zip(cs, cs[1:])])
        if "table_owner" in r and rank == 0:  # vanilla: TorchRec's table-wise plan (main_job.py's link model)
            rec["table_owner"] = r["table_owner"]
        if "metrics" in r and rank == 0:
            rec["metrics"] = r["metrics"]
            if "metrics_before_flush" in r:  # the training steps alone, before the end-of-training flush
                rec["metrics_before_flush"] = r["metrics_before_flush"]
            if r.get("metrics_steady") is not None:  # the steps after the link warm-up, before that flush
                rec["metrics_steady"] = r["metrics_steady"]
            solvers: Dict[str, int] = {}
            for d in r["decisions"]:
                solvers[d["solver"]] = solvers.get(d["solver"], 0) + 1
            rec["dispatch"] = {"solvers": solvers, "decision_ms": [d["ms"] for d in r["decisions"]],
                               "inputs_ms": [d["inputs_ms"] for d in r["decisions"]],
                               "cpu_ms": [d.get("cpu_ms", float("nan")) for d in r["decisions"]],
                               "runqueue_ms": [d.get("runqueue_ms", float("nan")) for d in r["decisions"]],
                               "wait_ms": [d.get("wait_ms", float("nan")) for d in r["decisions"]]}
        records.append(rec)
        progress(f"{mix['name']:>8} {method:<10} rep {rep} {wall:6.1f} s wall"
                 + (f", {r['elapsed_s']:.1f} s training, loss {r['losses'][-1]:.4f}" if "losses" in r else ""))
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(records, f)
    dist.barrier()
    dist.destroy_process_group()


# ====================================================================== launcher
def _cpu_snapshot() -> Dict[str, float]:
    """Machine-wide busy CPU seconds (/proc/stat) and our reaped children's CPU seconds."""
    import resource

    busy = None
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    except (OSError, ValueError, IndexError):
        pass
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"t": time.perf_counter(), "busy_s": busy, "children_s": ru.ru_utime + ru.ru_stime}


def _cpu_usage(a: Dict[str, float], b: Dict[str, float]) -> Dict[str, Optional[float]]:
    wall = b["t"] - a["t"]
    ours = b["children_s"] - a["children_s"]
    out: Dict[str, Optional[float]] = {"wall_s": wall, "benchmark_cores": ours / wall, "other_cores": None}
    if a["busy_s"] is not None and b["busy_s"] is not None:
        out["machine_busy_cores"] = (b["busy_s"] - a["busy_s"]) / wall
        out["other_cores"] = max(0.0, (b["busy_s"] - a["busy_s"]) - ours) / wall
    return out


def schedule(mix_methods: List[List[str]], repeats: int, interleave: bool) -> List[List]:
    """``[mix index, repeat, method]`` in run order: every method of a mix
    ``repeats`` times, odd repeats in reverse order; mix by mix, or (with
    ``interleave``) repeat by repeat, every mix in turn, so that the mixes
    compared with each other run under the same machine load."""
    def one(k: int, rep: int) -> List[List]:
        ms = mix_methods[k] if rep % 2 == 0 else list(reversed(mix_methods[k]))
        return [[k, rep, m] for m in ms]

    if interleave:
        return [e for rep in range(repeats) for k in range(len(mix_methods)) for e in one(k, rep)]
    return [e for k in range(len(mix_methods)) for rep in range(repeats) for e in one(k, rep)]


def reference_mixes(mix: Dict, rc: Dict) -> List[Dict]:
    """The rate-change run's reference mixes: ``mix`` with the changing
    worker's link at each rate it has in the run (first its own), no change."""
    w = rc["worker"]
    if not 0 <= w < len(mix["bandwidths"]):
        raise SystemExit(f"--rate-change worker {w}: the mix has workers 0..{len(mix['bandwidths']) - 1}")
    rates = [mix["bandwidths"][w]]
    for _, r in rc["changes"]:
        if r not in rates:
            rates.append(r)
    out = []
    for r in rates:
        bws = list(mix["bandwidths"])
        bws[w] = r
        out.append({"name": f"ref_w{w}_{r:g}", "bandwidths": bws, "reference_rate": r})
    return out


def launch(args, mixes: List[Dict], methods: List[str]) -> Dict:
    W = len(mixes[0]["bandwidths"])
    world = W + args.num_ps
    use_netns, why = (False, "--no-netns given") if args.no_netns else netns.netns_support()
    links_kind = "emulated-tc" if use_netns else "modelled"
    if not use_netns:
        print(f"[e2e] links: MODELLED only ({why}); ranks are plain local processes on loopback, "
              "wall-clock times do not include any link time", flush=True)
    tmp = tempfile.mkdtemp(prefix="esd_e2e_")
    spec = {
        "mixes": mixes, "methods": methods, "num_ps": args.num_ps, "steps": args.steps, "batch": args.batch,
        "embedding_dim": args.embedding_dim, "max_cardinality": args.max_cardinality, "alpha": args.alpha,
        "workload": args.workload,
        "cache_fraction": args.cache_fraction, "staleness": args.staleness, "samples_per_s": args.samples_per_s,
        "sparse_optimizer": args.sparse_optimizer, "input_mode": args.input_mode, "repeats": args.repeats,
        "dispatch_ahead": args.dispatch_ahead, "dense_sync": args.dense_sync,
        "steady_from_step": steady_link_from(args),
        "barrier_timeout_s": max(300.0, args.timeout_s / 2), "fault_timeout_s": args.fault_timeout_s,
        "rate_change": rate_change.parse(args.rate_change),
        "schedule": schedule([m.get("methods", methods) for m in mixes], args.repeats,
                             any("reference_rate" in m for m in mixes)),
    }
    rates = rate_change.RateServer(tmp, W)
    spec_path = os.path.join(tmp, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    cluster = None
    applied: Dict[str, List[Dict]] = {}
    state = {"next_mix": 0, "progress_pos": 0}
    t_start = time.perf_counter()

    def links_for(mix) -> List[netns.Link]:
        return [netns.Link(b, args.delay_ms) for b in mix["bandwidths"]] + [netns.Link(None, 0.0)] * args.num_ps

    def poll() -> None:
        prog = os.path.join(tmp, "progress.txt")
        if os.path.exists(prog):
            with open(prog) as f:
                f.seek(state["progress_pos"])
                new = f.read()
                state["progress_pos"] = f.tell()
            for line in new.splitlines():
                print(f"[e2e {time.perf_counter() - t_start:6.1f} s] {line}", flush=True)
        rates.poll(cluster, t_start)
        n = state["next_mix"]  # the schedule's n-th switch of mix
        if os.path.exists(os.path.join(tmp, f"mix{n}.request")):
            with open(os.path.join(tmp, f"mix{n}.request")) as f:
                k = int(json.load(f)["mix"])
            if cluster is not None:
                applied[mixes[k]["name"]] = cluster.apply(links_for(mixes[k]))
                lat = min(a["upload"]["delay_ms"] for a in applied[mixes[k]["name"]][:W])
                print(f"[e2e] mix {mixes[k]['name']}: shaped worker links "
                      + ", ".join(f"w{r}={a['upload']['rate_mbit']:g} Mbit/s" for r, a in
                                  enumerate(applied[mixes[k]["name"]][:W]))
                      + f", delay {lat:g} ms applied (netem {'available' if cluster.netem else 'NOT in this kernel'})"
                      + ", PS unshaped", flush=True)
            else:
                lat = args.delay_ms
            with open(os.path.join(tmp, f"mix{n}.ready.tmp"), "w") as f:
                json.dump({"latency_ms_model": lat}, f)
            os.replace(os.path.join(tmp, f"mix{n}.ready.tmp"), os.path.join(tmp, f"mix{n}.ready"))
            state["next_mix"] = n + 1

    argv = [sys.executable, os.path.abspath(__file__), "--_rank", spec_path]
    cpu0 = _cpu_snapshot()
    try:
        if use_netns:
            # a link that changes rate in place must not hold packets larger than its new
            # TBF bucket (NetnsCluster.set_rate): GSO packets capped below the smallest bucket
            cluster = netns.NetnsCluster([netns.Link(None, 0.0)] * world,
                                         max_packet_bytes=3000 if spec.get("rate_change") else None)
            cluster.setup()
            if cluster.removed_stale:
                print(f"[e2e] removed stale namespaces: {' '.join(cluster.removed_stale)}", flush=True)
            print(f"[e2e] {world} rank namespaces + bridge up ({time.perf_counter() - t_start:.1f} s); "
                  f"master {cluster.addr(0)}", flush=True)
        env_kind = {"ESD_BENCH_LINKS": links_kind}
        os.environ.update(env_kind)
        codes = netns.launch_world(argv, world, args.timeout_s, tmp, cluster=cluster, poll=poll)
        cpu = _cpu_usage(cpu0, _cpu_snapshot())
        poll()
        if any(codes):
            logs = []
            for r in range(world):
                with open(os.path.join(tmp, f"rank{r}.log")) as f:
                    logs.append(f"--- rank {r} (exit {codes[r]}) ---\n" + f.read()[-3000:])
            raise SystemExit("[e2e] a rank failed:\n" + "\n".join(logs))
        per_rank = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
    finally:
        if cluster is not None:
            cluster.teardown()
            left = [n for n in netns.list_namespaces() if n.startswith(cluster.tag + "-")]
            print(f"[e2e] namespaces torn down ({'none left' if not left else 'LEFT: ' + ' '.join(left)})",
                  flush=True)
        if args.keep_logs:
            print(f"[e2e] logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"links": links_kind, "links_reason": why, "applied_links": applied, "per_rank": per_rank,
            "netem": bool(cluster.netem) if cluster is not None else None, "cpu": cpu,
            "world_s": time.perf_counter() - t_start, "rate_changes": rates.applied}


# ====================================================================== analysis
def summarize(args, mixes, methods, raw) -> Dict:
    W = len(mixes[0]["bandwidths"])
    out = {}
    for mix in mixes:
        bws = mix["bandwidths"]
        res = {}
        for m in mix.get("methods", methods):
            every = [rec for rank in raw["per_rank"] for rec in rank if rec["mix"] == mix["name"] and rec["method"] == m]
            skip = min(args.warmup_steps, args.steps - 2)
            steady_reps, elapsed_reps, slowest_reps = [], [], []
            for rep in range(args.repeats):
                ws = [r for r in every if r["rep"] == rep and r["rank"] < W]
                slowest_reps.append([1e3 * max(col) for col in zip(*(r["step_s"] for r in ws))])
                steady_reps.append(max(sum(r["step_s"][skip:]) / len(r["step_s"][skip:]) for r in ws))
                elapsed_reps.append(max(r["elapsed_s"] for r in ws))
            # transmission and wire bytes: first repeat (the same batches and dispatch every time)
            recs = [r for r in every if r["rep"] == 0]
            workers = sorted([r for r in recs if r["rank"] < W], key=lambda r: r["rank"])
            w0 = workers[0]
            losses = w0["losses"]
            rep_loss_diff = max(abs(a - b) for r in every if r["rank"] == 0 for a, b in zip(r["losses"], losses))
            steady = sorted(steady_reps)[len(steady_reps) // 2] if len(steady_reps) % 2 else \
                sum(sorted(steady_reps)[len(steady_reps) // 2 - 1 : len(steady_reps) // 2 + 1]) / 2
            elapsed = sum(elapsed_reps) / len(elapsed_reps)
            s = {
                "final_loss": sum(losses[-5:]) / len(losses[-5:]),
                "last_loss": losses[-1],
                "losses": losses,
                "auc": w0["auc"],
                "elapsed_s": elapsed,
                "iter_ms": steady * 1e3,  # steady state: mean step time after the warm-up steps, median of repeats
                "iter_ms_repeats": [1e3 * x for x in steady_reps],
                "max_loss_diff_between_repeats": rep_loss_diff,
                "iter_ms_all_steps": elapsed / args.steps * 1e3,
                "samples_per_s": args.batch / steady,
                "shares": w0.get("shares"),  # samples per worker and step (None: vanilla's equal slices)
                "step_ms": [[1e3 * t for t in r["step_s"]] for r in workers],
                "step_ms_slowest_repeats": slowest_reps,  # per repeat: the slowest worker's step, per step
                "wall_s": max(r["wall_s"] for r in recs),
                # CPU per steady-state step (all threads) of every worker; PS: whole job / steps
                "cpu_ms_per_step_workers": [1e3 * sum(r["step_cpu_s"][skip:]) / len(r["step_cpu_s"][skip:])
                                            for r in workers],
                "cpu_ms_per_step_ps": [1e3 * r["cpu_s"] / args.steps for r in recs if r["rank"] >= W],
            }
            if all("wire" in r for r in workers):
                per = [{"tx_bytes": r["wire"]["tx_bytes"], "rx_bytes": r["wire"]["rx_bytes"]} for r in workers]
                for p, bw in zip(per, bws):
                    p["link_s"] = (p["tx_bytes"] + p["rx_bytes"]) * 8 / (bw * 1e6)
                s["wire"] = {
                    "per_worker": per,
                    "total_bytes": sum(p["tx_bytes"] + p["rx_bytes"] for p in per),
                    "total_link_s": sum(p["link_s"] for p in per),
                    "makespan_link_s": max(p["link_s"] for p in per),
                    "ps_bytes": [r["wire"]["tx_bytes"] + r["wire"]["rx_bytes"] for r in recs if r["rank"] >= W],
                }
            if w0.get("link_estimates_mbps"):  # online links: the shares and estimates they came from
                s["local_samples_mean"] = [sum(r["local_samples"]) / len(r["local_samples"]) for r in workers]
                s["link_estimates_mbps_median"] = [sorted(col)[len(col) // 2] for col in
                                                   zip(*w0["link_estimates_mbps"][skip:])]
            if w0.get("compute_estimates_sps"):  # per-batch shares: every worker's measured compute rate
                s["compute_samples_per_s_last"] = w0["compute_estimates_sps"][-1]
                s["local_samples_mean"] = [sum(r["local_samples"]) / len(r["local_samples"]) for r in workers]
            if "wire" in s:
                # the slowest worker (largest CPU + shaped-link time per step): its compute and
                # link time per steady step, and the iteration time over the larger of the two
                # (1.0: one fully hides the other; 2.0: they run one after the other)
                # tc shapes each direction on its own: a direction's bytes / rate (whole job / steps)
                per_w = [{"worker": w, "compute_ms": c,
                          "link_ms": 1e3 * max(p["tx_bytes"], p["rx_bytes"]) * 8 / (bw * 1e6) / args.steps}
                         for w, (c, p, bw) in enumerate(zip(s["cpu_ms_per_step_workers"], s["wire"]["per_worker"], bws))]
                slow = max(per_w, key=lambda x: x["compute_ms"] + x["link_ms"])
                slow["iter_over_max"] = s["iter_ms"] / max(slow["compute_ms"], slow["link_ms"])
                s["slowest_worker"] = slow
            if "metrics" in w0:
                mt = w0["metrics"]
                s["emb"] = {
                    "prefetched_rows": mt.get("prefetched_rows", 0),
                    "early_pulls": mt.get("early_pulls", 0),
                    "split_replies": mt.get("split_replies", 0),
                    "sum_replies": mt.get("sum_replies", 0),
                    "probe_bytes": mt.get("probe_bytes", 0),
                    "pre_pushed_rows": mt.get("pre_pushed_rows", 0),
                    "total_bytes": mt["total_bytes"], "total_link_s": mt["total_link_s"],
                    "makespan_link_s": mt["makespan_link_s"], "rows": mt["rows"],
                    "per_worker": [{"bytes": p["total_bytes"], "link_s": p["link_s"], "rows": p["rows"]}
                                   for p in mt["per_worker"]],
                }
                if "metrics_before_flush" in w0:
                    # the end of training writes every dirty cached row back once: the same for any
                    # dispatch (5-11 % of LAIA's link time in issue 18's 30-step runs)
                    mb = w0["metrics_before_flush"]
                    s["emb"]["training_link_s"] = mb["total_link_s"]
                    s["emb"]["write_back_link_s"] = mt["total_link_s"] - mb["total_link_s"]
                    s["emb"]["write_back_rows"] = mt["rows"]["update_push"] - mb["rows"]["update_push"]
                if "metrics_steady" in w0:
                    # the steps after the link warm-up alone (first repeat): neither the cold caches'
                    # first misses nor the write-back, one-time costs that a long job spreads thin
                    ms_ = w0["metrics_steady"]
                    s["emb"]["steady_link_s"] = ms_["total_link_s"]
                    s["emb"]["steady_rows"] = ms_["rows"]
                    s["emb"]["steady_steps"] = ms_["per_worker"][0]["iterations"]
                # modelled iteration time: compute as measured + the slowest worker's modelled link time
                s["modelled_iter_ms"] = s["iter_ms"] + mt["makespan_link_s"] / args.steps * 1e3
                dec = w0["dispatch"]["decision_ms"]
                inp = w0["dispatch"]["inputs_ms"]
                # the solve alone, and the whole decision (its inputs read from the batch and the caches, + the solve)
                s["dispatch"] = {"solvers": w0["dispatch"]["solvers"],
                                 "mean_decision_ms": sum(dec) / max(1, len(dec)),
                                 "mean_inputs_ms": sum(inp) / max(1, len(inp)),
                                 "mean_full_decision_ms": (sum(dec) + sum(inp)) / max(1, len(dec))}
                # the dispatch thread's CPU time per full decision (split-verdict batches,
                # which report none, left out)
                for key in ("cpu_ms", "runqueue_ms"):
                    vals = [c for c in w0["dispatch"].get(key, []) if c == c]
                    if vals:
                        s["dispatch"][f"mean_full_decision_{key}"] = sum(vals) / len(vals)
                s["dispatch"].update(steady_decisions(every, args.repeats, skip))
            res[m] = s
        # ratios
        van = res.get("vanilla")
        for m, s in res.items():
            r = {}
            if van:
                r["speedup_vs_vanilla"] = van["iter_ms"] / s["iter_ms"]
                r["loss_diff_vs_vanilla"] = s["final_loss"] - van["final_loss"]
                r["max_step_loss_diff_vs_vanilla"] = max(abs(a - b) for a, b in zip(s["losses"], van["losses"]))
                if "wire" in s and "wire" in van:
                    r["wire_bytes_vs_vanilla"] = s["wire"]["total_bytes"] / van["wire"]["total_bytes"]
                    r["wire_link_s_vs_vanilla"] = s["wire"]["total_link_s"] / van["wire"]["total_link_s"]
            for base in ("random", "laia"):
                b = res.get(base)
                if b is None or m == "vanilla":
                    continue
                r[f"speedup_vs_{base}"] = b["iter_ms"] / s["iter_ms"]
                if "emb" in s and "emb" in b:
                    r[f"emb_link_reduction_vs_{base}_pct"] = 100 * (1 - s["emb"]["total_link_s"] / b["emb"]["total_link_s"])
                    r[f"emb_bytes_reduction_vs_{base}_pct"] = 100 * (1 - s["emb"]["total_bytes"] / b["emb"]["total_bytes"])
                if "wire" in s and "wire" in b:
                    r[f"wire_link_reduction_vs_{base}_pct"] = 100 * (1 - s["wire"]["total_link_s"] / b["wire"]["total_link_s"])
            s["ratios"] = r
        out[mix["name"]] = {"bandwidths": bws, "methods": res}
    return out


def steady_link_from(args) -> int:
    """The first step of the steady-state embedding link time:
    ``--link-warmup-steps``, else the iteration time's (``iter_ms`` averages
    the steps after ``min(--warmup-steps, steps - 2)``), at most the last step."""
    warm = args.link_warmup_steps if args.link_warmup_steps is not None else min(args.warmup_steps, args.steps - 2) + 1
    if warm < 0:
        raise SystemExit(f"--link-warmup-steps must be >= 0, got {warm}")
    return min(warm, max(args.steps - 1, 0))


def steady_decisions(every: List[Dict], repeats: int, skip: int) -> Dict:
    """The dispatching worker's decisions of the steps ``iter_ms`` averages:
    every repeat, after the ``skip`` warm-up steps (decision ``j`` is batch
    ``j``'s), so that the decision time compares with the iteration time it is
    a share of.  The ``mean_*`` figures beside them are the first repeat's
    every decision, the first one's one-time costs (lazy initialisation,
    first calls of the operators) included.  Means over the decisions, and
    per repeat (``steady_full_decision_ms_repeats``); CPU and waiting for a
    core over the full decisions (a plain-split verdict reports none); the
    training thread's wait for its batch's dispatch over every step
    (``steady_training_wait_ms``: the decision's share of the critical path
    when dispatched ahead)."""
    full, cpu, wait, stall, per_rep = [], [], [], [], []
    for rep in range(repeats):
        recs = [r for r in every if r["rep"] == rep and r["rank"] == 0 and "dispatch" in r]
        if not recs:
            continue
        d = recs[0]["dispatch"]
        f = [a + b for a, b in zip(d["decision_ms"][skip:], d["inputs_ms"][skip:])]
        full += f
        if f:
            per_rep.append(sum(f) / len(f))
        cpu += [c for c in d.get("cpu_ms", [])[skip:] if c == c]
        wait += [c for c in d.get("runqueue_ms", [])[skip:] if c == c]
        stall += [c for c in d.get("wait_ms", [])[skip:] if c == c]
    if not full:
        return {}
    out = {"steady_full_decision_ms": sum(full) / len(full), "steady_full_decision_ms_repeats": per_rep,
           "steady_decisions": len(full)}
    if cpu:
        out["steady_full_decision_cpu_ms"] = sum(cpu) / len(cpu)
    if wait:
        out["steady_full_decision_runqueue_ms"] = sum(wait) / len(wait)
    if stall:  # the training thread's wait for the dispatch of its batch (dispatched ahead)
        out["steady_training_wait_ms"] = sum(stall) / len(stall)
    return out


def issue18_targets(het: str, ms: Dict, links: str, workload: str) -> List[Dict]:
    """ESD's dispatch vs LAIA given the same (planned) shares; per-batch shares
    vs LAIA with the planner's shares; decision time vs iteration time."""
    rows = []
    laia = ms["laia+plan"]
    goal = 36.76 if workload == "sessions" else 20.0
    key = "iter_ms" if links == "emulated-tc" else "modelled_iter_ms"
    for cand, s in ms.items():
        if cand == "laia+plan" or "emb" not in s or "emb" not in laia or not cand.endswith("+plan"):
            continue
        red = 100 * (1 - s["emb"]["total_link_s"] / laia["emb"]["total_link_s"])
        train = ""
        if "training_link_s" in s["emb"] and "training_link_s" in laia["emb"]:
            train = (f"; {100 * (1 - s['emb']['training_link_s'] / laia['emb']['training_link_s']):.1f} % over the "
                     "training steps alone, without the end-of-training write-back of the dirty cached rows")
        if "steady_link_s" in s["emb"] and "steady_link_s" in laia["emb"]:
            train += (f"; {100 * (1 - s['emb']['steady_link_s'] / laia['emb']['steady_link_s']):.1f} % over the "
                      f"last {s['emb']['steady_steps']} steps (after the caches' warm-up, no write-back)")
        rows.append({"target": f"[{het}, {workload}] {method_label(cand)} >= {goal:g} % less embedding link time "
                               "than LAIA at the same planned shares",
                     "measured": f"{red:.1f} % less (modelled embedding link time{train})", "met": red >= goal})
    for cand, s in ms.items():
        if "shares" not in cand.split("+") or "emb" not in s:
            continue
        sp = laia[key] / s[key]
        rows.append({"target": f"[{het}, {workload}] {method_label(cand)} >= 1.2x faster than LAIA with the "
                               "planner's shares",
                     "measured": f"{sp:.2f}x ({key}); embedding link time "
                                 f"{100 * (1 - s['emb']['total_link_s'] / laia['emb']['total_link_s']):.1f} % less",
                     "met": sp >= 1.2})
    for cand, s in ms.items():
        if "dispatch" in s and s.get("iter_ms"):
            d = s["dispatch"]
            # the steady state's decisions (the steps iter_ms averages, every repeat), else every decision
            pre = "steady" if "steady_full_decision_ms" in d else "mean"
            full = d[f"{pre}_full_decision_ms"]
            pct = 100 * full / s["iter_ms"]
            rows.append({"target": f"[{het}, {workload}] {method_label(cand)} decision time <= 10 % of the iteration",
                         "measured": (f"{full:.1f} ms = {pct:.1f} % of {s['iter_ms']:.0f} ms"
                                      + (" (steady state, every repeat)" if pre == "steady" else "")
                                      + (f"; the dispatch thread's CPU {d[pre + '_full_decision_cpu_ms']:.1f} ms"
                                         f" ({100 * d[pre + '_full_decision_cpu_ms'] / s['iter_ms']:.1f} %)"
                                         if pre + "_full_decision_cpu_ms" in d else "")
                                      + (f", waiting for a core {d[pre + '_full_decision_runqueue_ms']:.1f} ms"
                                         if pre + "_full_decision_runqueue_ms" in d else "")
                                      + (f"; the training thread waited {d['steady_training_wait_ms']:.2f} ms per "
                                         f"step for its batch's dispatch "
                                         f"({100 * d['steady_training_wait_ms'] / s['iter_ms']:.1f} %)"
                                         if pre == "steady" and "steady_training_wait_ms" in d else "")
                                      + f"; first repeat, every decision: {d['mean_full_decision_ms']:.1f} ms (inputs "
                                        f"{d['mean_inputs_ms']:.1f} + solve {d['mean_decision_ms']:.1f})"
                                      + " (decided ahead in a background thread when --dispatch-ahead > 0)"),
                         "met": pct <= 10})
    return rows


def prefetch_targets(het: str, ms: Dict, links: str) -> List[Dict]:
    """Issue 19's prefetch: iteration time at most 1.15x the larger of the slowest
    worker's compute and link time, and 1.25x faster than the same method without."""
    rows = []
    for cand, s in ms.items():
        variants = cand.split("+")
        base = "+".join(v for v in variants if v != "prefetch")
        if "prefetch" not in variants[1:] or base not in ms:
            continue
        slow = s.get("slowest_worker")
        if slow is not None and links == "emulated-tc":
            rows.append({"target": f"[{het}] {method_label(cand)} iteration <= 1.15x max(compute, link) of the "
                                   "slowest worker",
                         "measured": f"{s['iter_ms']:.0f} ms = {slow['iter_over_max']:.2f}x max(compute "
                                     f"{slow['compute_ms']:.0f} ms CPU, link {slow['link_ms']:.0f} ms) of worker "
                                     f"{slow['worker']}", "met": slow["iter_over_max"] <= 1.15})
        else:
            rows.append({"target": f"[{het}] {method_label(cand)} iteration <= 1.15x max(compute, link) of the "
                                   "slowest worker", "measured": "not measurable: links modelled", "met": None})
        key = "iter_ms" if links == "emulated-tc" else "modelled_iter_ms"
        # against the same method without prefetch, and (where it ran) without any overlap of PS traffic
        # with compute: "+latepull" pulls in the forward, so no early pull and no split reply either
        for ref in (base, base + "+latepull"):
            if ref not in ms:
                continue
            sp = ms[ref][key] / s[key]
            rows.append({"target": f"[{het}] {method_label(cand)} >= 1.25x faster than {method_label(ref)}",
                         "measured": f"{sp:.2f}x ({ms[ref][key]:.0f} -> {s[key]:.0f} ms {key}; "
                                     f"{s.get('emb', {}).get('prefetched_rows', 0)} rows prefetched)",
                         "met": sp >= 1.25})
    return rows


def targets(summary: Dict, links: str, workload: str = "iid") -> List[Dict]:
    """The project's targets, checked on what was measured."""
    rows = []
    names = list(summary)
    het = next((n for n in names if len(set(summary[n]["bandwidths"])) > 1), None)
    hom = next((n for n in names if len(set(summary[n]["bandwidths"])) == 1), None)
    if het:
        ms = summary[het]["methods"]
        # the baselines keep equal shares, as HET-like caches and LAIA do
        bases = [b for b in ("random", "laia") if b in ms]
        for cand in ("hybrid", "esd", "hybrid+plan", "esd+plan"):
            hy, who = ms.get(cand), method_label(cand)
            if hy and bases and "emb" in hy:
                best = min(bases, key=lambda b: ms[b]["emb"]["total_link_s"])
                red = 100 * (1 - hy["emb"]["total_link_s"] / ms[best]["emb"]["total_link_s"])
                wire = ""
                if "wire" in hy and "wire" in ms[best]:
                    wred = 100 * (1 - hy["wire"]["total_link_s"] / ms[best]["wire"]["total_link_s"])
                    wire = f"; all traffic on the wire, Σ bytes/bw: {wred:.1f} % less"
                rows.append({"target": f"[{het}] {who} link-time-weighted embedding traffic >= 36.76 % below "
                                       f"the better of cache-only/LAIA ({method_label(best)})",
                             "measured": f"{red:.1f} % less (modelled embedding link time){wire}", "met": red >= 36.76})
                # over emulated links: measured wall clock; modelled: compute + modelled link time
                key = "iter_ms" if links == "emulated-tc" else "modelled_iter_ms"
                fastest = min(bases, key=lambda b: ms[b][key])
                sp = ms[fastest][key] / hy[key]
                rows.append({"target": f"[{het}] {who} >= 1.74x faster end to end than the faster of "
                                       f"cache-only/LAIA ({method_label(fastest)})",
                             "measured": f"{sp:.2f}x ({links if links == 'emulated-tc' else 'modelled: compute + modelled link'})",
                             "met": sp >= 1.74})
            if hy and "vanilla" in ms:
                if links == "emulated-tc":
                    sp = ms["vanilla"]["iter_ms"] / hy["iter_ms"]
                    rows.append({"target": f"[{het}] {who} faster than vanilla TorchRec",
                                 "measured": f"{sp:.2f}x ({links})", "met": sp > 1.0})
                else:
                    rows.append({"target": f"[{het}] {who} faster than vanilla TorchRec",
                                 "measured": "not measurable: links modelled (vanilla's all-to-all traffic is not "
                                             "modelled)", "met": None})
    if het and "laia+plan" in summary[het]["methods"]:
        rows.extend(issue18_targets(het, summary[het]["methods"], links, workload))
    if het:
        rows.extend(prefetch_targets(het, summary[het]["methods"], links))
    if hom:
        ms = summary[hom]["methods"]
        if "hybrid" in ms and "vanilla" in ms:
            slow = ms["hybrid"]["iter_ms"] / ms["vanilla"]["iter_ms"]
            note = links if links == "emulated-tc" else "links modelled: compute only"
            rows.append({"target": f"[{hom}] HybridDis at most 5 % slower than vanilla TorchRec",
                         "measured": f"{100 * (slow - 1):+.1f} % iteration time ({note})", "met": slow <= 1.05})
    for n in names:
        ms = summary[n]["methods"]
        if "hybrid" in ms and "vanilla" in ms:
            d = ms["hybrid"]["ratios"]["max_step_loss_diff_vs_vanilla"]
            rows.append({"target": f"[{n}] same loss as vanilla at staleness 0",
                         "measured": f"vanilla {ms['vanilla']['final_loss']:.5f}, HybridDis "
                                     f"{ms['hybrid']['final_loss']:.5f} (max per-step diff {d:.1e})",
                         "met": d < 1e-3})
    return rows


def markdown(args, summary: Dict, links: str, meta: Dict) -> str:
    lines = []
    for mix, d in summary.items():
        bws = "/".join(f"{b:g}" for b in d["bandwidths"])
        lines.append(f"**{mix}** ({bws} Mbit/s per worker, links {links}):\n")
        modelled = links != "emulated-tc"
        lines.append("| method | iter ms " + ("| iter ms + modelled link " if modelled else "")
                     + "| samples/s | speedup vs vanilla | speedup vs cache-only | emb. MB (model) "
                     "| emb. link s Σ (model) | emb. link s per worker (model) | emb. link vs cache-only "
                     "| wire MB | wire link s Σ | final loss | AUC |")
        lines.append("|---|---:|" + ("---:|" if modelled else "") + "---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
        for m, s in d["methods"].items():
            r = s["ratios"]
            e, w = s.get("emb"), s.get("wire")
            cells = [
                method_label(m), f"{s['iter_ms']:.0f}",
            ] + ([f"{s['modelled_iter_ms']:.0f}" if "modelled_iter_ms" in s else "-"] if modelled else []) + [
                f"{s['samples_per_s']:.0f}",
                f"{r['speedup_vs_vanilla']:.2f}x" if "speedup_vs_vanilla" in r else "-",
                f"{r['speedup_vs_random']:.2f}x" if "speedup_vs_random" in r else "-",
                f"{e['total_bytes'] / 1e6:.2f}" if e else "-",
                f"{e['total_link_s']:.2f}" if e else "-",
                "/".join(f"{p['link_s']:.2f}" for p in e["per_worker"]) if e else "-",
                ("baseline" if m == "random" else f"{-r['emb_link_reduction_vs_random_pct']:+.1f} %")
                if "emb_link_reduction_vs_random_pct" in r else "-",
                f"{w['total_bytes'] / 1e6:.2f}" if w else "-",
                f"{w['total_link_s']:.2f}" if w else "-",
                f"{s['final_loss']:.5f}", f"{s['auc']:.4f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(
        f"Setup: {meta['W']} workers + {args.num_ps} PS, {args.steps} steps, global batch {args.batch}, "
        f"workload {args.workload}: 26 Zipf(alpha {args.alpha:g}) sparse features, max cardinality {args.max_cardinality}, "
        f"embedding dim {args.embedding_dim}, caches {100 * args.cache_fraction:g} % of every table, "
        f"{args.sparse_optimizer}, staleness {args.staleness}, ESD input mode {args.input_mode}, ESD methods "
        f"dispatch {args.dispatch_ahead} batch(es) ahead and all-reduce dense gradients by {args.dense_sync} "
        f"(vanilla: DDP's ring); "
        f"{os.cpu_count()} CPU cores, the benchmark's ranks used {meta['cpu']['benchmark_cores']:.2f} cores on average"
        + (f", other processes {meta['cpu']['other_cores']:.2f}" if meta["cpu"].get("other_cores") is not None else "")
        + ". "
        f"iter ms = mean wall time of steps {min(args.warmup_steps, args.steps - 2) + 1}..{args.steps - 1} "
        f"(steady state, slowest worker), median of {args.repeats} runs of every method "
        f"(spread: ±{meta.get('spread_pct', 0):.0f} % at most); emb. = embedding rows the ESD runtime "
        "moves between workers and PS (bytes and bytes/bandwidth + latency, modelled from the configured "
        "links; vanilla has none of this traffic); wire = bytes that really crossed the workers' shaped "
        "links (tx+rx, all traffic incl. TorchRec's all-to-alls, dense all-reduce, dispatch), "
        "wire link s = Σ_w bytes_w / bandwidth_w."
        + (" Links MODELLED (no root/ip or --no-netns): iter ms contains no link time; 'iter ms + modelled "
           "link' adds the slowest worker's modelled embedding link time per step (ESD only)." if links != "emulated-tc"
           else f" Links emulated with tc (TBF rate limits both directions{'' if meta.get('netem') else '; no delay: this kernel has no netem, so the model uses 0 ms latency'}); the PS link is unshaped."))
    return "\n".join(lines)


def plot(summary: Dict, path: str, links: str) -> bool:
    """Write the PNG; without matplotlib, say so and skip it (False)."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot ({path}); the JSON and the table are written")
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixes = list(summary)
    methods = list(next(iter(summary.values()))["methods"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    width = 0.8 / len(mixes)
    xs = list(range(len(methods)))

    def rel(base: str, key: str):
        def f(ms, m):
            if m not in ms or key not in ms[m] or base not in ms or key not in ms[base]:
                return None
            return ms[m][key]["total_link_s"] / ms[base][key]["total_link_s"]
        return f

    panels = [
        ("embedding link time (modelled, Σ workers)\nrelative to cache-only", rel("random", "emb")),
        ("on-wire link time Σ_w bytes_w / bw_w (measured)\nrelative to vanilla TorchRec"
         if links == "emulated-tc" else "on-wire traffic: not measured (links modelled)", rel("vanilla", "wire")),
        ("speedup vs vanilla TorchRec\n(steady-state iteration time" + (", shaped links)" if links == "emulated-tc"
                                                                          else ", NO link time: modelled)"),
         lambda ms, m: ms[m]["ratios"].get("speedup_vs_vanilla") if m in ms else None),
    ]
    for ax, (title, fn) in zip(axes, panels):
        for i, mix in enumerate(mixes):
            ms = summary[mix]["methods"]
            vals = [fn(ms, m) for m in methods]
            pos = [x + (i - (len(mixes) - 1) / 2) * width for x in xs]
            bars = ax.bar(pos, [v or 0.0 for v in vals], width,
                          label=f"{mix}: {'/'.join(f'{b:g}' for b in summary[mix]['bandwidths'])} Mbit/s")
            for bar, v in zip(bars, vals):
                ax.annotate("n/a" if v is None else f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=6)
        ax.set_xticks(xs)
        ax.set_xticklabels([method_label(m).replace(" (random)", "") for m in methods], rotation=30, ha="right",
                           fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.axhline(1.0, color="k", lw=0.6)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(mixes), fontsize=8)
    fig.suptitle(f"torchrec_esd end to end (benchmarks/end_to_end.py), links: {links}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    args = parse_args(argv)
    if args._rank:
        rank_main(args._rank)
        return
    t0 = time.perf_counter()
    mixes = parse_mixes(args.mixes)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = {m for m in methods
               if m.split("+")[0] not in METHODS or not set(m.split("+")[1:]) <= set(VARIANTS)
               or (m.startswith("vanilla+"))}
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {METHODS}, "
                         f"ESD ones optionally with +{' / +'.join(VARIANTS)}")
    rc = rate_change.parse(args.rate_change)
    if args.reference_methods:
        refs = [m.strip() for m in args.reference_methods.split(",") if m.strip()]
        if rc is None or len(mixes) != 1:
            raise SystemExit("--reference-methods needs --rate-change and one mix")
        if not refs or any(m == "vanilla" or m.split("+")[0] not in METHODS
                           or not set(m.split("+")[1:]) <= set(VARIANTS) for m in refs):
            raise SystemExit(f"--reference-methods {args.reference_methods!r}: ESD methods, e.g. esd,esd+online")
        mixes = mixes + [dict(m, methods=refs) for m in reference_mixes(mixes[0], rc)]
    W = len(mixes[0]["bandwidths"])
    print(f"[e2e] {W} workers + {args.num_ps} PS, steps {args.steps}, batch {args.batch}, dim "
          f"{args.embedding_dim}, max cardinality {args.max_cardinality}, cache {args.cache_fraction:g}, "
          f"mixes {[m['name'] for m in mixes]}, methods {methods}", flush=True)
    raw = launch(args, mixes, methods)
    summary = summarize(args, mixes, methods, raw)
    tg = targets({k: v for k, v in summary.items() if k == mixes[0]["name"] or not k.startswith("ref_w")}
                 if args.reference_methods else summary, raw["links"], args.workload)
    spreads = [100 * (max(s["iter_ms_repeats"]) - min(s["iter_ms_repeats"])) / 2 / s["iter_ms"]
               for d in summary.values() for s in d["methods"].values()]
    meta = {"W": W, "netem": raw["netem"], "spread_pct": max(spreads), "cpu": raw["cpu"]}
    md = markdown(args, summary, raw["links"], meta)
    elapsed = time.perf_counter() - t0
    result = {
        "links": raw["links"], "links_reason": raw["links_reason"], "netem_available": raw["netem"],
        "applied_links": raw["applied_links"],
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "runtime_s": elapsed, "world_s": raw["world_s"], "cpu_during_world": raw["cpu"],
        "results": summary, "targets": tg, "markdown": md,
    }
    if rc is not None:
        res = rate_change.analyse(raw, methods, rc, W, mix=mixes[0]["name"])
        references = None
        if args.reference_methods:
            # each phase against the in-run reference mix with that phase's rate
            references = rate_change.in_run_references(summary, mixes, rc, len(next(iter(res.values()))["step_ms"]),
                                                       warmup=args.warmup_steps)
            for d in res.values():
                rate_change.apply_references(d, rc, references)
        rc_md = rate_change.markdown(res, rc, method_label, md.splitlines()[-1])
        result["rate_change"] = {"spec": rc, "applied": raw["rate_changes"], "results": res, "markdown": rc_md,
                                 "references": references}
        md = md + "\n\n" + rc_md
        rate_change.plot(res, rc, os.path.splitext(args.out)[0] + "_per_step.png", method_label)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md + "\n")
    print("\n" + md + "\n")
    png = args.png or os.path.splitext(args.out)[0] + ".png"
    plot(summary, png, raw["links"])
    for name, d in summary.items():
        for m, s in d["methods"].items():
            if "dispatch" in s:
                print(f"  [{name}] {method_label(m)}: dispatch {s['dispatch']['solvers']}, "
                      f"{s['dispatch']['mean_full_decision_ms']:.1f} ms/decision (inputs "
                      f"{s['dispatch']['mean_inputs_ms']:.1f} + solve {s['dispatch']['mean_decision_ms']:.1f});"
                      f" rows {s['emb']['rows']}")
            if "compute_samples_per_s_last" in s:
                print(f"  [{name}] {method_label(m)}: measured compute samples/s per worker (last dispatch) "
                      f"{'/'.join(f'{x:.0f}' for x in s['compute_samples_per_s_last'])}; mean samples per step "
                      f"{'/'.join(f'{x:.0f}' for x in s['local_samples_mean'])}")
            print(f"  [{name}] {method_label(m)}: CPU ms/step workers "
                  f"{'/'.join(f'{x:.0f}' for x in s['cpu_ms_per_step_workers'])}, PS "
                  f"{'/'.join(f'{x:.0f}' for x in s['cpu_ms_per_step_ps'])}")
            if "slowest_worker" in s:
                sw = s["slowest_worker"]
                print(f"  [{name}] {method_label(m)}: slowest worker {sw['worker']}: iteration {s['iter_ms']:.0f} ms, "
                      f"compute {sw['compute_ms']:.0f} ms CPU, link {sw['link_ms']:.0f} ms (wire bytes / rate) per "
                      f"step: {sw['iter_over_max']:.2f}x the larger")
            if "wire" in s:
                per = ", ".join(f"w{i} {(p['tx_bytes'] + p['rx_bytes']) / 1e6:.2f} MB" for i, p in
                                enumerate(s["wire"]["per_worker"]))
                print(f"  [{name}] {method_label(m)}: wire {per}; PS {[round(b / 1e6, 2) for b in s['wire']['ps_bytes']]} MB")
    print("\nTargets:")
    for t in tg:
        tag = "n/a " if t["met"] is None else ("MET " if t["met"] else "MISS")
        print(f"  [{tag}] {t['target']}: {t['measured']}")
    if raw["links"] != "emulated-tc":
        print("NOTE: links were MODELLED, not emulated: wall-clock times contain no link time.")
    c = raw["cpu"]
    print(f"CPU during the run: benchmark ranks {c['benchmark_cores']:.2f} cores, other processes "
          f"{c['other_cores'] if c['other_cores'] is None else round(c['other_cores'], 2)} cores "
          f"(machine has {os.cpu_count()})")
    print(f"\nwrote {args.out}, {png}" + (f", {args.markdown}" if args.markdown else "")
          + f" in {elapsed:.0f} s (links: {raw['links']})")


if __name__ == "__main__":
    main()
