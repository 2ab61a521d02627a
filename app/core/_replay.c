/* The allocator replay of trace.py/allocsim.py in C: the same operations in the same order, so the
 * same (peak allocated, peak reserved) bytes, 20-80x faster.  Two shortcuts leave the same free blocks
 * as the Python replay's one-by-one operations (free neighbours always merge, so the free blocks are a
 * function of the live ones): a list of frees merges each run once (free_all), and a closed group that
 * provably makes no segment is only counted (first_pass: a checkpointed layer's runs of ops and its
 * ops' groups; new_free).  A plan with a tensor over
 * 1 TiB returns None (64-bit sums) and trace.py replays it in Python, as it does when this module is
 * not built; tests/core/test_replay_c.py compares the two on every calibration run and random plans.
 *
 * Allocator rules (c10/cuda/CUDACachingAllocator.cpp, see allocsim.py): round up to 512 bytes;
 * requests <= 1 MiB come from a small pool counted in whole 2 MiB segments; larger ones take the
 * smallest free block (lowest address on ties), split when more than 1 MiB would remain, else a new
 * segment of 20 MiB (requests under 10 MiB) or the request rounded up to 2 MiB; frees merge with
 * free neighbours of the same segment; empty_cache releases every segment that is one free block.
 *
 * The load (loading.py) comes as a script: n >= 0 allocates n bytes (the script's k-th allocation is
 * allocation k), -1 - k frees allocation k, EMPTY_CACHE calls empty_cache.
 */
/* the bins' and blocks' helpers: GCC left some out of line, and each replay calls them thousands of times */
#define INLINE static inline __attribute__((always_inline))
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MIB ((int64_t)1 << 20)
#define MIN_BLOCK 512
#define SMALL_SIZE (1 * MIB)
#define SMALL_BUFFER (2 * MIB)
#define LARGE_BUFFER (20 * MIB)
#define MIN_LARGE_ALLOC (10 * MIB)
#define ROUND_LARGE (2 * MIB)
#define NO_BLOCK (-1)
#define SMALL_LIVE (-2)
#define NOT_LIVE (-3)
/* Every size is at most 1 TiB and a replay makes well under 2^20 allocations, so no sum of sizes
 * reaches 2^63; a plan with a larger tensor returns None and trace.py replays it in Python. */
#define MAX_TENSOR ((int64_t)1 << 40)
#define TOO_BIG (-2)
/* Sim.err of an allocation past Live's range (2 TiB: a sum of sizes, FSDP's flat buffers), where
 * the replay answers None as for TOO_BIG */
#define PAST_RANGE 6
#define NBINS 256
#define EMPTY_CACHE (-((int64_t)1 << 62)) /* loading.EMPTY_CACHE */

typedef struct {
    int64_t d_len, d_cap;
    int64_t *d;
} Vec;

typedef struct {
    int64_t size, addr;
    int32_t prev, next; /* block ids of the segment's neighbours, NO_BLOCK at its ends */
    int32_t is_free;
    int32_t pos; /* a free block's index in its bin */
} Block;


/* A handle's allocation: its block id, SMALL_LIVE or NOT_LIVE, and its bytes in 512-byte units.  Eight
 * bytes, not sixteen: a replay writes one per handle, and a smaller array stays in the cache between
 * calls. */
typedef struct {
    int32_t block;
    uint32_t units;
} Live;

/* A free block in its bin: its key inline (a search reads no Block) and its id. */
typedef struct {
    int64_t size, addr;
    int64_t id;
} Free;

typedef struct {
    Block *blocks;
    int32_t n_blocks, cap_blocks;
    int32_t *spare_ids; /* ids of merged-away blocks, reused */
    int32_t n_spare, cap_spare;
    /* the free blocks in size bins (4 per power of two), unsorted: every size in a bin is below every
     * size in the next (take_best_fit) */
    Free *bin[NBINS];
    int32_t bin_n[NBINS], bin_cap[NBINS];
    uint64_t nonempty[(NBINS + 63) / 64];
    Live *live; /* per handle - base */
    int64_t cap_live;
    int32_t *pend; /* free_all's blocks freed but not yet merged and binned */
    int32_t cap_pend;
    /* the replay's handles start after the load's, which it never frees (the load's live blocks are
     * walls), so the per-handle arrays start at `base`; entries up to handle `hi` are set */
    int64_t base, hi;
    int64_t top, handles, allocated, reserved, peak_allocated, peak_reserved, small, small_peak;
    int err;
} Sim;

static int grow(void **ptr, int64_t *cap, int64_t need, size_t elem) {
    if (need <= *cap) return 0;
    int64_t n = *cap ? *cap : 64;
    while (n < need) n *= 2;
    void *p = realloc(*ptr, (size_t)n * elem);
    if (!p) return -1;
    *ptr = p;
    *cap = n;
    return 0;
}

static int grow32_slow(void **ptr, int32_t *cap, int64_t need, size_t elem) {
    int64_t c = *cap;
    if (need > INT32_MAX || grow(ptr, &c, need, elem)) return -1;
    *cap = (int32_t)c;
    return 0;
}

/* grow32's common case (room left) inline: the bins and block lists check on every operation */
INLINE int grow32(void **ptr, int32_t *cap, int64_t need, size_t elem) {
    return need <= *cap ? 0 : grow32_slow(ptr, cap, need, elem);
}

static inline void vec_push(Vec *v, int64_t x, int *err) {
    if (v->d_len == v->d_cap && grow((void **)&v->d, &v->d_cap, v->d_len + 1, sizeof(int64_t))) {
        *err = 1;
        return;
    }
    v->d[v->d_len++] = x;
}

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

static int size_bin(int64_t size) {
    int lg = 63 - __builtin_clzll((unsigned long long)size);
    int sub = lg >= 2 ? (int)((size >> (lg - 2)) & 3) : 0;
    return 4 * lg + sub; /* size <= 2^41 by MAX_TENSOR and segment rounding: below NBINS */
}

/* Whether free block f comes before g in the best-fit order: smaller size, then lower address. */
INLINE int before(const Free *f, const Free *g) {
    return f->size < g->size || (f->size == g->size && f->addr < g->addr);
}

/* Block `id` (of `size` bytes at `addr`, passed in: reading back the Block just written stalls the
 * load on those stores) into its bin, appended: the bins are unsorted (a bin holds a few blocks, which
 * a best fit scans), so an insert or a removal moves no other entry. */
INLINE void free_insert(Sim *s, int32_t id, int64_t size, int64_t addr) {
    int b = size_bin(size);
    if (s->bin_n[b] == s->bin_cap[b] &&
        grow32((void **)&s->bin[b], &s->bin_cap[b], (int64_t)s->bin_n[b] + 1, sizeof(Free))) {
        s->err = 1;
        return;
    }
    int32_t i = s->bin_n[b]++;
    Free *f = &s->bin[b][i];
    f->size = size;
    f->addr = addr;
    f->id = id;
    s->blocks[id].pos = i;
    s->nonempty[b / 64] |= (uint64_t)1 << (b % 64);
}

/* Entry i out of bin b: the bin's last entry takes its place. */
INLINE void free_remove_at(Sim *s, int b, int32_t i) {
    Free *f = s->bin[b];
    int32_t n = --s->bin_n[b];
    if (i != n) {
        f[i] = f[n];
        s->blocks[f[i].id].pos = i;
    }
    if (n == 0) s->nonempty[b / 64] &= ~((uint64_t)1 << (b % 64));
}

INLINE void free_remove(Sim *s, int32_t id) {
    int b = size_bin(s->blocks[id].size);
    int32_t i = s->blocks[id].pos;
    if (i >= s->bin_n[b] || s->bin[b][i].id != id) {
        s->err = 2;
        return;
    }
    free_remove_at(s, b, i);
}

/* Take the best-fitting free block (smallest size, then lowest address) of at least `size` bytes
 * out of the bins; NO_BLOCK when none is that large.  Every size in a bin is below every size in the
 * next, so the best fit is the first in that order of the request's own bin's blocks that hold it,
 * else the first of the next non-empty bin's. */
