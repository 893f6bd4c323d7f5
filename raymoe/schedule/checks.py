"""Prove a schedule runnable: complete, in dependency order, correctly paired and deadlock-free.

``check_schedule`` raises ``ScheduleError`` (a ValueError) with a message naming the rank and action at fault.
The checks, in order:

1. *Placement*: every action names a stage held by its rank and a micro-batch that flows through that stage.
2. *Completeness*: for every stage s and micro-batch m of s, exactly one F, and either exactly one B or exactly one
   I and one W.
3. *Order on each rank*: F(s, m) after its input is available (F(s-1, m) earlier on this rank, or RECV_F(s, m)
   earlier when s-1 lives elsewhere); B/I(s, m) after F(s, m) and after its output gradient is available
   (B/I(s+1, m) here or RECV_B(s, m)); W(s, m) after I(s, m); SEND_F(s, m) after F(s, m), SEND_B(s, m) after
   B/I(s, m); no transfer twice. The two halves of an FB are checked against what ran before the FB.
4. *Pairing*: for each ordered rank pair (a, b), the i-th SEND on a to b and the i-th RECV on b from a name the
   same transfer.
5. *Deadlock freedom* under the strictest executor: a batch (a maximal run of consecutive SEND/RECV actions) is
   posted when the rank reaches it; every operation of a posted batch completes as soon as its peer has posted the
   batch holding the matching operation (sends are rendezvous: they do not complete before the receive is
   posted); the rank stays at the batch until all of its operations completed. If no rank can move and some
   have not finished, the schedule deadlocks and the message lists who waits for whom.

With (3), (4) and (5) every tensor is produced before it is sent and received before it is used, so any executor
that is no stricter than (5) runs the lists to the end.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

from raymoe.schedule.action import Action, Kind, batches_and_computes
from raymoe.schedule.comms import matching, peer_rank
from raymoe.schedule.placement import Placement


class ScheduleError(ValueError):
    """A schedule that is incomplete, out of dependency order, mispaired or deadlocks."""


def check_schedule(schedule) -> None:
    """Run every check on a ``Schedule``; raise ``ScheduleError`` at the first failure."""
    actions, placement, n = schedule.actions, schedule.placement, schedule.num_microbatches
    check_placement(actions, placement, n)
    check_completeness(actions, placement, n)
    for rank in sorted(actions):
        check_rank_order(rank, actions[rank], placement)
    check_pairing(actions, placement)
    blocked = find_deadlock(actions, placement)
    if blocked:
        raise ScheduleError("deadlock: " + "; ".join(blocked))


def check_placement(actions: Mapping[int, Sequence[Action]], placement: Placement, n: int) -> None:
    for rank, acts in actions.items():
        for a in acts:
            for part in a.parts():
                if not 0 <= part.stage < placement.num_stages:
                    raise ScheduleError(f"rank {rank}: {a} names stage {part.stage}, but the placement has "
                                        f"stages 0..{placement.num_stages - 1}")
                if placement.rank_of(part.stage) != rank:
                    raise ScheduleError(f"rank {rank}: {a} names stage {part.stage}, which lives on rank "
                                        f"{placement.rank_of(part.stage)} (rank {rank} holds "
                                        f"{list(placement.stages_of(rank))})")
                mbs = placement.microbatches_of(part.stage, n)
                if part.microbatch not in mbs:
                    raise ScheduleError(f"rank {rank}: {a} names micro-batch {part.microbatch}, but stage "
                                        f"{part.stage} carries micro-batches {mbs.start}..{mbs.stop - 1}")
            if a.is_comm:
                try:
                    peer = peer_rank(a, placement)
                except ValueError as exc:
                    raise ScheduleError(f"rank {rank}: {exc}") from exc
                if peer == rank:
                    raise ScheduleError(f"rank {rank}: {a} sends to its own rank; stages on one rank hand "
                                        f"tensors over in memory, without SEND/RECV")


def check_completeness(actions: Mapping[int, Sequence[Action]], placement: Placement, n: int) -> None:
    counts: Counter[tuple[Kind, int, int]] = Counter()
    for acts in actions.values():
        for a in acts:
            for part in a.parts():
                counts[part.kind, part.stage, part.microbatch] += 1
    for s in range(placement.num_stages):
        for m in placement.microbatches_of(s, n):
            f, b, i, w = (counts[k, s, m] for k in (Kind.F, Kind.B, Kind.I, Kind.W))
            where = f"stage {s} (rank {placement.rank_of(s)}), micro-batch {m}"
            if f != 1:
                raise ScheduleError(f"{where}: expected exactly one F, found {f}")
            if not ((b, i, w) == (1, 0, 0) or (b, i, w) == (0, 1, 1)):
                raise ScheduleError(f"{where}: expected one B, or one I and one W; found B x{b}, I x{i}, W x{w}")


def check_rank_order(rank: int, acts: Sequence[Action], placement: Placement) -> None:
    done: set[tuple[Kind, int, int]] = set()  # (F | B | I | W | SEND_* | RECV_*, stage, micro-batch)

    def has(kind: Kind, stage: int, mb: int) -> bool:
        return (kind, stage, mb) in done

    def backward_done(stage: int, mb: int) -> bool:
        return has(Kind.B, stage, mb) or has(Kind.I, stage, mb)

    for pos, a in enumerate(acts):
        for part in a.parts():
            s, m, info = part.stage, part.microbatch, placement.info(part.stage)
            missing = None
            if part.kind is Kind.F and info.prev_stage is not None:
                local = placement.rank_of(info.prev_stage) == rank
                if local and not has(Kind.F, info.prev_stage, m):
                    missing = f"{info.prev_stage}F{m}"
                elif not local and not has(Kind.RECV_F, s, m):
                    missing = f"{s}RECV_F{m}"
            elif part.kind in (Kind.B, Kind.I):
                if not has(Kind.F, s, m):
                    missing = f"{s}F{m}"
                elif info.next_stage is not None:
                    local = placement.rank_of(info.next_stage) == rank
                    if local and not backward_done(info.next_stage, m):
                        missing = f"the backward of stage {info.next_stage}, micro-batch {m}"
                    elif not local and not has(Kind.RECV_B, s, m):
                        missing = f"{s}RECV_B{m}"
            elif part.kind is Kind.W and not has(Kind.I, s, m):
                missing = f"{s}I{m}"
            elif part.kind is Kind.SEND_F and not has(Kind.F, s, m):
                missing = f"{s}F{m}"
            elif part.kind is Kind.SEND_B and not backward_done(s, m):
                missing = f"the backward {s}I{m} or {s}B{m}"
            if missing:
                raise ScheduleError(f"rank {rank}, action #{pos} {a}: needs {missing} earlier on rank {rank}")
            if part.is_comm and has(part.kind, s, m):
                raise ScheduleError(f"rank {rank}, action #{pos} {a}: this transfer already happened")
        for part in a.parts():
            done.add((part.kind, part.stage, part.microbatch))


def check_pairing(actions: Mapping[int, Sequence[Action]], placement: Placement) -> None:
    sends: dict[tuple[int, int], list[Action]] = defaultdict(list)
    recvs: dict[tuple[int, int], list[Action]] = defaultdict(list)
    for rank in sorted(actions):
        for a in actions[rank]:
            if a.is_comm:
                peer = peer_rank(a, placement)
                if a.kind.is_send:
                    sends[rank, peer].append(a)
                else:
                    recvs[peer, rank].append(a)
    for src, dst in sorted(set(sends) | set(recvs)):
        out, into = sends[src, dst], recvs[src, dst]
        for i in range(max(len(out), len(into))):
            send = out[i] if i < len(out) else None
            recv = into[i] if i < len(into) else None
            if send is None or recv is None or matching(send, placement) != recv:
                raise ScheduleError(
                    f"send/receive mismatch between rank {src} and rank {dst}: rank {src}'s send #{i} to rank "
                    f"{dst} is {send or 'missing'}, rank {dst}'s receive #{i} from rank {src} is "
                    f"{recv or 'missing'}; point-to-point operations pair up in posting order")


def find_deadlock(actions: Mapping[int, Sequence[Action]], placement: Placement) -> list[str]:
    """Run the strict rendezvous model (module docstring, check 5); return who blocks on whom, or []."""
    segments = {r: batches_and_computes(actions[r]) for r in actions}
    # For each comm op: the rank and segment index holding its partner (pairing is already checked).
    where: dict[tuple[int, Action], int] = {}
    for r, segs in segments.items():
        for k, seg in enumerate(segs):
            if isinstance(seg, list):
                for op in seg:
                    where[r, op] = k
    position = {r: 0 for r in segments}
    progress = True
    while progress:
        progress = False
        for r, segs in segments.items():
            while position[r] < len(segs):
                seg = segs[position[r]]
                if isinstance(seg, list) and _waiting_on(r, seg, where, position, placement):
                    break
                position[r] += 1
                progress = True
    blocked = []
    for r, segs in segments.items():
        if position[r] < len(segs):
            waits = _waiting_on(r, segs[position[r]], where, position, placement)
            blocked.append(f"rank {r} waits in batch [{', '.join(map(str, segs[position[r]]))}] for "
                           + ", ".join(f"rank {p} to post {op}" for p, op in waits))
    return blocked


def _waiting_on(rank, batch, where, position, placement) -> list[tuple[int, Action]]:
    waits = []
    for op in batch:
        peer, partner = peer_rank(op, placement), matching(op, placement)
        if position[peer] < where[peer, partner]:  # the peer has not reached the partner's batch yet
            waits.append((peer, partner))
    return waits
