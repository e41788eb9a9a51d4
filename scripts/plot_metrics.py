"""Plot the per-step records that ``--metrics-jsonl PATH`` wrote.

    python scripts/plot_metrics.py metrics.jsonl [--out metrics.png]

One line per job (``vanilla``, ``esd:<dispatcher>``, ...) in three panels:
loss, iteration ms and, for ESD jobs, the slowest worker's modelled
embedding link time per step.  A summary per job (mean iteration ms, final
loss, bytes and link seconds per worker) is printed whether or not the plot
can be drawn; without matplotlib the plot is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict
from typing import Dict, List


def load(path: str) -> "OrderedDict[str, List[Dict]]":
    """Records by job, in file order; a malformed line is an error naming it."""
    jobs: "OrderedDict[str, List[Dict]]" = OrderedDict()
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                jobs.setdefault(rec["job"], []).append(rec)
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SystemExit(f"{path}:{i}: not a metrics record ({e})")
    if not jobs:
        raise SystemExit(f"{path}: no records")
    return jobs


def summary(jobs) -> List[str]:
    lines = []
    for job, recs in jobs.items():
        iters = [r["iter_ms"] for r in recs[1:]] or [recs[0]["iter_ms"]]
        text = f"{job:<16} {len(recs):>4} steps, iter {sum(iters) / len(iters):7.1f} ms, final loss {recs[-1]['loss']:.4f}"
        if "workers" in recs[0]:
            W = len(recs[0]["workers"])
            mb = [sum(sum(r["workers"][w]["bytes"].values()) for r in recs) / 1e6 for w in range(W)]
            ls = [sum(r["workers"][w]["link_s"] for r in recs) for w in range(W)]
            text += ", per worker MB " + "/".join(f"{x:.2f}" for x in mb) + ", link s " + "/".join(f"{x:.2f}" for x in ls)
            dec = [r["dispatch_ms"] for r in recs if "dispatch_ms" in r]
            if dec:
                text += f", dispatch {sum(dec) / len(dec):.1f} ms"
        lines.append(text)
    return lines


def plot(jobs, out: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot ({out}); the summary above is complete")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for job, recs in jobs.items():
        steps = [r["step"] for r in recs]
        axes[0].plot(steps, [r["loss"] for r in recs], label=job)
        axes[1].plot(steps, [r["iter_ms"] for r in recs], label=job)
        if "link_s_max" in recs[0]:
            axes[2].plot(steps, [1e3 * r["link_s_max"] for r in recs], label=job)
    for ax, title in zip(axes, ("loss", "iteration ms (worker 0)", "slowest worker's embedding link ms (modelled)")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=72)
    plt.close(fig)
    print(f"wrote {out}")
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jsonl", help="the file --metrics-jsonl wrote")
    p.add_argument("--out", default=None, help="PNG path (default: the JSONL path with .png)")
    a = p.parse_args(argv)
    jobs = load(a.jsonl)
    print("\n".join(summary(jobs)))
    plot(jobs, a.out or os.path.splitext(a.jsonl)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
