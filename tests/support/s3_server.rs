//! Real S3 servers for tests: an in-process S3 server (s3s + s3s-fs, real HTTP on a loopback
//! port, real SigV4 authentication) and a fault-injecting HTTP proxy to put between kvfs and
//! it. With `KVFS_TEST_S3_ENDPOINT` set (see `scripts/garage env`), [`S3Target::new`] points
//! at that server (Garage in CI) instead; each target gets its own fresh key prefix, so tests
//! can share one bucket.
//!
//! The proxy forwards each request to the upstream server unless a fault is armed: a 503,
//! a delay (to trip timeouts), a dropped connection (no response), a body cut off mid-stream
//! (connection aborted), a short body that looks complete, or one flipped byte. Faults are
//! armed for the next N matching requests ([`FaultProxy::arm`]) or at random with a given
//! rate ([`FaultProxy::chaos`]). It can also plant object names in LIST answers
//! ([`FaultProxy::plant_listed`]), as a real server would list them (honouring `prefix`,
//! `start-after`, the page's range and the delimiter), to test names no client can create.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kvfs_remote::S3Config;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const TEST_ACCESS_KEY: &str = "kvfs-test-access";
pub const TEST_SECRET_KEY: &str = "kvfs-test-secret-key";
pub const TEST_BUCKET: &str = "kvfs-test";

static PREFIX_SEQ: AtomicU64 = AtomicU64::new(0);

/// An S3 server (in-process, or external from the environment) and a bucket to use.
pub struct S3Target {
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
    /// A key prefix unique to this target.
    pub prefix: String,
    /// True for the in-process s3s server.
    pub in_process: bool,
    server: Option<InProcessS3>,
}

impl S3Target {
    /// Garage (or any server) from `KVFS_TEST_S3_ENDPOINT` and the AWS variables, else a
    /// fresh in-process server.
    pub fn new() -> S3Target {
        let prefix = format!(
            "t{}-{}-{}",
            std::process::id(),
            PREFIX_SEQ.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
                % 1_000_000_000
        );
        if let Ok(endpoint) = std::env::var("KVFS_TEST_S3_ENDPOINT") {
            let env = |k: &str| {
                std::env::var(k)
                    .unwrap_or_else(|_| panic!("{k} must be set with KVFS_TEST_S3_ENDPOINT"))
            };
            return S3Target {
                endpoint,
                bucket: env("KVFS_TEST_S3_BUCKET"),
                access_key: env("AWS_ACCESS_KEY_ID"),
                secret_key: env("AWS_SECRET_ACCESS_KEY"),
                region: std::env::var("AWS_REGION").unwrap_or_else(|_| "garage".into()),
                prefix,
                in_process: false,
                server: None,
            };
        }
        let server = InProcessS3::start();
        S3Target {
            endpoint: server.endpoint.clone(),
            bucket: TEST_BUCKET.into(),
            access_key: TEST_ACCESS_KEY.into(),
            secret_key: TEST_SECRET_KEY.into(),
            region: "us-east-1".into(),
            prefix,
            in_process: true,
            server: Some(server),
        }
    }

    /// A config for this target through `endpoint` (this server's, or a proxy's), with
    /// short retries so fault tests run quickly.
    pub fn config_via(&self, endpoint: &str) -> S3Config {
        let mut c = S3Config::from_url(&format!("s3://{}/{}", self.bucket, self.prefix))
            .unwrap()
            .with_endpoint(endpoint);
        c.region = Some(self.region.clone());
        c.access_key_id = Some(self.access_key.clone());
        c.secret_access_key = Some(kvfs_remote::Secret::new(self.secret_key.clone()));
        c.connect_timeout = Duration::from_secs(1);
        c.request_timeout = Duration::from_secs(10);
        c.max_retries = 2;
        c.retry_timeout = Duration::from_secs(5);
        c.initial_backoff = Duration::from_millis(10);
        c.max_backoff = Duration::from_millis(100);
        c.outage_backoff = Duration::ZERO;
        c
    }

    pub fn config(&self) -> S3Config {
        self.config_via(&self.endpoint)
    }

