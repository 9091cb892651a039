//! Glue from a governor to DataFusion: [`GovernorExt::pool`] and keeping the governor in charge
//! when a session runs `SET datafusion.runtime.memory_limit`.

use std::sync::Arc;

use datafusion::common::{DataFusionError, Result};
use datafusion::execution::memory_pool::MemoryPool;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::prelude::SessionContext;
use governor_core::{EngineId, MemoryGovernor};

use crate::options::GovernedPoolBuilder;
use crate::pool::GovernedMemoryPool;

/// Makes DataFusion memory pools out of a governor:
/// `RuntimeEnvBuilder::new().with_memory_pool(governor.pool())`.
pub trait GovernorExt {
    /// A [`GovernedMemoryPool`] for the Query engine with the default policy.
    ///
    /// Call it once and share the result between sessions that should be fair to each
    /// other; each call makes a pool with its own consumers (all of them still share the one
    /// Query budget).
    fn pool(&self) -> Arc<dyn MemoryPool>;

    /// A builder for a pool with non-default policy.
    fn pool_builder(&self) -> GovernedPoolBuilder;
}

impl GovernorExt for Arc<MemoryGovernor> {
    fn pool(&self) -> Arc<dyn MemoryPool> {
        Arc::new(GovernedMemoryPool::new(self))
    }

    fn pool_builder(&self) -> GovernedPoolBuilder {
        GovernedMemoryPool::builder(self)
    }
}

/// Whether `runtime`'s memory pool is a [`GovernedMemoryPool`].
///
/// `SET datafusion.runtime.memory_limit = '…'` makes DataFusion build a fresh runtime with its
/// own `TrackConsumersPool<GreedyMemoryPool>`, silently taking the session out of the
/// governor's books; `RESET` installs an unbounded pool. Check this after running untrusted
/// SQL, or prevent it (see the [crate docs](crate#set-datafusionruntimememory_limit)).
pub fn is_governed(runtime: &RuntimeEnv) -> bool {
    runtime.memory_pool.is::<GovernedMemoryPool>()
}

/// The governed replacement for `SET datafusion.runtime.memory_limit = '<value>'`: parses
/// `value` exactly like DataFusion (`"512M"`, `"1.5G"`) and sets the governor's Query limit,
/// so every governed session sees the new size on its next allocation. Returns the limit set.
///
/// # Errors
/// `DataFusionError::Plan` for a value DataFusion would reject, and
/// `DataFusionError::External` with the governor's `InvalidConfig` when the limit would break
/// its invariants (e.g. above the global ceiling or below the Query floor).
pub fn set_query_memory_limit(governor: &MemoryGovernor, value: &str) -> Result<usize> {
    let bytes = SessionContext::parse_capacity_limit("datafusion.runtime.memory_limit", value)?;
    governor
        .set_limit(EngineId::Query, bytes)
        .map_err(|e| DataFusionError::External(Box::new(e)))?;
    Ok(bytes)
}
