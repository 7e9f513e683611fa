"""PyTorch Lightning callback that runs any prunekit.train schedule inside Trainer.fit.

    sched = prunekit.train.RigL(model, optimizer, density=0.1, t_end=...)  # in configure_optimizers
    trainer = Trainer(callbacks=[SparsityCallback(sched)])

The schedule steps until its step count matches trainer.global_step (so gradient
accumulation is respected), logs `sparsity` and `next_event_step`, and its state travels in
Lightning checkpoints. Lightning is optional: without it this class still works with any
object exposing global_step, which is how it is tested.
"""

from __future__ import annotations

try:  # pragma: no cover - depends on the environment
    from lightning.pytorch import Callback as _Base
except ImportError:  # pragma: no cover
    try:
        from pytorch_lightning import Callback as _Base
    except ImportError:
        _Base = object

from prunekit.errors import PruneError
from prunekit.train.base import Schedule


class SparsityCallback(_Base):
    """Steps `schedule` after each optimizer step and logs its state under `prefix`."""

    def __init__(self, schedule: Schedule, log: bool = True, prefix: str = "sparsity/"):
        if not isinstance(schedule, Schedule):
            raise PruneError(f"SparsityCallback needs a prunekit.train schedule, got "
                             f"{type(schedule).__name__}")
        self.schedule, self.log, self.prefix = schedule, log, prefix

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        while self.schedule.step_count < int(trainer.global_step):  # one per optimizer step
            self.schedule.step()
        if self.log and hasattr(pl_module, "log"):
            for k, v in self.schedule.log_dict().items():
                pl_module.log(self.prefix + k, v)

    def state_dict(self):
        return self.schedule.state_dict()

    def load_state_dict(self, state_dict):
        self.schedule.load_state_dict(state_dict)
