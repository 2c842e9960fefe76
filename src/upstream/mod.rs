//! The store side: which store of a tenant's group takes a session ([`balance`]), and logging in to it
//! on the client's behalf ([`backend`]).
//!
//! Selection is kept apart from I/O so later policies (least connections, consistent hashing, health)
//! plug in behind [`balance::BackendGroup`] without touching the login code.

pub mod backend;
pub mod balance;

pub use backend::{BackendTimeouts, LoggedIn, LoginError};
pub use balance::BackendGroup;
