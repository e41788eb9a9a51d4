"""The rate-change scenario of ``benchmarks/end_to_end.py`` (``--rate-change``).

    python benchmarks/end_to_end.py --rate-change 3:20=10,40=100 --mixes edge=100,100,100,100 \\
        --methods vanilla,laia,esd,esd+online --steps 60 --repeats 1 --out rate_change.json

One worker's tc rate changes mid-run: ``W:S1=R1,S2=R2`` sets worker ``W``'s
link to ``R1`` Mbit/s from step ``S1`` on, to ``R2`` from ``S2`` on (steps from
0).  The change happens between two steps, synchronously: after step
``S1 - 1`` every worker rank asks the launcher (rank 0 writes the request, all
wait for the answer) and the launcher changes the HTB class of that worker's
link in both directions in place (``NetnsCluster.set_rate``: ``tc class
change``).  The time the ranks wait for it is taken out of the next step's
time.  Before every method the link is set back to the mix's rate.

The ESD methods are configured with the mix's rates throughout; ``+online``
(``EsdConfig.online_links`` with ``compute_s_per_sample = 1 / --samples-per-s``)
prices rows and sets the shares at the links measured on the PS exchanges.

Reported per method: iteration time per step (the slowest worker's), each
phase's level (median of its last ten steps, or of its second half when
shorter), the steps after each change until every later step of the phase
stays within 10 % of that level, and the level relative to the steady level
before the first change.  A PNG of iteration time per step (skipped with a
message without matplotlib).
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional, Tuple

TOLERANCE = 0.10


def parse(text: Optional[str]) -> Optional[Dict]:
    """``"3:20=10,40=100"`` -> ``{"worker": 3, "changes": [[20, 10.0], [40, 100.0]]}``."""
    if not text:
        return None
    try:
        w, _, rest = text.partition(":")
        changes = []
        for part in rest.split(","):
            s, _, r = part.partition("=")
            changes.append([int(s), float(r)])
        out = {"worker": int(w), "changes": sorted(changes)}
    except ValueError:
        raise SystemExit(f"--rate-change {text!r}: expected WORKER:STEP=MBIT[,STEP=MBIT...], e.g. 3:20=10,40=100")
    if not out["changes"] or any(s < 1 or r <= 0 for s, r in out["changes"]):
        raise SystemExit(f"--rate-change {text!r}: steps >= 1 and rates > 0")
    return out


def _wait(path: str, timeout_s: float) -> None:
    t0 = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"the launcher did not change the link ({path})")
        time.sleep(0.005)


class RateHook:
    """Rank side: ``JobConfig.on_step`` of every worker rank.  Requests are
    numbered in the order every worker makes them (the same on all)."""

    def __init__(self, outdir: str, rank: int, spec: Dict) -> None:
        self.outdir, self.rank = outdir, rank
        self.worker = spec["worker"]
        self.at = {int(s): float(r) for s, r in spec["changes"]}
        self.count = 0
        self.waits: Dict[int, float] = {}  # step after which the ranks waited -> seconds

    def request(self, mbit: float) -> float:
        n = self.count
        self.count += 1
        t0 = time.perf_counter()
        if self.rank == 0:
            tmp = os.path.join(self.outdir, f"rate{n}.request.tmp")
            with open(tmp, "w") as f:
                json.dump({"worker": self.worker, "mbit": mbit}, f)
            os.replace(tmp, os.path.join(self.outdir, f"rate{n}.request"))
        _wait(os.path.join(self.outdir, f"rate{n}.ready"), 120)
        return time.perf_counter() - t0

    def __call__(self, step: int) -> None:
        if step + 1 in self.at:
            self.waits[step] = self.request(self.at[step + 1])


class RateServer:
    """Launcher side: answers the ranks' requests (``poll`` from the launch loop)."""

    def __init__(self, tmp: str, num_workers: int) -> None:
        self.tmp, self.W = tmp, num_workers
        self.next = 0
        self.applied: List[Dict] = []

    def poll(self, cluster, t_start: float) -> None:
        path = os.path.join(self.tmp, f"rate{self.next}.request")
        if not os.path.exists(path):
            return
        with open(path) as f:
            req = json.load(f)
        rec = {"request": self.next, "worker": req["worker"], "mbit": req["mbit"],
               "t_s": time.perf_counter() - t_start, "applied": cluster is not None}
        if cluster is not None:
            cluster.set_rate(req["worker"], req["mbit"])
        self.applied.append(rec)
        with open(os.path.join(self.tmp, f"rate{self.next}.ready"), "w"):
            pass
        self.next += 1


