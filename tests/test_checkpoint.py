"""Checkpoints through TorchRec's state_dict and DCP: exact resume, interop with
vanilla TorchRec both ways, bad checkpoints, the state_dict's layout.

Each test runs real gloo worlds on localhost (``run_local_world``): a job of
``N`` steps that checkpoints, a NEW world that resumes and trains to ``N + M``,
and the uninterrupted ``N + M`` job; the resumed job must end with the same
tables, row-wise optimizer state and dense weights (equivalence tolerance,
1e-5 relative: the resumed job restarts its caches cold, so the dispatch and
with it the float summation order may differ).
"""

import json
import os

import pytest
import torch

from torchrec_esd.apps.launch import RankFailed, run_local_world
from torchrec_esd.apps.trainer import JobConfig, run
from torchrec_esd.apps.workload import SyntheticWorkloadConfig
from torchrec_esd.config import EsdConfig, WorkerSpec

from equivalence import assert_close_rel  # noqa: E402  (tests/ is on sys.path under pytest)

WORKLOAD = SyntheticWorkloadConfig(num_sparse=4, cardinalities=[60, 150, 400, 25], bag_size=(1, 4), alpha=1.1, seed=3)
CACHE = {"t_cat_0": 12, "t_cat_1": 30, "t_cat_2": 40, "t_cat_3": 6}
BATCH = 48


def _common(optimizer="rowwise_adagrad", **kw):
    return dict(global_batch=BATCH, workload=WORKLOAD, collect_tables=True, sparse_optimizer=optimizer,
                sparse_lr=0.1, dense_lr=0.1, **kw)


def _esd_cfg(W=2, num_ps=1, des_misses=False):
    return EsdConfig([WorkerSpec(CACHE, bw) for bw in [100, 10, 50, 25][:W]], num_ps=num_ps, des_misses=des_misses)


def _assert_same_end(a, b, what):
    """Same final tables, optimizer states and dense weights (rank-0 results)."""
    for name in a["tables"]:
        assert_close_rel(a["tables"][name], b["tables"][name], f"{what}: table {name}")
    assert set(a["tables_state"]) == set(b["tables_state"])
    for name in a["tables_state"]:
        if a["tables_state"][name].numel() == 0 and b["tables_state"][name].numel() == 0:
            continue  # SGD: no state
        assert_close_rel(a["tables_state"][name], b["tables_state"][name], f"{what}: optimizer state {name}")
    for name in a["dense"]:
        assert_close_rel(a["dense"][name], b["dense"][name], f"{what}: dense {name}")


STEPS = 8


@pytest.fixture(scope="module")
def uninterrupted():
    """Vanilla TorchRec, STEPS steps without a break, per sparse optimizer (ESD
    at staleness 0 trains this same model, so it is every resumed job's reference)."""
    cache = {}

    def get(optimizer):
        if optimizer not in cache:
            cache[optimizer] = run_local_world(run, 2, JobConfig(method="vanilla", steps=STEPS, **_common(optimizer)))[0]
        return cache[optimizer]

    return get


@pytest.mark.parametrize(
    "optimizer,esd_kwargs,num_ps,des",
    [
        ("rowwise_adagrad", dict(dispatch_ahead=2, input_mode="local"), 1, False),
        ("sgd", dict(use_pipeline=True), 2, True),
    ],
    ids=["rowwise_adagrad-dispatch_ahead", "sgd-des_misses-pipeline-2ps"],
)
def test_exact_resume_in_a_new_world(tmp_path, uninterrupted, optimizer, esd_kwargs, num_ps, des):
    cfg = _esd_cfg(2, num_ps, des)
    common = _common(optimizer, esd=cfg, method="esd", dispatcher="hybrid", **esd_kwargs)
    full = uninterrupted(optimizer)
    # 5 steps with a checkpoint every 2 (steps 2, 4 and the end, 5) ...
    first = run_local_world(run, cfg.world_size,
                            JobConfig(steps=5, checkpoint_dir=str(tmp_path), checkpoint_every=2, **common))
    with open(tmp_path / "latest") as f:
        assert f.read().strip() == "step_00000005"
    meta = json.load(open(tmp_path / "step_00000005" / "esd_checkpoint.json"))
    assert meta["step"] == 5 and [t["name"] for t in meta["tables"]] == list(CACHE)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000004", "step_00000005"]  # the last 2 kept
    # ... then a new world resumes at step 5 and trains to STEPS
    resumed = run_local_world(run, cfg.world_size,
                              JobConfig(steps=STEPS, checkpoint_dir=str(tmp_path), resume=True, **common))
    r = resumed[0]
    assert r["start_step"] == 5 and len(r["losses"]) == STEPS - 5
    assert_close_rel(torch.tensor(full["losses"][:5]), torch.tensor(first[0]["losses"]), "losses before")
    assert_close_rel(torch.tensor(full["losses"][5:]), torch.tensor(r["losses"]), "losses after resume")
    _assert_same_end(full, r, "resumed vs uninterrupted")
    if optimizer == "rowwise_adagrad":
        assert all(float(s.abs().max()) > 0 for s in r["tables_state"].values())


