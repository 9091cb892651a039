//! Per-NUMA-node sub-ceilings enforced by admission: a reservation counts against the node of
//! the thread that makes it (or the node it names), a token keeps its node for its whole life,
//! and the node's sub-ceiling refuses like an engine limit does.

use std::sync::Arc;

use governor_core::{
    EngineBudget, EngineId, GovernorConfig, MemError, MemoryGovernor, mib, set_thread_numa_node,
};

fn governor() -> Arc<MemoryGovernor> {
    let config = GovernorConfig::builder()
        .global_ceiling(mib(100))
        .engine(EngineId::Query, EngineBudget::new(mib(80)))
        .engine(EngineId::Vector, EngineBudget::new(mib(80)))
        .numa_node_ceiling(0, mib(60))
        .numa_node_ceiling(1, mib(30))
        .build()
        .expect("valid config");
    MemoryGovernor::new(config).expect("governor")
}

/// Runs `f` on a fresh thread that declares itself on `node`.
fn on_node<T: Send>(node: usize, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            set_thread_numa_node(Some(node));
            f()
        })
        .join()
        .expect("thread")
    })
}

#[test]
fn a_full_node_refuses_with_a_descriptive_error_while_the_other_node_admits() {
    let g = governor();
    let query = on_node(1, || g.try_reserve(EngineId::Query, mib(20))).unwrap();
    assert_eq!(query.numa_node(), Some(1));
    let err = on_node(1, || g.try_reserve(EngineId::Vector, mib(11))).unwrap_err();
    assert_eq!(
        err,
        MemError::NodeCeilingExceeded {
            engine: EngineId::Vector,
            node: 1,
            requested: mib(11),
            reserved: mib(20),
            ceiling: mib(30),
        }
    );
    assert!(err.is_denial(), "callers spill and retry");
    let text = err.to_string();
    assert!(text.contains("NUMA node 1 sub-ceiling reached"), "{text}");
    assert!(text.contains("20.0 MiB of the node's 30.0 MiB"), "{text}");
    // Nothing was booked by the refusal, and node 0 has room.
    assert_eq!(g.reserved(EngineId::Vector), 0);
    let vector = on_node(0, || g.try_reserve(EngineId::Vector, mib(11))).unwrap();
    assert_eq!(g.numa_node_usage(0), Some((mib(11), mib(60))));
    assert_eq!(g.numa_node_usage(1), Some((mib(20), mib(30))));
    drop((query, vector));
    assert_eq!(g.numa_node_usage(0), Some((0, mib(60))));
    assert_eq!(g.numa_node_usage(1), Some((0, mib(30))));
}

#[test]
fn a_token_keeps_its_node_whichever_thread_grows_or_drops_it() {
    let g = governor();
    let mut token = on_node(1, || g.try_reserve(EngineId::Query, mib(25))).unwrap();
    // Grown from a node-0 thread, it still draws on node 1 and is refused there.
    let err = on_node(0, || token.try_grow(mib(10))).unwrap_err();
    assert!(
        matches!(err, MemError::NodeCeilingExceeded { node: 1, .. }),
        "{err}"
    );
    on_node(0, || token.try_grow(mib(5))).unwrap();
    assert_eq!(g.numa_node_usage(1), Some((mib(30), mib(30))));
    assert_eq!(g.numa_node_usage(0), Some((0, mib(60))));
    // Split halves stay on node 1; a node-0 token cannot be merged in.
    let half = token.split(mib(15)).unwrap();
    assert_eq!(half.numa_node(), Some(1));
    let other = on_node(0, || g.try_reserve(EngineId::Query, mib(1))).unwrap();
    let other = token.merge(other).unwrap_err();
    assert_eq!(other.numa_node(), Some(0));
    token.merge(half).unwrap();
    // Dropped on a node-0 thread, the bytes go back to node 1.
    on_node(0, move || drop(token));
    assert_eq!(g.numa_node_usage(1), Some((0, mib(30))));
    assert_eq!(g.numa_node_usage(0), Some((mib(1), mib(60))));
}

