//! The HTTP side of `--metrics`: hyper serves `/metrics`, each scrape asks
//! the event loop for a [`Snapshot`] and encodes it off the loop. What a
//! client can cost the guard is bounded: one snapshot at a time, at most
//! one every [`MIN_SNAPSHOT_GAP`], a few connections, each with a deadline.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{ALLOW, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{Mutex, Semaphore, mpsc, oneshot},
    task::JoinHandle,
};

use super::{ScrapeRequest, encode};

/// Snapshots are at least this far apart, whatever clients do: bounds the
/// share of the event loop that scraping can take.
pub const MIN_SNAPSHOT_GAP: Duration = Duration::from_millis(100);
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 8;
/// A client must send its request headers within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer than this (keep-alive included).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// How long a scrape waits for the event loop's answer.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("--metrics {addr}: cannot listen there")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The metrics endpoint, bound (so a bad address fails at start) but not
/// yet serving.
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    pub async fn bind(addr: SocketAddr) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(Self { listener })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Starts serving; scrapes arrive on the returned channel, for the
    /// event loop to answer. Abort the task to stop.
    pub fn spawn(self) -> (JoinHandle<()>, mpsc::Receiver<ScrapeRequest>) {
        if let Some(addr) = self.local_addr() {
            log::info!("serving metrics on http://{addr}/metrics");
        }
        // One snapshot is ever in flight (the gate below): one slot suffices.
        let (tx, rx) = mpsc::channel(1);
        (tokio::spawn(serve(self.listener, tx)), rx)
    }
}

async fn serve(listener: TcpListener, tx: mpsc::Sender<ScrapeRequest>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let gate: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // E.g. out of file descriptors: back off rather than spin.
                log::warn!("metrics: accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // over the limit: closed as it is dropped
        };
        let (tx, gate) = (tx.clone(), gate.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(req, tx.clone(), gate.clone()));
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                log::debug!("metrics: connection ended: {e}");
            }
            drop(slot);
        });
    }
}

/// What a request gets, by method and path.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    MethodNotAllowed,
}

fn route(method: &Method, path: &str) -> Route {
    if path != "/metrics" {
        Route::NotFound
    } else if method == Method::GET || method == Method::HEAD {
        Route::Metrics
    } else {
        Route::MethodNotAllowed
    }
}

fn text_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn respond(
    req: Request<Incoming>,
    tx: mpsc::Sender<ScrapeRequest>,
    gate: Arc<Mutex<Option<Instant>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match route(req.method(), req.uri().path()) {
        Route::NotFound => text_response(
            StatusCode::NOT_FOUND,
            "not found: the metrics are at /metrics\n".into(),
        ),
        Route::MethodNotAllowed => {
            let mut r = text_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET and HEAD are allowed\n".into(),
            );
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        // HEAD gets the same headers; hyper leaves out the body.
        Route::Metrics => match scrape(&tx, &gate).await {
            Ok(text) => {
                let mut r = text_response(StatusCode::OK, text);
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(
                        prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                    ),
                );
                r
            }
            Err(why) => text_response(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
    })
}

/// One snapshot from the event loop, encoded off it.
async fn scrape(
    tx: &mpsc::Sender<ScrapeRequest>,
    gate: &Mutex<Option<Instant>>,
) -> Result<String, String> {
    let snapshot = {
        let mut last = gate.lock().await;
        if let Some(at) = *last {
            tokio::time::sleep_until((at + MIN_SNAPSHOT_GAP).into()).await;
        }
        let (reply, answer) = oneshot::channel();
        tx.send(ScrapeRequest { reply })
            .await
            .map_err(|_| "portwatch is shutting down".to_string())?;
        let snapshot = tokio::time::timeout(SNAPSHOT_TIMEOUT, answer)
            .await
            .map_err(|_| "portwatch did not answer in time".to_string())?
            .map_err(|_| "portwatch is shutting down".to_string())?;
        *last = Some(Instant::now());
        snapshot
    };
    tokio::task::spawn_blocking(move || encode(snapshot))
        .await
        .map_err(|e| format!("encoding the metrics failed: {e}"))?
        .map_err(|e| format!("encoding the metrics failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_path_then_method() {
        assert_eq!(route(&Method::GET, "/metrics"), Route::Metrics);
        assert_eq!(route(&Method::HEAD, "/metrics"), Route::Metrics);
        assert_eq!(route(&Method::POST, "/metrics"), Route::MethodNotAllowed);
        assert_eq!(route(&Method::GET, "/"), Route::NotFound);
        assert_eq!(route(&Method::GET, "/metrics/"), Route::NotFound);
        assert_eq!(route(&Method::DELETE, "/nope"), Route::NotFound);
    }
}
