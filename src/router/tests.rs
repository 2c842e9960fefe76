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
        assert_eq!(r.store_user, "alice@example.com", "{login}");
    }
    // `@` wins over `+`, so subaddresses survive.
    let r = t.route("alice+tag@example.com", None).unwrap();
    assert_eq!(r.store_user, "alice+tag@example.com");
    // Without `@`, a subaddress tag is ambiguous with the SDPS separator: refused, never guessed.
    assert_eq!(
        t.route("alice+tag+example.com", None),
        Err(RouteError::LocalPartNamesDomain)
    );
}

#[test]
fn a_local_part_never_carries_the_separator_it_was_split_at_or_a_hosted_domain() {
    let t = table("routing:\n  default_tenant: catchall\n");
    // The separator that split the name, again in the local part: refused for each separator.
    for login in [
        "user150@example.net@example.com",
        "user150+example.net+example.com",
        "user150%example.net%example.com",
        "a@b@example.com",
    ] {
        assert_eq!(
            t.route(login, None),
            Err(RouteError::LocalPartNamesDomain),
            "{login}"
        );
    }
    // Another separator followed by a hosted domain (exact or wildcard): refused.
    for login in [
        "user150%example.net@example.com",
        "user150+example.net@example.com",
        "user150+x.eu.example.com@example.net",
        "user150%B\u{fc}cher.example@example.com",
    ] {
        assert_eq!(
            t.route(login, None),
            Err(RouteError::LocalPartNamesDomain),
            "{login}"
        );
    }
    // Subaddress tags that name no hosted domain still route (the default tenant does not count).
    for login in [
        "alice+tag@example.com",
        "alice+news.letter@example.com",
        "a%b@example.com",
    ] {
        assert!(t.route(login, None).is_ok(), "{login}");
    }
}

