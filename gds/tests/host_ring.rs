//! The staging ring with host sinks on real files: loads and stores over random layouts are
//! compared byte for byte with the reference scatter, and bad input gets typed errors.

use std::os::fd::AsRawFd;

use kvfs_gds::direct::{open_read, open_write};
use kvfs_gds::plan::Fill;
use kvfs_gds::{AlignedBuf, GdsError, HostSink, ReadExtent, Result, Ring, ScatterPlan, Sink};

mod common;
use common::{Rng, make_files, random_case, stream_of};

#[test]
fn random_layouts_load_like_the_reference_scatter() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let files = make_files(dir.path(), &mut rng);
    for round in 0..60 {
        let case = random_case(&mut rng, &files);
        let stream = stream_of(&case.extents, &files);
        let mut want = vec![0xeeu8; case.dst_len];
        case.plan.apply_host(&stream, &mut want).unwrap();
        let slots = 2 + round % 3;
        let buf = 4096 * (2 + rng.below(5) as usize);
        let mut got = vec![0xeeu8; case.dst_len];
        let mut ring = Ring::new(HostSink::new(&mut got), slots, buf).unwrap();
        ring.set_readers(1 + round % 3);
        let stats = ring.load_extents(&case.extents, &case.plan).unwrap();
        assert_eq!(stats.data_bytes, stream.len() as u64);
        let layers = case.plan.layers();
        assert_eq!(ring.sink().ready_layers(), (0..layers).collect::<Vec<_>>());
        drop(ring);
        assert!(
            got == want,
            "round {round}: host ring differs from reference"
        );
    }
}

#[test]
fn random_layouts_store_and_load_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0xfeed_beef_0bad_cafe);
    let files = make_files(dir.path(), &mut rng);
    for round in 0..30 {
        let case = random_case(&mut rng, &files);
        // Device stand-in filled with random bytes; the gather of the plan is the chunk.
        let arena: Vec<u8> = (0..case.dst_len).map(|_| rng.next() as u8).collect();
        let total = case.plan.src_len();
        let mut want = vec![0u8; total as usize];
        for r in case.plan.runs() {
            want[r.src as usize..(r.src + r.len) as usize]
                .copy_from_slice(&arena[r.dst as usize..(r.dst + r.len) as usize]);
        }
        // Two output files, aligned extents (as chunk payloads are), split at random.
        let p0 = dir.path().join(format!("out{round}a"));
        let p1 = dir.path().join(format!("out{round}b"));
        let (o0, o1) = (open_write(&p0).unwrap(), open_write(&p1).unwrap());
        let cut = rng.below(total + 1);
        let extents = [
            ReadExtent {
                file: o0.file.as_raw_fd(),
                offset: 4096,
                len: cut,
            },
            ReadExtent {
                file: o1.file.as_raw_fd(),
                offset: 0,
                len: total - cut,
            },
        ];
        let mut arena_copy = arena.clone();
        let mut ring = Ring::new(HostSink::new(&mut arena_copy), 2, 8192).unwrap();
        ring.store_extents(&extents, &case.plan).unwrap();
        drop(ring);
        let a = std::fs::read(&p0).unwrap();
        let b = std::fs::read(&p1).unwrap();
        if cut > 0 {
            assert_eq!(
                a.len() as u64,
                4096 + cut,
                "round {round}: file trimmed to its data"
            );
            assert_eq!(&a[4096..], &want[..cut as usize]);
        }
        assert_eq!(b.len() as u64, total - cut);
        assert_eq!(&b[..], &want[cut as usize..]);
        // And the stored files load back into a fresh arena identically.
        let mut back = vec![0u8; case.dst_len];
        let mut want_back = vec![0u8; case.dst_len];
        case.plan.apply_host(&want, &mut want_back).unwrap();
        let f0 = open_read(&p0).unwrap().file;
        let f1 = open_read(&p1).unwrap().file;
        let rd = [
            ReadExtent {
                file: f0.as_raw_fd(),
                ..extents[0]
            },
            ReadExtent {
                file: f1.as_raw_fd(),
                ..extents[1]
            },
        ];
        Ring::new(HostSink::new(&mut back), 3, 12288)
            .unwrap()
            .load_extents(&rd, &case.plan)
            .unwrap();
        assert!(back == want_back, "round {round}: load after store differs");
    }
}

