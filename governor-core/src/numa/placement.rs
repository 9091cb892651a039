//! Pure placement logic: which node a CPU belongs to, where workers go, how a ceiling splits
//! across nodes. No hwloc calls here, so every rule is tested on synthetic topologies.

use std::collections::BTreeMap;
use std::fmt;

use crate::{MemError, human_bytes};

/// One NUMA node: its CPUs and its memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaNode {
    /// The OS index of the node (what `numactl` and `/sys/devices/system/node/nodeN` call it).
    pub os_index: usize,
    /// OS indices of the processing units (hardware threads) attached to the node, ascending.
    /// Empty for memory-only nodes (e.g. CXL or HBM expanders).
    pub cpus: Vec<usize>,
    /// Bytes of memory local to the node.
    pub memory_bytes: u64,
}

/// A summary of a machine's NUMA layout: nodes, their CPUs and memory.
///
/// Built from hwloc ([`NumaPlacer::summary`](super::NumaPlacer::summary)), or by hand for
/// tests; every method is pure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaTopology {
    nodes: Vec<NumaNode>,
}

/// Where one worker thread should run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerPlacement {
    /// The worker's number, `0..workers`.
    pub worker: usize,
    /// The node's OS index.
    pub node: usize,
    /// The CPU's OS index.
    pub cpu: usize,
}

impl NumaTopology {
    /// A topology of `nodes`, sorted by OS index.
    ///
    /// # Errors
    /// [`MemError::Numa`] when there is no node, when two nodes share an OS index or a CPU.
    pub fn new(mut nodes: Vec<NumaNode>) -> Result<Self, MemError> {
        if nodes.is_empty() {
            return Err(MemError::Numa {
                reason: "a NUMA topology needs at least one node".into(),
            });
        }
        nodes.sort_by_key(|n| n.os_index);
        let mut owner = BTreeMap::new();
        for node in &mut nodes {
            node.cpus.sort_unstable();
            node.cpus.dedup();
            for &cpu in &node.cpus {
                if let Some(other) = owner.insert(cpu, node.os_index) {
                    return Err(MemError::Numa {
                        reason: format!(
                            "CPU {cpu} is listed in both node {other} and node {}",
                            node.os_index
                        ),
                    });
                }
            }
        }
        if let Some(pair) = nodes.windows(2).find(|w| w[0].os_index == w[1].os_index) {
            return Err(MemError::Numa {
                reason: format!("NUMA node {} is listed twice", pair[0].os_index),
            });
        }
        Ok(Self { nodes })
    }

    /// The nodes, by OS index.
    pub fn nodes(&self) -> &[NumaNode] {
        &self.nodes
    }

    /// How many nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The node with OS index `os_index`.
    pub fn node(&self, os_index: usize) -> Option<&NumaNode> {
        self.nodes.iter().find(|n| n.os_index == os_index)
    }

    /// The node a CPU belongs to: where a thread running on `cpu` finds local memory.
    pub fn node_of_cpu(&self, cpu: usize) -> Option<&NumaNode> {
        self.nodes
            .iter()
            .find(|n| n.cpus.binary_search(&cpu).is_ok())
    }

    /// Memory of all nodes.
    pub fn total_memory(&self) -> u64 {
        self.nodes.iter().map(|n| n.memory_bytes).sum()
    }

    /// Spreads `workers` threads over the machine: consecutive workers alternate between
    /// nodes (node 0 CPU 0, node 1 CPU 0, node 0 CPU 1, ...), so a pool of any size loads the
    /// nodes' memory controllers evenly; past the CPU count, placements wrap around.
    ///
    /// Memory-only nodes get no workers. Empty when the machine has no CPU.
    pub fn plan_workers(&self, workers: usize) -> Vec<WorkerPlacement> {
        let mut order = Vec::new();
        let rounds = self.nodes.iter().map(|n| n.cpus.len()).max().unwrap_or(0);
        for round in 0..rounds {
            for node in &self.nodes {
                if let Some(&cpu) = node.cpus.get(round) {
                    order.push((node.os_index, cpu));
                }
            }
        }
        if order.is_empty() {
            return Vec::new();
        }
        (0..workers)
            .map(|worker| {
                let (node, cpu) = order[worker % order.len()];
                WorkerPlacement { worker, node, cpu }
            })
            .collect()
    }
}

impl fmt::Display for NumaTopology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, node) in self.nodes.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(
                f,
                "node {}: {} cpus, {}",
                node.os_index,
                node.cpus.len(),
                human_bytes(usize::try_from(node.memory_bytes).unwrap_or(usize::MAX))
            )?;
        }
        Ok(())
    }
}

