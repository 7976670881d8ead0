"""PyTorch's CUDA caching allocator, replayed: what a trace's allocations cost on a real GPU.

A trace knows the bytes of every tensor and when it lives; the GPU's own numbers also depend on
how the caching allocator serves them (c10/cuda/CUDACachingAllocator.cpp, default settings):

- requests are rounded up to 512 bytes;
- requests of 1 MiB or less come from 2 MiB segments (the small pool), larger ones from the
  large pool: 20 MiB segments for requests under 10 MiB, else a segment of the request rounded
  up to 2 MiB;
- a request takes the smallest free cached block that holds it (best fit, then lowest address),
  which is split when the rest is worth keeping (512 bytes in the small pool, more than 1 MiB in
  the large one); an unsplit block counts whole in `memory_allocated`;
- freed blocks merge with free neighbours and stay cached (reserved), until a cudaMalloc fails:
  then every wholly free segment is released and the cudaMalloc tried once more before PyTorch
  reports out of memory.

`replay` runs a trace's events through this model and gives the peaks that
`torch.cuda.max_memory_allocated` and `max_memory_reserved` would report, and, for a device of
a given size, whether and where the run would run out of memory.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

MIB = 2**20
ROUND = 512  # kMinBlockSize: every request is rounded up to this
SMALL_REQUEST = 1 * MIB  # kSmallSize: requests up to this come from the small pool
SMALL_SEGMENT = 2 * MIB  # kSmallBuffer
MEDIUM_SEGMENT = 20 * MIB  # kLargeBuffer, for requests under kMinLargeAlloc
MIN_LARGE_ALLOC = 10 * MIB  # kMinLargeAlloc
LARGE_ROUND = 2 * MIB  # kRoundLarge

#: One event of a trace: ("alloc", key, bytes) or ("free", key, 0), in the order they happened.
Event = tuple[str, int, int]


def round_size(nbytes: int) -> int:
    """The allocator's rounding of a request."""
    return max(ROUND, -(-nbytes // ROUND) * ROUND)


def segment_size(size: int) -> int:
    """The size of the segment cudaMalloc'd for a (rounded) request that no cached block fits."""
    if size <= SMALL_REQUEST:
        return SMALL_SEGMENT
    if size < MIN_LARGE_ALLOC:
        return MEDIUM_SEGMENT
    return -(-size // LARGE_ROUND) * LARGE_ROUND


@dataclass(eq=False)
class _Block:
    """A piece of a segment, free or handed out; neighbours in the same segment are linked."""

    address: int
    size: int
    small: bool
    allocated: bool = False
    prev: _Block | None = None
    next: _Block | None = None

    @property
    def whole_segment(self) -> bool:
        return self.prev is None and self.next is None


class GpuOutOfMemory(Exception):
    """The modelled device has no room for a request, even after releasing cached segments."""

    def __init__(self, request: int, allocated: int, reserved: int) -> None:
        super().__init__(f"out of memory at a request of {request} bytes")
        self.request, self.allocated, self.reserved = request, allocated, reserved


@dataclass
class CachingAllocator:
    """The allocator's state: cached free blocks per pool, the bytes handed out and reserved.

    `capacity` is the memory cudaMalloc can give (None: unlimited)."""

    capacity: int | None = None
    allocated: int = 0
    reserved: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    _free: dict[bool, list[tuple[int, int, int]]] = field(
        default_factory=lambda: {True: [], False: []})
    _blocks: dict[int, _Block] = field(default_factory=dict)  # id(block) -> block, for _free
    _live: dict[int, _Block] = field(default_factory=dict)  # trace key -> its block
    _addresses: itertools.count[int] = field(default_factory=lambda: itertools.count(0, 1 << 40))

    def malloc(self, key: int, nbytes: int) -> None:
        """Serve request `key` of `nbytes`, as the allocator would."""
        size = round_size(nbytes)
        small = size <= SMALL_REQUEST
        block = self._take_free(size, small) or self._new_segment(size, small)
        if block.size - size >= (ROUND if small else SMALL_REQUEST + 1):
            rest = _Block(block.address + size, block.size - size, small, prev=block,
                          next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next, block.size = rest, size
            self._cache(rest)
        block.allocated = True
        self._live[key] = block
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)

    def free(self, key: int) -> None:
        """Give request `key`'s block back: it merges with free neighbours and stays cached."""
        block = self._live.pop(key, None)
        if block is None:
            return
        block.allocated = False
        self.allocated -= block.size
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.allocated:
                self._uncache(neighbour)
                if neighbour is block.prev:
                    neighbour.size += block.size
                    neighbour.next = block.next
                    if block.next is not None:
                        block.next.prev = neighbour
                    block = neighbour
                else:
                    block.size += neighbour.size
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
        self._cache(block)

    def _take_free(self, size: int, small: bool) -> _Block | None:
        pool = self._free[small]
        index = bisect.bisect_left(pool, (size, -1, -1))
        if index == len(pool):
            return None
        _, _, block_id = pool.pop(index)
        return self._blocks.pop(block_id)

    def _new_segment(self, size: int, small: bool) -> _Block:
        nbytes = segment_size(size)
        if self.capacity is not None and self.reserved + nbytes > self.capacity:
            self._release_cached()
            if self.reserved + nbytes > self.capacity:
                raise GpuOutOfMemory(size, self.allocated, self.reserved)
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return _Block(next(self._addresses), nbytes, small)

    def _release_cached(self) -> None:
        """What PyTorch does when cudaMalloc fails: give back every wholly free segment."""
        for small in (True, False):
            for entry in [e for e in self._free[small] if self._blocks[e[2]].whole_segment]:
                self._free[small].remove(entry)
                self.reserved -= self._blocks.pop(entry[2]).size

    def _cache(self, block: _Block) -> None:
        self._blocks[id(block)] = block
        bisect.insort(self._free[block.small], (block.size, block.address, id(block)))

    def _uncache(self, block: _Block) -> None:
        self._free[block.small].remove((block.size, block.address, id(block)))
        del self._blocks[id(block)]


@dataclass(frozen=True)
class Replay:
    """What the allocator reports after a trace: peaks, and where the run ran out of memory
    (the index of the event that failed), if it did."""

    peak_allocated: int
    peak_reserved: int
    peak_at: int = 0  # the event at which the allocated peak was reached
    out_of_memory_at: int | None = None

    @property
    def fits(self) -> bool:
        return self.out_of_memory_at is None


def replay(events: Iterable[Event], capacity: int | None = None) -> Replay:
    """Run a trace's events through the allocator model on a device of `capacity` bytes."""
    allocator = CachingAllocator(capacity)
    peak_at = 0
    for index, (kind, key, nbytes) in enumerate(events):
        try:
            if kind == "alloc":
                allocator.malloc(key, nbytes)
                if allocator.allocated == allocator.peak_allocated:
                    peak_at = index
            else:
                allocator.free(key)
        except GpuOutOfMemory:
            return Replay(allocator.peak_allocated, allocator.peak_reserved, peak_at, index)
    return Replay(allocator.peak_allocated, allocator.peak_reserved, peak_at)
