//! [`MountOptions`]: how a kvfs mount behaves, and the fuser configuration it implies: a
//! session with `threads` workers, each with its own cloned `/dev/fuse` descriptor
//! (`FUSE_DEV_IOC_CLONE`) so requests are read in parallel; `allow_other` only when asked
//! (and then the kernel checks permissions, `default_permissions`, so `--uid/--gid/--umask`
//! mean something). Plain data: it imports nothing else of this crate.

use fuser::{Config, MountOption, SessionACL};

/// How a kvfs mount behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Refuse every modification (EROFS); also the kernel's `ro` flag.
    pub read_only: bool,
    /// Let users other than the one mounting use the mount (`allow_other`).
    pub allow_other: bool,
    /// Owner shown for every file and directory.
    pub uid: u32,
    /// Group shown for every file and directory.
    pub gid: u32,
    /// Bits cleared from the modes shown (directories 0777, chunks 0444 before it).
    pub umask: u32,
    /// Worker threads serving requests.
    pub threads: usize,
    /// Use FUSE passthrough for chunks on local disk when the kernel offers it.
    pub passthrough: bool,
    /// Source name in /proc/mounts.
    pub fsname: String,
}

impl Default for MountOptions {
    fn default() -> Self {
        // SAFETY: geteuid and getegid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        MountOptions {
            read_only: false,
            allow_other: false,
            uid,
            gid,
            umask: 0o022,
            threads: 8,
            passthrough: true,
            fsname: "kvfs".to_string(),
        }
    }
}

impl MountOptions {
    /// fuser's configuration for these options.
    pub fn fuser_config(&self) -> Config {
        let mut mount_options = vec![
            MountOption::FSName(self.fsname.clone()),
            MountOption::Subtype("kvfs".to_string()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoAtime,
        ];
        mount_options.push(if self.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        });
        if self.allow_other {
            mount_options.push(MountOption::DefaultPermissions);
        }
        let mut config = Config::default();
        config.mount_options = mount_options;
        config.acl = if self.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        config.n_threads = Some(self.threads.max(1));
        config.clone_fd = true;
        config
    }
}
