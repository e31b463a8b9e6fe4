//! SECURITY.md's regression table must stay true: every row B1–B32 is there, and every test it
//! names exists (a function of that name in that file, or a fuzz target of that name).

use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root")
}

fn expand(abbr: &str) -> String {
    match abbr {
        "uw" => "server/tests/upstream_weaknesses.rs".into(),
        "adv" => "server/tests/adversarial.rs".into(),
        "hc" => "cli/tests/hostile_client.rs".into(),
        "pa" => "cli/tests/peer_auth.rs".into(),
        "room" => "core/src/room/tests.rs".into(),
        other => other.into(),
    }
}

#[test]
fn every_row_names_tests_that_exist() {
    let doc = std::fs::read_to_string(root().join("SECURITY.md")).expect("SECURITY.md");
    let is_b_row = |l: &&str| l.strip_prefix("| B").is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()));
    let rows: Vec<&str> = doc.lines().filter(is_b_row).collect();
    let ids: Vec<String> = rows.iter().map(|r| r.split('|').nth(1).unwrap_or_default().trim().to_owned()).collect();
    let want: Vec<String> = (1..=32).map(|i| format!("B{i}")).collect();
    assert_eq!(ids, want, "one row per weakness, in order");
    let mut checked = 0;
    // Every other claims table (dashboard, cluster, ...) with a "Proven by" column is held to
    // the same rule: what it names exists.
    let claim_rows: Vec<&str> = doc
        .lines()
        .filter(|l| l.starts_with("| ") && !is_b_row(l) && l.trim_end().ends_with('|'))
        .filter(|l| {
            let last = l.trim_end().trim_end_matches('|').rsplit('|').next().unwrap_or_default();
            last.contains("::") || last.contains("fuzz `")
        })
        .collect();
    assert!(claim_rows.len() >= 10, "claims tables not found: {claim_rows:?}");
    for row in rows.into_iter().chain(claim_rows) {
        let proven = row.trim_end_matches('|').rsplit('|').next().unwrap_or_default();
        let refs: Vec<&str> = proven.split('`').skip(1).step_by(2).collect();
        let mut fuzz_next = false;
        let mut found = 0;
        for (i, r) in refs.iter().enumerate() {
            // "fuzz `name`": a cargo-fuzz target.
            let before = proven.split('`').nth(i * 2).unwrap_or_default();
            fuzz_next = before.trim_end().ends_with("fuzz") || (fuzz_next && before.trim() == ",");
            if fuzz_next {
                assert!(root().join(format!("fuzz/fuzz_targets/{r}.rs")).exists(), "no fuzz target {r}: {row}");
                found += 1;
                continue;
            }
            if let Some((file, func)) = r.rsplit_once("::") {
                let file = file.trim_end_matches("::tests");
                let path = expand(file);
                let text = std::fs::read_to_string(root().join(&path))
                    .unwrap_or_else(|e| panic!("{path} (from {r}): {e}\n{row}"));
                assert!(
                    text.contains(&format!("fn {func}(")),
                    "{path} has no test {func} (named in SECURITY.md row: {row})"
                );
                found += 1;
            } else if r.ends_with(".rs") || r.ends_with(".sh") {
                assert!(root().join(r).exists(), "{r} does not exist");
                found += 1;
            }
        }
        assert!(found > 0, "row names no test: {row}");
        checked += found;
    }
    assert!(checked >= 60, "only {checked} references checked");
}
