//! A channel's state and every change to it, as methods of one value with no
//! database and no HTTP: promote (at a percent or in waves), percent, ramp,
//! pause, resume, the gate's settings, the reboot policy, the health gate's
//! halt and rollback. The handlers in
//! `channels.rs` load the state, call one of these, store the result and
//! record the change; `rollout::decide` reads the state to answer devices.
//!
//! Two promises hold for every sequence of these changes (the property test
//! below checks both over random sequences):
//! - **the base is a release the channel rolled out fully**: a promote makes
//!   the old head the base only when the head was in force for every device
//!   (100 %, or in waves a wave of every device at 100 %; not paused); over
//!   an unfinished rollout the base stays, so the
//!   devices it had not reached stay where they were instead of jumping to a
//!   half-tested release;
//! - **no device is moved down without a rollback**: only [`ChannelState::rollback`]
//!   marks the channel rolled back, the one state in which `decide` offers a
//!   device an older release than it runs (pins aside).

use super::policy::{RebootPolicy, RebootPolicySpec, WavePlan, WaveSpec};
use super::rollout::{
    Gate, Ramp, Rollout, effective_percent, fmt_percent, gate_tripped, wave_standing,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

/// A release a channel points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseRef {
    /// Its id.
    pub id: Uuid,
    /// Its version.
    pub version: String,
}

/// What resolve and the transitions need of a channel.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelState {
    /// The release admitted devices get.
    pub head: Option<ReleaseRef>,
    /// The release the channel last rolled out fully: what devices outside
    /// the rollout get.
    pub base: Option<ReleaseRef>,
    /// Percent, ramp or waves, and pause.
    pub rollout: Rollout,
    /// Why the rollout is paused (a person, or the health gate).
    pub paused_reason: Option<String>,
    /// The head was set by a rollback: devices may move down to it.
    pub rolled_back: bool,
    /// The health gate's settings.
    pub gate: Gate,
    /// Maintenance windows and reboot leases.
    pub reboot: RebootPolicy,
}

/// A change the rules refuse, with a message that says what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// A linear ramp as asked for.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RampSpec {
    /// The percent the ramp ends at.
    pub to_percent: f64,
    /// How long it takes, in minutes.
    pub over_minutes: f64,
}

/// The gate's settings as asked for.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GateSpec {
    /// Halt above this share of failures (0–100).
    pub max_failure_percent: f64,
    /// Judge only once this many devices reported (≥ 1).
    pub min_reports: i64,
}

/// What a promote does to a channel, said before (`dry_run`) or after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PromotePlan {
    /// The head before the promote.
    pub previous_head: Option<String>,
    /// The base after it: what devices outside the rollout run.
    pub base: Option<String>,
    /// The previous head when its rollout was unfinished (below 100 % or
    /// paused): it does not become the base; devices already on it keep it
    /// until the new head reaches them.
    pub interrupted: Option<String>,
    /// What the promote does, in words.
    pub message: String,
}

/// Rejects a percent outside 0–100.
pub fn check_percent(p: f64) -> Result<(), Refused> {
    if !(0.0..=100.0).contains(&p) {
        return Err(Refused(format!(
            "percent {p} is out of range: use 0 to 100"
        )));
    }
    Ok(())
}

fn check_ramp(r: &RampSpec, from: f64) -> Result<(), Refused> {
    check_percent(r.to_percent)?;
    if r.to_percent < from {
        return Err(Refused(format!(
            "a ramp only raises the percent: to_percent {} is below the current {}; set `percent` to lower it",
            r.to_percent,
            fmt_percent(from)
        )));
    }
    if !(r.over_minutes > 0.0 && r.over_minutes <= 525_600.0) {
        return Err(Refused(
            "ramp over_minutes must be above 0 and at most a year (525600)".into(),
        ));
    }
    Ok(())
}

fn or_none(r: Option<&ReleaseRef>) -> &str {
    r.map_or("none", |r| r.version.as_str())
}

/// The waves in words: `ring=canary at 100 % (ramp 60 min, hold 120 min),
/// then every device at 100 %`.
fn describe_waves(plan: &WavePlan) -> String {
    let wave = |w: &super::policy::Wave| {
        let mut s = format!("{} at {} %", w.selector.describe(), fmt_percent(w.percent));
        let timing: Vec<String> = [("ramp", w.ramp_minutes), ("hold", w.hold_minutes)]
            .into_iter()
            .filter(|(_, m)| *m > 0.0)
            .map(|(what, m)| format!("{what} {} min", fmt_percent(m)))
            .collect();
        if !timing.is_empty() {
            s += &format!(" ({})", timing.join(", "));
        }
        s
    };
    plan.waves
        .iter()
        .map(wave)
        .collect::<Vec<_>>()
        .join(", then ")
}

impl ChannelState {
    /// Whether the head is in force for every device, not paused: at 100 %,
    /// or, in waves, once a wave of every device reached 100 %.
    pub fn fully_rolled_out(&self, now: OffsetDateTime) -> bool {
        self.head.is_some()
            && !self.rollout.paused
            && match &self.rollout.waves {
                Some(plan) => plan.reaches_everyone(now),
                None => effective_percent(&self.rollout, now) >= 100.0,
            }
    }

    /// How far the head's rollout got, in words: `at 26 %`, `paused at 26 %:
    /// …`, `in wave 2 of 3 at 40 %`.
    fn standing(&self, now: OffsetDateTime) -> String {
        let at = match wave_standing(&self.rollout, now) {
            Some(w) => format!(
                "in wave {} of {} at {} %",
                w.index + 1,
                self.rollout.waves.as_ref().map_or(0, |p| p.waves.len()),
                fmt_percent(w.percent)
            ),
            None => format!(
                "at {} %",
                fmt_percent(effective_percent(&self.rollout, now))
            ),
        };
        match (&self.rollout.paused, &self.paused_reason) {
            (true, Some(why)) => format!("paused {at}: {why}"),
            (true, None) => format!("paused {at}"),
            (false, _) => at,
        }
    }

