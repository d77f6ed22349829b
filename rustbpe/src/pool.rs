//! The crate's rayon pool, rebuilt after `fork`.
//!
//! A forked child inherits the parent's pool bookkeeping but none of its worker threads, so work sent to
//! rayon's global pool there waits forever (the failure HF tokenizers answers with a fork warning). Keying
//! the pool by process id makes a child build its own pool on first use instead. The thread count follows
//! `RAYON_NUM_THREADS`, else the number of CPUs.
use std::sync::{Arc, Mutex};

use rayon::{ThreadPool, ThreadPoolBuilder};

static POOL: Mutex<Option<(u32, Arc<ThreadPool>)>> = Mutex::new(None);

fn current() -> Arc<ThreadPool> {
    let pid = std::process::id();
    let mut slot = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    match slot.as_ref() {
        Some((owner, pool)) if *owner == pid => Arc::clone(pool),
        _ => {
            // The parent's pool (if any) has no threads in this process; leak it rather than run its
            // shutdown against threads that do not exist here.
            if let Some(stale) = slot.take() {
                std::mem::forget(stale);
            }
            let pool = Arc::new(
                ThreadPoolBuilder::new()
                    .thread_name(|i| format!("rustbpe-{i}"))
                    .build()
                    .expect("rayon could not start its worker threads"),
            );
            *slot = Some((pid, Arc::clone(&pool)));
            pool
        }
    }
}

/// Runs `f` inside the pool, so its rayon calls use the pool's threads.
pub(crate) fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    current().install(f)
}
