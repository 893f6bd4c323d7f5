"""Parallelism applied from outside the model: topology, stage plan, process groups, P2P, expert dispatch and the
executor. Import the modules themselves (``raymoe.parallel.executor`` ...): this package's own import stays pure
Python (the topology), so the torch-free planner can use the same rank and group rules.

Nothing here imports Ray; ``raymoe.runtime`` runs these pieces inside actors.
"""

from raymoe.parallel.topology import Coord, Topology

__all__ = ["Coord", "Topology"]