    /// Where the in-process server keeps objects (to damage them in tests).
    pub fn object_file(&self, key: &str) -> Option<std::path::PathBuf> {
        self.server
            .as_ref()
            .map(|s| s.root.path().join(&self.bucket).join(key))
    }
}

/// s3s-fs served over real HTTP on 127.0.0.1, on its own runtime.
pub struct InProcessS3 {
    pub endpoint: String,
    pub root: tempfile::TempDir,
    rt: Option<tokio::runtime::Runtime>,
}

impl InProcessS3 {
    pub fn start() -> InProcessS3 {
        InProcessS3::start_at("127.0.0.1:0")
    }

    /// Serves on `addr` (e.g. a port an earlier test found free, to bring a server "back").
    pub fn start_at(addr: &str) -> InProcessS3 {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join(TEST_BUCKET)).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let fs = s3s_fs::FileSystem::new(root.path()).unwrap();
        let mut b = s3s::service::S3ServiceBuilder::new(fs);
        b.set_auth(s3s::auth::SimpleAuth::from_single(
            TEST_ACCESS_KEY,
            TEST_SECRET_KEY,
        ));
        let service = b.build();
        let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move {
            let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let conn = http
                    .serve_connection(TokioIo::new(sock), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        InProcessS3 {
            endpoint: format!("http://{addr}"),
            root,
            rt: Some(rt),
        }
    }
}

impl Drop for InProcessS3 {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A loopback address where nothing listens (bound once, then closed).
pub fn closed_port_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

/// A fault the proxy applies to one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Answer 503 Slow Down without forwarding.
    Unavailable,
    /// Wait this long, then forward.
    Delay(Duration),
    /// Close the connection without answering.
    Drop,
    /// Forward, then cut the response body off halfway (connection aborted).
    CutBody,
    /// Forward, then answer only the first half of the body as if it were complete.
    ShortBody,
    /// Forward, then flip one byte in the middle of the body.
    Corrupt,
    /// Answer 501 Not Implemented to a PUT carrying If-None-Match (a server without
    /// conditional put); forward everything else.
    NoConditionalPut,
}

struct Rule {
    method: Option<Method>,
    /// Only requests whose path contains this.
    path: Option<String>,
    fault: Fault,
    remaining: usize,
}

#[derive(Default)]
struct Plan {
    rules: Vec<Rule>,
    chaos: Option<(f64, u64, Vec<Fault>)>,
    sticky: Option<Fault>,
    /// Object names added to every LIST answer whose range holds them.
    listed: Vec<String>,
}

/// A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 endpoint.
pub struct FaultProxy {
    pub endpoint: String,
    plan: Arc<Mutex<Plan>>,
    pub requests: Arc<AtomicUsize>,
    pub faults_applied: Arc<AtomicUsize>,
    rt: Option<tokio::runtime::Runtime>,
}

impl FaultProxy {
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream: hyper::Uri = upstream.parse().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let plan = Arc::new(Mutex::new(Plan::default()));
        let requests = Arc::new(AtomicUsize::new(0));
        let faults_applied = Arc::new(AtomicUsize::new(0));
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build_http::<Full<Bytes>>();
        {
            let (plan, requests, faults_applied) =
                (plan.clone(), requests.clone(), faults_applied.clone());
            rt.spawn(async move {
                loop {
                    let Ok((sock, _)) = listener.accept().await else {
                        continue;
                    };
                    let (plan, requests, faults_applied, client, upstream) = (
                        plan.clone(),
                        requests.clone(),
                        faults_applied.clone(),
                        client.clone(),
                        upstream.clone(),
                    );
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let (plan, requests, faults_applied, client, upstream) = (
                                plan.clone(),
                                requests.clone(),
                                faults_applied.clone(),
                                client.clone(),
                                upstream.clone(),
                            );
                            async move {
                                requests.fetch_add(1, Ordering::Relaxed);
                                let fault = pick(&plan, &req);
                                if fault.is_some() {
                                    faults_applied.fetch_add(1, Ordering::Relaxed);
                                }
                                let planted = plan.lock().unwrap().listed.clone();
                                handle(req, fault, &planted, &client, &upstream).await
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(sock), svc)
                            .await;
                    });
                }
            });
        }
        FaultProxy {
            endpoint: format!("http://{addr}"),
            plan,
            requests,
            faults_applied,
            rt: Some(rt),
        }
    }

    /// Applies `fault` to the next `count` requests with `method` (any method: None).
    pub fn arm(&self, method: Option<Method>, fault: Fault, count: usize) {
        self.plan.lock().unwrap().rules.push(Rule {
            method,
            path: None,
            fault,
            remaining: count,
        });
    }

    /// Like [`FaultProxy::arm`], only for requests whose path contains `path` (`.kvc`: chunk
    /// objects, not listings).
    pub fn arm_path(&self, method: Option<Method>, path: &str, fault: Fault, count: usize) {
        self.plan.lock().unwrap().rules.push(Rule {
            method,
            path: Some(path.to_string()),
            fault,
            remaining: count,
        });
    }

    /// Applies one of `faults` to each request with probability `rate` (deterministic seed).
    pub fn chaos(&self, rate: f64, seed: u64, faults: &[Fault]) {
        self.plan.lock().unwrap().chaos = Some((rate, seed | 1, faults.to_vec()));
    }

    /// Applies `fault` to every request until [`FaultProxy::clear`].
    pub fn always(&self, fault: Fault) {
        self.plan.lock().unwrap().sticky = Some(fault);
    }

    /// Lists `name` (a full object key, which may be one no client can create) in every LIST
    /// answer that covers it.
    pub fn plant_listed(&self, name: &str) {
        self.plan.lock().unwrap().listed.push(name.to_string());
    }

    pub fn clear(&self) {
        *self.plan.lock().unwrap() = Plan::default();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn pick(plan: &Mutex<Plan>, req: &Request<Incoming>) -> Option<Fault> {
    let mut p = plan.lock().unwrap();
    let conditional_put =
        req.method() == Method::PUT && req.headers().contains_key("if-none-match");
    if let Some(f) = p.sticky {
        return (f != Fault::NoConditionalPut || conditional_put).then_some(f);
    }
    for r in p.rules.iter_mut() {
        if r.remaining > 0
            && r.method.as_ref().is_none_or(|m| m == req.method())
            && r.path
                .as_ref()
                .is_none_or(|p| req.uri().path().contains(p.as_str()))
        {
            if r.fault == Fault::NoConditionalPut && !conditional_put {
                continue;
            }
            r.remaining -= 1;
            return Some(r.fault);
        }
    }
    if let Some((rate, seed, faults)) = p.chaos.as_mut() {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let x = (*seed >> 11) as f64 / (1u64 << 53) as f64;
        if x < *rate && !faults.is_empty() {
            let f = faults[(*seed % faults.len() as u64) as usize];
            return (f != Fault::NoConditionalPut || conditional_put).then_some(f);
        }
    }
    None
}

type ProxyBody = BoxBody<Bytes, std::io::Error>;

fn full(b: Bytes) -> ProxyBody {
    Full::new(b).map_err(|e: Infallible| match e {}).boxed()
}

async fn handle(
    req: Request<Incoming>,
    fault: Option<Fault>,
    planted: &[String],
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    upstream: &hyper::Uri,
) -> Result<Response<ProxyBody>, std::io::Error> {
    match fault {
        Some(Fault::Unavailable) => {
            return Ok(Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .body(full(Bytes::from_static(
                    b"<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>injected</Message></Error>",
                )))
                .unwrap());
        }
        Some(Fault::NoConditionalPut) => {
            return Ok(Response::builder()
                .status(StatusCode::NOT_IMPLEMENTED)
                .body(full(Bytes::from_static(
                    b"<?xml version=\"1.0\"?><Error><Code>NotImplemented</Code><Message>A header you provided implies functionality that is not implemented</Message></Error>",
                )))
                .unwrap());
        }
        Some(Fault::Drop) => return Err(std::io::Error::other("injected: connection dropped")),
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        _ => {}
    }
    let (mut parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let list_query = (parts.method == Method::GET)
        .then(|| parts.uri.query().unwrap_or("").to_string())
        .filter(|q| q.contains("list-type=2"));
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    parts.uri = format!(
        "{}://{}{}",
        upstream.scheme_str().unwrap_or("http"),
        upstream.authority().unwrap(),
        pq
    )
    .parse()
    .unwrap();
    let resp = client
        .request(Request::from_parts(parts, Full::new(body)))
        .await
        .map_err(std::io::Error::other)?;
    let (mut parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let body = match &list_query {
        Some(q) if !planted.is_empty() && parts.status.is_success() => {
            let b = Bytes::from(plant(&body, q, planted));
            parts
                .headers
                .insert(hyper::header::CONTENT_LENGTH, b.len().into());
            b
        }
        _ => body,
    };
    let is_data = parts.status.is_success() && body.len() > 64;
    let out = match fault {
        Some(Fault::CutBody) if is_data => {
            let half = body.slice(..body.len() / 2);
            let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
                Ok(Frame::data(half)),
                Err(std::io::Error::other("injected: body cut off")),
            ];
            BodyExt::boxed(StreamBody::new(futures::stream::iter(frames)))
        }
        Some(Fault::ShortBody) if is_data => {
            let half = body.slice(..body.len() / 2);
            parts
                .headers
                .insert(hyper::header::CONTENT_LENGTH, half.len().into());
            full(half)
        }
        Some(Fault::Corrupt) if is_data => {
            let mut v = body.to_vec();
            let mid = v.len() / 2;
            v[mid] ^= 0x40;
            full(Bytes::from(v))
        }
        _ => full(body),
    };
    Ok(Response::from_parts(parts, out))
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every `<tag>value</tag>` of `xml`.
fn values<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        rest = &rest[i + open.len()..];
        let Some(j) = rest.find(&close) else { break };
        out.push(&rest[..j]);
        rest = &rest[j..];
    }
    out
}

/// Adds the `planted` names a real server would list in this ListObjectsV2 answer.
fn plant(xml: &[u8], query: &str, planted: &[String]) -> Vec<u8> {
    let Ok(text) = std::str::from_utf8(xml) else {
        return xml.to_vec();
    };
    let q: std::collections::HashMap<String, String> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), pct_decode(v)))
        .collect();
    let prefix = q.get("prefix").cloned().unwrap_or_default();
    let after = q.get("start-after").cloned();
    let delimited = q.contains_key("delimiter");
    let truncated = text.contains("<IsTruncated>true</IsTruncated>");
    let last = values(text, "Key")
        .into_iter()
        .chain(values(text, "Prefix").into_iter().filter(|p| !p.is_empty()))
        .max()
        .map(str::to_string);
    let (mut contents, mut prefixes) = (String::new(), String::new());
    for name in planted {
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let listed = match rest.find('/') {
            Some(i) if delimited => format!("{prefix}{}", &rest[..=i]),
            _ => name.clone(),
        };
        if after.as_ref().is_some_and(|a| listed <= *a)
            || truncated && last.as_ref().is_some_and(|l| listed > *l)
        {
            continue;
        }
        if listed.ends_with('/') && delimited {
            prefixes += &format!("<CommonPrefixes><Prefix>{listed}</Prefix></CommonPrefixes>");
        } else {
            contents += &format!(
                "<Contents><Key>{listed}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified><ETag>\"0\"</ETag><Size>1</Size><StorageClass>STANDARD</StorageClass></Contents>"
            );
        }
    }
    // Keep each list contiguous: after its last element, else before the end.
    let insert = |text: String, close: &str, add: &str| -> String {
        if add.is_empty() {
            return text;
        }
        let at = text
            .rfind(close)
            .map(|i| i + close.len())
            .or_else(|| text.rfind("</ListBucketResult>"))
            .unwrap_or(text.len());
        format!("{}{add}{}", &text[..at], &text[at..])
    };
    let text = insert(text.to_string(), "</Contents>", &contents);
    insert(text, "</CommonPrefixes>", &prefixes).into_bytes()
}
