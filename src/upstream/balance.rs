//! Choosing a store from a tenant's group. Round robin for now; no I/O here.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::BackendAddr;

/// A tenant's stores and the selection state over them.
#[derive(Debug)]
pub struct BackendGroup {
    servers: Vec<BackendAddr>,
    next: AtomicUsize,
}

impl BackendGroup {
    /// A group over these stores (validated non-empty by the config).
    pub fn new(servers: Vec<BackendAddr>) -> Self {
        Self {
            servers,
            next: AtomicUsize::new(0),
        }
    }

    /// The stores, in configured order.
    pub fn servers(&self) -> &[BackendAddr] {
        &self.servers
    }

    /// The next store, round robin. `None` only for an empty group.
    pub fn pick(&self) -> Option<&BackendAddr> {
        if self.servers.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.servers.len();
        self.servers.get(i)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_robin_visits_every_store_evenly() {
        let servers: Vec<BackendAddr> = ["10.0.0.1:110", "10.0.0.2:110", "10.0.0.3:110"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let g = BackendGroup::new(servers.clone());
        let mut counts = [0; 3];
        for _ in 0..300 {
            let s = g.pick().unwrap();
            counts[servers.iter().position(|x| x == s).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
        assert!(BackendGroup::new(vec![]).pick().is_none());
    }
}
