//! `KVFS_GPU_PATH` read from the environment: an unknown value is a typed error naming it.
//! Alone in its test binary, because it sets an environment variable, which must not race
//! other threads reading the environment (the probe's `dlopen` does).

use kvfs_cuda::{CudaBackend, CudaError};
use kvfs_gds::GdsError;

#[test]
fn an_unknown_forced_path_is_a_typed_error() {
    // SAFETY: the only test of this binary: no other thread reads the environment.
    unsafe { std::env::set_var("KVFS_GPU_PATH", "turbo") };
    let r = CudaBackend::from_env();
    // SAFETY: as above.
    unsafe { std::env::remove_var("KVFS_GPU_PATH") };
    match r {
        Err(e @ CudaError::Gpu(GdsError::InvalidForcedPath { .. })) => {
            assert!(e.to_string().contains("turbo"), "{e}")
        }
        other => panic!("want InvalidForcedPath, got {other:?}"),
    }
}
