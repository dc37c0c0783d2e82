//! `?limit=&cursor=` paging shared by every list: the answer carries the items
//! and the cursor of the next page, absent on the last one.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Largest page a client may ask for.
pub const MAX_LIMIT: i64 = 1000;
/// Page size when the client does not say.
pub const DEFAULT_LIMIT: i64 = 100;

/// Paging parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Items per page (1–1000, default 100).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl PageParams {
    /// The page size, clamped to 1..=1000.
    pub fn limit(&self) -> i64 {
        self.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT)
    }

    /// The cursor as a number (lists ordered by a serial id).
    pub fn cursor_i64(&self) -> Result<Option<i64>> {
        self.cursor
            .as_deref()
            .map(|c| {
                c.parse().map_err(|_| {
                    Error::BadRequest(format!(
                        "invalid cursor {c:?}: pass `next_cursor` from the previous page"
                    ))
                })
            })
            .transpose()
    }
}

/// One page of a list.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// A page from `limit + 1` fetched rows: the extra row only says there is more.
    pub fn from_rows(mut rows: Vec<T>, limit: i64, cursor_of: impl Fn(&T) -> String) -> Self {
        let more = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        let next_cursor = if more {
            rows.last().map(cursor_of)
        } else {
            None
        };
        Page {
            items: rows,
            next_cursor,
        }
    }
}
