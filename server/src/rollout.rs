//! The channel resolution rules as plain functions, with no I/O: the bucket a
//! device falls in, the effective percent of a ramp, which release a device
//! should run (pin, head or base, floors, revocation, downgrade) and when the
//! health gate halts a rollout. Handlers load, call these, and answer.

use semver::Version;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// Buckets per 100 %: a device is admitted when its bucket is below `percent * 100`.
pub const BUCKETS: u64 = 10_000;

/// Devices whose bucket is below this many hundredths of a percent get the head.
/// Hashing the head's version into the bucket reshuffles cohorts per release,
/// so the same devices are not always first.
pub fn bucket(device_id: &str, head_version: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(device_id.as_bytes());
    h.update(b":");
    h.update(head_version.as_bytes());
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes")) % BUCKETS
}

/// Whether a bucket is inside `percent` (0–100).
pub fn admitted(bucket: u64, percent: f64) -> bool {
    (bucket as f64) < (percent.clamp(0.0, 100.0) * 100.0).round()
}

/// A linear ramp from one percent to another.
#[derive(Debug, Clone, PartialEq)]
pub struct Ramp {
    /// Percent when the ramp started.
    pub from: f64,
    /// Percent the ramp ends at.
    pub to: f64,
    /// When it started (shifted forward by the time spent paused).
    pub started_at: OffsetDateTime,
    /// How long it takes.
    pub over_minutes: f64,
}

/// A channel's rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// The percent set by hand (or the ramp's start).
    pub percent: f64,
    /// An optional linear ramp.
    pub ramp: Option<Ramp>,
    /// No new device is admitted while paused.
    pub paused: bool,
    /// When it was paused: a ramp stands still from then on.
    pub paused_at: Option<OffsetDateTime>,
}

/// The percent in force at `now`: a ramp grows linearly and never shrinks,
/// and stands still while the rollout is paused.
pub fn effective_percent(r: &Rollout, now: OffsetDateTime) -> f64 {
    let at = if r.paused {
        r.paused_at.unwrap_or(now).min(now)
    } else {
        now
    };
    let p = match &r.ramp {
        None => r.percent,
        Some(ramp) => {
            let minutes = (at - ramp.started_at).as_seconds_f64() / 60.0;
            let t = if ramp.over_minutes <= 0.0 {
                1.0
            } else {
                (minutes / ramp.over_minutes).clamp(0.0, 1.0)
            };
            (ramp.from + (ramp.to - ramp.from) * t).max(r.percent)
        }
    };
    p.clamp(0.0, 100.0)
}

/// A release as the rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rel {
    /// Its version.
    pub version: Version,
    /// Devices below it must pass through it.
    pub floor: bool,
    /// Never a target.
    pub revoked: bool,
}

/// Everything the decision for one device depends on.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    /// Every release of the product (floors are found among them).
    pub releases: &'a [Rel],
    /// The channel's head.
    pub head: Option<&'a Rel>,
    /// The channel's base (the previous head).
    pub base: Option<&'a Rel>,
    /// The channel's rollout.
    pub rollout: &'a Rollout,
    /// The head was set by an explicit rollback: moving down to it is allowed.
    pub rolled_back: bool,
    /// The device's pinned release, overriding the channel.
    pub pin: Option<&'a Rel>,
    /// The device id (for its bucket).
    pub device_id: &'a str,
    /// The release the device runs, when its digest is a known release.
    pub current: Option<&'a Rel>,
    /// The time of the decision.
    pub now: OffsetDateTime,
}

/// What the device should run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'a> {
    /// The release the device should run, if the channel has one for it.
    pub target: Option<&'a Rel>,
    /// Whether the device should move to `target`.
    pub update: bool,
    /// The move goes down to an older version.
    pub downgrade: bool,
}

/// Decides which release a device should run (rules 1–5 of docs/resolution.md).
pub fn decide<'a>(i: &Input<'a>) -> Decision<'a> {
    let usable = |r: Option<&'a Rel>| r.filter(|r| !r.revoked);
    let on = |r: &Rel| i.current.is_some_and(|c| c.version == r.version);

    // 1. A pin overrides the channel; an admin chose it, so it may go down.
    if let Some(pin) = i.pin {
        let Some(pin) = usable(Some(pin)) else {
            return Decision {
                target: None,
                update: false,
                downgrade: false,
            };
        };
        let downgrade = i.current.is_some_and(|c| pin.version < c.version);
        return Decision {
            target: Some(pin),
            update: !on(pin),
            downgrade,
        };
    }

    // 2. Head for admitted devices and for those already on it; base for the rest.
    let head = usable(i.head);
    let channel_target = match head {
        Some(h) if on(h) => Some(h),
        Some(h)
            if !i.rollout.paused
                && admitted(
                    bucket(i.device_id, &h.version.to_string()),
                    effective_percent(i.rollout, i.now),
                ) =>
        {
            Some(h)
        }
        _ => usable(i.base),
    };
    let Some(mut target) = channel_target else {
        return Decision {
            target: None,
            update: false,
            downgrade: false,
        };
    };

    // 3. Floors: step through the lowest mandatory release between here and there.
    if let Some(cur) = i.current
        && let Some(floor) = i
            .releases
            .iter()
            .filter(|f| {
                f.floor && !f.revoked && f.version > cur.version && f.version < target.version
            })
            .min_by(|a, b| a.version.cmp(&b.version))
    {
        target = floor;
    }

    // 5. Nothing to do on the target; never down unless the channel was rolled back.
    if on(target) {
        return Decision {
            target: Some(target),
            update: false,
            downgrade: false,
        };
    }
    match i.current {
        Some(cur) if target.version < cur.version => {
            let allowed = i.rolled_back && head.is_some_and(|h| h.version == target.version);
            Decision {
                target: Some(target),
                update: allowed,
                downgrade: allowed,
            }
        }
        _ => Decision {
            target: Some(target),
            update: true,
            downgrade: false,
        },
    }
}

