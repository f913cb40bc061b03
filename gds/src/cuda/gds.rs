//! The GDS (and compat) path: cuFile reads whole aligned pieces into two registered device
//! slots, files are registered once and cached by descriptor and inode, fills of several
//! pieces go through the batch API, and the read of fill `i + 1` overlaps the scatter of fill
//! `i`. Stores gather into a slot and write it with `cuFileWrite`.

use std::collections::HashMap;
use std::ffi::c_void;
use std::os::fd::RawFd;
use std::sync::Arc;

use cudarc::driver::CudaEvent;
use cudarc::driver::result as cu;

use super::cuda_err;
use super::device::{Device, DeviceBuf, LayerEvents, RunTable};
use crate::cufile::{self, CuFile, CuFileIoParams, FileHandle};
use crate::error::{GdsError, Result};
use crate::plan::{Fill, ReadExtent, WriteExtent, plan_fills, stream_len};
use crate::ring::IoStats;
use crate::scatter::ScatterPlan;

/// Fills of at least this many pieces use cuFile's batch API.
pub const BATCH_MIN_PIECES: usize = 4;
/// Requests per cuFile batch (cuFile's default `max_batch_io_size` is 128).
pub const BATCH_MAX: usize = 128;

/// The cuFile path: reads into registered device slots, then the same scatter.
pub struct GdsEngine {
    dev: Arc<Device>,
    lib: &'static CuFile,
    slots: Vec<DeviceBuf>,
    slot_events: Vec<Option<CudaEvent>>,
    buf_size: u64,
    runs: RunTable,
    pub(super) layers: LayerEvents,
    handles: HashMap<RawFd, (u64, u64, FileHandle)>,
}

/// Most file registrations kept before the cache is flushed.
const MAX_HANDLES: usize = 1024;

impl GdsEngine {
    /// Two device slots of `buf_size` bytes, registered with cuFile.
    pub fn new(dev: Arc<Device>, buf_size: usize) -> Result<Self> {
        crate::plan::check_buf_size(buf_size as u64)?;
        let lib = cufile::library().map_err(|msg| GdsError::CuFile {
            op: "dlopen",
            code: -1,
            cu_code: 0,
            msg,
        })?;
        lib.driver_open()?;
        let mut slots = Vec::new();
        for _ in 0..2 {
            let s = dev.alloc(buf_size)?;
            // SAFETY: s is a live device allocation of buf_size bytes, deregistered in Drop.
            unsafe { lib.buf_register(s.ptr, buf_size) }?;
            slots.push(s);
        }
        Ok(GdsEngine {
            dev,
            lib,
            slots,
            slot_events: vec![None, None],
            buf_size: buf_size as u64,
            runs: RunTable { buf: None },
            layers: LayerEvents::default(),
            handles: HashMap::new(),
        })
    }

