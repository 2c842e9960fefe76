//! The store side. Each piece sits behind a small interface and the selection logic does no I/O:
//! - [`dns`]: finding stores (IP, A/AAAA, SRV), re-resolved by TTL;
//! - [`balance`]: choosing a store (round robin, least connections, consistent hash);
//! - [`health`]: up/down from active probes and failed connects;
//! - [`pool`]: pre-warmed, greeted connections per store;
//! - [`connection`]: one connection (PROXY header, TLS/STLS, greeting, CAPA, XCLIENT, login);
//! - [`registry`]: the process's stores, shared by every tenant and snapshot (one pool, one probe loop,
//!   one health state per store), and the DNS names they come from;
//! - [`group`]: a tenant's choice among its stores, tying the above together for a login.

pub mod balance;
pub mod connection;
pub mod dns;
pub mod group;
pub mod health;
pub mod pool;
pub mod registry;

pub use connection::{LoggedIn, LoginError, StoreTimeouts};
