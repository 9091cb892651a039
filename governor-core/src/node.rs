//! Which NUMA node a reservation counts against, when the configuration bounds nodes
//! ([`GovernorConfigBuilder::numa_node_ceiling`](crate::GovernorConfigBuilder::numa_node_ceiling)).
//!
//! Linux places a page on the node of the CPU that first touches it (unless a memory policy
//! says otherwise), so the node a reservation is for is the node of the thread that will fill
//! it: the node the thread was bound to ([`set_thread_numa_node`], which
//! [`bind_thread_to_local_numa`](crate::numa::bind_thread_to_local_numa) calls), or else the
//! node of the CPU it runs on right now (`sched_getcpu`, mapped through
//! `/sys/devices/system/node`). Callers that place memory themselves name the node with
//! [`MemoryGovernor::try_reserve_on_node`](crate::MemoryGovernor::try_reserve_on_node).
//!
//! This module is plain `std` + `libc` and works without the `numa` feature (hwloc); it only
//! answers "which node", the `numa` module does the binding.

use std::cell::Cell;
use std::sync::OnceLock;

use crate::config::MAX_NUMA_NODES;

thread_local! {
    /// The node this thread was bound to; `usize::MAX` when unbound.
    static THREAD_NODE: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Declares the NUMA node the calling thread's memory lives on (its OS index), or `None` to
/// go back to "the node of the CPU it runs on". Call it in worker threads you bind yourself
/// (e.g. from Tokio's `on_thread_start`); [`bind_thread_to_local_numa`] calls it for you.
///
/// [`bind_thread_to_local_numa`]: crate::numa::bind_thread_to_local_numa
pub fn set_thread_numa_node(node: Option<usize>) {
    THREAD_NODE.with(|n| n.set(node.unwrap_or(usize::MAX)));
}

/// The NUMA node (OS index) the calling thread's reservations count against: its declared
/// node, else the node of the CPU it runs on, else 0 (a machine that reports no nodes has
/// one).
pub fn thread_numa_node() -> usize {
    let declared = THREAD_NODE.with(Cell::get);
    if declared != usize::MAX {
        return declared;
    }
    current_cpu().map_or(0, node_of_cpu)
}

fn current_cpu() -> Option<usize> {
    // SAFETY: `sched_getcpu` has no preconditions; it returns -1 on failure.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).ok()
}

/// The node of `cpu` by the kernel's map, 0 when the kernel does not say.
fn node_of_cpu(cpu: usize) -> usize {
    cpu_nodes().get(cpu).map_or(0, |&n| usize::from(n))
}

/// CPU index → node, read once from `/sys/devices/system/node/node*/cpulist`.
fn cpu_nodes() -> &'static [u16] {
    static MAP: OnceLock<Vec<u16>> = OnceLock::new();
    MAP.get_or_init(|| read_cpu_nodes("/sys/devices/system/node"))
}

fn read_cpu_nodes(root: &str) -> Vec<u16> {
    let mut map = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return map;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(node) = name
            .to_str()
            .and_then(|n| n.strip_prefix("node"))
            .and_then(|n| n.parse::<u16>().ok())
            .filter(|&n| usize::from(n) < MAX_NUMA_NODES)
        else {
            continue;
        };
        let Ok(list) = std::fs::read_to_string(entry.path().join("cpulist")) else {
            continue;
        };
        for cpu in parse_cpu_list(&list) {
            if cpu >= map.len() {
                map.resize(cpu + 1, 0);
            }
            map[cpu] = node;
        }
    }
    map
}

/// Parses the kernel's CPU list format (`0-3,8,10-11`); malformed parts are skipped.
fn parse_cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let range = match part.split_once('-') {
            Some((a, b)) => a
                .trim()
                .parse::<usize>()
                .ok()
                .zip(b.trim().parse::<usize>().ok()),
            None => part.trim().parse::<usize>().ok().map(|c| (c, c)),
        };
        // Bounded so that a corrupt file cannot make us allocate without end.
        if let Some((first, last)) = range.filter(|&(a, b)| a <= b && b < 1 << 16) {
            cpus.extend(first..=last);
        }
    }
    cpus
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_like_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("0-3,8,10-11\n"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpu_list(""), Vec::<usize>::new());
        assert_eq!(
            parse_cpu_list("3-1,x,5"),
            vec![5],
            "malformed parts are skipped"
        );
    }

    #[test]
    fn declared_node_wins_and_unbinding_goes_back_to_the_cpu() {
        std::thread::spawn(|| {
            let by_cpu = thread_numa_node();
            set_thread_numa_node(Some(3));
            assert_eq!(thread_numa_node(), 3);
            set_thread_numa_node(None);
            assert_eq!(thread_numa_node(), by_cpu);
        })
        .join()
        .unwrap();
    }

    /// On this machine's kernel map every CPU has a node; a machine with one node maps all
    /// CPUs to node 0.
    #[test]
    fn the_kernel_map_covers_the_cpu_we_run_on() {
        let cpu = current_cpu().expect("sched_getcpu works on Linux");
        let nodes = read_cpu_nodes("/sys/devices/system/node");
        if nodes.is_empty() {
            return; // a kernel without NUMA support reports no nodes: everything is node 0
        }
        assert!(cpu < nodes.len(), "CPU {cpu} missing from the node map");
        assert_eq!(node_of_cpu(cpu), usize::from(nodes[cpu]));
    }
}