    /// Registers `fd` with cuFile once; re-registers if the descriptor now names another
    /// file (closed and reused).
    fn handle(&mut self, fd: RawFd) -> Result<&FileHandle> {
        // SAFETY: fstat into a zeroed struct we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(GdsError::io("fstat", 0, std::io::Error::last_os_error()));
        }
        let id = (st.st_dev, st.st_ino);
        let stale = matches!(self.handles.get(&fd), Some((d, i, _)) if (*d, *i) != id);
        if stale || self.handles.len() >= MAX_HANDLES {
            let old: Vec<RawFd> = if stale {
                vec![fd]
            } else {
                self.handles.keys().copied().collect()
            };
            for k in old {
                if let Some((_, _, h)) = self.handles.remove(&k) {
                    self.lib.handle_deregister(h);
                }
            }
        }
        if !self.handles.contains_key(&fd) {
            let h = self.lib.handle_register(fd)?;
            self.handles.insert(fd, (id.0, id.1, h));
        }
        Ok(&self.handles[&fd].2)
    }

    /// Drops the cached registration of `fd` (call before closing a descriptor you loaded
    /// from, if you want the registration released at once).
    pub fn forget_file(&mut self, fd: RawFd) {
        if let Some((_, _, h)) = self.handles.remove(&fd) {
            self.lib.handle_deregister(h);
        }
    }

    fn read_fill(&mut self, slot: usize, fill: &Fill, stats: &mut IoStats) -> Result<()> {
        let base = self.slots[slot].ptr;
        let lib = self.lib;
        if fill.pieces.len() >= BATCH_MIN_PIECES && lib.has_batch() {
            let mut params = Vec::with_capacity(fill.pieces.len());
            for p in &fill.pieces {
                let fh = self.handle(p.file)?.0;
                params.push(CuFileIoParams {
                    mode: cufile::BATCH_MODE,
                    dev_ptr_base: base as *mut c_void,
                    file_offset: p.file_offset as i64,
                    dev_ptr_offset: p.buf_offset as i64,
                    size: p.io_len as usize,
                    fh,
                    opcode: cufile::OP_READ,
                    cookie: std::ptr::null_mut(),
                });
            }
            let mut got = Vec::with_capacity(params.len());
            for part in params.chunks_mut(BATCH_MAX) {
                let b = lib.batch_setup(part.len() as u32)?;
                // SAFETY: base is registered device memory of buf_size >= every piece's end;
                // the handles are live (cached).
                let res = unsafe { lib.batch_run(&b, part) };
                lib.batch_destroy(b);
                got.extend(res?);
            }
            for (p, n) in fill.pieces.iter().zip(got) {
                check_read(p.file_offset, p.skip, p.len, n as u64)?;
            }
        } else {
            for p in &fill.pieces {
                let fh = self.handle(p.file)?;
                // SAFETY: as above.
                let n =
                    unsafe { lib.read(fh, base, p.io_len as usize, p.file_offset, p.buf_offset) }?;
                check_read(p.file_offset, p.skip, p.len, n as u64)?;
            }
        }
        for p in &fill.pieces {
            stats.transfers += 1;
            stats.io_bytes += p.io_len;
            stats.data_bytes += p.len;
        }
        Ok(())
    }

    /// Loads `extents` into device destinations per `plan`.
    ///
    /// # Safety
    /// Every destination run of `plan` must be device memory of this engine's device context,
    /// allocated and used by nothing else until the load has completed on the loader's stream
    /// ([`Device::synchronize`]).
    pub unsafe fn load_extents(
        &mut self,
        extents: &[ReadExtent],
        plan: &ScatterPlan,
    ) -> Result<IoStats> {
        let total = stream_len(extents);
        if plan.src_len() > total {
            return Err(GdsError::PlanExceedsExtents {
                plan_len: plan.src_len(),
                extents_len: total,
            });
        }
        let fills = plan_fills(extents, self.buf_size)?;
        let runs_ptr = self.runs.upload(&self.dev, plan)?;
        self.layers.recorded = 0;
        let mut stats = IoStats::default();
        let mut layers_done = 0;
        for (i, fill) in fills.iter().enumerate() {
            let slot = i % self.slots.len();
            if let Some(e) = &self.slot_events[slot] {
                e.synchronize().map_err(cuda_err("cuEventSynchronize"))?;
            }
            self.dev.bind()?;
            self.read_fill(slot, fill, &mut stats)?;
            let base = self.slots[slot].ptr;
            for p in &fill.pieces {
                self.dev.launch_window(
                    false,
                    base + p.buf_offset + p.skip,
                    p.stream_offset,
                    p.len,
                    runs_ptr,
                    plan,
                )?;
            }
            let ev = match self.slot_events[slot].take() {
                Some(e) => e,
                None => self.dev.event()?,
            };
            ev.record(&self.dev.stream)
                .map_err(cuda_err("cuEventRecord"))?;
            self.slot_events[slot] = Some(ev);
            stats.fills += 1;
            let now = plan.layers_complete_at(fill.stream_end());
            while layers_done < now {
                self.layers.record(&self.dev, layers_done)?;
                layers_done += 1;
            }
        }
        while layers_done < plan.layers() {
            self.layers.record(&self.dev, layers_done)?;
            layers_done += 1;
        }
        Ok(stats)
    }

    /// Gathers device bytes per `plan` and writes them to `extents` with cuFileWrite.
    ///
    /// # Safety
    /// Every destination run of `plan` (here the source of the gather) must be device memory
    /// of this engine's device context, allocated and not written by anything else until the
    /// call returns (it is synchronous).
    pub unsafe fn store_extents(
        &mut self,
        extents: &[WriteExtent],
        plan: &ScatterPlan,
    ) -> Result<IoStats> {
        crate::ring::check_store_request(extents, plan)?;
        let ends = crate::ring::file_ends(extents)?;
        let fills = plan_fills(extents, self.buf_size)?;
        let runs_ptr = self.runs.upload(&self.dev, plan)?;
        let mut stats = IoStats::default();
        let base = self.slots[0].ptr;
        for fill in &fills {
            self.dev.bind()?;
            // SAFETY: the slot is ours; zero padding so the block tails written are zeros.
            unsafe {
                cu::memset_d8_async(base, 0, fill.used as usize, self.dev.stream.cu_stream())
            }
            .map_err(cuda_err("cuMemsetD8Async"))?;
            for p in &fill.pieces {
                self.dev.launch_window(
                    true,
                    base + p.buf_offset + p.skip,
                    p.stream_offset,
                    p.len,
                    runs_ptr,
                    plan,
                )?;
            }
            self.dev.synchronize()?;
            let lib = self.lib;
            for p in &fill.pieces {
                let fh = self.handle(p.file)?;
                // SAFETY: base is registered device memory holding the gathered piece.
                let n =
                    unsafe { lib.write(fh, base, p.io_len as usize, p.file_offset, p.buf_offset) }?;
                if (n as u64) < p.io_len {
                    return Err(GdsError::io(
                        "cuFileWrite",
                        p.file_offset,
                        std::io::Error::new(
                            std::io::ErrorKind::WriteZero,
                            format!("short write {n}"),
                        ),
                    ));
                }
                stats.transfers += 1;
                stats.io_bytes += p.io_len;
                stats.data_bytes += p.len;
            }
            stats.fills += 1;
        }
        crate::ring::trim_files(&ends)?;
        Ok(stats)
    }
}

fn check_read(file_offset: u64, skip: u64, len: u64, got: u64) -> Result<()> {
    if got < skip + len {
        return Err(GdsError::ShortRead {
            offset: file_offset + skip,
            wanted: len,
            got: got.saturating_sub(skip),
        });
    }
    Ok(())
}

impl Drop for GdsEngine {
    fn drop(&mut self) {
        let _ = self.dev.synchronize();
        for (_, (_, _, h)) in self.handles.drain() {
            self.lib.handle_deregister(h);
        }
        for s in &self.slots {
            // SAFETY: registered in new(), still allocated (slots drop after this).
            let _ = unsafe { self.lib.buf_deregister(s.ptr) };
        }
    }
}
