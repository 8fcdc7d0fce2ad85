//! How observers show what they read: a [`View`] is JSON for machines and the same rows as an
//! aligned table for humans ([`render_table`]), in the [`Format`] asked for.

use std::fmt::Write as _;

use serde_json::Value;

/// Output format of `sluice inspect`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// A view: JSON for machines, and the same rows as a table for humans.
pub struct View {
    pub json: Value,
    pub table: String,
}

impl View {
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Json => serde_json::to_string_pretty(&self.json)
                .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")),
            Format::Table => self.table.clone(),
        }
    }
}

/// Left-aligned columns separated by two spaces.
pub fn render_table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_align() {
        let t = render_table(
            &["A", "LONGER"],
            vec![
                vec!["xxxx".to_owned(), "1".to_owned()],
                vec!["y".to_owned(), "22".to_owned()],
            ]
            .into_iter(),
        );
        assert_eq!(t, "A     LONGER\nxxxx  1\ny     22\n");
    }
}
