"""ESD as a drop-in under TorchRec's DistributedModelParallel: the README's
"Using it from TorchRec" example, runnable.

    torchrun --standalone --nproc_per_node 3 examples/torchrec_quickstart.py

starts 2 workers (1000 and 10 Mbit/s, batch shares 3 : 1) and 1 parameter
server on CPU (gloo) and trains a small TorchRec DLRM on random local batches.
The code between the two ``README`` marker lines is the README's snippet,
character for character (``tests/test_quickstart.py`` checks that, and runs
this file under torchrun).
"""

import argparse
import os

from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

# ---- README: Using it from TorchRec (begin)
import torch
import torch.distributed as dist
from torch.nn.functional import binary_cross_entropy_with_logits
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingPlan
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_esd import (EsdConfig, EsdEmbeddingBagCollectionSharder, EsdInputDist, EsdRuntime,
                          SparseOptimizer, WorkerSpec, esd_module_plan, make_dispatcher)

TABLES = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f{i}"])
          for i, n in enumerate((100, 400, 1000))]
DENSE_FEATURES = 4


def build_dlrm() -> DLRM:                           # the same model on every rank
    torch.manual_seed(0)
    return DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=TABLES),
                dense_in_features=DENSE_FEATURES, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])


def train(loader) -> list:
    """``loader``: this rank's local torchrec ``Batch`` es (dense, KJT, labels)."""
    dist.init_process_group("gloo")                 # torchrun: W workers + P PS ranks
    cfg = EsdConfig([WorkerSpec(cache_rows=50, bandwidth_mbps=1000, share=3),
                     WorkerSpec(cache_rows=50, bandwidth_mbps=10, share=1)], num_ps=1)
    runtime = EsdRuntime(cfg, TABLES, SparseOptimizer("rowwise_adagrad", lr=0.05))
    model = build_dlrm()
    ebc = model.sparse_arch.embedding_bag_collection
    if runtime.is_ps:
        runtime.serve(ebc)                          # returns when the workers stop
        return []
    dmp = DistributedModelParallel(
        model, env=runtime.sharding_env(),          # the workers' process group
        plan=ShardingPlan({"sparse_arch.embedding_bag_collection": esd_module_plan(ebc, runtime)}),
        sharders=[EsdEmbeddingBagCollectionSharder(runtime)])
    dense_opt = torch.optim.SGD(dmp.parameters(), lr=0.05)    # ESD's tables are no nn.Parameters
    esd_dist = EsdInputDist(runtime, make_dispatcher("hybrid"), mode="local")
    losses = []
    for local in esd_dist.dispatch_ahead(loader):   # local batches in, this worker's dispatched samples out
        dense_opt.zero_grad()
        logits = dmp(local.dense_features, local.sparse_features).squeeze(-1)
        per_sample = binary_cross_entropy_with_logits(logits, local.labels, reduction="none")
        loss = esd_dist.loss(per_sample)            # sum * W / B: vanilla's gradients at any shares
        loss.backward()                             # the embeddings update during the backward
        dense_opt.step()
        losses.append(loss.item())
    runtime.shutdown()                              # flush dirty cached rows, stop the PS
    return losses
# ---- README: Using it from TorchRec (end)


def random_batches(rank: int, steps: int, batch_size: int):
    """``steps`` random local batches of ``batch_size`` samples for ``rank``."""
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        lengths = torch.randint(1, 4, (len(TABLES), batch_size), generator=g)
        values = torch.cat([torch.randint(0, t.num_embeddings, (int(lengths[i].sum()),), generator=g)
                            for i, t in enumerate(TABLES)])
        kjt = KeyedJaggedTensor(keys=[f for t in TABLES for f in t.feature_names], values=values,
                                lengths=lengths.reshape(-1), stride=batch_size)
        yield Batch(dense_features=torch.randn(batch_size, DENSE_FEATURES, generator=g), sparse_features=kjt,
                    labels=torch.randint(0, 2, (batch_size,), generator=g).float())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="local batch per worker")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    losses = train(random_batches(rank, args.steps, args.batch))
    if losses:  # a worker: its part of each step's global-batch mean loss
        print(f"worker {rank}: trained {len(losses)} steps, loss part {losses[0]:.4f} -> {losses[-1]:.4f}",
              flush=True)
    else:
        print(f"parameter server {rank}: served until the workers stopped", flush=True)


if __name__ == "__main__":
    main()
