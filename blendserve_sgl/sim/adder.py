"""SGLang 0.5.23's admission rule (PrefillAdder, radix cache on, page size 1), for queue pickers.

Walk the ordered queue; the first request that does not fit ends admission. A request fits when

    extend + min(max_new - generated, clip) + 1  <  free + evictable - offset

where extend is its uncached fill, `offset` is what running requests may still write
(`Engine.sglang_offset`: their remaining min(max_new, clip), times the new-token ratio unless
ignore_eos) plus what this step already admitted, and the evictable pages on its own matched
prefix do not count (they get locked). A free request slot and chunked-prefill budget are needed
too; the request that overflows the chunk budget is admitted truncated (a chunked request) and
ends admission. Not modelled: max_prefill_tokens (above the chunk size by default), LoRA,
priorities, the hierarchical cache.

With the engine's `kv_projection` (not in SGLang) a request may also use the pages the
projection (`Engine.kv_horizons`) finds free over its lifetime (its clipped max_new) when that
is more than SGLang's count.
"""

from __future__ import annotations

import bisect
from typing import Iterable, NamedTuple


class Pick(NamedTuple):
    req: object  # a SimRequest
    reserve: int = 0  # KV pages the picker reserves for the request's life (0: none)


def sglang_admit(view, candidates: Iterable, room: float | None = None) -> list[Pick]:
    """`room`: `view.sglang_room()` when the caller has it for this state of the engine."""
    clip = view.config.clip_max_new_tokens
    total = view.sglang_room() if room is None else room
    horizons: list = []
    if view.config.kv_projection:
        forever, pages = view.kv_horizons(int(total))
        total = max(total, forever)
        horizons = [h for h, _ in pages]
    used = 0
    rem_chunk = view.prefill_left
    slots = view.slots_left
    out: list[Pick] = []
    if slots <= 0 or rem_chunk <= 0 or total <= 0:
        return out  # before the first candidate: a picker's order is never built for nothing
    for req in candidates:
        if slots <= 0 or rem_chunk <= 0 or total - used <= 0:
            break
        hit, unlocked = view.cache.probe(req.fill_keys, req.fill_len - 1)
        extend = req.fill_len - hit
        max_new = min(max(req.max_new_tokens - req.gen, 0), clip)
        avail = total
        if horizons:
            i = bisect.bisect_left(horizons, max_new + 1)
            avail = pages[i][1] if i < len(pages) else total
        if extend + max_new + 1 >= avail - used - unlocked:
            break
        used += extend + 1 + max_new + unlocked
        slots -= 1
        out.append(Pick(req))
        if extend >= rem_chunk:
            break  # chunked: it takes the rest of this step's prefill budget
        rem_chunk -= extend
    return out
