"""Union-find over a function's top-level ops, for the fusion passes that group in one sweep in
program order (fuse-elementwise, fuse-reduction): each root holds its ops and whether the group
is still open (may grow). A pass keeps its own per-root facts by overriding `_merged`."""
from __future__ import annotations

from .graph import Op


class OpGroups:
    def __init__(self):
        self.parent: dict[int, int] = {}
        self.ops: dict[int, list[Op]] = {}
        self.open: dict[int, bool] = {}

    def new(self, i: int, op: Op) -> None:
        self.parent[i] = i
        self.ops[i] = [op]
        self.open[i] = True

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> int:
        """Merges the groups of roots a and b; returns the surviving root (the one with more ops,
        a on a tie), so moving the shorter op list keeps a sweep linear."""
        if a == b:
            return a
        if len(self.ops[b]) > len(self.ops[a]):
            a, b = b, a
        self.ops[a].extend(self.ops.pop(b))
        self.parent[b] = a
        del self.open[b]
        self._merged(a, b)
        return a

    def _merged(self, root: int, gone: int) -> None:
        """Hook: `gone` was merged into `root`; move or drop the pass's facts of `gone`."""

    def in_program_order(self, func, roots) -> list[list[Op]]:
        """The groups of `roots`, each in program order, ordered by their first op."""
        pos = {id(op): k for k, op in enumerate(func.ops)}
        groups = [sorted(self.ops[r], key=lambda o: pos[id(o)]) for r in roots]
        groups.sort(key=lambda ops: pos[id(ops[0])])
        return groups