    /// Makes `to` the head at `percent`, optionally ramping up from there,
    /// and resumes the rollout; waves in force end. The old head becomes
    /// the base only if it was fully rolled out; otherwise the base stays
    /// (see the module's promises). Promoting the head again only sets its
    /// rollout.
    pub fn promote(
        &mut self,
        to: ReleaseRef,
        percent: f64,
        ramp: Option<&RampSpec>,
        now: OffsetDateTime,
    ) -> Result<PromotePlan, Refused> {
        check_percent(percent)?;
        if let Some(r) = ramp {
            check_ramp(r, percent)?;
        }
        let rollout = Rollout {
            percent,
            ramp: ramp.map(|r| Ramp {
                from: percent,
                to: r.to_percent,
                started_at: now,
                over_minutes: r.over_minutes,
            }),
            paused: false,
            paused_at: None,
            waves: None,
        };
        let mut share = format!("at {} %", fmt_percent(percent));
        if let Some(r) = ramp {
            share += &format!(
                ", ramping to {} % over {} min",
                fmt_percent(r.to_percent),
                fmt_percent(r.over_minutes)
            );
        }
        Ok(self.make_head(to, rollout, &share, "devices outside that share", now))
    }

    /// Makes `to` the head rolled out in `waves` (by label selector, each
    /// with its percent, ramp and hold), the first starting `now`, and
    /// resumes the rollout; the base and an interrupted head are handled as
    /// [`ChannelState::promote`] handles them. Promoting the head again
    /// starts its waves over.
    pub fn promote_in_waves(
        &mut self,
        to: ReleaseRef,
        waves: &[WaveSpec],
        now: OffsetDateTime,
    ) -> Result<PromotePlan, Refused> {
        let plan = WavePlan::new(waves, now)?;
        let share = format!(
            "in {} wave{}: {}",
            plan.waves.len(),
            if plan.waves.len() == 1 { "" } else { "s" },
            describe_waves(&plan)
        );
        let everyone = plan
            .waves
            .iter()
            .any(|w| w.selector.is_everyone() && w.percent >= 100.0);
        let rollout = Rollout {
            percent: 0.0,
            ramp: None,
            paused: false,
            paused_at: None,
            waves: Some(plan),
        };
        let mut promoted = self.make_head(
            to,
            rollout,
            &share,
            "devices the waves have not reached",
            now,
        );
        if !everyone {
            promoted.message +=
                " No wave reaches every device at 100 %: promote again to roll it out to the rest.";
        }
        Ok(promoted)
    }

    /// What both promotes share, once their rollout is checked: the head,
    /// the base, the interrupted head and the plan in words (`share` says
    /// how the head goes out, `outside` who does not have it yet).
    fn make_head(
        &mut self,
        to: ReleaseRef,
        rollout: Rollout,
        share: &str,
        outside: &str,
        now: OffsetDateTime,
    ) -> PromotePlan {
        let previous = self.head.clone();
        let mut interrupted = None;
        let same = previous.as_ref().is_some_and(|p| p.id == to.id);
        // After a rollback the head is also the base: nothing is interrupted.
        let head_is_base = previous.is_some() && previous == self.base;
        if !same {
            if let Some(prev) = &previous {
                if self.fully_rolled_out(now) || head_is_base {
                    self.base = Some(prev.clone());
                } else {
                    interrupted = Some((prev.version.clone(), self.standing(now)));
                }
            }
            self.head = Some(to.clone());
        }
        self.rollout = rollout;
        self.paused_reason = None;
        self.rolled_back = false;

        let base = or_none(self.base.as_ref());
        let outside = match &self.base {
            Some(b) => format!("{outside} get {}", b.version),
            None => format!("{outside} keep what they run"),
        };
        let v = &to.version;
        let message = match (&previous, &interrupted) {
            (None, _) => format!("{v} becomes the channel's first head {share}; {outside}."),
            (Some(_), _) if same => {
                format!("{v} stays the head, now {share}; the base stays {base}.")
            }
            (Some(_), None) if head_is_base => {
                format!("{v} becomes the head {share}; the base stays {base}: {outside}.")
            }
            (Some(p), None) => format!(
                "{v} becomes the head {share}; {}, fully rolled out, becomes the base: {outside}.",
                p.version
            ),
            (Some(p), Some((_, how))) => format!(
                "{v} becomes the head {share}. {} was not fully rolled out ({how}), so {}: {outside}, and devices already on {} keep it until {v} reaches them.",
                p.version,
                match &self.base {
                    Some(b) => format!("the base stays {}", b.version),
                    None => "the channel still has no base".into(),
                },
                p.version
            ),
        };
        PromotePlan {
            previous_head: previous.map(|p| p.version),
            base: self.base.as_ref().map(|b| b.version.clone()),
            interrupted: interrupted.map(|(v, _)| v),
            message,
        }
    }

    /// Refuses a percent or a ramp while waves are in force: the waves
    /// decide who gets the head, and a promote says how to replace them.
    fn check_no_waves(&self, what: &str) -> Result<(), Refused> {
        if self.rollout.waves.is_none() {
            return Ok(());
        }
        let head = or_none(self.head.as_ref());
        Err(Refused(format!(
            "the rollout of {head} goes in waves, which a {what} cannot change: promote {head} again with a percent (or with new waves)"
        )))
    }

