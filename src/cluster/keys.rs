//! The key space: every key names its entity (a client address, a mailbox, a tenant) by a keyed hash, so
//! the server never holds a mailbox name or an address in clear, and every key of one entity carries the
//! same hash tag (`{...}`), so a script that touches several of them stays in one Redis Cluster slot.
//!
//! | key | type | TTL | written by |
//! |---|---|---|---|
//! | `P ipf:{H}` | hash `n` (failures) | `forget_after` | a failed login from the address |
//! | `P ipl:{H}` | string | `lockout_for` | the failure that locks the address |
//! | `P ipr:{H}` | string (GCRA arrival time, ms) | until the bucket is full | a connection's first login attempt |
//! | `P ips:{H}` | sorted set of leases (member `replica:session`, score: expiry ms) | `lease_ttl` | a connection's first login attempt, renewals |
//! | `P mbf:{H}` | hash `n`, `pw` (keyed digests of the last wrong secrets) | `forget_after` | a failed login of the mailbox |
//! | `P mbl:{H}` | string | `lockout_for` | the failure that locks the mailbox |
//! | `P mbk:{H}` | sorted set (keyed address digests, score: ms) | `known_address_for` | a successful login |
//! | `P mbs:{H}` | sorted set of leases | `lease_ttl` | a successful login, renewals |
//! | `P mbd:{H}` | string | `min_login_interval` | a successful login (LOGIN-DELAY) |
//! | `P tns:{H}` | sorted set of leases | `lease_ttl` | a login of the tenant, renewals |
//! | `P replicas` | sorted set (replica id, score: expiry ms) | `lease_ttl` | every replica's heartbeat |
//! | channel `P bus` | pub/sub | — | fleet commands and their answers |
//!
//! `P` is `cluster.key_prefix`; `H` is 32 hex digits of HMAC-SHA256 under `cluster.key_secret_file`'s key
//! of the entity's kind and bytes.

use std::net::IpAddr;

use ring::hmac;

/// Names keys and digests under the fleet's shared secret.
pub struct Keys {
    prefix: String,
    key: hmac::Key,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// The keys of one client address.
#[derive(Debug, Clone)]
pub struct IpKeys {
    pub failures: String,
    pub lock: String,
    pub rate: String,
    pub leases: String,
    /// The address as a mailbox's known-address set remembers it.
    pub digest: String,
}

/// The keys of one mailbox.
#[derive(Debug, Clone)]
pub struct MailboxKeys {
    pub failures: String,
    pub lock: String,
    pub known: String,
    pub leases: String,
    pub next_login: String,
    /// What the mailbox is matched by in fleet commands (`/kick`).
    pub digest: String,
}

impl Keys {
    /// Keys under `prefix`, hashed with `secret`.
    pub fn new(prefix: &str, secret: &[u8]) -> Self {
        Self {
            prefix: prefix.to_string(),
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// 32 hex digits of the keyed hash of `kind` and `bytes`.
    pub fn digest(&self, kind: &str, bytes: &[u8]) -> String {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(kind.as_bytes());
        ctx.update(&[0]);
        ctx.update(bytes);
        let tag = ctx.sign();
        tag.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn entity(&self, kind: &str, tag: &str) -> String {
        format!("{}{kind}:{{{tag}}}", self.prefix)
    }

    /// The keys of a client address (already grouped as the throttle counts it: an IPv6 prefix).
    pub fn ip(&self, ip: IpAddr) -> IpKeys {
        let bytes = match ip.to_canonical() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let tag = self.digest("ip", &bytes);
        IpKeys {
            failures: self.entity("ipf", &tag),
            lock: self.entity("ipl", &tag),
            rate: self.entity("ipr", &tag),
            leases: self.entity("ips", &tag),
            digest: self.digest("addr", &bytes),
        }
    }

    /// The keys of a normalised mailbox.
    pub fn mailbox(&self, mailbox: &str) -> MailboxKeys {
        let tag = self.digest("mb", mailbox.as_bytes());
        MailboxKeys {
            failures: self.entity("mbf", &tag),
            lock: self.entity("mbl", &tag),
            known: self.entity("mbk", &tag),
            leases: self.entity("mbs", &tag),
            next_login: self.entity("mbd", &tag),
            digest: tag,
        }
    }

    /// The session-lease key of a tenant.
    pub fn tenant(&self, tenant: &str) -> String {
        self.entity("tns", &self.digest("tenant", tenant.as_bytes()))
    }

    /// A wrong secret of a mailbox as remembered (keyed, and different for the same secret of another
    /// mailbox).
    pub fn secret(&self, mailbox: &str, secret: &[u8]) -> String {
        let mut bytes = Vec::with_capacity(mailbox.len() + 1 + secret.len());
        bytes.extend_from_slice(mailbox.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(secret);
        self.digest("pw", &bytes)[..16].to_string()
    }

    /// The heartbeat set of live replicas.
    pub fn replicas(&self) -> String {
        format!("{}replicas", self.prefix)
    }

    /// The command channel.
    pub fn bus(&self) -> String {
        format!("{}bus", self.prefix)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly where it stands
mod tests {
    use super::*;

    #[test]
    fn keys_name_no_mailbox_or_address_and_share_a_slot_per_entity() {
        let keys = Keys::new("pg:", b"0123456789abcdef");
        let mb = keys.mailbox("alice@example.com");
        for k in [
            &mb.failures,
            &mb.lock,
            &mb.known,
            &mb.leases,
            &mb.next_login,
        ] {
            assert!(!k.contains("alice") && !k.contains("example"), "{k}");
            assert!(k.starts_with("pg:mb"), "{k}");
            assert!(k.ends_with(&format!("{{{}}}", mb.digest)), "{k}");
        }
        let ip = keys.ip("192.0.2.7".parse().unwrap());
        for k in [&ip.failures, &ip.lock, &ip.rate, &ip.leases] {
            assert!(!k.contains("192") && !k.contains("c000"), "{k}");
        }
        // The mapped and the plain IPv4 address are one client.
        assert_eq!(keys.ip("::ffff:192.0.2.7".parse().unwrap()).lock, ip.lock);
    }

    #[test]
    fn the_secret_keys_the_names() {
        let a = Keys::new("pg:", b"0123456789abcdef");
        let b = Keys::new("pg:", b"fedcba9876543210");
        assert_eq!(
            a.mailbox("bob@example.com").lock,
            a.mailbox("bob@example.com").lock
        );
        assert_ne!(
            a.mailbox("bob@example.com").lock,
            b.mailbox("bob@example.com").lock
        );
        assert_ne!(
            a.mailbox("bob@example.com").lock,
            a.mailbox("bo@example.com").lock
        );
        assert_ne!(
            a.secret("bob@example.com", b"pw"),
            a.secret("eve@example.com", b"pw")
        );
    }
}
