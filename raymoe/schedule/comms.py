"""Derive the SEND/RECV actions of a schedule from its compute order.

Generators only decide the order of computations on each rank; this module adds the point-to-point
communication, so that no generator weaves P2P calls into its schedule logic. The rule:

* a receive is posted just before the compute that consumes it, so a rank never waits for data earlier than it
  needs it;
* a send is posted as soon as possible after the compute that produced its tensor, *in the order in which the
  receiving rank posts the matching receives*. That order is what pairs the i-th send with the i-th receive of
  each rank pair (NCCL matches point-to-point operations by order, not by tag); when two tensors for the same
  peer are produced in the other order, the earlier-produced one waits for the later one.

The sends emitted after compute k and the receives of compute k+1 sit next to each other: one batch.

Posting receives that late can deadlock an executor whose sends block until the peer posts the receive (NCCL's
rendezvous; ``checks.py`` proves freedom from deadlock under exactly that model): rank a sits in a batch whose
send to rank b is unmatched, while b sits in an earlier batch waiting for something a sends only later. So the
lists are run under that model, and whenever every unfinished rank is stuck, each receive that a stuck send is
waiting for moves into the batch its rank is stuck in (a *prefetch*, as deepseek-ai/DualPipe posts some
receives one chunk early). The moved receive completes at once, since its send is already posted, so neither
rank waits longer than before. Sends never move. A deadlock that remains is a real dependency cycle between
the compute orders, and ``checks.check_schedule`` reports it.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Mapping, Sequence

from raymoe.schedule.action import Action, Kind, act, batches_and_computes
from raymoe.schedule.placement import Placement

# kind -> (its partner's kind, whether the peer is the next stage (else the previous one))
_PARTNER = {
    Kind.SEND_F: (Kind.RECV_F, True), Kind.RECV_B: (Kind.SEND_B, True),
    Kind.RECV_F: (Kind.SEND_F, False), Kind.SEND_B: (Kind.RECV_B, False),
}


def _neighbour(action: Action, placement: Placement) -> int:
    if action.kind not in _PARTNER:
        raise ValueError(f"{action} is not a communication action")
    info = placement.info(action.stage)
    towards_next = _PARTNER[action.kind][1]
    neighbour = info.next_stage if towards_next else info.prev_stage
    if neighbour is None:
        raise ValueError(f"{action}: stage {action.stage} has no {'next' if towards_next else 'previous'} stage")
    return neighbour


def peer_rank(action: Action, placement: Placement) -> int:
    """The rank on the other end of a SEND/RECV action."""
    return placement.rank_of(_neighbour(action, placement))


def matching(action: Action, placement: Placement) -> Action:
    """The action on the peer rank that pairs with a SEND/RECV action (0SEND_F3 <-> 1RECV_F3, 1SEND_B3 <-> 0RECV_B3)."""
    return Action(kind=_PARTNER[action.kind][0], stage=_neighbour(action, placement), microbatch=action.microbatch)


def needed_receives(action: Action, rank: int, placement: Placement) -> list[Action]:
    """RECV actions a compute action needs when its input or output-gradient comes from another rank."""
    out = []
    for part in action.parts():
        info = placement.info(part.stage)
        if part.kind is Kind.F and info.prev_stage is not None and placement.rank_of(info.prev_stage) != rank:
            out.append(act(Kind.RECV_F, part.stage, part.microbatch))
        if part.kind in (Kind.B, Kind.I) and info.next_stage is not None \
                and placement.rank_of(info.next_stage) != rank:
            out.append(act(Kind.RECV_B, part.stage, part.microbatch))
    return out


def produced_sends(action: Action, rank: int, placement: Placement) -> list[Action]:
    """SEND actions owed after a compute action whose output or input-gradient goes to another rank."""
    out = []
    for part in action.parts():
        info = placement.info(part.stage)
        if part.kind is Kind.F and info.next_stage is not None and placement.rank_of(info.next_stage) != rank:
            out.append(act(Kind.SEND_F, part.stage, part.microbatch))
        if part.kind in (Kind.B, Kind.I) and info.prev_stage is not None \
                and placement.rank_of(info.prev_stage) != rank:
            out.append(act(Kind.SEND_B, part.stage, part.microbatch))
    return out


def add_communication(compute: Mapping[int, Sequence[Action]], placement: Placement) -> dict[int, tuple[Action, ...]]:
    """Interleave SEND/RECV batches into compute-only action lists (see the module docstring)."""
    for rank, actions in compute.items():
        comm = [a for a in actions if a.is_comm]
        if comm:
            raise ValueError(f"rank {rank}'s list already has communication actions ({comm[0]}); "
                             f"add_communication takes compute-only lists")
    recvs = {r: [needed_receives(a, r, placement) for a in compute[r]] for r in compute}
    # The order in which each destination receives from each source = the order sends must be posted in.
    send_order: dict[tuple[int, int], deque[Action]] = defaultdict(deque)
    for dst in sorted(compute):
        for batch in recvs[dst]:
            for recv in batch:
                send = matching(recv, placement)
                send_order[placement.rank_of(send.stage), dst].append(send)
    lazy = {r: _interleave(r, compute[r], recvs[r], send_order, placement) for r in sorted(compute)}
    return _prefetch_blocked_receives(lazy, placement)


def _interleave(rank, actions, recvs, send_order, placement) -> tuple[Action, ...]:
    out: list[Action] = []
    ready: list[Action] = []  # produced, not yet sent, in production order
    for k, action in enumerate(actions):
        out.extend(recvs[k])
        out.append(action)
        ready.extend(produced_sends(action, rank, placement))
        out.extend(_emit_in_order(rank, ready, send_order, placement))
    if ready:
        raise ValueError(f"rank {rank}: sends {[str(a) for a in ready]} have no matching receive on the peer")
    # Sends after compute k and the receives of compute k+1 sit next to each other: one batch.
    return tuple(out)


def _emit_in_order(rank, ready, send_order, placement) -> list[Action]:
    emitted = []
    progress = True
    while progress:
        progress = False
        for send in list(ready):
            queue = send_order[rank, peer_rank(send, placement)]
            if queue and queue[0] == send:
                queue.popleft()
                ready.remove(send)
                emitted.append(send)
                progress = True
    return emitted



def _prefetch_blocked_receives(actions: dict[int, tuple[Action, ...]], placement: Placement,
                               ) -> dict[int, tuple[Action, ...]]:
    """Run the rendezvous model; whenever every rank is stuck, prefetch the receives stuck sends wait for."""
    segs = {r: batches_and_computes(acts) for r, acts in actions.items()}
    position = dict.fromkeys(segs, 0)
    while True:
        where = _batch_indices(segs)
        _advance(segs, position, where, placement)
        stuck_sends = [op for r in segs if position[r] < len(segs[r])
                       for op in _unmatched(r, segs, position, where, placement) if op.kind.is_send]
        if not stuck_sends:
            break  # done, or a dependency cycle that check_schedule will name
        for send in stuck_sends:
            recv, peer = matching(send, placement), peer_rank(send, placement)
            k = _batch_indices({peer: segs[peer]})[recv]
            segs[peer][k].remove(recv)
            segs[peer][position[peer]].append(recv)  # the peer is stuck in this batch; the data is posted
            if not segs[peer][k]:
                del segs[peer][k]
    return {r: tuple(a for seg in rank_segs for a in (seg if isinstance(seg, list) else [seg]))
            for r, rank_segs in segs.items()}


def _batch_indices(segs) -> dict[Action, int]:
    """Each SEND/RECV action -> the index of the batch holding it in its rank's segment list."""
    return {op: k for rank_segs in segs.values() for k, seg in enumerate(rank_segs)
            if isinstance(seg, list) for op in seg}


def _advance(segs, position, where, placement) -> None:
    """Move every rank forward until each is finished or stuck in a batch with an unmatched operation."""
    progress = True
    while progress:
        progress = False
        for r, rank_segs in segs.items():
            while position[r] < len(rank_segs) and not _unmatched(r, segs, position, where, placement):
                position[r] += 1
                progress = True


def _unmatched(r, segs, position, where, placement) -> list[Action]:
    """Operations of rank r's current batch whose partner the peer has not posted yet ([] at a compute)."""
    seg = segs[r][position[r]]
    if not isinstance(seg, list):
        return []
    return [op for op in seg if position[peer_rank(op, placement)] < where[matching(op, placement)]]
