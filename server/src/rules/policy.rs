//! Fleet policy as plain functions, with no I/O: label selectors, the
//! waves a rollout proceeds in, weekly maintenance windows in a named time
//! zone, and what a channel's reboot policy tells one device now. The
//! channel's transitions (`channel.rs`) validate and store these; resolve
//! reads them through `rollout::decide` and [`reboot_advice`].

use super::channel::Refused;
use serde::{Deserialize, Serialize};
use sluice_protocol::{RebootAdvice, RebootReason};
use std::collections::BTreeMap;
use time::OffsetDateTime;
use utoipa::ToSchema;

/// A device's labels: `key=value` pairs.
pub type Labels = BTreeMap<String, String>;

/// At most this many labels on a device.
pub const MAX_LABELS: usize = 32;
/// At most this many waves in a rollout.
pub const MAX_WAVES: usize = 16;
/// At most this many maintenance windows in a reboot policy.
pub const MAX_WINDOWS: usize = 32;
/// At most this many terms in a selector.
const MAX_TERMS: usize = 32;
/// A year in minutes: the longest ramp or hold.
const YEAR_MINUTES: f64 = 525_600.0;

/// Text from a request as a message quotes it: at most 64 characters, so a
/// hostile megabyte does not come back in the error.
fn shown(s: &str) -> String {
    let mut t: String = s.chars().take(64).collect();
    if t.len() < s.len() {
        t.push('…');
    }
    format!("{t:?}")
}

/// Checks one label key (see [`check_labels`]).
pub fn check_label_key(key: &str) -> Result<(), Refused> {
    let ok = (1..=63).contains(&key.len())
        && key.as_bytes()[0].is_ascii_alphanumeric()
        && key
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'/' | b'-'));
    if ok {
        return Ok(());
    }
    Err(Refused(format!(
        "label key {} is not valid: use 1 to 63 letters, digits, '.', '_', '/' or '-', starting with a letter or digit (e.g. region)",
        shown(key)
    )))
}

fn check_label_value(key: &str, value: &str) -> Result<(), Refused> {
    let ok = value.len() <= 63
        && value
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        return Ok(());
    }
    Err(Refused(format!(
        "value {} of label {key} is not valid: use up to 63 letters, digits, '.', '_' or '-' (e.g. eu-west)",
        shown(value)
    )))
}

/// Checks labels as a device or an admin gives them: at most 32, keys
/// 1–63 of `[A-Za-z0-9._/-]` starting with a letter or digit, values 0–63
/// of `[A-Za-z0-9._-]`.
pub fn check_labels(labels: &Labels) -> Result<(), Refused> {
    if labels.len() > MAX_LABELS {
        return Err(Refused(format!(
            "{} labels are too many: a device has at most {MAX_LABELS}",
            labels.len()
        )));
    }
    for (k, v) in labels {
        check_label_key(k)?;
        check_label_value(k, v)?;
    }
    Ok(())
}

/// One term of a [`Selector`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Term {
    /// `key=value`: the label is there with this value.
    Is(String, String),
    /// `key!=value`: the label is absent or has another value.
    IsNot(String, String),
}

/// A label selector: `ring=canary,region!=us`, every term must hold; the
/// empty selector matches every device. Kubernetes' equality-based
/// selectors, without set terms.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    /// Its terms.
    pub terms: Vec<Term>,
}

impl Selector {
    /// Parses `key=value,key!=value` (spaces around terms allowed; empty:
    /// every device), with the key and value rules of [`check_labels`].
    /// `key==value` is read as `key=value`.
    pub fn parse(s: &str) -> Result<Selector, Refused> {
        let all = s.trim();
        if all.is_empty() {
            return Ok(Selector::default());
        }
        let refuse = |why: String| Refused(format!("selector {}: {why}", shown(all)));
        let parts: Vec<&str> = all.split(',').collect();
        if parts.len() > MAX_TERMS {
            return Err(refuse(format!("has more than {MAX_TERMS} terms")));
        }
        let mut terms = Vec::with_capacity(parts.len());
        for part in parts {
            let t = part.trim();
            let (key, value, is) = if let Some((k, v)) = t.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = t.split_once('=') {
                (k, v.strip_prefix('=').unwrap_or(v), true)
            } else if t.is_empty() {
                return Err(refuse(
                    "has an empty term: separate terms with one comma, as in ring=canary,region=eu"
                        .into(),
                ));
            } else {
                return Err(refuse(format!(
                    "term {} has no operator: write key=value or key!=value",
                    shown(t)
                )));
            };
            let (key, value) = (key.trim(), value.trim());
            check_label_key(key).map_err(|e| refuse(e.0))?;
            check_label_value(key, value).map_err(|e| refuse(e.0))?;
            let (key, value) = (key.to_string(), value.to_string());
            terms.push(if is {
                Term::Is(key, value)
            } else {
                Term::IsNot(key, value)
            });
        }
        Ok(Selector { terms })
    }

    /// Whether a device with these labels is selected.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.terms.iter().all(|t| match t {
            Term::Is(k, v) => labels.get(k) == Some(v),
            Term::IsNot(k, v) => labels.get(k) != Some(v),
        })
    }

    /// Whether it selects every device.
    pub fn is_everyone(&self) -> bool {
        self.terms.is_empty()
    }

    /// In words: the selector, or `every device` when it is empty.
    pub fn describe(&self) -> String {
        if self.is_everyone() {
            "every device".into()
        } else {
            self.to_string()
        }
    }
}

/// Written back as parsed, `key=value,key!=value` (`""` for everyone).
impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (n, t) in self.terms.iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            match t {
                Term::Is(k, v) => write!(f, "{k}={v}")?,
                Term::IsNot(k, v) => write!(f, "{k}!={v}")?,
            }
        }
        Ok(())
    }
}

/// One wave of a rollout, as asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WaveSpec {
    /// The devices of this wave (`ring=canary`); empty or absent: every device.
    #[serde(default)]
    pub selector: String,
    /// The share of the wave's devices that get the head (default 100).
    #[serde(default = "hundred")]
    pub percent: f64,
    /// Minutes to ramp from 0 to `percent` (default 0: at once).
    #[serde(default)]
    pub ramp_minutes: f64,
    /// Minutes the wave soaks at `percent` before the next wave starts
    /// (default 0). The health gate watches throughout: a halt stops the
    /// waves where they stand.
    #[serde(default)]
    pub hold_minutes: f64,
}

fn hundred() -> f64 {
    100.0
}

/// A wave as the rules use it.
#[derive(Debug, Clone, PartialEq)]
pub struct Wave {
    /// Its devices.
    pub selector: Selector,
    /// The share of them admitted once its ramp ends.
    pub percent: f64,
    /// Its ramp.
    pub ramp_minutes: f64,
    /// Its soak before the next wave.
    pub hold_minutes: f64,
}

/// A rollout in waves: wave `i` starts once every wave before it ramped and
/// held; a device gets the head when its bucket is inside the highest
/// percent in force of the waves it matches. The clock is the channel's:
/// it stands still while the rollout is paused (like a ramp's).
#[derive(Debug, Clone, PartialEq)]
pub struct WavePlan {
    /// The waves, in order.
    pub waves: Vec<Wave>,
    /// When the first wave started (moved forward by time spent paused).
    pub started_at: OffsetDateTime,
}

