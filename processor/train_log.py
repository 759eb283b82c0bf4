"""The trainer's reporting: the per-epoch log line and TensorBoard (rank 0; one stream per run)."""
from __future__ import annotations

from utils import run_dir as rd


class TrainLog:
    """TensorBoard scalars of every epoch (``train/*``, ``eval/*``, ``ccd/*``) on rank 0."""

    def __init__(self, run_dir: str, rank: int, start_epoch: int):
        self.tb = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            # One stream per run: a resume writes to the same folder and purges the steps it redoes
            # (an epoch logged before a kill but not checkpointed would otherwise appear twice).
            self.tb = SummaryWriter(log_dir=rd.tb_dir(run_dir), purge_step=start_epoch)

    @staticmethod
    def epoch_line(epoch: int, dt: float, samples: int, lr: float, means: dict, gamma) -> str:
        return (f"epoch {epoch} done in {dt:.1f}s ({samples / dt:.1f} samples/s), lr {lr:.2e}, "
                + ", ".join(f"{k} {v:.4f}" for k, v in means.items())
                + (f", rda gamma {gamma:.2f}" if gamma is not None else ""))

    def scalars(self, epoch: int, lr: float, means: dict, ccd_info: dict, results: dict | None) -> None:
        if self.tb is None:
            return
        if results is not None:
            for k, v in results["t2i"].items():
                self.tb.add_scalar(f"eval/{k}", v, epoch)
        self.tb.add_scalar("train/lr", lr, epoch)
        for k, v in means.items():
            self.tb.add_scalar(f"train/{k}", v, epoch)
        for k, v in ccd_info.items():
            self.tb.add_scalar(f"ccd/{k}", v, epoch)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
