//! The health gate's tallies (`gate_tallies`, kept by triggers on
//! `devices`): after any sequence of writes, from any path and from several
//! connections at once, they equal a count over the devices themselves, the
//! count the gate made before (with the outcome and failure names the Rust
//! code uses).

use crate::common::TestApp;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice_protocol::EventKind;
use sqlx::PgPool;
use std::collections::BTreeMap;

type Tally = BTreeMap<(String, String), (i64, i64)>;

/// Rows of (channel, version, reports, failures) as a [`Tally`].
fn tally(rows: Vec<(String, String, i64, i64)>) -> Tally {
    rows.into_iter()
        .map(|(c, v, r, f)| ((c, v), (r, f)))
        .collect()
}

/// Reports and failures per (channel, version), counted over the devices.
async fn counted(db: &PgPool) -> Tally {
    tally(
        sqlx::query_as(
            "SELECT channel, status_version, count(*), count(*) FILTER (WHERE status = ANY($2))
             FROM devices WHERE status_offered AND status_version IS NOT NULL AND status = ANY($1)
             GROUP BY channel, status_version",
        )
        .bind(EventKind::names(&EventKind::OUTCOMES))
        .bind(EventKind::names(&EventKind::FAILURES))
        .fetch_all(db)
        .await
        .unwrap(),
    )
}

/// The same, as the triggers kept it.
async fn kept(db: &PgPool) -> Tally {
    tally(
        sqlx::query_as(
            "SELECT channel, version, reports, failures FROM gate_tallies WHERE reports <> 0 OR failures <> 0",
        )
        .fetch_all(db)
        .await
        .unwrap(),
    )
}

/// One random write to the devices table, as the event handler, a check-in
/// moving a device's channel, a reset or a deletion makes it.
async fn random_write(db: &PgPool, rng: &mut StdRng, product: &str, secret: &str, app: &TestApp) {
    let statuses = [
        "idle",
        "downloading",
        "staged",
        "healthy",
        "failed",
        "rolled_back",
    ];
    let versions = [None, Some("1.0.0"), Some("1.1.0")];
    let channels = ["stable", "beta"];
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM devices ORDER BY id")
        .fetch_all(db)
        .await
        .unwrap();
    let pick = ids[rng.gen_range(0..ids.len())];
    match rng.gen_range(0..10) {
        0..=5 => {
            sqlx::query(
                "UPDATE devices SET status = $2, status_version = $3, status_offered = $4 WHERE id = $1",
            )
            .bind(pick)
            .bind(statuses[rng.gen_range(0..statuses.len())])
            .bind(versions[rng.gen_range(0..versions.len())])
            .bind(rng.gen_bool(0.8))
            .execute(db)
            .await
            .unwrap();
        }
        6 | 7 => {
            sqlx::query("UPDATE devices SET channel = $2, last_seen = now() WHERE id = $1")
                .bind(pick)
                .bind(channels[rng.gen_range(0..channels.len())])
                .execute(db)
                .await
                .unwrap();
        }
        8 => {
            // A check-in that changes nothing the tally reads.
            sqlx::query("UPDATE devices SET last_seen = now() WHERE id = $1")
                .bind(pick)
                .execute(db)
                .await
                .unwrap();
        }
        _ => {
            if ids.len() > 3 {
                sqlx::query("DELETE FROM devices WHERE id = $1")
                    .bind(pick)
                    .execute(db)
                    .await
                    .unwrap();
            }
            let machine = format!("m-{}", rng.r#gen::<u32>());
            let channel = channels[rng.gen_range(0..channels.len())];
            app.enroll(product, secret, &machine, channel).await;
        }
    }
}

/// Random writes, some from several connections at once, keep the tallies
/// equal to the count; the gate then trips on them through the API.
#[sqlx::test(migrator = "sluice_server::db::MIGRATOR")]
async fn the_gate_tallies_follow_every_write_to_the_devices(pool: PgPool) {
    let app = TestApp::spawn(pool.clone()).await;
    let p = app.product_with_releases("acme", &["1.0.0", "1.1.0"]).await;
    app.channel("acme", "beta").await;
    for i in 0..8 {
        let channel = if i % 2 == 0 { "stable" } else { "beta" };
        app.enroll("acme", &p.secret, &format!("m{i}"), channel)
            .await;
    }
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    for step in 0..60 {
        // Four writers at once, on their own connections.
        let mut rngs: Vec<StdRng> = (0..4).map(|_| StdRng::seed_from_u64(rng.r#gen())).collect();
        let writes = rngs
            .iter_mut()
            .map(|r| random_write(&pool, r, "acme", &p.secret, &app));
        futures::future::join_all(writes).await;
        assert_eq!(
            kept(&pool).await,
            counted(&pool).await,
            "seed {seed}, step {step}"
        );
    }

    // The gate reads them: every device on stable reports a failure of the
    // head it was offered, and the next outcome through the API trips it.
    app.post_as(
        &p.ci,
        "/v1/products/acme/channels/stable/promote",
        serde_json::json!({"version": "1.1.0", "percent": 100}),
        reqwest::StatusCode::OK,
    )
    .await;
    app.set_rollout(
        "acme",
        "stable",
        serde_json::json!({"gate": {"max_failure_percent": 20, "min_reports": 1}}),
    )
    .await;
    app.enroll("acme", &p.secret, "m-last", "stable").await;
    sqlx::query(
        "UPDATE devices SET status = 'failed', status_version = '1.1.0', status_offered = true
         WHERE channel = 'stable'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let product_id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM products WHERE name = 'acme'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let halted = sluice_server::api::channels::check_gate(&app.state, product_id, "acme", "stable")
        .await
        .unwrap();
    assert!(halted, "every device on stable failed the head");
    let ch = app.get_ok("/v1/products/acme/channels/stable").await;
    assert_eq!(ch["rollout"]["paused"], true, "{ch}");
    assert_eq!(kept(&pool).await, counted(&pool).await);
}
