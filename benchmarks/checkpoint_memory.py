"""Peak memory per rank while an ESD job saves a DCP checkpoint of large tables.

    python benchmarks/checkpoint_memory.py [--rows 10000000] [--tables 4] [--dim 16] --out F.json --markdown F.md

One gloo world on this machine: 4 workers + 2 parameter servers (``--workers``,
``--num-ps``), ESD tables of ``--rows`` rows in all (``--tables`` equal tables,
built on the meta device, so no worker materialises them), row-wise Adagrad,
a few training steps on random ids (so that worker caches hold dirty rows),
then ``dcp.save({"model": dmp.state_dict(), "optim": optimizer.state_dict()})``
as :mod:`torchrec_esd.apps.checkpointing` does.  Just before the save, worker 0
resets every rank's peak-RSS counter (``/proc/<pid>/clear_refs``, Linux); after
it, each rank's peak RSS during the save (``VmHWM``) and its RSS before are
read from ``/proc``.  Reported against the bytes of the whole tables (values +
optimizer state): no rank should come near a full copy.  The PS ranks' own
storage (their half of the tables) is part of their RSS before the save.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torchrec_esd.apps.launch import run_local_world  # noqa: E402


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _job(args) -> dict:
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingPlan
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    import torch.distributed.checkpoint as dcp
    from torchrec.optim.keyed import CombinedOptimizer

    from torchrec_esd import (EsdConfig, EsdEmbeddingBagCollectionSharder, EsdInputDist, EsdRuntime,
                              SparseOptimizer, WorkerSpec, esd_module_plan)
    from torchrec.datasets.utils import Batch

    rows = args.rows // args.tables
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=args.dim, num_embeddings=rows, feature_names=[f"f{i}"])
              for i in range(args.tables)]
    cfg = EsdConfig([WorkerSpec(cache_rows=args.cache_rows, bandwidth_mbps=100) for _ in range(args.workers)],
                    num_ps=args.num_ps)
    runtime = EsdRuntime(cfg, tables, SparseOptimizer("rowwise_adagrad", lr=0.05))
    pids = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid(), group=runtime.all_group)

    class Sparse(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))

        def forward(self, kjt):
            return self.ebc(kjt).values().sum(1)

    model = Sparse()
    if runtime.is_ps:
        runtime.serve(model.ebc)
        return {"role": "ps"}
    dmp = DistributedModelParallel(model, env=runtime.sharding_env(),
                                   plan=ShardingPlan({"ebc": esd_module_plan(model.ebc, runtime)}),
                                   sharders=[EsdEmbeddingBagCollectionSharder(runtime)], device=torch.device("cpu"))
    esd = EsdInputDist(runtime, "heuristic", mode="global")
    B = args.batch
    for step in range(args.steps):
        g = torch.Generator().manual_seed(step)
        values = torch.randint(0, rows, (args.tables * B,), generator=g)
        kjt = KeyedJaggedTensor(keys=[t.feature_names[0] for t in tables], values=values,
                                lengths=torch.ones(args.tables * B, dtype=torch.int32), stride=B)
        local = esd(Batch(dense_features=torch.zeros(B, 1), sparse_features=kjt, labels=torch.zeros(B)))
        out = dmp(local.sparse_features)
        esd.loss(out).backward()
    optimizer = CombinedOptimizer([dmp.fused_optimizer])
    dist.barrier(group=runtime.worker_group)
    me = runtime.worker_index
    rss_before = {r: _status(p, "VmRSS") for r, p in enumerate(pids)}
    if me == 0:
        for p in pids:  # reset every rank's peak RSS (Linux: "5" clears VmHWM)
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")
    dist.barrier(group=runtime.worker_group)
    t0 = time.perf_counter()
    state = {"model": dmp.state_dict(), "optim": optimizer.state_dict()}
    dcp.save(state, checkpoint_id=args.dir, process_group=runtime.worker_group)
    del state
    save_s = time.perf_counter() - t0
    dist.barrier(group=runtime.worker_group)
    peak = {r: _status(p, "VmHWM") for r, p in enumerate(pids)}
    runtime.shutdown()
    return {"role": "worker", "save_s": save_s, "rss_before": rss_before, "peak": peak}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000, help="rows of all ESD tables together")
    p.add_argument("--tables", type=int, default=4)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--num-ps", type=int, default=2)
    p.add_argument("--cache-rows", type=int, default=100_000, help="cache rows per worker and table")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="esd_ckpt_mem_") as d:
        args.dir = d
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        results = run_local_world(_job, args.workers + args.num_ps, args, timeout_s=1800)
        disk = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    w0 = results[0]
    full = args.rows * (args.dim + 1) * 4  # values + row-wise Adagrad state, float32
    lines = [
        f"# Peak RSS per rank while saving a DCP checkpoint ({args.rows:,} rows, {args.tables} tables, dim "
        f"{args.dim}, {args.workers} workers + {args.num_ps} PS)",
        "",
        f"Whole tables (values + optimizer state): {full / 2**20:.0f} MiB; checkpoint on disk "
        f"{disk / 2**20:.0f} MiB; save took {max(r['save_s'] for r in results[: args.workers]):.1f} s.",
        "",
        "| rank | role | RSS before save (MiB) | peak RSS during save (MiB) | peak - before (MiB) | (peak - before) / whole tables |",
        "|---|---|---|---|---|---|",
    ]
    for r in range(args.workers + args.num_ps):
        role = f"worker {r}" if r < args.workers else f"PS {r - args.workers}"
        before, peak = w0["rss_before"][r], w0["peak"][r]
        lines.append(f"| {r} | {role} | {before / 2**20:.0f} | {peak / 2**20:.0f} | {(peak - before) / 2**20:.0f} "
                     f"| {(peak - before) / full:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "dir"}, "full_bytes": full,
                       "disk_bytes": disk, "workers": results[: args.workers]}, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
