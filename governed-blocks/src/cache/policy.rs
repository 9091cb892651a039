//! How a cache answers pressure.

/// How a [`GovernedCache`](crate::GovernedCache) sheds entries when it is told about pressure
/// (by its watcher, see [`GovernedCache::spawn_pressure_watcher`](crate::GovernedCache::spawn_pressure_watcher),
/// or by a caller of [`GovernedCache::shed_for_pressure`](crate::GovernedCache::shed_for_pressure)).
///
/// Global pressure means other engines need memory: shed unpinned entries in proportion.
/// The cache's own engine at Critical or worse means the engine is nearly full, which a
/// cache normally makes it: shed down to `engine_headroom_pct` below the limit so the next
/// load rarely has to evict on the caller's path. Pinned entries are never shed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShedPolicy {
    /// Share of unpinned resident bytes evicted on global Warning (default 25).
    pub warning_shed_pct: u8,
    /// Share evicted on global Critical (default 75); every unpinned byte on Emergency.
    pub critical_shed_pct: u8,
    /// On engine Critical or worse, evict until this share of the engine limit is free
    /// (default 20: below the governor's default Critical threshold of 85 %, so shedding
    /// ends the Critical state that writers of the same engine wait on).
    pub engine_headroom_pct: u8,
}

impl Default for ShedPolicy {
    fn default() -> Self {
        Self {
            warning_shed_pct: 25,
            critical_shed_pct: 75,
            engine_headroom_pct: 20,
        }
    }
}

impl ShedPolicy {
    pub(crate) fn validate(self) -> Result<(), crate::CacheError> {
        for (field, pct) in [
            ("warning_shed_pct", self.warning_shed_pct),
            ("critical_shed_pct", self.critical_shed_pct),
            ("engine_headroom_pct", self.engine_headroom_pct),
        ] {
            if pct > 100 {
                return Err(crate::CacheError::InvalidConfig {
                    field,
                    reason: format!("{pct} is not a percentage (0..=100)"),
                });
            }
        }
        Ok(())
    }
}
