use std::path::PathBuf;

/// A test's scratch folder, `<system temp>/<name>-<pid>`, created if missing: the process id keeps
/// concurrent test runs (and the test binaries of one run) apart.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("creating the scratch folder {}: {e}", dir.display()));
    dir
}
