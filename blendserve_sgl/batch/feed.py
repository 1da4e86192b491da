"""The bounded feed: what the engine holds at once, and the requests it gets next.

The engine receives requests in plan order through a window of `window_size` requests,
refilled as results return (`runner.generate` keeps the window). The window is sized from the
engine's own capacity: the requests that fit at once (running slots, and KV-pool tokens over
the batch's mean request size), times `FACTOR`, so the scheduler and the `blend` policy always
have several batches' worth to choose from while the driver and the scheduler hold only the
window, whatever the size of the input. A prefix group the window cuts is recomputed once its
prefix was evicted; measured on `bench/million.py`'s corpus (5,000 requests, 32,768-token pool,
about 49 requests fit), the cached-token ratio against all at once was 0.988 at a window of 256,
0.996 at 1,024 and 0.999 at 4,096: hence FACTOR and MIN_WINDOW. `pending(store, order, done)` materializes each
request only when the window takes it.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .prompts import Prepared
from .store import TokenStore

FACTOR = 16  # window = FACTOR x the requests that fit in the engine at once
MIN_WINDOW = 1024
FALLBACK_WINDOW = 4096  # an engine that does not report its capacity


def window_size(kv_tokens: int | None, running: int | None, mean_tokens: float, factor: int = FACTOR) -> int:
    """FACTOR x min(running slots, KV tokens / mean request tokens), at least MIN_WINDOW."""
    fits = []
    if kv_tokens:
        fits.append(kv_tokens / max(1.0, mean_tokens))
    if running:
        fits.append(running)
    if not fits:
        return FALLBACK_WINDOW
    return max(MIN_WINDOW, int(factor * min(fits)))


def engine_capacity(engine) -> tuple[int | None, int | None]:
    """(KV pool tokens, max running requests) the engine reports, None where it does not."""
    try:
        info = engine.get_server_info()
    except Exception:  # noqa: BLE001 (a stand-in engine, or one that cannot answer: use the fallback)
        return None, None
    states = info.get("internal_states") or [{}]
    running = info.get("max_running_requests") or (states[0] or {}).get("max_running_requests")
    return info.get("max_total_num_tokens"), running


def mean_request_tokens(store: TokenStore, done: np.ndarray) -> float:
    """Mean prompt + max_tokens over the requests still to run."""
    todo = ~done
    if not todo.any():
        return 1.0
    return float((store.prompt_lengths()[todo] + store.max_tokens.view[todo]).mean())


def pending(store: TokenStore, order: np.ndarray, done: np.ndarray) -> Iterator[Prepared]:
    """The requests not yet done, in plan order, built one at a time."""
    for i in order[~done[order]].tolist():
        yield store.prepared(i)