/// Optional per-node sub-ceilings: how much of the global ceiling may live on each node.
///
/// On a multi-socket machine a process can exhaust one node while others are idle, and then
/// either swaps remote or the kernel's per-node OOM fires. Sub-ceilings keep each node's share
/// bounded. They always add up to at most the global ceiling.
///
/// ```
/// use governor_core::numa::{NumaCeilings, NumaNode, NumaTopology};
///
/// let topology = NumaTopology::new(vec![
///     NumaNode { os_index: 0, cpus: vec![0, 1], memory_bytes: 3 << 30 },
///     NumaNode { os_index: 1, cpus: vec![2, 3], memory_bytes: 1 << 30 },
/// ])?;
/// let ceilings = NumaCeilings::proportional(&topology, 1000);
/// assert_eq!(ceilings.for_node(0), Some(750));
/// assert_eq!(ceilings.for_node(1), Some(250));
/// assert!(ceilings.check(1, 200, 100).is_err()); // node 1 would hold 300 > 250
/// # Ok::<(), governor_core::MemError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaCeilings {
    per_node: BTreeMap<usize, usize>,
    ceiling: usize,
}

impl NumaCeilings {
    /// Splits `ceiling` across the nodes in proportion to their memory (largest remainders
    /// get the leftover bytes, so the shares add up to exactly `ceiling`). A machine whose
    /// nodes report no memory is split evenly.
    pub fn proportional(topology: &NumaTopology, ceiling: usize) -> Self {
        let total = u128::from(topology.total_memory());
        let nodes = topology.nodes();
        let weight = |n: &NumaNode| {
            if total == 0 {
                1u128
            } else {
                u128::from(n.memory_bytes)
            }
        };
        let weights_sum: u128 = nodes.iter().map(weight).sum();
        let mut shares: Vec<(usize, usize, u128)> = nodes
            .iter()
            .map(|n| {
                let exact = ceiling as u128 * weight(n);
                // weights_sum > 0: there is at least one node, and each weighs ≥ 1 when total = 0.
                let share = exact / weights_sum;
                (n.os_index, share as usize, exact % weights_sum)
            })
            .collect();
        let mut left = ceiling - shares.iter().map(|s| s.1).sum::<usize>();
        let mut by_remainder: Vec<usize> = (0..shares.len()).collect();
        by_remainder.sort_by(|&a, &b| shares[b].2.cmp(&shares[a].2).then(a.cmp(&b)));
        for i in by_remainder {
            if left == 0 {
                break;
            }
            shares[i].1 += 1;
            left -= 1;
        }
        Self {
            per_node: shares
                .into_iter()
                .map(|(node, share, _)| (node, share))
                .collect(),
            ceiling,
        }
    }

    /// Explicit sub-ceilings, `(node OS index, bytes)`. Nodes not listed are unbounded (only
    /// the global ceiling applies to them).
    ///
    /// # Errors
    /// [`MemError::InvalidConfig`] when a node is unknown to `topology`, listed twice, given
    /// 0 bytes, or when the listed sub-ceilings add up to more than `ceiling`.
    pub fn explicit(
        topology: &NumaTopology,
        ceiling: usize,
        per_node: impl IntoIterator<Item = (usize, usize)>,
    ) -> Result<Self, MemError> {
        let invalid = |reason: String| MemError::InvalidConfig {
            field: "numa_ceilings".into(),
            reason,
        };
        let mut map = BTreeMap::new();
        for (node, bytes) in per_node {
            if topology.node(node).is_none() {
                let known: Vec<usize> = topology.nodes().iter().map(|n| n.os_index).collect();
                return Err(invalid(format!(
                    "node {node} does not exist on this machine (nodes: {known:?})"
                )));
            }
            if bytes == 0 {
                return Err(invalid(format!(
                    "node {node} has a 0-byte sub-ceiling; leave the node out to leave it unbounded"
                )));
            }
            if map.insert(node, bytes).is_some() {
                return Err(invalid(format!("node {node} is listed twice")));
            }
        }
        let sum: u128 = map.values().map(|&b| b as u128).sum();
        if sum > ceiling as u128 {
            return Err(invalid(format!(
                "node sub-ceilings add up to {sum} bytes, above the global ceiling {ceiling}; lower them"
            )));
        }
        Ok(Self {
            per_node: map,
            ceiling,
        })
    }

