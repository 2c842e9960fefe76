//! The tenant table: `split` and `route` never panic, a route is consistent with the split and with
//! the tenant a listener is bound to, a local part never carries the separator it was split at, and the
//! store login name can never carry a line break.

use std::path::Path;
use std::sync::OnceLock;

use popgate::Config;
use popgate::router::{RouteError, TenantTable, normalize_domain};

use super::has_line_break_or_nul;

/// Exact, wildcard (nested) and IDNA domains, all three username forms, and a default tenant.
const CONFIG: &str = r#"
listeners:
  - name: pop3
    bind: 127.0.0.1:1110
routing:
  default_tenant: catchall
tenants:
  acme:
    domains: [example.com, "*.example.com"]
    backends: ["127.0.0.1:1100"]
  deep:
    domains: ["*.eu.example.com"]
    backends: ["127.0.0.1:1101"]
    backend_username: local
  net:
    domains: [example.net, "bücher.example"]
    backends: ["127.0.0.1:1102"]
    backend_username:
      template: "{domain}!{local}"
  catchall:
    domains: [catchall.test]
    backends: ["127.0.0.1:1103"]
"#;

fn table() -> &'static TenantTable {
    static TABLE: OnceLock<TenantTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let config =
            Config::from_yaml_str(CONFIG, Path::new(".")).expect("the fuzz config is valid");
        TenantTable::new(&config)
    })
}

/// Splits and routes `data` (as UTF-8, lossily) with no bound tenant and bound to each tenant.
pub fn check(data: &[u8]) {
    let table = table();
    let login = String::from_utf8_lossy(data);
    let login = login.as_ref();

    let split = table.split(login);
    match &split {
        Ok(m) => {
            assert_eq!(m.login, login);
            assert!(!m.local.is_empty());
            assert!(login.starts_with(&m.local));
            if !m.domain.is_empty() {
                assert!(m.domain.len() <= 253, "domain of {} bytes", m.domain.len());
                assert!(m.domain.is_ascii() && m.domain == m.domain.to_ascii_lowercase());
                assert_eq!(
                    normalize_domain(&m.domain).as_deref(),
                    Some(m.domain.as_str()),
                    "normalising is not idempotent"
                );
            }
        }
        // Unusable, or a local part that names another domain (`a@b.example@c.example`).
        Err(e) => assert!(
            matches!(e, RouteError::Malformed | RouteError::LocalPartNamesDomain),
            "{e:?}"
        ),
    }

    let unbound = table.route(login, None);
    let mailbox = match split {
        Ok(m) => m,
        Err(e) => {
            assert_eq!(unbound, Err(e));
            return;
        }
    };
    // The local part never carries the separator it was split at.
    if !mailbox.domain.is_empty() {
        let sep = login[mailbox.local.len()..].chars().next();
        assert!(sep.is_some_and(|s| !mailbox.local.contains(s)), "{login:?}");
    }
    // A default tenant exists, so every well-formed name has a route.
    let route = unbound.expect("the default tenant takes every well-formed name");
    assert_eq!(route.mailbox, mailbox);
    assert!(!route.store_user.is_empty());
    assert!(!has_line_break_or_nul(route.store_user.as_bytes()));
    if !mailbox.domain.is_empty() {
        assert_eq!(table.tenant_for_domain(&mailbox.domain), Some(route.tenant));
    }

    for bound in table.ids() {
        let r = table.route(login, Some(bound));
        if mailbox.domain.is_empty() || bound == route.tenant {
            let r = r.expect("a bound tenant takes its own names and names without a domain");
            assert_eq!(r.tenant, bound);
            assert_eq!(r.mailbox, mailbox);
        } else {
            assert_eq!(r, Err(RouteError::WrongTenant));
        }
    }
}
