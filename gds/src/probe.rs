//! Run-time probe: which GPU path this process can use, and why.
//!
//! The probe never panics and never touches cudarc before it has seen the library load
//! with a plain `dlopen` (cudarc's dynamic loader panics on a missing library on first
//! use); the cudarc calls themselves are wrapped in `catch_unwind` as a second guard
//! against a missing symbol in an old driver. Steps, each adding a reason line:
//!
//! 1. `libcuda.so.1` loads, `cuInit` succeeds, and the chosen device exists -> CUDA usable;
//!    otherwise **HostOnly**.
//! 2. `libnvrtc` loads -> the scatter kernel can be compiled (otherwise the device paths
//!    scatter with many asynchronous copies, which is slower but correct).
//! 3. `libcufile.so.0` loads, `cuFileDriverOpen` succeeds, a file opened with O_DIRECT in
//!    the probe directory registers with `cuFileHandleRegister`, and the `nvidia-fs` kernel
//!    module is loaded -> **Gds**. Without `nvidia-fs`, cuFile would quietly run in
//!    compatibility mode (POSIX reads through its own bounce buffers), so the probe prefers
//!    **Staging**, kvfs's own overlapped pipeline, and says so.
//!
//! Forcing: `KVFS_GPU_PATH=gds|compat|staging|host` (or [`ProbeOptions::force`]). A forced
//! path that this machine cannot provide is a [`GdsError::PathUnavailable`] carrying the
//! reasons, not a silent fall back; `compat` sets `CUFILE_FORCE_COMPAT_MODE=true` before the
//! cuFile driver is opened (see [`select`] for the caveat).

use std::fmt;
use std::os::fd::AsRawFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::cufile;
use crate::error::{GdsError, Result};

/// Environment variable that forces a path.
pub const FORCE_ENV: &str = "KVFS_GPU_PATH";

/// Library names tried for the CUDA driver.
pub const CUDA_NAMES: &[&str] = &["libcuda.so.1", "libcuda.so"];
/// Library names tried for NVRTC (the names cudarc's loader also tries).
pub const NVRTC_NAMES: &[&str] = &["libnvrtc.so.12", "libnvrtc.so"];

/// How bytes get from files to device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GpuPath {
    /// cuFile reads straight into device memory (GPUDirect Storage, nvidia-fs present).
    Gds,
    /// cuFile in compatibility mode: same API, POSIX reads through cuFile's bounce buffers.
    /// Only when forced.
    Compat,
    /// O_DIRECT reads into pinned host buffers, overlapped asynchronous copies.
    Staging,
    /// No usable CUDA: loads go to host memory only.
    HostOnly,
}

impl GpuPath {
    /// The name used by `KVFS_GPU_PATH`.
    pub fn name(self) -> &'static str {
        match self {
            GpuPath::Gds => "gds",
            GpuPath::Compat => "compat",
            GpuPath::Staging => "staging",
            GpuPath::HostOnly => "host",
        }
    }

    /// Parses a `KVFS_GPU_PATH` value (case-insensitive; `host-only`/`hostonly` accepted).
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "gds" => Ok(GpuPath::Gds),
            "compat" => Ok(GpuPath::Compat),
            "staging" => Ok(GpuPath::Staging),
            "host" | "host-only" | "hostonly" => Ok(GpuPath::HostOnly),
            _ => Err(GdsError::InvalidForcedPath { value: s.into() }),
        }
    }

    /// Whether the path moves data to a device.
    pub fn uses_device(self) -> bool {
        self != GpuPath::HostOnly
    }
}

impl fmt::Display for GpuPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One CUDA device as the probe saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Ordinal.
    pub ordinal: usize,
    /// Marketing name.
    pub name: String,
    /// Memory in bytes.
    pub total_mem: usize,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
}

