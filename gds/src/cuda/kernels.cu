// The scatter and gather kernels of kvfs-gds, compiled at run time by NVRTC
// (gds/src/cuda/device.rs) and, in tests/kernel_cpu.rs, as C++ on the CPU.
typedef unsigned long long u64;
struct Run { u64 src; u64 dst; u64 len; };
struct alignas(16) V16 { u64 a; u64 b; };

__device__ __forceinline__ void copy_bytes(unsigned char* d, const unsigned char* s, u64 n) {
    if ((((u64)d | (u64)s | n) & 15ull) == 0) {
        V16* d16 = (V16*)d;
        const V16* s16 = (const V16*)s;
        u64 n16 = n >> 4;
        for (u64 i = threadIdx.x; i < n16; i += blockDim.x) d16[i] = s16[i];
    } else {
        for (u64 i = threadIdx.x; i < n; i += blockDim.x) d[i] = s[i];
    }
}

__device__ __forceinline__ bool clip(const Run& r, u64 win_start, u64 win_len, u64* lo, u64* hi) {
    u64 end = win_start + win_len;
    u64 rend = r.src + r.len;
    *lo = r.src > win_start ? r.src : win_start;
    *hi = rend < end ? rend : end;
    return *lo < *hi;
}

extern "C" __global__ void kvfs_scatter(const unsigned char* win, u64 win_start, u64 win_len,
                                        const Run* runs, unsigned int first, unsigned int count) {
    for (unsigned int k = blockIdx.x; k < count; k += gridDim.x) {
        Run r = runs[first + k];
        u64 lo, hi;
        if (!clip(r, win_start, win_len, &lo, &hi)) continue;
        copy_bytes((unsigned char*)(r.dst + (lo - r.src)), win + (lo - win_start), hi - lo);
    }
}

extern "C" __global__ void kvfs_gather(unsigned char* win, u64 win_start, u64 win_len,
                                       const Run* runs, unsigned int first, unsigned int count) {
    for (unsigned int k = blockIdx.x; k < count; k += gridDim.x) {
        Run r = runs[first + k];
        u64 lo, hi;
        if (!clip(r, win_start, win_len, &lo, &hi)) continue;
        copy_bytes(win + (lo - win_start), (const unsigned char*)(r.dst + (lo - r.src)), hi - lo);
    }
}
