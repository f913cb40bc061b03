//! The CUDA scatter/gather kernels, compiled as C++ with the host compiler and run on the CPU
//! by a sequential grid emulator, compared byte for byte with the host reference.
//!
//! This checks the kernel source (syntax, clipping, grid-stride and thread loops, the 16-byte
//! vector path and the byte path) and the host-side launch parameters (`runs_overlapping`)
//! without a GPU. The kernels have no shared memory or barriers, so running every thread of
//! every block one after the other is a faithful execution. Skips, saying why, when no C++
//! compiler is installed (a failure under `KVFS_REQUIRE=cc`: tests/support/require.rs).

use std::path::Path;
use std::process::Command;

use kvfs_gds::cuda::KERNEL_SRC;
use kvfs_gds::{PagedLayout, ScatterPlan, Segment};

#[path = "../../tests/support/require.rs"]
mod require;

const PRELUDE: &str = r#"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
struct Dim3 { unsigned int x, y, z; };
static Dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
"#;

const DRIVER: &str = r#"
typedef unsigned long long u64_t;
static u64_t rd(FILE* f) { u64_t v; if (fread(&v, 8, 1, f) != 1) exit(3); return v; }
template <class F> static void launch(unsigned grid, unsigned block, F f) {
    gridDim = {grid, 1, 1}; blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; b++) { blockIdx = {b, 0, 0};
        for (unsigned t = 0; t < block; t++) { threadIdx = {t, 0, 0}; f(); } }
}
int main(int argc, char** argv) {
    FILE* in = fopen(argv[1], "rb");
    u64_t stream_len = rd(in), dst_len = rd(in), n_runs = rd(in), n_win = rd(in);
    // 16-byte aligned buffers (+16 so unaligned offsets stay inside).
    unsigned char* stream = (unsigned char*)aligned_alloc(16, stream_len + 16);
    unsigned char* arena = (unsigned char*)aligned_alloc(16, dst_len + 16);
    unsigned char* back = (unsigned char*)aligned_alloc(16, stream_len + 16);
    memset(arena, 0xee, dst_len); memset(back, 0, stream_len);
    if (fread(stream, 1, stream_len, in) != stream_len) return 3;
    std::vector<Run> runs(n_runs);
    for (auto& r : runs) { r.src = rd(in); r.dst = rd(in) + (u64_t)arena; r.len = rd(in); }
    for (u64_t w = 0; w < n_win; w++) {
        u64_t start = rd(in), len = rd(in), first = rd(in), count = rd(in), grid = rd(in), block = rd(in);
        launch(grid, block, [&] { kvfs_scatter(stream + start, start, len, runs.data(), first, count); });
        launch(grid, block, [&] { kvfs_gather(back + start, start, len, runs.data(), first, count); });
    }
    FILE* out = fopen(argv[2], "wb");
    fwrite(arena, 1, dst_len, out); fwrite(back, 1, stream_len, out); fclose(out);
    return 0;
}
"#;

fn compile(dir: &Path) -> Option<std::path::PathBuf> {
    let src = dir.join("kernel.cpp");
    std::fs::write(&src, format!("{PRELUDE}{KERNEL_SRC}{DRIVER}")).unwrap();
    let exe = dir.join("kernel");
    let out = Command::new("c++")
        .args(["-std=c++17", "-O1", "-Wall", "-Wno-unused-function", "-o"])
        .arg(&exe)
        .arg(&src)
        .output();
    match out {
        Err(e) => {
            require::need("cc", Err(format!("no C++ compiler (c++: {e})")));
            None
        }
        Ok(o) => {
            assert!(
                o.status.success(),
                "KERNEL_SRC does not compile as C++:\n{}",
                String::from_utf8_lossy(&o.stderr)
            );
            Some(exe)
        }
    }
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn kernels_scatter_and_gather_like_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let Some(exe) = compile(dir.path()) else {
        return;
    };
    let mut rng = Rng(0xabcd_ef01_2345_6789);
    for round in 0..25 {
        // Row sizes that are multiples of 16 exercise the vector path, others the byte path.
        let row_bytes = if round % 2 == 0 {
            16 * (1 + rng.below(8))
        } else {
            1 + rng.below(100)
        };
        let block_size = 1 + rng.below(6);
        let layout = PagedLayout {
            block_size,
            block_stride: block_size * row_bytes + 16 * rng.below(2),
            slot_stride: row_bytes,
            row_bytes,
        };
        let n_tokens = 1 + rng.below(40);
        let blocks = n_tokens.div_ceil(block_size);
        let mut table: Vec<u32> = (0..blocks as u32).collect();
        for i in (1..table.len()).rev() {
            table.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let tensor = blocks * layout.block_stride;
        let segments: Vec<Segment> = (0..4)
            .map(|i| Segment {
                layer: i / 2,
                src_offset: i as u64 * n_tokens * row_bytes,
                dst_base: i as u64 * tensor,
                first_token: 0,
                n_tokens,
            })
            .collect();
        let plan = ScatterPlan::from_block_table(&layout, &table, &segments).unwrap();
        let stream_len = plan.src_len();
        let dst_len = 4 * tensor;
        let stream: Vec<u8> = (0..stream_len).map(|_| rng.below(256) as u8).collect();
        let mut want = vec![0xeeu8; dst_len as usize];
        plan.apply_host(&stream, &mut want).unwrap();
        // Bytes no run reads stay zero in the gathered stream.
        let mut want_back = vec![0u8; stream_len as usize];
        for r in plan.runs() {
            want_back[r.src as usize..(r.src + r.len) as usize]
                .copy_from_slice(&want[r.dst as usize..(r.dst + r.len) as usize]);
        }
        // Windows: the stream cut at random points, as fills and pieces cut it.
        let mut input: Vec<u8> = Vec::new();
        let put = |v: u64, buf: &mut Vec<u8>| buf.extend_from_slice(&v.to_le_bytes());
        let mut windows = Vec::new();
        let mut pos = 0;
        while pos < stream_len {
            // Even rounds: 16-byte multiples, so aligned runs take the vector path.
            let len = if round % 2 == 0 {
                16 * (1 + rng.below(20))
            } else {
                1 + rng.below(300)
            };
            let len = len.min(stream_len - pos);
            windows.push((pos, len));
            pos += len;
        }
        put(stream_len, &mut input);
        put(dst_len, &mut input);
        put(plan.runs().len() as u64, &mut input);
        put(windows.len() as u64, &mut input);
        input.extend_from_slice(&stream);
        for r in plan.runs() {
            put(r.src, &mut input);
            put(r.dst, &mut input);
            put(r.len, &mut input);
        }
        for (start, len) in windows {
            let range = plan.runs_overlapping(start, start + len);
            let count = range.len() as u64;
            put(start, &mut input);
            put(len, &mut input);
            put(range.start as u64, &mut input);
            put(count, &mut input);
            put(count.clamp(1, 3), &mut input); // a small grid exercises the grid-stride loop
            put(4, &mut input); // and a small block the thread loop
        }
        let (inp, outp) = (dir.path().join("in"), dir.path().join("out"));
        std::fs::write(&inp, &input).unwrap();
        let st = Command::new(&exe).arg(&inp).arg(&outp).status().unwrap();
        assert!(st.success(), "round {round}: emulator failed");
        let out = std::fs::read(&outp).unwrap();
        let (arena, back) = out.split_at(dst_len as usize);
        assert!(
            arena == want.as_slice(),
            "round {round}: scatter kernel differs"
        );
        assert!(
            back == want_back.as_slice(),
            "round {round}: gather kernel differs"
        );
    }
}
