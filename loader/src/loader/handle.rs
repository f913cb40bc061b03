//! [`LoadHandle`]: a load in progress, which an engine waits on layer by layer or whole, and
//! whose drop cancels what has not started and waits for what has.

use super::job::LoadJob;
use super::{LoadStats, LoaderError};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// A load in progress. Dropping it cancels what has not started and waits for the rest.
pub struct LoadHandle {
    pub(super) job: Arc<LoadJob>,
}

impl std::fmt::Debug for LoadHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadHandle")
            .field("range", &self.job.range)
            .field("chunks", &self.job.chunks.len())
            .finish()
    }
}

impl LoadHandle {
    /// Token positions this load fills.
    pub fn range(&self) -> Range<usize> {
        self.job.range.clone()
    }

    pub fn num_layers(&self) -> usize {
        self.job.spec.num_layers as usize
    }

    /// Returns once layer `layer` is in place for every chunk (later layers may still be
    /// loading). On a failure it waits for the whole load and returns its error.
    pub fn wait_layer(&self, layer: usize) -> Result<(), LoaderError> {
        if layer >= self.num_layers() {
            return Err(LoaderError::Invalid(format!(
                "layer {layer} of {}",
                self.num_layers()
            )));
        }
        let mut p = self.job.progress.lock().unwrap();
        while p.layer_jobs_left[layer] > 0 && p.failures.is_empty() {
            p = self.job.changed.wait(p).unwrap();
        }
        if p.failures.is_empty() {
            return Ok(());
        }
        while p.jobs_left > 0 {
            p = self.job.changed.wait(p).unwrap();
        }
        Err(self.job.error(&p).expect("a failure was recorded"))
    }

    /// Whether every job has finished.
    pub fn is_done(&self) -> bool {
        self.job.progress.lock().unwrap().jobs_left == 0
    }

    /// Waits for the whole load.
    pub fn wait(self) -> Result<LoadStats, LoaderError> {
        let mut p = self.job.progress.lock().unwrap();
        while p.jobs_left > 0 {
            p = self.job.changed.wait(p).unwrap();
        }
        let m = crate::metrics::global();
        match self.job.error(&p) {
            Some(e) => {
                m.load_failed();
                Err(e)
            }
            None => {
                let stats = self.job.stats(&p);
                m.loaded(&stats);
                Ok(stats)
            }
        }
    }
}

impl Drop for LoadHandle {
    fn drop(&mut self) {
        self.job.dropped.store(true, Ordering::Release);
        let mut p = self.job.progress.lock().unwrap();
        while p.jobs_left > 0 {
            p = self.job.changed.wait(p).unwrap();
        }
    }
}
