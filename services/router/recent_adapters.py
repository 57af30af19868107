"""The adapters this router's recent requests ran with, for warming a node that joins.

When a node becomes healthy (joins, or comes back), rendezvous hashing makes it the home of
some adapters, and their next requests there would wait for the Registry download. The
router cannot know every tenant's deployments without resolving them all on each join, but
it knows what its own traffic used: those are the adapters worth warming (prefetch.py).

Recorded where requests are placed (proxy.py), so it must cost next to nothing: a plain dict
in least-recently-used order (re-inserting a key moves it to the end), a few dict operations
per request, no Registry call and no lock (one event loop).
"""

from __future__ import annotations

from services.router.resolution import Target

#: Distinct (adapter id, sha256, base model) remembered: beyond it the least recently used go.
#: A join warms at most this many adapters, all on the one node (bounded by its host tier anyway).
MAX_REMEMBERED = 4096


class RecentAdapters:
    def __init__(self, max_remembered: int = MAX_REMEMBERED) -> None:
        self.max_remembered = max_remembered
        #: (adapter id, sha256, base model) -> the last Target that used it, oldest use first.
        self._used: dict[tuple[str, str, str], Target] = {}

    def record(self, target: Target) -> None:
        if not target.adapter_id:  # a base model needs no warming
            return
        key = (target.adapter_id, target.adapter_sha256, target.base_model)
        self._used.pop(key, None)  # re-inserted below: now the most recently used
        self._used[key] = target
        if len(self._used) > self.max_remembered:
            del self._used[next(iter(self._used))]

    def targets(self, base_model: str) -> list[Target]:
        """The remembered adapters of `base_model`, most recently used first (warmed first)."""
        return [t for t in reversed(self._used.values()) if t.base_model == base_model]

    def __len__(self) -> int:
        return len(self._used)
