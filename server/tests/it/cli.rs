//! The `sluice` CLI's product, release, channel and token commands, run as the
//! real binary against a real server: what they print, how they exit, and
//! that bad input gets a clear error, never a panic. Also the API behind
//! them: promote's default percent and a publisher token reading its own
//! product's channels.

use crate::common;
use crate::common::images;

use common::cli::sluice;
use common::{TestApp, registry};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;

#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn products(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let admin = app.admin.as_str();
    let repo = "r.example/acme/os";

    let created = sluice(
        &app.url,
        admin,
        &[
            "product",
            "create",
            "--name",
            "acme",
            "--repository",
            repo,
            "--description",
            "Acme OS",
        ],
    )
    .await
    .json();
    assert_eq!(created["name"], "acme");
    let first_secret = created["enrollment_secret"].as_str().unwrap().to_owned();
    assert!(first_secret.len() >= 20);
    app.cli(
        admin,
        "product create --name acme --repository r.example/acme/os",
    )
    .await
    .fails(4, "product acme already exists (HTTP 409)");
    sluice(
        &app.url,
        admin,
        &[
            "product",
            "create",
            "--name",
            "Not OK",
            "--repository",
            "r.example/x",
        ],
    )
    .await
    .fails(5, "invalid product name");
    app.cli(admin, "product create --name x")
        .await
        .fails(2, "--repository");

    let list = app.cli(admin, "product list").await;
    let lines: Vec<&str> = list.ok().lines().collect();
    assert_eq!(lines.len(), 2, "{}", list.out);
    assert!(lines[0].starts_with("NAME"), "{}", list.out);
    assert!(
        lines[1].starts_with("acme ") && lines[1].contains(repo) && lines[1].ends_with("Acme OS"),
        "{}",
        list.out
    );
    let list = app.cli(admin, "product list --json").await.json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["repository"], repo);
    assert!(list[0].get("enrollment_secret").is_none());

    let show = app.cli(admin, "product show acme").await;
    assert!(
        show.ok().contains(&format!("repository   {repo}")),
        "{}",
        show.out
    );
    assert_eq!(
        app.cli(admin, "product show acme --json").await.json()["description"],
        "Acme OS"
    );
    app.cli(admin, "product show nope")
        .await
        .fails(5, "product nope not found (HTTP 404)");

    let channel = sluice(
        &app.url,
        admin,
        &[
            "channel",
            "create",
            "--product",
            "acme",
            "stable",
            "--description",
            "what customers run",
        ],
    )
    .await
    .json();
    assert_eq!(
        (&channel["name"], &channel["description"], &channel["head"]),
        (&json!("stable"), &json!("what customers run"), &Value::Null),
        "{channel}"
    );
    app.cli(admin, "channel create --product acme stable")
        .await
        .fails(
            4,
            "channel stable already exists in product acme (HTTP 409)",
        );
    app.cli(admin, "channel create --product nope beta")
        .await
        .fails(5, "product nope not found (HTTP 404)");
    // The secret cannot be shown, only replaced, and only when asked to.
    let r = app.cli(admin, "product enrollment-secret acme").await;
    r.fails(2, "--rotate");
    let r = app
        .cli(admin, "product enrollment-secret acme --rotate")
        .await;
    let secret = r.ok().trim().to_owned();
    assert_eq!(r.out, format!("{secret}\n"), "the secret alone on stdout");
    assert_ne!(secret, first_secret);
    // The printed secret is the one that works now; the first one no longer does.
    app.enroll("acme", &secret, "m-1", "stable").await;
    let (s, b) = app
        .call(
            reqwest::Method::POST,
            "/v1/devices/enroll",
            None,
            Some(json!({"product": "acme", "enrollment_secret": first_secret, "machine_id": "m-2",
                        "arch": "amd64", "channel": "stable",
                        "proof": common::enroll_proof(&common::device_key("acme", "m-2"), "acme", "m-2")})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    let rotated = app
        .cli(admin, "product enrollment-secret acme --rotate --json")
        .await
        .json();
    assert_eq!(rotated["name"], "acme");
    assert!(
        rotated["enrollment_secret"]
            .as_str()
            .is_some_and(|s| s != secret)
    );
    // No secret in the audit log.
    let (_, audit) = app.get("/v1/audit", admin).await;
    let audit = audit.to_string();
    assert!(audit.contains("product.rotate_secret"), "{audit}");
    assert!(!audit.contains(&secret) && !audit.contains(&first_secret));
    app.cli(admin, "product enrollment-secret nope --rotate")
        .await
        .fails(5, "product nope not found");

    // A viewer reads but may not rotate.
    let viewer = app.viewer().await;
    assert!(app.cli(&viewer, "product list").await.ok().contains("acme"));
    app.cli(&viewer, "product enrollment-secret acme --rotate")
        .await
        .fails(3, "this needs an admin (HTTP 403)");
    // No token: told how to get one.
    app.cli("", "product list").await.fails(3, "SLUICE_TOKEN");
}

#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn tokens(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    app.product("acme", "r.example/acme/os").await;
    let admin = app.admin.as_str();

    let created = sluice(
        &app.url,
        admin,
        &["token", "create", "--name", "ci acme", "--product", "acme"],
    )
    .await
    .json();
    let id = created["id"].as_str().unwrap().to_owned();
    let ci = created["token"].as_str().unwrap().to_owned();

    let listed = app.cli(admin, "token list --json").await.json();
    let mine = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id.as_str())
        .expect("the new token is listed");
    assert_eq!(mine["role"], "publisher");
    assert_eq!(mine["products"], json!(["acme"]));
    assert!(mine["revoked_at"].is_null());
    assert!(mine.get("token").is_none(), "never the secret");
    let table = app.cli(admin, "token list").await;
    let row = table
        .ok()
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{id} not in {}", table.out))
        .to_owned();
    assert!(
        row.contains("ci acme")
            && row.contains("publisher")
            && row.contains(" acme ")
            && row.contains("expires"),
        "{row}"
    );
    assert!(!table.out.contains(&ci));

    // A publisher token may neither list nor revoke tokens.
    app.cli(&ci, "token list")
        .await
        .fails(3, "this needs an admin (HTTP 403)");

    let r = app.cli(admin, &format!("token revoke {id}")).await;
    assert_eq!(r.ok(), format!("token {id} revoked\n"));
    // It stops working at once, and the list says so.
    app.cli(&ci, "product list")
        .await
        .fails(3, "the token has been revoked (HTTP 401)");
    let table = app.cli(admin, "token list").await;
    assert!(
        table
            .ok()
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("revoked 2")),
        "{}",
        table.out
    );
    let unknown = uuid::Uuid::new_v4().to_string();
    app.cli(admin, &format!("token revoke {unknown}"))
        .await
        .fails(5, &format!("token {unknown} not found (HTTP 404)"));
    app.cli(admin, "token revoke not-a-uuid")
        .await
        .fails(2, "not-a-uuid");
}

