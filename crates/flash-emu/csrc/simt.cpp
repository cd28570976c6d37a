// SIMT emulation core (see simt.h). Fibers are ucontext contexts with mmap'd stacks; a
// scheduler context runs them round-robin, each until it blocks on a barrier or finishes.
#include "simt.h"

#include <sys/mman.h>
#include <ucontext.h>

// swapcontext "returns twice" like setjmp, so GCC warns that the scheduler's locals might be
// clobbered. They are not: every switch back into the scheduler restores the register state
// saved by the very swapcontext call it returns from.
#pragma GCC diagnostic ignored "-Wclobbered"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace simt {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // kernels keep register tiles on the stack

struct Barrier {
    unsigned expected = 0, count = 0, gen = 0;
};

struct Fiber {
    ucontext_t ctx;
    Dim3 tid;
    unsigned linear = 0;
    bool done = false;
    Barrier* waiting = nullptr;  // blocked until waiting->gen != wait_gen
    unsigned wait_gen = 0;
    unsigned collective_seq = 0;  // which exchange slot the next collective uses
};

struct BlockState {
    Dim3 grid, block, idx;
    std::vector<Fiber> fibers;
    std::vector<Barrier> warp_bars;
    std::vector<unsigned char> xchg;  // [warp][slot 0/1][lane][kSlotBytes]
    std::vector<unsigned char> smem;
    Barrier block_bar;
    ucontext_t sched;
    const std::function<void()>* body = nullptr;
    Fiber* cur = nullptr;
};

thread_local BlockState* g_block = nullptr;

void yield() {
    BlockState& b = *g_block;
    swapcontext(&b.cur->ctx, &b.sched);
}

void arrive(Barrier& bar) {
    if (++bar.count == bar.expected) {  // last one in releases the others and goes on
        bar.count = 0;
        ++bar.gen;
        return;
    }
    Fiber* f = g_block->cur;
    f->waiting = &bar;
    f->wait_gen = bar.gen;
    yield();
    f->waiting = nullptr;
}

// A thread that exits stops counting towards the barriers it would have joined.
void leave(Barrier& bar) {
    --bar.expected;
    if (bar.count > 0 && bar.count == bar.expected) {
        bar.count = 0;
        ++bar.gen;
    }
}

void trampoline() {
    BlockState& b = *g_block;
    (*b.body)();
    Fiber* f = b.cur;
    f->done = true;
    leave(b.block_bar);
    leave(b.warp_bars[f->linear / kWarpSize]);
    // returning resumes uc_link, the scheduler
}

void* alloc_stack() {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) fail("cannot map a fiber stack");
    return p;
}

}  // namespace

void launch(Dim3 grid, Dim3 block, size_t shared_bytes, const std::function<void()>& body) {
    const unsigned nthreads = block.x * block.y * block.z;
    if (nthreads == 0 || nthreads > 1024) fail("block size must be 1..1024 threads");
    const unsigned nwarps = (nthreads + kWarpSize - 1) / kWarpSize;
    BlockState b;
    b.grid = grid;
    b.block = block;
    b.body = &body;
    b.fibers.resize(nthreads);
    b.warp_bars.resize(nwarps);
    b.xchg.assign((size_t)nwarps * 2 * kWarpSize * kSlotBytes, 0);
    std::vector<void*> stacks(nthreads);
    for (auto& s : stacks) s = alloc_stack();
    BlockState* saved = g_block;
    g_block = &b;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                b.idx = {bx, by, bz};
                b.smem.assign(shared_bytes, 0);
                b.block_bar = {nthreads, 0, 0};
                for (unsigned w = 0; w < nwarps; ++w)
                    b.warp_bars[w] = {std::min<unsigned>(kWarpSize, nthreads - w * kWarpSize), 0, 0};
                for (unsigned t = 0; t < nthreads; ++t) {
                    Fiber& f = b.fibers[t];
                    f = Fiber{};
                    f.linear = t;
                    f.tid = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = stacks[t];
                    f.ctx.uc_stack.ss_size = kStackBytes;
                    f.ctx.uc_link = &b.sched;
                    makecontext(&f.ctx, trampoline, 0);
                }
                unsigned live = nthreads;
                while (live > 0) {
                    bool progress = false;
                    for (auto& f : b.fibers) {
                        if (f.done || (f.waiting && f.waiting->gen == f.wait_gen)) continue;
                        b.cur = &f;
                        swapcontext(&b.sched, &f.ctx);
                        progress = true;
                        if (f.done) --live;
                    }
                    if (!progress) fail("deadlock: a barrier can never complete (divergent barrier?)");
                }
            }
    g_block = saved;
    for (auto& s : stacks) munmap(s, kStackBytes);
}

Dim3 thread_idx() { return g_block->cur->tid; }
Dim3 block_idx() { return g_block->idx; }
Dim3 block_dim() { return g_block->block; }
Dim3 grid_dim() { return g_block->grid; }
unsigned lane() { return g_block->cur->linear % kWarpSize; }
unsigned char* shared_mem() { return g_block->smem.data(); }
size_t shared_bytes() { return g_block->smem.size(); }

void block_barrier() { arrive(g_block->block_bar); }
void warp_barrier() { arrive(g_block->warp_bars[g_block->cur->linear / kWarpSize]); }

const unsigned char* warp_exchange(const void* mine, size_t bytes) {
    if (bytes > kSlotBytes) fail("warp_exchange payload too large");
    BlockState& b = *g_block;
    Fiber& f = *b.cur;
    const unsigned warp = f.linear / kWarpSize, slot = f.collective_seq++ & 1;
    unsigned char* base = b.xchg.data() + ((size_t)warp * 2 + slot) * kWarpSize * kSlotBytes;
    std::memcpy(base + (f.linear % kWarpSize) * kSlotBytes, mine, bytes);
    warp_barrier();
    return base;
}

void fail(const char* what) {
    if (g_block && g_block->cur) {
        const Dim3 bi = g_block->idx, ti = g_block->cur->tid;
        std::fprintf(stderr, "simt emulator: %s (block %u,%u,%u thread %u,%u,%u)\n", what, bi.x, bi.y,
                     bi.z, ti.x, ti.y, ti.z);
    } else {
        std::fprintf(stderr, "simt emulator: %s\n", what);
    }
    std::abort();
}

}  // namespace simt
