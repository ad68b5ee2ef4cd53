//! glibc's malloc, set for forward passes that allocate the same large buffers again and
//! again (every layer's activations, scores and products: megabytes each).
//!
//! glibc serves such blocks by `mmap` at first, and only raises that threshold to a freed
//! block's size (up to 32 MiB) once blocks are freed; and it hands the top of its heaps back
//! to the system beyond twice that. Meanwhile each pass maps fresh pages and faults every 4
//! KiB of them in again: measured on an 8-layer Phi-3-mini-shaped Q4_K_M file (2 threads),
//! 28-124 thousand page faults per prompt of 128-512 tokens, about a tenth of its time, and
//! a sixth of an F16 file's 128-token prompt. So the engine sets, once, the values glibc's
//! own adjustment ends at: blocks up to 32 MiB come from the heap, and 64 MiB of free heap
//! top stays.
//!
//! The heap then keeps what a pass freed, for the next pass, which costs peak RSS: 8-13 MiB
//! at 4,000 tokens of that file. So the engine hands the free pages back when a prompt of
//! several chunks is done (decoding needs only small buffers while the cache grows: 6 MiB
//! of that peak) and when its last stream ends (`release_freed`).
//!
//! These are process-wide settings, so a user's own choice wins: with `MALLOC_MMAP_THRESHOLD_`,
//! `MALLOC_TRIM_THRESHOLD_` or malloc tunables in `GLIBC_TUNABLES`, nothing is changed.

/// glibc's `DEFAULT_MMAP_THRESHOLD_MAX` on 64-bit: the most its own adjustment reaches.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;
/// Twice that, as glibc's adjustment sets it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 64 << 20;

/// Whether `keep_pass_buffers` set the thresholds.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
static KEEPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets the thresholds above, once per process, unless the user set malloc's own.
pub fn keep_pass_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static SET: std::sync::Once = std::sync::Once::new();
        SET.call_once(|| {
            if user_tuned(|name| std::env::var_os(name)) {
                return;
            }
            // SAFETY: mallopt changes two parameters under the main arena's lock; other
            // threads' frees read them unlocked (glibc: "MT-Unsafe const"), as plain ints
            // that only decide whether a block is mapped or a heap's top trimmed.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
                libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            }
            KEEPING.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
}

/// Hands the heap's free pages back to the system, where `keep_pass_buffers` kept them:
/// for when no pass will run for a while.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if KEEPING.load(std::sync::atomic::Ordering::Relaxed) {
        // SAFETY: malloc_trim only returns free memory, under glibc's own locks.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Whether the environment (read through `var`) already tunes these parameters.
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
fn user_tuned(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    var("MALLOC_MMAP_THRESHOLD_").is_some()
        || var("MALLOC_TRIM_THRESHOLD_").is_some()
        || var("GLIBC_TUNABLES").is_some_and(|t| t.to_string_lossy().contains("glibc.malloc."))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(
        pairs: &'a [(&'a str, &'a str)],
    ) -> impl Fn(&str) -> Option<std::ffi::OsString> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.into())
        }
    }

    #[test]
    fn a_users_own_malloc_settings_are_kept() {
        assert!(!user_tuned(env(&[])));
        assert!(!user_tuned(env(&[(
            "GLIBC_TUNABLES",
            "glibc.cpu.x86_shstk=off"
        )])));
        assert!(user_tuned(env(&[("MALLOC_MMAP_THRESHOLD_", "1048576")])));
        assert!(user_tuned(env(&[("MALLOC_TRIM_THRESHOLD_", "0")])));
        assert!(user_tuned(env(&[(
            "GLIBC_TUNABLES",
            "glibc.malloc.arena_max=2"
        )])));
    }
}
