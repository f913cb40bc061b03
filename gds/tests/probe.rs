//! The probe on a machine without CUDA: host-only with a clear reason, and every forced
//! device path a typed error, never a panic. One test function, because it sets
//! `KVFS_GPU_PATH` and the environment is process-wide.

use std::os::fd::AsRawFd;

use kvfs_gds::probe::{FORCE_ENV, cuda_library};
use kvfs_gds::{
    GdsError, GpuLoader, GpuOptions, GpuPath, ProbeOptions, ReadExtent, ScatterPlan, probe, select,
};

#[test]
fn without_cuda_the_probe_reports_host_only_and_forcing_fails_cleanly() {
    if let Ok(lib) = cuda_library() {
        eprintln!("skipping: {lib} loads on this machine; this test covers machines without CUDA");
        return;
    }
    let p = probe(&ProbeOptions::default());
    assert_eq!(p.path, GpuPath::HostOnly);
    assert!(p.devices.is_empty());
    assert!(
        p.reasons[0].contains("libcuda.so.1 not found"),
        "{:?}",
        p.reasons
    );
    let shown = p.to_string();
    assert!(shown.starts_with("GPU path: host\n"), "{shown}");
    assert!(shown.contains("libcuda.so.1 not found"), "{shown}");

    for forced in [GpuPath::Gds, GpuPath::Compat, GpuPath::Staging] {
        let opts = ProbeOptions {
            force: Some(forced),
            ..Default::default()
        };
        match select(&opts) {
            Err(GdsError::PathUnavailable { wanted, reasons }) => {
                assert_eq!(wanted, forced.name());
                assert!(reasons.iter().any(|r| r.contains("libcuda.so.1 not found")));
            }
            other => panic!("forcing {forced} without CUDA gave {other:?}"),
        }
        let err = GpuLoader::new(&GpuOptions {
            probe: opts,
            ..Default::default()
        })
        .err()
        .expect("a forced device path needs CUDA");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("GPU path {forced} was forced but is unavailable")),
            "{msg}"
        );
    }

    // The same through the environment variable.
    // SAFETY: this is the only test in this binary, so no other thread reads the environment.
    unsafe { std::env::set_var(FORCE_ENV, "gds") };
    assert!(matches!(
        GpuLoader::from_env(),
        Err(GdsError::PathUnavailable { wanted: "gds", .. })
    ));
    // SAFETY: as above.
    unsafe { std::env::set_var(FORCE_ENV, "turbo") };
    assert!(matches!(
        GpuLoader::from_env(),
        Err(GdsError::InvalidForcedPath { ref value }) if value == "turbo"
    ));
    // SAFETY: as above.
    unsafe { std::env::set_var(FORCE_ENV, "host") };
    let mut host = GpuLoader::from_env().unwrap();
    assert_eq!(host.path(), GpuPath::HostOnly);
    assert!(host.layer_event(0).is_none());
    host.synchronize().unwrap();
    // Device loads on a host-only loader are a typed error.
    let f = tempfile::tempfile().unwrap();
    let ext = [ReadExtent {
        file: f.as_raw_fd(),
        offset: 0,
        len: 0,
    }];
    let plan = ScatterPlan::new(vec![], vec![]).unwrap();
    // SAFETY: the plan has no runs, so no device address is touched (and a host-only
    // loader touches none at all).
    assert!(matches!(
        unsafe { host.load_extents(&ext, &plan) },
        Err(GdsError::NoDevice { .. })
    ));
    // SAFETY: as above.
    assert!(matches!(
        unsafe { host.store_extents(&ext, &plan) },
        Err(GdsError::NoDevice { .. })
    ));
    // SAFETY: as above.
    unsafe { std::env::remove_var(FORCE_ENV) };
    assert_eq!(GpuLoader::from_env().unwrap().path(), GpuPath::HostOnly);
}