def test_vanilla_checkpoint_resumes_under_esd_and_esd_checkpoint_under_vanilla(tmp_path, uninterrupted):
    """Train on edge workers with ESD, serve with plain TorchRec (and back):
    the checkpoints are TorchRec's, at other world sizes and shardings."""
    common = _common()
    full = uninterrupted("rowwise_adagrad")
    # vanilla (2 ranks, table-wise) 4 steps -> ESD (3 workers + 1 PS, row-wise shards) to STEPS
    vdir, edir = str(tmp_path / "v"), str(tmp_path / "e")
    run_local_world(run, 2, JobConfig(method="vanilla", steps=4, checkpoint_dir=vdir, **common))
    cfg = _esd_cfg(3, 1)
    esd = run_local_world(run, cfg.world_size, JobConfig(method="esd", esd=cfg, steps=STEPS, checkpoint_dir=vdir,
                                                         resume=True, dispatcher="hybrid", **common))
    assert esd[0]["start_step"] == 4
    _assert_same_end(full, esd[0], "vanilla -> ESD")
    assert_close_rel(torch.tensor(full["losses"][4:]), torch.tensor(esd[0]["losses"]), "losses")
    # ESD (2 workers + 2 PS) 4 steps -> vanilla (2 ranks) to STEPS
    cfg2 = _esd_cfg(2, 2)
    run_local_world(run, cfg2.world_size, JobConfig(method="esd", esd=cfg2, steps=4, checkpoint_dir=edir,
                                                    dispatcher="hybrid", **common))
    vanilla = run_local_world(run, 2, JobConfig(method="vanilla", steps=STEPS, checkpoint_dir=edir, resume=True,
                                                **common))
    assert vanilla[0]["start_step"] == 4
    _assert_same_end(full, vanilla[0], "ESD -> vanilla")


def test_checkpoint_meta_mismatches_are_named():
    from torchrec_esd.apps.checkpointing import check_meta, job_meta
    from torchrec_esd.apps.trainer import job_tables, sparse_optimizer
    from torchrec_esd.apps.workload import SyntheticWorkload
    from torchrec_esd.distributed.checkpoint import EsdCheckpointError

    def meta(**kw):
        job = JobConfig(**dict(_common(), **kw))
        return job_meta(job_tables(job, SyntheticWorkload(job.workload)), sparse_optimizer(job))

    saved = meta()
    check_meta(saved, meta(sparse_lr=0.05), "ck")  # another learning rate is a choice, not a mismatch
    cases = [
        (meta(embedding_dim=4), "table 't_cat_0' has embedding dim 8, this model 4"),
        (meta(sparse_optimizer="sgd"), "sparse optimizer"),
        (meta(workload=SyntheticWorkloadConfig(num_sparse=4, cardinalities=[60, 150, 401, 25], bag_size=(1, 4),
                                               alpha=1.1, seed=3)), "table 't_cat_2' has rows 400, this model 401"),
        (meta(workload=SyntheticWorkloadConfig(num_sparse=3, cardinalities=[60, 150, 400], bag_size=(1, 4),
                                               alpha=1.1, seed=3)), "extra ['t_cat_3']"),
        (dict(saved, format=99), "format"),
    ]
    for mine, needle in cases:
        with pytest.raises(EsdCheckpointError, match=None) as e:
            check_meta(saved if "format" not in needle else mine, mine if "format" not in needle else saved, "ck")
        assert needle in str(e.value), str(e.value)