#[test]
fn named_nodes_resident_memory_and_the_snapshot() {
    let g = governor();
    // A caller that places memory itself names the node, whichever thread it runs on.
    let placed = on_node(0, || g.try_reserve_on_node(EngineId::Vector, 1, mib(30))).unwrap();
    assert_eq!(placed.numa_node(), Some(1));
    assert!(matches!(
        g.try_reserve_on_node(EngineId::Vector, 1, 1),
        Err(MemError::NodeCeilingExceeded { node: 1, .. })
    ));
    // Resident memory is booked even past the node's sub-ceiling, and then blocks the node.
    let resident = on_node(1, || g.charge(EngineId::Query, mib(5)));
    assert_eq!(g.numa_node_usage(1), Some((mib(35), mib(30))));
    drop(placed);
    assert!(g.try_reserve_on_node(EngineId::Vector, 1, mib(25)).is_ok());
    assert!(g.try_reserve_on_node(EngineId::Vector, 1, mib(26)).is_err());
    // A node above the highest bounded one is counted nowhere and bounded only globally.
    let far = g.try_reserve_on_node(EngineId::Vector, 7, mib(40)).unwrap();
    assert_eq!(far.numa_node(), None);
    assert_eq!(g.numa_node_usage(7), None);

    let snap = g.snapshot();
    let nodes: Vec<_> = snap
        .numa_nodes
        .iter()
        .map(|n| (n.node, n.reserved, n.ceiling))
        .collect();
    assert_eq!(
        nodes,
        vec![(0, 0, Some(mib(60))), (1, mib(5), Some(mib(30)))]
    );
    let text = snap.to_prometheus();
    assert!(
        text.contains("numa_node_ceiling_bytes{node=\"1\"} 31457280"),
        "{text}"
    );
    assert!(
        text.contains("numa_node_reserved_bytes{node=\"1\"} 5242880"),
        "{text}"
    );
    drop((resident, far));
}

#[test]
fn without_node_ceilings_tokens_have_no_node_and_nothing_is_counted() {
    let config = GovernorConfig::builder()
        .global_ceiling(mib(10))
        .engine(EngineId::Query, EngineBudget::new(mib(10)))
        .build()
        .unwrap();
    let g = MemoryGovernor::new(config).unwrap();
    let token = on_node(1, || g.try_reserve(EngineId::Query, mib(10))).unwrap();
    assert_eq!(token.numa_node(), None);
    assert_eq!(g.numa_node_usage(0), None);
    assert!(g.snapshot().numa_nodes.is_empty());
    assert!(
        g.try_reserve_on_node(EngineId::Query, 0, 1).is_err(),
        "still bounded globally"
    );
}

/// The sub-ceilings of a synthetic 2-node machine, split by `NumaCeilings`, feed the
/// configuration and are enforced.
#[cfg(feature = "numa")]
#[test]
fn proportional_ceilings_of_a_synthetic_two_node_machine_are_enforced() {
    use governor_core::numa::{NumaCeilings, NumaPlacer};

    let placer = NumaPlacer::synthetic("Package:2 NUMANode:1 Core:2 PU:1").unwrap();
    let ceilings = NumaCeilings::proportional(placer.summary(), mib(64));
    let config = GovernorConfig::builder()
        .global_ceiling(mib(64))
        .engine(EngineId::Timeseries, EngineBudget::new(mib(64)))
        .numa_ceilings(&ceilings)
        .build()
        .unwrap();
    assert_eq!(config.numa_node_ceilings(), &[(0, mib(32)), (1, mib(32))]);
    let g = MemoryGovernor::new(config).unwrap();
    let a = g
        .try_reserve_on_node(EngineId::Timeseries, 0, mib(32))
        .unwrap();
    assert!(g.try_reserve_on_node(EngineId::Timeseries, 0, 1).is_err());
    let b = g
        .try_reserve_on_node(EngineId::Timeseries, 1, mib(32))
        .unwrap();
    drop((a, b));
}