    /// Sets the percent by hand; a ramp in force ends. Refused while waves
    /// are in force (a percent would silently drop them): promote again.
    pub fn set_percent(&mut self, percent: f64) -> Result<(), Refused> {
        check_percent(percent)?;
        self.check_no_waves("percent")?;
        self.rollout.percent = percent;
        self.rollout.ramp = None;
        Ok(())
    }

    /// Ramps from the percent in force now up to `r.to_percent`. Set while
    /// paused, the ramp starts when the rollout resumes. Refused while waves
    /// are in force, as [`ChannelState::set_percent`] is.
    pub fn ramp(&mut self, r: &RampSpec, now: OffsetDateTime) -> Result<(), Refused> {
        self.check_no_waves("ramp")?;
        let from = effective_percent(&self.rollout, now);
        check_ramp(r, from)?;
        let started_at = match (self.rollout.paused, self.rollout.paused_at) {
            (true, Some(at)) => at.min(now),
            _ => now,
        };
        self.rollout.percent = from;
        self.rollout.ramp = Some(Ramp {
            from,
            to: r.to_percent,
            started_at,
            over_minutes: r.over_minutes,
        });
        Ok(())
    }

    /// Admits no new device to the head; answers false when already paused.
    pub fn pause(&mut self, reason: String, now: OffsetDateTime) -> bool {
        if self.rollout.paused {
            return false;
        }
        self.rollout.paused = true;
        self.rollout.paused_at = Some(now);
        self.paused_reason = Some(reason);
        true
    }

    /// Resumes a paused rollout; a ramp or the waves continue where they
    /// stood. Answers false when it was not paused.
    pub fn resume(&mut self, now: OffsetDateTime) -> bool {
        if !self.rollout.paused {
            return false;
        }
        // Ramp and waves stood still while paused: move their start forward by that time.
        if let Some(paused_at) = self.rollout.paused_at {
            let paused_for = now - paused_at.min(now);
            if let Some(ramp) = &mut self.rollout.ramp {
                ramp.started_at += paused_for;
            }
            if let Some(plan) = &mut self.rollout.waves {
                plan.started_at += paused_for;
            }
        }
        self.rollout.paused = false;
        self.rollout.paused_at = None;
        self.paused_reason = None;
        true
    }

    /// Changes the health gate's settings.
    pub fn set_gate(&mut self, g: &GateSpec) -> Result<(), Refused> {
        if !(0.0..=100.0).contains(&g.max_failure_percent)
            || g.min_reports < 1
            || g.min_reports > i64::from(i32::MAX)
        {
            return Err(Refused(
                "gate: max_failure_percent must be 0–100 and min_reports at least 1".into(),
            ));
        }
        self.gate = Gate {
            max_failure_percent: g.max_failure_percent,
            min_reports: g.min_reports,
        };
        Ok(())
    }

    /// Sets the maintenance windows and reboot leases.
    pub fn set_reboot_policy(&mut self, spec: &RebootPolicySpec) -> Result<(), Refused> {
        self.reboot = RebootPolicy::new(spec)?;
        Ok(())
    }

    /// Whether the health gate has a rollout to halt: a head, not paused.
    /// The handler asks before it counts reports.
    pub fn gate_watches(&self) -> bool {
        self.head.is_some() && !self.rollout.paused
    }

    /// The health gate's judgement on `reports` outcomes on the head, of
    /// which `failures` failed: pauses the rollout when the gate trips and
    /// answers why; nothing happens (and `None`) when it does not, or when
    /// the rollout is already paused or has no head.
    pub fn gate_halt(
        &mut self,
        reports: i64,
        failures: i64,
        now: OffsetDateTime,
    ) -> Option<String> {
        if !self.gate_watches() || !gate_tripped(self.gate, reports, failures) {
            return None;
        }
        let head = self.head.as_ref()?;
        let reason = format!(
            "health gate: {failures} of {reports} devices ({:.1}%) failed or rolled back on {}, above the limit of {}%",
            failures as f64 * 100.0 / reports as f64,
            head.version,
            fmt_percent(self.gate.max_failure_percent)
        );
        self.pause(reason.clone(), now);
        Some(reason)
    }