INLINE int32_t take_best_fit(Sim *s, int64_t size, int64_t *bsize, int64_t *baddr) {
    int b = size_bin(size);
    const Free *f = s->bin[b];
    int32_t n = s->bin_n[b], best = -1;
    for (int32_t i = 0; i < n; i++) {
        if (f[i].size >= size && (best < 0 || before(&f[i], &f[best]))) best = i;
    }
    if (best < 0) {
        int next = b + 1;
        b = -1;
        for (int w = next / 64; w < (NBINS + 63) / 64 && b < 0; w++) {
            uint64_t bits = s->nonempty[w];
            if (w == next / 64) bits &= ~(uint64_t)0 << (next % 64);
            if (bits) b = 64 * w + __builtin_ctzll(bits);
        }
        if (b < 0) return NO_BLOCK;
        f = s->bin[b];
        n = s->bin_n[b];
        best = 0;
        for (int32_t i = 1; i < n; i++) {
            if (before(&f[i], &f[best])) best = i;
        }
    }
    int32_t id = (int32_t)f[best].id;
    *bsize = f[best].size;
    *baddr = f[best].addr;
    free_remove_at(s, b, best);
    return id;
}

INLINE int32_t block_new(Sim *s, int64_t addr, int64_t size, int32_t prev, int32_t next, int32_t is_free) {
    int32_t id;
    if (s->n_spare) {
        id = s->spare_ids[--s->n_spare];
    } else {
        if (grow32((void **)&s->blocks, &s->cap_blocks, (int64_t)s->n_blocks + 1, sizeof(Block))) {
            s->err = 1;
            return NO_BLOCK;
        }
        id = s->n_blocks++;
    }
    Block *b = &s->blocks[id];
    b->addr = addr;
    b->size = size;
    b->prev = prev;
    b->next = next;
    b->is_free = is_free;
    b->pos = -1;
    return id;
}

INLINE void block_drop(Sim *s, int32_t id) {
    if (grow32((void **)&s->spare_ids, &s->cap_spare, (int64_t)s->n_spare + 1, sizeof(int32_t))) {
        s->err = 1;
        return;
    }
    s->spare_ids[s->n_spare++] = id;
}

INLINE void live_set(Sim *s, int64_t handle, int32_t block, int64_t size) {
    int64_t i = handle - s->base;
    if (i < 0) {
        s->err = 3;
        return;
    }
    if (size > (int64_t)UINT32_MAX * MIN_BLOCK) {
        s->err = PAST_RANGE;
        return;
    }
    if (i >= s->cap_live) {
        if (grow((void **)&s->live, &s->cap_live, i + 1, sizeof(Live))) {
            s->err = 1;
            return;
        }
    }
    /* handles skipped (another pool's, FSDP's) are not live here; the buffers are reused between
     * replays, so every entry up to `hi` is written before it is read */
    for (int64_t j = s->hi + 1 - s->base; j < i; j++) s->live[j].block = NOT_LIVE;
    if (handle > s->hi) s->hi = handle;
    s->live[i].units = (uint32_t)(size / MIN_BLOCK); /* a block_bytes size: a multiple of 512 */
    s->live[i].block = block;
}

static void sim_reserve(Sim *s, int64_t bytes) {
    s->reserved += bytes;
    if (s->reserved > s->peak_reserved) s->peak_reserved = s->reserved;
}

static inline int64_t block_bytes(int64_t nbytes) {
    return nbytes > MIN_BLOCK ? ceil_div(nbytes, MIN_BLOCK) * MIN_BLOCK : MIN_BLOCK;
}

/* An allocation's count in allocated bytes and, for a small one, in the small pool (its segments). */
static inline void count_new(Sim *s, int64_t size) {
    s->allocated += size;
    if (s->allocated > s->peak_allocated) s->peak_allocated = s->allocated;
    if (size <= SMALL_SIZE) {
        s->small += size;
        if (s->small > s->small_peak) {
            int64_t more = ceil_div(s->small, SMALL_BUFFER) - ceil_div(s->small_peak, SMALL_BUFFER);
            if (more) sim_reserve(s, more * SMALL_BUFFER);
            s->small_peak = s->small;
        }
    }
}

static inline void count_free(Sim *s, int64_t size) {
    s->allocated -= size;
    if (size <= SMALL_SIZE) s->small -= size;
}

/* AllocatorSim.new */
static inline int64_t sim_new(Sim *s, int64_t nbytes) {
    int64_t handle = ++s->handles;
    int64_t size = block_bytes(nbytes);
    count_new(s, size);
    if (size <= SMALL_SIZE) {
        live_set(s, handle, SMALL_LIVE, size);
        return handle;
    }
    int64_t bsize = 0, addr = 0;
    int32_t id = take_best_fit(s, size, &bsize, &addr);
    if (id == NO_BLOCK) {
        bsize = size < MIN_LARGE_ALLOC ? LARGE_BUFFER : ceil_div(size, ROUND_LARGE) * ROUND_LARGE;
        addr = s->top;
        id = block_new(s, addr, bsize, NO_BLOCK, NO_BLOCK, 0);
        if (id == NO_BLOCK) return handle;
        s->top += bsize;
        sim_reserve(s, bsize);
    }
    if (bsize - size > SMALL_SIZE) {
        int32_t next = s->blocks[id].next;
        int32_t rest = block_new(s, addr + size, bsize - size, id, next, 1);
        if (rest == NO_BLOCK) return handle;
        s->blocks[id].size = size;
        s->blocks[id].next = rest;
        if (next != NO_BLOCK) s->blocks[next].prev = rest;
        free_insert(s, rest, bsize - size, addr + size);
    }
    s->blocks[id].is_free = 0;
    live_set(s, handle, id, size);
    return handle;
}

/* AllocatorSim.malloc: allocate under a handle from another pool's counter */
static void sim_malloc(Sim *s, int64_t handle, int64_t nbytes) {
    s->handles = handle - 1;
    sim_new(s, nbytes);
}

/* AllocatorSim.free */
static inline void sim_free(Sim *s, int64_t handle) {
    int64_t i = handle - s->base;
    if (i < 0 || handle > s->hi || s->live[i].block == NOT_LIVE) {
        s->err = 3;
        return;
    }
    int32_t id = s->live[i].block;
    int64_t size = (int64_t)s->live[i].units * MIN_BLOCK;
    s->live[i].block = NOT_LIVE;
    s->allocated -= size;
    if (id == SMALL_LIVE) {
        s->small -= size;
        return;
    }
    Block *blocks = s->blocks;
    int64_t bsize = blocks[id].size;
    int32_t nxt = blocks[id].next;
    if (nxt != NO_BLOCK && blocks[nxt].is_free) {
        free_remove(s, nxt);
        bsize += blocks[nxt].size;
        int32_t nn = blocks[id].next = blocks[nxt].next;
        if (nn != NO_BLOCK) blocks[nn].prev = id;
        block_drop(s, nxt);
    }
    int32_t prv = blocks[id].prev;
    if (prv != NO_BLOCK && blocks[prv].is_free) {
        free_remove(s, prv);
        bsize += blocks[prv].size;
        int32_t nn = blocks[prv].next = blocks[id].next;
        if (nn != NO_BLOCK) blocks[nn].prev = prv;
        block_drop(s, id);
        id = prv;
    }
    blocks[id].size = bsize;
    blocks[id].is_free = 1;
    free_insert(s, id, bsize, blocks[id].addr);
}

/* AllocatorSim.empty_cache: release every large segment that is one free block (no neighbours);
 * the small pool keeps its segments. */
static void sim_empty_cache(Sim *s) {
    for (int b = 0; b < NBINS; b++) {
        int32_t kept = 0;
        for (int32_t i = 0; i < s->bin_n[b]; i++) {
            int32_t id = (int32_t)s->bin[b][i].id;
            Block *bl = &s->blocks[id];
            if (bl->prev == NO_BLOCK && bl->next == NO_BLOCK) {
                s->reserved -= bl->size;
                block_drop(s, id);
            } else {
                s->blocks[id].pos = kept;
                s->bin[b][kept++] = s->bin[b][i];
            }
        }
        s->bin_n[b] = kept;
        if (!kept) s->nonempty[b / 64] &= ~((uint64_t)1 << (b % 64));
    }
}

static void sim_release(Sim *s) {
    free(s->blocks);
    free(s->spare_ids);
    for (int b = 0; b < NBINS; b++) free(s->bin[b]);
    free(s->live);
    free(s->pend);
}

/* An empty allocator whose first handle will be `base`, keeping `s`'s buffers (a replay reuses the
 * previous one's memory: no allocation, and it is still in the cache). */
static void sim_reset(Sim *s, int64_t base) {
    memset(s->bin_n, 0, sizeof(s->bin_n));
    memset(s->nonempty, 0, sizeof(s->nonempty));
    s->n_blocks = s->n_spare = 0;
    s->base = base;
    s->hi = base - 1;
    s->top = s->handles = s->allocated = s->reserved = s->peak_allocated = s->peak_reserved = 0;
    s->small = s->small_peak = 0;
    s->err = 0;
}

