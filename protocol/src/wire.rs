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
    /// Never goes down for the device, whichever channel of the product it
    /// follows (the highest serial of the product's channels).
    pub serial: i64,
    /// When the answer was made.
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    /// After this, the device must not act on the answer.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// The answer's format: 2 names the question below (`product`,
    /// `channel`, `arch`, `current`); an answer without it (version 1)
    /// names only device, nonce and serial.
    #[serde(default = "wire_v1")]
    pub wire: u32,
    /// The product asked about (version 2).
    #[serde(default)]
    pub product: Option<String>,
    /// The channel asked about (version 2).
    #[serde(default)]
    pub channel: Option<String>,
    /// The architecture the offer is for (version 2).
    #[serde(default)]
    pub arch: Option<String>,
    /// The `current` digest the device sent, `null` when it sent none (version 2).
    #[serde(default)]
    pub current: Option<String>,
    /// The newest key list's version (`GET /v1/keys/lists`): a device
    /// holding an older one fetches the newer lists.
    #[serde(default)]
    pub keys_version: Option<u64>,
    /// Digests an admin cleared from the device's failed list
    /// (`POST /v1/devices/{id}/retry`): the device forgets that they failed
    /// here, so it installs them again when offered, and says so with
    /// `POST /v1/devices/{id}/failures/cleared`. Absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry: Vec<String>,
    /// When the device may reboot into a release it staged, and whether it
    /// must first take a reboot lease. Absent (servers before it, or a
    /// channel with no reboot policy): reboot when staged, no lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot: Option<RebootAdvice>,
}

/// Why a device may or may not reboot now, in [`RebootAdvice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RebootReason {
    /// No maintenance window applies to the device: any time.
    NoWindow,
    /// A maintenance window that applies to the device is open now.
    InWindow,
    /// An admin marked the offered release urgent: windows do not hold it back.
    Urgent,
    /// Windows apply to the device and none is open now.
    OutsideWindow,
}

/// The channel's reboot policy as it applies to one device now, in the
/// signed answer: a device stages (downloads and writes the inactive slot)
/// at any time, and boots into it only when `allowed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RebootAdvice {
    /// The device may reboot into what it staged now.
    pub allowed: bool,
    /// Why.
    pub reason: RebootReason,
    /// The maintenance windows that apply to the device, in words
    /// (`Sat 02:00–04:00 Europe/Berlin`); absent when none applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// When the next window opens (the open one's start while inside it).
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub opens_at: Option<OffsetDateTime>,
    /// When that window closes.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub closes_at: Option<OffsetDateTime>,
    /// The reboot-lease group: before it reboots, the device takes a lease
    /// in this group (`POST /v1/pre-reboot`, the FleetLock protocol) and
    /// gives it back once the new slot passed its boot assessment
    /// (`POST /v1/steady-state`). Absent: no lease is needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_group: Option<String>,
}

/// The body of FleetLock's `POST /v1/pre-reboot` and `POST /v1/steady-state`
/// (as Zincati sends it, with the header `fleet-lock-protocol: true`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FleetLockRequest {
    /// Who asks.
    pub client_params: FleetLockClient,
}

/// The client of a [`FleetLockRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FleetLockClient {
    /// The machine's id: a lease belongs to it (a Sluice device sends its
    /// device id).
    pub id: String,
    /// The reboot group (`[a-zA-Z0-9.-]+`; Zincati's default is `default`).
    pub group: String,
}

/// A FleetLock error body: `kind` for machines, `value` for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FleetLockError {
    /// A short machine-readable kind (`lease_unavailable`, `bad_request`, …).
    pub kind: String,
    /// What happened and what to do, in words.
    pub value: String,
}

/// The resolution answer's format this crate writes: 2 binds the answer to
/// its question (product, channel, arch, current digest).
pub const WIRE_VERSION: u32 = 2;

fn wire_v1() -> u32 {
    1
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
    /// The image was written to the inactive slot, verified, and waits for
    /// the reboot policy (a maintenance window, a reboot lease, a person);
    /// the message says which. The bootloader still boots the running slot.
    Staged,
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
    /// The kinds that say how an upgrade ended, which the health gate
    /// counts; a device's status after one has the same name.
    pub const OUTCOMES: [EventKind; 3] =
        [EventKind::Healthy, EventKind::Failed, EventKind::RolledBack];

    /// The outcomes that count as a failure: the one definition the gate,
    /// the head-status explanations and the failed-image list share.
    pub const FAILURES: [EventKind; 2] = [EventKind::Failed, EventKind::RolledBack];

    /// Whether this kind is an outcome ([`Self::OUTCOMES`]).
    pub fn is_outcome(self) -> bool {
        Self::OUTCOMES.contains(&self)
    }

    /// The names of `kinds`, for a query's `= ANY($n)`.
    pub fn names(kinds: &[EventKind]) -> Vec<&'static str> {
        kinds.iter().map(|k| k.as_str()).collect()
    }

    /// The name on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::DownloadStarted => "download_started",
            EventKind::Downloaded => "downloaded",
            EventKind::Applied => "applied",
            EventKind::Staged => "staged",
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
            EventKind::Staged => DeviceStatus::Staged,
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
    /// A written image waits for the reboot policy.
    Staged,
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
            DeviceStatus::Staged => "staged",
            DeviceStatus::Rebooting => "rebooting",
            DeviceStatus::Healthy => "healthy",
            DeviceStatus::Failed => "failed",
            DeviceStatus::RolledBack => "rolled_back",
        }
    }
}

