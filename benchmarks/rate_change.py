"""The rate-change scenario of ``benchmarks/end_to_end.py`` (``--rate-change``).

    python benchmarks/end_to_end.py --rate-change 3:20=10,40=100 --mixes edge=100,100,100,100 \\
        --methods vanilla,laia,esd,esd+online --steps 62 --repeats 5 --embedding-dim 64 --out rate_change.json

One worker's tc rate changes mid-run: ``W:S1=R1,S2=R2`` sets worker ``W``'s
link to ``R1`` Mbit/s from step ``S1`` on, to ``R2`` from ``S2`` on (steps from
0).  The change happens between two steps, synchronously: after step
``S1 - 1`` every worker rank asks the launcher (rank 0 writes the request, all
wait for the answer) and the launcher changes the TBF rate of that worker's
link in both directions in place (``NetnsCluster.set_rate``: ``tc qdisc
change``).  The time the ranks wait for it is taken out of the next step's
time.  Before every method the link is set back to the mix's rate.

The ESD methods are configured with the mix's rates throughout; ``+online``
(``EsdConfig.online_links`` with ``compute_s_per_sample = 1 / --samples-per-s``)
prices rows and sets the shares at the links measured on the PS exchanges.

Reported per method, from every repeat (``--repeats``; the methods run in
alternating order): the iteration time per step (the slowest worker's step,
without the rate-change waits) of each repeat and its per-step median across
the repeats; every criterion below is computed on that median series, the
same for every method.  The last ``DRAIN_STEPS`` (2) steps of a run are left
out (the dispatch-ahead thread has nothing left to dispatch, so they run with
less CPU contention: run ``--steps`` 2 more than the last phase needs).  Per
phase (from a change, or step 1, to the next):

* ``level``: the median of the phase's last ten steps (of its second half
  when shorter): the level the method itself reaches late in the phase;
* ``settle``: the steps after the change until the per-step median stays
  within ``TOLERANCE`` (10 %) of ``level`` for the rest of the phase (0: the
  first step after the change is already in the band and every later one;
  "never": the phase's last step is not);
* ``in band``: the fraction of the phase's steps from the sixth on (5 steps
  after the change) that are within 10 % of ``level``;
* ``vs before``: ``level`` / the level before the first change.

With references (``python benchmarks/rate_change.py RESULT.json --reference
PHASE=REF.json ...``: ``end_to_end.py`` runs of the ESD methods (``esd``,
``esd+online``) on a mix equal to that phase's links, configured with those
rates, no rate change) the same ``settle`` is also reported against the
reference level: the lowest over the reference run's methods of its
iteration time over the phase's steps (per-step median across repeats,
median over the same steps as the phase, after ``--warmup-steps``: a steady
run's level drifts with the step as tables and caches fill), i.e. the level
ESD reaches at those steps when it is configured with the right rates
throughout; run the references with the same ``--steps``.  The same yardstick for every method: one that stays
at a worse level than that never settles ("never").  A PNG of the per-step medians (skipped with a message
without matplotlib).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Dict, List, Optional, Tuple

TOLERANCE = 0.10
# the last steps of a run are left out of every criterion: the dispatch-ahead
# thread has no batch left to dispatch, so the ESD runtime's last steps run
# with less CPU contention (10-15 % faster in every run on the 2-core machine)
DRAIN_STEPS = 2


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


def wait_for_file(path: str, timeout_s: float, what: str, poll_s: float = 0.005) -> None:
    """Wait until the launcher writes ``path`` (``what`` it did names it in the timeout)."""
    t0 = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"the launcher did not {what} ({path})")
        time.sleep(poll_s)


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
        wait_for_file(os.path.join(self.outdir, f"rate{n}.ready"), 120, "change the link")
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
        # a link already at that rate is left alone: twice in three runs on one machine, a
        # worker's link stalled for 30 s (its store client timed out, the fault monitor ended
        # the world) right after such an in-place change of its TBF to the rate it had
        unchanged = cluster is not None and cluster.links[req["worker"]].rate_mbit == float(req["mbit"])
        rec = {"request": self.next, "worker": req["worker"], "mbit": req["mbit"],
               "t_s": time.perf_counter() - t_start, "applied": cluster is not None and not unchanged,
               "unchanged": unchanged}
        if cluster is not None and not unchanged:
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


def settle(xs: List[float], level: float, above_only: bool = False) -> int:
    """Steps from the start of ``xs`` until every later one is within
    ``TOLERANCE`` of ``level`` (``above_only``: at most ``TOLERANCE`` above
    it); ``len(xs)``: the last one is not."""
    k = len(xs)
    for j in range(len(xs) - 1, -1, -1):
        off = xs[j] - level if above_only else abs(xs[j] - level)
        if off > TOLERANCE * level:
            break
        k = j
    return k


def first_within(xs: List[float], level: float) -> int:
    """Steps from the start of ``xs`` until the first one at most
    ``TOLERANCE`` above ``level`` (``len(xs)``: none is)."""
    return next((j for j, x in enumerate(xs) if x - level <= TOLERANCE * level), len(xs))


def phases(times: List[float], changes: List[Tuple[int, float]],
           reference_ms: Optional[Dict[int, float]] = None) -> List[Dict]:
    """``times[k]``: step ``k + 1``; a phase runs from a change (or step 1) to
    the next; ``reference_ms``: phase index -> reference level (ms)."""
    bounds = [1] + [s for s, _ in changes] + [len(times) + 1]
    out = []
    for i in range(len(bounds) - 1):
        a, b = bounds[i], bounds[i + 1]
        xs = times[a - 1 : b - 1]
        if not xs:
            continue
        lvl = _level(xs)
        late = xs[5:]
        p = {"from_step": a, "to_step": b - 1, "level_ms": 1e3 * lvl, "steps_to_settle": settle(xs, lvl),
             "in_band_after_5": (sum(abs(x - lvl) <= TOLERANCE * lvl for x in late) / len(late)) if late else None,
             "first_5_ms": [1e3 * x for x in xs[:5]]}
        if reference_ms and i in reference_ms:
            ref = reference_ms[i] / 1e3
            p.update(reference_ms=reference_ms[i], steps_to_reference=settle(xs, ref, above_only=True),
                     steps_to_reach_reference=first_within(xs, ref),
                     steps_to_reference_both_ways=settle(xs, ref), level_vs_reference=lvl / ref)
        out.append(p)
    return out


def analyse(raw: Dict, methods: List[str], spec: Dict, W: int, mix: Optional[str] = None) -> Dict:
    """Per method of the rate-change run (the records of mix ``mix``, every
    mix when None): per-step medians across repeats and the phases."""
    out = {}
    runs = [rec for rank in raw["per_rank"] for rec in rank if mix is None or rec["mix"] == mix]
    reps = sorted({rec["rep"] for rec in runs})
    for m in methods:
        series, slow = [], []
        for rep in reps:
            recs = [rec for rec in runs if rec["method"] == m and rec["rep"] == rep]
            workers = sorted([r for r in recs if r["rank"] < W], key=lambda r: r["rank"])
            series.append(step_times(workers))
            slow.append(workers[spec["worker"]])
        med = [statistics.median(list(col)) for col in zip(*series)]
        out[m] = {"step_ms": [1e3 * x for x in med], "step_ms_repeats": [[1e3 * x for x in t] for t in series],
                  # per repeat: worker W's samples per step, its estimate, every worker's estimate per step,
                  # and the gathered (exchanges, bytes, seconds, samples)
                  "slow_worker_samples": [w.get("local_samples") for w in slow],
                  "slow_worker_estimate_mbps": [[e[spec["worker"]] for e in w.get("link_estimates_mbps") or []]
                                                for w in slow],
                  "estimates_mbps": [w.get("link_estimates_mbps") or [] for w in slow],
                  "observations": [w.get("link_observations") or [] for w in slow]}
        _phases_into(out[m], spec, None)
    return out


def _phases_into(d: Dict, spec: Dict, reference_ms: Optional[Dict[int, float]]) -> None:
    ph = phases([x / 1e3 for x in d["step_ms"][: len(d["step_ms"]) - DRAIN_STEPS]], spec["changes"], reference_ms)
    for p in ph:
        p["level_vs_before"] = p["level_ms"] / ph[0]["level_ms"]
    d["phases"] = ph


def reference_level_ms(result: Dict, from_step: int, to_step: int, warmup: int = 2) -> Tuple[float, str]:
    """The iteration time over steps ``from_step..to_step`` of an
    ``end_to_end.py`` result without a rate change: per method, the per-step
    median across repeats of the slowest worker's step, median over those
    steps (never the first ``warmup`` nor the last ``DRAIN_STEPS`` of the
    run); the lowest over the run's methods, and that method.  The same
    steps as the phase: the level of a steady run drifts with the step (the
    tables and caches fill), so steps 20-39 are compared with steps 20-39."""
    (mix,) = result["results"].values()
    levels = {}
    for m, d in mix["methods"].items():
        med = [statistics.median(list(col)) for col in zip(*d["step_ms_slowest_repeats"])]  # med[k]: step k + 1
        lo, hi = max(from_step, warmup + 1), min(to_step, len(med) - DRAIN_STEPS)
        if hi < lo:
            raise SystemExit(f"the reference run has no steps {from_step}..{to_step} (it ran {len(med) + 1})")
        levels[m] = statistics.median(med[lo - 1 : hi])
    best = min(levels, key=levels.get)
    return levels[best], best


def phase_bounds(spec: Dict, steps: int) -> List[Tuple[int, int]]:
    """Every phase's first and last step counted in its criteria (the run's
    last ``DRAIN_STEPS`` left out)."""
    b = [1] + [st for st, _ in spec["changes"]] + [steps + 1 - DRAIN_STEPS]
    return [(b[i], b[i + 1] - 1) for i in range(len(b) - 1)]


def in_run_references(summary: Dict, mixes: List[Dict], spec: Dict, steps: int, warmup: int = 2) -> Dict[str, Dict]:
    """Phase index -> ``{"mix", "steps", "level_ms", "method"}``: the reference
    level of each phase from the reference mixes of the same run
    (``end_to_end.py --reference-methods``: the mix whose changing worker has
    the phase's rate, no change; :func:`reference_level_ms` over the phase's
    steps)."""
    by_rate = {m["reference_rate"]: m["name"] for m in mixes if "reference_rate" in m}
    rates = [mixes[0]["bandwidths"][spec["worker"]]] + [r for _, r in spec["changes"]]
    out = {}
    for i, ((lo, hi), rate) in enumerate(zip(phase_bounds(spec, steps), rates)):
        name = by_rate[rate]
        level, by = reference_level_ms({"results": {name: summary[name]}}, lo, hi, warmup=warmup)
        out[str(i)] = {"mix": name, "steps": [lo, hi], "level_ms": level, "method": by}
    return out


def apply_references(d: Dict, spec: Dict, references: Dict[str, Dict]) -> None:
    """Recompute one method's phases (:func:`analyse`'s) against ``references``."""
    _phases_into(d, spec, {int(k): v["level_ms"] for k, v in references.items()})


def _settled(k: int, phase: Dict) -> str:
    n = phase["to_step"] - phase["from_step"] + 1
    return f"never ({k})" if k >= n else str(k)


def markdown(res: Dict, spec: Dict, label, meta: str) -> str:
    ch = ", ".join(f"{r:g} Mbit/s at step {s}" for s, r in spec["changes"])
    n = len(next(iter(res.values()))["step_ms_repeats"])
    lines = [f"Worker {spec['worker']}'s link: {ch}.  Iteration time = the slowest worker's step (ms), per-step "
             f"median of {n} repeat(s); 'level' = median of the phase's last 10 steps; 'settle' = steps after the "
             f"change until every later step of the phase is within {100 * TOLERANCE:.0f} % of the level; "
             f"'in band' = share of the phase's steps from 5 after the change on within {100 * TOLERANCE:.0f} % "
             "of the level; 'vs before' = level / the level before the first change.\n"]
    head = "| method | before: level ms |"
    sep = "|---|---:|"
    for s, r in spec["changes"]:
        head += f" from step {s} ({r:g} Mbit/s): level ms | settle | in band | vs before |"
        sep += "---:|---:|---:|---:|"
    lines += [head, sep]
    for m, d in res.items():
        p = d["phases"]
        cells = [label(m), f"{p[0]['level_ms']:.0f}"]
        for q in p[1:]:
            band = "-" if q["in_band_after_5"] is None else f"{100 * q['in_band_after_5']:.0f} %"
            cells += [f"{q['level_ms']:.0f}", _settled(q["steps_to_settle"], q), band, f"{q['level_vs_before']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    refd = next(iter(res.values()))["phases"]
    if any("reference_ms" in q for q in refd):
        lines.append("\nAgainst the reference (ESD configured with the phase's true rates throughout, its "
                     "iteration time over the same steps): 'settle (<= +10 %)' = steps after the change until "
                     f"every later step of the phase is at most {100 * TOLERANCE:.0f} % above it (recovered: "
                     f"no longer slower than it by more than {100 * TOLERANCE:.0f} %); 'settle (+-10 %)' = within "
                     f"{100 * TOLERANCE:.0f} % either way; 'reach' = steps after the change until the first step "
                     f"at most {100 * TOLERANCE:.0f} % above it.\n")
        head, sep = "| method |", "|---|"
        for q in refd:
            if "reference_ms" in q:
                head += (f" steps {q['from_step']}-{q['to_step']}: reference ms | reach | settle (<= +10 %) | "
                         "settle (+-10 %) | level / reference |")
                sep += "---:|---:|---:|---:|---:|"
        lines += [head, sep]
        for m, d in res.items():
            cells = [label(m)]
            for q in d["phases"]:
                if "reference_ms" in q:
                    cells += [f"{q['reference_ms']:.0f}",
                              _settled(q.get("steps_to_reach_reference", len(d["step_ms"])), q),
                              _settled(q["steps_to_reference"], q),
                              _settled(q["steps_to_reference_both_ways"], q),
                              f"{q['level_vs_reference']:.2f}x"]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("\nIteration time per step, per-step median (ms, steps 1..):\n\n```")
    for m, d in res.items():
        lines.append(f"{label(m)[:28]:>28}: " + " ".join(f"{x:.0f}" for x in d["step_ms"]))
    lines.append("```")
    for m, d in res.items():
        for rep, (s, e) in enumerate(zip(d["slow_worker_samples"], d["slow_worker_estimate_mbps"])):
            if e:
                lines.append(f"\n{label(m)}, repeat {rep}: worker {spec['worker']}'s samples per step "
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

    fig, ax = plt.subplots(figsize=(11, 4.2))
    for m, d in res.items():
        ax.plot(range(1, len(d["step_ms"]) + 1), d["step_ms"], label=label(m), lw=1.2)
    refs = [q for q in next(iter(res.values()))["phases"] if "reference_ms" in q]
    for i, q in enumerate(refs):
        ax.hlines(q["reference_ms"], q["from_step"], q["to_step"], colors="k", lw=1.0, ls=":",
                  label="reference: ESD configured with the phase's rates" if i == 0 else None)
    ax.set_yscale("log")  # vanilla's slow phase is several times the others'
    for s, r in spec["changes"]:
        ax.axvline(s, color="k", lw=0.6, ls="--")
        ax.annotate(f"w{spec['worker']}: {r:g} Mbit/s", (s, ax.get_ylim()[1]), fontsize=7, va="top")
    ax.set_xlabel("step")
    ax.set_ylabel("iteration ms (log)")
    ax.set_title("slowest worker's step, per-step median of the repeats", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    """Re-analyse an ``end_to_end.py --rate-change`` result against reference runs."""
    import argparse
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from end_to_end import method_label

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("result", help="the --out JSON of an end_to_end.py --rate-change run")
    p.add_argument("--reference", action="append", default=[], metavar="PHASE=JSON",
                   help="phase index (0: before the first change) = an end_to_end.py JSON of ESD methods "
                        "configured with that phase's links, no rate change (the lowest level of its methods "
                        "is the reference); repeatable")
    p.add_argument("--out", default=None, help="write the result with the references here (default: in place)")
    p.add_argument("--markdown", default=None)
    p.add_argument("--png", default=None)
    a = p.parse_args(argv)
    with open(a.result) as f:
        result = json.load(f)
    rc = result["rate_change"]
    # without --reference, the references the result holds (an end_to_end.py --reference-methods run's own)
    rc["references"] = {} if a.reference else dict(rc.get("references") or {})
    refs = {int(k): v["level_ms"] for k, v in rc["references"].items()}
    steps = len(next(iter(rc["results"].values()))["step_ms"])
    bounds = phase_bounds(rc["spec"], steps)
    for item in a.reference:
        k, _, path = item.partition("=")
        lo, hi = bounds[int(k)]
        with open(path) as f:
            refs[int(k)], by = reference_level_ms(json.load(f), lo, hi, warmup=int(result["args"]["warmup_steps"]))
        rc["references"][k] = {"path": path, "steps": [lo, hi], "level_ms": refs[int(k)], "method": by}
    for d in rc["results"].values():
        _phases_into(d, rc["spec"], refs)
    meta = rc["markdown"].splitlines()[-1]
    rc["markdown"] = markdown(rc["results"], rc["spec"], method_label, meta)
    with open(a.out or a.result, "w") as f:
        json.dump(result, f, indent=1)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(rc["markdown"] + "\n")
    if a.png:
        plot(rc["results"], rc["spec"], a.png, method_label)
    print(rc["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
