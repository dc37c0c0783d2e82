//! The channel resolution rules as plain functions, with no I/O: the bucket a
//! device falls in, the effective percent of a ramp or of the waves, which
//! release a device should run (pin, head or base, floors, revocation,
//! downgrade) and when the health gate halts a rollout. Handlers load, call
//! these, and answer.

use super::policy::{Labels, WavePlan, WaveStanding};
use semver::Version;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use utoipa::ToSchema;

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
    /// The waves the rollout proceeds in, by label selector; when set,
    /// `percent` and `ramp` are not used.
    pub waves: Option<WavePlan>,
}

/// The rollout's clock at `now`: it stands still from the moment the rollout
/// was paused, so ramps and waves pick up where they stood on resume.
pub fn rollout_clock(r: &Rollout, now: OffsetDateTime) -> OffsetDateTime {
    if r.paused {
        r.paused_at.unwrap_or(now).min(now)
    } else {
        now
    }
}

/// The percent in force at `now` of a rollout without waves: a ramp grows
/// linearly and never shrinks, and stands still while the rollout is paused.
pub fn effective_percent(r: &Rollout, now: OffsetDateTime) -> f64 {
    let at = rollout_clock(r, now);
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

/// The percent that admits a device with `labels` at `now`: its waves'
/// (see [`WavePlan::percent_for`]) when the rollout has waves, else
/// [`effective_percent`].
pub fn percent_for(r: &Rollout, labels: &Labels, now: OffsetDateTime) -> f64 {
    match &r.waves {
        Some(plan) => plan.percent_for(labels, rollout_clock(r, now)),
        None => effective_percent(r, now),
    }
}

/// Where a rollout's waves stand at `now` (standing still while paused);
/// None for a rollout without waves.
pub fn wave_standing(r: &Rollout, now: OffsetDateTime) -> Option<WaveStanding> {
    r.waves
        .as_ref()
        .map(|plan| plan.standing(rollout_clock(r, now)))
}

/// What the waves hold for one device not admitted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prospect {
    /// It matches none of the waves.
    NoWave,
    /// Wave `.0` has started and will admit it as it ramps on.
    Ramping(usize),
    /// Wave `.0` has not started and will admit it.
    Later(usize),
    /// No wave it matches ever admits it; `.0` goes furthest.
    Never(usize),
}

fn prospect(plan: &WavePlan, labels: &Labels, bucket: u64, clock: OffsetDateTime) -> Prospect {
    let matched: Vec<usize> = (0..plan.waves.len())
        .filter(|&i| plan.waves[i].selector.matches(labels))
        .collect();
    let admits = |i: &&usize| admitted(bucket, plan.waves[**i].percent);
    let started = |i: &&usize| plan.starts_at(**i) <= clock;
    if let Some(&i) = matched.iter().filter(started).find(admits) {
        return Prospect::Ramping(i);
    }
    if let Some(&i) = matched.iter().find(admits) {
        return Prospect::Later(i);
    }
    match matched
        .iter()
        .max_by(|a, b| plan.waves[**a].percent.total_cmp(&plan.waves[**b].percent))
    {
        Some(&i) => Prospect::Never(i),
        None => Prospect::NoWave,
    }
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
    /// The channel's base (the release it last rolled out fully).
    pub base: Option<&'a Rel>,
    /// The channel's rollout.
    pub rollout: &'a Rollout,
    /// The head was set by an explicit rollback: moving down to it is allowed.
    pub rolled_back: bool,
    /// The device's pinned release, overriding the channel.
    pub pin: Option<&'a Rel>,
    /// The device id (for its bucket).
    pub device_id: &'a str,
    /// The device's labels (for the waves).
    pub labels: &'a Labels,
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

/// Which of the rules chose a device's target: the explanation that goes
/// with a [`Decision`], so what the dashboard says is what resolve did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// 1. The device is pinned to a usable release.
    Pin,
    /// 1. The device is pinned to a revoked release: nothing is offered.
    PinRevoked,
    /// 2. The device already runs the head.
    OnHead,
    /// 2. The device's bucket is inside the percent in force.
    Admitted,
    /// 2. Not admitted: the rollout is paused.
    Paused,
    /// 2. Not admitted: the bucket is outside the percent in force.
    ///
    /// In waves: a started wave ramps on to it, or no wave ever admits it.
    OutsideCohort,
    /// 2. Not admitted: its wave has not started, or it is in no wave.
    LaterWave,
    /// 2. The channel has no usable head (none yet, or revoked).
    NoHead,
}