/* The loaded model as the steps see it.  The steps never free a load's allocation, so a live block
 * of the load only ever stops a free neighbour from merging, as a segment's end does; segments
 * without a free block never change.  What is kept is the free blocks (each between two walls, as
 * free neighbours merge) and the counters. */
typedef struct {
    int64_t n_free;
    int64_t *size, *addr;
    int64_t top, handles, allocated, reserved, peak_reserved, small, small_peak, shards;
} Loaded;

static void loaded_release(Loaded *ld) {
    free(ld->size);
    free(ld->addr);
}

/* `ld` from the allocator after the load: 0, or -1 when out of memory. */
static int snapshot(Loaded *ld, const Sim *s) {
    int64_t n = 0;
    for (int b = 0; b < NBINS; b++) n += s->bin_n[b];
    ld->n_free = n;
    ld->size = (int64_t *)malloc(sizeof(int64_t) * (size_t)(n ? n : 1));
    ld->addr = (int64_t *)malloc(sizeof(int64_t) * (size_t)(n ? n : 1));
    if (!ld->size || !ld->addr) {
        loaded_release(ld);
        return -1;
    }
    n = 0;
    for (int b = 0; b < NBINS; b++) {
        for (int32_t i = 0; i < s->bin_n[b]; i++, n++) {
            ld->size[n] = s->bin[b][i].size;
            ld->addr[n] = s->bin[b][i].addr;
        }
    }
    ld->top = s->top;
    ld->handles = s->handles;
    ld->allocated = s->allocated;
    ld->reserved = s->reserved;
    ld->peak_reserved = s->peak_reserved;
    ld->small = s->small;
    ld->small_peak = s->small_peak;
    return 0;
}

/* `s` (reset) as the snapshot's allocator: its free blocks with no neighbours, the load's handles gone. */
static void sim_restore(Sim *s, const Loaded *ld) {
    sim_reset(s, ld->handles + 1);
    s->top = ld->top;
    s->handles = ld->handles;
    s->allocated = s->peak_allocated = ld->allocated; /* the step's peak allocated, as trace.simulate_py */
    s->reserved = ld->reserved;
    s->peak_reserved = ld->peak_reserved;
    s->small = ld->small;
    s->small_peak = ld->small_peak;
    for (int64_t i = 0; i < ld->n_free && !s->err; i++) {
        int32_t id = block_new(s, ld->addr[i], ld->size[i], NO_BLOCK, NO_BLOCK, 1);
        int b = size_bin(ld->size[i]);
        if (id == NO_BLOCK ||
            grow32((void **)&s->bin[b], &s->bin_cap[b], (int64_t)s->bin_n[b] + 1, sizeof(Free))) {
            s->err = 1;
            return;
        }
        s->blocks[id].pos = s->bin_n[b];
        s->bin[b][s->bin_n[b]++] = (Free){ld->size[i], ld->addr[i], id};
        s->nonempty[b / 64] |= (uint64_t)1 << (b % 64);
    }
}

/* ---- the plan, as int64 arrays ---- */

typedef struct {
    int64_t n;
    int64_t *v;
} Arr;

typedef struct {
    int64_t count, grad_in;
    Arr grads, scratch, dequant; /* dequant: (4-bit weight, its 16-bit product) pairs, QLoRA */
} Op;

typedef struct {
    Arr opt_states, opt_temps, head_grads, layer_saved, layer_transient, layer_copies, final_saved, shared,
        layer_weights, root_weights, ddp_buckets, ddp_rebuilt;
    Op *ops;
    int64_t n_ops;
    int64_t shards, layers, adafactor, embed_grad, tied, head_copy, cache_copies, checkpoint, hidden,
        logits, logits_fp32, vocab_fp32, dequant, softcap, workspace, transient_op, held_input;
} Plan;

/* A sequence of ints into `out`: each at most MAX_TENSOR and at least `low`, else TOO_BIG. */
static int to_ints(PyObject *obj, Arr *out, long long low) {
    PyObject *seq = PySequence_Fast(obj, "expected a sequence of ints");
    if (!seq) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    out->n = n;
    out->v = (int64_t *)malloc(sizeof(int64_t) * (size_t)(n ? n : 1));
    if (!out->v) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(PySequence_Fast_GET_ITEM(seq, i), &overflow);
        if (x == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        if (overflow || x < low || x > MAX_TENSOR) {
            Py_DECREF(seq);
            return TOO_BIG;
        }
        out->v[i] = (int64_t)x;
    }
    Py_DECREF(seq);
    return 0;
}

/* Tensor sizes: 0 to MAX_TENSOR. */
static int to_arr(PyObject *obj, Arr *out) { return to_ints(obj, out, 0); }

/* A load script: sizes up to MAX_TENSOR and negative ops (frees, EMPTY_CACHE). */
static int to_script(PyObject *obj, Arr *out) { return to_ints(obj, out, LLONG_MIN); }

/* ---- the tracer (trace._Tracer and trace._forward_backward) ---- */

typedef struct {
    Sim sim, ag, rs;
    int64_t ag_held, rs_held, shards, peak;
    int err;
} Tracer;

/* _Tracer.fold: the default pool's peak since the last fold, beside the side pools, into `peak`. */
static void fold(Tracer *t) {
    int64_t total = t->sim.peak_allocated + t->ag.allocated + t->rs.allocated;
    if (total > t->peak) t->peak = total;
    t->sim.peak_allocated = t->sim.allocated;
}

#define ERR(t) ((t)->err || (t)->sim.err || (t)->ag.err || (t)->rs.err)

#define PENDING 2 /* Block.is_free of a block free_all freed and has not merged and binned yet */
#define MERGED 3  /* Block.is_free of a block free_all merged into its left neighbour (dropped) */

/* Free every handle in order.  Freed neighbours always merge, so whatever the order of some frees
 * with no allocation between them, the free blocks after them are the same: the maximal runs of
 * free blocks in each segment.  So the handles' blocks are marked first, then each run is merged
 * and binned once, where freeing one at a time bins and unbins each intermediate merge (a layer's
 * saved tensors, freed together, often lie side by side). */
static void free_all(Sim *s, const int64_t *h, int64_t n) {
    if (n < 2) {
        if (n) sim_free(s, h[0]);
        return;
    }
    if (grow32((void **)&s->pend, &s->cap_pend, n, sizeof(int32_t))) {
        s->err = 1;
        return;
    }
    Block *blocks = s->blocks;
    int32_t k = 0;
    for (int64_t j = 0; j < n; j++) {
        int64_t i = h[j] - s->base;
        if (i < 0 || h[j] > s->hi || s->live[i].block == NOT_LIVE) {
            s->err = 3;
            return;
        }
        int32_t id = s->live[i].block;
        int64_t size = (int64_t)s->live[i].units * MIN_BLOCK;
        s->live[i].block = NOT_LIVE;
        s->allocated -= size;
        if (id == SMALL_LIVE) {
            s->small -= size;
        } else {
            blocks[id].is_free = PENDING;
            s->pend[k++] = id;
        }
    }
    for (int32_t j = 0; j < k; j++) {
        int32_t start = s->pend[j];
        if (blocks[start].is_free != PENDING) continue; /* merged or binned with an earlier run */
        int32_t prv;
        while ((prv = blocks[start].prev) != NO_BLOCK && blocks[prv].is_free) start = prv;
        if (blocks[start].is_free == 1) free_remove(s, start);
        int64_t total = blocks[start].size;
        int32_t nxt;
        while ((nxt = blocks[start].next) != NO_BLOCK && blocks[nxt].is_free) {
            if (blocks[nxt].is_free == 1) free_remove(s, nxt);
            total += blocks[nxt].size;
            int32_t nn = blocks[start].next = blocks[nxt].next;
            if (nn != NO_BLOCK) blocks[nn].prev = start;
            blocks[nxt].is_free = MERGED;
            block_drop(s, nxt);
        }
        blocks[start].size = total;
        blocks[start].is_free = 1;
        free_insert(s, start, total, blocks[start].addr);
    }
}

