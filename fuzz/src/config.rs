//! The config loader: `Config::from_yaml_str` never panics, and a config it accepts can be run: the
//! tenant table builds, names resolve, and every timeout can be added to the current time (the proxy
//! computes `Instant::now() + timeout` for its deadlines, which panics on overflow).

use std::path::Path;
use std::time::Instant;

use popgate::Config;
use popgate::router::TenantTable;

/// Longest input tried: configs are small, and YAML parsing cost grows with nesting.
const MAX_INPUT: usize = 4096;

/// Loads `data` (UTF-8, at most 4 KiB) as a config file in the current directory.
pub fn check(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The loader reads the certificate, key and CA files a config names. Keep the fuzzer away from
    // device and kernel files (`/dev/zero` never ends, `/dev/stdin` blocks): no such path, and no YAML
    // escape or binary scalar that could spell one.
    if ["/dev", "/proc", "/sys", "binary"]
        .iter()
        .any(|w| text.contains(w))
        || text.contains('\\')
    {
        return;
    }
    let Ok(config) = Config::from_yaml_str(text, Path::new(".")) else {
        return;
    };

    let table = TenantTable::new(&config);
    assert_eq!(table.tenants().len(), config.tenants.len());
    for name in config.tenants.keys() {
        assert!(table.tenant_by_name(name).is_some(), "tenant {name}");
    }
    if let Some(default) = &config.routing.default_tenant {
        assert!(table.tenant_by_name(default).is_some());
    }
    for l in &config.listeners {
        if let Some(t) = &l.value.tenant {
            assert!(table.tenant_by_name(t).is_some(), "listener tenant {t}");
        }
    }

    let t = &config.timeouts;
    let now = Instant::now();
    for (field, value) in [
        ("pre_login", t.pre_login),
        ("tls_handshake", t.tls_handshake),
        ("idle", t.idle),
        ("backend_connect", t.backend_connect),
        ("backend_reply", t.backend_reply),
        ("quit_drain", t.quit_drain),
    ] {
        assert!(
            now.checked_add(value.get()).is_some(),
            "timeouts.{field} = {value:?} is accepted but cannot be a deadline"
        );
    }
}
