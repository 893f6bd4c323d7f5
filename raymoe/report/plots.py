"""The report's pictures: losses, throughput, expert-load balance over time, measured vs simulated timeline.

Legend: S steps, R routers (MoE layers, then MTP modules), E routed experts.

matplotlib is used through its object API (``Figure`` + Agg canvas), so nothing touches pyplot's global state
and the functions are safe to call from a worker or a test.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from raymoe.report.timings import TimedAction

# Same colours as raymoe/schedule/timeline.py, so measured and simulated pictures read alike:
# kind -> (direction 0, direction 1 = DualPipe's reverse copy / DualPipeV's way back).
KIND_COLOURS = {
    "F": ("#f5a623", "#c0780a"),
    "B": ("#7ed321", "#4d8f12"),
    "I": ("#b8e986", "#86b85a"),
    "W": ("#6aa9ea", "#2f6db3"),
    "FB": ("#d9534f", "#a02f2b"),
}
KIND_LABELS = {"F": "forward", "B": "backward", "I": "backward (input)", "W": "backward (weights)",
               "FB": "overlapped F&B"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_losses(rows: Sequence[dict], path: Path) -> Path:
    steps = [r["step"] for r in rows]
    fig = _figure(7.5, 4)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, [r["loss"] for r in rows], label="main loss", color="tab:blue")
    if any(r.get("mtp_loss") for r in rows):
        ax.plot(steps, [r.get("mtp_loss", np.nan) for r in rows], label="MTP loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_throughput(rows: Sequence[dict], path: Path) -> Path:
    steps = [r["step"] for r in rows]
    fig = _figure(7.5, 4)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, [r.get("tokens_per_s", np.nan) for r in rows], color="tab:green", label="tokens/s")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(steps, [r.get("step_time_s", np.nan) for r in rows], color="tab:gray", alpha=0.6, label="step time")
    twin.set_ylabel("step time (s)")
    ax.set_title("throughput")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], loc="lower right")
    return _save(fig, path)


def max_vio_SR(rows: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """MaxVio per (step, router) from ``expert_load`` and the last step's load / mean load per (router, expert)."""
    loads = [np.asarray(r["expert_load"], dtype=np.float64) for r in rows]
    counts_SRE = np.stack(loads)
    mean_SR = counts_SRE.mean(axis=-1)
    safe_SR = np.where(mean_SR > 0, mean_SR, 1.0)
    vio_SR = np.where(mean_SR > 0, (counts_SRE.max(axis=-1) - mean_SR) / safe_SR, 0.0)
    relative_RE = counts_SRE[-1] / safe_SR[-1][:, None]
    return vio_SR, relative_RE