/// What the probe found and the path it chose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// The chosen path.
    pub path: GpuPath,
    /// The path that was forced, if any.
    pub forced: Option<GpuPath>,
    /// One line per step: what was found or why it failed.
    pub reasons: Vec<String>,
    /// CUDA devices.
    pub devices: Vec<DeviceInfo>,
    /// The device the loader uses.
    pub device: usize,
    /// CUDA driver version (e.g. 12080), if the driver loaded.
    pub driver_version: Option<i32>,
    /// Whether NVRTC loads (scatter kernel available).
    pub nvrtc: bool,
    /// Whether cuFile is usable (driver open, handle registration worked).
    pub cufile: bool,
    /// Whether the nvidia-fs kernel module is loaded.
    pub nvidia_fs: bool,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GPU path: {}", self.path)?;
        if let Some(p) = self.forced {
            write!(f, " (forced by {FORCE_ENV}={p})")?;
        }
        writeln!(f)?;
        match self.driver_version {
            Some(v) => writeln!(f, "CUDA driver: {}.{}", v / 1000, (v % 1000) / 10)?,
            None => writeln!(f, "CUDA driver: none")?,
        }
        if self.devices.is_empty() {
            writeln!(f, "devices: none")?;
        }
        for d in &self.devices {
            writeln!(
                f,
                "device {}{}: {} ({:.1} GiB, sm_{}{})",
                d.ordinal,
                if d.ordinal == self.device {
                    " [used]"
                } else {
                    ""
                },
                d.name,
                d.total_mem as f64 / (1u64 << 30) as f64,
                d.compute_capability.0,
                d.compute_capability.1
            )?;
        }
        writeln!(
            f,
            "nvrtc: {}, cufile: {}, nvidia-fs: {}",
            yes(self.nvrtc),
            yes(self.cufile),
            yes(self.nvidia_fs)
        )?;
        for r in &self.reasons {
            writeln!(f, "  - {r}")?;
        }
        Ok(())
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Inputs of the probe.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Forced path (`None`: choose the best available).
    pub force: Option<GpuPath>,
    /// Directory where the O_DIRECT + cuFile handle registration is tried (the cache dir:
    /// GDS support depends on the file system).
    pub probe_dir: PathBuf,
    /// CUDA device ordinal.
    pub device: usize,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            force: None,
            probe_dir: std::env::temp_dir(),
            device: 0,
        }
    }
}

impl ProbeOptions {
    /// Defaults with `force` read from `KVFS_GPU_PATH` (unset or empty: not forced).
    pub fn from_env() -> Result<Self> {
        let force = match std::env::var(FORCE_ENV) {
            Ok(v) if !v.trim().is_empty() => Some(GpuPath::parse(&v)?),
            _ => None,
        };
        Ok(ProbeOptions {
            force,
            ..Default::default()
        })
    }
}

/// Probes and chooses the best available path (or the forced one when it is available).
/// Never fails: an unavailable forced path is reported in `reasons` and the best available
/// path is chosen. Use [`select`] to turn an unavailable forced path into an error.
pub fn probe(opts: &ProbeOptions) -> Probe {
    probe_inner(opts).0
}

/// Like [`probe`], but a forced path that is unavailable is a
/// [`GdsError::PathUnavailable`] listing the reasons.
///
/// Forcing `compat` sets `CUFILE_FORCE_COMPAT_MODE=true` in the environment before the
/// cuFile driver is first opened; it has no effect if the driver was already opened in this
/// process, and like any `setenv` it must not race other threads reading the environment
/// (call it early, from the thread that sets the process up).
pub fn select(opts: &ProbeOptions) -> Result<Probe> {
    let (p, unavailable) = probe_inner(opts);
    if let Some(wanted) = unavailable {
        return Err(GdsError::PathUnavailable {
            wanted: wanted.name(),
            reasons: p.reasons,
        });
    }
    Ok(p)
}

