"""Faults (issue 16): a rank that is killed, stopped or fails ends every rank
within a bounded time, with a message naming it.

The monitor's logic is tested in-process (three monitors on one real TCPStore,
short timeouts, the fault action recorded instead of exiting); the kill tests
run real jobs (2 workers + 1 PS of ``examples/dlrm_esd.py``, each rank its own
process as on separate edge machines, the c10d store hosted by the test as
torchrun's agent hosts it) and SIGKILL / SIGSTOP one rank mid-training.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from torchrec_esd.distributed.faults import FAULT_EXIT_CODE, FaultMonitor, rank_roles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = 2  # worker ranks 0, 1; rank 2 is PS 0


class World:
    """Three monitors (ranks 0..2) on one TCPStore; faults are recorded."""

    def __init__(self, timeout_s=0.6, interval_s=0.05, grace_s=0.2, progress=None):
        self.master = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
        self.faults = {}
        self.at = {}
        self.t0 = time.monotonic()
        self.progress = progress or {}
        self.monitors = []
        for r in range(3):
            client = dist.TCPStore("127.0.0.1", self.master.port, 1, is_master=False,
                                   timeout=timedelta(seconds=5))
            self.monitors.append(FaultMonitor(
                client, r, 3, rank_roles(W), timeout_s, "t/", workers=range(W),
                progress=(lambda r=r: self.progress.get(r, 0)),
                on_fault=(lambda line, r=r: self._record(r, line)), interval_s=interval_s, grace_s=grace_s,
            ))
        for m in self.monitors:
            m.start()

    def _record(self, r, line):
        self.faults[r] = line
        self.at[r] = time.monotonic()

    def wait(self, ranks, limit_s):
        end = time.monotonic() + limit_s
        while time.monotonic() < end and not all(r in self.faults for r in ranks):
            time.sleep(0.02)
        return {r: self.faults.get(r) for r in ranks}

    def freeze(self, r):
        """Like SIGSTOP: the rank's beat stops, it publishes nothing more."""
        self.monitors[r]._stop.set()

    def close(self):
        for m in self.monitors:
            if not m.closed:
                m.close()


@pytest.fixture
def world():
    made = []

    def make(**kw):
        made.append(World(**kw))
        return made[-1]

    yield make
    for w in made:
        w.close()


def test_running_and_finished_ranks_raise_no_alarm(world):
    w = world()
    time.sleep(1.0)  # > the timeout: beats keep every running rank alive
    assert w.faults == {}
    w.monitors[0].close()  # ranks finish at different times: done, no longer timed
    time.sleep(1.0)
    w.monitors[1].close()
    w.monitors[2].close()
    time.sleep(0.2)
    assert w.faults == {}


@pytest.mark.parametrize("silent", [1, 2])
def test_a_silent_rank_ends_every_other_rank_within_the_timeout(world, silent):
    w = world()
    time.sleep(0.2)
    t = time.monotonic()
    w.freeze(silent)
    others = [r for r in range(3) if r != silent]
    got = w.wait(others, 3.0)
    name = "rank 1 (worker 1)" if silent == 1 else "rank 2 (PS 0)"
    for r in others:
        assert got[r] is not None, (r, w.faults)
        assert f"{name} is silent: no heartbeat for" in got[r], got[r]
        assert w.at[r] - t <= 0.6 + 2 * 0.05 + 0.3, w.at[r] - t  # timeout + 2 ticks (+ scheduling)
    assert silent not in w.faults


def test_a_failure_record_ends_every_other_rank_with_its_message(world):
    w = world()
    time.sleep(0.1)
    t = time.monotonic()
    w.monitors[0].close(error="OverflowError: Python int too large to convert to C long")
    got = w.wait([1, 2], 2.0)
    for r in (1, 2):
        assert "rank 0 (worker 0) failed: OverflowError: Python int too large" in got[r], got[r]
        assert w.at[r] - t <= 0.05 + 0.2 + 0.3  # a tick + the grace (+ scheduling)
    assert 0 not in w.faults


def test_a_rank_that_ends_itself_within_the_grace_is_not_killed(world):
    w = world(grace_s=1.0)
    w.monitors[0].close(error="EsdConfigError: bad batch")  # then the others fail on their own
    time.sleep(0.3)
    w.monitors[1].close(error="EsdConfigError: bad batch")
    w.monitors[2].close(error="EsdRemoteError: ESD job aborted by the workers: bad batch")
    time.sleep(1.0)
    assert w.faults == {}


