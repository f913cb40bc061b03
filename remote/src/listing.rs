//! Listings that survive names they cannot parse.
//!
//! object_store turns each LIST page into typed paths and fails the whole page when one key
//! is not a valid path (a `..` segment, an empty segment, a control character): one bad object
//! name would then break `ls --remote` and `sync pull` for every host. Here pages are asked
//! for with the raw paginated API; when a page fails on a name, that name is known from the
//! error. The listing goes back to the last good name (`start-after`) and asks for ever
//! smaller pages (`max-keys` halved) until the names before the bad one are in, then steps
//! over it with a warning naming it ([`crate::RemoteStats::skipped_names`]), and goes on
//! with full pages. The cost is a few extra requests per bad name.
//!
//! Callers take only names that parse as a namespace directory or a chunk file directly
//! under its namespace, so nothing listed can name a path outside the cache directory.

use crate::client::{Bucket, bump};
use crate::error::RemoteError;
use crate::metrics::S3Op;
use object_store::ObjectMeta;
use object_store::list::PaginatedListOptions;
use std::ops::ControlFlow;

/// A listing: objects and (with a delimiter) common prefixes, as raw names.
#[derive(Debug, Default)]
pub(crate) struct Listing {
    pub objects: Vec<ObjectMeta>,
    /// Common prefixes, with their trailing `/`.
    pub prefixes: Vec<String>,
}

