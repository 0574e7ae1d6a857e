/* emu_cuda.h: just enough of CUDA to run tide.cpp's kernels on the CPU, so their index math,
 * shuffles, barriers and the backend's host logic can be checked on a machine without a GPU.
 * Not a performance tool and not a faithful memory model: every block runs alone, its threads
 * as cooperative fibers (ucontext) that switch only at __shfl_xor_sync and __syncthreads; device
 * memory is host memory; streams and events are no-ops because everything runs at once.
 *
 *   g++ -O1 -std=c++17 -DTIDE_CUDA_EMU -DTIDE_CUDA=1 -x c++ -Ibench/gpu/emu -Inative/include \
 *       -Inative/src bench/gpu/test_ops.cu native/src/cuda/[each .cu] -o build/test_ops_emu
 *
 * The whole library can be built the same way (C sources with -DTIDE_CUDA=1, the .cu files as
 * above, linked into one .so): device="cuda" then runs the real kernels under forward.c / moe.c
 * (tests/test_cuda.py::test_forward_on_cpu_emulator).
 *
 * Only what the kernels use: 1-D blocks, warps of 32, xor shuffles of 4-byte values. It cannot
 * find races or a missing __syncthreads (threads switch only at those points), nor anything about
 * speed; that needs a GPU (bench/gpu/run_h200.sh). */
#ifndef TIDE_EMU_CUDA_H
#define TIDE_EMU_CUDA_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define TCU_DYN_SHARED(type, name) type *name = (type *)emu::dyn_smem.data()

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float4 { float x, y, z, w; };
struct uint4 { unsigned x, y, z, w; };

using std::max;
using std::min;

template <class T> inline T __ldg(const T *p) { return *p; }
inline float __uint_as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* ---- half ---- */
struct __half_raw { unsigned short x; };
struct __half {
    unsigned short x;
    __half() : x(0) {}
    __half(__half_raw r) : x(r.x) {}
    operator __half_raw() const { return __half_raw{x}; }
};
inline __half __ushort_as_half(unsigned short u) { return __half(__half_raw{u}); }
inline float __half2float(__half h) {
    uint32_t s = (uint32_t)(h.x & 0x8000) << 16, e = (h.x >> 10) & 0x1f, m = h.x & 0x3ff, u;
    if (e == 0) {
        if (m == 0) u = s;
        else { /* subnormal */
            float f = ldexpf((float)m, -24);
            memcpy(&u, &f, 4);
            u |= s;
        }
    } else if (e == 31) u = s | 0x7f800000u | (m << 13);
    else u = s | ((e + 112) << 23) | (m << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline __half __float2half(float f) { /* round to nearest even, via the exact float math */
    unsigned short s = signbit(f) ? 0x8000 : 0;
    float a = fabsf(f);
    unsigned short bits;
    if (isnan(a)) bits = 0x7e00;
    else if (a >= 65520.0f) bits = 0x7c00;
    else if (a < ldexpf(1.0f, -14)) bits = (unsigned short)nearbyintf(a * ldexpf(1.0f, 24)); /* subnormal */
    else {
        int e;
        float m = frexpf(a, &e); /* a = m * 2^e, m in [0.5, 1) */
        int q = (int)nearbyintf(ldexpf(m, 11)); /* 11 significant bits */
        if (q == 2048) { q = 1024; e++; }
        bits = (unsigned short)(((e + 14) << 10) | (q - 1024));
        if (e + 14 >= 31) bits = 0x7c00;
    }
    return __ushort_as_half((unsigned short)(s | bits));
}
inline __half __float2half_rn(float f) { return __float2half(f); }
inline unsigned short __half_as_ushort(__half h) { return h.x; }

/* ---- runtime API ---- */
typedef int cudaError_t;
enum {
    cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2,
    cudaErrorInsufficientDriver = 35, cudaErrorInvalidDeviceFunction = 98,
    cudaErrorNoKernelImageForDevice = 209,
};
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost,
                      cudaMemcpyDeviceToDevice, cudaMemcpyDefault };
enum { cudaStreamNonBlocking = 1, cudaEventDisableTiming = 2, cudaHostRegisterPortable = 1,
       cudaHostRegisterReadOnly = 8, cudaDevAttrComputeCapabilityMajor = 75 };
struct emu_obj { int dummy; };
typedef emu_obj *cudaStream_t;
typedef emu_obj *cudaEvent_t;
struct cudaDeviceProp { char name[256]; int major, minor, multiProcessorCount; };
struct cudaFuncAttributes { int numRegs; };

namespace emu {
inline size_t dev_total = (size_t)8 << 30, dev_used = 0;
inline std::vector<char> dyn_smem;
}

inline const char *cudaGetErrorString(cudaError_t e) { return e ? "emulated error" : "no error"; }
inline const char *cudaGetErrorName(cudaError_t e) { return e ? "cudaErrorEmulated" : "cudaSuccess"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int *c) { *c = 1; return cudaSuccess; }
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int) {
    memset(p, 0, sizeof *p);
    strcpy(p->name, "emulated GPU");
    p->major = 9;
    p->multiProcessorCount = 4;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int *v, int, int) { *v = 9; return cudaSuccess; }