def plot_expert_balance(rows: Sequence[dict], router_labels: Sequence[str], path: Path) -> Path:
    """Left: MaxVio heat map (router x step). Right: the last step's load of every expert relative to the mean."""
    vio_SR, relative_RE = max_vio_SR(rows)
    steps = [r["step"] for r in rows]
    num_routers = vio_SR.shape[1]
    fig = _figure(12, 1.6 + 0.45 * max(num_routers, 3))
    ax_vio, ax_load = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    extent = (steps[0] - 0.5, steps[-1] + 0.5, num_routers - 0.5, -0.5)
    image = ax_vio.imshow(vio_SR.T, aspect="auto", cmap="magma", extent=extent, interpolation="nearest",
                          vmin=0.0)
    ax_vio.set_yticks(range(num_routers))
    ax_vio.set_yticklabels(router_labels)
    ax_vio.set_xlabel("step")
    ax_vio.set_title("MaxVio per router over time ((max - mean) / mean expert load)")
    fig.colorbar(image, ax=ax_vio, label="MaxVio")
    from matplotlib.colors import TwoSlopeNorm

    # White = exactly the mean load; blue = under-loaded (down to idle, 0), red = overloaded.
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(relative_RE.max())))
    image = ax_load.imshow(relative_RE, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    ax_load.set_yticks(range(num_routers))
    ax_load.set_yticklabels(router_labels)
    ax_load.set_xlabel("routed expert")
    ax_load.set_title(f"expert load / mean load at step {steps[-1]}")
    fig.colorbar(image, ax=ax_load, label="load / mean")
    return _save(fig, path)


def _draw_timeline(ax, bars: Sequence[tuple[int, str, int, int, float, float]], direction_of, pp: int,
                   makespan: float, title: str) -> None:
    """bars: (rank, kind, stage, microbatch, start, end)."""
    from matplotlib.patches import Rectangle

    for rank, kind, stage, microbatch, start, end in bars:
        direction = direction_of(stage)
        ax.add_patch(Rectangle((start, rank - 0.4), end - start, 0.8, facecolor=KIND_COLOURS[kind][direction],
                               edgecolor="black", linewidth=0.3, hatch="///" if direction else None))
        if makespan and (end - start) / makespan > 0.025:
            ax.text((start + end) / 2, rank, str(microbatch), ha="center", va="center", fontsize=6)
    ax.set_xlim(0, max(makespan, 1e-9))
    ax.set_ylim(pp - 0.5, -0.5)
    ax.set_yticks(range(pp))
    ax.set_yticklabels([f"rank {r}" for r in range(pp)])
    ax.set_title(title, fontsize=10)


def format_costs(costs, kinds: set[str] | None = None) -> str:
    """``Costs`` in milliseconds; with ``kinds`` (those measured) only the costs a schedule used."""
    parts = [("F", costs.f), ("B", costs.b), ("W", costs.w), ("F&B", costs.overlapped)]
    if kinds is not None:
        shown = {"F", "B"} | ({"W"} if kinds & {"I", "W"} else set()) | ({"F&B"} if "FB" in kinds else set())
        parts = [(k, v) for k, v in parts if k in shown]
    return ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in parts)


def plot_timelines(measured: Sequence[TimedAction], simulated, schedule, path: Path, *, step: int,
                   bubble: float, title: str) -> Path:
    """Measured timeline of one step (top) above the simulated one with measured mean costs (bottom).

    ``simulated`` is a ``raymoe.schedule.SimResult`` whose costs are in seconds, so both share the time axis.
    """
    from matplotlib.patches import Patch

    pp = schedule.pp

    def direction_of(stage: int) -> int:
        return schedule.placement.info(stage).direction

    measured_bars = [(a.rank, a.kind, a.stage, a.microbatch, a.start, a.end) for a in measured]
    simulated_bars = [(e.rank, e.action.kind.value, e.action.stage, e.action.microbatch, e.start, e.end)
                      for e in simulated.events]
    makespan = max([b[5] for b in measured_bars] + [simulated.makespan])
    fig = _figure(12, 2.2 + 0.9 * pp)
    ax_measured, ax_simulated = fig.subplots(2, 1, sharex=True)
    measured_end = max((b[5] for b in measured_bars), default=0.0)
    _draw_timeline(ax_measured, measured_bars, direction_of, pp, makespan,
                   f"measured, step {step}: makespan {measured_end:.3g} s, mean bubble {bubble:.1%}")
    costs = format_costs(simulated.costs, {a.kind for a in measured})
    sim_bubble = simulated.mean_bubble / simulated.makespan if simulated.makespan > 0 else 0.0
    _draw_timeline(ax_simulated, simulated_bars, direction_of, pp, makespan,
                   f"simulated with the measured mean costs ({costs}): makespan {simulated.makespan:.3g} s, "
                   f"mean bubble {sim_bubble:.1%}")
    ax_simulated.set_xlabel("seconds since step start")
    kinds = sorted({b[1] for b in measured_bars + simulated_bars}, key=list(KIND_COLOURS).index)
    handles = [Patch(facecolor=KIND_COLOURS[k][0], edgecolor="black", label=KIND_LABELS[k]) for k in kinds]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path)
    return path
