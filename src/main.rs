//! The `kvfs` command line; everything lives in [`kvfs::cli`].
fn main() {
    std::process::exit(kvfs::cli::main());
}
