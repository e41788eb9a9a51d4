"""The main job (``bash scripts/main.sh``): vanilla TorchRec, LAIA and ESD on
heterogeneous links, with the link time that really applies.

    python benchmarks/main_job.py [--steps 30] [--bandwidths 1000,100,50,10] [--no-netns] [--out results_main.json]

One torch.distributed world of W workers + 1 parameter server trains the same
DLRM on the same seeded global batches (the synthetic Criteo-like workload)
with vanilla TorchRec (DMP, table-wise, fused row-wise Adagrad), the
LAIA-style greedy dispatcher and ESD's HybridDis, at equal shares and with
the shares of ``EsdShardingPlanner`` (the full ESD system).  It runs through
``benchmarks/end_to_end.py`` (one mix, one repeat), so the links are:

* **tc-shaped** (root with iproute2): every rank in its own network namespace,
  each worker's link rate-limited with ``tc`` (``benchmarks/netns.py``); the
  iteration times are wall clock over the shaped links, the traffic is every
  byte that crossed each worker's link (interface counters).
* **modelled** otherwise (or ``--no-netns``): plain local processes; the
  iteration time is the measured compute time plus the slowest worker's
  *modelled* link time per step, from the bytes each method moves per worker:
  vanilla TorchRec's id and pooled-embedding all-to-alls (table-wise plan, from
  the same batches) and its DDP ring all-reduce; ESD's parameter-server traffic
  as its runtime metered it, its dense all-reduce through the fastest worker
  and the broadcast assignment.  Link time = bytes / bandwidth (no latency:
  this kernel has no netem, and the tc runs use none either).

The table says which, and ends with one line: how much faster ESD is and how
much less traffic it moves than vanilla TorchRec and than LAIA.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import end_to_end  # noqa: E402

METHODS = ["vanilla", "laia", "hybrid", "hybrid+plan"]
ESD = "hybrid+plan"  # the full ESD system: planner shares + HybridDis
ROW = {
    "vanilla": "vanilla TorchRec",
    "laia": "LAIA (greedy, equal shares)",
    "hybrid": "ESD HybridDis, equal shares",
    "hybrid+plan": "ESD (HybridDis + planner shares)",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bandwidths", default="1000,100,50,10", help="Mbit/s per worker (W = entries)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=512, help="global batch")
    p.add_argument("--max-cardinality", type=int, default=20_000)
    p.add_argument("--no-netns", action="store_true", help="modelled links even where tc shaping works")
    p.add_argument("--out", default="results_main.json", help="JSON with the table's numbers")
    p.add_argument("--timeout-s", type=float, default=900.0)
    return p.parse_args(argv)


# ---------------------------------------------------------------- link models
def vanilla_link_bytes(table_owner: Dict[str, int], workload_config, steps: int, batch: int,
                       W: int, dim: int, dense_bytes: int) -> List[float]:
    """Bytes (sent + received) on each worker's link over ``steps`` steps of
    vanilla TorchRec with a table-wise plan (``table_owner``: table -> rank):
    per step, the id all-to-all (each sample slice's lengths and ids of every
    feature to the feature's owner), the pooled-embedding all-to-all forward
    and its gradient backward, and DDP's ring all-reduce of the dense
    gradients (``2 (W - 1) / W`` of them each way).  TorchRec's split-size
    messages (a few ints) are left out.  O(steps * features) batch decodes."""
    from torchrec_esd.apps.workload import SyntheticWorkload
    from torchrec_esd.distributed.dense_sync import link_bytes_per_step

    wl = SyntheticWorkload(workload_config)
    names = workload_config.feature_names
    owner = {f: table_owner[f"t_{f}"] if f"t_{f}" in table_owner else table_owner[f] for f in names}
    per = batch // W
    ring = link_bytes_per_step("ring", [1.0] * W, dense_bytes)
    total = [0.0] * W
    for step in range(steps):
        kjts = [wl.local_batch(step, batch, w, W).sparse_features.to_dict() for w in range(W)]
        for w in range(W):
            mine = [f for f in names if owner[f] == w]
            for f in names:
                jt = kjts[w][f]
                nbytes = jt.lengths().numel() * jt.lengths().element_size() + \
                    jt.values().numel() * jt.values().element_size()
                if owner[f] != w:  # my slice's ids of feature f go to its owner, and come back pooled
                    total[w] += nbytes
                    total[owner[f]] += nbytes
            # pooled embeddings: forward, my tables' rows to the W-1 others, and the others'
            # tables for my slice to me; the backward sends the same gradients the other way
            total[w] += 2 * per * dim * 4 * ((W - 1) * len(mine) + (len(names) - len(mine)))
            total[w] += 2 * ring[w]
    return total


def esd_link_bytes(per_worker_ps_bytes: List[int], steps: int, batch: int, bandwidths: List[float],
                   dense_sync: str, dense_bytes: int) -> List[float]:
    """ESD's bytes on each worker's link: the parameter-server traffic its
    runtime metered (wire bytes: payloads, keys, frames), the dense all-reduce
    (``dense_sync``) and the int64 assignment worker 0 broadcasts per step."""
    from torchrec_esd.distributed.dense_sync import link_bytes_per_step

    W = len(bandwidths)
    dense = link_bytes_per_step(dense_sync, bandwidths, dense_bytes)
    out = []
    for w in range(W):
        assignment = (W - 1) * batch * 8 if w == 0 else batch * 8
        out.append(per_worker_ps_bytes[w] + steps * (2 * dense[w] + assignment))
    return out


# ---------------------------------------------------------------- the table
def rows_from(summary: Dict, raw: Dict, args, links: str, bandwidths: List[float], workload, dense_bytes: int):
    """Per method: iter ms (with the link time that applies), traffic per worker."""
    W = len(bandwidths)
    methods = summary["main"]["methods"]
    rows = {}
    for m in METHODS:
        s = methods[m]
        if links == "emulated-tc":
            per_bytes = [p["tx_bytes"] + p["rx_bytes"] for p in s["wire"]["per_worker"]]
        elif m == "vanilla":
            owner = next(r["table_owner"] for rank in raw["per_rank"] for r in rank
                         if r["method"] == "vanilla" and "table_owner" in r)
            per_bytes = vanilla_link_bytes(owner, workload, args.steps, args.batch, W, args.embedding_dim, dense_bytes)
        else:
            per_bytes = esd_link_bytes([p["wire_bytes"] for p in s["emb_wire"]], args.steps, args.batch,
                                       bandwidths, "star", dense_bytes)
        link_s = [b * 8 / (bw * 1e6) for b, bw in zip(per_bytes, bandwidths)]
        link_ms = max(link_s) / args.steps * 1e3
        compute_ms = None if links == "emulated-tc" else s["iter_ms"]
        iter_ms = s["iter_ms"] if links == "emulated-tc" else compute_ms + link_ms
        rows[m] = {"label": ROW[m], "compute_ms": compute_ms, "slowest_link_ms_per_step": link_ms,
                   "iter_ms": iter_ms, "samples_per_s": args.batch / iter_ms * 1e3,
                   "traffic_mb": sum(per_bytes) / 1e6, "link_s_per_worker": link_s,
                   "final_loss": s["final_loss"], "auc": s["auc"], "shares": s.get("shares")}
    return rows


def print_table(rows: Dict, links: str, bandwidths: List[float], args, why: str = "") -> str:
    what = ("tc-shaped links (measured: wall-clock iterations, bytes from the interface counters)"
            if links == "emulated-tc" else
            "MODELLED links (measured compute time + modelled link time = bytes / bandwidth; "
            f"no tc-shaped links: {why or 'network namespaces unavailable'})")
    print(f"\nmain job: {len(bandwidths)} workers at {'/'.join(f'{b:g}' for b in bandwidths)} Mbit/s + 1 PS, "
          f"{args.steps} steps, global batch {args.batch}; {what}")
    head = (f"{'method':<34}{'compute ms':>11}{'link ms':>9}{'iter ms':>9}{'samples/s':>11}{'traffic MB':>12}"
            f"  {'link s per worker':<24}{'loss':>8}{'AUC':>7}")
    print(head)
    for m, r in rows.items():
        comp = "-" if r["compute_ms"] is None else f"{r['compute_ms']:.0f}"
        per = "/".join(f"{x:.2f}" for x in r["link_s_per_worker"])
        print(f"{r['label']:<34}{comp:>11}{r['slowest_link_ms_per_step']:>9.0f}{r['iter_ms']:>9.0f}"
              f"{r['samples_per_s']:>11.0f}{r['traffic_mb']:>12.2f}  {per:<24}{r['final_loss']:>8.4f}{r['auc']:>7.3f}")
    e, v, la = rows[ESD], rows["vanilla"], rows["laia"]
    line = (f"ESD vs vanilla: {v['iter_ms'] / e['iter_ms']:.2f}x faster, "
            f"{100 * (1 - e['traffic_mb'] / v['traffic_mb']):.0f} % less traffic; "
            f"vs LAIA: {la['iter_ms'] / e['iter_ms']:.2f}x faster, "
            f"{100 * (1 - e['traffic_mb'] / la['traffic_mb']):.0f} % less traffic "
            f"({'tc-shaped links' if links == 'emulated-tc' else 'modelled links'})")
    print("\n" + line)
    print("link ms: the slowest worker's link time per step, (bytes sent + received) / bandwidth"
          + (" from the interface counters of the whole job; the shaped links are full duplex, so an iteration "
             "can take less than it" if links == "emulated-tc" else ", modelled") + "; traffic: all bytes on "
          "the workers' links; ESD workers read the global batch locally, vanilla workers their slice; "
          f"ESD shares (samples per worker and step): {e['shares']}; every method trains the same model "
          "(staleness 0), hence the same loss.")
    return line


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    from torchrec_esd.apps.trainer import JobConfig, dense_param_bytes
    from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig
    from torchrec_esd.log import configure_logging

    configure_logging("WARNING")
    bandwidths = [float(b) for b in args.bandwidths.split(",")]
    e2e_argv = ["--mixes", "main=" + args.bandwidths, "--methods", ",".join(METHODS), "--steps", str(args.steps),
                "--batch", str(args.batch), "--max-cardinality", str(args.max_cardinality), "--repeats", "1",
                "--delay-ms", "0", "--timeout-s", str(args.timeout_s), "--out", os.devnull]
    if args.no_netns:
        e2e_argv.append("--no-netns")
    e2e = end_to_end.parse_args(e2e_argv)
    mixes = end_to_end.parse_mixes(e2e.mixes)
    raw = end_to_end.launch(e2e, mixes, METHODS)
    summary = end_to_end.summarize(e2e, mixes, METHODS, raw)
    # the runtime's metered wire bytes per worker (payloads + keys + frames), for the modelled links
    for m in METHODS[1:]:
        w0 = next(r for rank in raw["per_rank"] for r in rank if r["method"] == m and "metrics" in r)
        summary["main"]["methods"][m]["emb_wire"] = w0["metrics"]["per_worker"]
    workload = SyntheticWorkloadConfig(max_cardinality=args.max_cardinality, alpha=e2e.alpha, seed=0)
    dense_bytes = dense_param_bytes(JobConfig(embedding_dim=e2e.embedding_dim, workload=workload),
                                    SyntheticWorkload(workload))
    args.embedding_dim = e2e.embedding_dim
    rows = rows_from(summary, raw, args, raw["links"], bandwidths, workload, dense_bytes)
    line = print_table(rows, raw["links"], bandwidths, args, raw["links_reason"])
    with open(args.out, "w") as f:
        json.dump({"links": raw["links"], "links_reason": raw["links_reason"], "bandwidths": bandwidths,
                   "steps": args.steps, "batch": args.batch, "rows": rows, "summary_line": line,
                   "runtime_s": time.perf_counter() - t0}, f, indent=1)
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
