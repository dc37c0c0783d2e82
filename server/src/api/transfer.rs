//! How many bytes a device on a channel's base fetches to reach its head.
//!
//! The agent pulls a layer whole unless it is `zstd:chunked`; then it
//! fetches the table of contents and the files the running slot lacks
//! (`agent/src/chunked.rs`). So for each platform of the head: a layer
//! that is not `zstd:chunked` counts whole; a `zstd:chunked` one counts its
//! table and the compressed bytes of every file whose content no layer of
//! the base holds. Tables are read from the registry with range requests
//! and kept in memory by layer digest (they never change).
//!
//! The figure is the requests the agent makes when its slot holds the base
//! (ranges coalesced as it coalesces them, `chunked::coalesce`), not a
//! promise: a device whose slot does not hold the base, or that cannot
//! check a file out, fetches more, up to the whole image. A base without
//! tables (gzip, plain zstd) gives the agent nothing to copy: every file
//! of the head is fetched.

use crate::api::auth::ProductReader;
use crate::api::channels::ChannelPath;
use crate::app::{AppState, Problems};
use crate::error::{Error, Json, Result};
use crate::infra::registry::{PlatformImage, best_fit};
use axum::extract::State;
use serde::{Deserialize, Serialize};
use sluice_protocol::chunked::{coalesce, image_files};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// `GET .../channels/{channel}/transfer`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChannelTransfer {
    /// The channel's head.
    pub head: Option<String>,
    /// Its base: the release the devices not yet on the head run.
    pub base: Option<String>,
    /// Per platform of the head.
    pub platforms: Vec<PlatformTransfer>,
}

/// What reaching the head costs a device of one platform.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PlatformTransfer {
    /// `os/architecture[/variant]`.
    pub platform: String,
    /// The head image's compressed size: what a full pull fetches.
    pub head_bytes: u64,
    /// What a device on the base fetches, as the tables of contents say
    /// (`None` when it cannot be told: the release was published before
    /// Sluice recorded layers).
    pub expected_bytes: Option<u64>,
    /// Layers pulled partially (`zstd:chunked`, with a base to copy from).
    pub partial_layers: u32,
    /// Layers pulled whole.
    pub full_layers: u32,
    /// How the figure was made, in words.
    pub note: String,
}

/// A table of contents and its own compressed length.
struct Summary {
    length: u64,
    toc: sluice_protocol::chunked::Toc,
}

/// Tables read so far, by layer digest; emptied when it holds more than
/// [`CACHE_LAYERS`] (a few MB each for a big image).
#[derive(Default)]
pub struct Cache(Mutex<HashMap<String, Arc<Summary>>>);

const CACHE_LAYERS: usize = 32;

async fn summary(
    state: &AppState,
    repository: &str,
    layer: &crate::infra::registry::LayerImage,
) -> Result<Arc<Summary>> {
    if let Some(s) = state.transfer.0.lock().expect("cache").get(&layer.digest) {
        return Ok(s.clone());
    }
    let toc = state.registry.table_of_contents(repository, layer).await?;
    let length = layer
        .table_of_contents()
        .and_then(|l| l.ok())
        .map_or(0, |l| l.length);
    let s = Arc::new(Summary { length, toc });
    let mut cache = state.transfer.0.lock().expect("cache");
    if cache.len() >= CACHE_LAYERS {
        cache.clear();
    }
    cache.insert(layer.digest.clone(), s.clone());
    Ok(s)
}

fn platform_name(p: &PlatformImage) -> String {
    match &p.variant {
        Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
        None => format!("{}/{}", p.os, p.architecture),
    }
}