/// Who cleared digests from a device's failed list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ClearedBy {
    /// An admin, through the server (`retry` in an answer).
    Admin,
    /// Someone on the device (`sluice-agent clear-failed`).
    Local,
}

/// `POST /v1/devices/{id}/failures/cleared`: the device no longer holds
/// these digests as failed, and will install them again when offered.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FailuresCleared {
    /// The image digests cleared (1 to 16, `sha256:<64 hex>`).
    pub digests: Vec<String>,
    /// Who cleared them.
    pub by: ClearedBy,
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
    /// The device's slots and agent state when it reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostStatus>,
}

/// How GRUB treats a slot, as the agent reads its environment block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SlotBoot {
    /// Known good: booted without spending a try.
    Good,
    /// On trial, its one try unspent: GRUB boots it next, once.
    Trial,
    /// On trial, its try spent: running unassessed, or it never came up.
    Tried,
    /// Not bootable: empty, being written, or marked bad.
    Bad,
}

/// One A/B slot in a [`HostStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SlotStatus {
    /// `A` or `B`.
    pub slot: String,
    /// The release version it holds, if known.
    #[serde(default)]
    pub version: Option<String>,
    /// The image digest it holds, if known.
    #[serde(default)]
    pub digest: Option<String>,
    /// How GRUB treats it.
    pub boot: SlotBoot,
}

/// A device's slots as bootc shows a host: what runs, what boots next on
/// trial, what the machine falls back to; and the agent's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HostStatus {
    /// The agent's update state (`idle`, `writing`, `ready` (written and
    /// verified, waiting for the reboot policy, not bootable yet), `staged`,
    /// `failed`).
    pub state: String,
    /// The agent waits for a reboot it asked for and writes nothing until then.
    #[serde(default)]
    pub reboot_pending: bool,
    /// The slot the running system booted from.
    #[serde(default)]
    pub booted: Option<SlotStatus>,
    /// The slot being written or staged to boot next, on trial.
    #[serde(default)]
    pub staged: Option<SlotStatus>,
    /// The other slot, when it is a known-good fallback.
    #[serde(default)]
    pub rollback: Option<SlotStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The answer as agents before wire version 2 parse it: no unknown-field
    /// refusal, so the fields added since are ignored.
    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct AnswerV1 {
        update: bool,
        downgrade: bool,
        release: Option<Offer>,
        poll_after_s: u64,
        device_id: String,
        nonce: String,
        serial: i64,
        #[serde(with = "time::serde::rfc3339")]
        issued_at: OffsetDateTime,
        #[serde(with = "time::serde::rfc3339")]
        expires_at: OffsetDateTime,
    }

    fn answer() -> ResolveResponse {
        let now = time::macros::datetime!(2026-01-01 00:00 UTC);
        ResolveResponse {
            update: false,
            downgrade: false,
            release: None,
            poll_after_s: 60,
            device_id: "d".into(),
            nonce: "n".into(),
            serial: 3,
            issued_at: now,
            expires_at: now,
            wire: WIRE_VERSION,
            product: Some("acme".into()),
            channel: Some("stable".into()),
            arch: Some("amd64".into()),
            current: None,
            keys_version: Some(4),
            retry: vec![format!("sha256:{}", "ab".repeat(32))],
            reboot: None,
        }
    }

    #[test]
    fn agents_of_wire_version_1_read_a_version_2_answer() {
        let body = serde_json::to_vec(&answer()).unwrap();
        let old: AnswerV1 = serde_json::from_slice(&body).unwrap();
        assert_eq!((old.serial, old.device_id.as_str()), (3, "d"));
    }

    #[test]
    fn a_version_1_answer_reads_as_version_1() {
        let mut v = serde_json::to_value(answer()).unwrap();
        for k in [
            "wire",
            "product",
            "channel",
            "arch",
            "current",
            "keys_version",
        ] {
            v.as_object_mut().unwrap().remove(k);
        }
        let r: ResolveResponse = serde_json::from_value(v).unwrap();
        assert_eq!((r.wire, r.product, r.keys_version), (1, None, None));
    }
}
