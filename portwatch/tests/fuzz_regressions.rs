//! Replays the fuzz targets' committed inputs, the seeds and every crash
//! fuzzing has found (`portwatch/fuzz/{seeds,regressions}/<target>/`),
//! through the same checks the fuzz targets run (`portwatch::fuzzing`). No
//! root and no fuzzing toolchain needed: this runs with the unit tests.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use portwatch::fuzzing::{Check, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files in `dir`, sorted; none when it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `check` on every file, catching panics so that one report names
/// every failing file.
fn replay(target: &str, check: Check, files: &[PathBuf]) -> Vec<String> {
    let mut failures = Vec::new();
    for file in files {
        let data = std::fs::read(file).expect("a committed fuzz input is readable");
        match catch_unwind(AssertUnwindSafe(|| check(&data))) {
            Ok(Ok(())) => {}
            Ok(Err(violation)) => {
                failures.push(format!("{target}: {}: {violation}", file.display()))
            }
            Err(_) => failures.push(format!("{target}: {}: panicked", file.display())),
        }
    }
    failures
}

#[test]
fn seeds_and_regressions_pass_the_fuzz_checks() {
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (target, check) in TARGETS {
        let seeds = inputs(&fuzz_dir().join("seeds").join(target));
        // Every target has seeds: an empty or misnamed directory would
        // make this test pass on nothing.
        assert!(
            seeds.len() >= 3,
            "{target}: only {} seed files in portwatch/fuzz/seeds/{target}",
            seeds.len()
        );
        let regressions = inputs(&fuzz_dir().join("regressions").join(target));
        replayed += seeds.len() + regressions.len();
        failures.extend(replay(target, *check, &seeds));
        failures.extend(replay(target, *check, &regressions));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(replayed >= 4 * 3, "replayed only {replayed} inputs");
}

/// Each fuzz target is a check here, and each check a fuzz target; no input
/// directory belongs to a target that does not exist.
#[test]
fn the_fuzz_crate_matches_the_checks() {
    let mut names: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
    names.sort_unstable();
    let stems = |dir: PathBuf, ext: Option<&str>| -> Vec<String> {
        let mut found: Vec<String> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| match ext {
                        Some(x) => p.extension().is_some_and(|e| e == x),
                        None => p.is_dir(),
                    })
                    .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        found
    };
    assert_eq!(stems(fuzz_dir().join("fuzz_targets"), Some("rs")), names);
    assert_eq!(stems(fuzz_dir().join("seeds"), None), names);
    for dir in stems(fuzz_dir().join("regressions"), None) {
        assert!(
            names.contains(&dir.as_str()),
            "regressions/{dir} has no target"
        );
    }
}