#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn releases_and_channels(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let acme = app.product_with_images("acme", &["1.0.0", "1.1.0"]).await;
    let (repo, secret, ci) = (&acme.repo, &acme.secret, acme.ci.as_str());
    let (d1, d2) = (&acme.digests["1.0.0"], &acme.digests["1.1.0"]);
    let admin = app.admin.as_str();
    app.product(
        "other",
        &format!("{}/{}", registry(), images::unique_repo("cli-other")),
    )
    .await;
    let other_ci = app.publisher(&["other"]).await;

    // Nothing published yet.
    let empty = app.cli(ci, "release list --product acme").await;
    assert!(
        empty.ok().starts_with("no releases in product acme"),
        "{}",
        empty.out
    );
    for v in ["1.0.0", "1.1.0"] {
        let published = app
            .cli(
                ci,
                &format!("release publish --product acme --version {v} --image {repo}:{v}"),
            )
            .await;
        // No `warnings` in the answer: nothing but the JSON.
        assert!(published.json()["digest"].is_string());
    }

    let list = app.cli(ci, "release list --product acme").await;
    let lines: Vec<&str> = list.ok().lines().collect();
    assert_eq!(lines.len(), 3, "{}", list.out);
    assert!(lines[0].starts_with("VERSION"));
    assert!(
        lines[1].starts_with("1.1.0 ") && lines[1].ends_with(d2.as_str()),
        "{}",
        list.out
    );
    assert!(
        lines[2].starts_with("1.0.0 ") && lines[2].contains("active"),
        "{}",
        list.out
    );
    let page = app
        .cli(ci, "release list --product acme --limit 1 --json")
        .await
        .json();
    assert_eq!(page["items"][0]["version"], "1.1.0");
    assert_eq!(page["next_cursor"], "1");
    let next = app
        .cli(ci, "release list --product acme --limit 1 --cursor 1")
        .await;
    assert!(
        next.ok().contains("1.0.0") && !next.out.contains("1.1.0"),
        "{}",
        next.out
    );
    let more = app.cli(ci, "release list --product acme --limit 1").await;
    assert!(
        more.ok().ends_with("(more: add --cursor 1)\n"),
        "{}",
        more.out
    );
    app.cli(admin, "release list --product nope")
        .await
        .fails(5, "product nope not found (HTTP 404)");

    app.cli(ci, "release list --product nope").await.fails(
        3,
        "only its own products (acme), not product nope (HTTP 403)",
    );
    let show = app.cli(ci, "release show --product acme 1.0.0").await;
    assert!(
        show.ok().contains(&format!("image       {repo}@{d1}")),
        "{}",
        show.out
    );
    assert!(
        show.out.contains("PLATFORM") && show.out.contains("linux/amd64"),
        "{}",
        show.out
    );
    let shown = app
        .cli(ci, "release show --product acme --version 1.0.0 --json")
        .await
        .json();
    assert_eq!(&shown["digest"], d1);
    assert!(
        !shown["platforms"][0]["signed_by"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    app.cli(ci, "release show --product acme 9.9.9")
        .await
        .fails(5, "release 9.9.9 of product acme not found (HTTP 404)");

    // Promote: a staged rollout of 10 % by default, and the line says so.
    let promote = |token: &str, product: &str, extra: &str| {
        let line = format!("channel promote --product {product} --channel stable {extra}");
        let token = token.to_owned();
        let app = &app;
        async move { app.cli(&token, &line).await }
    };
    let promoted = promote(ci, "acme", "--version 1.0.0").await;
    assert_eq!(
        promoted.ok(),
        "1.0.0 is head of stable at 10 % (raise with `sluice channel rollout --product acme --channel stable --percent N`)\n\
         1.0.0 becomes the channel's first head at 10 %; devices outside that share keep what they run.\n"
    );
    let (_, c) = app.get("/v1/products/acme/channels/stable", admin).await;
    assert_eq!(c["rollout"]["percent"], 10.0);
    assert!(c["rollout"]["ramp"].is_null());
    // Rolled out fully, it is what the next promote makes the base.
    app.cli(
        admin,
        "channel rollout --product acme --channel stable --percent 100",
    )
    .await
    .ok();

    // With a ramp; the server's plan follows the summary.
    let promoted = promote(
        ci,
        "acme",
        "--version 1.1.0 --percent 5 --ramp-to 50 --ramp-minutes 60",
    )
    .await;
    assert_eq!(
        promoted.ok(),
        "1.1.0 is head of stable at 5 % (base 1.0.0), ramping to 50 % over 60 min\n\
         1.1.0 becomes the head at 5 %, ramping to 50 % over 60 min; 1.0.0, fully rolled out, \
         becomes the base: devices outside that share get 1.0.0.\n"
    );

    // The CI token reads its own product's channel: head, base, rollout, gate, devices.
    app.enroll("acme", secret, "m-1", "stable").await;
    let c = app
        .cli(ci, "channel show --product acme stable --json")
        .await
        .json();
    assert_eq!(
        (c["head"].as_str(), c["base"].as_str()),
        (Some("1.1.0"), Some("1.0.0"))
    );
    assert_eq!(c["rollout"]["percent"], 5.0);
    assert_eq!(c["rollout"]["ramp"]["to_percent"], 50.0);
    assert_eq!(c["rollout"]["ramp"]["over_minutes"], 60.0);
    assert_eq!(c["gate"]["tripped"], false);
    assert_eq!(c["devices"][0]["count"], 1);
    let show = app
        .cli(ci, "channel show --product acme --channel stable")
        .await;
    let text = show.ok();
    for want in [
        "channel      stable of acme",
        "head         1.1.0",
        "base         1.0.0",
        "paused       no",
        "gate         ok (0 of 0 reports failed",
        "ramp from 5 % to 50 % over 60 min since",
        "VERSION  STATUS",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
    app.cli(ci, "channel show --product acme nope")
        .await
        .fails(5, "channel nope of product acme not found (HTTP 404)");
    // Another product's token may not read it, nor change it.
    app.cli(&other_ci, "channel show --product acme stable")
        .await
        .fails(3, "not product acme (HTTP 403)");
    app.cli(
        ci,
        "channel rollout --product acme --channel stable --percent 50",
    )
    .await
    .fails(3, "this needs an admin (HTTP 403)");

    // Bad input: unknown version or product, a ramp downwards.
    for (token, product, extra, code, error) in [
        (
            ci,
            "acme",
            "--version 9.9.9",
            5,
            "release 9.9.9 of product acme not found (HTTP 404)",
        ),
        (
            ci,
            "nope",
            "--version 1.0.0",
            3,
            "not allowed to publish to product nope (HTTP 403)",
        ),
        (
            admin,
            "nope",
            "--version 1.0.0",
            5,
            "product nope not found (HTTP 404)",
        ),
        (
            ci,
            "acme",
            "--version 1.0.0 --percent 60 --ramp-to 50 --ramp-minutes 5",
            2,
            "only raises the percent",
        ),
    ] {
        promote(token, product, extra).await.fails(code, error);
    }

    // `--json` on promote prints the channel, for scripts.
    let c = promote(admin, "acme", "--version 1.0.0 --percent 100 --json")
        .await
        .json();
    assert_eq!(
        (c["head"].as_str(), c["rollout"]["percent"].as_f64()),
        (Some("1.0.0"), Some(100.0))
    );
}

/// Without a `percent` (or with `null`) a promote starts a staged rollout at 10 %.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn promote_defaults_to_ten_percent(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let acme = app.product_with_images("acme", &["1.0.0"]).await;
    app.post_ok(
        "/v1/products/acme/releases",
        json!({"version": "1.0.0", "image": format!("{}:1.0.0", acme.repo)}),
        StatusCode::CREATED,
    )
    .await;
    let promote = |body: Value| {
        app.post(
            "/v1/products/acme/channels/stable/promote",
            &app.admin,
            body,
        )
    };
    for (body, want) in [
        (json!({"version": "1.0.0"}), 10.0),
        (json!({"version": "1.0.0", "percent": 100}), 100.0),
        (json!({"version": "1.0.0", "percent": null}), 10.0),
        (json!({"version": "1.0.0", "percent": 0}), 0.0),
    ] {
        let (s, c) = promote(body.clone()).await;
        assert_eq!(s, StatusCode::OK, "{body}: {c}");
        assert_eq!(c["rollout"]["percent"].as_f64(), Some(want), "{body}: {c}");
    }
    // A ramp starting at the default: it may not go below 10.
    let (s, c) =
        promote(json!({"version": "1.0.0", "ramp": {"to_percent": 5, "over_minutes": 10}})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{c}");
    let (s, c) =
        promote(json!({"version": "1.0.0", "ramp": {"to_percent": 50, "over_minutes": 10}})).await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["rollout"]["ramp"]["from_percent"], 10.0);
}

/// A publisher token reads its own product's channels (one, all, history,
/// stats) and releases, and nothing of another product's, nor fleet-wide or
/// admin-only data.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn publisher_reads_its_own_channels(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    app.product("acme", "r.example/acme").await;
    app.product("other", "r.example/other").await;
    for p in ["acme", "other"] {
        app.channel(p, "stable").await;
    }
    let ci = app.publisher(&["acme"]).await;
    for (product, want) in [("acme", StatusCode::OK), ("other", StatusCode::FORBIDDEN)] {
        for path in [
            format!("/v1/products/{product}/channels"),
            format!("/v1/products/{product}/channels/stable"),
            format!("/v1/products/{product}/channels/stable/history"),
            format!("/v1/products/{product}/channels/stable/stats"),
            format!("/v1/products/{product}/releases"),
        ] {
            let (s, b) = app.get(&path, &ci).await;
            assert_eq!(s, want, "{path}: {b}");
            if want == StatusCode::FORBIDDEN {
                assert!(
                    b["detail"]
                        .as_str()
                        .unwrap()
                        .contains("only its own products (acme)"),
                    "{b}"
                );
            }
        }
    }
    let (_, c) = app.get("/v1/products/acme/channels/stable", &ci).await;
    assert_eq!(c["name"], "stable");
    // An unknown product is refused the same way as another's: no hint it exists.
    let (s, _) = app.get("/v1/products/nope/channels/stable", &ci).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Still not: fleet-wide and admin-only reads.
    for path in [
        "/v1/products",
        "/v1/products/acme",
        "/v1/devices",
        "/v1/audit",
        "/v1/tokens",
    ] {
        let (s, b) = app.get(path, &ci).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}: {b}");
    }
}

