#![allow(clippy::unwrap_used)]

use std::path::Path;

use super::*;

fn table(extra: &str) -> TenantTable {
    let yaml = format!(
        r#"
listeners:
  - name: pop3
    bind: 127.0.0.1:1110
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
      template: "{{domain}}!{{local}}"
  catchall:
    domains: [catchall.test]
    backends: ["127.0.0.1:1103"]
{extra}"#
    );
    let config = crate::config::Config::from_yaml_str(&yaml, Path::new(".")).unwrap();
    TenantTable::new(&config)
}

#[test]
fn all_separator_forms_reach_the_same_mailbox() {
    let t = table("routing:\n  default_tenant: catchall\n");
    let acme = t.tenant_by_name("acme").unwrap();
    for login in [
        "alice@example.com",
        "alice+example.com",
        "alice%example.com",
        "alice@EXAMPLE.com",
    ] {
        let r = t.route(login, None).unwrap();
        assert_eq!(r.tenant, acme, "{login}");
        assert_eq!(r.mailbox.local, "alice");
        assert_eq!(r.mailbox.domain, "example.com");
        assert_eq!(r.backend_user, "alice@example.com", "{login}");
    }
    // `@` wins over `+`, so subaddresses survive.
    let r = t.route("alice+tag@example.com", None).unwrap();
    assert_eq!(r.backend_user, "alice+tag@example.com");
    let r = t.route("alice+tag+example.com", None).unwrap();
    assert_eq!(r.backend_user, "alice+tag@example.com");
}

#[test]
fn wildcards_prefer_the_longest_suffix_and_exclude_the_apex() {
    let t = table("");
    let acme = t.tenant_by_name("acme").unwrap();
    let deep = t.tenant_by_name("deep").unwrap();
    assert_eq!(t.route("bob@mail.example.com", None).unwrap().tenant, acme);
    let r = t.route("bob@fr.eu.example.com", None).unwrap();
    assert_eq!(r.tenant, deep);
    assert_eq!(r.backend_user, "bob");
    assert_eq!(t.route("bob@eu.example.com", None).unwrap().tenant, acme);
}

#[test]
fn idna_and_templates() {
    let t = table("");
    let r = t.route("käthe@BÜCHER.example", None).unwrap();
    assert_eq!(r.mailbox.domain, "xn--bcher-kva.example");
    assert_eq!(r.backend_user, "xn--bcher-kva.example!käthe");
}

#[test]
fn unknown_default_and_bound_tenants() {
    let t = table("");
    assert_eq!(
        t.route("x@nowhere.org", None),
        Err(RouteError::UnknownDomain)
    );
    assert_eq!(t.route("nodomain", None), Err(RouteError::UnknownDomain));
    assert_eq!(t.route("@example.com", None), Err(RouteError::Malformed));
    assert_eq!(t.route("a@bad..domain", None), Err(RouteError::Malformed));

    let t = table("routing:\n  default_tenant: catchall\n");
    let catchall = t.tenant_by_name("catchall").unwrap();
    assert_eq!(t.route("x@nowhere.org", None).unwrap().tenant, catchall);
    assert_eq!(t.route("nodomain", None).unwrap().backend_user, "nodomain");

    let acme = t.tenant_by_name("acme").unwrap();
    assert_eq!(
        t.route("a@example.net", Some(acme)),
        Err(RouteError::WrongTenant)
    );
    assert_eq!(t.route("plain", Some(acme)).unwrap().tenant, acme);
}
