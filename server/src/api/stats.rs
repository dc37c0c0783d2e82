//! Channel statistics for the dashboard: how many of a channel's devices ran
//! its head over time, derived from the `healthy` (and failure) events they
//! reported.

use crate::api::auth::ProductReader;
use crate::api::channels::ChannelPath;
use crate::app::{AppState, Problems};
use crate::error::{Error, Json, Query, Result};
use axum::extract::State;
use serde::{Deserialize, Serialize};
use sluice_protocol::EventKind;
use time::{Duration, OffsetDateTime};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

/// Most points one answer may hold.
pub const MAX_POINTS: i64 = 1000;
/// Window when `since` is not given.
pub const DEFAULT_WINDOW: Duration = Duration::hours(24);
/// Longest bucket: a year.
const MAX_BUCKET_S: i64 = 366 * 86_400;
/// Points in the answer when `bucket_s` is not given.
pub const DEFAULT_POINTS: i64 = 60;

/// `GET .../stats` parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatsParams {
    /// Start of the window (RFC 3339; default 24 hours before `until`).
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>, format = DateTime)]
    pub since: Option<OffsetDateTime>,
    /// End of the window (RFC 3339; default now).
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>, format = DateTime)]
    pub until: Option<OffsetDateTime>,
    /// Seconds per point (default: the window split into 60 points; at most 1000 points).
    pub bucket_s: Option<i64>,
}

/// A channel's adoption of its head over time.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChannelStats {
    /// The channel's head now: the release the points count.
    pub head: Option<String>,
    /// Start of the window.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// End of the window.
    #[serde(with = "time::serde::rfc3339")]
    pub until: OffsetDateTime,
    /// Seconds per point.
    pub bucket_s: i64,
    /// One point per bucket, oldest first, each counted at the bucket's end.
    pub points: Vec<StatsPoint>,
}

/// The channel's devices at one moment.
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct StatsPoint {
    /// The moment (a bucket's end).
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Devices now on the channel that had enrolled by then.
    pub devices: i64,
    /// Of those, how many ran the head: their last `healthy` report by then was on it.
    pub on_head: i64,
    /// The rest: another version, or nothing reported yet.
    pub other: i64,
    /// Devices whose last outcome by then was `failed` or `rolled_back` on the head.
    pub failed: i64,
}

/// The moments to count at: the end of each `bucket_s`-long bucket from
/// `since`, the last one clipped to `until`.
pub fn bucket_ends(
    since: OffsetDateTime,
    until: OffsetDateTime,
    bucket_s: i64,
) -> Result<Vec<OffsetDateTime>> {
    if until <= since {
        return Err(Error::BadRequest(
            "`since` must be before `until` (RFC 3339 times, e.g. 2026-01-01T00:00:00Z)".into(),
        ));
    }
    if !(1..=MAX_BUCKET_S).contains(&bucket_s) {
        return Err(Error::BadRequest(format!(
            "`bucket_s` must be between 1 second and {MAX_BUCKET_S} (a year)"
        )));
    }
    let span = (until - since).whole_seconds().max(1);
    let n = span / bucket_s + i64::from(span % bucket_s != 0);
    if n > MAX_POINTS {
        return Err(Error::BadRequest(format!(
            "{n} points asked for, at most {MAX_POINTS}: use a larger `bucket_s` or a shorter window"
        )));
    }
    Ok((1..=n)
        .map(|i| (since + Duration::seconds(i * bucket_s)).min(until))
        .collect())
}

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(channel_stats))
}

/// How many of the channel's devices ran its head over time. A device's
/// version at a moment is the version of its last `healthy` report by then
/// (or the version it enrolled with, if it never reported healthy).
#[utoipa::path(get, path = "/v1/products/{product}/channels/{channel}/stats", tag = "channels",
    params(ChannelPath, StatsParams),
    security(("bearer" = [])),
    responses((status = 200, body = ChannelStats), Problems<400, 401, 403, 404>))]