/* Bytes of the largest free block of the large pool (0 when none). */
static inline int64_t largest_free(const Sim *s) {
    for (int w = (NBINS + 63) / 64 - 1; w >= 0; w--) {
        if (s->nonempty[w]) {
            int b = 64 * w + 63 - __builtin_clzll(s->nonempty[w]);
            int64_t most = 0; /* the bins are unsorted */
            for (int32_t i = 0; i < s->bin_n[b]; i++)
                if (s->bin[b][i].size > most) most = s->bin[b][i].size;
            return most;
        }
    }
    return 0;
}

/* Closed groups: allocations that all die before the group ends (a 4-bit op's dequantized weights
 * and products, a layer's transients) leave the large pool's free blocks as they found them unless
 * one made a segment, since free neighbours always merge: the free blocks are the segments' runs
 * outside the live blocks, and the group leaves those as it found them.  None makes a segment when
 * the largest free block holds all of the group's large allocations at once: whichever blocks they
 * take, each finds at worst the untouched rest of that block, which only they shorten.  Such a group
 * is only counted (allocated bytes, the small pool), not placed, and takes no handles: a handle only
 * names an allocation for its free (the C replay's need not be the Python replay's), and fewer keep
 * the per-handle array short. */
static inline int64_t large_bytes(const int64_t *sizes, int64_t n) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t size = block_bytes(sizes[i]);
        if (size > SMALL_SIZE) total += size;
    }
    return total;
}

/* `free(new(nbytes))`, counted only when the largest free block holds it (a closed group of one). */
static inline void new_free(Sim *s, int64_t nbytes) {
    int64_t size = block_bytes(nbytes);
    if (size <= SMALL_SIZE || size <= largest_free(s)) {
        count_new(s, size);
        count_free(s, size);
    } else {
        sim_free(s, sim_new(s, nbytes));
    }
}

static void new_all(Tracer *t, const Arr *sizes, Vec *out) {
    for (int64_t i = 0; i < sizes->n; i++) vec_push(out, sim_new(&t->sim, sizes->v[i]), &t->err);
}

static void unshard(Tracer *t, const Arr *sizes, Vec *out) {
    int64_t total = 0;
    for (int64_t i = 0; i < sizes->n; i++) total += sizes->v[i];
    int64_t n = t->sim.handles = t->sim.handles + 2;
    fold(t);
    sim_malloc(&t->ag, n - 1, ceil_div(total, t->shards));
    sim_malloc(&t->ag, n, total);
    fold(t);
    new_all(t, sizes, out);
    fold(t);
    sim_free(&t->ag, n - 1);
    if (t->ag_held >= 0) sim_free(&t->ag, t->ag_held);
    t->ag_held = n;
}

static void reduce_scatter(Tracer *t, const int64_t *grads, const int64_t *sizes, int64_t k, Vec *out) {
    int64_t total = 0;
    for (int64_t i = 0; i < k; i++) total += sizes[i];
    int64_t n = t->sim.handles = t->sim.handles + 2;
    fold(t);
    sim_malloc(&t->rs, n - 1, total);
    sim_malloc(&t->rs, n, ceil_div(total, t->shards));
    fold(t);
    free_all(&t->sim, grads, k);
    for (int64_t i = 0; i < k; i++) vec_push(out, sim_new(&t->sim, ceil_div(sizes[i], t->shards)), &t->err);
    fold(t);
    sim_free(&t->rs, n);
    if (t->rs_held >= 0) sim_free(&t->rs, t->rs_held);
    t->rs_held = n - 1;
}

typedef struct {
    Vec root, shared, inputs, saved, copies, cache, unsharded, cp, layer, tmp, final, layer_grads,
        layer_grad_sizes, head, head_sizes, scratch, cur;
    Vec deltas, at, group, run_need, op_need; /* first_pass_prepare's */
} Lists;

/* Entries a workspace keeps between replays; a larger one (an absurd plan) is given back. */
#define WORKSPACE_KEPT ((int64_t)1 << 20)

static void lists_release(Lists *l) {
    Vec *all[] = {&l->root,  &l->shared,      &l->inputs,           &l->saved, &l->copies, &l->cache,
                  &l->unsharded, &l->cp,      &l->layer,            &l->tmp,   &l->final,  &l->layer_grads,
                  &l->layer_grad_sizes, &l->head, &l->head_sizes, &l->scratch, &l->cur, &l->deltas, &l->at, &l->group, &l->run_need, &l->op_need};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) free(all[i]->d);
}

/* Count deltas[from..to): a positive one is an allocation of that many bytes, a negative one a free. */
static void count_deltas(Sim *s, const int64_t *deltas, int64_t from, int64_t to) {
    for (int64_t i = from; i < to; i++) {
        int64_t d = deltas[i];
        if (d > 0) count_new(s, d);
        else count_free(s, -d);
    }
}

/* first_pass's counting, prepared once per replay (the sizes are the same in every layer): each op's
 * allocations and frees in order as deltas (its saved tensors made, the previous op's freed, then its
 * closed group: each 4-bit weight dequantized, its product made, the weight freed; the transients
 * made and freed; the products freed), from l->at[k], its group from l->group[k]; and the large bytes
 * of the closed run from k (-1 where no op that saves nothing follows) and of k's group, which the bound compares with the largest free block.  A run starts
 * where nothing of the layer is alive (the first op, or after one that saves nothing), so its first
 * op's deltas free nothing before it. */
static void first_pass_prepare(const Plan *p, Tracer *t, Lists *l) {
    Vec *d = &l->deltas;
    d->d_len = l->at.d_len = l->group.d_len = l->run_need.d_len = l->op_need.d_len = 0;
    int64_t start = 0, prev = 0, prev_n = 0;
    for (int64_t k = 0; k < p->n_ops; k++) {
        const Op *op = &p->ops[k];
        const Arr *dq = &op->dequant;
        vec_push(&l->at, d->d_len, &t->err);
        for (int64_t i = 0; i < op->count; i++) vec_push(d, block_bytes(p->layer_saved.v[start + i]), &t->err);
        for (int64_t i = 0; i < prev_n; i++) vec_push(d, -block_bytes(p->layer_saved.v[prev + i]), &t->err);
        vec_push(&l->group, d->d_len, &t->err);
        for (int64_t j = 0; j + 1 < dq->n; j += 2) {
            vec_push(d, block_bytes(dq->v[j]), &t->err);
            vec_push(d, block_bytes(dq->v[j + 1]), &t->err);
            vec_push(d, -block_bytes(dq->v[j]), &t->err);
        }
        int64_t need = large_bytes(dq->v, dq->n);
        if (k == p->transient_op) {
            const Arr *tr = &p->layer_transient;
            for (int64_t i = 0; i < tr->n; i++) vec_push(d, block_bytes(tr->v[i]), &t->err);
            for (int64_t i = 0; i < tr->n; i++) vec_push(d, -block_bytes(tr->v[i]), &t->err);
            need += large_bytes(tr->v, tr->n);
        }
        for (int64_t j = 1; j < dq->n; j += 2) vec_push(d, -block_bytes(dq->v[j]), &t->err);
        vec_push(&l->op_need, need, &t->err);
        prev = start;
        prev_n = op->count;
        start += op->count;
    }
    vec_push(&l->at, d->d_len, &t->err);
    for (int64_t k = 0; k < p->n_ops && !t->err; k++) {
        int64_t e = k, need = 0;
        while (e < p->n_ops && p->ops[e].count) e++;
        for (int64_t i = l->at.d[k]; e < p->n_ops && i < l->at.d[e + 1]; i++)
            if (l->deltas.d[i] > SMALL_SIZE) need += l->deltas.d[i];
        vec_push(&l->run_need, e < p->n_ops ? need : -1, &t->err);
    }
}

/* A checkpointed layer's first forward, op by op (trace._first_pass): each op's tensors die once the
 * next op has run; a 4-bit linear's dequantized weight is freed once its product is made.  Leaves the
 * last op's tensors in l->layer.  Where nothing of the layer is alive, the ops up to the next one that
 * saves nothing are a closed group (all their tensors die by its end): counted when the largest free
 * block holds all their large allocations. */