/// The estimate for one head platform against the base's platforms.
async fn estimate(
    state: &AppState,
    repository: &str,
    head: &PlatformImage,
    base: Option<&[PlatformImage]>,
) -> PlatformTransfer {
    let mut t = PlatformTransfer {
        platform: platform_name(head),
        head_bytes: head.size,
        expected_bytes: None,
        partial_layers: 0,
        full_layers: 0,
        note: String::new(),
    };
    if head.layers.is_empty() {
        t.note = "published before Sluice recorded layers: publish it again to see".into();
        return t;
    }
    let arch = match &head.variant {
        Some(v) => format!("{}/{v}", head.architecture),
        None => head.architecture.clone(),
    };
    let base = base.and_then(|b| {
        best_fit(b, &arch, |p| {
            (p.architecture.as_str(), p.variant.as_deref())
        })
    });
    // What the base holds, as the agent's index of it says: the files its
    // zstd:chunked layers leave, whiteouts applied.
    let mut held: HashSet<[u8; 32]> = HashSet::new();
    let mut problems = Vec::new();
    if let Some(b) = base {
        let mut tocs = Vec::new();
        for layer in b.layers.iter().filter(|l| l.table_of_contents().is_some()) {
            match summary(state, repository, layer).await {
                Ok(s) => tocs.push(s),
                Err(e) => problems.push(format!("base layer {}: {e}", layer.digest)),
            }
        }
        held = image_files(tocs.iter().map(|s| &s.toc))
            .into_values()
            .collect();
    }
    let mut bytes = 0u64;
    for layer in &head.layers {
        let partial = if base.is_some() && layer.table_of_contents().is_some() {
            match summary(state, repository, layer).await {
                // The requests the agent makes: the table, then the
                // coalesced ranges of the files the base lacks.
                Ok(s) => Some(
                    s.length
                        + coalesce(
                            s.toc
                                .entries
                                .iter()
                                .filter_map(|e| e.content.as_ref())
                                .filter(|(d, _, _)| !held.contains(d))
                                .map(|(_, start, end)| (*start, *end)),
                        )
                        .iter()
                        .map(|(start, end)| end - start)
                        .sum::<u64>(),
                ),
                Err(e) => {
                    problems.push(format!("layer {}: {e}", layer.digest));
                    None
                }
            }
        } else {
            None
        };
        match partial {
            Some(n) => {
                t.partial_layers += 1;
                bytes += n.min(layer.size);
            }
            None => {
                t.full_layers += 1;
                bytes += layer.size;
            }
        }
    }
    t.expected_bytes = Some(bytes);
    t.note = match (base, t.partial_layers, t.full_layers) {
        (None, _, _) => "no base to copy from: the whole image".into(),
        (Some(_), 0, _) => "no zstd:chunked layers: every layer whole".into(),
        (Some(_), _, _) if held.is_empty() => {
            "zstd:chunked, but the base has no tables of contents: every file fetched".into()
        }
        (Some(_), _, 0) => {
            "zstd:chunked: the tables of contents and the files the base lacks".into()
        }
        _ => "zstd:chunked layers partially, the others whole".into(),
    };
    if !problems.is_empty() {
        t.note += &format!(" (counted whole: {})", problems.join("; "));
    }
    t
}

/// How many bytes a device on the channel's base fetches to reach its head,
/// per platform, as the releases' tables of contents say (see the module's
/// notes for what it leaves out). Reads the tables from the registry the
/// first time.
#[utoipa::path(get, path = "/v1/products/{product}/channels/{channel}/transfer", tag = "channels",
    params(ChannelPath),
    security(("bearer" = [])),
    responses((status = 200, body = ChannelTransfer), Problems<401, 403, 404>))]
async fn channel_transfer(
    State(state): State<AppState>,
    _v: ProductReader,
    path: ChannelPath,
) -> Result<Json<ChannelTransfer>> {
    let mut conn = state.db.acquire().await?;
    let (p, c) = path.load(&mut conn, false).await?;
    drop(conn);
    let release = |v: Option<String>| {
        let (db, product) = (&state.db, &p.name);
        async move {
            match v {
                None => Ok::<_, Error>(None),
                Some(v) => Ok(crate::api::releases::fetch(db, product, Some(&v), 1, 0)
                    .await?
                    .pop()),
            }
        }
    };
    let head = release(c.head()).await?;
    let base = release(c.base()).await?;
    let base_platforms: Option<Vec<PlatformImage>> =
        base.map(|b| b.platforms.into_iter().map(|p| p.image).collect());
    let mut platforms = Vec::new();
    if let Some(h) = head {
        for hp in h.platforms {
            platforms
                .push(estimate(&state, &p.repository, &hp.image, base_platforms.as_deref()).await);
        }
    }
    Ok(Json(ChannelTransfer {
        head: c.head(),
        base: c.base(),
        platforms,
    }))
}

/// The routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(channel_transfer))
}