/// A `warnings` array in the answer to publish or promote is printed on
/// stderr, one `warning:` line each, after the answer on stdout. The server
/// here is a stub that answers every request with the same JSON.
#[tokio::test]
async fn warnings_go_to_stderr() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let answer = json!({"name": "stable", "head": "1.4.0", "base": null, "version": "1.4.0",
        "rollout": {"percent": 10.0, "ramp": null},
        "warnings": ["no device on stable runs 1.3.0", "the gate is off"]})
    .to_string();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read the head and the body its Content-Length announces.
                loop {
                    let n = conn.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map(|v| v.trim().parse::<usize>().unwrap())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                conn.write_all(response.as_bytes()).await.unwrap();
            });
        }
    });
    for line in [
        "release publish --product acme --version 1.4.0 --image r.example/acme:1.4.0",
        "channel promote --product acme --channel stable --version 1.4.0",
    ] {
        let args: Vec<&str> = line.split_whitespace().collect();
        let r = sluice(&url, "t", &args).await;
        assert_eq!(r.code, 0, "{line}: {}", r.err);
        assert_eq!(
            r.err, "warning: no device on stable runs 1.3.0\nwarning: the gate is off\n",
            "{line}"
        );
        assert!(r.out.contains("1.4.0"), "{line}: {}", r.out);
    }
}

