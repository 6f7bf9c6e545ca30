//! Process set-up for tensor workloads on the CPU: allocator thresholds and candle's elementwise thread pool.
//!
//! glibc returns every freed block above 128 KiB to the kernel (`munmap`) and trims the heap top eagerly, so a
//! training step that allocates and frees the same few-hundred-KiB activations thousands of times page-faults on
//! every op. Raising both thresholds keeps those buffers in the heap: measured on the tiny MMDiT, forward −31 %
//! and a DPO step −39 % (`../shared/notes/candle-on-cpu.md`).
//!
//! candle runs elementwise ops on its own pool of *spinning* threads (`CANDLE_NUM_THREADS`, default = cores),
//! while matmuls and our fused ops use rayon. On two cores the spinning workers take the cores the GEMMs need:
//! one pool thread (i.e. elementwise ops on the calling thread) made a tiny DPO step 15 % faster. So on machines
//! with at most [`SMALL_MACHINE_CORES`] cores we set `CANDLE_NUM_THREADS=1` unless the user set it.
//!
//! Binaries and benches call [`tune_for_tensors`] once at the start of `main`, before any thread exists.

/// At or below this many cores candle's spinning elementwise pool is disabled.
pub const SMALL_MACHINE_CORES: usize = 2;

/// Raises glibc's mmap threshold to its 32 MiB maximum and the trim threshold to 1 GiB (no-op on other allocators) and, on small machines, sets
/// `CANDLE_NUM_THREADS=1` if unset.
///
/// Call it first thing in `main`, while the process has a single thread: it changes the environment.
pub fn tune_for_tensors() {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    if cores <= SMALL_MACHINE_CORES && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: documented precondition: called at the start of `main` before any other thread is spawned, so
        // no other thread can read or write the environment concurrently.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc caps the mmap threshold at 32 MiB on 64-bit (HEAP_MAX_SIZE / 2) and rejects larger values,
        // leaving the default dynamic threshold in place; the trim threshold has no cap.
        const MMAP_THRESHOLD_MAX: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = 1 << 30;
        // SAFETY: mallopt only changes allocator parameters; it is called with valid option constants and values
        // and has no memory-safety preconditions.
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        };
        if !ok {
            eprintln!("note: glibc refused the allocator tuning (mallopt); tensor ops may be slower");
        }
    }
}

/// Resident set size of this process in MiB (Linux `/proc/self/statm`; `None` elsewhere). Logged by long runs so a
/// leak shows in their metrics.
pub fn resident_mib() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096.0 / (1024.0 * 1024.0))
}