fn probe_inner(opts: &ProbeOptions) -> (Probe, Option<GpuPath>) {
    let mut p = Probe {
        path: GpuPath::HostOnly,
        forced: opts.force,
        reasons: Vec::new(),
        devices: Vec::new(),
        device: opts.device,
        driver_version: None,
        nvrtc: false,
        cufile: false,
        nvidia_fs: false,
    };
    if opts.force == Some(GpuPath::HostOnly) {
        p.reasons.push(format!(
            "{FORCE_ENV}=host: CUDA not probed, host memory only"
        ));
        return (p, None);
    }
    let cuda = probe_cuda(opts.device, &mut p);
    if cuda {
        p.nvrtc = match cufile::dlopen_first(NVRTC_NAMES) {
            Ok((_, name)) => {
                p.reasons
                    .push(format!("{name} loaded: scatter kernel available"));
                true
            }
            Err(e) => {
                p.reasons
                    .push(format!("{e}: scatter falls back to batched async copies"));
                false
            }
        };
        if opts.force == Some(GpuPath::Compat)
            && std::env::var_os("CUFILE_FORCE_COMPAT_MODE").is_none()
        {
            // SAFETY: documented on `select`: called while setting the process up, before
            // the cuFile driver reads the variable and with no concurrent env readers.
            unsafe { std::env::set_var("CUFILE_FORCE_COMPAT_MODE", "true") };
            p.reasons
                .push("CUFILE_FORCE_COMPAT_MODE=true set for compat".into());
        }
        p.cufile = probe_cufile(&opts.probe_dir, &mut p.reasons);
        p.nvidia_fs = Path::new("/proc/driver/nvidia-fs").exists();
        if p.cufile {
            p.reasons.push(if p.nvidia_fs {
                "nvidia-fs kernel module loaded: direct GPU reads possible".into()
            } else {
                "nvidia-fs kernel module not loaded (/proc/driver/nvidia-fs absent): cuFile would run in compatibility mode, staging preferred".into()
            });
        }
    }
    let best = if !cuda {
        GpuPath::HostOnly
    } else if p.cufile && p.nvidia_fs {
        GpuPath::Gds
    } else {
        GpuPath::Staging
    };
    let mut unavailable = None;
    p.path = match opts.force {
        None => best,
        Some(f) => {
            let ok = match f {
                GpuPath::HostOnly => true,
                GpuPath::Staging => cuda,
                GpuPath::Compat => cuda && p.cufile,
                GpuPath::Gds => cuda && p.cufile && p.nvidia_fs,
            };
            if ok {
                p.reasons.push(format!("{FORCE_ENV}={f}: forced"));
                f
            } else {
                p.reasons.push(format!(
                    "{FORCE_ENV}={f} forced but unavailable; best available is {best}"
                ));
                unavailable = Some(f);
                best
            }
        }
    };
    match unavailable {
        Some(f) => warn!(forced = %f, chosen = %p.path, "forced GPU path unavailable"),
        None => info!(path = %p.path, "GPU path selected"),
    }
    (p, unavailable)
}

/// Runs `f`, turning a panic (cudarc's reaction to a missing library or symbol) into an
/// error string.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        format!("{what} panicked: {msg}")
    })
}

/// Whether the CUDA driver library can be loaded, without touching cudarc.
pub fn cuda_library() -> std::result::Result<String, String> {
    cufile::dlopen_first(CUDA_NAMES).map(|(_, n)| n)
}

