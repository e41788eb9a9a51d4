"""Embedding bytes per iteration: TorchRec TW / RW vs ESD row pull vs DES.

    python benchmarks/des_comm.py --out results.json [--workers 4] [--steps 8]

Trains the same DLRM on the same seeded batches (one-hot Criteo-like and
multi-hot, bag length 10-50) with

* ``torchrec_tw``: TorchRec DMP, table-wise, fused optimizer;
* ``torchrec_rw``: TorchRec DMP, row-wise (KJT ids bucketed to the row owners,
  pooled partial sums reduce-scattered back);
* ``esd_row_pull``: trainer method ``esd``, dispatcher ``hybrid`` (W workers +
  1 PS, caches of ``--cache-frac`` of every table): rows pulled/pushed;
* ``esd_des_misses``: the same ESD job with ``EsdConfig(des_misses=True)``:
  where it is cheaper, the PS serves a bag's missing rows as one pooled
  partial sum and takes one gradient vector back (torchrec_esd.des.served_misses);
* ``des_rw`` / ``des_tw``: DES sharding (torchrec_esd.des.sharding), row-/table-wise.

Bytes are *measured*.  TorchRec and DES: a counting wrapper replaces the
``torch.distributed`` collectives that carry embedding traffic
(all_to_all_single, all_to_all, reduce_scatter[_tensor], all_gather[_into_tensor])
while the model's forward and backward run, and adds up the bytes each rank
sends to *other* ranks (its own split excluded; for reduce-scatter and
all-gather the input minus the rank's own chunk).  DDP's dense gradient
all-reduce runs in C++ and is not embedding traffic; the loss all-reduce is
outside the window.  ESD: the runtime's transmission meter (rows and optimizer
state pulled from / pushed to the PS, partial sums and bag gradients, plus the
keys / ids / weights that address them, from the tensors it sends);
ESD's sample dispatch (ids all-gather, dense/label all-to-all) is not in it.
DES additionally reports its own per-kind counts (ids, partials fwd/bwd),
which must agree with the wrapper.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from torchrec_esd.config import EsdConfig, WorkerSpec  # noqa: E402
from torchrec_esd.apps.launch import run_local_world  # noqa: E402
from torchrec_esd.apps.trainer import JobConfig, run, torchrec_dmp  # noqa: E402
from torchrec_esd.apps.sessions import WORKLOADS, make_workload, make_workload_config  # noqa: E402
from torchrec_esd.apps.workload import SyntheticWorkload  # noqa: E402

_COUNTED = ["all_to_all_single", "all_to_all", "reduce_scatter", "reduce_scatter_tensor", "all_gather",
            "all_gather_into_tensor"]


class CollectiveCounter:
    """Wraps torch.distributed collectives; counts bytes sent to other ranks
    while ``phase`` is set (``"fwd"`` / ``"bwd"``)."""

    def __init__(self) -> None:
        self.phase = None
        self.bytes: Dict[str, int] = {}
        self.calls: Dict[str, int] = {}
        self._orig = {}

    def _add(self, op: str, n: int) -> None:
        if self.phase is None:
            return
        key = f"{self.phase}:{op}"
        self.bytes[key] = self.bytes.get(key, 0) + int(n)
        self.calls[key] = self.calls.get(key, 0) + 1

    def install(self) -> None:
        c = self

        def nbytes(t):
            return t.numel() * t.element_size()

        def a2a_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            w = dist.get_world_size(group)
            me = dist.get_rank(group)
            rows = input.shape[0] if input.dim() else 1
            row = nbytes(input) // max(rows, 1)
            splits = list(input_split_sizes) if input_split_sizes else [rows // w] * w
            c._add("all_to_all_single", (sum(splits) - splits[me]) * row)
            return c._orig["all_to_all_single"](output, input, output_split_sizes, input_split_sizes, group, async_op)

        def a2a(output_tensor_list, input_tensor_list, group=None, async_op=False):
            me = dist.get_rank(group)
            c._add("all_to_all", sum(nbytes(t) for i, t in enumerate(input_tensor_list) if i != me))
            return c._orig["all_to_all"](output_tensor_list, input_tensor_list, group, async_op)

        def rs(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
            me = dist.get_rank(group)
            c._add("reduce_scatter", sum(nbytes(t) for i, t in enumerate(input_list) if i != me))
            return c._orig["reduce_scatter"](output, input_list, op, group, async_op)

        def rst(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
            c._add("reduce_scatter_tensor", nbytes(input) - nbytes(output))
            return c._orig["reduce_scatter_tensor"](output, input, op, group, async_op)

        def ag(tensor_list, tensor, group=None, async_op=False):
            w = dist.get_world_size(group)
            c._add("all_gather", nbytes(tensor) * (w - 1))
            return c._orig["all_gather"](tensor_list, tensor, group, async_op)

        def agt(output_tensor, input_tensor, group=None, async_op=False):
            w = dist.get_world_size(group)
            c._add("all_gather_into_tensor", nbytes(input_tensor) * (w - 1))
            return c._orig["all_gather_into_tensor"](output_tensor, input_tensor, group, async_op)

        for name, fn in zip(_COUNTED, [a2a_single, a2a, rs, rst, ag, agt]):
            self._orig[name] = getattr(dist, name)
            setattr(dist, name, fn)


def _torchrec_dmp(job: JobConfig, workload: SyntheticWorkload, sharding: str):
    """TorchRec DMP like the trainer's vanilla job, with the sharding type as a parameter."""
    return torchrec_dmp(job, workload, dist.group.WORLD, sharding)


