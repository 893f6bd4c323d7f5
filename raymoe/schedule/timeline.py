"""Per-rank timeline picture of a simulated schedule, in the style of the DeepSeek-V3 report's Figure 5.

One row per rank, time to the right. Colours by kind (forward orange, backward green, backward-for-input light
green, backward-for-weights blue, an overlapped F&B chunk split orange | green), the number in a cell is the
micro-batch, white is idle. Stages of direction 1 (DualPipe's reverse copy, the way back up DualPipeV's V) are
drawn darker and hatched, so the two directions can be told apart without colour.

With ``lanes`` (a ``raymoe.schedule.phases.PhasedCosts``) each rank gets a thin all-to-all lane under its compute
row, like the report's Figure 4: a chunk's compute segments in the row (an overlapped pair's turns alternating
forward / backward), its expert exchanges in the lane (purple: a forward's dispatch/combine, teal: a backward's),
so what runs under what is visible.

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
_A2A_COLOURS = {"F": "#8e44ad", "B": "#17a589"}


def plot_timeline(schedule, result, path: str | Path, *, title: str | None = None, lanes=None) -> Path:
    """Draw ``result`` (a ``SimResult`` of ``schedule``) to a PNG at ``path``; returns the path. ``lanes``: the
    ``PhasedCosts`` the result was simulated with, to draw compute phases and all-to-all lanes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    placement, costs = schedule.placement, result.costs
    makespan = max(result.makespan, 1e-9)
    width_in = min(max(8.0, makespan * 0.22), 48.0)
    legend_rows = 2 if lanes is not None and width_in < 14 else 1
    fig = Figure(figsize=(width_in, 1.5 + 0.45 * schedule.pp + 0.25 * (legend_rows - 1)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    # Label a cell only when a digit or two fits in it.
    units_per_inch = makespan / (width_in * 0.85)
    label_cells = units_per_inch * 0.16 <= min(x for x in (costs.f, costs.i or costs.b, costs.w or costs.f) if x)

    row = (-0.4, 0.8) if lanes is None else (-0.42, 0.56)  # (top offset, height) of the compute row

    def cell(x0: float, dur: float, rank: int, kind: Kind, stage: int, mb: int, *, label: bool = True) -> None:
        direction = placement.info(stage).direction
        ax.add_patch(Rectangle((x0, rank + row[0]), dur, row[1], facecolor=_COLOURS[kind][direction],
                               edgecolor="black", linewidth=0.4, hatch="///" if direction else None))
        if label and label_cells and dur > 0:
            ax.text(x0 + dur / 2, rank + row[0] + row[1] / 2, str(mb), ha="center", va="center", fontsize=7,
                    color="white" if direction else "black")

    def phased(ev) -> None:
        halves = {p.kind: p for p in ev.action.parts()}
        for seg in lanes.segments[ev.action]:
            part = ev.action if ev.action.kind is not Kind.FB else halves[Kind.F if seg.part == "F" else Kind.B]
            x0, dur = ev.start + seg.start, seg.end - seg.start
            if seg.lane == "compute":
                cell(x0, dur, ev.rank, part.kind, part.stage, part.microbatch, label=False)
            else:
                ax.add_patch(Rectangle((x0, ev.rank + 0.18), dur, 0.24, facecolor=_A2A_COLOURS[seg.part],
                                       edgecolor="black", linewidth=0.3))
        a = ev.action
        text = f"{a.microbatch}&{a.b_microbatch}" if a.kind is Kind.FB else str(a.microbatch)
        if units_per_inch * 0.09 * len(text) <= ev.end - ev.start:
            ax.text((ev.start + ev.end) / 2, ev.rank + row[0] + row[1] / 2, text, ha="center", va="center",
                    fontsize=6)
        if ev.action.kind is Kind.FB:
            ax.add_patch(Rectangle((ev.start, ev.rank + row[0]), ev.end - ev.start, row[1], fill=False,
                                   edgecolor="black", linewidth=1.6))

    for ev in result.events:
        if lanes is not None:
            phased(ev)
            continue
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
    if lanes is not None:
        handles += [Patch(facecolor=_A2A_COLOURS["F"], edgecolor="black", label="all-to-all of a forward"),
                    Patch(facecolor=_A2A_COLOURS["B"], edgecolor="black", label="all-to-all of a backward")]
    if any(s.direction for s in placement.stages):
        handles.append(Patch(facecolor="#999999", edgecolor="black", hatch="///",
                             label="reverse direction" if placement.num_copies == 2 else "V's way back"))
    height_in = fig.get_figheight()
    fig.legend(handles=handles, loc="lower center", ncol=-(-len(handles) // legend_rows), fontsize=8, frameon=False)
    ax.set_title(title or (f"{schedule.name}: pp={schedule.pp}, {schedule.num_microbatches} micro-batches, "
                           f"{costs}  |  makespan {result.makespan:g}, bubble {result.bubble:g}"), fontsize=10)
    # leave a strip at the bottom for the legend
    fig.tight_layout(rect=(0, (0.1 + 0.25 * legend_rows) / height_in, 1, 1))
    path = Path(path)
    fig.savefig(path)
    return path
