//! The ceiling of `bench/server.sh`: a bare axum server (no middleware, no
//! state, no allocator change) whose one handler answers as many
//! bytes as a resolve answer: a JSON body of the same size, a
//! `Sluice-Signature` header of the same size and `Cache-Control: no-store`.
//!
//! Usage: `sluice-bench-ceiling ADDR BODY_BYTES SIGNATURE_BYTES`; prints
//! `listening <addr>` once it accepts connections. Every path answers, so
//! the benchmark sends it the very requests it sends resolve.

use axum::body::Bytes;
use axum::http::HeaderValue;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, body, sig] = &args[..] else {
        eprintln!("usage: sluice-bench-ceiling ADDR BODY_BYTES SIGNATURE_BYTES");
        std::process::exit(2);
    };
    let (Ok(body), Ok(sig)) = (body.parse::<usize>(), sig.parse::<usize>()) else {
        eprintln!("error: BODY_BYTES and SIGNATURE_BYTES must be byte counts");
        std::process::exit(2);
    };
    let body = Bytes::from(json_of_size(body));
    // Base64-like characters, as a real header's.
    let sig = HeaderValue::from_str(&"A".repeat(sig)).expect("ASCII header value");
    let app = axum::Router::new().fallback(axum::routing::get(move || {
        let (body, sig) = (body.clone(), sig.clone());
        async move { answer(body, sig) }
    }));
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(addr.as_str())
                .await
                .unwrap_or_else(|e| {
                    eprintln!("error: binding {addr}: {e}");
                    std::process::exit(1);
                });
            println!("listening {}", listener.local_addr().expect("bound"));
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await
                .expect("serving");
        });
}

/// The same headers the resolve handler sets.
fn answer(body: Bytes, sig: HeaderValue) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert("sluice-signature", sig);
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A JSON object of exactly `size` bytes (at least the 10 of `{"pad":""}`).
fn json_of_size(size: usize) -> Vec<u8> {
    let mut b = b"{\"pad\":\"".to_vec();
    b.resize(size.max(10) - 2, b'x');
    b.extend_from_slice(b"\"}");
    b
}
