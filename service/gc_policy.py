"""The garbage collector of a serving process: collect rarely, and never scan what lives for ever.

CPython's cyclic collector runs whenever tracked objects allocated minus freed pass a threshold (700 by
default). Nearly everything a request allocates is freed by reference counting when it ends, but while
it is in flight it holds tracked objects (scope, coroutines, parsed JSON, pydantic models, futures).
With a hundred requests in flight, the count passes 700 many times a second: each time the collector
scans every young object, promotes the live requests' objects, and those promotions then trigger the
older generations' collections, and now and then a full one over every module, route and schema. On the
2-core machine that was 11% of the event loop's time at capacity and 15% at 8x it, and the event loop
is the part of the server that saturates (bench/BENCHMARKS.md, figure 5).

So a serving process freezes what exists once it is built (modules, the app, its routes: it lives as long
as the process, and ``gc.freeze`` takes it out of every future scan) and raises the first threshold above
what the requests in flight hold, so that collections run when garbage accumulates, not when load does.
Cycles are still collected, only less often: memory held by cyclic garbage stays bounded by the threshold.
"""

from __future__ import annotations

import gc

# Tracked objects allocated (net of those freed) before a young collection: above what the requests in
# flight hold at once. Measured with 128 in flight on the tiny model: 731 young collections in 15 s at
# 700, 3 at 10,000. The older generations keep CPython's ratios.
GEN0_THRESHOLD = 10_000


def tune_for_serving() -> None:
    """Call once the app is built, before serving: freeze what exists, and collect rarely from then on."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
