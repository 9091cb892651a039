//! NUMA placement on hwloc synthetic topologies (2 and 4 nodes): node lookup, worker spread
//! and per-node sub-ceilings, without the machine having that many nodes.

#![cfg(feature = "numa")]

use governor_core::numa::{NumaCeilings, NumaPlacer};
use governor_core::{MemError, mib};

#[test]
fn two_node_machine() {
    let placer = NumaPlacer::synthetic("Package:2 NUMANode:1 Core:4 PU:1").unwrap();
    let t = placer.summary();
    assert_eq!(t.node_count(), 2);
    assert_eq!(t.nodes()[0].cpus, vec![0, 1, 2, 3]);
    assert_eq!(t.nodes()[1].cpus, vec![4, 5, 6, 7]);
    assert_eq!(t.node_of_cpu(3).unwrap().os_index, 0);
    assert_eq!(t.node_of_cpu(4).unwrap().os_index, 1);
    assert!(t.node_of_cpu(8).is_none());

    // Workers alternate nodes; 8 workers use every CPU once.
    let plan = t.plan_workers(8);
    let nodes: Vec<usize> = plan.iter().map(|p| p.node).collect();
    assert_eq!(nodes, vec![0, 1, 0, 1, 0, 1, 0, 1]);
    let mut cpus: Vec<usize> = plan.iter().map(|p| p.cpu).collect();
    cpus.sort_unstable();
    assert_eq!(cpus, (0..8).collect::<Vec<_>>());
    for p in &plan {
        assert_eq!(
            t.node_of_cpu(p.cpu).unwrap().os_index,
            p.node,
            "worker {} placed off its node",
            p.worker
        );
    }

    // Equal memory: the ceiling splits evenly and adds up exactly.
    let ceilings = NumaCeilings::proportional(t, mib(256) + 1);
    assert_eq!(ceilings.for_node(0), Some(mib(128) + 1));
    assert_eq!(ceilings.for_node(1), Some(mib(128)));
    assert!(ceilings.check(1, mib(100), mib(28)).is_ok());
    let err = ceilings.check(1, mib(100), mib(29)).unwrap_err();
    assert!(matches!(err, MemError::Numa { .. }));
    assert!(err.to_string().contains("node 1"), "{err}");
}

#[test]
fn four_node_machine() {
    let placer = NumaPlacer::synthetic("Package:2 NUMANode:2 Core:2 PU:2").unwrap();
    let t = placer.summary();
    assert_eq!(t.node_count(), 4);
    for (i, node) in t.nodes().iter().enumerate() {
        assert_eq!(node.os_index, i);
        assert_eq!(node.cpus, (i * 4..i * 4 + 4).collect::<Vec<_>>());
        assert!(node.memory_bytes > 0);
    }
    // 6 workers on 4 nodes: every node gets one before any gets a second.
    let plan = t.plan_workers(6);
    let nodes: Vec<usize> = plan.iter().map(|p| p.node).collect();
    assert_eq!(nodes, vec![0, 1, 2, 3, 0, 1]);
    assert_eq!(plan[4].cpu, 1, "second round takes each node's next CPU");

    let ceilings = NumaCeilings::proportional(t, mib(1024));
    assert!(ceilings.iter().all(|(_, bytes)| bytes == mib(256)));
    let explicit = NumaCeilings::explicit(t, mib(1024), [(0, mib(512)), (3, mib(128))]).unwrap();
    assert_eq!(explicit.for_node(3), Some(mib(128)));
    assert_eq!(explicit.for_node(1), None);
    let err = NumaCeilings::explicit(t, mib(1024), [(4, mib(1))]).unwrap_err();
    assert!(err.to_string().contains("node 4 does not exist"), "{err}");
}

#[test]
fn synthetic_topology_cannot_bind_this_thread() {
    let placer = NumaPlacer::synthetic("NUMANode:4 Core:2 PU:1").unwrap();
    let err = placer.bind_current_thread().unwrap_err();
    assert!(matches!(err, MemError::Numa { .. }), "{err}");
}