/// How a decision was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Why {
    /// The rule that chose the target before floors and downgrades.
    pub rule: Rule,
    /// 3. A floor replaced that target.
    pub floor: bool,
    /// 5. The device runs a newer version and may not move down.
    pub held: bool,
}

/// Decides which release a device should run (rules 1–5 of docs/resolution.md).
pub fn decide<'a>(i: &Input<'a>) -> Decision<'a> {
    decide_why(i).0
}

/// [`decide`], with the rules that made the decision.
pub fn decide_why<'a>(i: &Input<'a>) -> (Decision<'a>, Why) {
    // 4. A revoked release is never a target: rules 1–3 see releases through this.
    let usable = |r: Option<&'a Rel>| r.filter(|r| !r.revoked);
    let on = |r: &Rel| i.current.is_some_and(|c| c.version == r.version);
    let why = |rule| Why {
        rule,
        floor: false,
        held: false,
    };
    let nothing = Decision {
        target: None,
        update: false,
        downgrade: false,
    };

    // 1. A pin overrides the channel; an admin chose it, so it may go down.
    if let Some(pin) = i.pin {
        let Some(pin) = usable(Some(pin)) else {
            return (nothing, why(Rule::PinRevoked));
        };
        let downgrade = i.current.is_some_and(|c| pin.version < c.version);
        return (
            Decision {
                target: Some(pin),
                update: !on(pin),
                downgrade,
            },
            why(Rule::Pin),
        );
    }

    // 2. Head for admitted devices and for those already on it; base for the rest.
    let head = usable(i.head);
    let (channel_target, rule) = match head {
        Some(h) if on(h) => (Some(h), Rule::OnHead),
        Some(_) if i.rollout.paused => (usable(i.base), Rule::Paused),
        Some(h) => {
            let b = bucket(i.device_id, &h.version.to_string());
            if admitted(b, percent_for(i.rollout, i.labels, i.now)) {
                (Some(h), Rule::Admitted)
            } else if let Some(plan) = &i.rollout.waves
                && matches!(
                    prospect(plan, i.labels, b, rollout_clock(i.rollout, i.now)),
                    Prospect::NoWave | Prospect::Later(_)
                )
            {
                (usable(i.base), Rule::LaterWave)
            } else {
                (usable(i.base), Rule::OutsideCohort)
            }
        }
        None => (usable(i.base), Rule::NoHead),
    };
    let mut why = why(rule);
    let Some(mut target) = channel_target else {
        return (nothing, why);
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
        why.floor = true;
    }

    // 5. Nothing to do on the target; never down unless the channel was rolled back.
    if on(target) {
        return (
            Decision {
                target: Some(target),
                update: false,
                downgrade: false,
            },
            why,
        );
    }
    match i.current {
        Some(cur) if target.version < cur.version => {
            let allowed = i.rolled_back && head.is_some_and(|h| h.version == target.version);
            why.held = !allowed;
            (
                Decision {
                    target: Some(target),
                    update: allowed,
                    downgrade: allowed,
                },
                why,
            )
        }
        _ => (
            Decision {
                target: Some(target),
                update: true,
                downgrade: false,
            },
            why,
        ),
    }
}

