"""A 2-"node" torchrun world on one machine (two launchers, static
rendezvous, --node_rank 0 and 1) trains the same model as the same job in
one single-node world."""

import os
import subprocess
import sys

import torch

from torchrec_esd.apps.launch import free_port, run_local_world
from torchrec_esd.apps.trainer import run

from equivalence import assert_same_model

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def test_two_node_torchrun_world_matches_the_single_node_run(tmp_path):
    from torchrun_job import job

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port)]
    procs = [subprocess.Popen(cmd + ["--node_rank", str(n), os.path.join(HERE, "torchrun_job.py"), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    multi = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    # the PS ranks report their lazy storage (rows touched); no other result
    assert all(multi[r]["role"] == "ps" and multi[r]["touched_rows"] > 0 for r in (2, 3))
    single = run_local_world(run, 4, job())
    assert_same_model(single[0], multi, 2)
    for name in single[0]["tables"]:  # the same decisions: the very same tables
        assert torch.equal(single[0]["tables"][name], multi[0]["tables"][name])