    /// Rolls back to `to`: it becomes head and base at 100 %, without ramp,
    /// waves or pause, and the channel is marked rolled back, so devices on newer
    /// versions move down to it. Answers the change in words.
    pub fn rollback(&mut self, to: ReleaseRef) -> String {
        let reason = format!(
            "rolled back from {} to {}",
            self.head.as_ref().map_or("(none)", |h| h.version.as_str()),
            to.version
        );
        self.head = Some(to.clone());
        self.base = Some(to);
        self.rollout = Rollout {
            percent: 100.0,
            ramp: None,
            paused: false,
            paused_at: None,
            waves: None,
        };
        self.paused_reason = None;
        self.rolled_back = true;
        reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::policy::Labels;
    use crate::rules::rollout::{Input, Rel, Rule, decide, decide_why};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use semver::Version;
    use std::collections::{BTreeSet, HashMap};
    use time::Duration;

    fn t0() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    fn rel(v: &str) -> ReleaseRef {
        // One id per version, so the same version is the same release.
        let mut id = [0u8; 16];
        for (i, b) in v.bytes().enumerate().take(16) {
            id[i] = b;
        }
        ReleaseRef {
            id: Uuid::from_bytes(id),
            version: v.into(),
        }
    }

    fn empty() -> ChannelState {
        ChannelState {
            head: None,
            base: None,
            rollout: Rollout {
                percent: 0.0,
                ramp: None,
                paused: false,
                paused_at: None,
                waves: None,
            },
            paused_reason: None,
            rolled_back: false,
            gate: Gate {
                max_failure_percent: 20.0,
                min_reports: 10,
            },
            reboot: RebootPolicy::default(),
        }
    }

    /// Head `head` at `percent` over base `base`.
    fn at(head: &str, percent: f64, base: Option<&str>) -> ChannelState {
        let mut s = empty();
        s.head = Some(rel(head));
        s.base = base.map(rel);
        s.rollout.percent = percent;
        s
    }

    fn ramp(to: f64, over: f64) -> RampSpec {
        RampSpec {
            to_percent: to,
            over_minutes: over,
        }
    }

    fn versions(s: &ChannelState) -> (Option<&str>, Option<&str>) {
        (
            s.head.as_ref().map(|r| r.version.as_str()),
            s.base.as_ref().map(|r| r.version.as_str()),
        )
    }

    /// Promote over each standing of the previous head: which release the
    /// base is afterwards, and what the plan says.
    #[test]
    fn promote_keeps_the_base_over_an_unfinished_rollout() {
        let paused = {
            let mut s = at("1.2.0", 100.0, Some("1.1.0"));
            s.pause("health gate: 4 of 10 failed".into(), t0());
            s
        };
        let ramping = {
            let mut s = at("1.2.0", 10.0, Some("1.1.0"));
            s.ramp(&ramp(100.0, 60.0), t0()).unwrap();
            s
        };
        let ramped = {
            let mut s = ramping.clone();
            s.rollout.ramp.as_mut().unwrap().started_at -= Duration::hours(2);
            s
        };
        /// (name, before, new head, base after, interrupted, words in the plan)
        type Row<'a> = (
            &'a str,
            ChannelState,
            &'a str,
            Option<&'a str>,
            Option<&'a str>,
            &'a str,
        );
        let rows: Vec<Row> = vec![
            (
                "first promote",
                empty(),
                "1.0.0",
                None,
                None,
                "first head at 20 %; devices outside that share keep what they run",
            ),
            (
                "over a full rollout",
                at("1.2.0", 100.0, Some("1.1.0")),
                "1.4.0",
                Some("1.2.0"),
                None,
                "1.2.0, fully rolled out, becomes the base",
            ),
            (
                "over 26 %",
                at("1.2.0", 26.0, Some("1.1.0")),
                "1.4.0",
                Some("1.1.0"),
                Some("1.2.0"),
                "not fully rolled out (at 26 %), so the base stays 1.1.0: devices outside that share get 1.1.0, and devices already on 1.2.0 keep it",
            ),
            (
                "over a paused 100 %",
                paused,
                "1.4.0",
                Some("1.1.0"),
                Some("1.2.0"),
                "(paused at 100 %: health gate: 4 of 10 failed)",
            ),
            (
                "over a ramp under way",
                ramping,
                "1.4.0",
                Some("1.1.0"),
                Some("1.2.0"),
                "at 10 %",
            ),
            (
                "over a ramp that reached 100 %",
                ramped,
                "1.4.0",
                Some("1.2.0"),
                None,
                "fully rolled out",
            ),
            (
                "over 26 % with no base",
                at("1.2.0", 26.0, None),
                "1.4.0",
                None,
                Some("1.2.0"),
                "so the channel still has no base: devices outside that share keep what they run",
            ),
            (
                "the head again",
                at("1.2.0", 26.0, Some("1.1.0")),
                "1.2.0",
                Some("1.1.0"),
                None,
                "1.2.0 stays the head, now at 20 %; the base stays 1.1.0",
            ),
        ];
        for (name, before, to, base, interrupted, words) in rows {
            let mut s = before.clone();
            let plan = s.promote(rel(to), 20.0, None, t0()).unwrap();
            assert_eq!(versions(&s), (Some(to), base), "{name}");
            assert_eq!(plan.base.as_deref(), base, "{name}");
            assert_eq!(plan.interrupted.as_deref(), interrupted, "{name}");
            assert_eq!(plan.previous_head, before.head.map(|h| h.version), "{name}");
            assert!(plan.message.contains(words), "{name}: {}", plan.message);
            assert!(
                !s.rollout.paused && !s.rolled_back && s.paused_reason.is_none(),
                "{name}"
            );
            assert_eq!(
                (s.rollout.percent, s.rollout.ramp.is_none()),
                (20.0, true),
                "{name}"
            );
        }
    }

    #[test]
    fn refused_changes_leave_the_state_as_it_was() {
        let before = at("1.2.0", 30.0, Some("1.1.0"));
        type Change = Box<dyn Fn(&mut ChannelState) -> Result<(), Refused>>;
        let refused: Vec<(&str, Change, &str)> = vec![
            (
                "percent 101",
                Box::new(|s| s.set_percent(101.0)),
                "out of range",
            ),
            (
                "percent -1",
                Box::new(|s| s.set_percent(-1.0)),
                "out of range",
            ),
            (
                "percent NaN",
                Box::new(|s| s.set_percent(f64::NAN)),
                "out of range",
            ),
            (
                "promote at 150",
                Box::new(|s| s.promote(rel("1.3.0"), 150.0, None, t0()).map(drop)),
                "out of range",
            ),
            (
                "promote ramping down",
                Box::new(|s| {
                    s.promote(rel("1.3.0"), 50.0, Some(&ramp(40.0, 10.0)), t0())
                        .map(drop)
                }),
                "only raises",
            ),
            (
                "ramp below the percent",
                Box::new(|s| s.ramp(&ramp(20.0, 10.0), t0())),
                "below the current 30",
            ),
            (
                "ramp over 0 min",
                Box::new(|s| s.ramp(&ramp(50.0, 0.0), t0())),
                "above 0",
            ),
            (
                "ramp over NaN min",
                Box::new(|s| s.ramp(&ramp(50.0, f64::NAN), t0())),
                "above 0",
            ),
            (
                "ramp to 101",
                Box::new(|s| s.ramp(&ramp(101.0, 5.0), t0())),
                "out of range",
            ),
            (
                "gate 0 reports",
                Box::new(|s| {
                    s.set_gate(&GateSpec {
                        max_failure_percent: 20.0,
                        min_reports: 0,
                    })
                }),
                "at least 1",
            ),
            (
                "gate 120 %",
                Box::new(|s| {
                    s.set_gate(&GateSpec {
                        max_failure_percent: 120.0,
                        min_reports: 5,
                    })
                }),
                "0–100",
            ),
        ];
        for (name, change, words) in refused {
            let mut s = before.clone();
            let e = change(&mut s).expect_err(name);
            assert!(e.0.contains(words), "{name}: {e}");
            assert_eq!(s, before, "{name} changed the state");
        }
    }

