//! The HTTP endpoints (flanneld's `--healthz-ip`/`--healthz-port`, off by default):
//!
//! - `GET /healthz`: 200 while the process lives and nothing of it has died (`ok`, or
//!   `ok: starting` before the data plane is up: a liveness probe must not kill a node that
//!   waits for its store); 503 once it is going down;
//! - `GET /readyz`: 200 `ok` when [`Health::readiness`] holds, else 503 with the reason on one
//!   line;
//! - `GET /metrics`: the Prometheus text format ([`super::metrics`]).
//!
//! HTTP/1.1 through hyper, a task under the daemon's supervision: the listener is bound at
//! start (a taken port stops the start), and if the task ends the daemon stops. Headers must
//! arrive within 5 s and at most 64 connections are served at once, so a slow or greedy
//! client cannot pin the daemon's runtime.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use super::health::Health;
use super::metrics::{self, Snapshot};

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the endpoints' listener.
///
/// # Errors
/// The address is taken or not ours.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

const PLAIN: &str = "text/plain; charset=utf-8";

/// The answer to one request.
pub fn answer(health: &Health, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into(), PLAIN);
    }
    match path {
        "/healthz" => match health.liveness() {
            Ok(word) => text(StatusCode::OK, format!("{word}\n"), PLAIN),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"), PLAIN),
        },
        "/readyz" => match health.readiness() {
            Ok(()) => text(StatusCode::OK, "ok\n".into(), PLAIN),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"), PLAIN),
        },
        "/metrics" => match Snapshot::take(health).render() {
            Ok(body) => text(StatusCode::OK, body, metrics::CONTENT_TYPE),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding failed: {e}\n"), PLAIN),
        },
        _ => text(StatusCode::NOT_FOUND, "not found: try /healthz, /readyz or /metrics\n".into(), PLAIN),
    }
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, health: Arc<Health>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { return };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "healthz accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let health = Arc::clone(&health);
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let r = answer(&health, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(peer = %peer, error = %e, "healthz connection ended with an error");
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn body(r: Response<Full<Bytes>>) -> String {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let b = rt.block_on(r.into_body().collect()).unwrap().to_bytes();
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn routes_and_answers_before_the_data_plane() {
        let h = Health::new(true, false);
        h.set_phase("waiting for the lease store");
        let r = answer(&h, &Method::GET, "/healthz");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(body(r), "ok: starting\n");
        let r = answer(&h, &Method::GET, "/readyz");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(r), "not ready: waiting for the lease store\n");
        let r = answer(&h, &Method::GET, "/metrics");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[CONTENT_TYPE], metrics::CONTENT_TYPE);
        assert!(body(r).contains("weft_ready 0\n"));
        assert_eq!(answer(&h, &Method::GET, "/nope").status(), StatusCode::NOT_FOUND);
        assert_eq!(answer(&h, &Method::POST, "/healthz").status(), StatusCode::METHOD_NOT_ALLOWED);

        h.stopping("worker 0 died");
        let r = answer(&h, &Method::GET, "/healthz");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(r), "stopping: worker 0 died\n");
        assert_eq!(answer(&h, &Method::GET, "/readyz").status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
