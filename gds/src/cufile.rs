//! cuFile (GPUDirect Storage) bindings, resolved with `dlopen`/`dlsym` at run time.
//!
//! Why not cudarc's `cufile` module: its loader looks for `libcufile.so` and `.so.12`-style
//! names but not `libcufile.so.0`, the soname the CUDA runtime packages (and the
//! `nvidia-cufile-cu12` wheel) install, and it would panic when the library is missing; its
//! `CUfileError` holds a Rust enum, which is undefined behaviour for a code the bindings do
//! not list. So this module declares the dozen entry points kvfs uses with plain integer
//! types, resolves them from the first of `libcufile.so.0` / `libcufile.so` that loads, and
//! reports a missing library or symbol as a reason string.
//!
//! The cuFile driver is opened once per process ([`CuFile::driver_open`]) and never closed:
//! registrations are cached for the life of the process and closing would invalidate them.

use std::ffi::{CStr, CString, c_int, c_uint, c_void};
use std::sync::OnceLock;

use crate::error::{GdsError, Result};

/// `CUfileError_t` with integer fields (no enum UB).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CuFileError {
    /// `CUfileOpError` (0 = success, 5000s = errors).
    pub err: c_int,
    /// `CUresult` when `err` is `CU_FILE_CUDA_DRIVER_ERROR`.
    pub cu_err: c_int,
}

/// `CU_FILE_HANDLE_TYPE_OPAQUE_FD`.
pub const HANDLE_TYPE_OPAQUE_FD: c_int = 1;
/// `CUFILE_BATCH` mode.
pub const BATCH_MODE: c_int = 1;
/// `CUFILE_READ` opcode.
pub const OP_READ: c_int = 0;
/// `CUFILE_WRITE` opcode.
pub const OP_WRITE: c_int = 1;
/// `CUFILE_COMPLETE` status.
pub const STATUS_COMPLETE: c_int = 0x10;
/// Status bits that end an I/O unsuccessfully: INVALID, CANCELED, TIMEOUT, FAILED.
pub const STATUS_FAILED_MASK: c_int = 0x04 | 0x08 | 0x20 | 0x40;

/// `CUfileDescr_t` for an fd.
#[repr(C)]
pub struct CuFileDescr {
    /// Handle type.
    pub type_: c_int,
    /// Union of `int fd` / `void *handle`: 8 bytes, fd in the low half.
    pub handle: u64,
    /// `const CUfileFSOps_t *`, null for fds.
    pub fs_ops: *const c_void,
}

/// `CUfileIOParams_t` (batch mode).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CuFileIoParams {
    /// `CUFILE_BATCH`.
    pub mode: c_int,
    /// Registered device buffer base.
    pub dev_ptr_base: *mut c_void,
    /// File offset.
    pub file_offset: i64,
    /// Offset from the buffer base.
    pub dev_ptr_offset: i64,
    /// Bytes.
    pub size: usize,
    /// File handle.
    pub fh: *mut c_void,
    /// `CUFILE_READ` / `CUFILE_WRITE`.
    pub opcode: c_int,
    /// Returned in the event.
    pub cookie: *mut c_void,
}

/// `CUfileIOEvents_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CuFileIoEvent {
    /// The cookie of the request.
    pub cookie: *mut c_void,
    /// `CUfileStatus_t`.
    pub status: c_int,
    /// Bytes transferred (or an error as a negative value cast to size_t).
    pub ret: usize,
}

type FnVoid = unsafe extern "C" fn() -> CuFileError;
type FnHandleRegister = unsafe extern "C" fn(*mut *mut c_void, *mut CuFileDescr) -> CuFileError;
type FnHandleDeregister = unsafe extern "C" fn(*mut c_void);
type FnBufRegister = unsafe extern "C" fn(*const c_void, usize, c_int) -> CuFileError;
type FnBufDeregister = unsafe extern "C" fn(*const c_void) -> CuFileError;
type FnRead = unsafe extern "C" fn(*mut c_void, *mut c_void, usize, i64, i64) -> isize;
type FnWrite = unsafe extern "C" fn(*mut c_void, *const c_void, usize, i64, i64) -> isize;
type FnBatchSetUp = unsafe extern "C" fn(*mut *mut c_void, c_uint) -> CuFileError;
type FnBatchSubmit =
    unsafe extern "C" fn(*mut c_void, c_uint, *mut CuFileIoParams, c_uint) -> CuFileError;