/// Why a device is or is not on its channel's head.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum HeadReason {
    /// It runs the head.
    OnHead,
    /// The channel has no head yet.
    NoHead,
    /// The head is revoked: devices get the base.
    HeadRevoked,
    /// A pin overrides the channel.
    Pinned,
    /// The rollout is paused: no new device is admitted.
    Paused,
    /// Outside the percent of devices the rollout admits now.
    OutsideCohort,
    /// The rollout goes in waves, and the wave that admits it has not
    /// started (or it matches none of them).
    WaitingForWave,
    /// It must first step through a floor release.
    Floor,
    /// It runs a newer version, and devices only move down after a rollback.
    NewerThanHead,
    /// The release it should get has no image for its architecture.
    NoPlatform,
    /// It reported that release as failed or rolled back: the agent does not retry it.
    FailedBefore,
    /// It is downloading, applying or rebooting into it.
    Updating,
    /// It wrote it and waits for the reboot policy (a maintenance window, a
    /// reboot lease, a person).
    Staged,
    /// It has not asked for an update since the channel changed.
    NotCheckedIn,
    /// It was offered the release and has not reported installing it yet.
    Offered,
    /// The device is revoked: it is refused any answer.
    DeviceRevoked,
}

/// What the resolve rules do not see, but that keeps a device where it is.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// The device's architecture.
    pub arch: String,
    /// Whether the head has an image for that architecture.
    pub head_has_arch: bool,
    /// The device reported the head failed or rolled back (the kind, and when).
    pub failed_head: Option<(String, String)>,
    /// Whether the decision's target has an image for that architecture.
    pub target_has_arch: bool,
    /// The device reported the target failed or rolled back (the kind, and when).
    pub failed_target: Option<(String, String)>,
    /// The device is downloading, applying or rebooting into the target.
    pub updating: bool,
    /// The device wrote the target and waits for the channel's reboot
    /// policy: what it said it waits for (a window, a lease, a person).
    pub staged: Option<String>,
    /// The device asked for an update since the channel last changed.
    pub asked_since_change: bool,
    /// Why the rollout is paused, when it is.
    pub paused_reason: Option<String>,
    /// An admin revoked the device: it gets no answer at all.
    pub device_revoked: bool,
}

/// A device's standing against its channel's head, in words a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// It runs the head.
    pub on_head: bool,
    /// Why it does or does not.
    pub reason: HeadReason,
    /// One sentence saying so, and what would change it.
    pub message: String,
}

