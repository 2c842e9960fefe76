//! popgate started in-process on its own runtime, so tests can block on curl, python3 and Dovecot while
//! it serves. Stopped on drop.

use std::net::SocketAddr;
use std::path::Path;

use tokio_util::sync::CancellationToken;

pub struct Popgate {
    pub rt: tokio::runtime::Runtime,
    pub running: popgate::Running,
}

impl Popgate {
    /// Starts popgate with this YAML (relative paths resolve from `base`).
    pub fn start(yaml: &str, base: &Path) -> Self {
        let config =
            popgate::Config::from_yaml_str(yaml, base).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let running = rt
            .block_on(popgate::start(config, CancellationToken::new()))
            .unwrap();
        Self { rt, running }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.running.local_addr(listener).unwrap()
    }

    /// `(store id, up)` for every store of `tenant`.
    pub fn health(&self, tenant: &str) -> Vec<(String, bool)> {
        self.running
            .stores()
            .into_iter()
            .find(|(t, _)| t == tenant)
            .map(|(_, stores)| stores.into_iter().map(|s| (s.id, s.up)).collect())
            .unwrap_or_default()
    }

    /// Polls `cond` every 20 ms until it holds or `limit` passes; returns the time it took.
    pub fn wait_until(
        &self,
        limit: std::time::Duration,
        what: &str,
        mut cond: impl FnMut(&Self) -> bool,
    ) -> std::time::Duration {
        let start = std::time::Instant::now();
        while !cond(self) {
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        start.elapsed()
    }
}

impl Drop for Popgate {
    fn drop(&mut self) {
        self.running.shutdown();
    }
}

/// The `popgate` binary run as a process of its own, killed and reaped when dropped: a test that fails
/// before it stops the process does not leave it running, holding its ports, after the test binary ends.
pub struct Process(pub std::process::Child);

impl std::ops::Deref for Process {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Process {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Both fail harmlessly when the test already stopped it.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A config with one plain listener named `pop3` on 127.0.0.1, the extra top-level YAML `extra`, and
/// `tenants` (YAML under `tenants:`, e.g. from [`tenant`]).
pub fn plain_config(extra: &str, tenants: &str) -> String {
    format!(
        "listeners:\n  - name: pop3\n    bind: 127.0.0.1:0\n    tls: none\n{extra}\ntenants:\n{tenants}"
    )
}

/// A tenant block: one domain, one store, plaintext logins allowed, no pre-warmed connections, then
/// `extra` (more tenant keys, indented four spaces).
pub fn tenant(name: &str, domain: &str, store: SocketAddr, extra: &str) -> String {
    format!(
        "  {name}:\n    domains: [{domain}]\n    backends: [\"{store}\"]\n    plaintext_login: allow\n    \
         pool: {{min_idle: 0}}\n{extra}"
    )
}

/// popgate started on the caller's runtime from YAML; relative paths resolve from `base`. Panics with the
/// config's problems and the YAML when it is refused.
pub async fn start(yaml: &str, base: &Path) -> popgate::Running {
    let config =
        popgate::Config::from_yaml_str(yaml, base).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    popgate::start(config, CancellationToken::new())
        .await
        .unwrap()
}

/// popgate started on the caller's runtime from a config file it writes as `dir/popgate.yaml`, so reloads
/// (`POST /reload`, SIGHUP, file changes) re-read it.
pub async fn start_from_file(yaml: &str, dir: &Path) -> popgate::Running {
    let path = dir.join("popgate.yaml");
    std::fs::write(&path, yaml).unwrap();
    let config = popgate::Config::load(&path).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    popgate::start_from_file(config, path, CancellationToken::new())
        .await
        .unwrap()
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` after `limit`.
pub async fn eventually(limit: std::time::Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The value of one Prometheus series (`name{labels}` exactly as exported) in a scrape.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

/// `curl -s` against an admin server; (HTTP status, body). A bearer token is sent when given; a POST also
/// carries `X-Popgate-Admin`, as every tool must (the admin server refuses writes a web page could send).
pub fn http(method: &str, url: &str, token: Option<&str>) -> (u16, String) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-s",
        "--max-time",
        "10",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
        url,
    ]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if method == "POST" {
        cmd.args(["-H", "X-Popgate-Admin: 1"]);
    }
    let out = cmd.output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}
