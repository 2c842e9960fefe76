#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use super::*;

const GOOD: &str = r#"
listeners:
  - name: pop3
    bind: 127.0.0.1:1110
tenants:
  acme:
    domains: [example.com]
    backends: ["127.0.0.1:1100"]
"#;

fn parse(yaml: &str) -> Result<Config, ConfigError> {
    Config::from_yaml_str(yaml, Path::new("."))
}

#[test]
fn defaults_are_documented_values() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.routing.separators, vec!['@', '+', '%']);
    assert_eq!(c.timeouts.pre_login.get(), Duration::from_secs(60));
    assert_eq!(c.timeouts.idle.get(), Duration::from_secs(600));
    assert_eq!(c.listeners[0].value.tls, ListenerTls::Starttls);
    let acme = &c.tenants["acme"].value;
    assert_eq!(acme.plaintext_login, PlaintextLogin::RequireTls);
    assert_eq!(acme.backend_username, UsernameForm::Full);
}

#[test]
fn durations_accept_units_and_seconds() {
    let c = parse(&format!("{GOOD}timeouts:\n  idle: 15m\n  pre_login: 30\n")).unwrap();
    assert_eq!(c.timeouts.idle.get(), Duration::from_secs(900));
    assert_eq!(c.timeouts.pre_login.get(), Duration::from_secs(30));
    let err = parse(&format!("{GOOD}timeouts:\n  idle: soon\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("idle") && err.contains("line 10"), "{err}");
}

#[test]
fn unknown_field_names_field_and_line() {
    let yaml = GOOD.replace("    backends:", "    backend:");
    let err = parse(&yaml).unwrap_err().to_string();
    assert!(err.contains("backend") && err.contains("line 8"), "{err}");
}

#[test]
fn duplicate_tenant_key_names_line() {
    let yaml =
        format!("{GOOD}  acme:\n    domains: [example.org]\n    backends: [\"127.0.0.1:1\"]\n");
    let err = parse(&yaml).unwrap_err().to_string();
    assert!(
        err.contains("duplicate") && err.contains("acme") && err.contains("line 9"),
        "{err}"
    );
}

#[test]
fn bad_ports_name_field_and_line() {
    let err = parse(&GOOD.replace("127.0.0.1:1110", "127.0.0.1:99999"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("bind") && err.contains("line 4"), "{err}");
    let err = parse(&GOOD.replace("127.0.0.1:1100", "127.0.0.1:0"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("backends") || err.contains("port 0"), "{err}");
    assert!(err.contains("line 8"), "{err}");
}

#[test]
fn validation_collects_every_problem_with_lines() {
    let yaml = r#"
listeners:
  - name: a
    bind: 127.0.0.1:1110
    tenant: ghost
  - name: a
    bind: 127.0.0.1:1110
tenants:
  one:
    domains: [example.com]
    backends: []
  two:
    domains: [EXAMPLE.com, "bad domain"]
    backends: ["store:110"]
"#;
    let Err(ConfigError::Invalid(problems)) = parse(yaml) else {
        panic!("expected validation problems");
    };
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    let has = |needle: &str| text.iter().any(|p| p.contains(needle));
    assert!(has("listeners[0].tenant (line 3)"), "{text:?}");
    assert!(has("listeners[1].name (line 6)"), "{text:?}");
    assert!(has("listeners[1].bind"), "{text:?}");
    assert!(has("tenants.one.backends"), "{text:?}");
    assert!(
        has("tenants.two.domains[0] (line 13)") && has("also claimed by tenant `one`"),
        "{text:?}"
    );
    assert!(has("tenants.two.domains[1]"), "{text:?}");
}

#[test]
fn unreadable_certificate_is_reported() {
    let yaml =
        format!("{GOOD}tls:\n  certificate: /nonexistent/cert.pem\n  key: /nonexistent/key.pem\n");
    let err = parse(&yaml).unwrap_err().to_string();
    assert!(
        err.contains("tls.certificate") && err.contains("/nonexistent/cert.pem"),
        "{err}"
    );
}

#[test]
fn admin_token_file_is_read_relative_to_the_config_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("token"),
        "  t0ken-from-file \nsecond line ignored\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("empty"), "\n").unwrap();
    let with = |admin: &str| Config::from_yaml_str(&format!("{GOOD}admin:\n{admin}"), dir.path());

    let c = with("  token_file: token\n").unwrap();
    let token = c.admin.unwrap().token.unwrap();
    assert!(token.matches(b"t0ken-from-file"), "first line, trimmed");

    let err = with("  token_file: missing\n").unwrap_err().to_string();
    assert!(
        err.contains("admin.token_file") && err.contains("missing"),
        "{err}"
    );
    let err = with("  token_file: empty\n").unwrap_err().to_string();
    assert!(
        err.contains("admin.token_file") && err.contains("no token"),
        "{err}"
    );
    let err = with("  token: inline\n  token_file: token\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not both"), "{err}");
    // Errors name the file, never what is in it.
    assert!(
        !err.contains("t0ken-from-file") && !err.contains("inline"),
        "{err}"
    );
    let err = with("  token: \"\"\n").unwrap_err().to_string();
    assert!(
        err.contains("admin.token") && err.contains("must not be empty"),
        "{err}"
    );
}

#[test]
fn admin_connection_bounds_and_hosts_have_defaults_and_are_checked() {
    let with = |admin: &str| parse(&format!("{GOOD}admin:\n{admin}"));
    let a = with("  bind: 127.0.0.1:9110\n").unwrap().admin.unwrap();
    assert_eq!(a.max_connections, 64);
    assert_eq!(a.header_timeout.get(), Duration::from_secs(5));
    assert!(a.hosts.is_empty());

    let set = "  max_connections: 8\n  header_timeout: 1500ms\n  \
               hosts: [popgate-admin, popgate-admin.mail.svc]\n";
    let a = with(set).unwrap().admin.unwrap();
    assert_eq!(a.max_connections, 8);
    assert_eq!(a.header_timeout.get(), Duration::from_millis(1500));
    assert_eq!(a.hosts, ["popgate-admin", "popgate-admin.mail.svc"]);

    let err = with(
        "  max_connections: 0\n  header_timeout: 0s\n  hosts: [\"evil.example:80\", \"*.svc\"]\n",
    )
    .unwrap_err()
    .to_string();
    for needle in [
        "admin.max_connections: must be at least 1",
        "admin.header_timeout: must be longer than zero",
        "admin.hosts[0]",
        "admin.hosts[1]",
    ] {
        assert!(err.contains(needle), "missing {needle} in {err}");
    }
}

#[test]
fn booleans_and_enums_are_strict() {
    let err = parse(&GOOD.replace("bind: 127.0.0.1:1110", "bind: 127.0.0.1:1110\n    tls: yes"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 5"), "{err}");
}

/// Every YAML config shipped in the repository must load (certificate paths relative to the file).
#[test]
fn every_shipped_config_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = 0;
    // popgate configs live in deploy/config; the copies embedded in the Kubernetes manifests and the Helm
    // chart are rendered and checked with `popgate check` by scripts/check-packaging.
    let mut stack = vec![root.join("deploy/config")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                found += 1;
            }
        }
    }
    assert!(found >= 1, "no shipped config found");
}

#[test]
fn server_names_claimed_twice_or_under_another_tenants_domain_are_refused() {
    // Certificate files are not needed for these problems to be found (their absence is reported too).
    let yaml = r#"
listeners:
  - name: pop3s
    bind: 127.0.0.1:1995
    tls: implicit
tenants:
  acme:
    domains: [example.com]
    backends: ["127.0.0.1:1100"]
    tls:
      certificate: a.pem
      key: a.key
      server_names: [mail.example.com, pop.shared.test]
  beta:
    domains: [example.org]
    backends: ["127.0.0.1:1101"]
    tls:
      certificate: b.pem
      key: b.key
      server_names: [pop.shared.test, mail.example.org, "*.example.net"]
  gamma:
    domains: [shop.example.net, "*.example.info"]
    backends: ["127.0.0.1:1102"]
  delta:
    domains: [sub.example.info]
    backends: ["127.0.0.1:1103"]
    tls:
      certificate: d.pem
      key: d.key
"#;
    let err = parse(yaml).unwrap_err().to_string();
    // One name, two tenants.
    assert!(
        err.contains("tenants.beta.tls.server_names (line 15): `pop.shared.test` is also a server name of tenant `acme`"),
        "{err}"
    );
    // beta's `*.example.net` covers names under gamma's domain: gamma's users would meet beta's binding.
    assert!(
        err.contains("tenants.gamma.domains[0]") && err.contains("select tenant `beta`"),
        "{err}"
    );
    // delta's default names (`sub.example.info`, `*.sub.example.info`) do not cover gamma's other names,
    // but gamma's wildcard domain does not select delta either: no problem for gamma's second domain.
    assert!(!err.contains("tenants.gamma.domains[1]"), "{err}");
    // A tenant whose own default names are the only claim is fine.
    assert!(!err.contains("tenants.delta.domains"), "{err}");
    assert!(!err.contains("tenants.acme.domains"), "{err}");
}

/// A parse error says where, by line and column, and never shows the file's text: the message reaches
/// logs and the status page, and the lines around a mistake may hold a password or token.
#[test]
fn a_parse_error_quotes_no_line_of_the_file() {
    let yaml = format!(
        "{GOOD}admin:\n  bind: 127.0.0.1:9100\n  token: hunter2-admin-token\n  max_connections: [\n"
    );
    let err = parse(&yaml).unwrap_err().to_string();
    assert!(err.contains("line"), "{err}");
    assert!(!err.contains("hunter2"), "file text in the error: {err}");
}

#[test]
fn a_cluster_block_is_checked_whole() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.key");
    std::fs::write(&short, "too-short\n").unwrap();
    let yaml = format!(
        "cluster:\n  mode: sentinel\n  servers: [\"redis\", \"127.0.0.1:6379\"]\n  key_secret_file: {}\n  \
         timeout: 0s\n  key_prefix: \"a{{b}}\"\n  password_file: /nonexistent/redis.password\n{GOOD}",
        short.display()
    );
    let err = Config::from_yaml_str(&yaml, dir.path())
        .unwrap_err()
        .to_string();
    for field in [
        "cluster.servers",
        "cluster.sentinel_service",
        "cluster.timeout",
        "cluster.key_prefix",
        "cluster.key_secret_file",
        "cluster.password_file",
    ] {
        assert!(err.contains(field), "{field} not reported in: {err}");
    }
    // A good block: defaults as documented, and off when absent.
    let key = dir.path().join("good.key");
    std::fs::write(&key, "0123456789abcdef0123\n").unwrap();
    let yaml = format!(
        "cluster:\n  servers: [\"127.0.0.1:6379\"]\n  key_secret_file: {}\n{GOOD}",
        key.display()
    );
    let c = Config::from_yaml_str(&yaml, dir.path()).unwrap();
    let cluster = c.cluster.unwrap();
    assert_eq!(cluster.mode, ClusterMode::Standalone);
    assert_eq!(cluster.timeout.get(), Duration::from_millis(100));
    assert_eq!(cluster.lease_ttl.get(), Duration::from_secs(30));
    assert_eq!(cluster.key_prefix, "popgate:");
    assert_eq!(cluster.when_unavailable.lockouts, FailPolicy::Open);
    assert!(parse(GOOD).unwrap().cluster.is_none());
}

