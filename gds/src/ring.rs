//! The staging ring: O_DIRECT reads into one buffer while the sink consumes another.
//!
//! [`Ring::load_extents`] walks the [`Fill`]s of [`plan_fills`] round robin over `slots`
//! buffers. For fill `i` in slot `s = i % slots` it
//!
//! 1. waits until the sink no longer reads slot `s` ([`Sink::wait_slot`]; for the CUDA sink
//!    this is the event recorded after the slot's host-to-device copy, so with two or more
//!    slots the disk read of fill `i` overlaps the copy and scatter of fill `i - 1`);
//! 2. reads the fill's pieces into the slot's buffer with the aligned O_DIRECT loop of
//!    [`crate::direct`];
//! 3. hands the buffer to the sink ([`Sink::submit`]), which may work asynchronously;
//! 4. tells the sink which layers became complete with this fill ([`Sink::layer_ready`]).
//!
//! The store path ([`Ring::store_extents`]) runs the same fills the other way: the sink
//! gathers destination bytes into the buffer, which is then written with O_DIRECT.
//!
//! The ring is generic over [`Sink`] so that all of its scheduling, alignment and error
//! handling is exercised on CPU with [`HostSink`] (destination = a host byte slice), and the
//! CUDA sink only adds the copies and the kernel.

use std::os::fd::RawFd;

use tracing::debug;

use crate::align::{AlignedBuf, DIRECT_ALIGN, align_up};
use crate::direct::{read_at_least, write_all_at};
use crate::error::{GdsError, Result};
use crate::plan::{Fill, ReadExtent, WriteExtent, check_buf_size, plan_fills, stream_len};
use crate::scatter::{ScatterPlan, host_range};

/// Where staged bytes go (loads) and come from (stores).
pub trait Sink {
    /// A staging buffer (page-aligned; pinned for CUDA).
    type Buffer: AsRef<[u8]> + AsMut<[u8]>;

    /// Allocates one staging buffer of `len` bytes.
    fn alloc_buffer(&mut self, len: usize) -> Result<Self::Buffer>;

    /// A load or store with `plan` starts (the CUDA sink uploads the run table here).
    fn begin(&mut self, plan: &ScatterPlan) -> Result<()>;

    /// Scatters the wanted bytes of `fill` (found in `buf` at each piece's data range) to
    /// their destinations per `plan`. May complete asynchronously, reading `buf` until
    /// [`Sink::wait_slot`] for `slot` returns.
    fn submit(
        &mut self,
        slot: usize,
        buf: &Self::Buffer,
        fill: &Fill,
        plan: &ScatterPlan,
    ) -> Result<()>;

    /// Blocks until the previous submission from `slot` no longer reads its buffer.
    fn wait_slot(&mut self, slot: usize) -> Result<()>;

    /// Layer `layer` has been fully submitted (all its bytes are in submitted fills).
    fn layer_ready(&mut self, layer: usize) -> Result<()>;

    /// Store path: writes the destination bytes of `fill`'s pieces into `buf` (the reverse
    /// of `submit`), synchronously.
    fn gather(&mut self, buf: &mut Self::Buffer, fill: &Fill, plan: &ScatterPlan) -> Result<()>;

    /// All submissions of one load are done (the sink may wait for them).
    fn finish(&mut self) -> Result<()>;
}

/// Counters of one load or store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Fills (ring-slot uses).
    pub fills: u64,
    /// File transfers (pread/pwrite/cuFile calls).
    pub transfers: u64,
    /// Bytes moved to or from files, including alignment padding.
    pub io_bytes: u64,
    /// Wanted bytes.
    pub data_bytes: u64,
}

/// A ring of staging buffers in front of a [`Sink`].
pub struct Ring<S: Sink> {
    sink: S,
    bufs: Vec<S::Buffer>,
    buf_size: u64,
    readers: usize,
}

