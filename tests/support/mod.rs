//! Test support shared by the integration tests: `mod support;` from a file in tests/.
//!
//! Each test binary uses only some of these helpers, so dead-code warnings are off here.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly instead of returning errors

pub mod admin;
pub mod auth_service;
pub mod clients;
pub mod directory;
pub mod dns;
pub mod dovecot;
pub mod logs;
pub mod mailboxes;
pub mod pki;
pub mod pop3;
pub mod popgate;
pub mod redis;
pub mod store;