type FnBatchStatus = unsafe extern "C" fn(
    *mut c_void,
    c_uint,
    *mut c_uint,
    *mut CuFileIoEvent,
    *mut libc::timespec,
) -> CuFileError;
type FnBatchDestroy = unsafe extern "C" fn(*mut c_void);

/// The resolved cuFile entry points.
pub struct CuFile {
    /// Which file name loaded.
    pub soname: String,
    driver_open: FnVoid,
    handle_register: FnHandleRegister,
    handle_deregister: FnHandleDeregister,
    buf_register: FnBufRegister,
    buf_deregister: FnBufDeregister,
    read: FnRead,
    write: FnWrite,
    batch_setup: Option<FnBatchSetUp>,
    batch_submit: Option<FnBatchSubmit>,
    batch_status: Option<FnBatchStatus>,
    batch_destroy: Option<FnBatchDestroy>,
    opened: OnceLock<std::result::Result<(), String>>,
}

// SAFETY: the struct holds function pointers into a library that stays loaded for the
// process's life; cuFile's API is thread safe.
unsafe impl Send for CuFile {}
// SAFETY: as above.
unsafe impl Sync for CuFile {}

/// File names tried, in order.
pub const CUFILE_NAMES: &[&str] = &["libcufile.so.0", "libcufile.so"];

/// `dlopen`s the first loadable of `names`; returns the handle and name, or the reason.
pub fn dlopen_first(names: &[&str]) -> std::result::Result<(*mut c_void, String), String> {
    let mut errs = Vec::new();
    for name in names {
        let c = CString::new(*name).expect("library names have no NUL");
        // SAFETY: dlopen with a valid C string; RTLD_NOW surfaces missing dependencies here
        // rather than at the first call. The handle is intentionally never closed.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !h.is_null() {
            return Ok((h, (*name).to_string()));
        }
        errs.push(dlerror_string());
    }
    Err(format!(
        "{} not found (dlopen: {})",
        names[0],
        errs.join("; ")
    ))
}

fn dlerror_string() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string valid until the next dl* call
    // on this thread; we copy it at once.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: non-null, NUL-terminated per dlerror's contract.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

