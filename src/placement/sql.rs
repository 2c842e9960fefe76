//! Placement from SQL (PostgreSQL, MySQL/MariaDB): one query per lookup with the mailbox bound as its
//! parameter, never pasted into the text; the first column is the store, the optional second the login.
//! A pool of connections made when first needed (a database down at start fails lookups, not the start).

use std::time::Duration;

use sqlx::AnyPool;
use sqlx::Row as _;
use sqlx::any::AnyPoolOptions;

use super::{Lookup, Placed};
use crate::config::SqlPlacement;

/// One tenant's SQL source.
#[derive(Debug)]
pub struct SqlSource {
    pool: AnyPool,
    query: String,
}

impl SqlSource {
    /// The source, with `password` set in the URL (encoded as URLs need).
    ///
    /// # Errors
    /// The URL cannot be used.
    pub fn new(
        settings: &SqlPlacement,
        password: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, String> {
        sqlx::any::install_default_drivers();
        let mut url = url::Url::parse(&settings.url).map_err(|e| format!("sql.url: {e}"))?;
        if url.scheme() == "mariadb" {
            // sqlx knows MariaDB as mysql.
            let rest = &settings.url[url.scheme().len()..];
            url = url::Url::parse(&format!("mysql{rest}")).map_err(|e| format!("sql.url: {e}"))?;
        }
        if let Some(pw) = password {
            url.set_password(Some(pw))
                .map_err(|()| "sql.url: a password cannot be set on this URL".to_string())?;
        }
        let pool = AnyPoolOptions::new()
            .max_connections(u32::try_from(settings.pool.max(1)).unwrap_or(u32::MAX))
            .acquire_timeout(timeout)
            // A broken connection is found by the next query and replaced; test none before use.
            .test_before_acquire(false)
            .connect_lazy(url.as_str())
            // The error may quote the URL: say what failed without it (it holds the password).
            .map_err(|e| {
                format!(
                    "sql.url: cannot be used ({})",
                    e.to_string().replace(url.as_str(), "URL")
                )
            })?;
        Ok(Self {
            pool,
            query: settings.query.clone(),
        })
    }

    /// Looks `mailbox` up.
    pub async fn lookup(&self, mailbox: &str) -> Result<Lookup, String> {
        // The query is the operator's, from the config; the mailbox goes only in as a bound parameter.
        let row = sqlx::query(sqlx::AssertSqlSafe(self.query.clone()))
            .bind(mailbox.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| format!("SQL query: {e}"))?;
        let Some(row) = row else {
            return Ok(Lookup::NotFound);
        };
        let store: Option<String> = row
            .try_get(0)
            .map_err(|e| format!("SQL answer's first column: {e}"))?;
        let Some(store) = store.filter(|s| !s.is_empty()) else {
            return Ok(Lookup::NotFound);
        };
        let login = if row.len() > 1 {
            row.try_get::<Option<String>, _>(1)
                .map_err(|e| format!("SQL answer's second column: {e}"))?
                .filter(|l| !l.is_empty())
        } else {
            None
        };
        Ok(Lookup::Found(Placed { store, login }))
    }
}