def test_a_worker_that_runs_out_of_batches_fails_every_rank(world):
    progress = {0: 5, 1: 5}
    w = world(progress=progress)
    time.sleep(0.2)
    w.monitors[1].end_of_batches()  # worker 1 is done after 5 batches ...
    time.sleep(0.3)
    assert w.faults == {}  # ... and so is everyone
    progress[0] = 6  # worker 0 starts a 6th, which worker 1 never joins
    got = w.wait([0, 2], 2.0)
    for r in (0, 2):
        assert ("rank 1 (worker 1) ran out of batches: it ended after 5 batches while rank 0 (worker 0) "
                "started batch 6") in got[r], got[r]


def test_losing_the_store_is_a_clear_error(world):
    w = world()
    time.sleep(0.1)
    del w.master  # the store's host dies
    got = w.wait([0, 1, 2], 3.0)
    for r in range(3):
        assert got[r] is not None and "lost the c10d store the fault monitor runs on" in got[r], got


def test_fault_timeout_is_validated():
    from torchrec_esd.config import EsdConfig, EsdConfigError, WorkerSpec

    assert EsdConfig([WorkerSpec(1, 1.0)]).fault_timeout_s == 30.0
    assert EsdConfig([WorkerSpec(1, 1.0)], fault_timeout_s=None).fault_timeout_s is None
    for bad in (0, -1.0, float("nan"), "30", True):
        with pytest.raises(EsdConfigError, match="fault_timeout_s must be > 0 seconds or None"):
            EsdConfig([WorkerSpec(1, 1.0)], fault_timeout_s=bad)


# ---------------------------------------------------------------- kill tests
FAULT_TIMEOUT_S = 5.0
# every survivor exits within: the fault timeout, two monitor ticks, the grace
# for a failure record, and slack for a 2-core machine shared with other jobs
EXIT_BOUND_S = FAULT_TIMEOUT_S + 2 * FAULT_TIMEOUT_S / 10 + min(5.0, FAULT_TIMEOUT_S / 4) + 5.0
NAMES = {0: "worker 0", 1: "worker 1", 2: "PS 0"}