/// `sluice device retry`: clears what the device reported as failed, all of
/// it or one version, says what it cleared, and refuses when nothing failed.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn device_retry(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let secret = app.product("acme", "r.example/acme/os").await;
    app.channel("acme", "stable").await;
    let (id, token) = app.enroll("acme", &secret, "m-1", "stable").await;
    let (d1, d2) = (
        format!("sha256:{}", "1".repeat(64)),
        format!("sha256:{}", "2".repeat(64)),
    );
    for (version, digest) in [("1.1.0", &d1), ("1.2.0", &d2)] {
        let (s, b) = app
            .post(
                &format!("/v1/devices/{id}/events"),
                &token,
                json!({"kind": "rolled_back", "version": version, "digest": digest}),
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    }
    let retry = |extra: &str| {
        let line = format!("device retry {extra}");
        let app = &app;
        async move { app.cli(&app.admin, &line).await }
    };

    let r = retry(&format!("{id} --version 1.2.0")).await;
    assert_eq!(
        r.ok(),
        format!("device {id} will try again at its next check-in: 1.2.0 ({d2})\n")
    );
    // The next answer carries the digest to forget; 1.1.0 stays failed.
    let (s, b) = app
        .get(
            "/v1/products/acme/channels/stable/resolve?arch=amd64&nonce=retry-nonce-1",
            &token,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["retry"], json!([d2]), "{b}");
    let r = retry(&id).await;
    assert!(r.ok().contains(&format!("1.1.0 ({d1})")), "{}", r.out);

    retry(&format!("{id} --version 9.9.9"))
        .await
        .fails(4, "has no failed release 9.9.9 to try again (it reported none, or cleared it since) (HTTP 409)");
    retry(&format!("{id} --digest sha256:short"))
        .await
        .fails(5, "digest must be `sha256:<64 hex>`");
    retry(&format!("{id} --version 1.1.0 --digest {d1}"))
        .await
        .fails(2, "cannot be used with");
    retry("not-a-uuid").await.fails(2, "invalid value");
    // Audited with the admin's name.
    let (_, audit) = app.get("/v1/audit", &app.admin).await;
    assert_eq!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "device.retry")
            .count(),
        2,
        "{audit}"
    );
}
