"""Where a training step's CPU goes, per rank and thread: vanilla TorchRec vs ESD.

Runs one job on a local gloo world (W workers + 1 PS for ESD; no tc shaping:
links are loopback, so what differs from vanilla is CPU) and prints, per
rank, the steady-state wall and CPU milliseconds per step.  With
``--profile DIR`` it also writes, per rank, a cProfile of every thread
(thread CPU time, ``time.thread_time``): the training thread from step 3 to
the last step, the dispatch-ahead, fault-monitor and other threads for
their whole life, the PS's main thread for the whole job.

    python benchmarks/profile_step.py --method vanilla
    python benchmarks/profile_step.py --method esd --dispatcher hybrid --profile /tmp/prof

Profiling slows every rank down; compare runs with the same flag.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import os
import pstats
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _job(args):
    from torchrec_esd.apps.sessions import make_workload_config
    from torchrec_esd.apps.trainer import JobConfig
    from torchrec_esd.config import EsdConfig, heterogeneous_workers

    wl = make_workload_config(args.workload, max_cardinality=args.max_cardinality, alpha=1.1, seed=0)
    cache = {f"t_cat_{i}": max(1, int(args.cache_fraction * n)) for i, n in enumerate(wl.cardinalities)}
    bws = [float(b) for b in args.bandwidths.split(",")]
    esd = EsdConfig(heterogeneous_workers(bws, cache), num_ps=1)
    base = dict(steps=args.steps, global_batch=args.batch, embedding_dim=16, workload=wl,
                sparse_optimizer="rowwise_adagrad", esd=esd)
    if args.method == "vanilla":
        return JobConfig(method="vanilla", **base)
    return JobConfig(method="esd", dispatcher=args.dispatcher, dispatch_ahead=args.dispatch_ahead,
                     dense_sync=args.dense_sync, **base)


def _rank(args):
    import torch.distributed as dist

    from torchrec_esd.apps.trainer import run

    job = _job(args)
    profiles = []
    plain_run = threading.Thread.run
    main = cProfile.Profile(time.thread_time)
    if args.profile:
        def profiled_run(self):
            p = cProfile.Profile(time.thread_time)
            profiles.append((self.name, p))
            p.enable()
            try:
                plain_run(self)
            finally:
                p.disable()

        threading.Thread.run = profiled_run
        profiles.append(("main", main))
        if dist.get_rank() >= len(args.bandwidths.split(",")):
            main.enable()  # a PS rank has no steps: its whole job

        def on_step(step):
            if step == 2:
                main.enable()
            if step == args.steps - 1:
                main.disable()

        job = dataclasses.replace(job, on_step=on_step)
    # a PS rank has no step callback: mark its steps at the end of each GRADS phase
    # (process CPU, so gloo's threads count too)
    from torchrec_esd.ps.server import ParameterServer

    plain_grads = ParameterServer._grads
    ps_marks = []

    def marked_grads(self, frames, payloads):
        plain_grads(self, frames, payloads)
        ps_marks.append((time.perf_counter(), time.process_time()))

    ParameterServer._grads = marked_grads
    dist.barrier()
    c0, t0 = time.process_time(), time.perf_counter()
    r = run(job)
    ParameterServer._grads = plain_grads
    out = {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0, "role": r.get("role", "worker")}
    main.disable()
    threading.Thread.run = plain_run
    if "step_end_s" in r:
        ts, cs = r["step_end_s"][2:], r["step_end_cpu_s"][2:]
        out["step_ms"] = 1e3 * (ts[-1] - ts[0]) / (len(ts) - 1)
        out["step_cpu_ms"] = 1e3 * (cs[-1] - cs[0]) / (len(cs) - 1)
    else:
        out["cpu_ms_per_step"] = 1e3 * out["cpu_s"] / args.steps  # with the job's setup
        if len(ps_marks) > 3:  # steady state, as the workers' step_cpu_ms
            ts, cs = [m[0] for m in ps_marks[2:]], [m[1] for m in ps_marks[2:]]
            out["step_ms"] = 1e3 * (ts[-1] - ts[0]) / (len(ts) - 1)
            out["step_cpu_ms"] = 1e3 * (cs[-1] - cs[0]) / (len(cs) - 1)
    if args.profile:
        text = []
        for name, p in profiles:
            for key in ("tottime", "cumulative"):
                s = io.StringIO()
                pstats.Stats(p, stream=s).sort_stats(key).print_stats(args.top)
                text.append(f"==== thread {name}, by {key}\n{s.getvalue()}")
            for fn in args.callers:
                s = io.StringIO()
                pstats.Stats(p, stream=s).print_callers(fn)
                text.append(f"==== thread {name}, callers of {fn}\n{s.getvalue()}")
        out["profile"] = "\n".join(text)
    dist.barrier()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="esd", choices=["vanilla", "esd"])
    p.add_argument("--dispatcher", default="hybrid")
    p.add_argument("--bandwidths", default="1000,1000,1000,1000", help="Mbit/s per worker (W = entries)")
    p.add_argument("--workload", default="iid", choices=["iid", "sessions"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--max-cardinality", type=int, default=20000)
    p.add_argument("--cache-fraction", type=float, default=0.1)
    p.add_argument("--dispatch-ahead", type=int, default=1)
    p.add_argument("--dense-sync", default="star", choices=["star", "ring"], help="ESD's dense all-reduce")
    p.add_argument("--profile", default=None, help="write rank<r>.txt cProfiles of every thread here")
    p.add_argument("--top", type=int, default=40, help="functions per profile listing")
    p.add_argument("--callers", action="append", default=[],
                   help="also list the callers of functions matching this pstats pattern (repeatable)")
    args = p.parse_args(argv)

    from torchrec_esd.apps.launch import run_local_world

    W = len(args.bandwidths.split(","))
    world = W if args.method == "vanilla" else W + 1
    results = run_local_world(_rank, world, args, timeout_s=900)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    for r, o in enumerate(results):
        prof = o.pop("profile", None)
        if prof is not None:
            with open(os.path.join(args.profile, f"rank{r}.txt"), "w") as f:
                f.write(prof)
        print(f"rank {r}: " + json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in o.items()}))


if __name__ == "__main__":
    main()