    #[test]
    fn pause_resume_and_ramps_keep_time() {
        let mut s = at("1.2.0", 10.0, Some("1.1.0"));
        s.ramp(&ramp(70.0, 60.0), t0()).unwrap();
        let p = |s: &ChannelState, min: i64| {
            effective_percent(&s.rollout, t0() + Duration::minutes(min))
        };
        assert_eq!(p(&s, 30), 40.0);
        assert!(s.pause("by hand".into(), t0() + Duration::minutes(30)));
        assert!(
            !s.pause("again".into(), t0() + Duration::minutes(31)),
            "already paused"
        );
        assert_eq!(s.paused_reason.as_deref(), Some("by hand"));
        assert_eq!(p(&s, 50), 40.0, "a paused ramp stands still");
        assert!(s.resume(t0() + Duration::minutes(50)));
        assert!(!s.resume(t0() + Duration::minutes(51)), "not paused");
        assert_eq!(p(&s, 60), 50.0, "it continues where it stood");
        assert_eq!(p(&s, 200), 70.0);

        // A ramp set while paused starts when the rollout resumes.
        let mut s = at("1.2.0", 10.0, Some("1.1.0"));
        s.pause("by hand".into(), t0());
        s.ramp(&ramp(70.0, 60.0), t0() + Duration::minutes(20))
            .unwrap();
        assert_eq!(p(&s, 40), 10.0);
        s.resume(t0() + Duration::minutes(40));
        assert_eq!(p(&s, 70), 40.0);

        // Setting the percent ends the ramp.
        s.set_percent(25.0).unwrap();
        assert_eq!((p(&s, 500), s.rollout.ramp.is_none()), (25.0, true));
    }

    #[test]
    fn the_gate_halts_once_with_its_reason() {
        let mut s = at("1.2.0", 50.0, Some("1.1.0"));
        assert_eq!(s.gate_halt(9, 9, t0()), None, "too few reports");
        assert_eq!(s.gate_halt(10, 2, t0()), None, "20 % is not above 20 %");
        let why = s.gate_halt(10, 3, t0()).expect("30 % trips it");
        assert!(
            why.contains(
                "3 of 10 devices (30.0%) failed or rolled back on 1.2.0, above the limit of 20%"
            ),
            "{why}"
        );
        assert!(s.rollout.paused);
        assert_eq!(s.paused_reason.as_deref(), Some(why.as_str()));
        assert_eq!(s.gate_halt(10, 9, t0()), None, "already paused: halts once");
        assert_eq!(
            empty().gate_halt(10, 9, t0()),
            None,
            "no head, nothing to halt"
        );
    }

    #[test]
    fn rollback_makes_the_target_head_and_base() {
        let mut s = at("1.2.0", 30.0, Some("1.1.0"));
        s.pause("gate".into(), t0());
        s.ramp(&ramp(80.0, 10.0), t0()).unwrap();
        let why = s.rollback(rel("1.1.0"));
        assert_eq!(why, "rolled back from 1.2.0 to 1.1.0");
        assert_eq!(versions(&s), (Some("1.1.0"), Some("1.1.0")));
        assert!(s.rolled_back && !s.rollout.paused && s.rollout.ramp.is_none());
        assert_eq!(s.rollout.percent, 100.0);
        // Lowering the percent afterwards offers nobody the release rolled back from.
        s.set_percent(10.0).unwrap();
        assert_eq!(versions(&s).1, Some("1.1.0"));
        // The next promote builds on it, even below 100 %: it is the base.
        let plan = s.promote(rel("1.3.0"), 10.0, None, t0()).unwrap();
        assert_eq!(
            (plan.base.as_deref(), plan.interrupted),
            (Some("1.1.0"), None)
        );
        assert!(
            plan.message
                .contains("the base stays 1.1.0: devices outside that share get 1.1.0"),
            "{}",
            plan.message
        );
        assert!(!s.rolled_back);
    }

    fn wave(selector: &str, percent: f64, ramp: f64, hold: f64) -> WaveSpec {
        WaveSpec {
            selector: selector.into(),
            percent,
            ramp_minutes: ramp,
            hold_minutes: hold,
        }
    }

    /// Canaries at once, held an hour; then everyone over two hours.
    fn two_waves() -> Vec<WaveSpec> {
        vec![
            wave("ring=canary", 100.0, 0.0, 60.0),
            wave("", 100.0, 120.0, 0.0),
        ]
    }

    fn mins(m: i64) -> OffsetDateTime {
        t0() + Duration::minutes(m)
    }