#[test]
fn a_placement_block_is_checked_whole() {
    let tenant = |placement: &str, extra: &str| {
        format!(
            "listeners:\n  - name: pop3\n    bind: 127.0.0.1:1110\ntenants:\n  acme:\n    domains: [example.com]\n    \
             backends: [\"127.0.0.1:1100\"]\n{extra}    placement:\n{placement}"
        )
    };
    let cases = [
        (
            "      map: a.map\n      sql: {url: \"postgres://db/mail\", query: \"SELECT 1\"}\n",
            "",
            "exactly one source",
        ),
        ("      timeout: 1s\n", "", "exactly one source"),
        (
            "      map: a.map\n      timeout: 0s\n",
            "",
            "tenants.acme.placement.timeout",
        ),
        (
            "      ldap: {urls: [\"http://ldap\"], base: \"dc=x\", filter: \"(objectClass=*)\", pool: 0}\n",
            "",
            "tenants.acme.placement.ldap.urls",
        ),
        (
            "      ldap: {urls: [\"ldap://ldap\"], base: \"dc=x\", filter: \"(objectClass=*)\"}\n",
            "",
            "tenants.acme.placement.ldap.filter",
        ),
        (
            "      ldap: {urls: [\"ldap://ldap\"], base: \"dc=x\", bind_dn: \"cn=x\"}\n",
            "",
            "bind_dn and password_file go together",
        ),
        (
            "      sql: {url: \"sqlite://x\", query: \"SELECT 1\"}\n",
            "",
            "tenants.acme.placement.sql.url",
        ),
        (
            "      map: a.map\n",
            "    auth_http: {url: \"http://127.0.0.1:1/\"}\n",
            "use one of the two",
        ),
        (
            "      map: a.map\n",
            "    apop_passthrough: {max_pending: 1, max_pending_per_ip: 1}\n",
            "cannot go with placement",
        ),
    ];
    for (placement, extra, expected) in cases {
        let err = parse(&tenant(placement, extra)).unwrap_err().to_string();
        assert!(err.contains(expected), "{placement}{extra}: {err}");
    }
    let c = parse(&tenant(
        "      sql: {url: \"mysql://popgate@db/mail\", query: \"SELECT host FROM m WHERE a = ?\"}\n",
        "",
    ))
    .unwrap();
    let p = c.tenants["acme"].value.placement.clone().unwrap();
    assert_eq!(p.not_found, NotFound::Balance);
    assert_eq!(p.timeout.get(), Duration::from_secs(2));
    assert_eq!(p.cache.ttl.get(), Duration::from_secs(300));
    assert_eq!(p.cache.stale_for.get(), Duration::from_secs(3600));
    assert_eq!(p.default_port, 110);
}

#[test]
fn tls_sessions_have_defaults_and_their_secret_is_checked() {
    let c = parse(GOOD).unwrap();
    assert!(c.tls_sessions.tickets);
    assert_eq!(
        c.tls_sessions.rotate_every.get(),
        Duration::from_secs(6 * 3600)
    );
    assert_eq!(c.tls_sessions.cache_size, 4096);
    assert_eq!(c.tls_sessions.ticket_secret_file, None);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("short"), "too short\n").unwrap();
    let yaml = format!("{GOOD}tls_sessions:\n  ticket_secret_file: short\n  rotate_every: 10s\n");
    let err = Config::from_yaml_str(&yaml, dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("tls_sessions.rotate_every"), "{err}");
    assert!(
        err.contains("tls_sessions.ticket_secret_file") && err.contains("32"),
        "{err}"
    );
    assert!(
        !err.contains("too short"),
        "the secret reached the message: {err}"
    );
    std::fs::write(
        dir.path().join("good"),
        "0123456789abcdef0123456789abcdef-plus\n",
    )
    .unwrap();
    let yaml = format!("{GOOD}tls_sessions:\n  ticket_secret_file: good\n");
    assert!(Config::from_yaml_str(&yaml, dir.path()).is_ok());
}
