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

from bisect import bisect_left, bisect_right, insort

MIB = 1 << 20
MIN_BLOCK = 512
SMALL_SIZE = 1 * MIB
SMALL_BUFFER = 2 * MIB
LARGE_BUFFER = 20 * MIB
MIN_LARGE_ALLOC = 10 * MIB
ROUND_LARGE = 2 * MIB

# A block is one list [size, is_free, previous address, next address (-1: none in the segment), the
# handle holding it]: one dict lookup per neighbour instead of four (thousands of calls per estimate).
SIZE, FREE, PREV, NEXT, OWNER = 0, 1, 2, 3, 4


class AllocatorSim:
    """Replays allocations and frees; tracks allocated and reserved bytes and their peaks."""

    __slots__ = (
        "_blocks",
        "_free",
        "_live",
        "_raw",
        "_segs",
        "_small",
        "_small_hi",
        "_small_peak",
        "_top",
        "allocated",
        "handles",
        "peak_allocated",
        "peak_reserved",
        "reserved",
        "small_freed",
        "touched",
    )

    def __init__(self) -> None:
        self._free: list[tuple[int, int]] = []  # (size, address) of free large blocks
        self._blocks: dict[int, list[int]] = {}  # address -> [size, is_free, prev, next]
        self._live: dict[int, tuple[int, int]] = {}  # handle -> (address or -1 for small, bytes)
        self._top = 0  # next segment address (segments laid out one after another)
        self._segs: list[int] = []  # segment start addresses, ascending (creation order)
        self._raw: list[tuple[int, ...]] = []  # `contents` cache, stale for the `touched` segments
        # addresses of the blocks large allocations took and frees left (trace.py's _Repeats clears it)
        self.touched: set[int] = set()
        self.handles = 0  # the last handle `new` gave out
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self._small = 0
        self._small_peak = 0
        self._small_hi = 0  # the small pool's peak since _Repeats last reset it
        self.small_freed: list[int] = []  # handles freed from the small pool (read by _Repeats)

    def copy(self, keep_live: bool = True) -> AllocatorSim:
        """An independent copy (without the live handles unless `keep_live`: blocks stay allocated)."""
        other = AllocatorSim.__new__(AllocatorSim)
        other._free = self._free[:]
        other._blocks = {a: b[:] for a, b in self._blocks.items()}
        other._live = dict(self._live) if keep_live else {}
        other._top, other.handles = self._top, self.handles
        other._segs, other._raw, other.touched = self._segs[:], self._raw[:], set(self.touched)
        other.allocated, other.reserved = self.allocated, self.reserved
        other.peak_allocated, other.peak_reserved = self.peak_allocated, self.peak_reserved
        other._small, other._small_peak = self._small, self._small_peak
        other._small_hi, other.small_freed = self._small_hi, []
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
            if small > self._small_hi:
                self._small_hi = small
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
            self._segs.append(addr)
            block = blocks[addr] = [bsize, 0, -1, -1, 0]
        self.touched.add(addr)
        if bsize - size > SMALL_SIZE:
            rest = addr + size
            nxt = block[NEXT]
            block[SIZE] = size
            block[NEXT] = rest
            blocks[rest] = [bsize - size, 1, addr, nxt, 0]
            if nxt != -1:
                blocks[nxt][PREV] = rest
            insort(free_list, (bsize - size, rest))
        block[FREE] = 0
        block[OWNER] = handle
        self._live[handle] = (addr, size)
        return handle

    def free(self, handle: int) -> None:
        """Free the allocation made under `handle`."""
        addr, size = self._live.pop(handle)
        self.allocated -= size
        if addr < 0:
            self._small -= size
            self.small_freed.append(handle)
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
        self.touched.add(addr)
        insort(self._free, (bsize, addr))

    def free_all(self, handles: list[int]) -> None:
        """Free every handle in order."""
        free = self.free
        for h in handles:
            free(h)

    # --- exact fast-forward over repeated loop iterations (trace.py's _Repeats) -----------------

    def segments(self) -> int:
        """How many large segments exist (their indices follow address order)."""
        return len(self._segs)

    def contents(self) -> tuple[list[tuple[int, ...]], set[int]]:
        """Every segment as (size, handle or 0 when free, bytes requested) per block, and the segments
        touched since the last call (a cache refreshed from `touched`: callers must copy the list)."""
        segs, blocks, raw, live = self._segs, self._blocks, self._raw, self._live
        hit = {bisect_right(segs, a) - 1 for a in self.touched}
        self.touched.clear()
        hit.update(range(len(raw), len(segs)))
        raw.extend([()] * (len(segs) - len(raw)))
        for i in hit:
            addr = segs[i]
            seg: list[int] = []
            while addr != -1:
                b = blocks[addr]
                # a block held by no live handle (the loaded weights of a copy without them) requested 0
                seg += (b[SIZE], 0, 0) if b[FREE] else (b[SIZE], b[OWNER], live.get(b[OWNER], (0, 0))[1])
                addr = b[NEXT]
            raw[i] = tuple(seg)
        return raw, hit

    def free_segments(self, least: int) -> set[int]:
        """The segments holding a free block of at least `least` bytes."""
        segs, free = self._segs, self._free
        return {bisect_right(segs, a) - 1 for _, a in free[bisect_left(free, (least, -1)) :]}

    def small_live(self, after: int) -> list[tuple[int, int]]:
        """(handle, bytes) of the live small-pool allocations made after handle `after`."""
        live = self._live
        return [(h, live[h][1]) for h in range(after + 1, self.handles + 1) if live.get(h, (0,))[0] == -1]

    def small_window(self) -> tuple[int, int]:
        """(small pool bytes now, its peak since the last call); restarts the peak."""
        hi, self._small_hi = self._small_hi, self._small
        return self._small, hi

    def repeat_small(self, gone: list[int], made: list[tuple[int, int]], small: int, peak: int) -> None:
        """Free and make small-pool handles without replaying them; the pool ends at `small`, `peak`."""
        live, dead = self._live, set(gone)
        for h in dead:
            live.pop(h, None)
        live.update((h, (-1, size)) for h, size in made if h not in dead)  # some die in a later period
        if peak > self._small_peak:
            self.reserved += (-(-peak // SMALL_BUFFER) - -(-self._small_peak // SMALL_BUFFER)) * SMALL_BUFFER
            self.peak_reserved = max(self.peak_reserved, self.reserved)
            self._small_peak = peak
        self._small = self._small_hi = small

    def rewrite(
        self, changed: dict[int, tuple[int, ...]], new: list[tuple[int, ...]], handles: int, allocated: int
    ) -> None:
        """Give segments new contents and append new segments (as `contents` writes them)."""
        segs, blocks, live, raw = self._segs, self._blocks, self._live, self._raw
        self.contents()
        gone = set()
        for i in changed:  # forget the old blocks first: a handle may move to another segment
            addr = segs[i]
            while addr != -1:
                b = blocks.pop(addr)
                if b[FREE]:
                    gone.add(addr)
                else:
                    live.pop(b[OWNER], None)
                addr = b[NEXT]
        free = [e for e in self._free if e[1] not in gone] if gone else self._free
        top = self._top
        for seg in new:
            segs.append(top)
            top += sum(seg[0::3])
        items = [*changed.items(), *zip(range(len(raw), len(segs)), new, strict=True)]
        raw.extend([()] * len(new))
        for i, seg in items:
            raw[i] = seg
            addr, prev, last = segs[i], -1, len(seg) - 3
            for k in range(0, len(seg), 3):
                size, owner = seg[k], seg[k + 1]
                nxt = addr + size if k < last else -1
                blocks[addr] = [size, 0 if owner else 1, prev, nxt, owner]
                if owner:
                    if seg[k + 2]:
                        live[owner] = (addr, seg[k + 2])
                else:
                    free.append((size, addr))
                prev, addr = addr, addr + size
        free.sort()
        self._free = free
        self.reserved += top - self._top
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self._top = top
        self.handles = handles
        self.allocated = allocated

    def _remove_free(self, size: int, addr: int) -> None:
        free_list = self._free
        del free_list[bisect_left(free_list, (size, addr))]