def _progress(log_path):
    """Training steps rank 0 reported so far (its progress bar)."""
    import re

    try:
        with open(log_path, errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return 0
    steps = re.findall(r"\| *(\d+)/100000 ", text)
    return int(steps[-1]) if steps else 0


def _tail(log, n=12):
    lines = [x for x in log.replace("\r", "\n").splitlines() if x.strip() and "/100000 [" not in x]
    return "\n".join(lines[-n:])


def _kill_job(tmp_path, victim, sig):
    """Run 2 workers + 1 PS of the example (each rank its own process, the
    store hosted here as torchrun's agent hosts it), send ``sig`` to rank
    ``victim`` after a few training steps; (seconds each survivor took to exit
    after the signal, its return code, every rank's log)."""
    store = dist.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False)
    procs, logs = [], []
    try:
        for r in range(3):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), RANK=str(r),
                       WORLD_SIZE="3", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="3", TORCHELASTIC_USE_AGENT_STORE="True",
                       OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
            logs.append(tmp_path / f"rank{r}.log")
            with open(logs[-1], "w") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, os.path.join(ROOT, "examples", "dlrm_esd.py"), "--num-ps", "1",
                     "--steps", "100000", "--batch", "32", "--max-cardinality", "500", "--embedding-dim", "4",
                     "--dispatchers", "random", "--fault-timeout", str(FAULT_TIMEOUT_S)],
                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
        deadline = time.monotonic() + 120
        while _progress(logs[0]) < 3:
            assert time.monotonic() < deadline, "the job did not start training"
            assert all(p.poll() is None for p in procs), [open(p).read()[-2000:] for p in logs]
            time.sleep(0.2)
        os.kill(procs[victim].pid, sig)
        t = time.monotonic()
        exits = {}
        survivors = [r for r in range(3) if r != victim]
        while len(exits) < len(survivors) and time.monotonic() - t < EXIT_BOUND_S + 30:
            for r in survivors:
                if r not in exits and procs[r].poll() is not None:
                    exits[r] = (time.monotonic() - t, procs[r].returncode)
            time.sleep(0.05)
        return exits, [p.read_text(errors="replace") for p in logs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # a stopped rank too (SIGKILL ends a stopped process)
            p.wait()


@pytest.mark.slow
@pytest.mark.parametrize("victim,sig", [(2, signal.SIGSTOP), (1, signal.SIGSTOP), (2, signal.SIGKILL),
                                        (1, signal.SIGKILL)],
                         ids=["sigstop-ps", "sigstop-worker", "sigkill-ps", "sigkill-worker"])
def test_killed_or_stopped_rank_ends_every_survivor_within_the_bound(tmp_path, victim, sig):
    exits, logs = _kill_job(tmp_path, victim, sig)
    survivors = [r for r in range(3) if r != victim]
    lost = f"rank {victim} ({NAMES[victim]})"
    lost_transport = f"{NAMES[victim]} (rank {victim})"
    print({r: f"{s:.1f} s, rc {rc}" for r, (s, rc) in exits.items()})
    for r in survivors:
        assert r in exits, (r, _tail(logs[r]))
        seconds, rc = exits[r]
        assert rc != 0, (r, _tail(logs[r]))
        assert seconds <= EXIT_BOUND_S, (r, seconds, _tail(logs[r]))
        assert lost in logs[r] or lost_transport in logs[r], (r, _tail(logs[r]))
    if sig == signal.SIGSTOP:  # nothing else notices a stopped rank: the monitor ends them
        for r in survivors:
            assert exits[r][1] == FAULT_EXIT_CODE
            assert f"{lost} is silent: no heartbeat for" in logs[r], _tail(logs[r])


# ---------------------------------------------------------------- different global batches
class _SkewedWorkload:
    """The synthetic workload, except that rank ``rank`` is handed another
    global batch (other labels) from step ``step`` on."""

    def __init__(self, config, rank, step):
        from torchrec_esd.apps.workload import SyntheticWorkload

        self._w, self._rank, self._step = SyntheticWorkload(config), rank, step
        self.config = config

    def __getattr__(self, name):
        return getattr(self._w, name)

    def global_batch(self, step, size):
        batch = self._w.global_batch(step, size)
        if step >= self._step and dist.get_rank() == self._rank:
            batch.labels = 1.0 - batch.labels
        return batch


class SkewedWorkloadConfig:
    def __init__(self, config, rank, step):
        self.config, self.rank, self.step = config, rank, step

    def make_workload(self):
        return _SkewedWorkload(self.config, self.rank, self.step)

    def __getattr__(self, name):
        return getattr(self.__dict__["config"], name)


def _skewed_job(dispatch_ahead):
    from torchrec_esd.apps.trainer import JobConfig, run
    from torchrec_esd.apps.workload import SyntheticWorkloadConfig
    from torchrec_esd.config import EsdConfig, WorkerSpec

    wl = SyntheticWorkloadConfig(num_sparse=2, max_cardinality=60, num_dense=3, seed=0)
    esd = EsdConfig([WorkerSpec(10, 100.0), WorkerSpec(10, 10.0)], fault_timeout_s=8.0, collective_timeout_s=60)
    job = JobConfig(method="esd", steps=6, global_batch=16, embedding_dim=4, esd=esd, dispatcher="random",
                    dispatch_ahead=dispatch_ahead, workload=SkewedWorkloadConfig(wl, rank=1, step=2))
    return run(job)


def test_workers_handed_different_global_batches_fail_every_rank(capfd, dispatch_ahead=1):
    from torchrec_esd.apps.launch import RankFailed, run_local_world

    with pytest.raises(RankFailed) as info:
        run_local_world(_skewed_job, 3, dispatch_ahead, timeout_s=90)
    errors = info.value.errors
    assert sorted(errors) == [0, 1, 2], errors
    what = "PS 0: the workers were handed different global batches at iteration 3"
    assert what in errors[2]["error"], errors[2]["error"]
    err = capfd.readouterr().err
    for r in (0, 1):  # ended by their fault monitor, with the PS's message
        assert f"exit code {FAULT_EXIT_CODE}" in errors[r]["error"], errors[r]
        assert f"ESD fault monitor on rank {r} (worker {r}): rank 2 (PS 0) failed: EsdRemoteError: {what}" in err, err[-3000:]


# ---------------------------------------------------------------- any exception on a worker
class _RaisingWorkload(_SkewedWorkload):
    """Every worker's reader raises a plain OverflowError at step ``step``."""

    def global_batch(self, step, size):
        if step == self._step:
            raise OverflowError("int too large to convert to float (a reader's bug)")
        return self._w.global_batch(step, size)


class RaisingWorkloadConfig(SkewedWorkloadConfig):
    def make_workload(self):
        return _RaisingWorkload(self.config, None, self.step)


def _raising_job():
    from torchrec_esd.apps.trainer import JobConfig, run
    from torchrec_esd.apps.workload import SyntheticWorkloadConfig
    from torchrec_esd.config import EsdConfig, WorkerSpec

    wl = SyntheticWorkloadConfig(num_sparse=2, max_cardinality=60, num_dense=3, seed=0)
    esd = EsdConfig([WorkerSpec(10, 100.0), WorkerSpec(10, 10.0)], fault_timeout_s=8.0, collective_timeout_s=60)
    job = JobConfig(method="esd", steps=6, global_batch=16, embedding_dim=4, esd=esd, dispatcher="random",
                    workload=RaisingWorkloadConfig(wl, rank=None, step=2))
    return run(job)


def test_any_exception_on_the_workers_ends_the_ps_with_its_message(capfd):
    from torchrec_esd.apps.launch import RankFailed, run_local_world

    t = time.monotonic()
    with pytest.raises(RankFailed) as info:
        run_local_world(_raising_job, 3, timeout_s=90)
    errors = info.value.errors
    assert sorted(errors) == [0, 1, 2], errors
    for r in (0, 1):
        assert errors[r]["error"] == "OverflowError: int too large to convert to float (a reader's bug)"
    # the PS was serving: its fault monitor ends it with a worker's message, not a raw "connection closed"
    assert f"exit code {FAULT_EXIT_CODE}" in errors[2]["error"], errors[2]
    err = capfd.readouterr().err
    assert any(f"ESD fault monitor on rank 2 (PS 0): rank {r} (worker {r}) failed: OverflowError: int too large"
               in err for r in (0, 1)), err[-3000:]
    assert time.monotonic() - t < 90


@pytest.mark.parametrize("steps,batch", [(0, 16), (3, 0)])
def test_steps_and_batch_below_one_fail_every_rank_before_any_collective(steps, batch):
    from torchrec_esd.apps.trainer import JobConfig, run
    from torchrec_esd.config import EsdConfigError

    # checked before the process group is touched: the same error on every rank, no rendezvous needed
    with pytest.raises(EsdConfigError, match="must be an int >= 1, got 0"):
        run(JobConfig(method="esd", steps=steps, global_batch=batch))


# ---------------------------------------------------------------- a user's own loop
def _user_loop(case, steps=4):
    """The README loop on 2 workers + 1 PS (tables and batches of test_misuse),
    with one fault: "missing" (step 1's batch lacks feature f1), "run_out"
    (worker 1 stops after 2 batches and shuts down)."""
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingPlan
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    from torch.nn.functional import binary_cross_entropy_with_logits as bce

    from test_misuse import DENSE, _batch, _tables
    from torchrec_esd.config import EsdConfig, WorkerSpec
    from torchrec_esd.distributed.input_dist import EsdInputDist
    from torchrec_esd.distributed.runtime import EsdRuntime
    from torchrec_esd.distributed.sharding import EsdEmbeddingBagCollectionSharder, esd_module_plan
    from torchrec_esd.ps import SparseOptimizer

    cfg = EsdConfig([WorkerSpec(10, 100.0), WorkerSpec(10, 10.0)], collective_timeout_s=60, fault_timeout_s=8.0)
    tables = _tables()
    runtime = EsdRuntime(cfg, tables, SparseOptimizer("sgd", lr=0.1))
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=DENSE, dense_arch_layer_sizes=[8, 4],
                 over_arch_layer_sizes=[8, 1])
    if runtime.is_ps:
        runtime.serve(ebc)
        return "ps"
    dmp = DistributedModelParallel(model, plan=ShardingPlan({"sparse_arch.embedding_bag_collection":
                                                             esd_module_plan(ebc, runtime)}),
                                   sharders=[EsdEmbeddingBagCollectionSharder(runtime)], env=runtime.sharding_env())
    opt = torch.optim.SGD(dmp.parameters(), lr=0.1)
    esd_dist = EsdInputDist(runtime, "random", mode="global")
    for step in range(steps):
        if case == "run_out" and runtime.worker_index == 1 and step == 2:
            break
        batch = _batch(step, 8)
        if case == "missing" and step == 1:
            kjt = batch.sparse_features
            batch.sparse_features = KeyedJaggedTensor.from_lengths_sync(["f0"], kjt["f0"].values(), kjt["f0"].lengths())
        local = esd_dist(batch)
        opt.zero_grad()
        logits = dmp(local.dense_features, local.sparse_features).squeeze(-1)
        (bce(logits, local.labels, reduction="sum") * esd_dist.loss_scale).backward()
        opt.step()
    runtime.shutdown()
    return "worker"


