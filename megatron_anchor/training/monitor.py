"""Console log lines, TensorBoard and wandb. Only the logging rank (the last one) writes anything."""

from __future__ import annotations

import os
import sys
from typing import Dict, Optional

from megatron_anchor.training.config import AnchorConfig


class Monitor:
    """Sends scalar metrics to the console and, when asked, to TensorBoard and wandb."""

    def __init__(self, cfg: AnchorConfig, is_logging_rank: bool, stream=None):
        self.enabled = is_logging_rank
        self.stream = stream or sys.stdout
        self.tb = None
        self.wandb_run = None
        lg = cfg.logging
        if not self.enabled:
            return
        if lg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=lg.tensorboard_dir)
        if lg.wandb_project:
            try:
                import wandb
            except ImportError as exc:
                raise ImportError("--wandb-project needs wandb: pip install 'megatron-anchor[logging]'") from exc
            save_dir = lg.wandb_save_dir or (os.path.join(cfg.checkpoint.save, "wandb")
                                             if cfg.checkpoint.save else "wandb")
            os.makedirs(save_dir, exist_ok=True)
            self.wandb_run = wandb.init(
                project=lg.wandb_project,
                name=lg.wandb_exp_name,
                dir=save_dir,
                config=_flat_config(cfg),
            )

    def print(self, line: str) -> None:
        """A console line from the logging rank."""
        if self.enabled:
            print(line, file=self.stream, flush=True)

    def scalars(self, metrics: Dict[str, float], step: int, prefix: str = "") -> None:
        """Write metrics to TensorBoard / wandb (console lines are formatted by the loop)."""
        if not self.enabled:
            return
        named = {f"{prefix}{k}": v for k, v in metrics.items() if v is not None}
        if self.tb is not None:
            for k, v in named.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log(named, step=step)

    def close(self) -> None:
        """Flush and close the writers."""
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _flat_config(cfg: AnchorConfig) -> Dict[str, object]:
    from dataclasses import asdict

    flat = {}
    for section, values in asdict(cfg).items():
        for k, v in values.items():
            flat[f"{section}.{k}"] = v
    return flat


def format_train_line(iteration: int, train_iters: int, metrics: Dict[str, Optional[float]]) -> str:
    """One console line: iteration, losses, lr, grad norm, throughput and step time."""
    parts = [f"iteration {iteration:8d}/{train_iters:8d}"]
    from megatron_anchor.training.loss import REPORT_KEYS

    for key in REPORT_KEYS:
        if metrics.get(key) is not None:
            parts.append(f"{key}: {metrics[key]:.6E}")
    parts.append(f"lr: {metrics['lr']:.6E}")
    gn = metrics.get("grad norm")
    parts.append(f"grad norm: {gn:.4f}" if gn is not None else "grad norm: n/a")
    parts.append(f"tokens/s: {metrics['tokens/s']:.1f}")
    parts.append(f"ms/step: {metrics['ms/step']:.1f}")
    return " | ".join(parts)
