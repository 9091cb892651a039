//! Parsing of `queries.sql`, shared by the TPC-H tests of this crate and `ballista-governor`
//! (included with `#[path]`: it is test data's reader, not part of either crate's API).

/// Splits the query file into `(number, sql)` pairs in file order: a `-- Q<n>` line starts
/// query `n`; other comment lines are dropped, and each query loses its trailing semicolon.
pub fn parse_queries(text: &str) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    for line in text.lines() {
        if let Some(n) = line
            .strip_prefix("-- Q")
            .and_then(|n| n.trim().parse().ok())
        {
            out.push((n, String::new()));
        } else if let Some((_, sql)) = out.last_mut()
            && !line.starts_with("--")
        {
            sql.push_str(line);
            sql.push('\n');
        }
    }
    for (_, sql) in &mut out {
        *sql = sql.trim().trim_end_matches(';').to_owned();
    }
    out
}