def test_a_batch_missing_a_feature_fails_every_rank_with_its_name():
    from torchrec_esd.apps.launch import RankFailed, run_local_world

    with pytest.raises(RankFailed) as info:
        run_local_world(_user_loop, 3, "missing", timeout_s=90)
    errors = info.value.errors
    assert sorted(errors) == [0, 1, 2], errors
    for r in (0, 1, 2):
        assert "batch has no feature(s) ['f1'] (read by the ESD tables)" in errors[r]["error"], errors[r]
    assert "aborted by the workers" in errors[2]["error"]


def test_a_worker_that_runs_out_of_batches_fails_every_rank_naming_it(capfd):
    from torchrec_esd.apps.launch import RankFailed, run_local_world

    with pytest.raises(RankFailed) as info:
        run_local_world(_user_loop, 3, "run_out", timeout_s=90)
    assert sorted(info.value.errors) == [0, 1, 2]
    err = capfd.readouterr().err
    what = "rank 1 (worker 1) ran out of batches: it ended after 2 batches while rank 0 (worker 0) started batch 3"
    for r, role in ((0, "worker 0"), (1, "worker 1"), (2, "PS 0")):
        assert f"exit code {FAULT_EXIT_CODE}" in info.value.errors[r]["error"]
        lines = [x for x in err.splitlines() if x.startswith(f"ESD fault monitor on rank {r} ({role}): ")]
        assert len(lines) == 1 and what in lines[0], (lines, err[-3000:])