def test_bad_checkpoint_fails_every_rank_before_any_state_changes(tmp_path):
    cfg = _esd_cfg(2, 1)
    common = _common(esd=cfg, method="esd", dispatcher="heuristic")
    run_local_world(run, cfg.world_size, JobConfig(steps=2, checkpoint_dir=str(tmp_path), **common))
    with pytest.raises(RankFailed) as e:
        run_local_world(run, cfg.world_size,
                        JobConfig(steps=4, checkpoint_dir=str(tmp_path), resume=True, **dict(common, embedding_dim=4)),
                        timeout_s=120)
    # every rank, the parameter server included, fails with the message
    for r in range(cfg.world_size):
        assert f"rank {r}:" in str(e.value)
    assert str(e.value).count("has embedding dim 8, this model 4") >= cfg.world_size, str(e.value)
    # an incomplete checkpoint (a crash while writing) is never the latest
    os.makedirs(tmp_path / "step_00000004.tmp")
    from torchrec_esd.apps.checkpointing import latest_checkpoint
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_00000002")


def test_sigterm_preemption_checkpoints_consistently_and_resumes_to_the_same_model(tmp_path):
    """SIGTERM to torchrun (a preemption: it reaches every rank) at about step 8
    of 150: the workers agree on a step, train what they already dispatched,
    checkpoint and exit 143; --resume in a new world reaches the model of an
    uninterrupted run.  (150 steps, not 30: a whole 30-step run takes about
    1 s, so on a fast machine the signal could arrive after the last step.)"""
    import signal
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    from checkpoint_demo import interrupted_job, job_command, run_job
    from torchrec_esd.apps.checkpointing import checkpoint_tensors, latest_checkpoint, max_differences

    steps, every = 150, 5
    ref, broken = str(tmp_path / "ref"), str(tmp_path / "broken")
    assert run_job(job_command(steps, ref, port=29641), str(tmp_path / "ref.log"), timeout_s=300) == 0
    out = interrupted_job(job_command(steps, broken, every, port=29642), str(tmp_path / "broken.log"),
                          os.path.join(broken, "esd_hybrid"), kill_at=8, every=every, sig=signal.SIGTERM,
                          rank=None, timeout_s=300)
    log = open(tmp_path / "broken.log").read()
    assert out["rc"] != 0 and "preempted (SIGTERM) at step" in log, log[-3000:]
    stopped = int(log.split("preempted (SIGTERM) at step ")[1].split(":")[0])
    assert every < stopped < steps
    last = latest_checkpoint(os.path.join(broken, "esd_hybrid"))
    assert last.endswith(f"step_{stopped:08d}")
    assert run_job(job_command(steps, broken, every, resume=True, port=29643), str(tmp_path / "resumed.log"),
                   timeout_s=300) == 0
    a = checkpoint_tensors(latest_checkpoint(os.path.join(ref, "esd_hybrid")))
    b = checkpoint_tensors(latest_checkpoint(os.path.join(broken, "esd_hybrid")))
    scale = max(float(v.abs().max()) for v in a.values() if v.numel())
    diff = max_differences(a, b)
    assert max(diff.values()) <= 1e-5 * scale, diff


def test_killed_worker_resume_reaches_the_uninterrupted_model(capsys):
    """examples/checkpoint_demo.py at a small size: SIGKILL of worker rank 1
    mid-training ends the job within the fault timeout, naming the rank; a new
    world resumes from the last checkpoint and ends at the uninterrupted model
    (the demo's exit code 0: max difference within 1e-4 of the largest value)."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    import checkpoint_demo

    # 40 steps, killed at 12: the job must still be running when the kill comes (20 steps take < 1 s)
    rc = checkpoint_demo.main(["--steps", "40", "--every", "5", "--kill-at", "12", "--fault-timeout", "5"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "rank 1 (worker 1) is silent" in out or "rank 1 (worker 1) failed" in out, out
    ended = float(out.split("the job ended ")[1].split(" s later")[0])
    assert ended < 5 + 2 * 0.5 + 5, out  # T + two ticks, with margin for the launcher's teardown
    # killed at about step 12: the last complete checkpoint is step 10 (15 only if the kill came late)
    assert "last complete checkpoint: step_00000010" in out or "last complete checkpoint: step_00000015" in out, out
