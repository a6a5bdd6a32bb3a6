"""Run metrics on rank 0: TensorBoard scalars and the progress bar. Other ranks get a no-op.

TensorBoard tags (RUN/tensorboard):
    loss/total              the optimised loss (mean over ranks and accumulation micro-batches)
    loss/<text_id>          the contrastive loss of one text type; with M2M, text m trains branch m
    loss/diversity          the branch-diversity hinge, when loss.diversity_weight > 0
    train/logit_scale       exp(theta), the temperature inverse
    train/lr                the learning rate the step used
    train/grad_norm         the global gradient norm, where DeepSpeed reports it
    perf/samples_per_s      images per second, all ranks together
    perf/step_s, perf/data_wait_s, perf/compute_s
                            one step's wall time, the part spent waiting for the data loader
                            (rank 0), and the rest
    data/<count>            samples used, shards read, and what was skipped (summed over ranks)
    eval/<set>/...          evaluation during training (train/evaluation.py, docs/training.md)
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm


class Metrics:
    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, progress_bar: bool,
                 total_steps: int, start_step: int) -> None:
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1.0)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{scalars['loss/total']:.4f}", lr=f"{scalars['train/lr']:.2e}",
                img_s=f"{scalars['perf/samples_per_s']:.1f}", refresh=False,
            )

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def write(self, message: str) -> None:
        """A line that does not break the progress bar."""
        if self.bar is not None:
            self.bar.write(message)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