/// Where a plan stands at a moment.
#[derive(Debug, Clone, PartialEq)]
pub struct WaveStanding {
    /// The wave that ramps or holds now (the last one once all are done).
    pub index: usize,
    /// Its percent in force now.
    pub percent: f64,
    /// When the next wave starts (none after the last).
    pub next_starts_at: Option<OffsetDateTime>,
    /// Every wave ramped and held: the plan is done.
    pub done: bool,
}

fn check_minutes(what: &str, m: f64) -> Result<(), String> {
    if (0.0..=YEAR_MINUTES).contains(&m) {
        return Ok(());
    }
    Err(format!(
        "{what} {m} is out of range: use 0 to 525600 (a year)"
    ))
}

impl WavePlan {
    /// Parses and checks the waves asked for (1–16 waves, percent 0–100,
    /// minutes 0 up to a year, valid selectors), starting at `started_at`.
    pub fn new(specs: &[WaveSpec], started_at: OffsetDateTime) -> Result<WavePlan, Refused> {
        if specs.is_empty() || specs.len() > MAX_WAVES {
            return Err(Refused(format!(
                "a rollout has 1 to {MAX_WAVES} waves, not {}: list them in order, e.g. [{{\"selector\": \"ring=canary\"}}, {{\"selector\": \"\"}}]",
                specs.len()
            )));
        }
        let mut waves = Vec::with_capacity(specs.len());
        for (n, w) in specs.iter().enumerate() {
            let refuse = |why: String| Refused(format!("wave {}: {why}", n + 1));
            if !(0.0..=100.0).contains(&w.percent) {
                return Err(refuse(format!(
                    "percent {} is out of range: use 0 to 100",
                    w.percent
                )));
            }
            check_minutes("ramp_minutes", w.ramp_minutes).map_err(refuse)?;
            check_minutes("hold_minutes", w.hold_minutes).map_err(refuse)?;
            waves.push(Wave {
                selector: Selector::parse(&w.selector).map_err(|e| refuse(e.0))?,
                percent: w.percent,
                ramp_minutes: w.ramp_minutes,
                hold_minutes: w.hold_minutes,
            });
        }
        Ok(WavePlan { waves, started_at })
    }

    /// The waves as asked for (what the database and the API hold).
    pub fn specs(&self) -> Vec<WaveSpec> {
        self.waves
            .iter()
            .map(|w| WaveSpec {
                selector: w.selector.to_string(),
                percent: w.percent,
                ramp_minutes: w.ramp_minutes,
                hold_minutes: w.hold_minutes,
            })
            .collect()
    }

    /// The percent in force for wave `i` at `at` (0 before it starts).
    pub fn wave_percent(&self, i: usize, at: OffsetDateTime) -> f64 {
        let Some(w) = self.waves.get(i) else {
            return 0.0;
        };
        let start = self.starts_at(i);
        if at < start {
            return 0.0;
        }
        if w.ramp_minutes <= 0.0 {
            return w.percent;
        }
        let minutes = (at - start).as_seconds_f64() / 60.0;
        w.percent * (minutes / w.ramp_minutes).clamp(0.0, 1.0)
    }

    /// The percent in force for a device with `labels` at `at`: the highest
    /// of the waves it matches; 0 when it matches none.
    pub fn percent_for(&self, labels: &Labels, at: OffsetDateTime) -> f64 {
        (0..self.waves.len())
            .filter(|&i| self.waves[i].selector.matches(labels))
            .map(|i| self.wave_percent(i, at))
            .fold(0.0, f64::max)
    }

    /// The first wave a device with `labels` matches, if any.
    pub fn wave_of(&self, labels: &Labels) -> Option<usize> {
        self.waves.iter().position(|w| w.selector.matches(labels))
    }

    /// When wave `i` starts; `starts_at(waves.len())` is when the last one
    /// has ramped and held.
    pub fn starts_at(&self, i: usize) -> OffsetDateTime {
        let minutes: f64 = self
            .waves
            .iter()
            .take(i)
            .map(|w| w.ramp_minutes + w.hold_minutes)
            .sum();
        // Checked by `new`: at most 16 waves of two years each.
        let offset =
            time::Duration::checked_seconds_f64(minutes * 60.0).unwrap_or(time::Duration::MAX);
        self.started_at.saturating_add(offset)
    }

    /// Where the plan stands at `at`.
    pub fn standing(&self, at: OffsetDateTime) -> WaveStanding {
        let n = self.waves.len();
        let index = (0..n).rev().find(|&i| self.starts_at(i) <= at).unwrap_or(0);
        WaveStanding {
            index,
            percent: self.wave_percent(index, at),
            next_starts_at: (index + 1 < n).then(|| self.starts_at(index + 1)),
            done: at >= self.starts_at(n),
        }
    }

    /// Whether every device gets the head at `at`: a wave that selects
    /// every device (usually the last) reached 100 %.
    pub fn reaches_everyone(&self, at: OffsetDateTime) -> bool {
        (0..self.waves.len())
            .any(|i| self.waves[i].selector.is_everyone() && self.wave_percent(i, at) >= 100.0)
    }
}

/// A weekly maintenance window, as asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    /// Days it opens on: `Sat`, `Mon-Fri`, `Sat,Sun`, `daily` (English
    /// three-letter names, any case; a range may wrap, as in `Fri-Mon`).
    pub days: String,
    /// Local time it opens, `HH:MM`.
    pub start: String,
    /// Local time it closes, `HH:MM` (or `24:00`); at or before `start`:
    /// the next day.
    pub end: String,
    /// The IANA time zone the times are in (`Europe/Berlin`, `UTC`).
    pub time_zone: String,
    /// The devices it applies to (`region=eu`); empty or absent: every device.
    #[serde(default)]
    pub selector: String,
}

/// A maintenance window as the rules use it. Local times follow the zone's
/// daylight-saving changes: a start that does not exist that day (the
/// hour skipped in spring) opens at the first minute after the gap; a start
/// that exists twice (the hour repeated in autumn) opens at the first of
/// them; the window then lasts until the local end time.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Weekdays it opens on (Monday = 0 … Sunday = 6).
    pub days: [bool; 7],
    /// Local opening time, minutes after midnight.
    pub start_minute: u16,
    /// Local closing time, minutes after midnight, up to 1440 (at or
    /// before the start: the next day).
    pub end_minute: u16,
    /// The zone, by its IANA name.
    pub time_zone: String,
    /// The zone itself.
    pub tz: jiff::tz::TimeZone,
    /// The devices it applies to.
    pub selector: Selector,
}

const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

fn parse_days(s: &str) -> Result<[bool; 7], Refused> {
    let refuse = || {
        Refused(format!(
            "days {} are not valid: write English three-letter day names such as Sat, Mon-Fri, Sat,Sun or Fri-Mon, or daily",
            shown(s)
        ))
    };
    let day = |d: &str| {
        DAY_NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(d.trim()))
            .ok_or_else(refuse)
    };
    if s.trim().eq_ignore_ascii_case("daily") {
        return Ok([true; 7]);
    }
    let mut days = [false; 7];
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (mut d, last) = (day(a)?, day(b)?);
                // A range may wrap over the weekend: Fri-Mon.
                loop {
                    days[d] = true;
                    if d == last {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days[day(part)?] = true,
        }
    }
    Ok(days)
}