    /// Promote in waves over each standing of the previous head, as
    /// `promote` does: a head rolled out to everyone becomes the base, an
    /// unfinished one (at a percent or in waves) is interrupted.
    #[test]
    fn promote_in_waves_keeps_the_base_over_an_unfinished_rollout() {
        let mut s = at("1.2.0", 100.0, Some("1.1.0"));
        let plan = s
            .promote_in_waves(rel("1.4.0"), &two_waves(), t0())
            .unwrap();
        assert_eq!(versions(&s), (Some("1.4.0"), Some("1.2.0")));
        assert_eq!(
            (plan.base.as_deref(), plan.interrupted),
            (Some("1.2.0"), None)
        );
        assert_eq!(
            plan.message,
            "1.4.0 becomes the head in 2 waves: ring=canary at 100 % (hold 60 min), then every device at 100 % (ramp 120 min); 1.2.0, fully rolled out, becomes the base: devices the waves have not reached get 1.2.0."
        );
        assert_eq!(s.rollout.waves.as_ref().unwrap().started_at, t0());
        assert!(!s.fully_rolled_out(mins(179)));
        assert!(s.fully_rolled_out(mins(180)));

        // Over waves under way: interrupted, the base stays.
        let mut waving = s.clone();
        let plan = waving
            .promote_in_waves(rel("1.5.0"), &two_waves(), mins(30))
            .unwrap();
        assert_eq!(versions(&waving), (Some("1.5.0"), Some("1.2.0")));
        assert_eq!(plan.interrupted.as_deref(), Some("1.4.0"));
        assert!(
            plan.message.contains(
                "1.4.0 was not fully rolled out (in wave 1 of 2 at 100 %), so the base stays 1.2.0"
            ),
            "{}",
            plan.message
        );

        // Over waves that reached everyone but were halted: interrupted.
        let mut halted = s.clone();
        assert!(halted.gate_halt(10, 9, mins(200)).is_some());
        let plan = halted.promote(rel("1.5.0"), 10.0, None, mins(300)).unwrap();
        assert_eq!(plan.interrupted.as_deref(), Some("1.4.0"));
        assert!(
            plan.message
                .contains("(paused in wave 2 of 2 at 100 %: health gate"),
            "{}",
            plan.message
        );

        // Over waves that reached everyone: a plain promote makes it the base
        // and ends the waves.
        let plan = s.promote(rel("1.5.0"), 10.0, None, mins(200)).unwrap();
        assert_eq!(
            (plan.base.as_deref(), plan.interrupted),
            (Some("1.4.0"), None)
        );
        assert!(s.rollout.waves.is_none());

        // Over 26 %: interrupted.
        let mut s = at("1.2.0", 26.0, Some("1.1.0"));
        let plan = s
            .promote_in_waves(rel("1.4.0"), &two_waves(), t0())
            .unwrap();
        assert_eq!(
            (plan.base.as_deref(), plan.interrupted.as_deref()),
            (Some("1.1.0"), Some("1.2.0"))
        );
        // The same head again starts its waves over.
        let plan = s
            .promote_in_waves(
                rel("1.4.0"),
                &[wave("ring=canary", 50.0, 0.0, 0.0)],
                mins(10),
            )
            .unwrap();
        assert_eq!(versions(&s), (Some("1.4.0"), Some("1.1.0")));
        assert_eq!(
            plan.message,
            "1.4.0 stays the head, now in 1 wave: ring=canary at 50 %; the base stays 1.1.0. No wave reaches every device at 100 %: promote again to roll it out to the rest."
        );
        assert_eq!(s.rollout.waves.as_ref().unwrap().started_at, mins(10));
        // A rollback ends the waves too.
        s.rollback(rel("1.1.0"));
        assert!(s.rollout.waves.is_none() && s.rolled_back);
    }

    /// While waves are in force, a percent or a ramp is refused with what to
    /// do instead; refused waves and reboot policies change nothing.
    #[test]
    fn waves_refuse_a_percent_and_bad_changes_change_nothing() {
        let mut waving = at("1.2.0", 100.0, Some("1.1.0"));
        waving
            .promote_in_waves(rel("1.3.0"), &two_waves(), t0())
            .unwrap();
        type Change = Box<dyn Fn(&mut ChannelState) -> Result<(), Refused>>;
        let refused: Vec<(&str, Change, &str)> = vec![
            (
                "percent",
                Box::new(|s| s.set_percent(50.0)),
                "the rollout of 1.3.0 goes in waves, which a percent cannot change: promote 1.3.0 again with a percent (or with new waves)",
            ),
            (
                "ramp",
                Box::new(|s| s.ramp(&ramp(100.0, 10.0), t0())),
                "which a ramp cannot change",
            ),
            (
                "no waves",
                Box::new(|s| s.promote_in_waves(rel("1.4.0"), &[], t0()).map(drop)),
                "1 to 16 waves, not 0",
            ),
            (
                "a bad wave",
                Box::new(|s| {
                    s.promote_in_waves(
                        rel("1.4.0"),
                        &[wave("", 100.0, 0.0, 0.0), wave("ring", 5.0, 0.0, 0.0)],
                        t0(),
                    )
                    .map(drop)
                }),
                "wave 2: selector \"ring\"",
            ),
            (
                "a bad window",
                Box::new(|s| {
                    s.set_reboot_policy(&RebootPolicySpec {
                        windows: vec![crate::rules::policy::WindowSpec {
                            days: "Sat".into(),
                            start: "02:00".into(),
                            end: "04:00".into(),
                            time_zone: "Europe/Berln".into(),
                            selector: String::new(),
                        }],
                        lease: None,
                    })
                }),
                "window 1: unknown time zone \"Europe/Berln\"",
            ),
        ];
        for (name, change, words) in refused {
            let mut s = waving.clone();
            let e = change(&mut s).expect_err(name);
            assert!(e.0.contains(words), "{name}: {e}");
            assert_eq!(s, waving, "{name} changed the state");
        }
        let mut s = waving.clone();
        let spec: RebootPolicySpec = serde_json::from_str(
            r#"{"windows": [{"days": "Sat", "start": "02:00", "end": "04:00", "time_zone": "UTC"}], "lease": {"max_devices": 2}}"#,
        )
        .unwrap();
        s.set_reboot_policy(&spec).unwrap();
        assert_eq!((s.reboot.windows.len(), s.reboot.spec()), (1, spec));
    }