    /// The sub-ceiling of `node`, or `None` when only the global ceiling bounds it.
    pub fn for_node(&self, node: usize) -> Option<usize> {
        self.per_node.get(&node).copied()
    }

    /// The global ceiling these sub-ceilings divide.
    pub fn ceiling(&self) -> usize {
        self.ceiling
    }

    /// The sub-ceilings, by node.
    pub fn iter(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.per_node.iter().map(|(&n, &b)| (n, b))
    }

    /// Whether `node`, holding `node_reserved` bytes, may take `bytes` more.
    ///
    /// # Errors
    /// [`MemError::Numa`] naming the node, its sub-ceiling and what it holds.
    pub fn check(&self, node: usize, node_reserved: usize, bytes: usize) -> Result<(), MemError> {
        let Some(limit) = self.for_node(node) else {
            return Ok(());
        };
        if node_reserved
            .checked_add(bytes)
            .is_some_and(|after| after <= limit)
        {
            return Ok(());
        }
        Err(MemError::Numa {
            reason: format!(
                "NUMA node {node} sub-ceiling reached: asked for {} but {} of its {} are held; \
                 place the work on another node or raise the node's sub-ceiling",
                human_bytes(bytes),
                human_bytes(node_reserved),
                human_bytes(limit)
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(os_index: usize, cpus: &[usize], memory_bytes: u64) -> NumaNode {
        NumaNode {
            os_index,
            cpus: cpus.to_vec(),
            memory_bytes,
        }
    }

    #[test]
    fn rejects_bad_topologies() {
        assert!(NumaTopology::new(vec![]).is_err());
        let err = NumaTopology::new(vec![node(0, &[0, 1], 1), node(1, &[1, 2], 1)]).unwrap_err();
        assert!(err.to_string().contains("CPU 1"), "{err}");
        let err = NumaTopology::new(vec![node(3, &[0], 1), node(3, &[1], 1)]).unwrap_err();
        assert!(err.to_string().contains("listed twice"), "{err}");
    }

    #[test]
    fn workers_alternate_and_skip_memory_only_nodes() {
        let t = NumaTopology::new(vec![
            node(1, &[2, 3], 1),
            node(0, &[0, 1], 1),
            node(2, &[], 1),
        ])
        .unwrap();
        let plan: Vec<(usize, usize)> = t.plan_workers(5).iter().map(|p| (p.node, p.cpu)).collect();
        assert_eq!(plan, vec![(0, 0), (1, 2), (0, 1), (1, 3), (0, 0)]);
        let only_memory = NumaTopology::new(vec![node(0, &[], 1)]).unwrap();
        assert!(only_memory.plan_workers(3).is_empty());
    }

    #[test]
    fn proportional_split_is_exact() {
        let t =
            NumaTopology::new(vec![node(0, &[0], 1), node(1, &[1], 1), node(2, &[2], 1)]).unwrap();
        let c = NumaCeilings::proportional(&t, 100);
        let shares: Vec<usize> = c.iter().map(|(_, b)| b).collect();
        assert_eq!(shares.iter().sum::<usize>(), 100);
        assert_eq!(shares, vec![34, 33, 33]);
        let no_memory = NumaTopology::new(vec![node(0, &[0], 0), node(1, &[1], 0)]).unwrap();
        assert_eq!(
            NumaCeilings::proportional(&no_memory, 10).for_node(1),
            Some(5)
        );
    }

    #[test]
    fn explicit_ceilings_are_validated() {
        let t = NumaTopology::new(vec![node(0, &[0], 1), node(1, &[1], 1)]).unwrap();
        assert!(
            NumaCeilings::explicit(&t, 100, [(7, 10)])
                .unwrap_err()
                .to_string()
                .contains("node 7")
        );
        assert!(NumaCeilings::explicit(&t, 100, [(0, 0)]).is_err());
        assert!(NumaCeilings::explicit(&t, 100, [(0, 10), (0, 10)]).is_err());
        assert!(
            NumaCeilings::explicit(&t, 100, [(0, 60), (1, 41)])
                .unwrap_err()
                .to_string()
                .contains("above")
        );
        let c = NumaCeilings::explicit(&t, 100, [(0, 60)]).unwrap();
        assert!(c.check(0, 50, 10).is_ok());
        assert!(c.check(0, 50, 11).is_err());
        assert!(c.check(0, usize::MAX, 1).is_err(), "no overflow");
        assert!(
            c.check(1, 1000, 1000).is_ok(),
            "unlisted node is bounded only globally"
        );
    }
}