fn sym<T: Copy>(h: *mut c_void, name: &str) -> Option<T> {
    let c = CString::new(name).expect("symbol names have no NUL");
    // SAFETY: dlsym on a live handle with a valid C string.
    let p = unsafe { libc::dlsym(h, c.as_ptr()) };
    if p.is_null() {
        return None;
    }
    assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: T is one of the extern "C" fn pointer types above, pointer-sized (asserted),
    // and the symbol has that C signature per cufile.h.
    Some(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

static LIB: OnceLock<std::result::Result<CuFile, String>> = OnceLock::new();

/// The process-wide cuFile library, loaded on first use.
pub fn library() -> std::result::Result<&'static CuFile, String> {
    LIB.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> std::result::Result<CuFile, String> {
    let (h, soname) = dlopen_first(CUFILE_NAMES)?;
    let need = |name: &str| format!("{soname} lacks symbol {name}");
    Ok(CuFile {
        driver_open: sym(h, "cuFileDriverOpen").ok_or_else(|| need("cuFileDriverOpen"))?,
        handle_register: sym(h, "cuFileHandleRegister")
            .ok_or_else(|| need("cuFileHandleRegister"))?,
        handle_deregister: sym(h, "cuFileHandleDeregister")
            .ok_or_else(|| need("cuFileHandleDeregister"))?,
        buf_register: sym(h, "cuFileBufRegister").ok_or_else(|| need("cuFileBufRegister"))?,
        buf_deregister: sym(h, "cuFileBufDeregister").ok_or_else(|| need("cuFileBufDeregister"))?,
        read: sym(h, "cuFileRead").ok_or_else(|| need("cuFileRead"))?,
        write: sym(h, "cuFileWrite").ok_or_else(|| need("cuFileWrite"))?,
        batch_setup: sym(h, "cuFileBatchIOSetUp"),
        batch_submit: sym(h, "cuFileBatchIOSubmit"),
        batch_status: sym(h, "cuFileBatchIOGetStatus"),
        batch_destroy: sym(h, "cuFileBatchIODestroy"),
        opened: OnceLock::new(),
        soname,
    })
}

fn check(op: &'static str, e: CuFileError) -> Result<()> {
    if e.err == 0 {
        Ok(())
    } else {
        Err(GdsError::CuFile {
            op,
            code: e.err as i64,
            cu_code: e.cu_err,
            msg: String::new(),
        })
    }
}

/// A registered file handle.
#[derive(Debug)]
pub struct FileHandle(pub(crate) *mut c_void);

// SAFETY: a cuFile handle is an opaque token owned by this value alone; cuFile's API is
// thread-safe and takes handles from any thread (the GDS engine, and with it a GpuLoader,
// may be moved to a loading thread).
unsafe impl Send for FileHandle {}

/// A batch I/O context.
#[derive(Debug)]
pub struct BatchHandle(*mut c_void);

impl CuFile {
    /// Opens the cuFile driver once per process; later calls return the first result.
    pub fn driver_open(&self) -> Result<()> {
        self.opened
            .get_or_init(|| {
                // SAFETY: cuFileDriverOpen takes no arguments; the library is loaded.
                let e = unsafe { (self.driver_open)() };
                check("cuFileDriverOpen", e).map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|msg| GdsError::CuFile {
                op: "cuFileDriverOpen",
                code: -1,
                cu_code: 0,
                msg,
            })
    }

    /// Whether the batch API symbols are present.
    pub fn has_batch(&self) -> bool {
        self.batch_setup.is_some()
            && self.batch_submit.is_some()
            && self.batch_status.is_some()
            && self.batch_destroy.is_some()
    }

    /// Registers an open file descriptor (ideally opened with O_DIRECT).
    pub fn handle_register(&self, fd: c_int) -> Result<FileHandle> {
        let mut descr = CuFileDescr {
            type_: HANDLE_TYPE_OPAQUE_FD,
            handle: fd as u32 as u64,
            fs_ops: std::ptr::null(),
        };
        let mut fh: *mut c_void = std::ptr::null_mut();
        // SAFETY: both pointers reference live locals of the declared C layout.
        let e = unsafe { (self.handle_register)(&mut fh, &mut descr) };
        check("cuFileHandleRegister", e)?;
        Ok(FileHandle(fh))
    }

    /// Deregisters a handle.
    pub fn handle_deregister(&self, fh: FileHandle) {
        // SAFETY: fh came from handle_register and is consumed here.
        unsafe { (self.handle_deregister)(fh.0) }
    }

    /// Registers device memory `[ptr, ptr+len)` for direct transfers.
    ///
    /// # Safety
    /// `ptr` must be a live device allocation of at least `len` bytes.
    pub unsafe fn buf_register(&self, ptr: u64, len: usize) -> Result<()> {
        // SAFETY: per the caller's contract.
        check("cuFileBufRegister", unsafe {
            (self.buf_register)(ptr as *const c_void, len, 0)
        })
    }

    /// Deregisters device memory registered with [`CuFile::buf_register`].
    ///
    /// # Safety
    /// `ptr` must have been registered and still be allocated.
    pub unsafe fn buf_deregister(&self, ptr: u64) -> Result<()> {
        // SAFETY: per the caller's contract.
        check("cuFileBufDeregister", unsafe {
            (self.buf_deregister)(ptr as *const c_void)
        })
    }

    /// Reads `size` bytes at `file_offset` into device memory `base + dev_offset`; returns
    /// the bytes read (short at end of file).
    ///
    /// # Safety
    /// `base` must be a live device allocation with `dev_offset + size` bytes.
    pub unsafe fn read(
        &self,
        fh: &FileHandle,
        base: u64,
        size: usize,
        file_offset: u64,
        dev_offset: u64,
    ) -> Result<usize> {
        // SAFETY: per the caller's contract.
        let n = unsafe {
            (self.read)(
                fh.0,
                base as *mut c_void,
                size,
                file_offset as i64,
                dev_offset as i64,
            )
        };
        io_result("cuFileRead", n)
    }

    /// Writes `size` bytes from device memory `base + dev_offset` at `file_offset`.
    ///
    /// # Safety
    /// `base` must be a live device allocation with `dev_offset + size` bytes.
    pub unsafe fn write(
        &self,
        fh: &FileHandle,
        base: u64,
        size: usize,
        file_offset: u64,
        dev_offset: u64,
    ) -> Result<usize> {
        // SAFETY: per the caller's contract.
        let n = unsafe {
            (self.write)(
                fh.0,
                base as *const c_void,
                size,
                file_offset as i64,
                dev_offset as i64,
            )
        };
        io_result("cuFileWrite", n)
    }

    /// Creates a batch context for up to `max` requests.
    pub fn batch_setup(&self, max: u32) -> Result<BatchHandle> {
        let f = self
            .batch_setup
            .ok_or_else(|| missing("cuFileBatchIOSetUp"))?;
        let mut h = std::ptr::null_mut();
        // SAFETY: h is a live out-pointer.
        check("cuFileBatchIOSetUp", unsafe { f(&mut h, max) })?;
        Ok(BatchHandle(h))
    }

    /// Submits `params` and waits until all complete; returns bytes per request.
    ///
    /// # Safety
    /// Every request's buffer must be registered device memory large enough for it, and
    /// every handle live.
    pub unsafe fn batch_run(
        &self,
        b: &BatchHandle,
        params: &mut [CuFileIoParams],
    ) -> Result<Vec<usize>> {
        let submit = self
            .batch_submit
            .ok_or_else(|| missing("cuFileBatchIOSubmit"))?;
        let status = self
            .batch_status
            .ok_or_else(|| missing("cuFileBatchIOGetStatus"))?;
        for (i, p) in params.iter_mut().enumerate() {
            p.cookie = i as *mut c_void;
        }
        let n = params.len() as c_uint;
        // SAFETY: params is a live array of n requests; per the caller's contract.
        check("cuFileBatchIOSubmit", unsafe {
            submit(b.0, n, params.as_mut_ptr(), 0)
        })?;
        let mut done = vec![None; params.len()];
        let mut left = params.len();
        let mut events = vec![
            CuFileIoEvent {
                cookie: std::ptr::null_mut(),
                status: 0,
                ret: 0
            };
            params.len()
        ];
        while left > 0 {
            let mut nr: c_uint = events.len() as c_uint;
            let mut ts = libc::timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            // SAFETY: events has nr slots; nr and ts are live.
            check("cuFileBatchIOGetStatus", unsafe {
                status(b.0, 1, &mut nr, events.as_mut_ptr(), &mut ts)
            })?;
            for ev in &events[..nr as usize] {
                let i = ev.cookie as usize;
                if i >= done.len() || done[i].is_some() {
                    continue;
                }
                if ev.status & STATUS_COMPLETE != 0 {
                    done[i] = Some(ev.ret);
                    left -= 1;
                } else if ev.status & STATUS_FAILED_MASK != 0 {
                    return Err(GdsError::CuFile {
                        op: "cuFileBatchIO request",
                        code: ev.status as i64,
                        cu_code: 0,
                        msg: format!("request {i} ended with status {:#x}", ev.status),
                    });
                }
            }
        }
        Ok(done.into_iter().map(|d| d.unwrap_or(0)).collect())
    }

    /// Destroys a batch context.
    pub fn batch_destroy(&self, b: BatchHandle) {
        if let Some(f) = self.batch_destroy {
            // SAFETY: b came from batch_setup and is consumed here.
            unsafe { f(b.0) }
        }
    }
}

fn missing(name: &'static str) -> GdsError {
    GdsError::CuFile {
        op: name,
        code: -1,
        cu_code: 0,
        msg: "symbol missing from libcufile".into(),
    }
}

fn io_result(op: &'static str, n: isize) -> Result<usize> {
    if n >= 0 {
        Ok(n as usize)
    } else {
        // cuFileRead/Write return -errno for OS errors and -CUfileOpError for cuFile errors.
        Err(GdsError::CuFile {
            op,
            code: n as i64,
            cu_code: 0,
            msg: if -n < 5000 {
                std::io::Error::from_raw_os_error(-n as i32).to_string()
            } else {
                String::new()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_layouts_match_cufile_h() {
        // CUfileDescr_t: enum (4) + pad (4) + union (8) + pointer (8).
        assert_eq!(std::mem::size_of::<CuFileDescr>(), 24);
        // CUfileIOParams_t: mode (4+4) + batch struct (32) + fh (8) + opcode (4+4) + cookie (8).
        assert_eq!(std::mem::size_of::<CuFileIoParams>(), 64);
        assert_eq!(std::mem::size_of::<CuFileIoEvent>(), 24);
    }

    #[test]
    fn missing_library_is_a_reason_not_a_panic() {
        let err = dlopen_first(&["libkvfs-does-not-exist.so.0"]).unwrap_err();
        assert!(
            err.starts_with("libkvfs-does-not-exist.so.0 not found"),
            "{err}"
        );
        if let Err(reason) = library() {
            assert!(reason.contains("libcufile.so.0 not found"), "{reason}");
        }
    }
}