/// Days as `parse_days` reads them back: `daily`, `Mon-Fri`, `Sat,Sun`,
/// `Fri-Mon`; runs of three or more days become a range.
fn format_days(days: &[bool; 7]) -> String {
    if days.iter().all(|d| *d) {
        return "daily".into();
    }
    let mut parts = Vec::new();
    for first in (0..7).filter(|&i| days[i] && !days[(i + 6) % 7]) {
        let len = (0..7).take_while(|k| days[(first + k) % 7]).count();
        let last = (first + len - 1) % 7;
        parts.push(match len {
            1 => DAY_NAMES[first].to_string(),
            2 => format!("{},{}", DAY_NAMES[first], DAY_NAMES[last]),
            _ => format!("{}-{}", DAY_NAMES[first], DAY_NAMES[last]),
        });
    }
    parts.join(",")
}

/// `HH:MM` as minutes after midnight; `24:00` (1440) only when `end`.
fn parse_time(what: &str, s: &str, end: bool) -> Result<u16, Refused> {
    let parsed = s.split_once(':').and_then(|(h, m)| {
        let digits = |x: &str| !x.is_empty() && x.bytes().all(|c| c.is_ascii_digit());
        if !(digits(h) && h.len() <= 2 && digits(m) && m.len() == 2) {
            return None;
        }
        let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
        match (h, m) {
            (0..=23, 0..=59) => Some(h * 60 + m),
            (24, 0) if end => Some(1440),
            _ => None,
        }
    });
    parsed.ok_or_else(|| {
        Refused(format!(
            "{what} {} is not a time: write HH:MM from 00:00 to {}",
            shown(s),
            if end { "24:00" } else { "23:59" }
        ))
    })
}

fn fmt_time(minute: u16) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

fn to_jiff(t: OffsetDateTime) -> Option<jiff::Timestamp> {
    jiff::Timestamp::from_nanosecond(t.unix_timestamp_nanos()).ok()
}

fn from_jiff(t: jiff::Timestamp) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(t.as_nanosecond()).ok()
}

fn plus_days(d: jiff::civil::Date, n: i64) -> Option<jiff::civil::Date> {
    d.checked_add(jiff::Span::new().days(n)).ok()
}

impl Window {
    /// Parses and checks a window (unknown zone, bad day or time: refused
    /// with what to write instead).
    pub fn new(spec: &WindowSpec) -> Result<Window, Refused> {
        let days = parse_days(&spec.days)?;
        let start_minute = parse_time("start", &spec.start, false)?;
        let end_minute = parse_time("end", &spec.end, true)?;
        let tz = jiff::tz::TimeZone::get(&spec.time_zone).map_err(|_| {
            Refused(format!(
                "unknown time zone {}: use an IANA name such as Europe/Berlin, America/New_York or UTC",
                shown(&spec.time_zone)
            ))
        })?;
        let selector = Selector::parse(&spec.selector)?;
        Ok(Window {
            days,
            start_minute,
            end_minute,
            // The database's spelling (`europe/berlin` is found too).
            time_zone: tz.iana_name().unwrap_or(&spec.time_zone).to_string(),
            tz,
            selector,
        })
    }

    /// The window as asked for.
    pub fn spec(&self) -> WindowSpec {
        WindowSpec {
            days: format_days(&self.days),
            start: fmt_time(self.start_minute),
            end: fmt_time(self.end_minute),
            time_zone: self.time_zone.clone(),
            selector: self.selector.to_string(),
        }
    }

    /// In words: `Sat 02:00–04:00 Europe/Berlin`, `Mon-Fri 22:00–02:00 UTC`.
    pub fn describe(&self) -> String {
        format!(
            "{} {}–{} {}",
            format_days(&self.days),
            fmt_time(self.start_minute),
            fmt_time(self.end_minute),
            self.time_zone
        )
    }

    /// The instant of local `minute` (up to 1440) on `date`: in a gap, the
    /// first instant after it (the transition); in a fold, the first.
    fn instant(&self, date: jiff::civil::Date, minute: u16) -> Option<jiff::Timestamp> {
        let date = plus_days(date, i64::from(minute / 1440))?;
        let minute = minute % 1440;
        let dt = date.at((minute / 60) as i8, (minute % 60) as i8, 0, 0);
        let at = self.tz.to_ambiguous_timestamp(dt);
        match at.offset() {
            jiff::tz::AmbiguousOffset::Gap { after, .. } => {
                // Read with the later offset, the time falls before the
                // transition; the transition is where local time resumes.
                let before_gap = after.to_timestamp(dt).ok()?;
                match self.tz.following(before_gap).next() {
                    Some(t) => Some(t.timestamp()),
                    None => at.compatible().ok(),
                }
            }
            _ => at.compatible().ok(),
        }
    }

    /// The occurrence that opens on local `date`, if the window opens that
    /// weekday and the occurrence is not swallowed by a gap.
    fn occurrence(&self, date: jiff::civil::Date) -> Option<(jiff::Timestamp, jiff::Timestamp)> {
        if !self.days[date.weekday().to_monday_zero_offset() as usize] {
            return None;
        }
        let start = self.instant(date, self.start_minute)?;
        let end_date = if self.end_minute <= self.start_minute {
            plus_days(date, 1)?
        } else {
            date
        };
        let end = self.instant(end_date, self.end_minute)?;
        (start < end).then_some((start, end))
    }

    /// The occurrence open at `now` (its start and end, in UTC), if any.
    pub fn open_at(&self, now: OffsetDateTime) -> Option<(OffsetDateTime, OffsetDateTime)> {
        let ts = to_jiff(now)?;
        let today = self.tz.to_datetime(ts).date();
        // An occurrence lasts at most a local day (plus an hour in autumn):
        // one open now opened today or on one of the two days before.
        (-2..=0)
            .filter_map(|n| self.occurrence(plus_days(today, n)?))
            .find(|(s, e)| *s <= ts && ts < *e)
            .and_then(|(s, e)| Some((from_jiff(s)?, from_jiff(e)?)))
    }

    /// The next occurrence that opens after `now` (start and end, UTC). At
    /// the edge of the calendar (year 9999), `now` for both.
    pub fn next_after(&self, now: OffsetDateTime) -> (OffsetDateTime, OffsetDateTime) {
        let next = || {
            let ts = to_jiff(now)?;
            let today = self.tz.to_datetime(ts).date();
            // Occurrences open in the order of their dates; a week and a
            // day ahead holds the next one whatever the weekdays.
            (-1..=8)
                .filter_map(|n| self.occurrence(plus_days(today, n)?))
                .find(|(s, _)| *s > ts)
                .and_then(|(s, e)| Some((from_jiff(s)?, from_jiff(e)?)))
        };
        next().unwrap_or((now, now))
    }
}

