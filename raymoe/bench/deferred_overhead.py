"""What the zero-bubble I/W split costs a whole forward+backward, standalone (``raymoe.parallel.weight_grad``).

One micro-batch through the whole model, one thread, interleaved repeats; the medians of:

* ``nn_linear``: the model as built (the reference);
* ``unsplit``: every linear a ``DeferredLinear`` of a planned store, on a forward no I splits (plain ``F.linear``);
* ``split``: the same linears on a forward an I splits (output hooks), backward under capture, then the W;
* ``function_unsplit`` / ``function_split``: a store without a plan, where every linear runs the deferring
  autograd function -- what every forward of a rank whose list held an I paid before the plan existed.

Ratios are to ``nn_linear`` measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def deferred_linear_overhead(config, micro_BL: torch.Tensor, *, repeats: int, gate: Callable[[], object],
                             mtp_weight: float = 0.3) -> dict:
    from raymoe.model import build_model
    from raymoe.parallel.weight_grad import WeightGradStore, defer_weight_grads

    plain = build_model(config)
    planned, unplanned = WeightGradStore(), WeightGradStore()
    deferred, old = build_model(config), build_model(config)
    defer_weight_grads(deferred, planned)
    defer_weight_grads(old, unplanned)

    def step(model, store: WeightGradStore | None, split: bool) -> None:
        model.zero_grad(set_to_none=True)
        if store is planned:
            store.force(split)
        loss = model(micro_BL, mtp_weight=mtp_weight).loss
        if split:
            with store.capture((0, 0)):
                loss.backward()
            store.flush((0, 0))
        else:
            loss.backward()

    cases = {
        "nn_linear": lambda: step(plain, None, False),
        "unsplit": lambda: step(deferred, planned, False),
        "split": lambda: step(deferred, planned, True),
        "function_unsplit": lambda: step(old, unplanned, False),
        "function_split": lambda: step(old, unplanned, True),
    }
    for fn in cases.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        gate()
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(v) for name, v in times.items()}
    swapped = sum(type(m).__name__ == "DeferredLinear" for m in deferred.modules())
    return {"seconds": medians, "ratio_to_nn_linear": {k: v / medians["nn_linear"] for k, v in medians.items()},
            "deferred_linears": swapped, "repeats": repeats}