template <class F> inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *a, F) { a->numRegs = 0; return cudaSuccess; }
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned) { *s = new emu_obj(); return cudaSuccess; }
inline cudaError_t cudaStreamDestroy(cudaStream_t s) { delete s; return cudaSuccess; }
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned) { *e = new emu_obj(); return cudaSuccess; }
inline cudaError_t cudaEventDestroy(cudaEvent_t e) { delete e; return cudaSuccess; }
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned) { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaMalloc(void **p, size_t n) {
    if (emu::dev_used + n > emu::dev_total) return cudaErrorMemoryAllocation;
    *p = aligned_alloc(256, (n + 255) & ~(size_t)255);
    if (!*p) return cudaErrorMemoryAllocation;
    memset(*p, 0xA5, n); /* garbage, as device memory is */
    emu::dev_used += n;  /* not given back on free: good enough for a test */
    return cudaSuccess;
}
inline cudaError_t cudaFree(void *p) { free(p); return cudaSuccess; }
inline cudaError_t cudaMallocHost(void **p, size_t n) { *p = aligned_alloc(4096, (n + 4095) & ~(size_t)4095); return *p ? cudaSuccess : cudaErrorMemoryAllocation; }
inline cudaError_t cudaFreeHost(void *p) { free(p); return cudaSuccess; }
inline cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind, cudaStream_t) { memmove(d, s, n); return cudaSuccess; }
inline cudaError_t cudaMemGetInfo(size_t *f, size_t *t) { *f = emu::dev_total - emu::dev_used; *t = emu::dev_total; return cudaSuccess; }
inline cudaError_t cudaHostRegister(void *, size_t, unsigned) { return cudaSuccess; }
inline cudaError_t cudaHostUnregister(void *) { return cudaSuccess; }