/// How many devices of a group may be between reboot and boot assessment
/// at once, as asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseSpec {
    /// At most this many devices at once (≥ 1).
    #[serde(default)]
    pub max_devices: Option<u32>,
    /// At most this share of the group's devices at once (rounded down,
    /// never below 1); with `max_devices` too, the lower of the two.
    #[serde(default)]
    pub max_percent: Option<f64>,
    /// Groups by this label's value (`site`): each site gets its own
    /// limit. Absent: the channel is one group.
    #[serde(default)]
    pub per_label: Option<String>,
    /// A lease not given back after this many minutes expires (default 30,
    /// 1 to 1440): a device that died holding one does not block the rest.
    #[serde(default = "thirty")]
    pub ttl_minutes: u32,
}

fn thirty() -> u32 {
    30
}

/// A channel's reboot policy, as asked for and stored.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RebootPolicySpec {
    /// Maintenance windows: a device to which one or more apply reboots
    /// into a staged release only while one of them is open. None: any time.
    #[serde(default)]
    pub windows: Vec<WindowSpec>,
    /// Reboot coordination: absent, devices reboot without a lease.
    #[serde(default)]
    pub lease: Option<LeaseSpec>,
}

/// A channel's reboot policy as the rules use it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RebootPolicy {
    /// The windows.
    pub windows: Vec<Window>,
    /// The lease settings.
    pub lease: Option<LeaseSpec>,
}

fn check_lease(l: &LeaseSpec) -> Result<(), String> {
    if l.max_devices.is_none() && l.max_percent.is_none() {
        return Err("set max_devices (e.g. 1) or max_percent (e.g. 10), or leave the lease out to let devices reboot without one".into());
    }
    if l.max_devices == Some(0) {
        return Err("max_devices must be at least 1".into());
    }
    if let Some(p) = l.max_percent
        && !(p > 0.0 && p <= 100.0)
    {
        return Err(format!(
            "max_percent {p} is out of range: use above 0 up to 100"
        ));
    }
    if let Some(k) = &l.per_label {
        check_label_key(k).map_err(|e| format!("per_label: {}", e.0))?;
    }
    if !(1..=1440).contains(&l.ttl_minutes) {
        return Err(format!(
            "ttl_minutes {} is out of range: use 1 to 1440 (a day)",
            l.ttl_minutes
        ));
    }
    Ok(())
}

impl RebootPolicy {
    /// Parses and checks a policy (at most 32 windows; lease: at least one
    /// of `max_devices` ≥ 1 and `max_percent` in (0, 100], a valid label
    /// key, ttl 1–1440).
    pub fn new(spec: &RebootPolicySpec) -> Result<RebootPolicy, Refused> {
        if spec.windows.len() > MAX_WINDOWS {
            return Err(Refused(format!(
                "{} windows are too many: a reboot policy has at most {MAX_WINDOWS}",
                spec.windows.len()
            )));
        }
        let windows = spec
            .windows
            .iter()
            .enumerate()
            .map(|(n, w)| Window::new(w).map_err(|e| Refused(format!("window {}: {}", n + 1, e.0))))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(l) = &spec.lease {
            check_lease(l).map_err(|e| Refused(format!("lease: {e}")))?;
        }
        Ok(RebootPolicy {
            windows,
            lease: spec.lease.clone(),
        })
    }

    /// The policy as asked for.
    pub fn spec(&self) -> RebootPolicySpec {
        RebootPolicySpec {
            windows: self.windows.iter().map(Window::spec).collect(),
            lease: self.lease.clone(),
        }
    }

    /// The lease group of a device of `product`/`channel` with `labels`:
    /// `<product>.<channel>`, or `<product>.<channel>.<value>` when split
    /// per label (`-` for a device without the label or with an empty
    /// value); FleetLock's group alphabet `[a-zA-Z0-9.-]` (other characters
    /// become `-`). Product and channel names hold no `.`, so two channels
    /// never share a group; two values that differ only in replaced
    /// characters do (one limit for both: stricter, never looser). None
    /// when the policy has no lease.
    pub fn lease_group(&self, product: &str, channel: &str, labels: &Labels) -> Option<String> {
        let lease = self.lease.as_ref()?;
        let mut group = format!("{product}.{channel}");
        if let Some(key) = &lease.per_label {
            group.push('.');
            match labels.get(key).filter(|v| !v.is_empty()) {
                Some(v) => group.push_str(v),
                None => group.push('-'),
            }
        }
        Some(
            group
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                        c
                    } else {
                        '-'
                    }
                })
                .collect(),
        )
    }
}

