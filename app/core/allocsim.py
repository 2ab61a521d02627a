"""A small replica of PyTorch's CUDA caching allocator, to turn a tensor trace into reserved bytes.

It follows c10/cuda/CUDACachingAllocator.cpp (torch 2.x, default settings): requests round up to
512 bytes; requests of at most 1 MiB come from a small pool of 2 MiB segments (approximated here by
their total, rounded up to whole segments); larger requests take the best-fitting free block
(smallest size, then lowest address), split it when more than 1 MiB would remain (`should_split`),
and otherwise get a new segment of 20 MiB (requests under 10 MiB) or of the request rounded up to
2 MiB (`get_allocation_size`).  Freed blocks merge with free neighbours of the same segment, and
segments are never returned to the driver (no empty_cache, no OOM retry on a card this large).
"""

from __future__ import annotations

from bisect import bisect_left, insort

MIB = 1 << 20
MIN_BLOCK = 512
SMALL_SIZE = 1 * MIB
SMALL_BUFFER = 2 * MIB
LARGE_BUFFER = 20 * MIB
MIN_LARGE_ALLOC = 10 * MIB
ROUND_LARGE = 2 * MIB


class AllocatorSim:
    """Replays allocations and frees; tracks allocated and reserved bytes and their peaks."""

    __slots__ = (
        "_free",
        "_isfree",
        "_live",
        "_next",
        "_prev",
        "_size",
        "_small",
        "_small_peak",
        "_top",
        "allocated",
        "peak_allocated",
        "peak_reserved",
        "reserved",
    )

    def __init__(self) -> None:
        self._free: list[tuple[int, int]] = []  # (size, address) of free large blocks
        self._size: dict[int, int] = {}  # address -> block size
        self._isfree: dict[int, bool] = {}
        self._next: dict[int, int] = {}  # address -> next block address in the segment (or -1)
        self._prev: dict[int, int] = {}
        self._live: dict[int, tuple[int, int]] = {}  # handle -> (address or -1 for small, bytes)
        self._top = 0  # next segment address (segments laid out one after another)
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self._small = 0
        self._small_peak = 0

    def malloc(self, handle: int, nbytes: int) -> None:
        """Allocate `nbytes` under `handle`."""
        size = -(-nbytes // MIN_BLOCK) * MIN_BLOCK if nbytes > MIN_BLOCK else MIN_BLOCK
        allocated = self.allocated = self.allocated + size
        if allocated > self.peak_allocated:
            self.peak_allocated = allocated
        if size <= SMALL_SIZE:
            small = self._small = self._small + size
            if small > self._small_peak:
                # the small pool reserves whole 2 MiB segments
                grow = -(-small // SMALL_BUFFER) - -(-self._small_peak // SMALL_BUFFER)
                if grow:
                    self.reserved += grow * SMALL_BUFFER
                    if self.reserved > self.peak_reserved:
                        self.peak_reserved = self.reserved
                self._small_peak = small
            self._live[handle] = (-1, size)
            return
        free_list = self._free
        i = bisect_left(free_list, (size, -1))
        sizes = self._size
        nexts = self._next
        if i < len(free_list):
            bsize, addr = free_list.pop(i)
        else:
            bsize = LARGE_BUFFER if size < MIN_LARGE_ALLOC else -(-size // ROUND_LARGE) * ROUND_LARGE
            addr = self._top
            self._top += bsize
            self.reserved += bsize
            if self.reserved > self.peak_reserved:
                self.peak_reserved = self.reserved
            sizes[addr] = bsize
            nexts[addr] = -1
            self._prev[addr] = -1
        if bsize - size > SMALL_SIZE:
            rest = addr + size
            nxt = nexts[addr]
            sizes[addr] = size
            sizes[rest] = bsize - size
            self._isfree[rest] = True
            nexts[rest] = nxt
            self._prev[rest] = addr
            nexts[addr] = rest
            if nxt != -1:
                self._prev[nxt] = rest
            insort(free_list, (bsize - size, rest))
        self._isfree[addr] = False
        self._live[handle] = (addr, size)

    def free(self, handle: int) -> None:
        """Free the allocation made under `handle`."""
        addr, size = self._live.pop(handle)
        self.allocated -= size
        if addr < 0:
            self._small -= size
            return
        bsize = self._size[addr]
        nxt = self._next[addr]
        if nxt != -1 and self._isfree[nxt]:
            self._remove_free(nxt)
            bsize += self._size.pop(nxt)
            nn = self._next.pop(nxt)
            self._prev.pop(nxt)
            del self._isfree[nxt]
            self._next[addr] = nn
            if nn != -1:
                self._prev[nn] = addr
        prv = self._prev[addr]
        if prv != -1 and self._isfree[prv]:
            self._remove_free(prv)
            bsize += self._size[prv]
            nn = self._next.pop(addr)
            self._prev.pop(addr)
            del self._size[addr]
            del self._isfree[addr]
            self._next[prv] = nn
            if nn != -1:
                self._prev[nn] = prv
            addr = prv
        self._size[addr] = bsize
        self._isfree[addr] = True
        insort(self._free, (bsize, addr))

    def _remove_free(self, addr: int) -> None:
        i = bisect_left(self._free, (self._size[addr], addr))
        del self._free[i]
