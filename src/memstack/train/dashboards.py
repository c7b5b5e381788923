"""Where a training run's metrics go besides ``metrics.jsonl``: TensorBoard and Weights & Biases.

:func:`memstack.train.loop.fit` writes one record per logged step to ``metrics.jsonl`` (loss,
learning rate, tokens/s, the gates, the loss by segment index, the memories' read shares) and
hands the same record to :class:`Dashboards`, which writes it as scalars (:func:`scalars`) to
each dashboard the run's config asks for (``run.tensorboard``, ``run.wandb``). Each is an
optional extra; a missing one is a one-line error that names the install command, raised when
the run starts, not at its first log.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from memstack.train.config import RunConfig

INSTALL = {
    "tensorboard": "pip install 'memstack[tensorboard]'",
    "wandb": "pip install 'memstack[wandb]'",
}


def check_dashboards(run: RunConfig) -> None:
    """Raise ``ValueError`` (one line, with the install command) if a dashboard the run asks for
    is not installed."""
    wanted = (["tensorboard"] if run.tensorboard else []) + (["wandb"] if run.wandb != "off" else [])
    for name in wanted:
        if importlib.util.find_spec(name) is None:
            field = "run.tensorboard=true" if name == "tensorboard" else f"run.wandb={run.wandb}"
            raise ValueError(f"{field} needs the {name} package, which is not installed: {INSTALL[name]}")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics record as flat scalars, named as the dashboards show them.

    ``loss``, ``answer_loss``, ``lr``, ``tokens_per_s`` as they are; the gates as
    ``gate/<kind>/layer_<L>/head_<H>`` (sigmoid of the logit: the share of the head's output that
    the kind's gate gives it); ``segment_loss/<i>`` the mean loss of segment ``i`` (segments with
    no predicted token are left out); ``read_share/<kind>`` the share of the memory layers' output
    that came from each memory kind (see :func:`memstack.explain.read_shares`).
    """
    out = {k: float(record[k]) for k in ("loss", "answer_loss", "lr", "tokens_per_s") if k in record}
    for kind, layers in record.get("gates", {}).items():
        for layer, heads in layers.items():
            for head, value in enumerate(heads):
                out[f"gate/{kind}/layer_{layer}/head_{head}"] = float(value)
    for i, value in enumerate(record.get("segment_loss", [])):
        if value is not None:
            out[f"segment_loss/{i}"] = float(value)
    for kind, value in record.get("read_share", {}).items():
        out[f"read_share/{kind}"] = float(value)
    return out


class Dashboards:
    """The run's dashboards: TensorBoard's event files in ``<out_dir>/tensorboard`` and a W&B run
    in ``<out_dir>/wandb``, as ``run.tensorboard`` and ``run.wandb`` ask (neither: nothing).

    Args:
        run: the run's config section.
        out_dir: the run directory.
        config: the whole resolved config, stored with the W&B run.
        start: the step the run starts from; a resumed run's TensorBoard events after it are
            dropped (``purge_step``), as ``metrics.jsonl``'s records are.
    """

    def __init__(self, run: RunConfig, out_dir: Path, config: dict[str, Any], start: int = 0) -> None:
        check_dashboards(run)
        self.tensorboard = self.wandb = None
        if run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start or None)
        if run.wandb != "off":
            import wandb

            (out_dir / "wandb").mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(
                project=run.wandb_project,
                name=out_dir.name,
                dir=str(out_dir),
                mode=run.wandb,
                config=config,
            )

    def log(self, record: dict[str, Any]) -> None:
        """Write one metrics record (its ``step`` is the x axis)."""
        values = scalars(record)
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, record["step"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=record["step"])

    def close(self) -> None:
        """Flush and close every dashboard (idempotent)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
