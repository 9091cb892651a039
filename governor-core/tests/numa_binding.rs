//! Real NUMA binding on this machine (one node in CI): the thread ends up on its node's CPUs,
//! with memory bound there, allocating from the node's jemalloc arena.

#![cfg(feature = "numa")]

use std::hint::black_box;

use governor_core::alloc::{ArenaStats, current_thread_arena};
use governor_core::numa::{NumaPlacer, bind_thread_to_local_numa, host_placer};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The CPUs this thread may run on, from the kernel (not from hwloc, which did the binding).
fn affinity() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity(0) fills it for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw mut set),
            0
        );
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

#[test]
fn host_summary_covers_the_machine() {
    let placer = NumaPlacer::host().unwrap();
    let t = placer.summary();
    assert!(t.node_count() >= 1);
    assert!(t.total_memory() > 0);
    for cpu in affinity() {
        assert!(t.node_of_cpu(cpu).is_some(), "CPU {cpu} has no node in {t}");
    }
}

#[test]
fn binds_cpus_memory_and_arena_of_the_local_node() {
    std::thread::spawn(|| {
        let binding = bind_thread_to_local_numa().unwrap();
        let node = host_placer()
            .unwrap()
            .summary()
            .node(binding.node)
            .unwrap()
            .clone();
        assert_eq!(binding.cpus, node.cpus);
        assert_eq!(affinity(), node.cpus, "the kernel confirms the CPU binding");
        assert_eq!(
            governor_core::thread_numa_node(),
            binding.node,
            "the thread's reservations now count against its node"
        );
        assert!(
            binding.memory_bound,
            "Linux supports binding a thread's memory"
        );
        assert_eq!(current_thread_arena().unwrap(), binding.arena);

        let before = ArenaStats::query(binding.arena).unwrap();
        let buffer = black_box(vec![7u8; 4 << 20]);
        let after = ArenaStats::query(binding.arena).unwrap();
        assert!(
            after.large_allocated >= before.large_allocated + (4 << 20),
            "{before:?} -> {after:?}"
        );
        drop(buffer);

        // A second binding on the same node reuses the node's arena.
        assert_eq!(bind_thread_to_local_numa().unwrap().arena, binding.arena);
    })
    .join()
    .unwrap();
}
