/* h2d_bw.cu: host-to-device copy bandwidth as the engine sees it, for the planner's hardware
 * profile and to check the expert path:
 *   - pinned (cudaMallocHost), the ceiling;
 *   - registered (malloc + cudaHostRegister), what pin_host gives anonymous memory;
 *   - registered read-only mmap of a file (cudaHostRegisterReadOnly), what pin_host gives the
 *     GGUF's expert range (pass a file: h2d_bw FILE);
 *   - pageable, the fallback without registration;
 * each for one mini expert (6 MiB, as three 2 MiB matrices, the engine's unit of transfer) and for
 * a 256 MiB block, plus device-to-host. Prints one line per case: MiB, GB/s.
 *
 *   nvcc -O2 -arch=sm_90 bench/gpu/h2d_bw.cu -o h2d_bw && ./h2d_bw [FILE]
 */
#include <cuda_runtime.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define CK(call)                                                                                   \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            printf("%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_));            \
            return -1.0;                                                                           \
        }                                                                                          \
    } while (0)

/* GB/s of `reps` copies of `bytes` split in `pieces` cudaMemcpyAsync calls on one stream. */
static double bw(void *dst, const void *src, size_t bytes, int pieces, int reps, cudaMemcpyKind kind,
                 cudaStream_t s) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    size_t piece = bytes / pieces;
    for (int w = 0; w < 2; w++) /* warm-up */
        for (int p = 0; p < pieces; p++)
            CK(cudaMemcpyAsync((char *)dst + p * piece, (const char *)src + p * piece, piece, kind, s));
    CK(cudaEventRecord(a, s));
    for (int r = 0; r < reps; r++)
        for (int p = 0; p < pieces; p++)
            CK(cudaMemcpyAsync((char *)dst + p * piece, (const char *)src + p * piece, piece, kind, s));
    CK(cudaEventRecord(b, s));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return (double)bytes * reps / (ms * 1e-3) / 1e9;
}

static void line(const char *what, size_t bytes, double gbs) {
    printf("%-44s %8.1f MiB  %7.2f GB/s\n", what, bytes / 1048576.0, gbs);
    fflush(stdout);
}

int main(int argc, char **argv) {
    const size_t big = 256u << 20, expert = 6u << 20;
    cudaStream_t s;
    void *dev = nullptr;
    if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess || cudaMalloc(&dev, big) != cudaSuccess) {
        printf("no CUDA device\n");
        return 1;
    }
    cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, 0);
    printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);

    void *pinned = nullptr;
    if (cudaMallocHost(&pinned, big) == cudaSuccess) {
        memset(pinned, 1, big);
        line("pinned H2D, one expert (3 x 2 MiB)", expert, bw(dev, pinned, expert, 3, 50, cudaMemcpyHostToDevice, s));
        line("pinned H2D, 256 MiB", big, bw(dev, pinned, big, 1, 10, cudaMemcpyHostToDevice, s));
        line("pinned D2H, 256 MiB", big, bw(pinned, dev, big, 1, 10, cudaMemcpyDeviceToHost, s));
        cudaFreeHost(pinned);
    }

    void *heap = nullptr;
    if (posix_memalign(&heap, 4096, big) == 0) {
        memset(heap, 2, big);
        line("pageable H2D, one expert", expert, bw(dev, heap, expert, 3, 20, cudaMemcpyHostToDevice, s));
        line("pageable H2D, 256 MiB", big, bw(dev, heap, big, 1, 4, cudaMemcpyHostToDevice, s));
        if (cudaHostRegister(heap, big, cudaHostRegisterPortable) == cudaSuccess) {
            line("registered H2D, one expert", expert, bw(dev, heap, expert, 3, 50, cudaMemcpyHostToDevice, s));
            line("registered H2D, 256 MiB", big, bw(dev, heap, big, 1, 10, cudaMemcpyHostToDevice, s));
            cudaHostUnregister(heap);
        } else {
            printf("cudaHostRegister(heap) failed: %s\n", cudaGetErrorString(cudaGetLastError()));
        }
        free(heap);
    }

    if (argc > 1) { /* a read-only private mapping of a file, as the engine maps the GGUF */
        int fd = open(argv[1], O_RDONLY);
        struct stat st;
        if (fd >= 0 && fstat(fd, &st) == 0 && (size_t)st.st_size >= big) {
            void *m = mmap(nullptr, big, PROT_READ, MAP_PRIVATE, fd, 0);
            if (m != MAP_FAILED) {
                volatile char sink = 0;
                for (size_t i = 0; i < big; i += 4096) sink += ((const char *)m)[i]; /* fault in */
                (void)sink;
                cudaError_t e = cudaHostRegister(m, big, cudaHostRegisterPortable | cudaHostRegisterReadOnly);
                if (e == cudaSuccess) {
                    line("registered read-only mmap H2D, one expert", expert,
                         bw(dev, m, expert, 3, 50, cudaMemcpyHostToDevice, s));
                    line("registered read-only mmap H2D, 256 MiB", big, bw(dev, m, big, 1, 10, cudaMemcpyHostToDevice, s));
                    cudaHostUnregister(m);
                } else {
                    printf("cudaHostRegister(read-only mmap) failed: %s\n", cudaGetErrorString(e));
                    (void)cudaGetLastError();
                    line("pageable mmap H2D, 256 MiB", big, bw(dev, m, big, 1, 4, cudaMemcpyHostToDevice, s));
                }
                munmap(m, big);
            }
        } else {
            printf("%s: missing or smaller than 256 MiB, mmap case skipped\n", argv[1]);
        }
        if (fd >= 0) close(fd);
    }
    cudaFree(dev);
    return 0;
}
