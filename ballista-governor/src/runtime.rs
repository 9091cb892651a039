//! The runtime every task of a governed executor gets: one governed pool shared by all tasks,
//! spilling into the executor's work dir.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ballista_core::RuntimeProducer;
use datafusion::execution::memory_pool::MemoryPool;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::prelude::SessionConfig;
use datafusion_pool::GovernorExt;
use governor_core::{MemError, MemoryGovernor};

/// The work dir the executor will use: the configured one, or a fresh folder under the
/// system's temp dir named after the executor. Created here, so that a path that cannot be
/// used fails `governed_executor` with an error instead of the first spill.
pub(crate) fn resolve_work_dir(
    configured: Option<&str>,
    executor_id: &str,
) -> Result<PathBuf, MemError> {
    let dir = match configured {
        Some(dir) if dir.trim().is_empty() => {
            return Err(MemError::InvalidConfig {
                field: "work_dir".into(),
                reason: "an empty path; leave it unset for a folder under the temp dir".into(),
            });
        }
        Some(dir) => PathBuf::from(dir),
        // Ballista's own fallback deletes its temporary folder at once (the `TempDir` guard is
        // dropped when the path is taken), so a governed executor names a folder of its own.
        None => std::env::temp_dir().join(format!("ballista-governor-{}", safe_name(executor_id))),
    };
    std::fs::create_dir_all(&dir).map_err(|e| MemError::InvalidConfig {
        field: "work_dir".into(),
        reason: format!("cannot create {}: {e}", dir.display()),
    })?;
    Ok(dir)
}

/// `id` reduced to characters that are safe in one path component.
fn safe_name(id: &str) -> String {
    let name: String = id
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "executor".into()
    } else {
        name
    }
}

/// A runtime producer whose runtimes all share one governed pool of `governor`'s Query
/// engine. When the user gave a producer (object stores, caches) its runtime is kept and only
/// the pool is replaced; otherwise spill files go to `work_dir`.
pub(crate) fn governed_producer(
    governor: &Arc<MemoryGovernor>,
    user: Option<RuntimeProducer>,
    work_dir: &Path,
) -> RuntimeProducer {
    // One pool for the whole executor: its consumers of all tasks are fair to each other and
    // share the Query engine's dynamic budget (the point of governing the executor).
    let pool: Arc<dyn MemoryPool> = governor.pool();
    let work_dir = work_dir.to_path_buf();
    Arc::new(move |session_config: &SessionConfig| {
        let builder = match &user {
            Some(produce) => {
                let base: Arc<RuntimeEnv> = produce(session_config)?;
                RuntimeEnvBuilder::from_runtime_env(&base)
            }
            None => RuntimeEnvBuilder::new().with_temp_file_path(&work_dir),
        };
        builder.with_memory_pool(Arc::clone(&pool)).build_arc()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executor_ids_become_one_safe_path_component() {
        assert_eq!(safe_name("a1-b_2"), "a1-b_2");
        assert_eq!(safe_name("../../etc"), "______etc");
        assert_eq!(safe_name(""), "executor");
        assert_eq!(safe_name(&"x".repeat(500)).len(), 64);
    }

    #[test]
    fn an_empty_work_dir_is_refused() {
        let err = resolve_work_dir(Some("  "), "e").unwrap_err();
        assert!(err.to_string().contains("work_dir"), "{err}");
    }
}
