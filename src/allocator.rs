//! Settings of the process allocator (mimalloc, chosen in `src/main.rs`): commit memory
//! as it is used and return freed memory to the system soon, so the daemon's resident
//! memory stays flat.
//!
//! With mimalloc's defaults (arenas committed eagerly on Linux, freed pages kept for
//! seconds) a sync with 1M companies in the store held ≈ 93 MiB resident instead of
//! ≈ 43 MiB (BENCHMARKS.md, part 2), at no measurable gain in speed.

use std::ffi::{c_int, c_long};

// The C library the functions below come from (linked through the `mimalloc` crate).
use mimalloc as _;

// Option numbers of `mi_option_t` in the mimalloc v3 sources that libmimalloc-sys 0.1.49
// builds (include/mimalloc.h); its Rust bindings do not name the v3 options.
const MI_OPTION_ARENA_EAGER_COMMIT: c_int = 4;
const MI_OPTION_PURGE_DELAY: c_int = 15;

unsafe extern "C" {
    fn mi_option_set(option: c_int, value: c_long);
}

/// Applies the settings. Must run before the first allocation to take full effect (the
/// first arena is made then): [`allocator_settings!`](crate::allocator_settings) arranges
/// that. Harmless when another global allocator is in use (mimalloc is then idle).
pub extern "C" fn apply_settings() {
    // SAFETY: `mi_option_set` only stores an integer in mimalloc's option table; any
    // value is valid for these two options, and it may be called before mimalloc's own
    // initialisation.
    unsafe {
        mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        // Milliseconds before freed memory is returned (mimalloc's default: 1000).
        mi_option_set(MI_OPTION_PURGE_DELAY, 50);
    }
}

/// Declares, in a binary's crate root, a constructor that applies [`apply_settings`]
/// before `main` and before the Rust runtime's first allocation. (In the binary itself:
/// a constructor in a library may be left out by the linker.)
#[macro_export]
macro_rules! allocator_settings {
    () => {
        #[cfg(target_os = "linux")]
        #[used]
        #[unsafe(link_section = ".init_array")]
        static APPLY_ALLOCATOR_SETTINGS: extern "C" fn() = $crate::allocator::apply_settings;
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" {
        fn mi_option_get(option: c_int) -> c_long;
    }

    #[test]
    fn the_option_numbers_name_the_options_meant() {
        // Nothing in the test binary applies the settings: the options still hold
        // mimalloc's defaults, which tell these two options from their neighbours (a
        // shifted enum would set the wrong ones silently).
        // SAFETY: reads an integer from mimalloc's option table.
        let (eager, delay) = unsafe {
            (
                mi_option_get(MI_OPTION_ARENA_EAGER_COMMIT),
                mi_option_get(MI_OPTION_PURGE_DELAY),
            )
        };
        assert_eq!((eager, delay), (2, 1000));
    }
}