/// Explains a decision of [`decide_why`] for `i`, with the `facts` outside the rules.
pub fn explain(i: &Input<'_>, d: &Decision<'_>, why: Why, facts: &Facts) -> Explanation {
    let v = |r: Option<&Rel>| r.map_or_else(|| "none".to_string(), |r| r.version.to_string());
    let head = v(i.head);
    let current = i.current.map_or_else(
        || "an unknown version".to_string(),
        |c| c.version.to_string(),
    );
    let target = v(d.target);
    let say = |reason, message: String| Explanation {
        on_head: reason == HeadReason::OnHead,
        reason,
        message,
    };
    let on_head = i
        .head
        .is_some_and(|h| !h.revoked && i.current.is_some_and(|c| c.version == h.version));
    if on_head && why.rule == Rule::Pin && d.update {
        return Explanation {
            on_head: true,
            reason: HeadReason::Pinned,
            message: format!(
                "Runs the head, {head}, but is pinned to {target} and will move there: unpin it to keep following the channel."
            ),
        };
    }
    if on_head {
        return say(
            HeadReason::OnHead,
            if i.rolled_back {
                format!("Runs the head, {head} (the channel was rolled back to it).")
            } else {
                format!("Runs the head, {head}.")
            },
        );
    }
    if facts.device_revoked {
        return say(
            HeadReason::DeviceRevoked,
            "The device is revoked, so the server refuses it any update: reset it to let the machine enroll again.".into(),
        );
    }
    match why.rule {
        Rule::Pin => {
            return say(
                HeadReason::Pinned,
                format!(
                    "Pinned to {}: a pin overrides the channel. Unpin the device to let it follow the head ({head}).",
                    v(i.pin)
                ),
            );
        }
        Rule::PinRevoked => {
            return say(
                HeadReason::Pinned,
                format!(
                    "Pinned to {}, which is revoked: nothing is offered. Pin another release or unpin the device.",
                    v(i.pin)
                ),
            );
        }
        Rule::NoHead if i.head.is_none() => {
            return say(
                HeadReason::NoHead,
                "The channel has no head yet: promote a release into it.".into(),
            );
        }
        Rule::NoHead => {
            return say(
                HeadReason::HeadRevoked,
                format!(
                    "The head {head} is revoked, so devices get the base ({}): promote another release.",
                    v(i.base)
                ),
            );
        }
        Rule::Paused | Rule::OutsideCohort | Rule::LaterWave | Rule::OnHead | Rule::Admitted => {}
    }
    // The same three reasons hold for the head and, once the device is in
    // the cohort, for the release it is offered instead (its target).
    let newer_than = |release: &str| {
        say(
            HeadReason::NewerThanHead,
            format!(
                "Runs {current}, newer than {release}: devices never move down unless the channel is rolled back."
            ),
        )
    };
    let no_platform = |release: &str| {
        say(
            HeadReason::NoPlatform,
            format!(
                "{release} has no image for {arch}: the device stays on {current}. Publish a release with a {arch} image.",
                arch = facts.arch
            ),
        )
    };
    let failed_before = |release: &str, (kind, at): &(String, String)| {
        say(
            HeadReason::FailedBefore,
            format!(
                "It reported {release} as {} at {at}: the agent does not install a release that failed on it again. Fix the release and publish a new version.",
                kind.replace('_', " ")
            ),
        )
    };
    // What keeps a device off the head whatever the percent comes first: a
    // newer version, no image for it, a failure the agent will not retry.
    let newer = i
        .current
        .zip(i.head)
        .is_some_and(|(c, h)| c.version > h.version);
    if why.held && newer {
        return newer_than(&format!("the head {head}"));
    }
    if !facts.head_has_arch {
        return no_platform(&head);
    }
    if let Some(failed) = &facts.failed_head {
        return failed_before(&head, failed);
    }
    match why.rule {
        Rule::Paused => {
            return say(
                HeadReason::Paused,
                format!(
                    "The rollout of {head} is paused{}: no new device gets it until it is resumed.",
                    facts
                        .paused_reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ),
            );
        }
        Rule::OutsideCohort | Rule::LaterWave if i.rollout.waves.is_some() => {
            let b = i
                .head
                .map_or(0, |h| bucket(i.device_id, &h.version.to_string()));
            let (reason, message) = explain_waves(i, d, b);
            return say(reason, message);
        }
        Rule::OutsideCohort | Rule::LaterWave => {
            let b = i
                .head
                .map_or(0, |h| bucket(i.device_id, &h.version.to_string()));
            return say(
                HeadReason::OutsideCohort,
                format!(
                    "Outside the {}% of devices admitted to {head}: it is admitted once the rollout reaches {}%.",
                    fmt_percent(effective_percent(i.rollout, i.now)),
                    fmt_percent((b + 1) as f64 / 100.0)
                ),
            );
        }
        _ => {}
    }
    if why.held {
        return newer_than(&target);
    }
    if d.target.is_some() && !facts.target_has_arch {
        return no_platform(&target);
    }
    if let Some(failed) = &facts.failed_target {
        return failed_before(&target, failed);
    }
    if why.floor {
        return say(
            HeadReason::Floor,
            format!(
                "It must first install the floor release {target} (devices below a floor step through it); it gets {head} after."
            ),
        );
    }
    if let Some(waits) = &facts.staged {
        return say(
            HeadReason::Staged,
            format!("It wrote {target} and waits to reboot into it: {waits}."),
        );
    }
    if facts.updating {
        return say(HeadReason::Updating, format!("It is installing {target}."));
    }
    if !facts.asked_since_change {
        return say(
            HeadReason::NotCheckedIn,
            format!(
                "It has not asked for an update since the channel last changed; it gets {target} at its next check-in."
            ),
        );
    }
    say(
        HeadReason::Offered,
        format!("It was offered {target} and has not reported installing it yet."),
    )
}