/// The name a path error is about, when a listing failed on an unparseable name.
fn bad_name(e: &object_store::Error) -> Option<String> {
    use object_store::path::Error as P;
    match e {
        object_store::Error::InvalidPath { source } => match source {
            P::BadSegment { path, .. } | P::EmptySegment { path } => Some(path.clone()),
            P::NonUnicode { path, .. } | P::PrefixMismatch { path, .. } => Some(path.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// `start-after` that also skips everything under a common prefix (`a/` -> `a0`: `0` is the
/// byte after `/`).
fn after(name: &str) -> String {
    match name.strip_suffix('/') {
        Some(stem) => format!("{stem}0"),
        None => name.to_string(),
    }
}

impl Bucket {
    /// Every object under the raw `prefix` (with `delimiter`: one level, plus common
    /// prefixes), sorted, in memory. See [`Bucket::list_pages`] for a listing that streams.
    pub(crate) async fn list_raw(
        &self,
        prefix: &str,
        delimiter: bool,
    ) -> Result<Listing, RemoteError> {
        let mut out = Listing::default();
        self.list_pages(prefix, delimiter, |page| {
            out.objects.extend(page.objects);
            for p in page.prefixes {
                if !out.prefixes.contains(&p) {
                    out.prefixes.push(p);
                }
            }
            ControlFlow::Continue(())
        })
        .await?;
        out.objects
            .sort_by(|a, b| a.location.as_ref().cmp(b.location.as_ref()));
        out.objects.dedup_by(|a, b| a.location == b.location);
        out.prefixes.sort();
        Ok(out)
    }

    /// The objects under the raw `prefix`, handed to `each` one LIST page at a time as they
    /// arrive (in key order, each name once), so a listing of a million objects starts at
    /// the first page and holds one; `each` returning `Break` stops it.
    pub(crate) async fn list_pages(
        &self,
        prefix: &str,
        delimiter: bool,
        mut each: impl FnMut(Listing) -> ControlFlow<()>,
    ) -> Result<(), RemoteError> {
        // The last name handed out: a page re-asked after a bad name never repeats one.
        let mut emitted: Option<String> = None;
        let mut offset: Option<String> = None;
        let mut token: Option<String> = None;
        let mut max_keys: Option<usize> = None;
        // Set while stepping towards a name that does not parse.
        let mut bad: Option<String> = None;
        let mut last: Option<String> = None;
        for _ in 0..100_000 {
            let opts = PaginatedListOptions {
                offset: if token.is_none() {
                    offset.clone()
                } else {
                    None
                },
                delimiter: delimiter.then_some("/".into()),
                max_keys,
                page_token: token.clone(),
                ..Default::default()
            };
            let list = self
                .store
                .list_paginated((!prefix.is_empty()).then_some(prefix), opts);
            let page = self
                .metrics
                .observe(
                    S3Op::List,
                    tokio::time::timeout(self.cfg.list_timeout, list),
                )
                .await;
            let page = match page {
                Err(_) => {
                    return Err(RemoteError::Timeout {
                        op: "LIST",
                        after: self.cfg.list_timeout,
                        key: "list_timeout_s",
                    });
                }
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    let Some(name) = bad_name(&e) else {
                        return Err(self.classify(e));
                    };
                    token = None;
                    offset = last.as_deref().map(after);
                    if max_keys == Some(1) {
                        // The very next name is the bad one: step over it.
                        tracing::warn!(object = %name, error = %e,
                            "skipping an object whose name is not a valid object path");
                        bump(&self.counters.skipped_names, 1);
                        let next = after(&name);
                        offset = Some(match &offset {
                            Some(o) if *o >= next => format!("{name}/0"),
                            _ => next,
                        });
                        last = offset.clone();
                        max_keys = None;
                        bad = None;
                    } else {
                        max_keys = Some((max_keys.unwrap_or(1000) / 2).max(1));
                        bad = Some(name);
                    }
                    continue;
                }
            };
            let mut newest = last.clone();
            let mut out = Listing::default();
            for o in page.result.objects {
                let n = o.location.to_string();
                if newest.as_ref().is_none_or(|l| n > *l) {
                    newest = Some(n.clone());
                }
                if emitted.as_ref().is_none_or(|e| n > *e) {
                    out.objects.push(o);
                }
            }
            for p in page.result.common_prefixes {
                let n = format!("{p}/");
                if newest.as_ref().is_none_or(|l| n > *l) {
                    newest = Some(n.clone());
                }
                if emitted.as_ref().is_none_or(|e| n > *e) {
                    out.prefixes.push(n);
                }
            }
            last = newest;
            out.objects
                .sort_by(|a, b| a.location.as_ref().cmp(b.location.as_ref()));
            out.prefixes.sort();
            let page_last = [
                out.objects.last().map(|o| o.location.to_string()),
                out.prefixes.last().cloned(),
            ]
            .into_iter()
            .flatten()
            .max();
            if let Some(l) = page_last {
                emitted = Some(l);
            }
            if (!out.objects.is_empty() || !out.prefixes.is_empty()) && each(out).is_break() {
                return Ok(());
            }
            if bad.is_some() {
                // Small pages until the bad name is next.
                if page.page_token.is_none() {
                    break;
                }
                token = None;
                offset = last.as_deref().map(after);
                continue;
            }
            match page.page_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        Ok(())
    }

    /// Namespace directories present in the bucket.
    pub async fn list_namespaces(&self) -> Result<Vec<String>, RemoteError> {
        let root = self.root_prefix();
        let l = self.list_raw(&root, true).await?;
        let mut out = Vec::new();
        for p in l.prefixes {
            let name = p
                .strip_prefix(&root)
                .and_then(|n| n.strip_suffix('/'))
                .unwrap_or("");
            match kvfs_loader::spec::validate_namespace_dir(name) {
                Ok(()) => out.push(name.to_string()),
                Err(e) => {
                    tracing::warn!(prefix = %p, error = %e, "skipping a bucket directory that is not a namespace");
                    bump(&self.counters.skipped_names, 1);
                }
            }
        }
        Ok(out)
    }

    /// Chunks of one namespace in the bucket, with their sizes, sorted by key.
    pub async fn list_chunks(
        &self,
        ns_dir: &str,
    ) -> Result<Vec<(kvfs_loader::ChunkKey, u64)>, RemoteError> {
        let mut out = Vec::new();
        self.for_each_chunk(ns_dir, |k, len| {
            out.push((k, len));
            ControlFlow::Continue(())
        })
        .await?;
        out.sort();
        Ok(out)
    }

    /// Calls `f` with the chunks of one namespace (key, size) as LIST pages arrive, in key
    /// order; `f` returning `Break` stops the listing.
    pub async fn for_each_chunk(
        &self,
        ns_dir: &str,
        mut f: impl FnMut(kvfs_loader::ChunkKey, u64) -> ControlFlow<()>,
    ) -> Result<(), RemoteError> {
        kvfs_loader::spec::validate_namespace_dir(ns_dir).map_err(RemoteError::Name)?;
        let prefix = self.namespace_prefix(ns_dir);
        self.list_pages(&prefix, false, |page| {
            for m in page.objects {
                let full = m.location.to_string();
                let name = full.strip_prefix(&prefix).unwrap_or(&full);
                if name == crate::client::NAMESPACE_JSON {
                    continue;
                }
                match kvfs_loader::ChunkKey::from_file_name(name) {
                    Ok(k) if !name.contains('/') => {
                        if f(k, m.size).is_break() {
                            return ControlFlow::Break(());
                        }
                    }
                    _ => {
                        tracing::warn!(object = %full, "skipping an object that is not a chunk of this namespace");
                        bump(&self.counters.skipped_names, 1);
                    }
                }
            }
            ControlFlow::Continue(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::after;

    #[test]
    fn after_skips_a_whole_prefix() {
        assert_eq!(after("p/ns/"), "p/ns0");
        assert!(*"p/ns/zzz" < *after("p/ns/"));
        assert_eq!(after("p/x.kvc"), "p/x.kvc");
    }
}
