//! The store side. Each piece sits behind a small interface and the selection logic does no I/O:
//! - [`dns`]: finding stores (IP, A/AAAA, SRV), re-resolved by TTL;
//! - [`balance`]: choosing a store (round robin, least connections, consistent hash);
//! - [`health`]: up/down from active probes and failed connects;
//! - [`pool`]: pre-warmed, greeted connections per store;
//! - [`connection`]: one connection (PROXY header, TLS/STLS, greeting, CAPA, XCLIENT, login);
//! - [`group`]: a tenant's stores at runtime, tying the above together for a login.

pub mod balance;
pub mod connection;
pub mod dns;
pub mod group;
pub mod health;
pub mod pool;

pub use connection::{LoggedIn, LoginError, StoreTimeouts};
