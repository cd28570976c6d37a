//! Running a closure in a rayon pool of a chosen size, for the tests that compare bits across
//! thread counts.

/// Runs `f` inside a fresh rayon pool of `threads` threads.
pub fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a rayon pool")
        .install(f)
}
