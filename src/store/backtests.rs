//! Backtest results (`backtest_results`, `backtest_trades`, sql/0008): rows rendered by the
//! backtest command as TabSeparated text (floats as Rust prints them, `nan`/`inf` included,
//! which ClickHouse reads back exactly), inserted in one statement per table.

use super::{Store, StoreError};

impl Store {
    /// `INSERT INTO table (columns) FORMAT TabSeparated` with `body` (one line per row).
    pub async fn insert_tsv(
        &self,
        table: &str,
        columns: &[&str],
        body: String,
    ) -> Result<(), StoreError> {
        if body.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "INSERT INTO {table} ({}) FORMAT TabSeparated",
            columns.join(", ")
        );
        let client = self.client().clone();
        self.call(async move {
            let mut insert = client.insert_formatted_with(sql);
            insert.send(bytes::Bytes::from(body)).await?;
            insert.end().await
        })
        .await
    }
}

/// A string field escaped for TabSeparated.
pub fn tsv_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out
}