/// A channel's health gate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gate {
    /// Halt above this share of failures (percent).
    pub max_failure_percent: f64,
    /// Judge only once this many devices have reported on the head.
    pub min_reports: i64,
}

/// Whether the gate halts the rollout: enough reports, and too many of them bad.
pub fn gate_tripped(gate: Gate, reports: i64, failures: i64) -> bool {
    reports >= gate.min_reports.max(1)
        && (failures as f64) * 100.0 > gate.max_failure_percent * reports as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    fn rel(v: &str) -> Rel {
        Rel {
            version: Version::parse(v).unwrap(),
            floor: false,
            revoked: false,
        }
    }

    fn rollout(percent: f64) -> Rollout {
        Rollout {
            percent,
            ramp: None,
            paused: false,
            paused_at: None,
        }
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    fn input<'a>(
        releases: &'a [Rel],
        head: &'a Rel,
        base: &'a Rel,
        r: &'a Rollout,
        dev: &'a str,
        cur: Option<&'a Rel>,
    ) -> Input<'a> {
        Input {
            releases,
            head: Some(head),
            base: Some(base),
            rollout: r,
            rolled_back: false,
            pin: None,
            device_id: dev,
            current: cur,
            now: now(),
        }
    }

    /// Over 100 000 device ids, the share admitted is within ±1 point of the percent.
    #[test]
    fn buckets_spread_evenly() {
        let ids: Vec<String> = (0..100_000).map(|i| format!("device-{i}")).collect();
        for percent in [1.0, 10.0, 25.0, 50.0, 90.0, 99.0] {
            let n = ids
                .iter()
                .filter(|id| admitted(bucket(id, "1.4.2"), percent))
                .count();
            let share = n as f64 / 1000.0;
            assert!(
                (share - percent).abs() <= 1.0,
                "{percent}% admitted {share}%"
            );
        }
        assert_eq!(
            ids.iter()
                .filter(|id| admitted(bucket(id, "1.4.2"), 0.0))
                .count(),
            0
        );
        assert_eq!(
            ids.iter()
                .filter(|id| admitted(bucket(id, "1.4.2"), 100.0))
                .count(),
            100_000
        );
    }

    /// The same device gets the same answer on every poll.
    #[test]
    fn a_device_keeps_its_answer() {
        let (base, head) = (rel("1.0.0"), rel("1.1.0"));
        let all = [base.clone(), head.clone()];
        let r = rollout(30.0);
        for i in 0..1000 {
            let id = format!("d{i}");
            let first = decide(&input(&all, &head, &base, &r, &id, Some(&base)));
            for _ in 0..3 {
                assert_eq!(
                    decide(&input(&all, &head, &base, &r, &id, Some(&base))),
                    first
                );
            }
        }
    }

    /// Raising the percent only adds devices: nobody admitted before is dropped.
    #[test]
    fn raising_the_percent_keeps_everyone_admitted() {
        for i in 0..5000 {
            let b = bucket(&format!("d{i}"), "2.0.0");
            if admitted(b, 10.0) {
                assert!(admitted(b, 10.5) && admitted(b, 50.0));
            }
        }
    }

    /// A ramp grows linearly, never shrinks, and stands still while paused.
    #[test]
    fn a_ramp_only_grows() {
        let start = now();
        let mut r = Rollout {
            percent: 10.0,
            ramp: Some(Ramp {
                from: 10.0,
                to: 50.0,
                started_at: start,
                over_minutes: 40.0,
            }),
            paused: false,
            paused_at: None,
        };
        let mut last = 0.0;
        for m in 0..60 {
            let p = effective_percent(&r, start + Duration::minutes(m));
            assert!(p >= last, "ramp went down at minute {m}");
            last = p;
        }
        assert_eq!(effective_percent(&r, start + Duration::minutes(20)), 30.0);
        assert_eq!(effective_percent(&r, start + Duration::minutes(400)), 50.0);
        assert_eq!(effective_percent(&r, start - Duration::minutes(5)), 10.0);
        r.paused = true;
        r.paused_at = Some(start + Duration::minutes(10));
        assert_eq!(effective_percent(&r, start + Duration::minutes(30)), 20.0);
    }

    /// A paused rollout admits no new device; those on the head keep it.
    #[test]
    fn pause_admits_nobody_new() {
        let (base, head) = (rel("1.0.0"), rel("1.1.0"));
        let all = [base.clone(), head.clone()];
        let mut r = rollout(100.0);
        r.paused = true;
        let d = decide(&input(&all, &head, &base, &r, "x", Some(&base)));
        assert_eq!(
            d,
            Decision {
                target: Some(&base),
                update: false,
                downgrade: false
            }
        );
        let d = decide(&input(&all, &head, &base, &r, "x", Some(&head)));
        assert_eq!(
            d,
            Decision {
                target: Some(&head),
                update: false,
                downgrade: false
            }
        );
    }

    /// Devices below a floor step through it before reaching the head.
    #[test]
    fn floors_step_devices_through() {
        let v1 = rel("1.0.0");
        let mut f1 = rel("1.2.0");
        f1.floor = true;
        let mut f2 = rel("1.5.0");
        f2.floor = true;
        let head = rel("2.0.0");
        let all = [v1.clone(), f1.clone(), f2.clone(), head.clone()];
        let r = rollout(100.0);
        let d = decide(&input(&all, &head, &v1, &r, "x", Some(&v1)));
        assert_eq!(d.target, Some(&all[1]));
        assert!(d.update);
        let d = decide(&input(&all, &head, &v1, &r, "x", Some(&f1)));
        assert_eq!(d.target, Some(&all[2]));
        let d = decide(&input(&all, &head, &v1, &r, "x", Some(&f2)));
        assert_eq!(d.target, Some(&head));
        // A revoked floor is skipped.
        let mut all2 = all.clone();
        all2[1].revoked = true;
        let d = decide(&input(&all2, &head, &v1, &r, "x", Some(&v1)));
        assert_eq!(
            d.target.map(|t| t.version.to_string()),
            Some("1.5.0".into())
        );
    }

    /// A revoked release is never offered: a revoked head falls back to the base.
    #[test]
    fn revoked_is_never_a_target() {
        let base = rel("1.0.0");
        let mut head = rel("1.1.0");
        head.revoked = true;
        let all = [base.clone(), head.clone()];
        let r = rollout(100.0);
        for i in 0..200 {
            let id = format!("d{i}");
            let d = decide(&input(&all, &head, &base, &r, &id, None));
            assert_eq!(d.target, Some(&base));
        }
        let mut base_revoked = base.clone();
        base_revoked.revoked = true;
        let d = decide(&input(&all, &head, &base_revoked, &r, "x", None));
        assert_eq!(
            d,
            Decision {
                target: None,
                update: false,
                downgrade: false
            }
        );
    }

    /// No device moves down unless the channel was rolled back.
    #[test]
    fn no_downgrade_without_rollback() {
        let (old, new) = (rel("1.0.0"), rel("1.1.0"));
        let all = [old.clone(), new.clone()];
        let r = rollout(100.0);
        // Head 1.0.0 set by a plain promote: the device on 1.1.0 stays.
        let mut i = input(&all, &old, &new, &r, "x", Some(&new));
        let d = decide(&i);
        assert_eq!(
            d,
            Decision {
                target: Some(&old),
                update: false,
                downgrade: false
            }
        );
        i.rolled_back = true;
        let d = decide(&i);
        assert_eq!(
            d,
            Decision {
                target: Some(&old),
                update: true,
                downgrade: true
            }
        );
    }

    /// A pin overrides the channel, in either direction.
    #[test]
    fn a_pin_overrides_the_channel() {
        let (old, new) = (rel("1.0.0"), rel("1.1.0"));
        let all = [old.clone(), new.clone()];
        let r = rollout(100.0);
        let mut i = input(&all, &new, &old, &r, "x", Some(&new));
        i.pin = Some(&old);
        assert_eq!(
            decide(&i),
            Decision {
                target: Some(&old),
                update: true,
                downgrade: true
            }
        );
    }

    /// A device whose digest is unknown is moved to the target.
    #[test]
    fn unknown_current_gets_the_target() {
        let (old, new) = (rel("1.0.0"), rel("1.1.0"));
        let all = [old.clone(), new.clone()];
        let r = rollout(100.0);
        let d = decide(&input(&all, &new, &old, &r, "x", None));
        assert_eq!(
            d,
            Decision {
                target: Some(&new),
                update: true,
                downgrade: false
            }
        );
    }

    /// The gate waits for enough reports, then trips above the share.
    #[test]
    fn gate_trips_above_the_share() {
        let g = Gate {
            max_failure_percent: 20.0,
            min_reports: 10,
        };
        assert!(!gate_tripped(g, 9, 9));
        assert!(!gate_tripped(g, 10, 2));
        assert!(gate_tripped(g, 10, 3));
        assert!(!gate_tripped(g, 100, 20));
        assert!(gate_tripped(g, 100, 21));
    }
}