static void first_pass(const Plan *p, Tracer *t, Lists *l) {
    Sim *sim = &t->sim;
    int64_t start = 0;
    l->layer.d_len = 0;
    for (int64_t k = 0; k < p->n_ops && !ERR(t); k++) {
        const Op *op = &p->ops[k];
        if (!l->layer.d_len && l->run_need.d[k] >= 0 && l->run_need.d[k] <= largest_free(sim)) {
            /* ops k..e, the next that saves nothing, counted only */
            int64_t e = k;
            while (p->ops[e].count) start += p->ops[e++].count;
            count_deltas(sim, l->deltas.d, l->at.d[k], l->at.d[e + 1]);
            k = e;
            continue;
        }
        l->cur.d_len = 0;
        for (int64_t i = 0; i < op->count; i++)
            vec_push(&l->cur, sim_new(sim, p->layer_saved.v[start + i]), &t->err);
        start += op->count;
        free_all(sim, l->layer.d, l->layer.d_len);
        l->layer.d_len = 0;
        for (int64_t i = 0; i < l->cur.d_len; i++) vec_push(&l->layer, l->cur.d[i], &t->err);
        int transients = k == p->transient_op;
        if (l->op_need.d[k] <= largest_free(sim)) { /* the op's closed group, counted only */
            count_deltas(sim, l->deltas.d, l->group.d[k], l->at.d[k + 1]);
            continue;
        }
        l->tmp.d_len = 0;
        for (int64_t j = 0; j + 1 < op->dequant.n; j += 2) {
            int64_t w = sim_new(sim, op->dequant.v[j]);
            vec_push(&l->tmp, sim_new(sim, op->dequant.v[j + 1]), &t->err);
            sim_free(sim, w);
        }
        if (transients) {
            l->scratch.d_len = 0;
            new_all(t, &p->layer_transient, &l->scratch);
            free_all(sim, l->scratch.d, l->scratch.d_len);
        }
        free_all(sim, l->tmp.d, l->tmp.d_len);
        l->tmp.d_len = 0;
    }
}

/* One forward and backward; leaves the gradient handles (alive until zero_grad) in `grads`.
 * `workspace`: each thread's cuBLAS workspace, made at its first matmul (first step only).
 * `held` (p->held_input, LoRA / QLoRA under checkpointing): the embedding output and its `.grad`, which
 * the loop's `loss` keeps alive; the last step's are freed once this forward has returned, this step's
 * are left there (trace._forward_backward). */
static void forward_backward(const Plan *p, Tracer *t, Lists *l, Vec *grads, int64_t workspace, Vec *held) {
    Sim *sim = &t->sim;
    int fsdp = p->shards > 1;
    int64_t nsaved = p->layer_saved.n, ncopies = p->layer_copies.n;
    l->root.d_len = l->shared.d_len = l->inputs.d_len = l->saved.d_len = l->copies.d_len = 0;
    l->cache.d_len = l->final.d_len = 0;
    grads->d_len = 0;
    if (fsdp && p->root_weights.n) unshard(t, &p->root_weights, &l->root);
    vec_push(&l->inputs, sim_new(sim, p->hidden), &t->err);
    new_all(t, &p->shared, &l->shared);
    if (workspace) sim_new(sim, workspace);
    for (int64_t layer = 0; layer < p->layers && !ERR(t); layer++) {
        l->unsharded.d_len = l->cp.d_len = l->layer.d_len = l->tmp.d_len = 0;
        if (fsdp) unshard(t, &p->layer_weights, &l->unsharded);
        new_all(t, &p->layer_copies, &l->cp);
        if (p->checkpoint) {
            first_pass(p, t, l);
        } else {
            new_all(t, &p->layer_saved, &l->layer);
            new_all(t, &p->layer_transient, &l->tmp);
            if (p->dequant) new_free(sim, p->dequant);
        }
        int64_t out = sim_new(sim, p->hidden);
        free_all(sim, l->tmp.d, l->tmp.d_len);
        free_all(sim, l->unsharded.d, l->unsharded.d_len);
        if (p->checkpoint) {
            free_all(sim, l->layer.d, l->layer.d_len);
            if (p->cache_copies) {
                for (int64_t i = 0; i < l->cp.d_len; i++) vec_push(&l->cache, l->cp.d[i], &t->err);
            } else {
                free_all(sim, l->cp.d, l->cp.d_len);
            }
            vec_push(&l->inputs, out, &t->err);
        } else {
            for (int64_t i = 0; i < l->layer.d_len; i++) vec_push(&l->saved, l->layer.d[i], &t->err);
            for (int64_t i = 0; i < l->cp.d_len; i++) vec_push(&l->copies, l->cp.d[i], &t->err);
            sim_free(sim, l->inputs.d[--l->inputs.d_len]);
            vec_push(&l->inputs, out, &t->err);
        }
    }
    new_all(t, &p->final_saved, &l->final);
    int64_t head_copy = p->head_copy ? sim_new(sim, p->head_copy) : 0;
    int64_t logits = sim_new(sim, p->logits);
    int64_t tanh_out = 0;
    if (p->softcap) { /* Gemma 2's final logit softcapping: / cap, tanh (saves its result), * cap */
        int64_t scaled = sim_new(sim, p->logits);
        sim_free(sim, logits);
        tanh_out = sim_new(sim, p->logits);
        sim_free(sim, scaled);
        logits = sim_new(sim, p->logits);
    }
    int64_t up = p->logits_fp32 ? sim_new(sim, p->logits_fp32) : 0;
    int64_t lsm = sim_new(sim, p->vocab_fp32);
    if (up) sim_free(sim, up);
    sim_free(sim, logits);
    free_all(sim, held->d, held->d_len); /* `loss = ...` drops the last step's graph */
    held->d_len = 0;
    free_all(sim, l->cache.d, l->cache.d_len);
    int64_t g_nll = sim_new(sim, p->vocab_fp32);
    int64_t g_in = sim_new(sim, p->vocab_fp32);
    sim_free(sim, g_nll);
    sim_free(sim, lsm);
    int64_t g_logits = g_in;
    if (p->logits_fp32) {
        g_logits = sim_new(sim, p->logits);
        sim_free(sim, g_in);
    }
    if (tanh_out) { /* backward through * cap, tanh (its saved result released after) and / cap */
        int64_t g_tanh = sim_new(sim, p->logits);
        sim_free(sim, g_logits);
        int64_t g_scaled = sim_new(sim, p->logits);
        sim_free(sim, g_tanh);
        sim_free(sim, tanh_out);
        g_logits = sim_new(sim, p->logits);
        sim_free(sim, g_scaled);
    }
    new_all(t, &p->head_grads, grads);
    int64_t g_hidden = sim_new(sim, p->hidden);
    if (workspace) sim_new(sim, workspace); /* the lm_head backward: the backward thread's first matmul */
    sim_free(sim, g_logits);
    if (head_copy) sim_free(sim, head_copy);
    free_all(sim, l->final.d, l->final.d_len);
    if (l->inputs.d_len) sim_free(sim, l->inputs.d[--l->inputs.d_len]);
    int64_t emb = -1;
    for (int64_t layer = 0; layer < p->layers && !ERR(t); layer++) {
        l->unsharded.d_len = l->layer_grads.d_len = l->layer_grad_sizes.d_len = 0;
        if (fsdp) unshard(t, &p->layer_weights, &l->unsharded);
        const int64_t *cp, *saved;
        if (p->checkpoint) {
            l->cp.d_len = l->layer.d_len = 0;
            new_all(t, &p->layer_copies, &l->cp);
            new_all(t, &p->layer_saved, &l->layer);
            cp = l->cp.d;
            saved = l->layer.d;
        } else {
            /* pop the last layer's saved tensors and copies (they stay in the arrays until reused) */
            l->saved.d_len -= nsaved;
            l->copies.d_len -= ncopies;
            cp = l->copies.d + l->copies.d_len;
            saved = l->saved.d + l->saved.d_len;
        }
        if (ERR(t)) break;
        if (p->dequant) new_free(sim, p->dequant);
        int64_t end = nsaved;
        for (int64_t o = p->n_ops - 1; o >= 0; o--) {
            const Op *op = &p->ops[o];
            l->scratch.d_len = 0;
            new_all(t, &op->scratch, &l->scratch);
            int64_t g_next = sim_new(sim, op->grad_in);
            free_all(sim, l->scratch.d, l->scratch.d_len);
            for (int64_t i = 0; i < op->grads.n; i++) {
                int64_t g = sim_new(sim, op->grads.v[i]);
                if (fsdp) { /* reduce-scattered after the layer */
                    vec_push(&l->layer_grads, g, &t->err);
                    vec_push(&l->layer_grad_sizes, op->grads.v[i], &t->err);
                } else {
                    vec_push(grads, g, &t->err);
                }
            }
            free_all(sim, saved + end - op->count, op->count);
            end -= op->count;
            sim_free(sim, g_hidden);
            g_hidden = g_next;
        }
        free_all(sim, cp, ncopies);
        if (fsdp) {
            if (l->layer_grads.d_len)
                reduce_scatter(t, l->layer_grads.d, l->layer_grad_sizes.d, l->layer_grads.d_len, grads);
            free_all(sim, l->unsharded.d, l->unsharded.d_len);
        }
        if (p->checkpoint && l->inputs.d_len) {
            int64_t x = l->inputs.d[--l->inputs.d_len];
            if (l->inputs.d_len || !p->held_input) sim_free(sim, x);
            else emb = x; /* the embedding output, a leaf that requires grad */
        }
    }
    if (ERR(t)) return;
    if (p->embed_grad) vec_push(grads, sim_new(sim, p->embed_grad), &t->err);
    if (p->tied && grads->d_len) {
        int64_t part = sim_new(sim, p->tied);
        int64_t total = sim_new(sim, p->tied);
        sim_free(sim, part);
        sim_free(sim, grads->d[0]);
        grads->d[0] = total;
    }
    if (emb >= 0) { /* g_hidden is its `.grad` (freed first when `loss` goes) */
        vec_push(held, g_hidden, &t->err);
        vec_push(held, emb, &t->err);
    } else {
        sim_free(sim, g_hidden);
    }
    free_all(sim, l->inputs.d, l->inputs.d_len);
    l->inputs.d_len = 0;
    free_all(sim, l->shared.d, l->shared.d_len);
    free_all(sim, l->root.d, l->root.d_len);
    if (fsdp && p->head_grads.n) {
        /* the root reduce-scatters its own gradients (lm_head / embedding / norm) last */
        int64_t nh = p->head_grads.n, extra = p->embed_grad ? 1 : 0;
        l->head.d_len = l->head_sizes.d_len = 0;
        for (int64_t i = 0; i < nh; i++) {
            vec_push(&l->head, grads->d[i], &t->err);
            vec_push(&l->head_sizes, p->head_grads.v[i], &t->err);
        }
        if (extra) {
            vec_push(&l->head, grads->d[grads->d_len - 1], &t->err);
            vec_push(&l->head_sizes, p->embed_grad, &t->err);
        }
        if (ERR(t)) return;
        int64_t rest = grads->d_len - nh - extra;
        memmove(grads->d, grads->d + nh, (size_t)rest * sizeof(int64_t));
        grads->d_len = rest;
        reduce_scatter(t, l->head.d, l->head_sizes.d, l->head.d_len, grads);
    }
}

