//! Tests whose resource is missing (no GPU, no checkpoint) skip loudly, or fail where the
//! environment promises the resource.

use std::io::Write;

/// Set to `1` where a GPU is promised (`scripts/gpu-check.sh`): the GPU suites then fail
/// instead of skipping when the device cannot be opened.
pub const REQUIRE_GPU: &str = "FLASH_OPS_REQUIRE_GPU";
/// Set to `1` where the all-MiniLM-L6-v2 checkpoint is installed (`.ci/run`).
pub const REQUIRE_MINILM: &str = "FLASH_OPS_REQUIRE_MINILM";

/// The test `test` lacks its resource (`why`). Panics when `require_var` is `1`; otherwise
/// says `SKIPPED …` on the process' stderr directly, past libtest's capture, so the skip shows in
/// every test run.
pub fn skip_or_fail(test: &str, why: &str, require_var: &str) {
    if std::env::var(require_var).is_ok_and(|v| v == "1") {
        panic!("{test}: {why}, but {require_var}=1 says it is available");
    }
    let line = format!("SKIPPED {test}: {why} (with {require_var}=1 this fails)\n");
    // `eprintln!` would be captured (and hidden) by libtest; the handle is not.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fails_where_promised_skips_elsewhere() {
        const VAR: &str = "FLASH_TEST_SUPPORT_SELFTEST_REQUIRE";
        skip_or_fail(
            "skip_or_fail self-test",
            "this SKIPPED line is expected",
            VAR,
        );
        std::env::set_var(VAR, "1");
        let r = std::panic::catch_unwind(|| skip_or_fail("selftest", "nothing here", VAR));
        std::env::remove_var(VAR);
        assert!(r.is_err(), "a promised resource must fail when missing");
    }
}
