"""Single-process training: the reference trainer (parity oracle) and the pieces the runtime shares with it."""

from raymoe.train.local import train_local
from raymoe.train.optim import lr_at, make_adamw, param_groups, set_lr
from raymoe.train.reference import ReferenceTrainer, accumulate_gradients, clip_gradients
from raymoe.train.run_dir import RunDir

__all__ = [
    "ReferenceTrainer",
    "RunDir",
    "accumulate_gradients",
    "clip_gradients",
    "lr_at",
    "make_adamw",
    "param_groups",
    "set_lr",
    "train_local",
]
