//! A real S3 server on loopback for the Python tests (python/tests/test_vllm.py) when no
//! external one (`KVFS_TEST_S3_ENDPOINT`, Garage in CI) is given: the same in-process s3s-fs
//! server the Rust S3 tests use (tests/support/s3_server.rs), with real SigV4 authentication.
//!
//! Prints one line, `KVFS_TEST_S3_ENDPOINT=http://127.0.0.1:PORT bucket=... key=... secret=...`,
//! then serves until its standard input closes (so it never outlives the test that started it).

#[path = "../tests/support/s3_server.rs"]
mod s3_server;

use std::io::{Read, Write};

fn main() {
    let server = s3_server::InProcessS3::start();
    println!(
        "KVFS_TEST_S3_ENDPOINT={} bucket={} key={} secret={}",
        server.endpoint,
        s3_server::TEST_BUCKET,
        s3_server::TEST_ACCESS_KEY,
        s3_server::TEST_SECRET_KEY
    );
    std::io::stdout().flush().expect("stdout");
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(server);
}