/// What the reboot policy tells a device with `labels` at `now`: the
/// windows that apply to it (by selector), whether one is open, when the
/// next opens; `urgent` (the offered release is marked urgent) allows the
/// reboot outside windows. The lease group is left for the caller.
pub fn reboot_advice(
    policy: &RebootPolicy,
    labels: &Labels,
    urgent: bool,
    now: OffsetDateTime,
) -> RebootAdvice {
    let applying: Vec<&Window> = policy
        .windows
        .iter()
        .filter(|w| w.selector.matches(labels))
        .collect();
    if applying.is_empty() {
        return RebootAdvice {
            allowed: true,
            reason: RebootReason::NoWindow,
            window: None,
            opens_at: None,
            closes_at: None,
            lease_group: None,
        };
    }
    let mut described: Vec<String> = Vec::new();
    for d in applying.iter().map(|w| w.describe()) {
        if !described.contains(&d) {
            described.push(d);
        }
    }
    // Inside overlapping windows, the one that stays open longest.
    let open = applying
        .iter()
        .filter_map(|w| w.open_at(now))
        .max_by_key(|(_, end)| *end);
    let (allowed, reason, (opens_at, closes_at)) = match open {
        Some(occurrence) => (
            true,
            if urgent {
                RebootReason::Urgent
            } else {
                RebootReason::InWindow
            },
            occurrence,
        ),
        None => {
            let next = applying
                .iter()
                .map(|w| w.next_after(now))
                .min_by_key(|(start, _)| *start)
                .unwrap_or((now, now));
            if urgent {
                (true, RebootReason::Urgent, next)
            } else {
                (false, RebootReason::OutsideWindow, next)
            }
        }
    };
    RebootAdvice {
        allowed,
        reason,
        window: Some(described.join("; ")),
        opens_at: Some(opens_at),
        closes_at: Some(closes_at),
        lease_group: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;
    use time::macros::datetime;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn window(days: &str, start: &str, end: &str, tz: &str, selector: &str) -> Window {
        Window::new(&WindowSpec {
            days: days.into(),
            start: start.into(),
            end: end.into(),
            time_zone: tz.into(),
            selector: selector.into(),
        })
        .unwrap()
    }

    fn refused_window(days: &str, start: &str, end: &str, tz: &str) -> String {
        Window::new(&WindowSpec {
            days: days.into(),
            start: start.into(),
            end: end.into(),
            time_zone: tz.into(),
            selector: String::new(),
        })
        .expect_err(&format!("{days} {start}-{end} {tz}"))
        .0
    }

    #[test]
    fn labels_are_checked() {
        assert!(
            check_labels(&labels(&[
                ("region", "eu"),
                ("k8s.io/zone", ""),
                ("0", "a_b.c-d")
            ]))
            .is_ok()
        );
        for (bad, words) in [
            (labels(&[("", "x")]), "label key \"\""),
            (labels(&[("-x", "x")]), "starting with a letter or digit"),
            (labels(&[("a b", "x")]), "is not valid"),
            (labels(&[(&"k".repeat(64), "x")]), "1 to 63"),
            (labels(&[("k", "a/b")]), "value \"a/b\" of label k"),
            (labels(&[("k", &"v".repeat(64))]), "up to 63"),
        ] {
            let e = check_labels(&bad).unwrap_err();
            assert!(e.0.contains(words), "{e}");
        }
        let many: Labels = (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(check_labels(&many).unwrap_err().0.contains("at most 32"));
        // A hostile key does not come back whole in the message.
        let e = check_labels(&labels(&[(&"!".repeat(10_000), "x")])).unwrap_err();
        assert!(e.0.len() < 300, "{}", e.0.len());
    }

    #[test]
    fn selectors_parse_match_and_print_back() {
        let s = Selector::parse(" ring=canary , region!=us,site==ber-1 ").unwrap();
        assert_eq!(
            s.terms,
            vec![
                Term::Is("ring".into(), "canary".into()),
                Term::IsNot("region".into(), "us".into()),
                Term::Is("site".into(), "ber-1".into()),
            ]
        );
        assert_eq!(s.to_string(), "ring=canary,region!=us,site=ber-1");
        assert_eq!(Selector::parse(&s.to_string()).unwrap(), s);
        assert!(s.matches(&labels(&[("ring", "canary"), ("site", "ber-1")])));
        assert!(s.matches(&labels(&[
            ("ring", "canary"),
            ("site", "ber-1"),
            ("region", "eu")
        ])));
        assert!(!s.matches(&labels(&[
            ("ring", "canary"),
            ("site", "ber-1"),
            ("region", "us")
        ])));
        assert!(!s.matches(&labels(&[("site", "ber-1")])), "ring absent");
        assert!(!s.matches(&labels(&[("ring", "beta"), ("site", "ber-1")])));

        let neg = Selector::parse("region!=us").unwrap();
        assert!(neg.matches(&Labels::new()), "!= holds for an absent label");
        let empty_value = Selector::parse("ring=").unwrap();
        assert!(empty_value.matches(&labels(&[("ring", "")])));
        assert!(!empty_value.matches(&Labels::new()));

        for everyone in ["", "  "] {
            let s = Selector::parse(everyone).unwrap();
            assert!(s.is_everyone() && s.matches(&labels(&[("a", "b")])));
            assert_eq!(
                (s.to_string(), s.describe()),
                ("".into(), "every device".into())
            );
        }

        for (bad, words) in [
            (
                "ring",
                "term \"ring\" has no operator: write key=value or key!=value",
            ),
            ("ring=canary,,region=eu", "empty term"),
            ("ring=canary,", "empty term"),
            ("=canary", "label key \"\""),
            ("ri ng=canary", "label key \"ri ng\""),
            ("ring=can ary", "value \"can ary\" of label ring"),
            ("ring=a=b", "value \"a=b\""),
            ("ring!canary", "no operator"),
        ] {
            let e = Selector::parse(bad).expect_err(bad);
            assert!(e.0.contains(words), "{bad}: {e}");
            assert!(e.0.starts_with("selector "), "{bad}: {e}");
        }
        let long = vec!["a=b"; 33].join(",");
        assert!(
            Selector::parse(&long)
                .unwrap_err()
                .0
                .contains("more than 32 terms")
        );
    }

    fn wave(selector: &str, percent: f64, ramp: f64, hold: f64) -> WaveSpec {
        WaveSpec {
            selector: selector.into(),
            percent,
            ramp_minutes: ramp,
            hold_minutes: hold,
        }
    }

    fn t0() -> OffsetDateTime {
        datetime!(2027-03-01 12:00 UTC)
    }

    fn min(m: i64) -> OffsetDateTime {
        t0() + Duration::minutes(m)
    }

    /// Canary ramps to 100 over 60 min and holds 60; eu at once to 50 and
    /// holds 30; then everyone ramps to 100 over 100 min.
    fn three_waves() -> WavePlan {
        WavePlan::new(
            &[
                wave("ring=canary", 100.0, 60.0, 60.0),
                wave("region=eu", 50.0, 0.0, 30.0),
                wave("", 100.0, 100.0, 0.0),
            ],
            t0(),
        )
        .unwrap()
    }

    #[test]
    fn waves_start_ramp_and_hold_in_turn() {
        let p = three_waves();
        assert_eq!(
            (
                p.starts_at(0),
                p.starts_at(1),
                p.starts_at(2),
                p.starts_at(3)
            ),
            (t0(), min(120), min(150), min(250))
        );
        // Wave 1 ramps, then holds; wave 2 waits until it is done.
        assert_eq!(p.wave_percent(0, min(-1)), 0.0);
        assert_eq!(p.wave_percent(0, min(30)), 50.0);
        assert_eq!(p.wave_percent(0, min(90)), 100.0);
        assert_eq!(p.wave_percent(1, min(119)), 0.0);
        assert_eq!(p.wave_percent(1, min(120)), 50.0, "no ramp: at once");
        assert_eq!(p.wave_percent(2, min(200)), 50.0);
        assert_eq!(p.wave_percent(9, min(200)), 0.0, "no such wave");

        let canary_eu = labels(&[("ring", "canary"), ("region", "eu")]);
        let eu = labels(&[("region", "eu")]);
        let us = labels(&[("region", "us")]);
        assert_eq!(p.percent_for(&canary_eu, min(30)), 50.0);
        assert_eq!(p.percent_for(&eu, min(30)), 0.0);
        assert_eq!(p.percent_for(&eu, min(130)), 50.0);
        assert_eq!(
            p.percent_for(&eu, min(200)),
            50.0,
            "the highest of its waves"
        );
        assert_eq!(p.percent_for(&eu, min(240)), 90.0);
        assert_eq!(p.percent_for(&us, min(149)), 0.0);
        assert_eq!(p.percent_for(&us, min(300)), 100.0);
        assert_eq!(
            (p.wave_of(&canary_eu), p.wave_of(&eu), p.wave_of(&us)),
            (Some(0), Some(1), Some(2))
        );

        let at = |m| p.standing(min(m));
        assert_eq!(
            at(-5),
            WaveStanding {
                index: 0,
                percent: 0.0,
                next_starts_at: Some(min(120)),
                done: false
            }
        );
        assert_eq!(
            at(90),
            WaveStanding {
                index: 0,
                percent: 100.0,
                next_starts_at: Some(min(120)),
                done: false
            }
        );
        assert_eq!(
            at(120),
            WaveStanding {
                index: 1,
                percent: 50.0,
                next_starts_at: Some(min(150)),
                done: false
            }
        );
        assert_eq!(
            at(200),
            WaveStanding {
                index: 2,
                percent: 50.0,
                next_starts_at: None,
                done: false
            }
        );
        assert_eq!(
            at(250),
            WaveStanding {
                index: 2,
                percent: 100.0,
                next_starts_at: None,
                done: true
            }
        );
        assert!(!p.reaches_everyone(min(249)));
        assert!(p.reaches_everyone(min(250)));

        // Waves of no length start together; the standing names the last.
        let p = WavePlan::new(
            &[wave("a=b", 100.0, 0.0, 0.0), wave("", 20.0, 0.0, 0.0)],
            t0(),
        )
        .unwrap();
        assert_eq!((p.standing(t0()).index, p.standing(t0()).done), (1, true));
        assert!(
            !p.reaches_everyone(min(10_000)),
            "the last wave stops at 20 %"
        );
        // A wave of everyone at 100 % reaches everyone, wherever it stands.
        let p = WavePlan::new(
            &[wave("", 100.0, 0.0, 10.0), wave("a=b", 5.0, 0.0, 0.0)],
            t0(),
        )
        .unwrap();
        assert!(p.reaches_everyone(t0()));
    }

    #[test]
    fn waves_are_checked_and_written_back() {
        let specs = vec![
            wave("ring = canary", 10.0, 5.0, 1.5),
            wave("", 100.0, 0.0, 0.0),
        ];
        let p = WavePlan::new(&specs, t0()).unwrap();
        let back = p.specs();
        assert_eq!(back[0].selector, "ring=canary");
        assert_eq!(back[1], specs[1]);
        assert_eq!(WavePlan::new(&back, t0()).unwrap(), p);
        // Defaults: every device, 100 %, at once.
        let w: WaveSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(w, wave("", 100.0, 0.0, 0.0));
        assert!(serde_json::from_str::<WaveSpec>(r#"{"percnt": 5}"#).is_err());

        let refused = |specs: &[WaveSpec]| WavePlan::new(specs, t0()).unwrap_err().0;
        assert!(refused(&[]).contains("1 to 16 waves, not 0"));
        assert!(refused(&vec![wave("", 1.0, 0.0, 0.0); 17]).contains("not 17"));
        for (w, words) in [
            (
                wave("", 101.0, 0.0, 0.0),
                "wave 2: percent 101 is out of range: use 0 to 100",
            ),
            (wave("", f64::NAN, 0.0, 0.0), "wave 2: percent NaN"),
            (
                wave("", 5.0, -1.0, 0.0),
                "wave 2: ramp_minutes -1 is out of range",
            ),
            (
                wave("", 5.0, f64::INFINITY, 0.0),
                "wave 2: ramp_minutes inf",
            ),
            (wave("", 5.0, 0.0, 525_601.0), "wave 2: hold_minutes 525601"),
            (wave("ring", 5.0, 0.0, 0.0), "wave 2: selector \"ring\""),
        ] {
            let e = refused(&[wave("", 1.0, 0.0, 0.0), w]);
            assert!(e.contains(words), "{e}");
        }
    }

    /// `Window::new` and back, over every set of days.
    #[test]
    fn days_parse_and_print_back() {
        for bits in 1u8..128 {
            let mut days = [false; 7];
            for (i, d) in days.iter_mut().enumerate() {
                *d = bits & (1 << i) != 0;
            }
            let text = format_days(&days);
            assert_eq!(parse_days(&text).unwrap(), days, "{text}");
        }
        let d = |s| parse_days(s).unwrap();
        assert_eq!(d("Sat"), [false, false, false, false, false, true, false]);
        assert_eq!(d("mon-FRI"), [true, true, true, true, true, false, false]);
        assert_eq!(
            d("Sat, Sun"),
            [false, false, false, false, false, true, true]
        );
        assert_eq!(d("Fri-Mon"), [true, false, false, false, true, true, true]);
        assert_eq!(d("Daily"), [true; 7]);
        assert_eq!(format_days(&d("Fri-Mon")), "Fri-Mon");
        assert_eq!(format_days(&d("Sun,Mon")), "Sun,Mon");
        assert_eq!(format_days(&d("Mon-Sun")), "daily");
        assert_eq!(format_days(&d("Wed,Fri-Mon")), "Wed,Fri-Mon");

        let w = window("sat,sun", "02:00", "24:00", "europe/berlin", "region = eu");
        assert_eq!(w.time_zone, "Europe/Berlin");
        assert_eq!(
            w.spec(),
            WindowSpec {
                days: "Sat,Sun".into(),
                start: "02:00".into(),
                end: "24:00".into(),
                time_zone: "Europe/Berlin".into(),
                selector: "region=eu".into(),
            }
        );
        assert_eq!(Window::new(&w.spec()).unwrap(), w);
        assert_eq!(w.describe(), "Sat,Sun 02:00–24:00 Europe/Berlin");
        assert_eq!(
            window("Mon-Fri", "22:00", "2:00", "UTC", "").describe(),
            "Mon-Fri 22:00–02:00 UTC"
        );
    }

    #[test]
    fn bad_windows_are_refused_with_what_to_write() {
        let e = refused_window("Sat", "02:00", "04:00", "Europe/Berln");
        assert_eq!(
            e,
            "unknown time zone \"Europe/Berln\": use an IANA name such as Europe/Berlin, America/New_York or UTC"
        );
        for tz in ["", "+02:00", "../../etc/passwd", "CEST"] {
            assert!(
                refused_window("Sat", "02:00", "04:00", tz).contains("unknown time zone"),
                "{tz}"
            );
        }
        for days in [
            "",
            "Sonday",
            "Mon-",
            "Mon,,Tue",
            "Saturday",
            "weekends",
            "Mon-Fri-Sat",
        ] {
            let e = refused_window(days, "02:00", "04:00", "UTC");
            assert!(
                e.contains("write English three-letter day names"),
                "{days}: {e}"
            );
        }
        for (start, end, words) in [
            (
                "25:00",
                "04:00",
                "start \"25:00\" is not a time: write HH:MM from 00:00 to 23:59",
            ),
            ("24:00", "04:00", "start \"24:00\""),
            ("12:60", "04:00", "start \"12:60\""),
            ("1200", "04:00", "start \"1200\""),
            ("7:5", "04:00", "start \"7:5\""),
            ("-1:00", "04:00", "start \"-1:00\""),
            (
                "02:00",
                "24:01",
                "end \"24:01\" is not a time: write HH:MM from 00:00 to 24:00",
            ),
            ("02:00", "", "end \"\""),
        ] {
            let e = refused_window("Sat", start, end, "UTC");
            assert!(e.contains(words), "{start}-{end}: {e}");
        }
        let e = Window::new(&WindowSpec {
            days: "Sat".into(),
            start: "02:00".into(),
            end: "04:00".into(),
            time_zone: "UTC".into(),
            selector: "region".into(),
        })
        .unwrap_err();
        assert!(e.0.contains("no operator"), "{e}");
        // One digit of hour is fine.
        assert_eq!(window("Sat", "7:05", "9:00", "UTC", "").start_minute, 425);
    }

    /// The same local window is a different UTC instant in winter and summer.
    #[test]
    fn a_window_follows_the_zone_through_the_year() {
        let w = window("Sat", "02:00", "04:00", "Europe/Berlin", "");
        // Friday 2027-01-08 and Friday 2027-07-09, noon.
        assert_eq!(
            w.next_after(datetime!(2027-01-08 12:00 UTC)),
            (
                datetime!(2027-01-09 01:00 UTC),
                datetime!(2027-01-09 03:00 UTC)
            )
        );
        assert_eq!(
            w.next_after(datetime!(2027-07-09 12:00 UTC)),
            (
                datetime!(2027-07-10 00:00 UTC),
                datetime!(2027-07-10 02:00 UTC)
            )
        );
        assert_eq!(
            w.open_at(datetime!(2027-07-10 01:59 UTC)),
            Some((
                datetime!(2027-07-10 00:00 UTC),
                datetime!(2027-07-10 02:00 UTC)
            ))
        );
        assert_eq!(
            w.open_at(datetime!(2027-07-10 02:00 UTC)),
            None,
            "the end is outside"
        );
        assert_eq!(w.open_at(datetime!(2027-07-09 23:59 UTC)), None);

        let ny = window("daily", "09:00", "17:00", "America/New_York", "");
        assert_eq!(
            ny.next_after(datetime!(2027-01-12 05:00 UTC)),
            (
                datetime!(2027-01-12 14:00 UTC),
                datetime!(2027-01-12 22:00 UTC)
            )
        );
        assert_eq!(
            ny.next_after(datetime!(2027-07-12 05:00 UTC)),
            (
                datetime!(2027-07-12 13:00 UTC),
                datetime!(2027-07-12 21:00 UTC)
            )
        );
        // New York springs forward on 2027-03-14 at 02:00: 02:15 opens at 03:00 EDT.
        let gap = window("Sun", "02:15", "04:00", "America/New_York", "");
        assert_eq!(
            gap.next_after(datetime!(2027-03-13 12:00 UTC)),
            (
                datetime!(2027-03-14 07:00 UTC),
                datetime!(2027-03-14 08:00 UTC)
            )
        );
    }

    /// Berlin skips 02:00–03:00 on 2027-03-28 and repeats 02:00–03:00 on 2027-10-31.
    #[test]
    fn daylight_saving_days_open_once() {
        let w = window("Sun", "02:30", "03:30", "Europe/Berlin", "");
        // Spring: 02:30 does not exist; it opens at 03:00 CEST and closes at 03:30 CEST.
        let spring = (
            datetime!(2027-03-28 01:00 UTC),
            datetime!(2027-03-28 01:30 UTC),
        );
        assert_eq!(w.next_after(datetime!(2027-03-27 12:00 UTC)), spring);
        assert_eq!(w.open_at(datetime!(2027-03-28 01:10 UTC)), Some(spring));
        assert_eq!(w.open_at(datetime!(2027-03-28 00:59 UTC)), None);
        // Autumn: 02:30 comes twice; it opens at the first (CEST) and closes at 03:30 CET.
        let autumn = (
            datetime!(2027-10-31 00:30 UTC),
            datetime!(2027-10-31 02:30 UTC),
        );
        assert_eq!(w.next_after(datetime!(2027-10-30 12:00 UTC)), autumn);
        assert_eq!(
            w.open_at(datetime!(2027-10-31 01:30 UTC)),
            Some(autumn),
            "in the repeated hour"
        );
        assert_eq!(
            w.next_after(datetime!(2027-10-31 00:30 UTC)),
            (
                datetime!(2027-11-07 01:30 UTC),
                datetime!(2027-11-07 02:30 UTC)
            ),
            "opened once that day: the next is a week on, in winter time"
        );
        // A window inside the skipped hour does not open that day at all.
        let swallowed = window("Sun", "02:10", "02:50", "Europe/Berlin", "");
        assert_eq!(
            swallowed.next_after(datetime!(2027-03-27 12:00 UTC)),
            (
                datetime!(2027-04-04 00:10 UTC),
                datetime!(2027-04-04 00:50 UTC)
            )
        );
        // A daily window across the spring change: 22 hours of real time.
        let daily = window("daily", "02:00", "02:00", "Europe/Berlin", "");
        assert_eq!(
            daily.open_at(datetime!(2027-03-28 00:30 UTC)),
            Some((
                datetime!(2027-03-27 01:00 UTC),
                datetime!(2027-03-28 01:00 UTC)
            ))
        );
        assert_eq!(
            daily.open_at(datetime!(2027-03-28 01:00 UTC)),
            Some((
                datetime!(2027-03-28 01:00 UTC),
                datetime!(2027-03-29 00:00 UTC)
            ))
        );
    }

    #[test]
    fn a_window_across_midnight_and_the_week() {
        let w = window("Fri", "22:00", "02:00", "UTC", "");
        let fri = (
            datetime!(2027-01-08 22:00 UTC),
            datetime!(2027-01-09 02:00 UTC),
        );
        assert_eq!(
            w.open_at(datetime!(2027-01-09 01:59 UTC)),
            Some(fri),
            "Saturday night"
        );
        assert_eq!(w.open_at(datetime!(2027-01-09 02:00 UTC)), None);
        assert_eq!(w.open_at(datetime!(2027-01-08 21:59 UTC)), None);
        assert_eq!(w.open_at(datetime!(2027-01-08 22:00 UTC)), Some(fri));
        // Inside one occurrence the next is a week on.
        assert_eq!(
            w.next_after(datetime!(2027-01-08 23:00 UTC)),
            (
                datetime!(2027-01-15 22:00 UTC),
                datetime!(2027-01-16 02:00 UTC)
            )
        );
        // Monday 03:00, asked on Sunday, on Monday before and after it.
        let mon = window("Mon", "03:00", "04:00", "UTC", "");
        assert_eq!(
            mon.next_after(datetime!(2027-01-10 23:00 UTC)).0,
            datetime!(2027-01-11 03:00 UTC)
        );
        assert_eq!(
            mon.next_after(datetime!(2027-01-11 02:59 UTC)).0,
            datetime!(2027-01-11 03:00 UTC)
        );
        assert_eq!(
            mon.next_after(datetime!(2027-01-11 03:00 UTC)).0,
            datetime!(2027-01-18 03:00 UTC)
        );
        // Over New Year, and through a wrapped range.
        let weekend = window("Fri-Mon", "00:00", "24:00", "UTC", "");
        assert_eq!(
            weekend.next_after(datetime!(2026-12-29 12:00 UTC)),
            (
                datetime!(2027-01-01 00:00 UTC),
                datetime!(2027-01-02 00:00 UTC)
            )
        );
        assert!(
            weekend.open_at(datetime!(2027-01-04 23:59 UTC)).is_some(),
            "Monday"
        );
        assert!(
            weekend.open_at(datetime!(2027-01-05 00:00 UTC)).is_none(),
            "Tuesday"
        );
    }

    fn policy(windows: Vec<Window>) -> RebootPolicy {
        RebootPolicy {
            windows,
            lease: None,
        }
    }

    #[test]
    fn reboot_advice_follows_the_windows_that_apply() {
        let none = reboot_advice(&RebootPolicy::default(), &Labels::new(), false, t0());
        assert_eq!(
            none,
            RebootAdvice {
                allowed: true,
                reason: RebootReason::NoWindow,
                window: None,
                opens_at: None,
                closes_at: None,
                lease_group: None,
            }
        );

        let eu = window("Sat", "02:00", "04:00", "Europe/Berlin", "region=eu");
        let night = window("daily", "23:00", "23:30", "UTC", "region=eu");
        let p = policy(vec![eu, night]);
        let eu_dev = labels(&[("region", "eu")]);
        let us_dev = labels(&[("region", "us")]);
        // 2027-01-08 is a Friday.
        let friday = datetime!(2027-01-08 12:00 UTC);
        let us = reboot_advice(&p, &us_dev, false, friday);
        assert_eq!(
            (us.allowed, us.reason, us.window),
            (true, RebootReason::NoWindow, None)
        );

        let out = reboot_advice(&p, &eu_dev, false, friday);
        assert_eq!(
            out,
            RebootAdvice {
                allowed: false,
                reason: RebootReason::OutsideWindow,
                window: Some("Sat 02:00–04:00 Europe/Berlin; daily 23:00–23:30 UTC".into()),
                opens_at: Some(datetime!(2027-01-08 23:00 UTC)),
                closes_at: Some(datetime!(2027-01-08 23:30 UTC)),
                lease_group: None,
            },
            "the earliest next occurrence of the two"
        );
        let inside = reboot_advice(&p, &eu_dev, false, datetime!(2027-01-09 02:00 UTC));
        assert_eq!(
            (
                inside.allowed,
                inside.reason,
                inside.opens_at,
                inside.closes_at
            ),
            (
                true,
                RebootReason::InWindow,
                Some(datetime!(2027-01-09 01:00 UTC)),
                Some(datetime!(2027-01-09 03:00 UTC))
            )
        );
        let urgent = reboot_advice(&p, &eu_dev, true, friday);
        assert_eq!(
            urgent,
            RebootAdvice {
                allowed: true,
                reason: RebootReason::Urgent,
                ..out.clone()
            }
        );
        let urgent_inside = reboot_advice(&p, &eu_dev, true, datetime!(2027-01-09 02:00 UTC));
        assert_eq!(
            (urgent_inside.reason, urgent_inside.closes_at),
            (RebootReason::Urgent, inside.closes_at)
        );
        // The same window twice is said once.
        let twice = policy(vec![
            window("Sat", "02:00", "04:00", "UTC", ""),
            window("Sat", "02:00", "04:00", "UTC", "region=eu"),
        ]);
        let a = reboot_advice(&twice, &eu_dev, false, friday);
        assert_eq!(a.window.as_deref(), Some("Sat 02:00–04:00 UTC"));
    }

    fn lease(per_label: Option<&str>) -> LeaseSpec {
        LeaseSpec {
            max_devices: Some(1),
            max_percent: None,
            per_label: per_label.map(Into::into),
            ttl_minutes: 30,
        }
    }

    #[test]
    fn lease_groups_are_named_in_fleetlock_letters() {
        let dev = labels(&[("site", "ber_1 ü"), ("rack", "r7")]);
        assert_eq!(
            RebootPolicy::default().lease_group("acme", "stable", &dev),
            None
        );
        let one = RebootPolicy {
            windows: vec![],
            lease: Some(lease(None)),
        };
        assert_eq!(
            one.lease_group("acme", "stable", &dev).as_deref(),
            Some("acme.stable")
        );
        let per_rack = RebootPolicy {
            windows: vec![],
            lease: Some(lease(Some("rack"))),
        };
        assert_eq!(
            per_rack.lease_group("acme", "stable", &dev).as_deref(),
            Some("acme.stable.r7")
        );
        let per_site = RebootPolicy {
            windows: vec![],
            lease: Some(lease(Some("site"))),
        };
        assert_eq!(
            per_site.lease_group("acme", "stable", &dev).as_deref(),
            Some("acme.stable.ber-1--")
        );
        for without in [Labels::new(), labels(&[("site", "")])] {
            assert_eq!(
                per_site.lease_group("acme", "stable", &without).as_deref(),
                Some("acme.stable.-")
            );
        }
        let g = per_site.lease_group("acme", "stable", &dev).unwrap();
        assert!(
            g.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-')
        );
    }

    #[test]
    fn reboot_policies_are_checked_and_written_back() {
        let spec: RebootPolicySpec = serde_json::from_str(
            r#"{"windows": [{"days": "Sat", "start": "02:00", "end": "04:00", "time_zone": "UTC"}],
                "lease": {"max_percent": 10, "per_label": "site"}}"#,
        )
        .unwrap();
        let p = RebootPolicy::new(&spec).unwrap();
        assert_eq!(p.lease.as_ref().unwrap().ttl_minutes, 30, "the default");
        assert_eq!(p.spec(), spec);
        assert_eq!(RebootPolicy::new(&p.spec()).unwrap(), p);
        assert_eq!(
            RebootPolicy::new(&RebootPolicySpec::default()).unwrap(),
            RebootPolicy::default()
        );

        let with_lease = |l: LeaseSpec| {
            RebootPolicy::new(&RebootPolicySpec {
                windows: vec![],
                lease: Some(l),
            })
            .map(drop)
            .map_err(|e| e.0)
        };
        let base = lease(None);
        for (l, words) in [
            (
                LeaseSpec {
                    max_devices: None,
                    ..base.clone()
                },
                "lease: set max_devices (e.g. 1) or max_percent",
            ),
            (
                LeaseSpec {
                    max_devices: Some(0),
                    ..base.clone()
                },
                "max_devices must be at least 1",
            ),
            (
                LeaseSpec {
                    max_percent: Some(0.0),
                    ..base.clone()
                },
                "max_percent 0 is out of range",
            ),
            (
                LeaseSpec {
                    max_percent: Some(100.5),
                    ..base.clone()
                },
                "max_percent 100.5",
            ),
            (
                LeaseSpec {
                    max_percent: Some(f64::NAN),
                    ..base.clone()
                },
                "max_percent NaN",
            ),
            (
                LeaseSpec {
                    per_label: Some("".into()),
                    ..base.clone()
                },
                "lease: per_label: label key \"\"",
            ),
            (
                LeaseSpec {
                    ttl_minutes: 0,
                    ..base.clone()
                },
                "ttl_minutes 0 is out of range: use 1 to 1440",
            ),
            (
                LeaseSpec {
                    ttl_minutes: 1441,
                    ..base.clone()
                },
                "ttl_minutes 1441",
            ),
        ] {
            let e = with_lease(l).unwrap_err();
            assert!(e.contains(words), "{e}");
        }
        assert!(
            with_lease(LeaseSpec {
                max_devices: None,
                max_percent: Some(100.0),
                ..base
            })
            .is_ok()
        );

        let w = WindowSpec {
            days: "Sat".into(),
            start: "02:00".into(),
            end: "04:00".into(),
            time_zone: "UTC".into(),
            selector: String::new(),
        };
        let bad = WindowSpec {
            time_zone: "Mars/Olympus".into(),
            ..w.clone()
        };
        let e = RebootPolicy::new(&RebootPolicySpec {
            windows: vec![w.clone(), bad],
            lease: None,
        })
        .unwrap_err();
        assert!(
            e.0.starts_with("window 2: unknown time zone \"Mars/Olympus\""),
            "{e}"
        );
        let e = RebootPolicy::new(&RebootPolicySpec {
            windows: vec![w; 33],
            lease: None,
        })
        .unwrap_err();
        assert!(e.0.contains("at most 32"), "{e}");
    }

    /// The edges of the calendar answer without a panic.
    #[test]
    fn windows_at_the_edge_of_time() {
        let w = window("daily", "02:00", "04:00", "Europe/Berlin", "");
        let far = datetime!(9999-12-31 23:00 UTC);
        assert_eq!(w.open_at(far), None);
        assert_eq!(w.next_after(far), (far, far));
        let _ = w.next_after(datetime!(-9999-01-01 00:00 UTC));
    }
}
