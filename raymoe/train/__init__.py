"""Single-process training: the reference trainer (parity oracle) and the pieces the runtime shares with it."""

from raymoe.train.clip import clip_coefficient, clip_gradients, squared_norm
from raymoe.train.local import train_local
from raymoe.train.optim import lr_at, make_adamw, param_groups, set_lr
from raymoe.train.reference import ReferenceTrainer, accumulate_gradients
from raymoe.train.run_dir import RunDir

__all__ = [
    "ReferenceTrainer",
    "RunDir",
    "accumulate_gradients",
    "clip_coefficient",
    "clip_gradients",
    "lr_at",
    "make_adamw",
    "param_groups",
    "set_lr",
    "squared_norm",
    "train_local",
]
