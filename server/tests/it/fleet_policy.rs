//! Fleet policy through the real API: device labels (enrollment, admin
//! edits, selectors), rollouts in waves, maintenance windows across
//! daylight-saving changes, urgent releases and the reboot advice in the
//! signed answer. Time is the server's injected clock, never a sleep.

use crate::common::TestApp;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

/// Enrolls `machine_id` with `labels`; answers (device id, token).
async fn enroll_labelled(
    app: &TestApp,
    secret: &str,
    machine_id: &str,
    labels: Value,
) -> (StatusCode, Value) {
    let key = crate::common::device_key("acme", machine_id);
    app.call(
        Method::POST,
        "/v1/devices/enroll",
        None,
        Some(
            json!({"product": "acme", "enrollment_secret": secret, "machine_id": machine_id,
                    "arch": "amd64", "channel": "stable", "labels": labels,
                    "proof": crate::common::enroll_proof(&key, "acme", machine_id)}),
        ),
    )
    .await
}

async fn device(app: &TestApp, secret: &str, machine_id: &str, labels: Value) -> String {
    let (s, b) = enroll_labelled(app, secret, machine_id, labels).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b["token"].as_str().unwrap().to_string()
}

/// The answer to `token`'s device running `current`.
async fn resolve(app: &TestApp, token: &str, current: &str) -> Value {
    let (s, b) = app
        .get(
            &format!("/v1/products/acme/channels/stable/resolve?arch=amd64&current={current}&nonce=nonce-{}", rand::random::<u32>()),
            token,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b
}

async fn put(app: &TestApp, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
    app.call(Method::PUT, path, Some(token), Some(body)).await
}

async fn set_policy(app: &TestApp, policy: Value) -> (StatusCode, Value) {
    put(
        app,
        "/v1/products/acme/channels/stable/reboot-policy",
        &app.admin,
        policy,
    )
    .await
}

fn at(t: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(
        t.as_str().expect("a time"),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
}

#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn labels_are_checked_at_enrollment_edited_by_admins_and_select_devices(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let p = app.product_with_releases("acme", &["1.0.0"]).await;
    device(
        &app,
        &p.secret,
        "m-canary",
        json!({"ring": "canary", "region": "eu"}),
    )
    .await;
    device(&app, &p.secret, "m-us", json!({"region": "us"})).await;
    device(&app, &p.secret, "m-none", json!({})).await;

    for (labels, says) in [
        (json!({"bad key": "x"}), "bad key"),
        (json!({"ring": "can ary"}), "can ary"),
        (json!({"": "x"}), "label"),
    ] {
        let (s, b) = enroll_labelled(&app, &p.secret, "m-bad", labels).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
        assert!(b["detail"].as_str().unwrap().contains(says), "{b}");
    }

    let ids = |b: &Value| -> Vec<String> {
        let mut v: Vec<String> = b["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["machine_id"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    let list = app.get_ok("/v1/devices?label=ring=canary").await;
    assert_eq!(ids(&list), ["m-canary"]);
    let list = app.get_ok("/v1/devices?label=region!=eu").await;
    assert_eq!(ids(&list), ["m-none", "m-us"]);
    let list = app.get_ok("/v1/devices?label=region=eu,ring!=canary").await;
    assert!(ids(&list).is_empty());
    let (s, b) = app.get("/v1/devices?label=region", &app.admin).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");

    // An admin relabels the US device; a viewer may not.
    let us = app.get_ok("/v1/devices?label=region=us").await["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/v1/devices/{us}/labels");
    let viewer = app.viewer().await;
    let (s, _) = put(&app, &path, &viewer, json!({"labels": {"ring": "canary"}})).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, b) = put(
        &app,
        &path,
        &app.admin,
        json!({"labels": {"ring": "canary", "site": "berlin-1"}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["labels"], json!({"ring": "canary", "site": "berlin-1"}));
    let (s, b) = put(&app, &path, &app.admin, json!({"labels": {"ring": "x y"}})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let list = app.get_ok("/v1/devices?label=ring=canary").await;
    assert_eq!(ids(&list), ["m-canary", "m-us"]);
    let audit = app.get_ok("/v1/audit?action=device.labels").await;
    assert_eq!(
        audit["items"][0]["after"],
        json!({"ring": "canary", "site": "berlin-1"}),
        "{audit}"
    );
}

#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn a_rollout_in_waves_reaches_each_wave_in_turn_and_a_pause_holds_it(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let p = app.product_with_releases("acme", &["1.0.0", "2.0.0"]).await;
    let v1 = &p.digests["1.0.0"];
    let canary = device(&app, &p.secret, "m-canary", json!({"ring": "canary"})).await;
    let eu = device(&app, &p.secret, "m-eu", json!({"region": "eu"})).await;
    let rest = device(&app, &p.secret, "m-rest", json!({})).await;
    let t0 = datetime!(2027-05-03 10:00 UTC);
    app.state.clock.set(t0);

    let promote = |body: Value| {
        let app = &app;
        async move {
            app.post(
                "/v1/products/acme/channels/stable/promote",
                &app.admin,
                body,
            )
            .await
        }
    };
    let (s, b) =
        promote(json!({"version": "2.0.0", "percent": 10, "waves": [{"selector": ""}]})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "waves with a percent: {b}");
    let (s, b) = promote(
        json!({"version": "2.0.0", "waves": [{"selector": "ring="}, {"selector": "a=b=c"}]}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (s, b) = promote(json!({"version": "2.0.0", "waves": [
        {"selector": "ring=canary", "hold_minutes": 60},
        {"selector": "region=eu", "ramp_minutes": 30, "hold_minutes": 30},
        {"selector": ""},
    ]}))
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["waves"]["current"], 0, "{b}");

    let gets = |token: &str| {
        let (app, token) = (&app, token.to_string());
        async move {
            let a = resolve(app, &token, v1).await;
            (
                a["update"].as_bool().unwrap(),
                a["release"]["version"].clone(),
            )
        }
    };
    assert_eq!(gets(&canary).await, (true, json!("2.0.0")));
    assert_eq!(gets(&eu).await, (false, json!("1.0.0")));
    assert_eq!(gets(&rest).await, (false, json!("1.0.0")));
    let status = app
        .get_ok("/v1/products/acme/channels/stable/head-status")
        .await;
    let reasons: Vec<&str> = status["not_on_head"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert!(reasons.contains(&"waiting_for_wave"), "{status}");

    // The canary wave soaks an hour; then the EU wave ramps over 30 minutes.
    app.state.clock.set(t0 + Duration::minutes(61));
    let ch = app.get_ok("/v1/products/acme/channels/stable").await;
    assert_eq!(ch["waves"]["current"], 1, "{ch}");
    app.state.clock.set(t0 + Duration::minutes(91));
    assert_eq!(gets(&eu).await, (true, json!("2.0.0")));
    assert_eq!(gets(&rest).await, (false, json!("1.0.0")));

    // A pause stops the waves where they stand, however long it lasts.
    app.set_rollout("acme", "stable", json!({"paused": true}))
        .await;
    app.state.clock.set(t0 + Duration::hours(30));
    assert_eq!(gets(&rest).await, (false, json!("1.0.0")));
    app.set_rollout("acme", "stable", json!({"paused": false}))
        .await;
    assert_eq!(
        gets(&rest).await,
        (false, json!("1.0.0")),
        "the EU wave still soaks"
    );
    app.state
        .clock
        .set(t0 + Duration::hours(30) + Duration::minutes(31));
    assert_eq!(gets(&rest).await, (true, json!("2.0.0")));
    let ch = app.get_ok("/v1/products/acme/channels/stable").await;
    assert_eq!(
        (ch["waves"]["current"].clone(), ch["waves"]["done"].clone()),
        (json!(2), json!(true)),
        "{ch}"
    );
    let history = app
        .get_ok("/v1/products/acme/channels/stable/history")
        .await;
    assert!(history.to_string().contains("waves"), "{history}");
}

#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn the_reboot_advice_follows_windows_across_daylight_saving_and_urgency(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::common::config(dir.path().join("data"));
    // Polls a day apart, so the answer's shorter wait for a window shows.
    config.poll_after_s = 86_400;
    let app = TestApp::spawn_with(pool, config, dir).await;
    let p = app.product_with_releases("acme", &["1.0.0", "2.0.0"]).await;
    let v1 = &p.digests["1.0.0"];
    let berlin = device(
        &app,
        &p.secret,
        "m-berlin",
        json!({"region": "eu", "site": "berlin"}),
    )
    .await;
    let us = device(&app, &p.secret, "m-us", json!({"region": "us"})).await;
    app.post_ok(
        "/v1/products/acme/channels/stable/promote",
        json!({"version": "2.0.0", "percent": 100}),
        StatusCode::OK,
    )
    .await;

    // No policy: no advice at all (agents reboot when staged).
    assert!(resolve(&app, &berlin, v1).await.get("reboot").is_none());

    for (policy, says) in [
        (
            json!({"windows": [{"days": "Sat", "start": "02:00", "end": "04:00", "time_zone": "Europe/Berln"}]}),
            "Europe/Berln",
        ),
        (
            json!({"windows": [{"days": "Sab", "start": "02:00", "end": "04:00", "time_zone": "UTC"}]}),
            "Sab",
        ),
        (
            json!({"windows": [{"days": "Sat", "start": "25:00", "end": "04:00", "time_zone": "UTC"}]}),
            "25:00",
        ),
        (json!({"lease": {"max_devices": 0}}), "max_devices"),
        (json!({"lease": {}}), "max_devices"),
        (json!({"windows": [], "reboot": true}), "reboot"),
    ] {
        let (s, b) = set_policy(&app, policy.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{policy}: {b}");
        assert!(
            b["detail"].as_str().unwrap().contains(says),
            "{policy}: {b}"
        );
    }
    let viewer = app.viewer().await;
    let (s, _) = put(
        &app,
        "/v1/products/acme/channels/stable/reboot-policy",
        &viewer,
        json!({}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    let (s, ch) = set_policy(
        &app,
        json!({"windows": [{"days": "Sat", "start": "02:00", "end": "04:00", "time_zone": "Europe/Berlin", "selector": "region=eu"}],
               "lease": {"max_devices": 2, "per_label": "site"}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{ch}");
    assert_eq!(
        ch["reboot_policy"]["windows_described"],
        json!(["Sat 02:00–04:00 Europe/Berlin"])
    );

    // (clock, allowed, opens_at, closes_at): Berlin is UTC+1 in winter, UTC+2 in summer.
    let cases = [
        (
            datetime!(2027-01-09 00:30 UTC),
            false,
            datetime!(2027-01-09 01:00 UTC),
            datetime!(2027-01-09 03:00 UTC),
        ),
        (
            datetime!(2027-01-09 01:30 UTC),
            true,
            datetime!(2027-01-09 01:00 UTC),
            datetime!(2027-01-09 03:00 UTC),
        ),
        (
            datetime!(2027-07-10 00:30 UTC),
            true,
            datetime!(2027-07-10 00:00 UTC),
            datetime!(2027-07-10 02:00 UTC),
        ),
        (
            datetime!(2027-07-10 02:30 UTC),
            false,
            datetime!(2027-07-17 00:00 UTC),
            datetime!(2027-07-17 02:00 UTC),
        ),
        // The Saturday before the spring change is still winter time.
        (
            datetime!(2027-03-27 01:59 UTC),
            true,
            datetime!(2027-03-27 01:00 UTC),
            datetime!(2027-03-27 03:00 UTC),
        ),
        (
            datetime!(2027-03-27 03:00 UTC),
            false,
            datetime!(2027-04-03 00:00 UTC),
            datetime!(2027-04-03 02:00 UTC),
        ),
    ];
    for (now, allowed, opens, closes) in cases {
        app.state.clock.set(now);
        let a = resolve(&app, &berlin, v1).await;
        let r = &a["reboot"];
        assert_eq!(r["allowed"], allowed, "{now}: {a}");
        assert_eq!(
            r["reason"],
            if allowed {
                "in_window"
            } else {
                "outside_window"
            },
            "{now}: {a}"
        );
        assert_eq!(
            (at(&r["opens_at"]), at(&r["closes_at"])),
            (opens, closes),
            "{now}: {a}"
        );
        assert_eq!(r["window"], "Sat 02:00–04:00 Europe/Berlin");
        assert_eq!(r["lease_group"], "acme.stable.berlin");
        // Outside its window it asks again soon after the window opens
        // (spread over 15 minutes), not a day later.
        let wait = (opens - now).whole_seconds().max(0) as u64;
        let (poll, usual) = (a["poll_after_s"].as_u64().unwrap(), 86_400);
        let (lo, hi) = if allowed {
            (usual, usual)
        } else {
            (usual.min(wait), usual.min(wait + 900))
        };
        assert!(
            (lo..=hi).contains(&poll),
            "{now}: poll {poll} not in {lo}..={hi}"
        );
    }

    // The US device matches no window: any time, still with a lease.
    let a = resolve(&app, &us, v1).await;
    assert_eq!(
        (
            a["reboot"]["allowed"].clone(),
            a["reboot"]["reason"].clone()
        ),
        (json!(true), json!("no_window")),
        "{a}"
    );
    assert_eq!(a["reboot"]["lease_group"], "acme.stable.-");

    // Urgent: outside the window, allowed; not urgent again: held again.
    app.state.clock.set(datetime!(2027-07-10 02:30 UTC));
    let r = app
        .post_ok(
            "/v1/products/acme/releases/2.0.0/urgent",
            json!({"urgent": true}),
            StatusCode::OK,
        )
        .await;
    assert_eq!(r["urgent"], true);
    let a = resolve(&app, &berlin, v1).await;
    assert_eq!(
        (
            a["reboot"]["allowed"].clone(),
            a["reboot"]["reason"].clone()
        ),
        (json!(true), json!("urgent")),
        "{a}"
    );
    app.post_ok(
        "/v1/products/acme/releases/2.0.0/urgent",
        json!({"urgent": false}),
        StatusCode::OK,
    )
    .await;
    assert_eq!(resolve(&app, &berlin, v1).await["reboot"]["allowed"], false);
    let (s, b) = app
        .post(
            "/v1/products/acme/releases/9.9.9/urgent",
            &app.admin,
            json!({"urgent": true}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    let (s, _) = app
        .post(
            "/v1/products/acme/releases/2.0.0/urgent",
            &p.ci,
            json!({"urgent": true}),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "a publisher does not decide urgency"
    );
    let audit = app.get_ok("/v1/audit?action=release.urgent").await;
    assert_eq!(audit["items"].as_array().unwrap().len(), 2, "{audit}");
}

/// The CLI's fleet-policy commands, as the real binary: what they send,
/// what they print, and a clear error (never a panic) for bad input.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn the_cli_sets_labels_waves_windows_and_urgency(pool: PgPool) {
    use crate::common::cli::sluice;
    let app = TestApp::spawn(pool).await;
    let p = app.product_with_releases("acme", &["1.0.0", "2.0.0"]).await;
    device(&app, &p.secret, "m-1", json!({})).await;
    let id = app.get_ok("/v1/devices").await["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let run = |args: Vec<&str>| {
        let app = &app;
        let args: Vec<String> = args.into_iter().map(str::to_string).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            sluice(&app.url, &app.admin, &args).await
        }
    };

    let r = run(vec!["device", "labels", &id, "ring=canary", "site=berlin"]).await;
    assert_eq!(
        r.ok(),
        format!("device {id} has labels ring=canary, site=berlin\n")
    );
    run(vec!["device", "labels", &id, "ring"])
        .await
        .fails(2, "key=value");
    run(vec!["device", "labels", &id, "ring=a b"])
        .await
        .fails(5, "a b");
    let r = run(vec!["device", "list", "--label", "ring=canary,site!=paris"]).await;
    assert!(r.ok().contains(&id), "{}", r.out);
    run(vec!["device", "list", "--label", "ring"])
        .await
        .fails(5, "ring");

    let r = run(vec![
        "channel",
        "promote",
        "--product",
        "acme",
        "--channel",
        "stable",
        "--version",
        "2.0.0",
        "--wave",
        "ring=canary:100:0:60",
        "--wave",
        "",
    ])
    .await;
    assert!(
        r.ok().starts_with(
            "2.0.0 is head of stable, rolling out in 2 waves (ring=canary, then everyone)"
        ),
        "{}",
        r.out
    );
    let ch = app.get_ok("/v1/products/acme/channels/stable").await;
    assert_eq!(
        ch["waves"]["waves"][0],
        json!({"selector": "ring=canary", "percent": 100.0, "ramp_minutes": 0.0, "hold_minutes": 60.0}),
        "{ch}"
    );
    run(vec![
        "channel",
        "promote",
        "--product",
        "acme",
        "--channel",
        "stable",
        "--version",
        "2.0.0",
        "--wave",
        "ring=canary:lots",
    ])
    .await
    .fails(2, "lots");
    run(vec![
        "channel",
        "promote",
        "--product",
        "acme",
        "--channel",
        "stable",
        "--version",
        "2.0.0",
        "--wave",
        "",
        "--percent",
        "5",
    ])
    .await
    .fails(2, "--percent");

    let r = run(vec![
        "channel",
        "reboot-policy",
        "--product",
        "acme",
        "--channel",
        "stable",
        "--window",
        "Sat 02:00-04:00 Europe/Berlin",
        "--window",
        "Mon-Fri 22:00-02:00 UTC region=us",
        "--lease-max",
        "2",
        "--lease-per-label",
        "site",
    ])
    .await;
    assert_eq!(
        r.ok(),
        "devices reboot in Sat 02:00–04:00 Europe/Berlin; Mon-Fri 22:00–02:00 UTC (region=us); at most 2 devices between reboot and boot assessment per site, leases expiring after 30 min\n"
    );
    run(vec![
        "channel",
        "reboot-policy",
        "--product",
        "acme",
        "--channel",
        "stable",
        "--window",
        "Sat 02:00-04:00 Mars/Olympus",
    ])
    .await
    .fails(5, "Mars/Olympus");
    run(vec![
        "channel",
        "reboot-policy",
        "--product",
        "acme",
        "--channel",
        "stable",
        "--window",
        "Sat 02:00",
    ])
    .await
    .fails(2, "HH:MM-HH:MM");
    let r = run(vec![
        "channel",
        "reboot-policy",
        "--product",
        "acme",
        "--channel",
        "stable",
    ])
    .await;
    assert_eq!(r.ok(), "devices reboot at any time\n");

    let r = run(vec![
        "release",
        "urgent",
        "--product",
        "acme",
        "--version",
        "2.0.0",
    ])
    .await;
    assert_eq!(
        r.ok(),
        "2.0.0 is urgent: devices reboot into it outside their maintenance windows\n"
    );
    let r = run(vec![
        "release",
        "urgent",
        "--product",
        "acme",
        "--version",
        "2.0.0",
        "--off",
    ])
    .await;
    assert_eq!(r.ok(), "2.0.0 follows the maintenance windows\n");
    run(vec![
        "release",
        "urgent",
        "--product",
        "acme",
        "--version",
        "7.0.0",
    ])
    .await
    .fails(5, "7.0.0");
}