#[test]
fn templates_are_filled_part_by_part_never_re_expanded() {
    let t = table("");
    let r = t.route("x{login}y{domain}@example.net", None).unwrap();
    assert_eq!(r.store_user, "example.net!x{login}y{domain}");
    // Unknown placeholders and stray braces are refused when the config loads.
    for bad in ["{user}@x", "{local", "local}", "{}", "plain"] {
        let yaml = format!(
            "listeners:\n  - name: p\n    bind: 127.0.0.1:1\ntenants:\n  a:\n    domains: [a.test]\n    \
             backends: [\"127.0.0.1:2\"]\n    backend_username:\n      template: \"{bad}\"\n"
        );
        let err = crate::config::Config::from_yaml_str(&yaml, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(err.contains("template"), "{bad}: {err}");
    }
}

#[test]
fn the_checked_user_is_the_normalised_mailbox() {
    let t = table("");
    let acme = t.route("ALICE@Example.com", None).unwrap();
    assert_eq!(acme.store_user, "ALICE@example.com");
    assert_eq!(t.checked_user(&acme), "alice@example.com");
    // `o` + U+0308 (decomposed) becomes the precomposed form the secret was stored under.
    let decomposed = t.route("jo\u{308}rg@example.com", None).unwrap();
    assert_eq!(t.checked_user(&decomposed), "j\u{f6}rg@example.com");
    // The tenant's name form still applies.
    let net = t.route("Bob@EXAMPLE.net", None).unwrap();
    assert_eq!(t.checked_user(&net), "example.net!bob");
}

#[test]
fn wildcards_prefer_the_longest_suffix_and_exclude_the_apex() {
    let t = table("");
    let acme = t.tenant_by_name("acme").unwrap();
    let deep = t.tenant_by_name("deep").unwrap();
    assert_eq!(t.route("bob@mail.example.com", None).unwrap().tenant, acme);
    let r = t.route("bob@fr.eu.example.com", None).unwrap();
    assert_eq!(r.tenant, deep);
    assert_eq!(r.store_user, "bob");
    assert_eq!(t.route("bob@eu.example.com", None).unwrap().tenant, acme);
}

#[test]
fn idna_and_templates() {
    let t = table("");
    let r = t.route("käthe@BÜCHER.example", None).unwrap();
    assert_eq!(r.mailbox.domain, "xn--bcher-kva.example");
    assert_eq!(r.store_user, "xn--bcher-kva.example!käthe");
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
    assert_eq!(t.route("nodomain", None).unwrap().store_user, "nodomain");

    let acme = t.tenant_by_name("acme").unwrap();
    assert_eq!(
        t.route("a@example.net", Some(acme)),
        Err(RouteError::WrongTenant)
    );
    assert_eq!(t.route("plain", Some(acme)).unwrap().tenant, acme);
}

#[test]
fn wildcard_lookup_walks_labels_from_the_longest_parent() {
    let t = table("");
    let acme = t.tenant_by_name("acme").unwrap();
    let deep = t.tenant_by_name("deep").unwrap();
    assert_eq!(t.tenant_for_domain("a.b.c.eu.example.com"), Some(deep));
    assert_eq!(t.tenant_for_domain("eu.example.com"), Some(acme));
    assert_eq!(t.tenant_for_domain("x.example.com"), Some(acme));
    assert_eq!(t.tenant_for_domain("example.com.evil.test"), None);
    assert_eq!(t.tenant_for_domain("notexample.com"), None);
}

#[test]
fn case_rules_per_tenant() {
    let t = table(
        "  lower:\n    domains: [lower.test]\n    backends: [\"127.0.0.1:1104\"]\n    login_case: lower\n\
         \x20 exact:\n    domains: [exact.test]\n    backends: [\"127.0.0.1:1105\"]\n    login_case: sensitive\n",
    );
    // insensitive (default): one key whatever the case; the store sees the name as written.
    let r = t.route("John.Doe@Example.COM", None).unwrap();
    assert_eq!(r.key, "john.doe@example.com");
    assert_eq!(r.store_user, "John.Doe@example.com");
    // lower: the store sees it lowercased too (Unicode lowercase, not only ASCII).
    let r = t.route("JÖRG@lower.test", None).unwrap();
    assert_eq!(r.key, "jörg@lower.test");
    assert_eq!(r.store_user, "jörg@lower.test");
    // sensitive: different keys for different case.
    let a = t.route("John@exact.test", None).unwrap();
    let b = t.route("john@exact.test", None).unwrap();
    assert_ne!(a.key, b.key);
    assert_eq!(a.store_user, "John@exact.test");
}

#[test]
fn canonically_equivalent_names_are_one_mailbox() {
    let t = table(
        "  exact:\n    domains: [exact.test]\n    backends: [\"127.0.0.1:1105\"]\n    login_case: sensitive\n",
    );
    // Precomposed ö (U+00F6) and o + combining diaeresis (U+0308): one mailbox key, so one store under a
    // consistent hash, one throttle and one secret; the store still sees what the client typed.
    for domain in ["example.com", "exact.test"] {
        let composed = t.route(&format!("j\u{f6}rg@{domain}"), None).unwrap();
        let decomposed = t.route(&format!("jo\u{308}rg@{domain}"), None).unwrap();
        assert_eq!(composed.key, decomposed.key, "{domain}");
        assert_eq!(composed.key, format!("j\u{f6}rg@{domain}"));
        assert_eq!(decomposed.store_user, format!("jo\u{308}rg@{domain}"));
    }
    // Case folding first, then NFC: Å (U+212B, ANGSTROM SIGN) and Å (U+00C5) and å + ring all meet.
    let keys: Vec<String> = [
        "\u{212b}sa@example.com",
        "\u{c5}sa@example.com",
        "a\u{30a}sa@example.com",
    ]
    .iter()
    .map(|l| t.route(l, None).unwrap().key)
    .collect();
    assert!(keys.iter().all(|k| k == "\u{e5}sa@example.com"), "{keys:?}");
}

#[test]
fn utf8_local_parts_and_idna_domains_route() {
    let t = table("");
    let net = t.tenant_by_name("net").unwrap();
    for login in [
        "jörg@bücher.example",
        "jörg@BÜCHER.example",
        "jörg@xn--bcher-kva.example",
    ] {
        let r = t.route(login, None).unwrap();
        assert_eq!(r.tenant, net, "{login}");
        assert_eq!(r.key, "jörg@xn--bcher-kva.example", "{login}");
    }
}