    /// Paused waves stand still, and resume where they stood: the devices
    /// admitted when it paused are the ones admitted when it resumes.
    #[test]
    fn paused_waves_resume_where_they_stood() {
        let mut s = at("1.0.0", 100.0, Some("1.0.0"));
        let waves = [
            wave("ring=canary", 100.0, 60.0, 0.0),
            wave("", 100.0, 60.0, 0.0),
        ];
        s.promote_in_waves(rel("1.1.0"), &waves, t0()).unwrap();
        let rels: Vec<Rel> = ["1.0.0", "1.1.0"]
            .iter()
            .map(|v| Rel {
                version: Version::parse(v).unwrap(),
                floor: false,
                revoked: false,
            })
            .collect();
        let canary = Labels::from([("ring".to_string(), "canary".to_string())]);
        let admitted = |s: &ChannelState, now| -> Vec<bool> {
            (0..300)
                .map(|n| {
                    decide(&Input {
                        releases: &rels,
                        head: Some(&rels[1]),
                        base: Some(&rels[0]),
                        rollout: &s.rollout,
                        rolled_back: false,
                        pin: None,
                        device_id: &format!("d{n}"),
                        labels: &canary,
                        current: Some(&rels[0]),
                        now,
                    })
                    .update
                })
                .collect()
        };
        let at_30 = admitted(&s, mins(30));
        let n = at_30.iter().filter(|a| **a).count();
        assert!((100..200).contains(&n), "half the canaries: {n}");
        assert!(s.pause("by hand".into(), mins(30)));
        assert!(
            admitted(&s, mins(400)).iter().all(|a| !a),
            "paused: nobody new"
        );
        assert_eq!(wave_standing(&s.rollout, mins(400)).unwrap().percent, 50.0);
        assert!(!s.fully_rolled_out(mins(400)));
        assert!(s.resume(mins(400)));
        assert_eq!(s.rollout.waves.as_ref().unwrap().started_at, mins(370));
        assert_eq!(admitted(&s, mins(400)), at_30);
        let w = wave_standing(&s.rollout, mins(430)).unwrap();
        assert_eq!((w.index, w.percent, w.next_starts_at), (1, 0.0, None));
        assert!(!s.fully_rolled_out(mins(489)));
        assert!(s.fully_rolled_out(mins(490)));
    }

    /// The releases of the random sequences: versions 1.0.0 to 1.5.0.
    const VERSIONS: [&str; 6] = ["1.0.0", "1.1.0", "1.2.0", "1.3.0", "1.4.0", "1.5.0"];

