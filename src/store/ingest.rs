//! Chunks that arrive as a stream: `kvfs put FILE`, `kvfs put < chunk`, [`Store::put_file`].
//!
//! Memory stays bounded whatever the input. [`ChunkStream::open`] reads and checks the header
//! alone (at most [`MAX_HEADER_LEN`] bytes, a bound checked before the header is allocated),
//! so input that is not a chunk (`/dev/zero`, a text file, a header claiming gigabytes) is
//! refused before its payload is read, and the caller can pick the namespace from the header.
//! [`Store::put_stream`] then refuses a chunk larger than the cache's capacity before reading
//! on, copies exactly the length the header declares into a temporary file beside the chunk's
//! place (`io::copy`, which the kernel does itself between files), refuses input that is
//! shorter or longer, verifies the file one layer at a time
//! ([`ChunkHeader::verify_file_payload`]: one layer in memory), and hands it to
//! [`Store::adopt_file`], which reserves room (or fails with [`StoreError::NoSpace`],
//! evicting nothing for it) and links it in. Whatever fails, the temporary file is removed;
//! a crash leaves a `.tmp-*` file that the next open sweeps.
//!
//! [`Store::put`] stays the path for chunks already in memory (the loader's stores, fetches):
//! it verifies while it writes and fills the memory tier.

use super::put::{PutOutcome, is_no_space};
use super::stats::bump;
use super::{Store, StoreError, check_ns, check_ns_id};
use kvfs_loader::FormatError;
use kvfs_loader::dir::{self, Commit};
use kvfs_loader::format::{ChunkHeader, FIXED_HEADER_LEN, MAX_HEADER_LEN};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// A chunk being read from `R`: its checked header, and the rest of the input after it.
pub struct ChunkStream<R> {
    header: ChunkHeader,
    head: Vec<u8>,
    rest: R,
}

impl<R: Read> ChunkStream<R> {
    /// Reads the header (and nothing more) from `src` and checks it.
    pub fn open(mut src: R) -> Result<ChunkStream<R>, StoreError> {
        let mut head = vec![0u8; FIXED_HEADER_LEN];
        read_full(&mut src, &mut head, 0)?;
        let len = ChunkHeader::peek_header_len(&head)?;
        debug_assert!(len <= MAX_HEADER_LEN);
        head.resize(len as usize, 0);
        read_full(&mut src, &mut head, FIXED_HEADER_LEN)?;
        let header = ChunkHeader::parse(&head)?;
        Ok(ChunkStream {
            header,
            head,
            rest: src,
        })
    }

    pub fn header(&self) -> &ChunkHeader {
        &self.header
    }
}

/// Fills `buf[from..]` from `src`; a short input is a truncated chunk.
fn read_full(src: &mut impl Read, buf: &mut [u8], from: usize) -> Result<(), StoreError> {
    let mut have = from;
    while have < buf.len() {
        match src.read(&mut buf[have..]) {
            Ok(0) => {
                return Err(FormatError::Truncated {
                    needed: buf.len() as u64,
                    have: have as u64,
                }
                .into());
            }
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StoreError::io(Path::new("<input>"), e)),
        }
    }
    Ok(())
}

/// Why a streamed chunk was not taken.
enum Refused {
    Format(FormatError),
    Store(StoreError),
}

impl Store {
    /// Stores the chunk `stream` carries under `ns_dir`, in bounded memory (see the module
    /// docs).
    pub fn put_stream<R: Read>(
        &self,
        ns_dir: &str,
        mut stream: ChunkStream<R>,
    ) -> Result<PutOutcome, StoreError> {
        check_ns(ns_dir)?;
        let header = &stream.header;
        check_ns_id(ns_dir, &header.meta.namespace)?;
        let key = header.key();
        let len = header.file_len();
        let limit = self.capacity().limit_bytes;
        if len > limit {
            return Err(StoreError::NoSpace {
                needed: len,
                available: limit,
            });
        }
        let target = self.backing_path(ns_dir, &key);
        let parent = target.parent().expect("a chunk path has a parent");
        dir::create_dirs(parent).map_err(|e| StoreError::io(parent, e))?;
        let tmp = dir::temp_path_for(&target);
        let io_err = |e: io::Error| {
            if is_no_space(&e) {
                Refused::Store(StoreError::NoSpace {
                    needed: len,
                    available: 0,
                })
            } else {
                Refused::Store(StoreError::io(&tmp, e))
            }
        };
        let result = (|| {
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(dir::file_mode_in(parent))
                .open(&tmp)
                .map_err(io_err)?;
            f.write_all(&stream.head).map_err(io_err)?;
            let want = len - stream.head.len() as u64;
            let copied = io::copy(&mut (&mut stream.rest).take(want), &mut f).map_err(io_err)?;
            if copied < want {
                return Err(Refused::Format(FormatError::Truncated {
                    needed: len,
                    have: stream.head.len() as u64 + copied,
                }));
            }
            let mut one = [0u8; 1];
            if stream.rest.read(&mut one).map_err(io_err)? > 0 {
                return Err(Refused::Format(FormatError::BadField {
                    field: "file_len",
                    reason: format!("the input goes on past the {len} bytes its header declares"),
                }));
            }
            header.verify_file_payload(&f).map_err(Refused::Format)?;
            drop(f);
            self.adopt_file(ns_dir, &key, &tmp).map_err(Refused::Store)
        })();
        let _ = fs::remove_file(&tmp);
        let commit = match result {
            Ok(c) => c,
            Err(Refused::Format(e)) => {
                bump(&self.inner.counters.verify_failures, 1);
                return Err(e.into());
            }
            Err(Refused::Store(e)) => return Err(e),
        };
        Ok(PutOutcome {
            key,
            len,
            created: commit == Commit::Created,
            path: target,
            evicted: 0,
        })
    }

    /// Stores the chunk file at `src` (streamed: bounded memory whatever its size).
    pub fn put_file(&self, ns_dir: &str, src: &Path) -> Result<PutOutcome, StoreError> {
        let with_path = |e: StoreError| match e {
            StoreError::Format { path: None, source } => StoreError::Format {
                path: Some(src.to_path_buf()),
                source,
            },
            e => e,
        };
        let f = File::open(src).map_err(|e| StoreError::io(src, e))?;
        let stream = ChunkStream::open(f).map_err(with_path)?;
        self.put_stream(ns_dir, stream).map_err(with_path)
    }
}