def step_times(workers: List[Dict]) -> List[float]:
    """Seconds of steps 1..S-1: the slowest worker's, without the rate-change waits."""
    per = []
    for r in workers:
        waits = {int(k): v for k, v in r.get("rate_waits", {}).items()}
        per.append([t - waits.get(k, 0.0) for k, t in enumerate(r["step_s"])])
    return [max(col) for col in zip(*per)]


def _level(xs: List[float]) -> float:
    tail = sorted(xs[-10:] if len(xs) >= 20 else xs[len(xs) // 2:])
    return tail[len(tail) // 2]


def phases(times: List[float], changes: List[Tuple[int, float]]) -> List[Dict]:
    """``times[k]``: step ``k + 1``; a phase runs from a change (or step 1) to the next."""
    bounds = [1] + [s for s, _ in changes] + [len(times) + 1]
    out = []
    for i in range(len(bounds) - 1):
        a, b = bounds[i], bounds[i + 1]
        xs = times[a - 1 : b - 1]
        if not xs:
            continue
        lvl = _level(xs)
        settle = len(xs)
        for j in range(len(xs) - 1, -1, -1):
            if abs(xs[j] - lvl) > TOLERANCE * lvl:
                break
            settle = j
        out.append({"from_step": a, "to_step": b - 1, "level_ms": 1e3 * lvl, "steps_to_settle": settle,
                    "first_5_ms": [1e3 * x for x in xs[:5]]})
    return out


def analyse(raw: Dict, methods: List[str], spec: Dict, W: int) -> Dict:
    out = {}
    for m in methods:
        recs = [rec for rank in raw["per_rank"] for rec in rank if rec["method"] == m and rec["rep"] == 0]
        workers = sorted([r for r in recs if r["rank"] < W], key=lambda r: r["rank"])
        t = step_times(workers)
        ph = phases(t, spec["changes"])
        base = ph[0]["level_ms"]
        for p in ph:
            p["level_vs_before"] = p["level_ms"] / base
        slow = workers[spec["worker"]]
        out[m] = {"step_ms": [1e3 * x for x in t], "phases": ph,
                  "slow_worker_samples": slow.get("local_samples"),
                  "slow_worker_estimate_mbps": [e[spec["worker"]] for e in slow.get("link_estimates_mbps") or []],
                  # every worker's estimate per step, and the gathered (exchanges, bytes, seconds, samples)
                  "estimates_mbps": slow.get("link_estimates_mbps") or [],
                  "observations": slow.get("link_observations") or []}
    return out


def markdown(res: Dict, spec: Dict, label, meta: str) -> str:
    ch = ", ".join(f"{r:g} Mbit/s at step {s}" for s, r in spec["changes"])
    lines = [f"Worker {spec['worker']}'s link: {ch}.  Iteration time = the slowest worker's step (ms); "
             f"'settle' = steps after the change until every later step of the phase is within "
             f"{100 * TOLERANCE:.0f} % of the phase's level; 'vs before' = the phase's level / the level "
             "before the first change.\n"]
    head = "| method | before: level ms |"
    sep = "|---|---:|"
    for s, r in spec["changes"]:
        head += f" from step {s} ({r:g} Mbit/s): level ms | settle | vs before |"
        sep += "---:|---:|---:|"
    lines += [head, sep]
    for m, d in res.items():
        p = d["phases"]
        cells = [label(m), f"{p[0]['level_ms']:.0f}"]
        for q in p[1:]:
            cells += [f"{q['level_ms']:.0f}", f"{q['steps_to_settle']}", f"{q['level_vs_before']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    for m, d in res.items():
        if d["slow_worker_estimate_mbps"]:
            s, e = d["slow_worker_samples"], d["slow_worker_estimate_mbps"]
            lines.append(f"\n{label(m)}: worker {spec['worker']}'s samples per step "
                         f"{s}; its estimated link (Mbit/s) per step {[round(x, 1) for x in e]}.")
    lines.append("\n" + meta)
    return "\n".join(lines)


def plot(res: Dict, spec: Dict, path: str, label) -> bool:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot ({path}); the JSON and the table are written")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    for m, d in res.items():
        ax.plot(range(1, len(d["step_ms"]) + 1), d["step_ms"], label=label(m), lw=1.2)
    for s, r in spec["changes"]:
        ax.axvline(s, color="k", lw=0.6, ls="--")
        ax.annotate(f"w{spec['worker']}: {r:g} Mbit/s", (s, ax.get_ylim()[1]), fontsize=7, va="top")
    ax.set_xlabel("step")
    ax.set_ylabel("iteration time, ms (slowest worker)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return True
