"""Worker for tests/test_train.py::test_sync_bn_statistics_equal_the_full_batch (run by torchrun).

Each rank passes its share of one fixed batch (unequal shares on purpose) through the TSE MLP in
training mode under DDP, with SyncBatchNorm (SYNC_BN=1) or without; rank 0 saves the BatchNorm
running statistics, the outputs of both ranks and the gradient of the first linear layer."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.tse import MLP  # noqa: E402
from processor.sync_bn import convert_sync_batchnorm  # noqa: E402


def main() -> None:
    batch_file, out = sys.argv[1:3]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    mlp = MLP(8, 6, 4, 2).train()
    if os.environ.get("SYNC_BN") == "1":
        assert convert_sync_batchnorm(mlp) == 2
    net = torch.nn.parallel.DistributedDataParallel(mlp)
    x = torch.load(batch_file)
    bounds = [0, 2, x.shape[0]]  # 2 samples (x 3 tokens) on rank 0, the rest on rank 1
    y = net(x[bounds[rank]:bounds[rank + 1]])
    y.sum().backward()
    outs = [None, None]
    dist.all_gather_object(outs, y.detach())
    if rank == 0:
        bn = mlp.bns[0]
        torch.save({"running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
                    "out": torch.cat(outs), "grad": mlp.layers[0].weight.grad.clone() * 2}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