async fn channel_stats(
    State(state): State<AppState>,
    _v: ProductReader,
    path: ChannelPath,
    Query(q): Query<StatsParams>,
) -> Result<Json<ChannelStats>> {
    let until = q.until.unwrap_or_else(OffsetDateTime::now_utc);
    let since = match q.since {
        Some(since) => since,
        None => until.checked_sub(DEFAULT_WINDOW).ok_or_else(|| {
            Error::BadRequest("`until` is too far in the past to have a default window".into())
        })?,
    };
    let bucket_s = q.bucket_s.unwrap_or_else(|| {
        let span = (until - since).whole_seconds();
        (span / DEFAULT_POINTS + i64::from(span % DEFAULT_POINTS != 0)).clamp(1, MAX_BUCKET_S)
    });
    let ends = bucket_ends(since, until, bucket_s)?;
    let mut conn = state.db.acquire().await?;
    let (p, c) = path.load(&mut conn, false).await?;
    let points = sqlx::query_as!(
        StatsPoint,
        r#"SELECT t.at AS "at!",
                  count(d.id) AS "devices!",
                  count(d.id) FILTER (WHERE coalesce(v.version, CASE WHEN NOT EXISTS (
                      SELECT 1 FROM device_events x WHERE x.device_id = d.id AND x.kind = 'healthy')
                      THEN d.current_version END) = $3) AS "on_head!",
                  0::bigint AS "other!",
                  count(d.id) FILTER (WHERE o.kind = ANY($6) AND o.version = $3) AS "failed!"
           FROM unnest($4::timestamptz[]) AS t(at)
           LEFT JOIN devices d ON d.product_id = $1 AND d.channel = $2 AND d.created_at <= t.at
           LEFT JOIN LATERAL (SELECT e.version FROM device_events e
                              WHERE e.device_id = d.id AND e.kind = 'healthy' AND e.at <= t.at
                              ORDER BY e.id DESC LIMIT 1) v ON true
           LEFT JOIN LATERAL (SELECT e.kind, e.version FROM device_events e
                              WHERE e.device_id = d.id AND e.kind = ANY($5) AND e.at <= t.at
                              ORDER BY e.id DESC LIMIT 1) o ON true
           GROUP BY t.at ORDER BY t.at"#,
        p.id,
        path.channel,
        c.head(),
        &ends,
        &EventKind::names(&EventKind::OUTCOMES) as &[&str],
        &EventKind::names(&EventKind::FAILURES) as &[&str]
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|pt| StatsPoint {
        other: pt.devices - pt.on_head,
        ..pt
    })
    .collect();
    Ok(Json(ChannelStats {
        head: c.head(),
        since,
        until,
        bucket_s,
        points,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn buckets_end_at_until() {
        let s = datetime!(2026-01-01 00:00 UTC);
        let ends = bucket_ends(s, s + Duration::seconds(250), 100).unwrap();
        assert_eq!(
            ends,
            vec![
                s + Duration::seconds(100),
                s + Duration::seconds(200),
                s + Duration::seconds(250)
            ]
        );
    }

    #[test]
    fn refuses_empty_windows_and_too_many_points() {
        let s = datetime!(2026-01-01 00:00 UTC);
        assert!(bucket_ends(s, s, 10).is_err());
        assert!(bucket_ends(s, s + Duration::seconds(10), 0).is_err());
        // Found by schemathesis: a huge bucket overflowed instead of being refused.
        assert!(bucket_ends(s, s + Duration::seconds(10), 251_606_738_153).is_err());
        assert!(bucket_ends(s, s + Duration::seconds(10), i64::MAX).is_err());
        assert!(bucket_ends(s, s + Duration::seconds(MAX_POINTS + 1), 1).is_err());
        assert_eq!(
            bucket_ends(s, s + Duration::seconds(MAX_POINTS), 1)
                .unwrap()
                .len(),
            MAX_POINTS as usize
        );
    }
}
