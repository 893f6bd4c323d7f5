"""Per-rank timeline picture of a simulated schedule, in the style of the DeepSeek-V3 report's Figure 5.

One row per rank, time to the right. Colours by kind (forward orange, backward green, backward-for-input light
green, backward-for-weights blue, an overlapped F&B chunk split orange | green), the number in a cell is the
micro-batch, white is idle. Stages of direction 1 (DualPipe's reverse copy, the way back up DualPipeV's V) are
drawn darker and hatched, so the two directions can be told apart without colour.

matplotlib is imported inside ``plot_timeline`` (the schedule package is standard-library only), through its
object API (``Figure`` + Agg canvas) so no global pyplot state is touched.
"""

from __future__ import annotations

from pathlib import Path

from raymoe.schedule.action import Kind

# kind -> (direction 0 colour, direction 1 colour)
_COLOURS = {
    Kind.F: ("#f5a623", "#c0780a"),
    Kind.B: ("#7ed321", "#4d8f12"),
    Kind.I: ("#b8e986", "#86b85a"),
    Kind.W: ("#6aa9ea", "#2f6db3"),
}
_LABELS = {Kind.F: "forward (F)", Kind.B: "backward (B)", Kind.I: "backward for input (I)",
           Kind.W: "backward for weights (W)"}


def plot_timeline(schedule, result, path: str | Path, *, title: str | None = None) -> Path:
    """Draw ``result`` (a ``SimResult`` of ``schedule``) to a PNG at ``path``; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    placement, costs = schedule.placement, result.costs
    makespan = max(result.makespan, 1e-9)
    width_in = min(max(8.0, makespan * 0.22), 48.0)
    fig = Figure(figsize=(width_in, 1.5 + 0.45 * schedule.pp), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    # Label a cell only when a digit or two fits in it.
    units_per_inch = makespan / (width_in * 0.85)
    label_cells = units_per_inch * 0.16 <= min(x for x in (costs.f, costs.i or costs.b, costs.w or costs.f) if x)

    def cell(x0: float, dur: float, rank: int, kind: Kind, stage: int, mb: int) -> None:
        direction = placement.info(stage).direction
        ax.add_patch(Rectangle((x0, rank - 0.4), dur, 0.8, facecolor=_COLOURS[kind][direction],
                               edgecolor="black", linewidth=0.4, hatch="///" if direction else None))
        if label_cells and dur > 0:
            ax.text(x0 + dur / 2, rank, str(mb), ha="center", va="center", fontsize=7,
                    color="white" if direction else "black")

    for ev in result.events:
        dur = ev.end - ev.start
        a = ev.action
        if a.kind is Kind.FB:
            # Split the overlapped chunk in proportion to its halves' stand-alone costs.
            f_part = dur * costs.f / (costs.f + costs.b) if costs.f + costs.b else dur / 2
            cell(ev.start, f_part, ev.rank, Kind.F, a.stage, a.microbatch)
            cell(ev.start + f_part, dur - f_part, ev.rank, Kind.B, a.b_stage, a.b_microbatch)
            ax.add_patch(Rectangle((ev.start, ev.rank - 0.4), dur, 0.8, fill=False, edgecolor="black",
                                   linewidth=1.6))
        else:
            cell(ev.start, dur, ev.rank, a.kind, a.stage, a.microbatch)

    ax.set_xlim(0, makespan)
    ax.set_ylim(schedule.pp - 0.5, -0.5)
    ax.set_yticks(range(schedule.pp))
    ax.set_yticklabels([f"rank {r}" for r in range(schedule.pp)])
    ax.set_xlabel("time")
    used = {k for ev in result.events for k in (p.kind for p in ev.action.parts())}
    handles = [Patch(facecolor=_COLOURS[k][0], edgecolor="black", label=_LABELS[k]) for k in _COLOURS if k in used]
    if any(ev.action.kind is Kind.FB for ev in result.events):
        handles.append(Patch(facecolor="white", edgecolor="black", linewidth=1.6, label="overlapped F&B (framed)"))
    if any(s.direction for s in placement.stages):
        handles.append(Patch(facecolor="#999999", edgecolor="black", hatch="///",
                             label="reverse direction" if placement.num_copies == 2 else "V's way back"))
    height_in = fig.get_figheight()
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    ax.set_title(title or (f"{schedule.name}: pp={schedule.pp}, {schedule.num_microbatches} micro-batches, "
                           f"{costs}  |  makespan {result.makespan:g}, bubble {result.bubble:g}"), fontsize=10)
    fig.tight_layout(rect=(0, 0.35 / height_in, 1, 1))  # leave a strip at the bottom for the legend
    path = Path(path)
    fig.savefig(path)
    return path