/* trace._loaded: run the load script (from_pretrained, peft, FSDP2's sharding; loading.py) */
static void load(Sim *sim, const Arr *script) {
    Vec handles = {0, 0, NULL};
    for (int64_t i = 0; i < script->n && !sim->err; i++) {
        int64_t op = script->v[i];
        if (op >= 0) {
            vec_push(&handles, sim_new(sim, op), &sim->err);
        } else if (op == EMPTY_CACHE) {
            sim_empty_cache(sim);
        } else if (-1 - op < handles.d_len) {
            sim_free(sim, handles.d[-1 - op]);
        } else {
            sim->err = 4; /* a free of an allocation the script has not made */
        }
    }
    free(handles.d);
}

/* The training steps, from the loaded state in t->sim. */
static void run(const Plan *p, int64_t steps, Tracer *t) {
    /* the lists are reused between replays (forward_backward empties each before use) */
    static Vec grads = {0, 0, NULL}, temps = {0, 0, NULL}, held = {0, 0, NULL}, buckets = {0, 0, NULL};
    static Lists l;
    Sim *sim = &t->sim;
    held.d_len = 0; /* the last step's tensors that its `loss` keeps alive (Plan.held_input) */
    buckets.d_len = 0; /* DDP's Reducer buckets (ddp.py): made before the first step */
    for (int64_t i = 0; i < p->ddp_buckets.n; i++) vec_push(&buckets, sim_new(sim, p->ddp_buckets.v[i]), &t->err);
    if (p->checkpoint) first_pass_prepare(p, t, &l);
    for (int64_t step = 0; step < steps && !ERR(t); step++) {
        if (step == 1 && p->ddp_rebuilt.n) { /* Reducer::rebuild_buckets before the second forward */
            free_all(sim, buckets.d, buckets.d_len);
            buckets.d_len = 0;
            for (int64_t i = 0; i < p->ddp_rebuilt.n; i++)
                vec_push(&buckets, sim_new(sim, p->ddp_rebuilt.v[i]), &t->err);
        }
        forward_backward(p, t, &l, &grads, step == 0 ? p->workspace : 0, &held);
        if (ERR(t)) break;
        if (step == 0) { /* optimizer states are created lazily inside the first step() */
            for (int64_t i = 0; i < p->opt_states.n; i++) sim_new(sim, p->opt_states.v[i]);
        }
        temps.d_len = 0;
        for (int64_t i = 0; i < p->opt_temps.n; i++) {
            int64_t temp = p->opt_temps.v[i];
            if (temp && p->adafactor) new_free(sim, temp);
            else if (temp) vec_push(&temps, sim_new(sim, temp), &t->err);
        }
        free_all(sim, temps.d, temps.d_len);
        free_all(sim, grads.d, grads.d_len);
    }
    if (grads.d_cap > WORKSPACE_KEPT || temps.d_cap > WORKSPACE_KEPT || l.saved.d_cap > WORKSPACE_KEPT) {
        free(grads.d);
        free(temps.d);
        lists_release(&l);
        memset(&l, 0, sizeof(l));
        grads = temps = (Vec){0, 0, NULL};
    }
}

static void plan_release(Plan *p) {
    Arr *all[] = {&p->opt_states,   &p->opt_temps,   &p->head_grads,    &p->layer_saved,
                  &p->layer_transient, &p->layer_copies, &p->final_saved,   &p->shared,
                  &p->layer_weights,   &p->root_weights, &p->ddp_buckets,   &p->ddp_rebuilt};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) free(all[i]->v);
    for (int64_t i = 0; i < p->n_ops; i++) {
        free(p->ops[i].grads.v);
        free(p->ops[i].scratch.v);
        free(p->ops[i].dequant.v);
    }
    free(p->ops);
}

static int parse_ops(PyObject *obj, Plan *p) {
    PyObject *seq = PySequence_Fast(obj, "layer_ops: expected a sequence");
    if (!seq) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    p->ops = (Op *)calloc((size_t)(n ? n : 1), sizeof(Op));
    if (!p->ops) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    p->n_ops = n;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *count, *grads, *grad_in, *scratch, *dequant;
        int rc;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "OOOOO", &count, &grads, &grad_in, &scratch,
                              &dequant)) {
            Py_DECREF(seq);
            return -1;
        }
        if ((rc = to_arr(grads, &p->ops[i].grads)) || (rc = to_arr(scratch, &p->ops[i].scratch)) ||
            (rc = to_arr(dequant, &p->ops[i].dequant))) {
            Py_DECREF(seq);
            return rc;
        }
        p->ops[i].count = PyLong_AsLongLong(count);
        p->ops[i].grad_in = PyLong_AsLongLong(grad_in);
        if (PyErr_Occurred()) {
            Py_DECREF(seq);
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
            PyErr_Clear();
            return TOO_BIG;
        }
        if (p->ops[i].grad_in < 0 || p->ops[i].grad_in > MAX_TENSOR || p->ops[i].count < 0) {
            Py_DECREF(seq);
            return TOO_BIG;
        }
    }
    Py_DECREF(seq);
    return 0;
}

#define OVERFLOWED 1

/* Parse the plan after (script, shards) from `args[first:]`: 0, -1 (Python error set),
 * TOO_BIG or OVERFLOWED (a size past the C replay's range: the caller answers None). */
