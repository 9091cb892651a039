//! NUMA placement through hwloc (`hwlocality`): where threads run and where their memory lives.
//!
//! On a multi-socket machine, memory on the other socket costs about twice as much to reach,
//! and one engine can fill one node's memory while the other is idle. This module gives the
//! governor three tools:
//!
//! * a **summary** of the machine ([`NumaTopology`]: nodes, their CPUs and memory), read from
//!   hwloc by a [`NumaPlacer`];
//! * **binding**: [`bind_thread_to_local_numa`] keeps the calling thread on the CPUs of the
//!   node it runs on, binds its future memory to that node, and pins it to a jemalloc arena
//!   dedicated to that node, so pages of different nodes never share an arena;
//! * **per-node sub-ceilings** ([`NumaCeilings`]) that split the global ceiling; give them to
//!   [`GovernorConfigBuilder::numa_ceilings`](crate::GovernorConfigBuilder::numa_ceilings) and
//!   admission enforces them: a reservation counts against the node of the thread that makes
//!   it (binding declares the node, see [`crate::node`]) and is refused with
//!   [`MemError::NodeCeilingExceeded`] when that node is full, even if the ceiling has room.
//!
//! ```text
//!   hwloc topology ──▶ NumaTopology (pure) ──▶ node_of_cpu / plan_workers / NumaCeilings
//!        │                                         (tested on synthetic 2- and 4-node machines)
//!        └─▶ bind_cpu(node cpus) + bind_memory(node, Bind) + pin_thread_arena(node arena)
//! ```
//!
//! The placement rules live in pure functions over [`NumaTopology`] and are tested on hwloc
//! *synthetic* topologies ([`NumaPlacer::synthetic`]), so a 4-node machine can be checked on a
//! laptop. Binding needs the real machine: a synthetic or foreign topology, or an OS where
//! hwloc cannot bind threads, gives [`MemError::Numa`] with the reason, never a panic.
//!
//! The module exists with the crate feature `numa` (on by default), which links hwloc
//! statically through `pkg-config` (`libhwloc-dev`, `libudev-dev`, `pkg-config` on Debian).

mod placement;

use std::collections::HashMap;
use std::sync::OnceLock;

use hwlocality::Topology;
use hwlocality::cpu::binding::CpuBindingFlags;
use hwlocality::cpu::cpuset::CpuSet;
use hwlocality::memory::binding::{MemoryBindingFlags, MemoryBindingPolicy};
use hwlocality::object::types::ObjectType;
use parking_lot::Mutex;

pub use placement::{NumaCeilings, NumaNode, NumaTopology, WorkerPlacement};

use crate::MemError;
use crate::alloc::{create_arena, pin_thread_arena};

/// A loaded hwloc topology: the host's, or a synthetic one for tests.
pub struct NumaPlacer {
    topology: Topology,
    summary: NumaTopology,
}

impl std::fmt::Debug for NumaPlacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NumaPlacer")
            .field("this_system", &self.topology.is_this_system())
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

impl NumaPlacer {
    /// Loads this machine's topology. Costs a few milliseconds (hwloc reads `/sys`); keep the
    /// placer, or use [`bind_thread_to_local_numa`], which loads it once per process.
    ///
    /// # Errors
    /// [`MemError::Numa`] when hwloc cannot read the machine.
    pub fn host() -> Result<Self, MemError> {
        let topology = Topology::new().map_err(|err| MemError::Numa {
            reason: format!("hwloc could not load this machine's topology: {err}"),
        })?;
        Self::from_topology(topology)
    }

    /// Builds a synthetic topology from hwloc's
    /// [synthetic description](https://hwloc.readthedocs.io/en/stable/synthetic.html), e.g.
    /// `"Package:2 NUMANode:1 Core:4 PU:1"` (2 nodes of 4 CPUs) or `"NUMANode:4 Core:2 PU:1"`.
    /// Placement can be planned on it; binding is refused.
    ///
    /// ```
    /// use governor_core::numa::NumaPlacer;
    ///
    /// let placer = NumaPlacer::synthetic("Package:2 NUMANode:1 Core:4 PU:1")?;
    /// assert_eq!(placer.summary().node_count(), 2);
    /// assert_eq!(placer.summary().node_of_cpu(5).unwrap().os_index, 1);
    /// # Ok::<(), governor_core::MemError>(())
    /// ```
    pub fn synthetic(description: &str) -> Result<Self, MemError> {
        let invalid = |err: &dyn std::fmt::Display| MemError::Numa {
            reason: format!("invalid synthetic hwloc topology {description:?}: {err}"),
        };
        let topology = Topology::builder()
            .from_synthetic(description)
            .map_err(|e| invalid(&e))?
            .build()
            .map_err(|e| invalid(&e))?;
        Self::from_topology(topology)
    }

