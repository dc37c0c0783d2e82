//! The JSON a device and the server exchange: enrollment, the signed
//! resolution answer, and event reports.

use crate::proof::DeviceProof;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// `POST /v1/devices/enroll`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The product's name.
    pub product: String,
    /// The product's enrollment secret.
    pub enrollment_secret: String,
    /// A stable id of the machine (e.g. `/etc/machine-id`), unique per product.
    pub machine_id: String,
    /// The machine's architecture as OCI names it (`amd64`, `arm64`).
    pub arch: String,
    /// The channel the device follows.
    pub channel: String,
    /// The release version the device runs now, if known.
    #[serde(default)]
    pub current_version: Option<String>,
    /// The image digest the device runs now, if known.
    #[serde(default)]
    pub current_digest: Option<String>,
    /// Free-form labels for filtering the fleet.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Proof that the device holds its key (purpose `enroll`, subject the
    /// machine id). Required: an agent without a device key is refused.
    #[serde(default)]
    pub proof: Option<DeviceProof>,
}

/// The answer to an enrollment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollResponse {
    /// The server-given device id.
    pub device_id: String,
    /// The device's bearer token.
    pub token: String,
    /// When the token stops working: the device renews it before then
    /// (`POST /v1/devices/{id}/token`).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
}

/// `POST /v1/devices/{id}/token` (renewal) and `POST /v1/devices/{id}/key`
/// (binding a key to a device enrolled before device keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Proof of the device's key, purpose `renew` or `bind`, subject the device id.
    pub proof: DeviceProof,
}

/// A fresh device token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceToken {
    /// The device's bearer token.
    pub token: String,
    /// When it stops working.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// A cosign signature as the server hands it to devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageSignature {
    /// Base64 of the exact simple-signing payload bytes.
    pub payload: String,
    /// Base64 of the ASN.1 DER ECDSA P-256 signature over the payload.
    pub signature: String,
    /// Id of the image key that made it.
    pub key_id: String,
}

/// The release a device is told to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Offer {
    /// The release's version.
    pub version: String,
    /// The platform manifest digest for the device's architecture.
    pub digest: String,
    /// `repository@digest`, the only reference the device pulls.
    pub image: String,
    /// Total size of the manifest's layers in bytes.
    pub size: u64,
    /// The server's cosign signature over `digest`.
    pub signature: ImageSignature,
}

/// The signed answer of `GET .../resolve`. The body's exact bytes are signed;
/// the signature travels in the `Sluice-Signature` header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResolveResponse {
    /// Whether the device should move to `release`.
    pub update: bool,
    /// The move goes to an older version because the channel was rolled back.
    pub downgrade: bool,
    /// The target release; present whenever the channel has one for the device.
    pub release: Option<Offer>,
    /// When to ask again, in seconds.
    pub poll_after_s: u64,
    /// The device this answer is for.
    pub device_id: String,
    /// The device's nonce, echoed.
    pub nonce: String,
    /// The channel's serial: never goes down.
    pub serial: i64,
    /// When the answer was made.
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    /// After this, the device must not act on the answer.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// What a device reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The download of a release began.
    DownloadStarted,
    /// The image was pulled and verified.
    Downloaded,
    /// The image was written to the inactive slot and the bootloader switched.
    Applied,
    /// The device is rebooting into the new slot.
    Rebooting,
    /// The new slot passed its health checks.
    Healthy,
    /// The upgrade failed (verification, write, or health checks).
    Failed,
    /// The device came back up in its old slot.
    RolledBack,
}

impl EventKind {
    /// The name on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::DownloadStarted => "download_started",
            EventKind::Downloaded => "downloaded",
            EventKind::Applied => "applied",
            EventKind::Rebooting => "rebooting",
            EventKind::Healthy => "healthy",
            EventKind::Failed => "failed",
            EventKind::RolledBack => "rolled_back",
        }
    }

    /// The device status an event of this kind leaves behind.
    pub fn status(self) -> DeviceStatus {
        match self {
            EventKind::DownloadStarted | EventKind::Downloaded => DeviceStatus::Downloading,
            EventKind::Applied => DeviceStatus::Applying,
            EventKind::Rebooting => DeviceStatus::Rebooting,
            EventKind::Healthy => DeviceStatus::Healthy,
            EventKind::Failed => DeviceStatus::Failed,
            EventKind::RolledBack => DeviceStatus::RolledBack,
        }
    }
}

/// Where a device stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    /// Nothing in progress.
    Idle,
    /// Pulling an image.
    Downloading,
    /// Writing an image.
    Applying,
    /// Rebooting into a new slot.
    Rebooting,
    /// Running a slot that passed its health checks.
    Healthy,
    /// An upgrade failed.
    Failed,
    /// Fell back to the old slot.
    RolledBack,
}

impl DeviceStatus {
    /// The name on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Idle => "idle",
            DeviceStatus::Downloading => "downloading",
            DeviceStatus::Applying => "applying",
            DeviceStatus::Rebooting => "rebooting",
            DeviceStatus::Healthy => "healthy",
            DeviceStatus::Failed => "failed",
            DeviceStatus::RolledBack => "rolled_back",
        }
    }
}

/// `POST /v1/devices/{id}/events`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EventRequest {
    /// What happened.
    pub kind: EventKind,
    /// The release version it is about.
    pub version: String,
    /// The image digest it is about.
    pub digest: String,
    /// A human-readable detail (an error message, a slot name).
    #[serde(default)]
    pub message: Option<String>,
    /// The slot the device booted from (`A` or `B`), if it knows.
    #[serde(default)]
    pub booted_slot: Option<String>,
}
