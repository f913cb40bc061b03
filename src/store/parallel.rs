//! Payload verification spread over the machine's cores: the layers of a chunk are checked
//! on disjoint threads (each layer has its own digest), the caller's thread included. Below
//! [`PARALLEL_VERIFY_MIN`] bytes one thread does it all, since spawning costs more.

use kvfs_loader::FormatError;
use kvfs_loader::format::ChunkHeader;

/// Below this size a payload is verified on the calling thread (spawning costs more).
const PARALLEL_VERIFY_MIN: usize = 4 << 20;

pub(super) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Checks a whole chunk's payload, splitting the layers across the machine's cores.
pub fn verify_payload_parallel(header: &ChunkHeader, bytes: &[u8]) -> Result<(), FormatError> {
    verify_payload_threads(header, bytes, cores())
}

/// Checks a whole chunk's payload on up to `threads` threads (the caller's included).
pub fn verify_payload_threads(
    header: &ChunkHeader,
    bytes: &[u8],
    threads: usize,
) -> Result<(), FormatError> {
    header.check_len(bytes.len() as u64)?;
    let layers = header.geometry.num_layers;
    let threads = threads.min(layers as usize).min(16);
    if threads <= 1 || bytes.len() < PARALLEL_VERIFY_MIN {
        return header.verify_payload(bytes);
    }
    let per = (layers as usize).div_ceil(threads) as u32;
    let check = |range: std::ops::Range<u32>| -> Result<(), FormatError> {
        for layer in range {
            let span = header.layer_span(layer);
            header.verify_layer(layer, &bytes[span.start as usize..span.end as usize])?;
        }
        Ok(())
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (1..threads as u32)
            .map(|t| {
                let r = (t * per).min(layers)..((t + 1) * per).min(layers);
                s.spawn(move || check(r))
            })
            .collect();
        let first = check(0..per.min(layers));
        let mut result = first;
        for h in handles {
            let r = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}
