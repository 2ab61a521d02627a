"""A small replica of PyTorch's CUDA caching allocator, to turn a tensor trace into reserved bytes.

It follows c10/cuda/CUDACachingAllocator.cpp (torch 2.x, default settings): requests round up to
512 bytes; requests of at most 1 MiB come from a small pool of 2 MiB segments (approximated here by
their total, rounded up to whole segments); larger requests take the best-fitting free block
(smallest size, then lowest address), split it when more than 1 MiB would remain (`should_split`),
and otherwise get a new segment of 20 MiB (requests under 10 MiB) or of the request rounded up to
2 MiB (`get_allocation_size`).  Freed blocks merge with free neighbours of the same segment, and
segments go back to the driver only in `empty_cache` (peft's prepare_model_for_kbit_training calls
it; no OOM retry on a card this large).
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

# A block is one list [size, is_free, previous address, next address] (-1: none in the segment):
# one dict lookup per neighbour instead of four (the replay makes thousands of calls per estimate).
SIZE, FREE, PREV, NEXT = 0, 1, 2, 3


class AllocatorSim:
    """Replays allocations and frees; tracks allocated and reserved bytes and their peaks."""

    __slots__ = (
        "_blocks",
        "_free",
        "_live",
        "_small",
        "_small_peak",
        "_top",
        "allocated",
        "handles",
        "peak_allocated",
        "peak_reserved",
        "reserved",
    )

    def __init__(self) -> None:
        self._free: list[tuple[int, int]] = []  # (size, address) of free large blocks
        self._blocks: dict[int, list[int]] = {}  # address -> [size, is_free, prev, next]
        self._live: dict[int, tuple[int, int]] = {}  # handle -> (address or -1 for small, bytes)
        self._top = 0  # next segment address (segments laid out one after another)
        self.handles = 0  # the last handle `new` gave out
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self._small = 0
        self._small_peak = 0

    def copy(self, keep_live: bool = True) -> AllocatorSim:
        """An independent copy (without the live handles unless `keep_live`: blocks stay allocated)."""
        other = AllocatorSim.__new__(AllocatorSim)
        other._free = self._free[:]
        other._blocks = {a: b[:] for a, b in self._blocks.items()}
        other._live = dict(self._live) if keep_live else {}
        other._top, other.handles = self._top, self.handles
        other.allocated, other.reserved = self.allocated, self.reserved
        other.peak_allocated, other.peak_reserved = self.peak_allocated, self.peak_reserved
        other._small, other._small_peak = self._small, self._small_peak
        return other

    def malloc(self, handle: int, nbytes: int) -> None:
        """Allocate `nbytes` under `handle` (a handle from another pool's counter)."""
        self.handles = handle - 1
        self.new(nbytes)

    def new(self, nbytes: int) -> int:
        """Allocate `nbytes`; return a fresh handle."""
        handle = self.handles = self.handles + 1
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
            return handle
        free_list = self._free
        blocks = self._blocks
        i = bisect_left(free_list, (size, -1))
        if i < len(free_list):
            bsize, addr = free_list.pop(i)
            block = blocks[addr]
        else:
            bsize = LARGE_BUFFER if size < MIN_LARGE_ALLOC else -(-size // ROUND_LARGE) * ROUND_LARGE
            addr = self._top
            self._top += bsize
            self.reserved += bsize
            if self.reserved > self.peak_reserved:
                self.peak_reserved = self.reserved
            block = blocks[addr] = [bsize, 0, -1, -1]
        if bsize - size > SMALL_SIZE:
            rest = addr + size
            nxt = block[NEXT]
            block[SIZE] = size
            block[NEXT] = rest
            blocks[rest] = [bsize - size, 1, addr, nxt]
            if nxt != -1:
                blocks[nxt][PREV] = rest
            insort(free_list, (bsize - size, rest))
        block[FREE] = 0
        self._live[handle] = (addr, size)
        return handle

    def free(self, handle: int) -> None:
        """Free the allocation made under `handle`."""
        addr, size = self._live.pop(handle)
        self.allocated -= size
        if addr < 0:
            self._small -= size
            return
        blocks = self._blocks
        block = blocks[addr]
        bsize = block[SIZE]
        nxt = block[NEXT]
        if nxt != -1:
            after = blocks[nxt]
            if after[FREE]:
                self._remove_free(after[SIZE], nxt)
                bsize += after[SIZE]
                nn = block[NEXT] = after[NEXT]
                if nn != -1:
                    blocks[nn][PREV] = addr
                del blocks[nxt]
        prv = block[PREV]
        if prv != -1:
            before = blocks[prv]
            if before[FREE]:
                self._remove_free(before[SIZE], prv)
                bsize += before[SIZE]
                nn = before[NEXT] = block[NEXT]
                if nn != -1:
                    blocks[nn][PREV] = prv
                del blocks[addr]
                addr, block = prv, before
        block[SIZE] = bsize
        block[FREE] = 1
        insort(self._free, (bsize, addr))

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache(): release every large segment that is one free block
        (`release_cached_blocks` frees blocks with no neighbours).  The small pool, counted here only
        by its peak in 2 MiB segments, keeps its segments."""
        keep: list[tuple[int, int]] = []
        blocks = self._blocks
        for size, addr in self._free:
            block = blocks[addr]
            if block[PREV] == -1 and block[NEXT] == -1:
                del blocks[addr]
                self.reserved -= size
            else:
                keep.append((size, addr))
        self._free = keep

    def free_all(self, handles: list[int]) -> None:
        """Free every handle in order."""
        free = self.free
        for h in handles:
            free(h)

    def _remove_free(self, size: int, addr: int) -> None:
        free_list = self._free
        del free_list[bisect_left(free_list, (size, addr))]
