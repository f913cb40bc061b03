//! A running `kvfs mount` for tests: started from a prepared command, ready once the mount
//! answers (`/.kvfs/mount.json` exists), always unmounted and reaped on drop, so a failing
//! test never leaves a mount behind.

// Each test crate uses its own subset of this module.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Mount {
    child: Option<Child>,
    dir: PathBuf,
    /// What the daemon wrote to stderr, once it has exited (`wait_exit`).
    stderr: String,
}

impl Mount {
    /// Spawns `cmd` (a `kvfs ... mount DIR ...` command line) and waits until `dir` serves.
    pub fn spawn(mut cmd: Command, dir: &Path) -> Mount {
        let child = cmd
            .env("KVFS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kvfs mount");
        let mut m = Mount {
            child: Some(child),
            dir: dir.to_path_buf(),
            stderr: String::new(),
        };
        let ready = dir.join(".kvfs").join("mount.json");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            let child = m.child.as_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("kvfs mount exited early ({status}): {err}");
            }
            assert!(Instant::now() < deadline, "mount did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    /// `kvfs --cache-dir CACHE mount DIR EXTRA...`
    pub fn start(cache: &Path, dir: &Path, extra: &[&str]) -> Mount {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvfs"));
        cmd.arg("--cache-dir")
            .arg(cache)
            .arg("mount")
            .arg(dir)
            .args(extra);
        Mount::spawn(cmd, dir)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits up to `limit` for the daemon to exit by itself; returns whether it exited
    /// successfully.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.child.as_mut().unwrap();
            if let Some(s) = child.try_wait().unwrap() {
                // Reaped by try_wait: only its stderr is left to read.
                if let Some(mut err) = child.stderr.take() {
                    let _ = err.read_to_string(&mut self.stderr);
                }
                self.child = None;
                return s.success();
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9` of the daemon, reaped, as a crash: the mount point is left stale (ENOTCONN)
    /// and is not unmounted on drop.
    pub fn crash(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
    }

    /// What the daemon logged (at `KVFS_LOG=warn`), once [`Mount::wait_exit`] saw it exit.
    pub fn stderr(&self) -> &str {
        &self.stderr
    }

    /// The mount's own status file.
    pub fn info(&self) -> String {
        std::fs::read_to_string(self.dir.join(".kvfs/mount.json")).unwrap()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kvfs_fs::unmount(&self.dir, true);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
