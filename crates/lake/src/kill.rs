//! Kill points: named instants at which the kill trials (`tests/e2e/kill.rs`,
//! `scripts/kill-trials.sh`) have this process killed with SIGKILL, so that the windows a
//! kill at a random instant rarely hits — the end of a table's data before its commit, right
//! after a commit before the run records it, between a model file's temporary copy and its
//! rename — are tried every time.
//!
//! `PIPELINE_KILL_AT=NAME[@N]` kills the process the N-th time (default: the first) it passes
//! the point NAME; a NAME ending in `*` matches every point that begins with the rest. Unset
//! (always, outside the trials) a point costs one relaxed atomic load. With
//! `PIPELINE_KILL_ONCE=FILE` as well, only the first process to get there dies: it creates FILE
//! as it is killed, and a process that finds FILE there passes (a shard's retry, which gets the
//! same environment from its scheduler, then runs to the end).
//!
//! | point | instant |
//! |---|---|
//! | `commit:<table>` | every row of a write sent, before Lance writes the version |
//! | `committed:<table>` | the version written, before the writer hears of it |
//! | `save:<file>` | a model file's temporary copy on disk, before its rename |
//! | `publish` | an older folder of the model removed, before the new one takes its name |
//! | `staged:<table>` | a shard's data files of a table written, before its transaction is kept |
//! | `manifest` | a shard's writes all kept, before its manifest says it finished |

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Target {
    name: String,
    prefix: bool,
    nth: u64,
    seen: AtomicU64,
}

fn target() -> Option<&'static Target> {
    static T: OnceLock<Option<Target>> = OnceLock::new();
    T.get_or_init(|| {
        let spec = std::env::var("PIPELINE_KILL_AT").ok()?;
        let (name, nth) = match spec.rsplit_once('@') {
            Some((n, k)) => (n.to_string(), k.parse().unwrap_or(1)),
            None => (spec, 1),
        };
        let (name, prefix) = match name.strip_suffix('*') {
            Some(p) => (p.to_string(), true),
            None => (name, false),
        };
        Some(Target { name, prefix, nth: nth.max(1), seen: AtomicU64::new(0) })
    })
    .as_ref()
}

/// Passes the kill point `name`; see the module doc.
pub fn point(name: &str) {
    let Some(t) = target() else { return };
    let hit = if t.prefix { name.starts_with(&t.name) } else { name == t.name };
    if hit && t.seen.fetch_add(1, Ordering::SeqCst) + 1 == t.nth {
        if let Some(once) = std::env::var_os("PIPELINE_KILL_ONCE").filter(|o| !o.is_empty()) {
            if std::fs::OpenOptions::new().write(true).create_new(true).open(&once).is_err() {
                return;
            }
        }
        eprintln!("killed at {name} (PIPELINE_KILL_AT)");
        // SAFETY: plain system calls on this process.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        loop {
            std::thread::park();
        }
    }
}