/// Why waves keep a device with bucket `b` off the head, in words.
fn explain_waves(i: &Input<'_>, d: &Decision<'_>, b: u64) -> (HeadReason, String) {
    let Some(plan) = &i.rollout.waves else {
        return (HeadReason::OutsideCohort, String::new());
    };
    let clock = rollout_clock(i.rollout, i.now);
    let head = i
        .head
        .map_or_else(|| "none".into(), |h| h.version.to_string());
    let n = plan.waves.len();
    let wave = |k: usize| {
        format!(
            "wave {} of {n} ({})",
            k + 1,
            plan.waves[k].selector.describe()
        )
    };
    let reaches = fmt_percent((b + 1) as f64 / 100.0);
    // What it runs meanwhile: the base it is offered, or what it has.
    let current = i.current.map(|c| c.version.to_string());
    let meanwhile = match (d.target, d.update) {
        (Some(t), true) => format!("it gets {}", t.version),
        _ => format!(
            "it stays on {}",
            current.as_deref().unwrap_or("what it runs")
        ),
    };
    match prospect(plan, i.labels, b, clock) {
        Prospect::NoWave => (
            HeadReason::WaitingForWave,
            format!(
                "Matches none of the rollout's waves ({}): {meanwhile} until a promote includes it.",
                plan.waves
                    .iter()
                    .map(|w| w.selector.describe())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        ),
        Prospect::Later(k) => (
            HeadReason::WaitingForWave,
            format!(
                "Waits for {}, which starts at {}: it gets {head} once that wave reaches {reaches}%.",
                wave(k),
                fmt_utc(plan.starts_at(k))
            ),
        ),
        Prospect::Ramping(k) => (
            HeadReason::OutsideCohort,
            format!(
                "In {}, which admits {}% of its devices to {head} now: it is admitted once the wave reaches {reaches}%.",
                wave(k),
                fmt_percent(plan.wave_percent(k, clock))
            ),
        ),
        Prospect::Never(k) => (
            HeadReason::OutsideCohort,
            format!(
                "Outside the {}% of devices {} admits to {head}, and no other wave includes it: {meanwhile} until a promote includes it.",
                fmt_percent(plan.waves[k].percent),
                wave(k)
            ),
        ),
    }
}

/// A moment as the explanations say it: `2027-03-28 02:00 UTC`.
fn fmt_utc(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute()
    )
}