#[test]
fn large_fills_are_read_by_several_threads() {
    // Pieces of several MiB are cut into 1 MiB tasks; readers share them.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big");
    let data: Vec<u8> = (0..9_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&p, &data).unwrap();
    let f = open_read(&p).unwrap().file;
    let ext = [
        ReadExtent {
            file: f.as_raw_fd(),
            offset: 777,
            len: 7_000_000,
        },
        ReadExtent {
            file: f.as_raw_fd(),
            offset: 8_000_000,
            len: 1_000_000,
        },
    ];
    let plan = ScatterPlan::contiguous(0, 8_000_000).unwrap();
    for readers in [1, 2, 5] {
        let mut got = vec![0u8; 8_000_000];
        let mut ring = Ring::new(HostSink::new(&mut got), 2, 4 << 20).unwrap();
        ring.set_readers(readers);
        let stats = ring.load_extents(&ext, &plan).unwrap();
        drop(ring);
        assert!(stats.transfers >= 8, "{stats:?}");
        assert!(
            got[..7_000_000] == data[777..7_000_777],
            "readers {readers}"
        );
        assert!(
            got[7_000_000..] == data[8_000_000..9_000_000],
            "readers {readers}"
        );
    }
    // A short file read by several threads is still a typed short read.
    let past = [ReadExtent {
        file: f.as_raw_fd(),
        offset: 4_000_000,
        len: 5_500_000,
    }];
    let mut got = vec![0u8; 8_000_000];
    let mut ring = Ring::new(HostSink::new(&mut got), 2, 4 << 20).unwrap();
    ring.set_readers(4);
    let plan = ScatterPlan::contiguous(0, 5_500_000).unwrap();
    let err = ring.load_extents(&past, &plan).unwrap_err();
    assert!(matches!(err, GdsError::ShortRead { .. }), "{err}");
}

/// Records the order of sink calls and checks layer readiness against the reference.
struct Recording<'a> {
    inner: HostSink<'a>,
    log: Vec<String>,
    want: Vec<u8>,
    plan_ends: Vec<u64>,
}

impl Sink for Recording<'_> {
    type Buffer = AlignedBuf;
    fn alloc_buffer(&mut self, len: usize) -> Result<AlignedBuf> {
        self.inner.alloc_buffer(len)
    }
    fn begin(&mut self, plan: &ScatterPlan) -> Result<()> {
        self.plan_ends = plan.layer_ends().to_vec();
        self.inner.begin(plan)
    }
    fn submit(
        &mut self,
        slot: usize,
        buf: &AlignedBuf,
        fill: &Fill,
        plan: &ScatterPlan,
    ) -> Result<()> {
        self.log.push(format!("submit {slot}"));
        self.inner.submit(slot, buf, fill, plan)
    }
    fn wait_slot(&mut self, slot: usize) -> Result<()> {
        self.log.push(format!("wait {slot}"));
        Ok(())
    }
    fn layer_ready(&mut self, layer: usize) -> Result<()> {
        self.log.push(format!("layer {layer}"));
        self.inner.layer_ready(layer)
    }
    fn gather(&mut self, buf: &mut AlignedBuf, fill: &Fill, plan: &ScatterPlan) -> Result<()> {
        self.inner.gather(buf, fill, plan)
    }
    fn finish(&mut self) -> Result<()> {
        self.log.push("finish".into());
        Ok(())
    }
}