impl<S: Sink> Ring<S> {
    /// Allocates `slots` (>= 2) buffers of `buf_size` bytes (a multiple of 4096, >= 8192).
    pub fn new(mut sink: S, slots: usize, buf_size: usize) -> Result<Self> {
        if slots < 2 {
            return Err(GdsError::Config(format!(
                "the staging ring needs at least 2 slots to overlap reads and copies, got {slots}"
            )));
        }
        check_buf_size(buf_size as u64)?;
        let bufs = (0..slots)
            .map(|_| sink.alloc_buffer(buf_size))
            .collect::<Result<Vec<_>>>()?;
        Ok(Ring {
            sink,
            bufs,
            buf_size: buf_size as u64,
            readers: 1,
        })
    }

    /// Reads each fill with `n` threads (1 = on the calling thread). One thread reading the
    /// page cache copies at roughly memcpy speed, below what PCIe 5 takes, so the device
    /// paths use several.
    pub fn set_readers(&mut self, n: usize) {
        self.readers = n.max(1);
    }

    /// Reader threads per fill.
    pub fn readers(&self) -> usize {
        self.readers
    }

    /// The sink.
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// The sink, mutably.
    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.bufs.len()
    }

    /// Size of each staging buffer.
    pub fn buf_size(&self) -> u64 {
        self.buf_size
    }

    /// Loads `extents` (their bytes form the source stream) and scatters them per `plan`.
    pub fn load_extents(&mut self, extents: &[ReadExtent], plan: &ScatterPlan) -> Result<IoStats> {
        let total = stream_len(extents);
        if plan.src_len() > total {
            return Err(GdsError::PlanExceedsExtents {
                plan_len: plan.src_len(),
                extents_len: total,
            });
        }
        let fills = plan_fills(extents, self.buf_size)?;
        self.sink.begin(plan)?;
        let mut stats = IoStats::default();
        let mut layers_done = 0;
        let n = self.bufs.len();
        for (i, fill) in fills.iter().enumerate() {
            let slot = i % n;
            self.sink.wait_slot(slot)?;
            read_fill_parallel(self.bufs[slot].as_mut(), fill, self.readers, &mut stats)?;
            self.sink.submit(slot, &self.bufs[slot], fill, plan)?;
            stats.fills += 1;
            let now = plan.layers_complete_at(fill.stream_end());
            while layers_done < now {
                self.sink.layer_ready(layers_done)?;
                layers_done += 1;
            }
        }
        while layers_done < plan.layers() {
            self.sink.layer_ready(layers_done)?;
            layers_done += 1;
        }
        self.sink.finish()?;
        debug!(?stats, "load done");
        Ok(stats)
    }

    /// Gathers destination bytes per `plan` and writes them to `extents`.
    ///
    /// Every extent must start on a 4096-byte boundary (O_DIRECT cannot start a write
    /// mid-block). The tail of the last block of an extent is written as zeros; files that
    /// grew past their data because of that are trimmed back to the data's end, so the
    /// result is byte-exact.
    pub fn store_extents(
        &mut self,
        extents: &[WriteExtent],
        plan: &ScatterPlan,
    ) -> Result<IoStats> {
        check_store_request(extents, plan)?;
        let ends = file_ends(extents)?;
        let fills = plan_fills(extents, self.buf_size)?;
        self.sink.begin(plan)?;
        // Slot 0's buffer may still feed an asynchronous copy of an earlier load.
        self.sink.wait_slot(0)?;
        let mut stats = IoStats::default();
        for fill in &fills {
            let buf = &mut self.bufs[0];
            for p in &fill.pieces {
                let r = p.data_range();
                let pad = r.end..(p.buf_offset + p.io_len) as usize;
                buf.as_mut()[pad].fill(0);
            }
            self.sink.gather(buf, fill, plan)?;
            for p in &fill.pieces {
                debug_assert_eq!(p.skip, 0);
                let b = &buf.as_ref()[p.buf_offset as usize..(p.buf_offset + p.io_len) as usize];
                write_all_at(p.file, b, p.file_offset)?;
                stats.transfers += 1;
                stats.io_bytes += p.io_len;
                stats.data_bytes += p.len;
            }
            stats.fills += 1;
        }
        trim_files(&ends)?;
        Ok(stats)
    }

    /// Gives the sink back.
    pub fn into_sink(self) -> S {
        self.sink
    }
}

