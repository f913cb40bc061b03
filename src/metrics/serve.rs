//! The `/metrics` endpoint: HTTP/1.1 on a thread of its own, with a one-thread tokio runtime
//! and hyper (the same crates the S3 tier already uses), so a slow scraper never holds a
//! FUSE worker and the store never sees the network.
//!
//! `GET /metrics` encodes the registry at that moment (collectors read their gauges then);
//! another method on `/metrics` is 405, another path 404. The listening socket is bound
//! before [`MetricsServer::start`] returns, so an address in use is an error the caller
//! reports at start, not a log line later. Dropping the server stops it.

use super::encode;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The path served.
pub const METRICS_PATH: &str = "/metrics";

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("`{0}` is not a metrics address (PORT, or HOST:PORT such as 127.0.0.1:9464)")]
    BadAddress(String),
    #[error("cannot serve metrics on {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Parses a metrics address: `HOST:PORT`, or a bare `PORT`, which means loopback
/// (`127.0.0.1:PORT`).
pub fn parse_addr(s: &str) -> Result<SocketAddr, ServeError> {
    let bad = || ServeError::BadAddress(s.to_string());
    let s = s.trim();
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.to_socket_addrs()
        .map_err(|_| bad())?
        .next()
        .ok_or_else(bad)
}

/// A running `/metrics` endpoint; dropping it stops the server.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl MetricsServer {
    /// Binds `addr` and serves `registry` from a new thread. A non-loopback address is
    /// served as asked, with a warning (the metrics name namespaces and show traffic).
    pub fn start(addr: SocketAddr, registry: Registry) -> Result<MetricsServer, ServeError> {
        let io = |source| ServeError::Io {
            addr: addr.to_string(),
            source,
        };
        let listener = TcpListener::bind(addr).map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        let addr = listener.local_addr().map_err(io)?;
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "serving metrics beyond loopback, as configured");
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(io)?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let registry = Arc::new(registry);
        let thread = std::thread::Builder::new()
            .name("kvfs-metrics".into())
            .spawn(move || rt.block_on(serve(listener, registry, stopped)))
            .map_err(io)?;
        tracing::info!(%addr, path = METRICS_PATH, "serving metrics");
        Ok(MetricsServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address actually bound (with the port chosen when 0 was asked).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "metrics endpoint cannot listen");
            return;
        }
    };
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    continue;
                }
            },
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(req, registry.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

async fn respond(
    req: Request<Incoming>,
    registry: Arc<Registry>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != METRICS_PATH {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            format!("kvfs serves {METRICS_PATH} only\n"),
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, String::new());
        r.headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    let mut r = reply(StatusCode::OK, encode(&registry));
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        ),
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_port_means_loopback() {
        assert_eq!(
            parse_addr("9464").unwrap(),
            "127.0.0.1:9464".parse().unwrap()
        );
        assert_eq!(
            parse_addr("0.0.0.0:9100").unwrap(),
            "0.0.0.0:9100".parse().unwrap()
        );
        assert!(matches!(
            parse_addr("not an address"),
            Err(ServeError::BadAddress(_))
        ));
    }
}