fn probe_cuda(device: usize, p: &mut Probe) -> bool {
    let name = match cuda_library() {
        Ok(n) => n,
        Err(e) => {
            p.reasons.push(format!("{e}: host memory only"));
            return false;
        }
    };
    use cudarc::driver::result as cu;
    use cudarc::driver::sys;
    let r = guarded(
        "cuInit",
        || -> std::result::Result<Vec<DeviceInfo>, String> {
            cu::init().map_err(|e| format!("cuInit failed: {e}"))?;
            let n = cu::device::get_count().map_err(|e| format!("cuDeviceGetCount: {e}"))?;
            let mut devs = Vec::new();
            for i in 0..n {
                let d = cu::device::get(i).map_err(|e| format!("cuDeviceGet({i}): {e}"))?;
                let name = cu::device::get_name(d).unwrap_or_else(|e| format!("? ({e})"));
                // SAFETY: d was returned by cuDeviceGet.
                let total_mem = unsafe { cu::device::total_mem(d) }.unwrap_or(0);
                let attr = |a| {
                    // SAFETY: d was returned by cuDeviceGet.
                    unsafe { cu::device::get_attribute(d, a) }.unwrap_or(0)
                };
                let cc = (
                    attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                    attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
                );
                devs.push(DeviceInfo {
                    ordinal: i as usize,
                    name,
                    total_mem,
                    compute_capability: cc,
                });
            }
            Ok(devs)
        },
    );
    let mut version = 0i32;
    // SAFETY: cuDriverGetVersion writes one int; the library loaded (checked above).
    if guarded("cuDriverGetVersion", || unsafe {
        sys::cuDriverGetVersion(&mut version)
    })
    .is_ok()
        && version > 0
    {
        p.driver_version = Some(version);
    }
    match r {
        Ok(Ok(devs)) => {
            p.devices = devs;
            if p.devices.is_empty() {
                p.reasons.push(format!(
                    "{name} loaded but no CUDA device: host memory only"
                ));
                false
            } else if device >= p.devices.len() {
                p.reasons.push(format!(
                    "{name} loaded but device {device} does not exist ({} devices): host memory only",
                    p.devices.len()
                ));
                false
            } else {
                p.reasons
                    .push(format!("{name} loaded, {} device(s)", p.devices.len()));
                true
            }
        }
        Ok(Err(e)) | Err(e) => {
            p.reasons
                .push(format!("{name} loaded but {e}: host memory only"));
            false
        }
    }
}

fn probe_cufile(dir: &Path, reasons: &mut Vec<String>) -> bool {
    let lib = match cufile::library() {
        Ok(l) => l,
        Err(e) => {
            reasons.push(format!("{e}: no GDS"));
            return false;
        }
    };
    if let Err(e) = lib.driver_open() {
        reasons.push(format!("{} loaded but {e}: no GDS", lib.soname));
        return false;
    }
    let path = dir.join(format!(".kvfs-gds-probe-{}", std::process::id()));
    let res = (|| -> std::result::Result<(), String> {
        std::fs::write(&path, vec![0u8; 4096]).map_err(|e| format!("create probe file: {e}"))?;
        let f = crate::direct::open_read(&path).map_err(|e| e.to_string())?;
        if !f.direct {
            return Err(format!(
                "O_DIRECT unsupported in {}: {}",
                dir.display(),
                f.fallback_reason.unwrap_or_default()
            ));
        }
        let h = lib
            .handle_register(f.file.as_raw_fd())
            .map_err(|e| e.to_string())?;
        lib.handle_deregister(h);
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    match res {
        Ok(()) => {
            reasons.push(format!(
                "{} loaded, driver open, handle registration in {} works",
                lib.soname,
                dir.display()
            ));
            true
        }
        Err(e) => {
            reasons.push(format!("cuFile unusable in {}: {e}: no GDS", dir.display()));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_forced_paths() {
        assert_eq!(GpuPath::parse("GDS").unwrap(), GpuPath::Gds);
        assert_eq!(GpuPath::parse(" staging ").unwrap(), GpuPath::Staging);
        assert_eq!(GpuPath::parse("compat").unwrap(), GpuPath::Compat);
        assert_eq!(GpuPath::parse("host").unwrap(), GpuPath::HostOnly);
        let e = GpuPath::parse("fast").unwrap_err();
        assert!(matches!(e, GdsError::InvalidForcedPath { ref value } if value == "fast"));
        assert!(e.to_string().contains("gds, compat, staging, host"));
    }

    #[test]
    fn forced_host_skips_cuda() {
        let p = select(&ProbeOptions {
            force: Some(GpuPath::HostOnly),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.path, GpuPath::HostOnly);
        assert!(p.to_string().contains("forced by KVFS_GPU_PATH=host"));
    }
}
