//! What the server talks to and keeps besides its handlers: the audit
//! log's writer, the JWT secret, the key store (signing
//! keys and key lists in PostgreSQL), cosign image signing, the
//! OCI registry client, TLS, the in-memory rate limits and device
//! revocations, and the change notifications between servers. Handlers
//! reach these through `AppState`.

pub mod audit;
pub mod clock;
pub mod jwt;
pub mod keystore;
pub mod notify;
pub mod ratelimit;
pub mod registry;
pub mod revocations;
pub mod signing;
pub mod tls;