    fn from_topology(topology: Topology) -> Result<Self, MemError> {
        let nodes = topology
            .objects_with_type(ObjectType::NUMANode)
            .map(|node| NumaNode {
                // hwloc always gives NUMA nodes an OS index; the logical index is a fallback.
                os_index: node.os_index().unwrap_or(node.logical_index()),
                cpus: node
                    .cpuset()
                    .map(|set| set.iter_set().map(usize::from).collect())
                    .unwrap_or_default(),
                memory_bytes: node.total_memory(),
            })
            .collect();
        let summary = NumaTopology::new(nodes)?;
        Ok(Self { topology, summary })
    }

    /// The topology's nodes, CPUs and memory.
    pub fn summary(&self) -> &NumaTopology {
        &self.summary
    }

    /// The hwloc topology, for anything this module does not wrap.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Binds the calling thread to the node it is running on now: its CPUs, its memory
    /// (future allocations of the thread come from the node) and that node's jemalloc arena.
    ///
    /// # Errors
    /// [`MemError::Numa`] when this is not the host topology, when the OS or hwloc cannot
    /// bind threads, or when a binding call fails; [`MemError::Allocator`] when the arena
    /// cannot be made or pinned. Memory binding that the OS does not support is not an error:
    /// it is reported as [`NumaBinding::memory_bound`] `= false`, because CPU locality alone
    /// still gives first-touch placement on Linux.
    pub fn bind_current_thread(&self) -> Result<NumaBinding, MemError> {
        if !self.topology.is_this_system() {
            return Err(MemError::Numa {
                reason:
                    "cannot bind a thread with this topology: it does not describe this machine \
                         (synthetic or loaded from XML); use NumaPlacer::host()"
                        .into(),
            });
        }
        let support = self.topology.feature_support();
        let cpu = support.cpu_binding();
        if !cpu.is_some_and(|c| c.set_current_thread() && c.get_current_thread_last_cpu_location())
        {
            return Err(MemError::Numa {
                reason: "hwloc cannot bind threads to CPUs or locate them on this OS".into(),
            });
        }
        let current = self
            .topology
            .last_cpu_location(CpuBindingFlags::THREAD)
            .map_err(|err| MemError::Numa {
                reason: format!("hwloc could not tell which CPU this thread runs on: {err}"),
            })?;
        let cpu_index = current
            .first_set()
            .map(usize::from)
            .ok_or_else(|| MemError::Numa {
                reason: "hwloc reported an empty CPU location for this thread".into(),
            })?;
        let node = self
            .summary
            .node_of_cpu(cpu_index)
            .ok_or_else(|| MemError::Numa {
                reason: format!(
                    "CPU {cpu_index} belongs to no NUMA node in the topology ({})",
                    self.summary
                ),
            })?;
        let hw_node = self
            .topology
            .objects_with_type(ObjectType::NUMANode)
            .find(|n| n.os_index() == Some(node.os_index))
            .ok_or_else(|| MemError::Numa {
                reason: format!("NUMA node {} vanished from the topology", node.os_index),
            })?;
        let cpuset: CpuSet =
            hw_node
                .cpuset()
                .map(|s| s.clone_target())
                .ok_or_else(|| MemError::Numa {
                    reason: format!("NUMA node {} has no CPU set", node.os_index),
                })?;
        self.topology
            .bind_cpu(&cpuset, CpuBindingFlags::THREAD)
            .map_err(|err| MemError::Numa {
                reason: format!(
                    "binding this thread to node {}'s CPUs {cpuset} failed: {err}",
                    node.os_index
                ),
            })?;
        let memory_bound = match hw_node.nodeset() {
            Some(nodeset)
                if support
                    .memory_binding()
                    .is_some_and(|m| m.set_current_thread() && m.bind_policy()) =>
            {
                self.topology
                    .bind_memory(
                        nodeset,
                        MemoryBindingPolicy::Bind,
                        MemoryBindingFlags::THREAD,
                    )
                    .map_err(|err| MemError::Numa {
                        reason: format!(
                            "binding this thread's memory to node {} failed: {err}",
                            node.os_index
                        ),
                    })?;
                true
            }
            _ => false,
        };
        let arena = node_arena(node.os_index)?;
        let previous_arena = pin_thread_arena(arena)?;
        // From here on the thread's reservations count against this node's sub-ceiling.
        crate::node::set_thread_numa_node(Some(node.os_index));
        tracing::debug!(
            node = node.os_index,
            cpu = cpu_index,
            arena,
            memory_bound,
            "thread bound to its NUMA node"
        );
        Ok(NumaBinding {
            node: node.os_index,
            cpus: node.cpus.clone(),
            arena,
            previous_arena,
            memory_bound,
        })
    }
}

