"""DLRM trained with ESD (EsdInputDist + ESD sharder) under torchrun, side by
side with vanilla TorchRec on the same global batches.

    torchrun --nproc_per_node 5 examples/dlrm_esd.py --num-ps 1 --compare-vanilla

runs vanilla TorchRec ``DistributedModelParallel`` on the 4 worker ranks, then
ESD with each ``--dispatchers`` entry on 4 workers + 1 parameter server, and
prints per method: final loss, AUC, throughput and transmission per worker.
The data is the seeded synthetic Criteo-like workload, or, with
``--criteo-tsv PATH``, a Criteo-format TSV file (``label, I1..I13, C1..C26``
per line, e.g. the Kaggle display-ads ``train.txt``; see torchrec_esd.apps.criteo):
batch ``k`` is rows ``k*B..(k+1)*B-1``, wrapping around at the end of the file.

    torchrun --nproc_per_node 5 examples/dlrm_esd.py --num-ps 1 --compare-vanilla \
        --criteo-tsv train.txt --max-rows 1000000

Backend: gloo on CPU (``--backend nccl`` on GPUs keeps the worker collectives
on NCCL; the PS protocol always runs on gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torchrec_esd.config import EsdConfig, EsdConfigError, heterogeneous_workers  # noqa: E402
from torchrec_esd.apps.step_metrics import require_tensorboard  # noqa: E402
from torchrec_esd.log import configure_logging  # noqa: E402
from torchrec_esd.apps.criteo import CriteoTsvConfig  # noqa: E402
from torchrec_esd.apps.trainer import JobConfig, run  # noqa: E402
from torchrec_esd.apps.sessions import WORKLOADS, make_workload_config  # noqa: E402
from torchrec_esd.dispatch import DISPATCHERS  # noqa: E402


def dispatcher_list(text: str):
    """``--dispatchers``: comma-separated names, each a known dispatcher
    (checked while parsing, not when its run starts)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in DISPATCHERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown dispatcher(s) {unknown or [text]}; choose from {', '.join(sorted(DISPATCHERS))}"
        )
    return names