static int parse_rest(PyObject *args, Py_ssize_t first, Plan *p, long long *steps) {
    PyObject *rest = PyTuple_GetSlice(args, first, PyTuple_GET_SIZE(args));
    if (!rest) return -1;
    PyObject *ops, *opt_states, *opt_temps, *head_grads, *layer_saved, *layer_transient, *layer_copies,
        *final_saved, *shared, *layer_weights, *root_weights, *ddp_buckets, *ddp_rebuilt;
    long long layers, adafactor, embed_grad, tied, head_copy, cache_copies, checkpoint, hidden, logits,
        logits_fp32, vocab_fp32, dequant;
    long long softcap, workspace, transient_op, held_input;
    int ok = PyArg_ParseTuple(rest, "LOOOLOLLOOOLLLOLLLLOLOOLLLLOOL", &layers, &ops, &opt_states, &opt_temps,
                              &adafactor, &head_grads, &embed_grad, &tied, &layer_saved, &layer_transient,
                              &layer_copies, &head_copy, &cache_copies, &checkpoint, &final_saved, &hidden,
                              &logits, &logits_fp32, &vocab_fp32, &shared, &dequant, &layer_weights,
                              &root_weights, &softcap, &workspace, &transient_op, &held_input, &ddp_buckets,
                              &ddp_rebuilt, steps);
    if (!ok) {
        Py_DECREF(rest);
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
        PyErr_Clear();
        return OVERFLOWED;
    }
    p->layers = layers;
    p->adafactor = adafactor;
    p->embed_grad = embed_grad;
    p->tied = tied;
    p->head_copy = head_copy;
    p->cache_copies = cache_copies;
    p->checkpoint = checkpoint;
    p->hidden = hidden;
    p->logits = logits;
    p->logits_fp32 = logits_fp32;
    p->vocab_fp32 = vocab_fp32;
    p->dequant = dequant;
    p->softcap = softcap;
    p->workspace = workspace;
    p->transient_op = transient_op;
    p->held_input = held_input;
    int rc;
    if ((rc = parse_ops(ops, p)) || (rc = to_arr(opt_states, &p->opt_states)) ||
        (rc = to_arr(opt_temps, &p->opt_temps)) || (rc = to_arr(head_grads, &p->head_grads)) ||
        (rc = to_arr(layer_saved, &p->layer_saved)) || (rc = to_arr(layer_transient, &p->layer_transient)) ||
        (rc = to_arr(layer_copies, &p->layer_copies)) || (rc = to_arr(final_saved, &p->final_saved)) ||
        (rc = to_arr(shared, &p->shared)) || (rc = to_arr(layer_weights, &p->layer_weights)) ||
        (rc = to_arr(root_weights, &p->root_weights)) || (rc = to_arr(ddp_buckets, &p->ddp_buckets)) ||
        (rc = to_arr(ddp_rebuilt, &p->ddp_rebuilt))) {
        Py_DECREF(rest);
        return rc;
    }
    Py_DECREF(rest);
    int64_t scalars[] = {p->embed_grad, p->tied,  p->head_copy, p->hidden, p->logits,
                         p->logits_fp32, p->vocab_fp32, p->dequant, p->layers, p->workspace};
    for (size_t i = 0; i < sizeof(scalars) / sizeof(scalars[0]); i++) {
        if (scalars[i] < 0 || scalars[i] > MAX_TENSOR) return TOO_BIG;
    }
    return 0;
}

/* Replay the steps of `p` from the snapshot `ld`; the (peak allocated, peak reserved) tuple, or NULL
 * with a Python error. */
static PyObject *replay(const Plan *p, const Loaded *ld, long long steps) {
    /* the allocators are reused between replays (the GIL serializes the calls; nothing in a replay
     * calls back into Python) */
    static Tracer t;
    sim_restore(&t.sim, ld);
    sim_reset(&t.ag, t.sim.base);
    sim_reset(&t.rs, t.sim.base);
    t.ag_held = t.rs_held = -1;
    t.shards = p->shards;
    t.peak = 0;
    t.err = 0;
    if (!t.sim.err) run(p, steps, &t);
    fold(&t);
    int err = t.err ? t.err : (t.sim.err ? t.sim.err : (t.ag.err ? t.ag.err : t.rs.err));
    long long alloc = t.peak;
    long long reserved = t.sim.reserved + t.ag.reserved + t.rs.reserved; /* as trace.simulate_py */
    if (t.sim.peak_reserved > reserved) reserved = t.sim.peak_reserved;
    Sim *sims[] = {&t.sim, &t.ag, &t.rs};
    for (int i = 0; i < 3; i++) {
        if (sims[i]->cap_live > WORKSPACE_KEPT || sims[i]->cap_blocks > WORKSPACE_KEPT) {
            sim_release(sims[i]);
            memset(sims[i], 0, sizeof(Sim));
        }
    }
    if (err == PAST_RANGE) Py_RETURN_NONE;
    if (err == 1) return PyErr_NoMemory();
    if (err) {
        PyErr_Format(PyExc_RuntimeError, "allocator replay: inconsistent trace (code %d)", err);
        return NULL;
    }
    return Py_BuildValue("(LL)", alloc, reserved);
}

#define LOADED "tunefit._replay.Loaded"

static void loaded_free(PyObject *capsule) {
    Loaded *ld = (Loaded *)PyCapsule_GetPointer(capsule, LOADED);
    if (!ld) return;
    loaded_release(ld);
    free(ld);
}

/* The snapshot after the load script into `out`: 0, -1, TOO_BIG or OVERFLOWED. */
static int load_args(PyObject *script_obj, long long shards, Loaded *out) {
    if (shards < 1) {
        PyErr_SetString(PyExc_ValueError, "shards must be at least 1");
        return -1;
    }
    Arr script = {0, NULL};
    int rc = to_script(script_obj, &script);
    if (!rc) {
        Sim sim;
        memset(&sim, 0, sizeof(sim));
        sim.base = 1; /* handles start at 1 */
        load(&sim, &script);
        int err = sim.err;
        if (!err && snapshot(out, &sim)) err = 1;
        out->shards = shards;
        sim_release(&sim);
        if (err) {
            if (err == 1) PyErr_NoMemory();
            else PyErr_Format(PyExc_RuntimeError, "allocator replay: inconsistent load (code %d)", err);
            rc = -1;
        }
    }
    free(script.v);
    return rc;
}

/* load(script, shards): the loaded state as a capsule for resume(), or None (too big). */
static PyObject *py_load(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *script;
    long long shards;
    if (!PyArg_ParseTuple(args, "OL", &script, &shards)) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return NULL;
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    Loaded *ld = (Loaded *)malloc(sizeof(Loaded));
    if (!ld) return PyErr_NoMemory();
    int rc = load_args(script, shards, ld);
    if (rc) {
        free(ld);
        if (rc == -1) return NULL;
        Py_RETURN_NONE;
    }
    PyObject *capsule = PyCapsule_New(ld, LOADED, loaded_free);
    if (!capsule) {
        loaded_release(ld);
        free(ld);
    }
    return capsule;
}

/* resume(loaded, <the plan after shards>, steps): replay the steps from a load() snapshot, which
 * stays unchanged (each call works on its own copy). */
static PyObject *py_resume(PyObject *self, PyObject *args) {
    (void)self;
    if (PyTuple_GET_SIZE(args) < 1) {
        PyErr_SetString(PyExc_TypeError, "resume(loaded, ...): missing the loaded state");
        return NULL;
    }
    Loaded *ld = (Loaded *)PyCapsule_GetPointer(PyTuple_GET_ITEM(args, 0), LOADED);
    if (!ld) return NULL;
    Plan p;
    memset(&p, 0, sizeof(p));
    long long steps = 0;
    int rc = parse_rest(args, 1, &p, &steps);
    PyObject *found = NULL;
    if (rc == 0) {
        p.shards = ld->shards;
        found = replay(&p, ld, steps);
    }
    plan_release(&p);
    if (rc == -1) return NULL;
    if (rc) Py_RETURN_NONE;
    return found;
}

/* simulate(script, shards, <the rest of the plan>, steps): load, then replay. */
static PyObject *py_simulate(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *script, *shards_obj;
    if (PyTuple_GET_SIZE(args) < 2) {
        PyErr_SetString(PyExc_TypeError, "simulate: expected the flattened plan");
        return NULL;
    }
    script = PyTuple_GET_ITEM(args, 0);
    shards_obj = PyTuple_GET_ITEM(args, 1);
    int overflow = 0;
    long long shards = PyLong_AsLongLongAndOverflow(shards_obj, &overflow);
    if (shards == -1 && PyErr_Occurred()) return NULL;
    if (overflow) Py_RETURN_NONE;
    Plan p;
    memset(&p, 0, sizeof(p));
    long long steps = 0;
    int rc = parse_rest(args, 2, &p, &steps);
    Loaded ld;
    if (rc == 0) rc = load_args(script, shards, &ld);
    PyObject *found = NULL;
    if (rc == 0) {
        p.shards = shards;
        found = replay(&p, &ld, steps);
        loaded_release(&ld);
    }
    plan_release(&p);
    if (rc == -1) return NULL;
    if (rc) Py_RETURN_NONE;
    return found;
}

/* ---- templates: one plan per setup shape, its sizes evaluated for each batch x seq ---- */

