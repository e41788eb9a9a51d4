"""Kill a worker, resume from the last checkpoint, get the same model.

    python examples/checkpoint_demo.py [--steps 40] [--every 10] [--kill-at 25] [--signal KILL]

Three ``torchrun`` jobs of ``examples/dlrm_esd.py`` (ESD, 2 workers + 1
parameter server, HybridDis, row-wise Adagrad, the embedded synthetic
workload) in temporary directories:

1. the reference: ``--steps`` steps without a break (final checkpoint);
2. the same job with ``--checkpoint-every``; when it reaches about step
   ``--kill-at`` the demo sends ``SIGKILL`` (``--signal KILL``; ``TERM`` for a
   preemption) to worker rank 1 and waits for the job to end (a lost worker
   ends every rank non-zero; a preempted job checkpoints first);
3. ``--resume``: a new world loads the last complete checkpoint and trains to
   ``--steps``.

It prints the step each job ended at, how long the broken job took to end
after the kill, and the largest difference between the resumed model and the
reference (tables, optimizer state, dense weights; 0 up to float summation
order).  Exit code 0 when the difference is within 1e-4 relative.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from torchrec_esd.apps.checkpointing import checkpoint_tensors, latest_checkpoint, max_differences  # noqa: E402


def job_command(steps: int, ckpt_dir: str, every: int = 0, resume: bool = False, port: int = 29631,
                extra: Optional[List[str]] = None) -> List[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port", str(port),
           os.path.join(HERE, "dlrm_esd.py"), "--num-ps", "1", "--dispatchers", "hybrid", "--steps", str(steps),
           "--batch", "128", "--max-cardinality", "2000", "--bandwidths", "100,10", "--dispatch-ahead", "1",
           "--checkpoint-dir", ckpt_dir, "--checkpoint-every", str(every)]
    return cmd + (["--resume"] if resume else []) + list(extra or [])


def rank_pids(launcher_pid: int) -> Dict[int, int]:
    """{RANK: pid} of the processes a torchrun launcher started (from /proc)."""
    out: Dict[int, int] = {}
    todo = [launcher_pid]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            continue
        todo.extend(kids)
        for k in kids:
            try:
                with open(f"/proc/{k}/environ", "rb") as f:
                    env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
            except OSError:
                continue
            if b"RANK" in env and b"LOCAL_RANK" in env:
                out[int(env[b"RANK"])] = k
    return out


def _env() -> Dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run_job(cmd: List[str], log: str, timeout_s: float = 600) -> int:
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), timeout=timeout_s).returncode


def interrupted_job(cmd: List[str], log: str, ckpt_dir: str, kill_at: int, every: int, sig: int,
                    rank: Optional[int] = 1, timeout_s: float = 600) -> Dict:
    """Run ``cmd``, send ``sig`` to ``rank`` at about step ``kill_at`` (timed from
    the checkpoints it writes), wait for the end: {rc, kill_s, ended_s}."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env())
        t0 = time.time()
        try:
            seen: Dict[int, float] = {}
            last_ckpt = (kill_at // every) * every
            while True:  # the checkpoints' times give the step rate
                if proc.poll() is not None:
                    raise RuntimeError(f"the job ended (rc {proc.returncode}) before step {kill_at}; see {log}")
                path = latest_checkpoint(ckpt_dir) if os.path.exists(ckpt_dir) else None
                step = int(os.path.basename(path).split("_")[1]) if path else 0
                if step and step not in seen:
                    seen[step] = time.time()
                if step >= last_ckpt:
                    break
                if time.time() - t0 > timeout_s:
                    raise RuntimeError("timed out waiting for the checkpoints")
                time.sleep(0.05)
            steps = sorted(seen)
            rate = (seen[steps[-1]] - seen[steps[0]]) / (steps[-1] - steps[0]) if len(steps) > 1 else 0.2
            time.sleep(max(0.0, (kill_at - last_ckpt) * rate - (time.time() - seen[last_ckpt])))
            # rank None: the launcher (torchrun forwards SIGTERM to every rank, as a preemption does)
            pid = proc.pid if rank is None else rank_pids(proc.pid)[rank]
            kill_t = time.time()
            os.kill(pid, sig)
            rc = proc.wait(timeout=timeout_s)
            return {"rc": rc, "ended_s": time.time() - kill_t, "killed_pid": pid}
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    p.add_argument("--kill-at", type=int, default=25, help="kill worker rank 1 at about this step")
    p.add_argument("--signal", default="KILL", choices=["KILL", "TERM"])
    p.add_argument("--fault-timeout", type=float, default=10.0,
                   help="the jobs' --fault-timeout: a lost rank ends the others within about this long")
    p.add_argument("--workdir", default=None, help="keep checkpoints and logs here (default: a temporary dir)")
    args = p.parse_args(argv)
    if not 0 < args.every <= args.kill_at < args.steps:
        p.error("need 0 < --every <= --kill-at < --steps")
    work = args.workdir or tempfile.mkdtemp(prefix="esd_ckpt_demo_")
    ref, broken = os.path.join(work, "reference"), os.path.join(work, "broken")
    print(f"work dir: {work}")
    t = time.time()
    extra = ["--fault-timeout", str(args.fault_timeout)]
    rc = run_job(job_command(args.steps, ref, extra=extra), os.path.join(work, "reference.log"))
    print(f"1. reference: {args.steps} steps, rc {rc} ({time.time() - t:.0f} s)")
    if rc != 0:
        return 1
    sig = getattr(signal, f"SIG{args.signal}")
    sub = os.path.join(broken, "esd_hybrid")  # dlrm_esd.py writes under <dir>/<method>
    out = interrupted_job(job_command(args.steps, broken, args.every, extra=extra), os.path.join(work, "broken.log"), sub,
                          args.kill_at, args.every, sig)
    last = latest_checkpoint(sub)
    print(f"2. SIG{args.signal} to worker rank 1 (pid {out['killed_pid']}) at about step {args.kill_at}: the job "
          f"ended {out['ended_s']:.1f} s later with rc {out['rc']}; last complete checkpoint: {os.path.basename(last)}")
    with open(os.path.join(work, "broken.log")) as f:
        lines = [ln.strip() for ln in f if "ESD fault monitor" in ln]
    if lines:
        print(f"   e.g. {lines[0][:200]}")
    t = time.time()
    rc = run_job(job_command(args.steps, broken, args.every, resume=True, extra=extra),
                 os.path.join(work, "resumed.log"))
    print(f"3. --resume from {os.path.basename(last)} to step {args.steps}: rc {rc} ({time.time() - t:.0f} s)")
    if rc != 0:
        return 1
    a = checkpoint_tensors(latest_checkpoint(os.path.join(ref, "esd_hybrid")))
    b = checkpoint_tensors(latest_checkpoint(os.path.join(broken, "esd_hybrid")))
    diff = max_differences(a, b)
    scale = max(float(v.abs().max()) for v in a.values() if v.numel())
    print("max |resumed - uninterrupted|: " + ", ".join(f"{k} {v:.3g}" for k, v in diff.items())
          + f" (largest value {scale:.3g})")
    return 0 if max(diff.values()) <= 1e-4 * scale else 1


if __name__ == "__main__":
    sys.exit(main())