/// For each file of `extents`: its size now and the end of the data to be written.
pub(crate) fn file_ends(extents: &[WriteExtent]) -> Result<Vec<(RawFd, u64, u64)>> {
    let mut ends: Vec<(RawFd, u64, u64)> = Vec::new();
    for e in extents.iter().filter(|e| e.len > 0) {
        let end = e.offset + e.len;
        match ends.iter_mut().find(|(fd, _, _)| *fd == e.file) {
            Some(x) => x.2 = x.2.max(end),
            None => ends.push((e.file, file_size(e.file)?, end)),
        }
    }
    Ok(ends)
}

/// Trims files that grew past their data because of block padding back to
/// `max(size before, data end)`.
pub(crate) fn trim_files(ends: &[(RawFd, u64, u64)]) -> Result<()> {
    for &(fd, before, end) in ends {
        let want = before.max(end);
        if file_size(fd)? > want {
            // SAFETY: ftruncate on a descriptor the caller owns and keeps open.
            if unsafe { libc::ftruncate(fd, want as libc::off_t) } != 0 {
                return Err(GdsError::io(
                    "ftruncate",
                    want,
                    std::io::Error::last_os_error(),
                ));
            }
        }
    }
    Ok(())
}

fn file_size(fd: RawFd) -> Result<u64> {
    // SAFETY: fstat writes into the zeroed stat struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; fd is the caller's open descriptor.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(GdsError::io("fstat", 0, std::io::Error::last_os_error()));
    }
    Ok(st.st_size as u64)
}

/// Reads every piece of `fill` into `buf` (aligned O_DIRECT transfers).
pub fn read_fill(buf: &mut [u8], fill: &Fill, stats: &mut IoStats) -> Result<()> {
    read_fill_parallel(buf, fill, 1, stats)
}

/// Bytes per read task when a fill is read by several threads (aligned).
pub const READ_TASK: u64 = 1 << 20;

/// One aligned transfer of a piece: `(piece index, offset in the piece, buffer region)`.
struct Task<'b> {
    piece: usize,
    at: u64,
    buf: &'b mut [u8],
}

/// Reads `fill` into `buf` with up to `threads` threads: pieces are cut into aligned tasks of
/// [`READ_TASK`] bytes, dealt round robin; each task fills its own region of the buffer.
/// Parts of a piece past its wanted bytes (block padding at end of file) are not read.
pub fn read_fill_parallel(
    buf: &mut [u8],
    fill: &Fill,
    threads: usize,
    stats: &mut IoStats,
) -> Result<()> {
    // Cut the buffer into disjoint task regions, in buffer order (pieces are in buffer order).
    let mut tasks: Vec<Task<'_>> = Vec::new();
    let mut rest: &mut [u8] = buf;
    let mut consumed = 0u64;
    for (i, p) in fill.pieces.iter().enumerate() {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut((p.buf_offset - consumed) as usize);
        rest = tail;
        consumed = p.buf_offset;
        let mut at = 0;
        while at < p.needed() {
            let len = READ_TASK.min(p.io_len - at);
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(len as usize);
            rest = tail;
            consumed += len;
            tasks.push(Task {
                piece: i,
                at,
                buf: head,
            });
            at += len;
        }
    }
    let run = |t: &mut Task<'_>| -> Result<()> {
        let p = &fill.pieces[t.piece];
        let need = (p.needed() - t.at).min(t.buf.len() as u64);
        read_at_least(p.file, t.buf, p.file_offset + t.at, need).map_err(|e| match e.into() {
            GdsError::ShortRead { got, .. } => GdsError::ShortRead {
                offset: p.file_offset + p.skip,
                wanted: p.len,
                got: (t.at + got).saturating_sub(p.skip),
            },
            e => e,
        })?;
        Ok(())
    };
    let n_tasks = tasks.len() as u64;
    let threads = threads.clamp(1, tasks.len().max(1));
    if threads == 1 {
        tasks.iter_mut().try_for_each(run)?;
    } else {
        let mut lanes: Vec<Vec<Task<'_>>> = (0..threads).map(|_| Vec::new()).collect();
        for (k, t) in tasks.into_iter().enumerate() {
            lanes[k % threads].push(t);
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = lanes
                .into_iter()
                .map(|mut lane| s.spawn(move || lane.iter_mut().try_for_each(run)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("reader thread panicked"))
                .collect::<Result<Vec<()>>>()
        })?;
    }
    stats.transfers += n_tasks;
    for p in &fill.pieces {
        stats.io_bytes += p.io_len;
        stats.data_bytes += p.len;
    }
    Ok(())
}