/* A plan's size that depends on the batch shape: a0 + a1 s + a2 s^2 + b (b0 + b1 s + b2 s^2) bytes for
 * batch b and length s (trace.py fits the six coefficients; every size the plan makes has that form). */
typedef struct {
    int64_t *at;
    int64_t c[6];
} Leaf;

typedef struct {
    Plan p;
    Leaf *leaves;
    int64_t n_leaves;
    PyObject *loaded; /* the load() capsule the steps resume from (a reference held) */
} Template;

#define TEMPLATE "tunefit._replay.Template"

/* Every int of the plan in trace._flat's order after (script, shards), as pointers; `structural[i]`
 * marks the counts and flags (never batch-dependent).  Returns the count, or -1 when out of memory. */
static int64_t plan_leaves(Plan *p, int64_t **out, char *structural) {
    int64_t n = 0;
#define LEAF(ptr, st) do { if (out) { out[n] = (ptr); structural[n] = (st); } n++; } while (0)
#define LEAVES(arr) do { for (int64_t i_ = 0; i_ < (arr).n; i_++) LEAF(&(arr).v[i_], 0); } while (0)
    LEAF(&p->layers, 1);
    for (int64_t o = 0; o < p->n_ops; o++) {
        LEAF(&p->ops[o].count, 1);
        LEAVES(p->ops[o].grads);
        LEAF(&p->ops[o].grad_in, 0);
        LEAVES(p->ops[o].scratch);
        LEAVES(p->ops[o].dequant);
    }
    LEAVES(p->opt_states);
    LEAVES(p->opt_temps);
    LEAF(&p->adafactor, 1);
    LEAVES(p->head_grads);
    LEAF(&p->embed_grad, 0);
    LEAF(&p->tied, 0);
    LEAVES(p->layer_saved);
    LEAVES(p->layer_transient);
    LEAVES(p->layer_copies);
    LEAF(&p->head_copy, 0);
    LEAF(&p->cache_copies, 1);
    LEAF(&p->checkpoint, 1);
    LEAVES(p->final_saved);
    LEAF(&p->hidden, 0);
    LEAF(&p->logits, 0);
    LEAF(&p->logits_fp32, 0);
    LEAF(&p->vocab_fp32, 0);
    LEAVES(p->shared);
    LEAF(&p->dequant, 0);
    LEAVES(p->layer_weights);
    LEAVES(p->root_weights);
    LEAF(&p->softcap, 1);
    LEAF(&p->workspace, 0);
    LEAF(&p->transient_op, 1);
    LEAF(&p->held_input, 1);
    LEAVES(p->ddp_buckets);
    LEAVES(p->ddp_rebuilt);
#undef LEAVES
#undef LEAF
    return n;
}

static void template_free(PyObject *capsule) {
    Template *t = (Template *)PyCapsule_GetPointer(capsule, TEMPLATE);
    if (!t) return;
    plan_release(&t->p);
    free(t->leaves);
    Py_XDECREF(t->loaded);
    free(t);
}

/* The leaves (index, six coefficients) that vary with the batch shape, on the template's plan. */
static int template_leaves(Template *t, PyObject *spec) {
    int64_t total = plan_leaves(&t->p, NULL, NULL);
    int64_t **all = (int64_t **)malloc(sizeof(int64_t *) * (size_t)(total ? total : 1));
    char *structural = (char *)malloc((size_t)(total ? total : 1));
    PyObject *seq = PySequence_Fast(spec, "template: expected a sequence of leaves");
    int rc = -1;
    if (!all || !structural || !seq) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    plan_leaves(&t->p, all, structural);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    t->leaves = (Leaf *)calloc((size_t)(n ? n : 1), sizeof(Leaf));
    if (!t->leaves) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long idx, c[6];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "LLLLLLL", &idx, &c[0], &c[1], &c[2], &c[3],
                              &c[4], &c[5]))
            goto done;
        if (idx < 0 || idx >= total || structural[idx]) {
            PyErr_SetString(PyExc_ValueError, "template: a leaf that is no batch-dependent size");
            goto done;
        }
        t->leaves[i].at = all[idx];
        for (int k = 0; k < 6; k++) t->leaves[i].c[k] = c[k];
    }
    t->n_leaves = n;
    rc = 0;
done:
    Py_XDECREF(seq);
    free(all);
    free(structural);
    return rc;
}

/* template(loaded, leaves, <the plan after shards>): a plan whose batch-dependent sizes resume_at()
 * evaluates; None when a size is past the C replay's range. */
static PyObject *py_template(PyObject *self, PyObject *args) {
    (void)self;
    if (PyTuple_GET_SIZE(args) < 2) {
        PyErr_SetString(PyExc_TypeError, "template(loaded, leaves, ...): missing arguments");
        return NULL;
    }
    PyObject *loaded = PyTuple_GET_ITEM(args, 0);
    Loaded *ld = (Loaded *)PyCapsule_GetPointer(loaded, LOADED);
    if (!ld) return NULL;
    Template *t = (Template *)calloc(1, sizeof(Template));
    if (!t) return PyErr_NoMemory();
    long long steps = 0;
    int rc = parse_rest(args, 2, &t->p, &steps);
    if (rc == 0) rc = template_leaves(t, PyTuple_GET_ITEM(args, 1));
    if (rc) {
        plan_release(&t->p);
        free(t->leaves);
        free(t);
        if (rc == -1) return NULL;
        Py_RETURN_NONE;
    }
    t->p.shards = ld->shards;
    Py_INCREF(loaded);
    t->loaded = loaded;
    PyObject *capsule = PyCapsule_New(t, TEMPLATE, NULL);
    if (!capsule) {
        Py_DECREF(loaded);
        plan_release(&t->p);
        free(t->leaves);
        free(t);
        return NULL;
    }
    if (PyCapsule_SetDestructor(capsule, template_free)) {
        Py_DECREF(capsule);
        return NULL;
    }
    return capsule;
}

/* c0 + c1 s + c2 s^2 into `out`: 0, or -1 past int64. */
static inline int quadratic(const int64_t *c, int64_t s, int64_t *out) {
    int64_t x, y;
    if (__builtin_mul_overflow(c[2], s, &x) || __builtin_add_overflow(x, c[1], &x) ||
        __builtin_mul_overflow(x, s, &x) || __builtin_add_overflow(x, c[0], &y))
        return -1;
    *out = y;
    return 0;
}

/* The template's sizes for batch b and length s: 0, or -1 when one is negative or past MAX_TENSOR. */
static int evaluate(Template *t, int64_t b, int64_t s) {
    for (int64_t i = 0; i < t->n_leaves; i++) {
        const int64_t *c = t->leaves[i].c;
        int64_t per_seq, per_batch, v;
        if (quadratic(c, s, &per_seq) || quadratic(c + 3, s, &per_batch) ||
            __builtin_mul_overflow(per_batch, b, &v) || __builtin_add_overflow(v, per_seq, &v))
            return -1;
        if (v < 0 || v > MAX_TENSOR) return -1;
        *t->leaves[i].at = v;
    }
    return 0;
}

/* resume_at(template, batch, seq, steps): the steps of the template's plan at that batch shape,
 * from its load() snapshot; None when a size is past the C replay's range. */
static PyObject *py_resume_at(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *capsule;
    long long b, s, steps;
    if (!PyArg_ParseTuple(args, "OLLL", &capsule, &b, &s, &steps)) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return NULL;
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    Template *t = (Template *)PyCapsule_GetPointer(capsule, TEMPLATE);
    if (!t) return NULL;
    if (evaluate(t, b, s)) Py_RETURN_NONE;
    Loaded *ld = (Loaded *)PyCapsule_GetPointer(t->loaded, LOADED);
    if (!ld) return NULL;
    return replay(&t->p, ld, steps);
}

static PyMethodDef methods[] = {
    {"simulate", py_simulate, METH_VARARGS, "Replay a flattened trace plan; return (peak allocated, peak reserved)."},
    {"load", py_load, METH_VARARGS, "The allocator after a load script (and the FSDP shards), for resume()."},
    {"resume", py_resume, METH_VARARGS, "Replay the steps of a flattened plan from a load() snapshot."},
    {"template", py_template, METH_VARARGS, "A plan whose batch-dependent sizes resume_at() evaluates."},
    {"resume_at", py_resume_at, METH_VARARGS, "Replay a template's steps at one batch size and length."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_replay", "The allocator replay in C.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__replay(void) { return PyModule_Create(&module); }
