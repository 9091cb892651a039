//! The governor's one error type.
//!
//! Every variant carries the numbers a person on call needs: which engine, what it asked for,
//! what was free and who holds the rest. Messages are written for that person, not for us.

use std::fmt;
use std::time::Duration;

use crate::engine::{EngineId, human_bytes};
use crate::story::Story;
use crate::work::WorkRef;

/// The engines holding the most memory, largest first, as `(engine, bytes)`.
///
/// Carried by [`MemError::GlobalCeilingExceeded`] so the message names who holds the ceiling.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holders(pub Vec<(EngineId, usize)>);

impl fmt::Display for Holders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("nobody");
        }
        for (i, (engine, bytes)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{engine} {}", human_bytes(*bytes))?;
        }
        Ok(())
    }
}

/// Why the governor said no, or why a request was malformed.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemError {
    /// The engine's own limit would be exceeded.
    #[error(
        "{engine} engine budget exhausted: asked for {} but only {} of its {} limit is free ({} reserved); \
         the engine must spill, flush or evict, or its limit must be raised",
        human_bytes(*requested), human_bytes(*available), human_bytes(*limit), human_bytes(*reserved)
    )]
    BudgetExhausted {
        /// The engine that asked.
        engine: EngineId,
        /// Bytes asked for.
        requested: usize,
        /// Bytes the engine could still have taken under its limit.
        available: usize,
        /// Bytes the engine held when it asked.
        reserved: usize,
        /// The engine's limit.
        limit: usize,
    },
    /// A NUMA node's sub-ceiling would be exceeded (see
    /// [`GovernorConfigBuilder::numa_node_ceiling`](crate::GovernorConfigBuilder::numa_node_ceiling)).
    #[error(
        "NUMA node {node} sub-ceiling reached: {engine} asked for {} but {} of the node's {} are held; \
         free memory on this node, run the work on another node, or raise the node's sub-ceiling",
        human_bytes(*requested), human_bytes(*reserved), human_bytes(*ceiling)
    )]
    NodeCeilingExceeded {
        /// The engine that asked.
        engine: EngineId,
        /// The node (OS index) the reservation was for.
        node: usize,
        /// Bytes asked for.
        requested: usize,
        /// Bytes all engines held on the node when it asked.
        reserved: usize,
        /// The node's sub-ceiling.
        ceiling: usize,
    },
    /// The process-wide ceiling would be exceeded.
    #[error(
        "global memory ceiling reached: {engine} asked for {} but {} of the {} ceiling is already taken; \
         held by: {top_holders}; untracked (outside reservations): {}",
        human_bytes(*requested), human_bytes(*reserved), human_bytes(*ceiling), human_bytes(*untracked)
    )]
    GlobalCeilingExceeded {
        /// The engine that asked.
        engine: EngineId,
        /// Bytes asked for.
        requested: usize,
        /// Bytes reserved under the ceiling when it asked (including untracked memory).
        reserved: usize,
        /// The global ceiling.
        ceiling: usize,
        /// Who holds the ceiling, largest first.
        top_holders: Holders,
        /// Memory the process holds outside any reservation, as last measured by the RSS monitor.
        untracked: usize,
    },
    /// The engine has no budget in this governor's configuration.
    #[error(
        "the {engine} engine has no budget in this governor; add it with GovernorConfig::builder().engine({engine:?}, ..)"
    )]
    UnknownEngine {
        /// The engine that asked.
        engine: EngineId,
    },
    /// A configuration value breaks an invariant.
    #[error("invalid governor configuration: {field}: {reason}")]
    InvalidConfig {
        /// The field at fault, as named in the builder.
        field: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A caller tried to give back more than a reservation holds.
    #[error(
        "cannot shrink a {engine} reservation by {} : it holds only {}",
        human_bytes(*requested), human_bytes(*held)
    )]
    ShrinkBeyondHeld {
        /// The reservation's engine.
        engine: EngineId,
        /// Bytes the caller asked to give back.
        requested: usize,
        /// Bytes the reservation holds.
        held: usize,
    },
    /// A reclaimer failed, panicked or did not answer in time.
    #[error("reclaim from the {engine} engine failed: {reason}")]
    ReclaimFailed {
        /// The engine whose reclaimer failed.
        engine: EngineId,
        /// What happened.
        reason: String,
    },
    /// An async reservation waited for memory and none came in time.
    #[error(
        "{engine} waited {waited:?} for {} and no memory was freed or reclaimed in time: {story}",
        human_bytes(*requested)
    )]
    Timeout {
        /// The engine that asked.
        engine: EngineId,
        /// Bytes asked for.
        requested: usize,
        /// How long it waited.
        waited: Duration,
        /// What the governor saw and tried: holders, lending, reclaims, victims.
        story: Box<Story>,
    },
    /// The unit of work was aborted: every later reservation of it fails with this. Its owner
    /// should stop the work and drop what it holds.
    #[error("{victim} was aborted{}: {reason}{}",
        requester.map(|r| format!(" to give the {r} engine its floor back")).unwrap_or_default(),
        story.as_ref().map(|s| format!("; {s}")).unwrap_or_default()
    )]
    Aborted {
        /// The unit aborted.
        victim: WorkRef,
        /// The engine whose request it was aborted for; `None` when its owner aborted it.
        requester: Option<EngineId>,
        /// Why, in words (shared: every later reservation of the unit returns this error).
        reason: std::sync::Arc<str>,
        /// What the governor saw when it chose the victim (absent for an owner's abort).
        story: Option<Box<Story>>,
    },
    /// The allocator (jemalloc) could not be queried or controlled.
    #[error("allocator control failed: {reason}")]
    Allocator {
        /// What failed.
        reason: String,
    },
    /// NUMA topology or binding failed, or is not supported here.
    #[error("NUMA placement failed: {reason}")]
    Numa {
        /// What failed.
        reason: String,
    },
    /// A file describing the process's environment (cgroup limits, `/proc/meminfo`, pressure
    /// stall information) could not be read or parsed.
    #[error("cannot read the memory environment from {path}: {reason}")]
    Environment {
        /// The file at fault.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl MemError {
    /// Builds an [`MemError::InvalidConfig`].
    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        MemError::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// True when the unit of work that asked was aborted (see [`MemError::Aborted`]).
    pub fn is_abort(&self) -> bool {
        matches!(self, MemError::Aborted { .. })
    }

    /// True for the admission denials (engine limit, NUMA node sub-ceiling or global
    /// ceiling): the caller may spill and retry, as opposed to a malformed request.
    pub fn is_denial(&self) -> bool {
        matches!(
            self,
            MemError::BudgetExhausted { .. }
                | MemError::NodeCeilingExceeded { .. }
                | MemError::GlobalCeilingExceeded { .. }
        )
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::engine::mib;

    #[test]
    fn ceiling_message_names_holders() {
        let err = MemError::GlobalCeilingExceeded {
            engine: EngineId::Query,
            requested: mib(8),
            reserved: mib(120),
            ceiling: mib(128),
            top_holders: Holders(vec![
                (EngineId::Timeseries, mib(100)),
                (EngineId::Vector, mib(20)),
            ]),
            untracked: 0,
        };
        let text = err.to_string();
        assert!(text.contains("query asked for 8.0 MiB"), "{text}");
        assert!(
            text.contains("timeseries 100.0 MiB, vector 20.0 MiB"),
            "{text}"
        );
        assert!(err.is_denial());
    }

    #[test]
    fn budget_message_says_what_to_do() {
        let err = MemError::BudgetExhausted {
            engine: EngineId::Vector,
            requested: 10,
            available: 4,
            reserved: 60,
            limit: 64,
        };
        let text = err.to_string();
        assert!(text.starts_with("vector engine budget exhausted"), "{text}");
        assert!(text.contains("spill, flush or evict"), "{text}");
    }
}