# ---------------------------------------------------------------- check_finite
class _NanWorkload(_SkewedWorkload):
    """Every worker's global batch ``step`` has NaN dense features."""

    def global_batch(self, step, size):
        batch = self._w.global_batch(step, size)
        if step == self._step:
            batch.dense_features = torch.full_like(batch.dense_features, float("nan"))
        return batch


class NanWorkloadConfig(SkewedWorkloadConfig):
    def make_workload(self):
        return _NanWorkload(self.config, None, self.step)


def _nan_job():
    from torchrec_esd.apps.trainer import JobConfig, run
    from torchrec_esd.apps.workload import SyntheticWorkloadConfig
    from torchrec_esd.config import EsdConfig, WorkerSpec

    wl = SyntheticWorkloadConfig(num_sparse=2, max_cardinality=60, num_dense=3, seed=0)
    esd = EsdConfig([WorkerSpec(10, 100.0), WorkerSpec(10, 10.0)], fault_timeout_s=8.0, collective_timeout_s=60,
                    check_finite=True)
    job = JobConfig(method="esd", steps=6, global_batch=16, embedding_dim=4, esd=esd, dispatcher="random",
                    workload=NanWorkloadConfig(wl, rank=None, step=2))
    return run(job)


def test_check_finite_stops_every_rank_at_a_non_finite_loss_naming_the_step(capfd):
    from torchrec_esd.apps.launch import RankFailed, run_local_world

    with pytest.raises(RankFailed) as info:
        run_local_world(_nan_job, 3, timeout_s=90)
    errors = info.value.errors
    assert sorted(errors) == [0, 1, 2], errors
    for r in (0, 1):
        assert errors[r]["error"].startswith(f"EsdConfigError: check_finite: non-finite loss nan at step 3 on worker {r}")
    assert f"exit code {FAULT_EXIT_CODE}" in errors[2]["error"], errors[2]
    err = capfd.readouterr().err
    assert "ESD fault monitor on rank 2 (PS 0): rank" in err and "check_finite: non-finite loss nan at step 3" in err