/// Host-memory sink: destinations are offsets into a byte slice. The host-only path, and
/// the oracle the CUDA sinks are compared with.
pub struct HostSink<'a> {
    dst: &'a mut [u8],
    ready: Vec<usize>,
}

impl<'a> HostSink<'a> {
    /// A sink writing into (and gathering from) `dst`.
    pub fn new(dst: &'a mut [u8]) -> Self {
        HostSink {
            dst,
            ready: Vec::new(),
        }
    }

    /// Layers reported ready so far, in order.
    pub fn ready_layers(&self) -> &[usize] {
        &self.ready
    }
}

impl Sink for HostSink<'_> {
    type Buffer = AlignedBuf;

    fn alloc_buffer(&mut self, len: usize) -> Result<AlignedBuf> {
        crate::align::aligned_buf(align_up(len as u64, DIRECT_ALIGN) as usize)
    }

    fn submit(
        &mut self,
        _slot: usize,
        buf: &AlignedBuf,
        fill: &Fill,
        plan: &ScatterPlan,
    ) -> Result<()> {
        let cap = self.dst.len();
        for p in &fill.pieces {
            let data = &buf[p.data_range()];
            let mut err = None;
            plan.for_each_in_window(p.stream_offset, p.len, |off, dst, len| {
                if err.is_some() {
                    return;
                }
                match host_range(dst, len, cap) {
                    Ok(d) => self.dst[d].copy_from_slice(&data[off as usize..(off + len) as usize]),
                    Err(e) => err = Some(e),
                }
            });
            if let Some(e) = err {
                return Err(e);
            }
        }
        Ok(())
    }

    fn begin(&mut self, _plan: &ScatterPlan) -> Result<()> {
        self.ready.clear();
        Ok(())
    }

    fn wait_slot(&mut self, _slot: usize) -> Result<()> {
        Ok(())
    }

    fn layer_ready(&mut self, layer: usize) -> Result<()> {
        self.ready.push(layer);
        Ok(())
    }

    fn gather(&mut self, buf: &mut AlignedBuf, fill: &Fill, plan: &ScatterPlan) -> Result<()> {
        let cap = self.dst.len();
        for p in &fill.pieces {
            let range = p.data_range();
            let data = &mut buf[range];
            let mut err = None;
            plan.for_each_in_window(p.stream_offset, p.len, |off, src, len| {
                if err.is_some() {
                    return;
                }
                match host_range(src, len, cap) {
                    Ok(s) => data[off as usize..(off + len) as usize].copy_from_slice(&self.dst[s]),
                    Err(e) => err = Some(e),
                }
            });
            if let Some(e) = err {
                return Err(e);
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Checks a store request before any byte moves: every write extent starts on a 4096-byte
/// boundary (O_DIRECT cannot start a write mid-block) and the plan gathers no more bytes than
/// the extents hold.
pub(crate) fn check_store_request(extents: &[WriteExtent], plan: &ScatterPlan) -> Result<()> {
    for e in extents {
        if e.offset % DIRECT_ALIGN != 0 {
            return Err(GdsError::Misaligned {
                what: "write extent offset",
                value: e.offset,
                align: DIRECT_ALIGN,
            });
        }
    }
    let total = stream_len(extents);
    if plan.src_len() > total {
        return Err(GdsError::PlanExceedsExtents {
            plan_len: plan.src_len(),
            extents_len: total,
        });
    }
    Ok(())
}
