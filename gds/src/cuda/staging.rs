//! The staging path's sink ([`CudaSink`] in a [`Ring`](crate::ring::Ring)): O_DIRECT reads
//! land in pinned host buffers, each is copied asynchronously into its device slot, an event
//! is recorded after the copy so the ring can refill the host buffer while the scatter kernel
//! still runs.

use std::sync::Arc;

use cudarc::driver::CudaEvent;
use cudarc::driver::result as cu;

use super::cuda_err;
use super::device::{Device, DeviceBuf, LayerEvents, PinnedBuf, RunTable};
use crate::error::Result;
use crate::plan::Fill;
use crate::ring::Sink;
use crate::scatter::ScatterPlan;

/// The staging path's sink: pinned host buffers -> device slots -> scatter kernel.
pub struct CudaSink {
    dev: Arc<Device>,
    slots: Vec<DeviceBuf>,
    slot_events: Vec<Option<CudaEvent>>,
    runs: RunTable,
    runs_ptr: u64,
    pub(super) layers: LayerEvents,
}

impl CudaSink {
    /// A sink on `dev`.
    ///
    /// # Safety
    /// The sink writes (loads) to and reads (stores) from the destination addresses of every
    /// [`ScatterPlan`] handed to the [`Ring`](crate::ring::Ring) that owns it. Each such plan's
    /// destination runs must be device memory of `dev`'s context, allocated and used by
    /// nothing else until the load or store has completed on the loader's stream (see
    /// [`Device::synchronize`]).
    pub unsafe fn new(dev: Arc<Device>) -> Self {
        CudaSink {
            dev,
            slots: Vec::new(),
            slot_events: Vec::new(),
            runs: RunTable { buf: None },
            runs_ptr: 0,
            layers: LayerEvents::default(),
        }
    }
}

impl Sink for CudaSink {
    type Buffer = PinnedBuf;

    fn alloc_buffer(&mut self, len: usize) -> Result<PinnedBuf> {
        self.slots.push(self.dev.alloc(len)?);
        self.slot_events.push(None);
        self.dev.alloc_pinned(len)
    }

    fn begin(&mut self, plan: &ScatterPlan) -> Result<()> {
        self.runs_ptr = self.runs.upload(&self.dev, plan)?;
        self.layers.recorded = 0;
        Ok(())
    }

    fn submit(
        &mut self,
        slot: usize,
        buf: &PinnedBuf,
        fill: &Fill,
        plan: &ScatterPlan,
    ) -> Result<()> {
        self.dev.bind()?;
        let dslot = self.slots[slot].ptr;
        let used = fill.used as usize;
        // SAFETY: buf is pinned and is not refilled before wait_slot(slot) has synchronized
        // the event recorded just below; the device slot holds buf.len >= used bytes.
        unsafe { cu::memcpy_htod_async(dslot, &buf.as_ref()[..used], self.dev.stream.cu_stream()) }
            .map_err(cuda_err("cuMemcpyHtoDAsync"))?;
        let ev = match self.slot_events[slot].take() {
            Some(e) => e,
            None => self.dev.event()?,
        };
        ev.record(&self.dev.stream)
            .map_err(cuda_err("cuEventRecord"))?;
        self.slot_events[slot] = Some(ev);
        for p in &fill.pieces {
            let win = dslot + p.buf_offset + p.skip;
            self.dev
                .launch_window(false, win, p.stream_offset, p.len, self.runs_ptr, plan)?;
        }
        Ok(())
    }

    fn wait_slot(&mut self, slot: usize) -> Result<()> {
        if let Some(e) = &self.slot_events[slot] {
            e.synchronize().map_err(cuda_err("cuEventSynchronize"))?;
        }
        Ok(())
    }

    fn layer_ready(&mut self, layer: usize) -> Result<()> {
        self.layers.record(&self.dev, layer)
    }

    fn gather(&mut self, buf: &mut PinnedBuf, fill: &Fill, plan: &ScatterPlan) -> Result<()> {
        self.dev.bind()?;
        let dslot = self.slots[0].ptr;
        for p in &fill.pieces {
            let win = dslot + p.buf_offset + p.skip;
            self.dev
                .launch_window(true, win, p.stream_offset, p.len, self.runs_ptr, plan)?;
        }
        for p in &fill.pieces {
            let r = p.data_range();
            let dst = &mut buf.as_mut()[r];
            // SAFETY: buf is pinned and we synchronize below before returning it.
            unsafe {
                cu::memcpy_dtoh_async(
                    dst,
                    dslot + p.buf_offset + p.skip,
                    self.dev.stream.cu_stream(),
                )
            }
            .map_err(cuda_err("cuMemcpyDtoHAsync"))?;
        }
        self.dev.synchronize()
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