def _des_dmp(job: JobConfig, workload: SyntheticWorkload, sharding: str):
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    from torchrec_esd.des.sharding import DesEmbeddingBagCollectionSharder, des_module_plan
    from torchrec_esd.apps.trainer import EBC_PATH, DlrmTask, build_model, sparse_optimizer

    model = DlrmTask(build_model(job, workload))
    ebc = model.model.sparse_arch.embedding_bag_collection
    plan = ShardingPlan({EBC_PATH: des_module_plan(ebc, dist.get_world_size(), sharding)})
    return DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD), plan=plan,
                                    sharders=[DesEmbeddingBagCollectionSharder(sparse_optimizer(job))],
                                    device=torch.device("cpu"))


def sharded_worker(method: str, job: JobConfig) -> Dict:
    """One rank of TorchRec TW/RW or DES: counted collectives during fwd/bwd."""
    from torchrec_esd.des.sharding import find_des_modules
    from torchrec_esd.apps.job import _dense_params

    workload = make_workload(job.workload)
    if method.startswith("torchrec_"):
        dmp = _torchrec_dmp(job, workload, {"torchrec_tw": "table_wise", "torchrec_rw": "row_wise"}[method])
    else:
        dmp = _des_dmp(job, workload, {"des_rw": "row_wise", "des_tw": "table_wise"}[method])
    counter = CollectiveCounter()
    counter.install()
    rank, world = dist.get_rank(), dist.get_world_size()
    dense_opt = torch.optim.SGD(_dense_params(dmp), lr=job.dense_lr)
    per = job.global_batch // world
    losses, times = [], []
    for step in range(job.steps):
        batch = workload.local_batch(step, job.global_batch, rank, world)
        dist.barrier()
        t0 = time.perf_counter()
        dense_opt.zero_grad()
        counter.phase = "fwd"
        loss, _ = dmp(batch)
        counter.phase = "bwd"
        loss.backward()
        counter.phase = None
        dense_opt.step()
        dist.barrier()
        times.append(time.perf_counter() - t0)
        g = loss.detach().clone() * per
        dist.all_reduce(g)
        losses.append(float(g) / job.global_batch)
    out = {"bytes": counter.bytes, "calls": counter.calls, "iter_s": times, "losses": losses}
    des = find_des_modules(dmp)
    if des:
        out["des_own_count"] = dict(des[0].comm_bytes)
    return out


