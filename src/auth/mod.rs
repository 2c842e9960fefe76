//! Authentication: what popgate sends a store for a client (`decision`, no I/O) and the nginx-style
//! auth_http client (`http`: the client in `mod.rs`, its wire format in `wire.rs` with no I/O, its answer
//! cache in `cache.rs`).
//!
//! The secrets and token *files* are read by the `secret` leaf, not here: `config` checks them at load,
//! and config may reach only leaves (this room reaches `session` and `store`, which reach `config`).

pub mod decision;
pub mod http;
