//! Prints the GPU path probe (what `kvfs doctor` shows), honouring `KVFS_GPU_PATH`.
//! Usage: `cargo run -p kvfs-gds --example probe [DIR]` (DIR: where O_DIRECT and cuFile
//! registration are tried; default the temp dir).

use kvfs_gds::direct::probe_direct_io;
use kvfs_gds::{ProbeOptions, probe};

fn main() {
    let mut opts = match ProbeOptions::from_env() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Some(dir) = std::env::args_os().nth(1) {
        opts.probe_dir = dir.into();
    }
    print!("{}", probe(&opts));
    println!(
        "O_DIRECT in {}: {}",
        opts.probe_dir.display(),
        probe_direct_io(&opts.probe_dir)
    );
}