/// What [`bind_thread_to_local_numa`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaBinding {
    /// The node's OS index.
    pub node: usize,
    /// The CPUs the thread may now run on (the node's).
    pub cpus: Vec<usize>,
    /// The node's jemalloc arena, which the thread now allocates from.
    pub arena: u32,
    /// The arena the thread allocated from before.
    pub previous_arena: u32,
    /// Whether the thread's future memory is bound to the node (false when the OS cannot).
    pub memory_bound: bool,
}

/// Binds the calling thread's CPUs and memory to the NUMA node it currently runs on, and pins
/// it to that node's jemalloc arena (one per node, made on first use and shared by all threads
/// of the node).
///
/// Call it first thing in a worker thread; the host topology is loaded once per process.
///
/// ```no_run
/// std::thread::spawn(|| {
///     let binding = governor_core::numa::bind_thread_to_local_numa()?;
///     println!("worker on node {} (arena {})", binding.node, binding.arena);
///     Ok::<(), governor_core::MemError>(())
/// });
/// ```
///
/// # Errors
/// See [`NumaPlacer::bind_current_thread`]; also when hwloc cannot load the host topology.
pub fn bind_thread_to_local_numa() -> Result<NumaBinding, MemError> {
    host_placer()?.bind_current_thread()
}

/// The host topology, loaded once. A failure is remembered too: hwloc will not start
/// working later in the same process, and retrying costs milliseconds per thread.
pub fn host_placer() -> Result<&'static NumaPlacer, MemError> {
    static HOST: OnceLock<Result<NumaPlacer, MemError>> = OnceLock::new();
    HOST.get_or_init(NumaPlacer::host)
        .as_ref()
        .map_err(Clone::clone)
}

/// The jemalloc arena of NUMA node `node`, made on first use.
pub fn node_arena(node: usize) -> Result<u32, MemError> {
    static ARENAS: OnceLock<Mutex<HashMap<usize, u32>>> = OnceLock::new();
    let mut arenas = ARENAS.get_or_init(Mutex::default).lock();
    if let Some(&arena) = arenas.get(&node) {
        return Ok(arena);
    }
    let arena = create_arena()?;
    arenas.insert(node, arena);
    Ok(arena)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_synthetic_description_is_a_typed_error() {
        let err = NumaPlacer::synthetic("ZaLgO:3").unwrap_err();
        assert!(matches!(err, MemError::Numa { .. }), "{err}");
        assert!(err.to_string().contains("ZaLgO"), "{err}");
    }

    #[test]
    fn synthetic_topology_refuses_binding() {
        let placer = NumaPlacer::synthetic("NUMANode:2 Core:1 PU:1").unwrap();
        let err = placer.bind_current_thread().unwrap_err();
        assert!(
            err.to_string().contains("does not describe this machine"),
            "{err}"
        );
    }

    #[test]
    fn node_arenas_are_stable_per_node() {
        let a = node_arena(10_000).unwrap();
        assert_eq!(node_arena(10_000).unwrap(), a);
        assert_ne!(node_arena(10_001).unwrap(), a);
    }
}