/// A percent as people write it: `10`, `57.31`.
pub fn fmt_percent(p: f64) -> String {
    let s = format!("{:.2}", p);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
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
    use crate::rules::policy::WaveSpec;
    use std::collections::BTreeSet;
    use time::Duration;

    fn rel(v: &str) -> Rel {
        Rel {
            version: Version::parse(v).unwrap(),
            floor: false,
            revoked: false,
        }
    }

    static NO_LABELS: Labels = Labels::new();

    fn rollout(percent: f64) -> Rollout {
        Rollout {
            percent,
            ramp: None,
            paused: false,
            paused_at: None,
            waves: None,
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
            labels: &NO_LABELS,
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
            waves: None,
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

    fn facts(asked: bool) -> Facts {
        Facts {
            arch: "amd64".into(),
            head_has_arch: true,
            target_has_arch: true,
            asked_since_change: asked,
            ..Facts::default()
        }
    }

    fn explained(i: &Input<'_>, f: &Facts) -> Explanation {
        let (d, why) = decide_why(i);
        assert_eq!(d, decide(i), "decide and decide_why agree");
        explain(i, &d, why, f)
    }

    /// The percent an "outside the cohort" message names is the one that admits the device.
    #[test]
    fn outside_cohort_names_the_percent_that_admits() {
        let (base, head) = (rel("1.0.0"), rel("1.1.0"));
        let all = [base.clone(), head.clone()];
        let mut checked = 0;
        for n in 0..300 {
            let id = format!("d{n}");
            let r = rollout(10.0);
            let i = input(&all, &head, &base, &r, &id, Some(&base));
            let e = explained(&i, &facts(true));
            if e.reason != HeadReason::OutsideCohort {
                assert_eq!(e.reason, HeadReason::Offered);
                continue;
            }
            checked += 1;
            assert!(!e.on_head);
            let at: f64 = e
                .message
                .split("once the rollout reaches ")
                .nth(1)
                .and_then(|m| m.strip_suffix("%."))
                .unwrap()
                .parse()
                .unwrap();
            let just = rollout(at);
            let i = input(&all, &head, &base, &just, &id, Some(&base));
            assert!(decide(&i).update, "{id} is admitted at {at}%");
            let below = rollout(at - 0.01);
            let i = input(&all, &head, &base, &below, &id, Some(&base));
            assert!(!decide(&i).update, "{id} is not admitted below {at}%");
        }
        assert!(checked > 200, "most devices are outside a 10% cohort");
    }

    /// Each rule that keeps a device off the head is named.
    #[test]
    fn explanations_name_the_rule() {
        let (base, head) = (rel("1.0.0"), rel("1.1.0"));
        let all = [base.clone(), head.clone()];
        let full = rollout(100.0);
        let on = explained(
            &input(&all, &head, &base, &full, "x", Some(&head)),
            &facts(true),
        );
        assert_eq!((on.on_head, on.reason), (true, HeadReason::OnHead));

        let i = input(&all, &head, &base, &full, "x", Some(&base));
        assert_eq!(
            explained(&i, &facts(false)).reason,
            HeadReason::NotCheckedIn
        );
        assert_eq!(explained(&i, &facts(true)).reason, HeadReason::Offered);
        let mut f = facts(true);
        f.updating = true;
        assert_eq!(explained(&i, &f).reason, HeadReason::Updating);
        f.staged = Some("waits for window Sat 02:00–04:00 Europe/Berlin".into());
        let e = explained(&i, &f);
        assert_eq!(e.reason, HeadReason::Staged);
        assert!(
            e.message.contains("Sat 02:00–04:00 Europe/Berlin"),
            "{}",
            e.message
        );
        f.staged = None;
        f.failed_head = Some(("rolled_back".into(), "12:00".into()));
        let e = explained(&i, &f);
        assert_eq!(e.reason, HeadReason::FailedBefore);
        assert!(e.message.contains("1.1.0 as rolled back"), "{}", e.message);
        let mut f = facts(true);
        f.head_has_arch = false;
        f.target_has_arch = false;
        f.arch = "arm64".into();
        let e = explained(&i, &f);
        assert_eq!(e.reason, HeadReason::NoPlatform);
        assert!(e.message.contains("no image for arm64"), "{}", e.message);

        let mut paused = rollout(100.0);
        paused.paused = true;
        let i = input(&all, &head, &base, &paused, "x", Some(&base));
        let mut f = facts(true);
        f.paused_reason = Some("health gate".into());
        let e = explained(&i, &f);
        assert_eq!(e.reason, HeadReason::Paused);
        assert!(e.message.contains("(health gate)"), "{}", e.message);
        // A failure or a missing image outlasts the pause: those are named first.
        f.failed_head = Some(("failed".into(), "12:00".into()));
        assert_eq!(explained(&i, &f).reason, HeadReason::FailedBefore);

        let mut i = input(&all, &head, &base, &full, "x", Some(&base));
        i.pin = Some(&base);
        assert_eq!(explained(&i, &facts(true)).reason, HeadReason::Pinned);
        // On the head, but a pin takes it away: still on it, and told why it will leave.
        let mut i = input(&all, &head, &base, &full, "x", Some(&head));
        i.pin = Some(&base);
        let e = explained(&i, &facts(true));
        assert_eq!((e.on_head, e.reason), (true, HeadReason::Pinned));

        // Newer than the head: held until a rollback.
        let mut i = input(&all, &base, &head, &full, "x", Some(&head));
        assert_eq!(
            explained(&i, &facts(true)).reason,
            HeadReason::NewerThanHead
        );
        i.rolled_back = true;
        assert_eq!(explained(&i, &facts(true)).reason, HeadReason::Offered);

        let mut floor = rel("1.0.5");
        floor.floor = true;
        let old = rel("0.9.0");
        let all2 = [old.clone(), floor.clone(), head.clone()];
        let i = input(&all2, &head, &old, &full, "x", Some(&old));
        assert_eq!(explained(&i, &facts(true)).reason, HeadReason::Floor);

        let mut revoked = head.clone();
        revoked.revoked = true;
        let i = input(&all, &revoked, &base, &full, "x", Some(&base));
        assert_eq!(explained(&i, &facts(true)).reason, HeadReason::HeadRevoked);
        let mut i = input(&all, &head, &base, &full, "x", Some(&base));
        i.head = None;
        assert_eq!(explained(&i, &facts(true)).reason, HeadReason::NoHead);
    }

    fn waves(specs: &[(&str, f64, f64, f64)]) -> Rollout {
        let specs: Vec<WaveSpec> = specs
            .iter()
            .map(|(selector, percent, ramp, hold)| WaveSpec {
                selector: selector.to_string(),
                percent: *percent,
                ramp_minutes: *ramp,
                hold_minutes: *hold,
            })
            .collect();
        Rollout {
            waves: Some(WavePlan::new(&specs, now()).unwrap()),
            ..rollout(0.0)
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Canary devices go first, ramping; the rest wait for their wave.
    #[test]
    fn waves_admit_by_label() {
        let (base, head) = (rel("1.0.0"), rel("1.1.0"));
        let all = [base.clone(), head.clone()];
        let r = waves(&[("ring=canary", 100.0, 60.0, 30.0), ("", 100.0, 0.0, 0.0)]);
        let canary = labels(&[("ring", "canary")]);
        let (mut canaries, mut others) = (0, 0);
        for n in 0..400 {
            let id = format!("d{n}");
            let mut i = input(&all, &head, &base, &r, &id, Some(&base));
            i.now = now() + Duration::minutes(30);
            let (d, why) = decide_why(&i);
            assert!(!d.update || why.rule == Rule::Admitted);
            assert_eq!(why.rule == Rule::LaterWave, !d.update, "{id}: {why:?}");
            others += usize::from(d.update);
            i.labels = &canary;
            let (d, why) = decide_why(&i);
            canaries += usize::from(d.update);
            assert!(matches!(why.rule, Rule::Admitted | Rule::OutsideCohort));
            // Once the canaries held, everyone is admitted.
            i.now = now() + Duration::minutes(90);
            assert!(decide(&i).update);
            i.labels = &NO_LABELS;
            assert!(decide(&i).update);
        }
        assert_eq!(others, 0, "the second wave has not started");
        assert!(
            (150..250).contains(&canaries),
            "half the canaries: {canaries}"
        );
    }

    /// While paused, the waves' percent stands where it stood at the pause.
    #[test]
    fn paused_waves_stand_still() {
        let mut r = waves(&[("ring=canary", 100.0, 60.0, 0.0), ("", 50.0, 100.0, 0.0)]);
        let canary = labels(&[("ring", "canary")]);
        let at = |m: i64| now() + Duration::minutes(m);
        assert_eq!(percent_for(&r, &canary, at(30)), 50.0);
        assert_eq!(wave_standing(&r, at(110)).unwrap().index, 1);
        r.paused = true;
        r.paused_at = Some(at(30));
        for m in [30, 31, 90, 10_000] {
            assert_eq!(percent_for(&r, &canary, at(m)), 50.0, "minute {m}");
            assert_eq!(percent_for(&r, &NO_LABELS, at(m)), 0.0, "minute {m}");
            let w = wave_standing(&r, at(m)).unwrap();
            assert_eq!((w.index, w.percent, w.done), (0, 50.0, false));
        }
        assert_eq!(wave_standing(&rollout(10.0), at(0)), None);
        // Without waves, the percent is the ramp's.
        assert_eq!(percent_for(&rollout(12.0), &canary, at(0)), 12.0);
    }

    /// A device that matches no wave is never admitted, and is told so.
    #[test]
    fn a_device_in_no_wave_stays_until_a_promote_includes_it() {
        let (base, head) = (rel("1.2.0"), rel("1.3.0"));
        let all = [base.clone(), head.clone()];
        let r = waves(&[
            ("ring=canary", 100.0, 0.0, 60.0),
            ("region=eu", 100.0, 0.0, 0.0),
        ]);
        let us = labels(&[("region", "us")]);
        for n in 0..200 {
            let id = format!("d{n}");
            for m in [0, 60, 600, 1_000_000] {
                let mut i = input(&all, &head, &base, &r, &id, Some(&base));
                i.labels = &us;
                i.now = now() + Duration::minutes(m);
                let e = explained(&i, &facts(true));
                assert_eq!(e.reason, HeadReason::WaitingForWave, "{id} at {m}");
                assert_eq!(
                    e.message,
                    "Matches none of the rollout's waves (ring=canary; region=eu): it stays on 1.2.0 until a promote includes it."
                );
            }
        }
        let old = rel("1.0.0");
        let mut i = input(&all, &head, &base, &r, "x", Some(&old));
        i.labels = &us;
        assert!(
            explained(&i, &facts(true))
                .message
                .contains(": it gets 1.2.0 until a promote includes it."),
        );
    }

    /// Waiting for a later wave names it and when it starts; a wave that
    /// ramps or stops short is named too, with the percent that admits.
    #[test]
    fn wave_explanations_say_when() {
        let (base, head) = (rel("1.2.0"), rel("1.3.0"));
        let all = [base.clone(), head.clone()];
        let r = waves(&[
            ("ring=canary", 100.0, 0.0, 120.0),
            ("region=eu", 40.0, 60.0, 0.0),
            ("", 100.0, 0.0, 0.0),
        ]);
        let eu = labels(&[("region", "eu")]);
        let plan = r.waves.as_ref().unwrap();
        let mut seen = BTreeSet::new();
        for n in 0..300 {
            let id = format!("d{n}");
            let b = bucket(&id, "1.3.0");
            let mut i = input(&all, &head, &base, &r, &id, Some(&base));
            i.labels = &eu;
            let e = explained(&i, &facts(true));
            assert_eq!(e.reason, HeadReason::WaitingForWave, "{id}");
            let (wave, starts) = if admitted(b, 40.0) {
                ("wave 2 of 3 (region=eu)", "2027-01-15 10:00 UTC")
            } else {
                ("wave 3 of 3 (every device)", "2027-01-15 11:00 UTC")
            };
            assert!(e.message.starts_with(&format!("Waits for {wave}, which starts at {starts}: it gets 1.3.0 once that wave reaches ")), "{}", e.message);
            seen.insert(wave);
            // Halfway through wave 2's ramp (20 %): ramping, or stopping short of it.
            i.now = plan.starts_at(1) + Duration::minutes(30);
            let (d, why) = decide_why(&i);
            let e = explain(&i, &d, why, &facts(true));
            if admitted(b, 20.0) {
                assert!(d.update);
            } else if admitted(b, 40.0) {
                assert_eq!(e.reason, HeadReason::OutsideCohort);
                let reaches: f64 = e
                    .message
                    .split("once the wave reaches ")
                    .nth(1)
                    .and_then(|m| m.strip_suffix("%."))
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(
                    admitted(b, reaches) && !admitted(b, reaches - 0.01),
                    "{}",
                    e.message
                );
                assert!(
                    e.message.starts_with(
                        "In wave 2 of 3 (region=eu), which admits 20% of its devices to 1.3.0 now"
                    ),
                    "{}",
                    e.message
                );
            } else {
                assert_eq!(why.rule, Rule::LaterWave, "wave 3 will take it");
            }
        }
        assert_eq!(seen.len(), 2);
        let starts = plan.starts_at(1);
        assert_eq!(starts, now() + Duration::minutes(120));

        // No wave but one that stops at 10 %: outside it for good.
        let short = waves(&[("ring=canary", 10.0, 0.0, 0.0)]);
        let canary = labels(&[("ring", "canary")]);
        let id = (0..)
            .map(|n| format!("d{n}"))
            .find(|id| !admitted(bucket(id, "1.3.0"), 10.0))
            .unwrap();
        let mut i = input(&all, &head, &base, &short, &id, Some(&base));
        i.labels = &canary;
        let e = explained(&i, &facts(true));
        assert_eq!(e.reason, HeadReason::OutsideCohort);
        assert_eq!(
            e.message,
            "Outside the 10% of devices wave 1 of 1 (ring=canary) admits to 1.3.0, and no other wave includes it: it stays on 1.2.0 until a promote includes it."
        );
        // Paused waves say paused, as a paused percent does.
        let mut paused = r.clone();
        paused.paused = true;
        let mut i = input(&all, &head, &base, &paused, "x", Some(&base));
        i.labels = &eu;
        assert_eq!(explained(&i, &facts(true)).reason, HeadReason::Paused);
    }
}