#[test]
fn ring_waits_before_reuse_and_reports_layers_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(77);
    let files = make_files(dir.path(), &mut rng);
    let case = loop {
        let c = random_case(&mut rng, &files);
        if c.plan.layers() >= 3 && c.plan.src_len() > 30_000 {
            break c;
        }
    };
    let stream = stream_of(&case.extents, &files);
    let mut want = vec![0u8; case.dst_len];
    case.plan.apply_host(&stream, &mut want).unwrap();
    let mut got = vec![0u8; case.dst_len];
    let sink = Recording {
        inner: HostSink::new(&mut got),
        log: Vec::new(),
        want,
        plan_ends: Vec::new(),
    };
    let mut ring = Ring::new(sink, 3, 8192).unwrap();
    ring.load_extents(&case.extents, &case.plan).unwrap();
    let log = ring.sink().log.clone();
    // Every submit from a slot is immediately preceded by a wait on that slot.
    let mut submits = 0;
    for (i, e) in log.iter().enumerate() {
        if let Some(s) = e.strip_prefix("submit ") {
            assert_eq!(log[i - 1], format!("wait {s}"), "{log:?}");
            assert_eq!(s.parse::<usize>().unwrap(), submits % 3, "round robin");
            submits += 1;
        }
    }
    assert!(submits > 3, "the ring wrapped around");
    let layers: Vec<&String> = log.iter().filter(|e| e.starts_with("layer")).collect();
    let expect: Vec<String> = (0..case.plan.layers())
        .map(|l| format!("layer {l}"))
        .collect();
    assert_eq!(layers, expect.iter().collect::<Vec<_>>());
    assert_eq!(log.last().unwrap(), "finish");
    // Layer marks come before the last submit for all but the last layer(s): readiness is
    // reported as soon as the data is in, not at the end.
    let first_layer = log.iter().position(|e| e == "layer 0").unwrap();
    let last_submit = log.iter().rposition(|e| e.starts_with("submit")).unwrap();
    assert!(first_layer < last_submit, "{log:?}");
    let Recording { want, .. } = ring.into_sink();
    assert!(got == want);
}

#[test]
fn bad_input_gets_typed_errors_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    std::fs::write(&p, vec![9u8; 10_000]).unwrap();
    let f = open_read(&p).unwrap().file;
    let fd = f.as_raw_fd();
    let mut dst = vec![0u8; 100_000];

    // Plan reads more than the extents hold.
    let plan = ScatterPlan::contiguous(0, 20_000).unwrap();
    let ext = [ReadExtent {
        file: fd,
        offset: 0,
        len: 10_000,
    }];
    let mut ring = Ring::new(HostSink::new(&mut dst), 2, 8192).unwrap();
    assert!(matches!(
        ring.load_extents(&ext, &plan),
        Err(GdsError::PlanExceedsExtents {
            plan_len: 20_000,
            extents_len: 10_000
        })
    ));
    // Extent past the end of the file.
    let ext2 = [ReadExtent {
        file: fd,
        offset: 5000,
        len: 20_000,
    }];
    let err = ring.load_extents(&ext2, &plan).unwrap_err();
    assert!(matches!(err, GdsError::ShortRead { .. }), "{err}");
    // Destination outside the sink's memory.
    let far = ScatterPlan::contiguous(99_000, 10_000).unwrap();
    let err = ring.load_extents(&ext, &far).unwrap_err();
    assert!(
        matches!(err, GdsError::DestinationOutOfBounds { .. }),
        "{err}"
    );
    // Misaligned write extent: refused before anything is written.
    let out = dir.path().join("out");
    let o = open_write(&out).unwrap();
    let wext = [ReadExtent {
        file: o.file.as_raw_fd(),
        offset: 100,
        len: 1000,
    }];
    let small = ScatterPlan::contiguous(0, 1000).unwrap();
    assert!(matches!(
        ring.store_extents(&wext, &small),
        Err(GdsError::Misaligned { value: 100, .. })
    ));
    drop(ring);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 0);
    // The first two loads failed before or at their first read; only the out-of-bounds one
    // reached the sink, and it failed on its first run, which was out of bounds: nothing
    // was written anywhere.
    assert!(dst.iter().all(|&b| b == 0));
    // A one-slot ring cannot overlap anything.
    let mut d2 = vec![0u8; 10];
    assert!(matches!(
        Ring::new(HostSink::new(&mut d2), 1, 8192),
        Err(GdsError::Config(_))
    ));
}
