//! The client side of a session before login: the AUTHORIZATION state machine ([`state`], no I/O) and
//! the driver that runs it on a socket ([`driver`]: timeouts, STLS, buffering).

pub mod driver;
pub mod state;

pub use driver::{ClientSession, SessionEnd, Step};
pub use state::{Action, Authorization, Credentials, Mechanism, Offer, Transport};
