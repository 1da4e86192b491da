"""DFS order of a prefix tree: the order that keeps every shared prefix together (the sharing
baseline). How much sharing an order keeps is measured by the simulator's radix cache
(`sim/cache.py`), the one prefix-cache model of the project."""

from __future__ import annotations

from .tree import ResourceTree


def dfs_order(reference: ResourceTree) -> list:
    """Pure DFS order of the reference tree (children in arrival order): the sharing baseline."""
    return [r.rid for r in reference.iter_requests()]