def run_sharded(method: str, job: JobConfig) -> Dict:
    res = run_local_world(sharded_worker, job_world(job), method, job, timeout_s=600)
    steps = job.steps
    by_key: Dict[str, int] = {}
    for r in res:
        for k, v in r["bytes"].items():
            by_key[k] = by_key.get(k, 0) + v
    total = sum(by_key.values())
    # iteration time: slowest rank per step, median over steps after the first (warm-up)
    per_step = [max(r["iter_s"][s] for r in res) for s in range(steps)]
    steady = sorted(per_step[1:] or per_step)
    out = {
        "bytes_per_iter": total / steps,
        "bytes_per_iter_by_collective": {k: v / steps for k, v in sorted(by_key.items())},
        "iter_ms": 1e3 * steady[len(steady) // 2],
        "final_loss": res[0]["losses"][-1],
        "measured": "counting wrapper around torch.distributed collectives (bytes sent to other ranks)",
    }
    if "des_own_count" in res[0]:
        own: Dict[str, int] = {}
        for r in res:
            for k, v in r["des_own_count"].items():
                own[k] = own.get(k, 0) + v
        out["des_own_count_per_iter"] = {k: v / steps for k, v in own.items()}
    return out


_WORLD = {}


def job_world(job: JobConfig) -> int:
    return _WORLD["W"]


def run_esd(job: JobConfig, cache_frac: float, des_misses: bool = False) -> Dict:
    W = _WORLD["W"]
    cards = job.workload.cardinalities
    cache = {f"t_{f}": max(1, int(cache_frac * n)) for f, n in zip(job.workload.feature_names, cards)}
    cfg = EsdConfig([WorkerSpec(cache, 1000.0) for _ in range(W)], num_ps=1, des_misses=des_misses)
    esd_job = replace(job, method="esd", esd=cfg, dispatcher="hybrid", input_mode="local")
    res = run_local_world(run, W + 1, esd_job, timeout_s=600)
    e = res[0]
    m = e["metrics"]
    steps = job.steps
    return {
        "bytes_per_iter": m["total_wire_bytes"] / steps,  # payloads + the keys / ids addressing them
        "payload_bytes_per_iter": m["total_bytes"] / steps,
        "bytes_per_iter_by_kind": {k: sum(w["bytes"][k] for w in m["per_worker"]) / steps
                                   for k in m["per_worker"][0]["bytes"]},
        "rows_per_iter": {k: v / steps for k, v in m["rows"].items()},
        "iter_ms": 1e3 * e["elapsed_s"] / steps,
        "final_loss": e["losses"][-1],
        "measured": "ESD runtime transmission meter (rows + optimizer state pulled/pushed between workers and PS)",
        "iter_ms_note": "mean over all steps incl. dispatch (HybridDis) and the first step; W workers + 1 PS process",
    }


def main(argv: List[str] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results.json")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--features", type=int, default=8)
    ap.add_argument("--workload", default="iid", choices=WORKLOADS, help="iid Zipf ids or sessions (apps.sessions)")
    ap.add_argument("--max-rows", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--cache-frac", type=float, default=0.1)
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "rowwise_adagrad"])
    ap.add_argument("--methods", default="torchrec_tw,torchrec_rw,esd_row_pull,esd_des_misses,des_rw,des_tw")
    args = ap.parse_args(argv)
    _WORLD["W"] = args.workers
    t_start = time.time()
    load0 = os.getloadavg()
    workloads = [
        ("one_hot", (1, 1)),
        ("multi_hot_10_50", (10, 50)),
    ]
    methods = args.methods.split(",")
    out = {"config": vars(args), "host": {"cpus": os.cpu_count(), "load_avg_start": load0,
                                          "platform": platform.platform()}, "workloads": []}
    for name, bag in workloads:
        wl = make_workload_config(args.workload, num_sparse=args.features, max_cardinality=args.max_rows,
                                  bag_size=bag, alpha=1.1, seed=1)
        job = JobConfig(steps=args.steps, global_batch=args.batch, embedding_dim=args.dim, workload=wl,
                        sparse_optimizer=args.optimizer, sparse_lr=0.05, dense_lr=0.05,
                        dense_arch=(32,), over_arch=(32, 1))
        entry = {"name": name, "bag_size": list(bag), "bytes": {}, "iter_ms": {}, "details": {}}
        for m in methods:
            print(f"[{name}] {m} ...", flush=True)
            if m in ("esd_row_pull", "esd_des_misses"):
                r = run_esd(job, args.cache_frac, des_misses=m == "esd_des_misses")
            else:
                r = run_sharded(m, job)
            entry["bytes"][m] = r["bytes_per_iter"]
            entry["iter_ms"][m] = r["iter_ms"]
            entry["details"][m] = r
        b = entry["bytes"]
        if b.get("esd_row_pull") and b.get("esd_des_misses") is not None:
            entry["esd_des_misses_saving_vs_row_pull"] = 1 - b["esd_des_misses"] / b["esd_row_pull"]
        if b.get("esd_row_pull") and b.get("des_tw") is not None:
            entry["des_tw_saving_vs_row_pull"] = 1 - b["des_tw"] / b["esd_row_pull"]
        if b.get("esd_row_pull") and b.get("des_rw") is not None:
            entry["des_rw_saving_vs_row_pull"] = 1 - b["des_rw"] / b["esd_row_pull"]
        if b.get("torchrec_rw") and b.get("des_rw") is not None:
            entry["des_rw_saving_vs_torchrec_rw"] = 1 - b["des_rw"] / b["torchrec_rw"]
        out["workloads"].append(entry)
    out["wall_s"] = time.time() - t_start
    out["load_avg_end"] = os.getloadavg()
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    _print_table(out, methods)
    return out


def _print_table(out: Dict, methods: List[str]) -> None:
    cfg = out["config"]
    print(f"\nW={cfg['workers']} ranks, batch {cfg['batch']}, {cfg['features']} features, dim {cfg['dim']}, "
          f"{cfg['steps']} steps, optimizer {cfg['optimizer']}; wall {out['wall_s']:.0f} s, "
          f"load {out['host']['load_avg_start'][0]:.1f} on {out['host']['cpus']} CPUs")
    print("| workload | method | embedding KB/iter | iter ms |")
    print("|---|---|---|---|")
    for w in out["workloads"]:
        for m in methods:
            b, t = w["bytes"].get(m), w["iter_ms"].get(m)
            bs = "not implemented" if b is None else f"{b / 1024:.1f}"
            ts = "-" if t is None else f"{t:.1f}"
            print(f"| {w['name']} | {m} | {bs} | {ts} |")
        for k in ("esd_des_misses_saving_vs_row_pull", "des_tw_saving_vs_row_pull", "des_rw_saving_vs_row_pull",
                  "des_rw_saving_vs_torchrec_rw"):
            if k in w:
                print(f"| {w['name']} | {k} | {100 * w[k]:+.1f} % | |")


if __name__ == "__main__":
    main()
