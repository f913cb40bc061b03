//! Shared by the host and GPU tests: random paged layouts over random real files.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;

use kvfs_gds::direct::open_read;
use kvfs_gds::{PagedLayout, ReadExtent, ScatterPlan, Segment};

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A random paged layout, block table and segment list, plus extents over `files`.
pub struct Case {
    pub plan: ScatterPlan,
    pub extents: Vec<ReadExtent>,
    pub dst_len: usize,
    pub layout: PagedLayout,
    pub table: Vec<u32>,
    pub segments: Vec<Segment>,
}

impl Case {
    /// The same plan with every destination shifted by `base` (a device address).
    pub fn plan_at(&self, base: u64) -> ScatterPlan {
        let segs: Vec<Segment> = self
            .segments
            .iter()
            .map(|s| Segment {
                dst_base: s.dst_base + base,
                ..*s
            })
            .collect();
        ScatterPlan::from_block_table(&self.layout, &self.table, &segs).unwrap()
    }
}

pub fn random_case(rng: &mut Rng, files: &[(File, Vec<u8>)]) -> Case {
    let row_bytes = 16 * (1 + rng.below(40));
    let block_size = 1 + rng.below(8);
    let slot_stride = row_bytes + 16 * rng.below(2);
    let block_stride = block_size * slot_stride + 16 * rng.below(3);
    let layers = 1 + rng.below(4);
    let first_token = rng.below(20);
    let n_tokens = 1 + rng.below(60);
    let blocks = (first_token + n_tokens).div_ceil(block_size) as usize;
    // A random permutation of blocks, so destination runs jump around.
    let mut table: Vec<u32> = (0..blocks as u32).collect();
    for i in (1..table.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        table.swap(i, j);
    }
    let tensor = blocks as u64 * block_stride;
    let mut segments = Vec::new();
    let mut src = 0;
    for l in 0..layers {
        for kv in 0..2 {
            segments.push(Segment {
                layer: l as u32,
                src_offset: src,
                dst_base: (l * 2 + kv) * tensor,
                first_token,
                n_tokens,
            });
            src += n_tokens * row_bytes;
        }
    }
    let layout = PagedLayout {
        block_size,
        block_stride,
        slot_stride,
        row_bytes,
    };
    let plan = ScatterPlan::from_block_table(&layout, &table, &segments).unwrap();
    // Extents: random slices of random files adding up to exactly `src` bytes.
    let mut extents = Vec::new();
    let mut left = src;
    while left > 0 {
        let (f, data) = &files[rng.below(files.len() as u64) as usize];
        let len = (1 + rng.below(9000)).min(left).min(data.len() as u64);
        let offset = rng.below(data.len() as u64 - len + 1);
        extents.push(ReadExtent {
            file: f.as_raw_fd(),
            offset,
            len,
        });
        left -= len;
    }
    Case {
        plan,
        extents,
        dst_len: (layers * 2 * tensor) as usize,
        layout,
        table,
        segments,
    }
}

pub fn stream_of(extents: &[ReadExtent], files: &[(File, Vec<u8>)]) -> Vec<u8> {
    let mut s = Vec::new();
    for e in extents {
        let (_, data) = files.iter().find(|(f, _)| f.as_raw_fd() == e.file).unwrap();
        s.extend_from_slice(&data[e.offset as usize..(e.offset + e.len) as usize]);
    }
    s
}

pub fn make_files(dir: &std::path::Path, rng: &mut Rng) -> Vec<(File, Vec<u8>)> {
    (0..3)
        .map(|i| {
            let len = 20_000 + rng.below(50_000) as usize;
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let p = dir.join(format!("f{i}"));
            std::fs::write(&p, &data).unwrap();
            (open_read(&p).unwrap().file, data)
        })
        .collect()
}
