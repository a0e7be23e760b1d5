//! The laws every [`Geometry`] must satisfy (listed on the trait), checked on every geometry of
//! `geometry::cases`. The tiling property, which needs the reference's key lists, is in
//! `cpu::tests`.

use std::ops::Range;

use super::cases;

/// Ranges that are non-empty, increasing, disjoint and inside [0, n).
fn assert_runs(runs: &[Range<usize>], n: usize, what: &str) {
    let mut next = 0;
    for r in runs {
        assert!(
            r.start >= next && r.start < r.end && r.end <= n,
            "{what}: {runs:?}"
        );
        next = r.end;
    }
}

#[test]
fn queries_of_a_block_see_the_same_coarse_rows() {
    for (label, g) in cases::all() {
        let mut first: Vec<Option<usize>> = vec![None; g.query_blocks()];
        for i in 0..g.tokens() {
            let b = g.block_of(i);
            assert!(b < g.query_blocks(), "{label}: query {i} in block {b}");
            let rep = *first[b].get_or_insert(i);
            for level in 1..=g.num_levels() {
                assert_eq!(
                    g.coarse_rows(i, level),
                    g.coarse_rows(rep, level),
                    "{label}: queries {rep} and {i} of block {b}, level {level}"
                );
            }
        }
        assert!(first.iter().all(Option::is_some), "{label}: an empty block");
    }
}

#[test]
fn key_lists_are_well_formed() {
    for (label, g) in cases::all() {
        let n = g.tokens();
        for i in 0..n {
            let fine = g.fine_keys(i);
            assert_runs(&fine, n, &format!("{label}: fine keys of {i}"));
            assert!(
                fine.iter().any(|r| r.contains(&i)),
                "{label}: {i} misses itself"
            );
            for level in 1..=g.num_levels() {
                let rows = g.coarse_rows(i, level);
                for (k, &row) in rows.iter().enumerate() {
                    assert!(row < g.level_rows(level), "{label}: {i} level {level}");
                    assert!(g.row_count(level, row) > 0, "{label}: empty row {row} seen");
                    assert!(!rows[..k].contains(&row), "{label}: row {row} twice");
                }
            }
        }
    }
}

#[test]
fn rows_of_a_level_partition_the_tokens() {
    for (label, g) in cases::all() {
        let (n, p) = (g.tokens(), g.rank());
        let mut offset = 0;
        for level in 1..=g.num_levels() {
            assert_eq!(g.row_offset(level), offset, "{label}: level {level}");
            let rows = g.level_rows(level);
            assert_eq!(rows % p, 0, "{label}: level {level} has {rows} rows");
            offset += rows;
            let mut owner = vec![None; n];
            for row in 0..rows {
                let runs = g.row_tokens(level, row);
                let what = format!("{label}: level {level} row {row}");
                assert_runs(&runs, n, &what);
                let count: usize = runs.iter().map(|r| r.len()).sum();
                assert_eq!(g.row_count(level, row), count, "{what}");
                for t in runs.iter().flat_map(|r| r.clone()) {
                    assert_eq!(owner[t].replace(row), None, "{what}: token {t} twice");
                }
            }
            for (t, row) in owner.into_iter().enumerate() {
                assert_eq!(row, Some(g.row_of_token(level, t)), "{label}: token {t}");
            }
        }
        assert_eq!(g.total_rows(), offset, "{label}");
    }
}

#[test]
fn a_rows_kernel_reads_every_token_it_stands_for() {
    for (label, g) in cases::all() {
        let n = g.tokens();
        for level in 1..=g.num_levels() {
            let taps_len = g.kernel_len(level);
            for row in 0..g.level_rows(level) {
                let what = format!("{label}: level {level} row {row}");
                let taps = g.kernel_taps(level, row);
                let tokens: Vec<Range<usize>> = taps.iter().map(|t| t.tokens.clone()).collect();
                assert_runs(&tokens, n, &what);
                let mut seen = vec![false; taps_len];
                for run in &taps {
                    let end = run.kernel + run.tokens.len();
                    assert!(end <= taps_len, "{what}: kernel indices up to {end}");
                    for (k, used) in (run.kernel..).zip(&mut seen[run.kernel..end]) {
                        assert!(!*used, "{what}: kernel index {k} twice");
                        *used = true;
                    }
                }
                for t in g.row_tokens(level, row).into_iter().flatten() {
                    assert!(tokens.iter().any(|r| r.contains(&t)), "{what}: token {t}");
                }
            }
        }
    }
}
