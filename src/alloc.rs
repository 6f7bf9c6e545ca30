//! Allocator tuning for tensor workloads.
//!
//! glibc returns every freed block above 128 KiB to the kernel (`munmap`) and trims the heap top eagerly, so a
//! training step that allocates and frees the same few-hundred-KiB activations thousands of times page-faults on
//! every op. Raising both thresholds keeps those buffers in the heap: measured on the tiny MMDiT, forward −31 %
//! and a DPO step −39 % (`../shared/notes/candle-on-cpu.md`). Binaries and benches call [`tune_for_tensors`] once
//! at start-up; elsewhere it is a no-op.

/// Raises glibc's mmap and trim thresholds to 1 GiB (no-op on other allocators). Call before heavy allocation.
pub fn tune_for_tensors() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const ONE_GIB: libc::c_int = 1 << 30;
        // SAFETY: mallopt only changes allocator parameters; it is called with valid option constants and values
        // and has no memory-safety preconditions.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, ONE_GIB);
            libc::mallopt(libc::M_TRIM_THRESHOLD, ONE_GIB);
        }
    }
}
