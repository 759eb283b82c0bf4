"""Worker for tests/test_train.py::test_ddp_gradients_equal_single_process (run by torchrun).

Each rank takes its share of one fixed global batch (unequal shares on purpose), runs RDE's
training forward/backward under DDP and rank 0 saves the averaged gradients."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import build_model  # noqa: E402
from utils.config import load_config  # noqa: E402


def main() -> None:
    clip, batch_file, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    cfg = load_config(None, [f"pretrain_choice={clip}", "img_size=[64, 32]", "tse_embed_dim=32",
                             "loss_names=" + os.environ.get("LOSS", "TAL")])
    model = build_model(cfg).eval()  # eval: BatchNorm uses running stats, as in one process
    net = torch.nn.parallel.DistributedDataParallel(model)
    batch = torch.load(batch_file)
    bounds = [0, 5, batch["pids"].shape[0]]  # 5 pairs on rank 0, the rest on rank 1
    part = {k: v[bounds[rank]:bounds[rank + 1]] for k, v in batch.items()}
    losses = net(part, weights=part["weights"], aug_gamma=0.5)
    sum(losses.values()).backward()
    if rank == 0:
        torch.save({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