/* ---- threads as fibers ---- */
namespace emu {
enum { RUN, WAIT_WARP, WAIT_BLOCK, DONE };
struct fiber {
    ucontext_t ctx;
    int state;
    uint32_t val, res;
    int off;
};
inline dim3 g_thread, g_block, g_block_dim, g_grid_dim;
inline ucontext_t sched;
inline std::vector<fiber> fibers;
inline std::vector<char> stacks;
inline int cur;
inline std::function<void()> body;
enum { STACK = 256 << 10 };

inline void yield_to_sched() {
    swapcontext(&fibers[cur].ctx, &sched);
}
inline void entry() {
    body();
    fibers[cur].state = DONE;
}

inline void run_block(unsigned nthreads) {
    if (stacks.size() < (size_t)nthreads * STACK) stacks.resize((size_t)nthreads * STACK);
    fibers.assign(nthreads, fiber{});
    for (unsigned i = 0; i < nthreads; i++) {
        getcontext(&fibers[i].ctx);
        fibers[i].ctx.uc_stack.ss_sp = stacks.data() + (size_t)i * STACK;
        fibers[i].ctx.uc_stack.ss_size = STACK;
        fibers[i].ctx.uc_link = &sched;
        makecontext(&fibers[i].ctx, (void (*)())entry, 0);
        fibers[i].state = RUN;
    }
    for (;;) {
        for (unsigned i = 0; i < nthreads; i++)
            if (fibers[i].state == RUN) {
                cur = (int)i;
                g_thread = dim3(i);
                swapcontext(&sched, &fibers[i].ctx);
            }
        bool all_done = true, released = false;
        for (unsigned i = 0; i < nthreads; i++) all_done = all_done && fibers[i].state == DONE;
        if (all_done) return;
        for (unsigned w = 0; w * 32 < nthreads; w++) { /* shuffles: a warp whose live lanes all wait */
            unsigned lo = w * 32, hi = std::min(nthreads, lo + 32);
            bool all = true, any = false;
            for (unsigned i = lo; i < hi; i++) {
                if (fibers[i].state == DONE) continue;
                any = true;
                all = all && fibers[i].state == WAIT_WARP;
            }
            if (!any || !all) continue;
            for (unsigned i = lo; i < hi; i++) {
                if (fibers[i].state != WAIT_WARP) continue;
                unsigned p = lo + ((i - lo) ^ (unsigned)fibers[i].off);
                if (p >= hi || fibers[p].state == DONE) {
                    fprintf(stderr, "emu: shuffle with an exited or missing lane\n");
                    abort();
                }
                fibers[i].res = fibers[p].val;
            }
            for (unsigned i = lo; i < hi; i++)
                if (fibers[i].state == WAIT_WARP) fibers[i].state = RUN;
            released = true;
        }
        if (!released) { /* a block barrier: every live thread waits */
            bool all = true;
            for (unsigned i = 0; i < nthreads; i++)
                if (fibers[i].state != DONE) all = all && fibers[i].state == WAIT_BLOCK;
            if (all) {
                for (unsigned i = 0; i < nthreads; i++)
                    if (fibers[i].state == WAIT_BLOCK) fibers[i].state = RUN;
                released = true;
            }
        }
        if (!released) {
            fprintf(stderr, "emu: deadlock (threads wait at different barriers)\n");
            abort();
        }
    }
}

template <class K> struct launch {
    dim3 grid, block;
    size_t smem;
    K k;
    template <class... A> void operator()(A... a) {
        dyn_smem.assign(smem + 16, 0);
        g_grid_dim = grid;
        g_block_dim = block;
        body = [&]() { k(a...); };
        for (unsigned z = 0; z < grid.z; z++)
            for (unsigned y = 0; y < grid.y; y++)
                for (unsigned x = 0; x < grid.x; x++) {
                    g_block = dim3(x, y, z);
                    run_block(block.x * block.y * block.z);
                }
    }
};
template <class K> launch<K> make_launch(dim3 g, dim3 b, size_t s, K k) { return launch<K>{g, b, s, k}; }
} // namespace emu

#define threadIdx (emu::g_thread)
#define blockIdx (emu::g_block)
#define blockDim (emu::g_block_dim)
#define gridDim (emu::g_grid_dim)
#define TCU_LAUNCH(kernel, grid, block, smem, stream) emu::make_launch(dim3(grid), dim3(block), (size_t)(smem), kernel)

template <class T> inline T __shfl_xor_sync(unsigned, T v, int off) {
    static_assert(sizeof(T) == 4, "emu: 4-byte shuffles only");
    emu::fiber &f = emu::fibers[emu::cur];
    memcpy(&f.val, &v, 4);
    f.off = off;
    f.state = emu::WAIT_WARP;
    emu::yield_to_sched();
    T r;
    memcpy(&r, &emu::fibers[emu::cur].res, 4);
    return r;
}
inline void __syncthreads() {
    emu::fibers[emu::cur].state = emu::WAIT_BLOCK;
    emu::yield_to_sched();
}

#endif /* TIDE_EMU_CUDA_H */
