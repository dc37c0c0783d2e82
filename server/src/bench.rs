//! The benchmark ceiling: with `SLUICE_BENCH_CEILING=<bytes>` set, `GET
//! /bench/ceiling` answers a fixed JSON body of that many bytes and does
//! nothing else, so `bench/server.sh` can compare the resolve path with what
//! this binary can serve at all. Off unless the variable is set; not in the
//! OpenAPI document.

use axum::Router;
use axum::body::Bytes;
use axum::http::header;

/// The environment variable that turns the ceiling route on, with the body size.
pub const ENV: &str = "SLUICE_BENCH_CEILING";

/// The ceiling route when [`ENV`] holds a byte count, else nothing.
pub fn ceiling_route<S: Clone + Send + Sync + 'static>() -> Option<Router<S>> {
    let size: usize = std::env::var(ENV).ok()?.trim().parse().ok()?;
    let body = Bytes::from(ceiling_body(size));
    tracing::warn!(
        size,
        "{ENV} is set: serving GET /bench/ceiling for benchmarks"
    );
    Some(Router::new().route(
        "/bench/ceiling",
        axum::routing::get(move || {
            let body = body.clone();
            async move {
                (
                    [
                        (header::CONTENT_TYPE, "application/json"),
                        (header::CACHE_CONTROL, "no-store"),
                    ],
                    body,
                )
            }
        }),
    ))
}

/// A JSON object of exactly `size` bytes (at least the 10 of `{"pad":""}`).
fn ceiling_body(size: usize) -> Vec<u8> {
    let pad = size.saturating_sub(10);
    let mut body = Vec::with_capacity(size.max(10));
    body.extend_from_slice(b"{\"pad\":\"");
    body.resize(body.len() + pad, b'x');
    body.extend_from_slice(b"\"}");
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_json_of_the_asked_size() {
        for size in [0, 10, 11, 1700] {
            let b = ceiling_body(size);
            assert_eq!(b.len(), size.max(10));
            serde_json::from_slice::<serde_json::Value>(&b).unwrap();
        }
    }
}