def positive_int(text: str) -> int:
    """``--steps`` / ``--batch``: checked while parsing, so a 0 fails every rank
    at once with the argument's name instead of deep inside a run."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-ps", type=int, default=1,
                   help="parameter-server ranks (the last NUM_PS ranks of the world; the others are workers)")
    p.add_argument("--steps", type=positive_int, default=30, help="training steps (global batches) per method")
    p.add_argument("--batch", type=positive_int, default=512, help="global batch size")
    p.add_argument("--embedding-dim", type=int, default=16, help="embedding dimension of every table")
    p.add_argument("--bandwidths", default="1000,100,50,10",
                   help="comma-separated link bandwidth of each worker in Mbit/s, cycled over the workers "
                        "(what the ESD cost model and link-time accounting assume)")
    p.add_argument("--latency-ms", type=float, default=1.0,
                   help="one-way latency per message of every worker link, ms (cost model and link time)")
    p.add_argument("--cache-fraction", type=float, default=0.1,
                   help="rows each worker caches per table, as a fraction of the table's rows")
    p.add_argument("--max-cardinality", type=int, default=20_000,
                   help="rows of the largest table (synthetic workload; Criteo ids are hashed into this many)")
    p.add_argument("--alpha", type=float, default=1.1,
                   help="Zipf exponent of the synthetic workload's ids (higher: more skewed, more cache hits)")
    p.add_argument("--workload", default="iid", choices=WORKLOADS,
                   help="synthetic ids: iid Zipf, or sessions of users with interest clusters")
    p.add_argument("--criteo-tsv", default=None, metavar="PATH",
                   help="train on this Criteo-format TSV file instead of the synthetic workload")
    p.add_argument("--max-rows", type=int, default=None,
                   help="with --criteo-tsv: use only the first MAX_ROWS rows (batches wrap around)")
    p.add_argument("--dispatchers", default=["hybrid"], type=dispatcher_list,
                   help=f"comma-separated, each one of: {', '.join(sorted(DISPATCHERS))}")
    p.add_argument("--staleness", type=int, default=0, help="ESD staleness bound s (0 = synchronous)")
    p.add_argument("--dense-sync", default="star", choices=["ring", "star"],
                   help="ESD's dense-gradient all-reduce: through the fastest worker, or DDP's ring")
    p.add_argument("--dispatch-ahead", type=int, default=1,
                   help="dispatch this many batches ahead in a background thread (0: inline, batch by batch)")
    p.add_argument("--prefetch-depth", type=int, default=0, metavar="K",
                   help="pull the safe rows of the next K batches while a batch computes (EsdConfig.prefetch_depth; "
                        "needs --dispatch-ahead >= K; 0: off)")
    p.add_argument("--sparse-optimizer", default="rowwise_adagrad", choices=["sgd", "rowwise_adagrad"],
                   help="embedding optimizer (FBGEMM semantics; the same for vanilla TorchRec and ESD)")
    p.add_argument("--compare-vanilla", action="store_true",
                   help="first train vanilla TorchRec (DMP, table-wise) on the worker ranks, for comparison")
    p.add_argument("--backend", default="gloo",
                   help="torch.distributed backend of the workers' collectives (gloo; nccl on GPUs); "
                        "the PS protocol always runs on gloo")
    p.add_argument("--fault-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a rank silent this long (killed, stopped, host gone) ends every rank with a message "
                        "naming it; a rank's failure ends the others within a few seconds (0: no fault monitor)")
    p.add_argument("--check-finite", action="store_true",
                   help="a non-finite loss or embedding gradient stops the job (naming the step) before the "
                        "parameter servers' tables are poisoned")
    p.add_argument("--out", default=None, help="write results as JSON here (rank 0)")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="write DCP checkpoints of TorchRec's state_dict (tables, optimizer state, dense weights) "
                        "under DIR/<method>: every --checkpoint-every steps, at the end, and on SIGTERM "
                        "(then the job exits with code 143 after the checkpoint is complete)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="checkpoint every N steps (0: only at the end and on SIGTERM; needs --checkpoint-dir)")
    p.add_argument("--resume", action="store_true",
                   help="start from the latest complete checkpoint under --checkpoint-dir (if there is one); "
                        "vanilla TorchRec and ESD checkpoints load into each other")
    p.add_argument("--metrics-jsonl", default=None, metavar="PATH",
                   help="write per-step records (loss, iteration ms, bytes and link time per worker and kind, "
                        "dispatch decision ms and solver) as JSON lines here, one line per step and method "
                        "(rank 0; the file is replaced; plot with scripts/plot_metrics.py)")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also write the per-step numbers as TensorBoard scalars under DIR "
                        "(needs the tensorboard package)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="level of the package's log records (stderr, prefixed [rank R role])")
    args = p.parse_args(argv)
    if (args.resume or args.checkpoint_every) and not args.checkpoint_dir:
        p.error("--resume and --checkpoint-every need --checkpoint-dir")
    if args.checkpoint_every < 0:
        p.error("--checkpoint-every must be >= 0")
    if args.tensorboard is not None:
        try:
            require_tensorboard()
        except EsdConfigError as e:
            p.error(f"--tensorboard: {e}")
    if args.prefetch_depth < 0 or args.prefetch_depth > args.dispatch_ahead:
        p.error(f"--prefetch-depth {args.prefetch_depth}: must be >= 0 and <= --dispatch-ahead "
                f"({args.dispatch_ahead}): rows are prefetched for batches already dispatched")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    if args.max_rows is not None and args.criteo_tsv is None:
        raise SystemExit("--max-rows needs --criteo-tsv")
    if args.criteo_tsv is not None:  # checked before the rendezvous: a bad path fails every rank at once
        workload = CriteoTsvConfig(args.criteo_tsv, max_rows=args.max_rows, max_cardinality=args.max_cardinality)
    else:
        workload = make_workload_config(args.workload, max_cardinality=args.max_cardinality, alpha=args.alpha, seed=0)
    dist.init_process_group(args.backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    W = world - args.num_ps
    if W < 1:
        raise SystemExit(f"world of {world} ranks leaves no worker for {args.num_ps} parameter servers")
    bws = [float(b) for b in args.bandwidths.split(",")]
    cache = {
        f"t_cat_{i}": max(1, int(args.cache_fraction * n)) for i, n in enumerate(workload.cardinalities)
    }
    esd = EsdConfig(
        heterogeneous_workers([bws[i % len(bws)] for i in range(W)], cache, latency_ms=args.latency_ms),
        num_ps=args.num_ps,
        staleness=args.staleness,
        fault_timeout_s=args.fault_timeout if args.fault_timeout != 0 else None,
        check_finite=args.check_finite,
        prefetch_depth=args.prefetch_depth,
    )
    base = dict(
        steps=args.steps, global_batch=args.batch, embedding_dim=args.embedding_dim, workload=workload,
        sparse_optimizer=args.sparse_optimizer, esd=esd, progress=True,
        metrics_jsonl=args.metrics_jsonl, tensorboard_dir=args.tensorboard,
    )
    if args.metrics_jsonl and rank == 0:  # every job appends its records
        open(args.metrics_jsonl, "w").close()

    def ckpt(label):
        if not args.checkpoint_dir:
            return {}
        return dict(checkpoint_dir=os.path.join(args.checkpoint_dir, label),
                    checkpoint_every=args.checkpoint_every, resume=args.resume)

    results, preempted = {}, None
    if args.compare_vanilla:
        r = run(JobConfig(method="vanilla", **ckpt("vanilla"), **base))
        preempted = preempted or r.get("preempted_at")
        if rank == 0:
            results["vanilla"] = _summary(r, args)
    for name in args.dispatchers:
        if preempted:
            break
        r = run(JobConfig(method="esd", dispatcher=name, dispatch_ahead=args.dispatch_ahead,
                          dense_sync=args.dense_sync, **ckpt(f"esd_{name}"), **base))
        preempted = preempted or r.get("preempted_at")
        if rank == 0:
            results[f"esd_{name}"] = _summary(r, args)
    if preempted:
        if rank == 0:
            print(f"preempted (SIGTERM) at step {preempted}: checkpoint written under {args.checkpoint_dir}; "
                  "run again with --resume to continue", file=sys.stderr, flush=True)
        dist.destroy_process_group()
        sys.exit(143)
    if rank == 0:
        if args.criteo_tsv is not None:
            print(f"\nworkload: Criteo TSV {args.criteo_tsv}"
                  + (f" (first {args.max_rows} rows)" if args.max_rows is not None else ""))
        _print(results, esd)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "results": results}, f, indent=2)
    dist.destroy_process_group()


def _summary(r, args):
    out = {
        "final_loss": sum(r["losses"][-5:]) / len(r["losses"][-5:]) if r["losses"] else None,
        "auc": r["auc"],
        "elapsed_s": r["elapsed_s"],
        "samples_per_s": len(r["losses"]) * args.batch / r["elapsed_s"] if r["losses"] else None,
        "steps_trained": len(r["losses"]),
    }
    if "metrics" in r:
        m = r["metrics"]
        out["transmission"] = {
            "total_bytes": m["total_bytes"],
            "total_link_s": m["total_link_s"],
            "makespan_link_s": m["makespan_link_s"],
            "rows": m["rows"],
            "per_worker": [{"bytes": w["total_bytes"], "link_s": w["link_s"]} for w in m["per_worker"]],
        }
        solvers = {}
        for d in r["decisions"]:
            solvers[d["solver"]] = solvers.get(d["solver"], 0) + 1
        out["dispatch"] = {
            "solvers": solvers,
            "mean_decision_ms": sum(d["ms"] for d in r["decisions"]) / max(1, len(r["decisions"])),
        }
    return out


def _print(results, esd):
    print(f"\n{'method':<16}{'loss':>8}{'AUC':>7}{'samples/s':>11}{'emb MB':>9}{'link s':>9}{'makespan s':>12}")
    for name, r in results.items():
        t = r.get("transmission")
        mb = f"{t['total_bytes'] / 1e6:.2f}" if t else "-"
        ls = f"{t['total_link_s']:.2f}" if t else "-"
        mk = f"{t['makespan_link_s']:.2f}" if t else "-"
        if r["final_loss"] is None:
            print(f"{name:<16} no step left to train")
            continue
        print(f"{name:<16}{r['final_loss']:>8.4f}{r['auc']:>7.3f}{r['samples_per_s']:>11.0f}{mb:>9}{ls:>9}{mk:>12}")
    for name, r in results.items():
        if "transmission" in r:
            per = ", ".join(
                f"w{i}@{w.bandwidth_mbps:g}Mb/s: {p['bytes'] / 1e6:.2f} MB {p['link_s']:.2f} s"
                for i, (w, p) in enumerate(zip(esd.workers, r["transmission"]["per_worker"]))
            )
            print(f"  {name}: {per}; dispatch {r['dispatch']}")
    print("(emb MB / link s: embedding traffic between workers and PS, link time = bytes/bandwidth + latency "
          "per message; vanilla TorchRec moves pooled embeddings by all-to-all instead)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
