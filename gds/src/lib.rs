//! GPU file I/O for kvfs: move byte extents of files into (and out of) device memory.
//!
//! kvfs-gds is format-agnostic: it knows nothing of `.kvc` chunks. The loader computes which
//! file extents hold the bytes it wants and where each byte must land (a [`ScatterPlan`]),
//! and this crate moves them:
//!
//! - **GDS**: cuFile reads whole aligned extents straight into a registered device staging
//!   buffer, then a scatter kernel places them into paged KV blocks ([`cuda`]).
//! - **Staging**: O_DIRECT reads into a ring of pinned host buffers, each copied to the device
//!   while the next is read, then the same scatter ([`ring`], [`cuda`]).
//! - **Host only**: the same ring with a host sink ([`HostSink`]); this is also the oracle
//!   the GPU paths are compared with byte for byte.
//!
//! Nothing CUDA is linked: cudarc loads `libcuda`/`libnvrtc` at run time and cuFile is bound
//! by dlsym ([`cufile`]). [`probe()`] decides the path before any CUDA call, with reasons,
//! so a machine without CUDA gets [`GpuPath::HostOnly`] and never a panic.
//!
//! Module map: [`align`] (alignment, aligned buffers), [`plan`] (extents -> aligned fills),
//! [`scatter`] (scatter plans, block tables), [`direct`] (O_DIRECT with fall back),
//! [`ring`] (the staging ring and the [`Sink`] trait), [`probe`](mod@probe) (path selection),
//! [`cufile`] (cuFile bindings), [`cuda`] (device memory and copies, the staging sink, the
//! cuFile engine, the kernels in `cuda/kernels.cu`, [`GpuLoader`]). `align` and `direct` are
//! kvfs-direct's, the O_DIRECT stack kvfs-loader uses too.
//!
//! It owns moving bytes between files and device memory. It must not know the `.kvc` format,
//! keys, namespaces, stores or mounts: it depends on no other kvfs crate but kvfs-direct.
//! Plans carry raw device addresses, so the calls that write or read through them are
//! `unsafe fn`s whose `# Safety` sections say what the caller promises.

pub mod align;
pub mod cuda;
pub mod cufile;
pub mod direct;
pub mod error;
pub mod plan;
pub mod probe;
pub mod ring;
pub mod scatter;

pub use align::{AlignedBuf, DIRECT_ALIGN};
pub use cuda::{GpuLoader, GpuOptions};
pub use error::{GdsError, Result};
pub use plan::{Fill, Piece, ReadExtent, WriteExtent, plan_fills};
pub use probe::{DeviceInfo, GpuPath, Probe, ProbeOptions, probe, select};
pub use ring::{HostSink, IoStats, Ring, Sink};
pub use scatter::{PagedLayout, ScatterPlan, ScatterRun, Segment};