    /// Random sequences of transitions (promotes at a percent or in random
    /// waves, percents, ramps, pauses, resumes, gate halts, rollbacks and
    /// time passing) over a fleet of simulated devices with random labels
    /// that take what `decide` offers them (most of the time). A refused
    /// change must leave the state as it was. After every step, for every
    /// device:
    /// - a move down is offered only after a rollback, and only to the
    ///   release that rollback went back to;
    /// - a device that is not moving to the head is offered only a release
    ///   the channel had in force for every device (100 %, not paused) or
    ///   went back to by a rollback: never an interrupted head;
    /// - while the head counts as fully rolled out, the device is admitted
    ///   to it, whatever its labels.
    ///
    /// `SLUICE_CHANNEL_CASES` sequences (default 300) from a random seed
    /// (`SLUICE_CHANNEL_SEED` to repeat one); a failure prints its seed and steps.
    #[test]
    fn no_sequence_of_changes_moves_a_device_down_or_onto_an_unfinished_head() {
        let cases: u64 = std::env::var("SLUICE_CHANNEL_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(300);
        let base_seed: u64 = std::env::var("SLUICE_CHANNEL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        let rels: Vec<Rel> = VERSIONS
            .iter()
            .map(|v| Rel {
                version: Version::parse(v).unwrap(),
                floor: false,
                revoked: false,
            })
            .collect();
        for case in 0..cases {
            let seed = base_seed.wrapping_add(case);
            if let Err(trace) = run_sequence(seed, &rels) {
                panic!("seed {seed} (SLUICE_CHANNEL_SEED={seed} SLUICE_CHANNEL_CASES=1):\n{trace}");
            }
        }
    }

    /// One to three waves from a few selectors; now and then a percent the
    /// rules refuse.
    fn random_waves(rng: &mut StdRng) -> Vec<WaveSpec> {
        let selectors = [
            "",
            "ring=canary",
            "region=eu",
            "region!=us",
            "ring=canary,region=eu",
            "ring=beta",
        ];
        (0..rng.gen_range(1..=3))
            .map(|_| WaveSpec {
                selector: selectors[rng.gen_range(0..selectors.len())].into(),
                percent: if rng.gen_bool(0.05) {
                    150.0
                } else {
                    [10.0, 50.0, 100.0][rng.gen_range(0..3)]
                },
                ramp_minutes: [0.0, 30.0, 90.0][rng.gen_range(0..3)],
                hold_minutes: [0.0, 20.0, 60.0][rng.gen_range(0..3)],
            })
            .collect()
    }

    fn run_sequence(seed: u64, rels: &[Rel]) -> Result<(), String> {
        let mut rng = StdRng::seed_from_u64(seed);
        let by_version: HashMap<&str, &Rel> = VERSIONS.iter().copied().zip(rels).collect();
        let mut now = t0();
        let mut s = empty();
        // Every device starts on 1.0.0, which the channel had in force everywhere.
        let mut devices: Vec<(String, &str)> =
            (0..60).map(|i| (format!("device-{i}"), "1.0.0")).collect();
        // Random labels, which the random waves select by.
        let device_labels: Vec<Labels> = (0..devices.len())
            .map(|_| {
                let mut l = Labels::new();
                for (key, values) in [("ring", ["canary", "beta"]), ("region", ["eu", "us"])] {
                    if let Some(v) = [Some(values[0]), Some(values[1]), None][rng.gen_range(0..3)] {
                        l.insert(key.into(), v.into());
                    }
                }
                l
            })
            .collect();
        s.promote(rel("1.0.0"), 100.0, None, now).unwrap();
        // What the harness knows independently of the code under test.
        let mut full: BTreeSet<&str> = BTreeSet::from(["1.0.0"]);
        let mut rolled_back_to: Option<&str> = None;
        let mut trace = String::new();
        for step in 0..40 {
            let v = VERSIONS[rng.gen_range(0..VERSIONS.len())];
            let percent = [0.0, 10.0, 26.0, 50.0, 100.0][rng.gen_range(0..5)];
            let before = s.clone();
            let what = match rng.gen_range(0..11) {
                0 | 1 => {
                    let r = rng
                        .gen_bool(0.3)
                        .then(|| ramp(100.0, rng.gen_range(1..120) as f64));
                    let _ = s.promote(rel(v), percent, r.as_ref(), now);
                    rolled_back_to = None;
                    format!(
                        "promote {v} at {percent}{}",
                        if r.is_some() { " ramping" } else { "" }
                    )
                }
                2 => {
                    let ok = s.set_percent(percent).is_ok();
                    if !ok && s != before {
                        return Err(format!("{trace}a refused percent changed the state"));
                    }
                    format!("percent {percent} ({})", if ok { "set" } else { "refused" })
                }
                3 => {
                    let r = ramp(percent, rng.gen_range(1..120) as f64);
                    let ok = s.ramp(&r, now).is_ok();
                    if !ok && s != before {
                        return Err(format!("{trace}a refused ramp changed the state"));
                    }
                    format!("ramp to {percent} ({})", if ok { "set" } else { "refused" })
                }
                9 | 10 => {
                    let waves = random_waves(&mut rng);
                    let ok = s.promote_in_waves(rel(v), &waves, now).is_ok();
                    if ok {
                        rolled_back_to = None;
                    } else if s != before {
                        return Err(format!("{trace}refused waves changed the state"));
                    }
                    let words: Vec<String> = waves
                        .iter()
                        .map(|w| {
                            format!(
                                "[{}] {} % ramp {} hold {}",
                                w.selector, w.percent, w.ramp_minutes, w.hold_minutes
                            )
                        })
                        .collect();
                    format!(
                        "promote {v} in waves {} ({})",
                        words.join(", "),
                        if ok { "set" } else { "refused" }
                    )
                }
                4 => {
                    s.pause("by hand".into(), now);
                    "pause".into()
                }
                5 => {
                    s.resume(now);
                    "resume".into()
                }
                6 => {
                    let halted = s.gate_halt(10, 5, now).is_some();
                    format!("gate ({})", if halted { "halted" } else { "nothing" })
                }
                7 if rng.gen_bool(0.3) => {
                    s.rollback(rel(v));
                    rolled_back_to = Some(v);
                    full.insert(v);
                    format!("rollback to {v}")
                }
                _ => {
                    let m = rng.gen_range(1..90);
                    now += Duration::minutes(m);
                    format!("{m} min pass")
                }
            };
            if s.fully_rolled_out(now) {
                full.insert(
                    VERSIONS
                        .iter()
                        .copied()
                        .find(|x| Some(*x) == versions(&s).0)
                        .unwrap(),
                );
            }
            trace += &format!(
                "{step}: {what} -> head {:?} base {:?} {} {}\n",
                versions(&s).0,
                versions(&s).1,
                match wave_standing(&s.rollout, now) {
                    Some(w) => format!("wave {} at {} %", w.index + 1, fmt_percent(w.percent)),
                    None => format!("{} %", fmt_percent(effective_percent(&s.rollout, now))),
                },
                if s.rollout.paused { "paused" } else { "" }
            );
            let fully = s.fully_rolled_out(now);
            let head = s.head.as_ref().map(|h| by_version[h.version.as_str()]);
            let base = s.base.as_ref().map(|b| by_version[b.version.as_str()]);
            for ((id, current), labels) in devices.iter_mut().zip(&device_labels) {
                let input = Input {
                    releases: rels,
                    head,
                    base,
                    rollout: &s.rollout,
                    rolled_back: s.rolled_back,
                    pin: None,
                    device_id: id,
                    labels,
                    current: Some(by_version[*current]),
                    now,
                };
                let (d, why) = decide_why(&input);
                // "Fully rolled out" must mean every device, whatever its labels.
                if fully && !matches!(why.rule, Rule::OnHead | Rule::Admitted) {
                    return Err(format!(
                        "{trace}{id} ({labels:?}) is not admitted ({why:?}) though the head counts as fully rolled out"
                    ));
                }
                let (Some(target), true) = (d.target, d.update) else {
                    continue;
                };
                let to = VERSIONS
                    .iter()
                    .copied()
                    .find(|x| Version::parse(x).unwrap() == target.version)
                    .unwrap();
                let cur = by_version[*current];
                if target.version < cur.version && rolled_back_to != Some(to) {
                    return Err(format!(
                        "{trace}{id} on {current} offered {to}: a move down without a rollback to it"
                    ));
                }
                if head != Some(target) && !full.contains(to) {
                    return Err(format!(
                        "{trace}{id} on {current} offered {to}, which the channel never had in force for every device"
                    ));
                }
                if rng.gen_bool(0.7) {
                    *current = to;
                }
            }
        }
        Ok(())
    }
}
