//! Choosing the back end: GDS, then pinned staging, then an error that names why.
//!
//! On a machine without CUDA (this project's CI and build machines) every way of opening the
//! CUDA back end must end in a typed error carrying the probe's reason, never a panic and
//! never a silent host fall back. On a machine with CUDA the same tests check the other side
//! (a device path is chosen), so they assert something wherever they run.

use kvfs_cuda::{CudaBackend, CudaError, GpuOptions, GpuPath, ProbeOptions, device_path};
use kvfs_gds::{GdsError, Probe};

fn has_cuda() -> bool {
    kvfs_gds::probe::cuda_library().is_ok()
}

fn forced(path: GpuPath) -> GpuOptions {
    GpuOptions {
        probe: ProbeOptions {
            force: Some(path),
            probe_dir: std::env::temp_dir(),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn report(path: GpuPath, reasons: &[&str]) -> Probe {
    Probe {
        path,
        forced: None,
        reasons: reasons.iter().map(|r| r.to_string()).collect(),
        devices: Vec::new(),
        device: 0,
        driver_version: None,
        nvrtc: false,
        cufile: false,
        nvidia_fs: false,
    }
}

#[test]
fn the_probe_decides_device_path_or_names_why_not() {
    assert_eq!(
        device_path(&report(GpuPath::Gds, &[])).unwrap(),
        GpuPath::Gds
    );
    assert_eq!(
        device_path(&report(GpuPath::Staging, &[])).unwrap(),
        GpuPath::Staging
    );
    assert_eq!(
        device_path(&report(GpuPath::Compat, &[])).unwrap(),
        GpuPath::Compat
    );
    let why = ["libcuda.so.1 not found (dlopen: ...): host memory only"];
    match device_path(&report(GpuPath::HostOnly, &why)) {
        Err(e @ CudaError::Unavailable { .. }) => {
            assert!(e.to_string().contains("libcuda.so.1 not found"), "{e}")
        }
        other => panic!("want Unavailable, got {other:?}"),
    }
}

#[test]
fn opening_without_cuda_names_the_missing_library() {
    let r = CudaBackend::open(&GpuOptions {
        probe: ProbeOptions {
            probe_dir: std::env::temp_dir(),
            ..Default::default()
        },
        ..Default::default()
    });
    if has_cuda() {
        let b = r.expect("CUDA is present: a device path must open");
        assert!(
            matches!(b.path(), GpuPath::Gds | GpuPath::Staging),
            "{:?}",
            b.path()
        );
        return;
    }
    match r {
        Err(CudaError::Unavailable { reasons }) => assert!(
            reasons.iter().any(|r| r.contains("libcuda.so.1 not found")),
            "{reasons:?}"
        ),
        other => panic!("want Unavailable, got {other:?}"),
    }
}

#[test]
fn a_forced_device_path_is_never_a_silent_fall_back() {
    for path in [GpuPath::Gds, GpuPath::Compat, GpuPath::Staging] {
        let r = CudaBackend::open(&forced(path));
        if has_cuda() {
            // A GPU without GDS is normal: then gds/compat are PathUnavailable; staging opens.
            match r {
                Ok(b) => assert_eq!(b.path(), path),
                Err(CudaError::Gpu(GdsError::PathUnavailable { wanted, .. })) => {
                    assert_ne!(path, GpuPath::Staging);
                    assert_eq!(wanted, path.name())
                }
                Err(e) => panic!("{path}: {e}"),
            }
            continue;
        }
        match r {
            Err(CudaError::Gpu(GdsError::PathUnavailable { wanted, reasons })) => {
                assert_eq!(wanted, path.name());
                assert!(
                    reasons.iter().any(|r| r.contains("libcuda.so.1 not found")),
                    "{reasons:?}"
                );
            }
            other => panic!("{path}: want PathUnavailable, got {other:?}"),
        }
    }
}

#[test]
fn forcing_host_memory_is_no_cuda_back_end() {
    match CudaBackend::open(&forced(GpuPath::HostOnly)) {
        Err(e @ CudaError::Unavailable { .. }) => {
            assert!(e.to_string().contains("KVFS_GPU_PATH=host"), "{e}")
        }
        other => panic!("want Unavailable, got {other:?}"),
    }
}
