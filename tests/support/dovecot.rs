//! Real Dovecot POP3 stores for end-to-end tests.
//!
//! Owns: one private Dovecot instance per [`DovecotStore`] — its temp dir, config, mailboxes,
//! loopback ports and master process — from start to a clean stop on `Drop`. Several stores run
//! at once (unique instance name, dirs and ports), so tests may run in parallel threads.
//!
//! Must not: skip when Dovecot is missing (it panics: a test that cannot reach a real store
//! fails), sleep to synchronise (readiness is a greeting read under a deadline), or touch
//! anything outside its temp dir (no system config, no packaged service).
//!
//! Layout of a store's temp dir:
//! `dovecot.conf`, `passwd`, `dovecot.log` (Dovecot's own log), `stderr.log` (anything the
//! master prints before its log process runs, e.g. config errors), `run/` (`base_dir`),
//! `state/` (`state_dir`), `tls/` (cert and key when TLS is on) and
//! `home/<domain>/<local>/Maildir/{new,cur,tmp}` for every user.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a store may take to greet on its POP3 port before `start` panics.
const READY_DEADLINE: Duration = Duration::from_secs(20);
/// How long `Drop` waits for the instance's child processes to be gone.
const STOP_DEADLINE: Duration = Duration::from_secs(5);
/// Port races (another test took the port between our probe and Dovecot's bind) are retried.
const START_ATTEMPTS: u32 = 4;
/// Where Debian's `dovecot-core` puts the binary (not on a non-root user's PATH); elsewhere the
/// `dovecot` found on PATH is used.
const DEBIAN_DOVECOT: &str = "/usr/sbin/dovecot";

static NEXT_INSTANCE: AtomicU32 = AtomicU32::new(0);

/// PEM texts of the certificate chain and private key a TLS store serves.
#[derive(Debug, Clone)]
pub struct TlsPem {
    pub cert_pem: String,
    pub key_pem: String,
}

/// What a store holds and which listeners it opens.
///
/// `users` are `(login, password, messages)`: the login is the full address
/// (`alice@example.com`), the password is stored in plain text (so APOP and CRAM-MD5 work; it must
/// not contain `:` or a newline), and messages are raw RFC 5322 bytes, message 1 first.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    pub users: Vec<(String, String, Vec<Vec<u8>>)>,
    /// Serve STLS on the pop3 port and open an implicit-TLS pop3s port.
    pub tls: Option<TlsPem>,
    /// Open an extra plain listener that expects a PROXY v1/v2 header from 127.0.0.0/8.
    pub haproxy: bool,
    /// Appended verbatim at the end of `dovecot.conf`; later settings override earlier ones, so
    /// a test can change any default written here (e.g. `mail_max_userip_connections = 2`).
    pub extra_config: String,
}

/// A running Dovecot instance on loopback; stopped and deleted on `Drop`.
#[derive(Debug)]
pub struct DovecotStore {
    child: Child,
    instance: String,
    pop3: SocketAddr,
    pop3s: Option<SocketAddr>,
    haproxy: Option<SocketAddr>,
    startup: Duration,
    // Dropped after `Drop::drop` has stopped the master, so Dovecot never sees its dir vanish.
    dir: tempfile::TempDir,
}

/// The `mail` system user whose uid/gid own every mailbox (Dovecot refuses uid 0 for mail).
#[derive(Debug, Clone, Copy)]
struct MailOwner {
    uid: u32,
    gid: u32,
}

/// Loopback ports chosen for one start attempt.
#[derive(Debug, Clone, Copy)]
struct Ports {
    pop3: u16,
    pop3s: Option<u16>,
    haproxy: Option<u16>,
}

/// One `inet_listener` block of `service pop3-login`.
#[derive(Debug)]
struct Listener {
    name: &'static str,
    port: u16,
    ssl: bool,
    haproxy: bool,
}

// === impl StoreOptions ===

impl StoreOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a user; `messages` are stored in the given order (the first is POP3 message 1).
    pub fn user<M: Into<Vec<u8>>>(
        mut self,
        login: &str,
        password: &str,
        messages: impl IntoIterator<Item = M>,
    ) -> Self {
        let messages = messages.into_iter().map(Into::into).collect();
        self.users
            .push((login.to_owned(), password.to_owned(), messages));
        self
    }

    pub fn tls(mut self, tls: TlsPem) -> Self {
        self.tls = Some(tls);
        self
    }

    pub fn haproxy(mut self) -> Self {
        self.haproxy = true;
        self
    }

    pub fn extra_config(mut self, text: &str) -> Self {
        self.extra_config.push_str(text);
        self.extra_config.push('\n');
        self
    }
}

// === impl TlsPem ===

impl TlsPem {
    /// A fresh self-signed certificate (rcgen, ECDSA P-256) for the given DNS names / IPs.
    pub fn self_signed(names: &[&str]) -> Self {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let certified = rcgen::generate_simple_self_signed(names).expect("rcgen self-signed cert");
        Self {
            cert_pem: certified.cert.pem(),
            key_pem: certified.signing_key.serialize_pem(),
        }
    }
}

// === impl DovecotStore ===

impl DovecotStore {
    /// Writes the store, starts `dovecot -F` and returns once the POP3 port has greeted `+OK`.
    ///
    /// Panics (never skips) when the binary is missing, the config is refused, or the store has
    /// not greeted within 20 s; the panic message carries the tail of Dovecot's log.
    pub fn start(opts: StoreOptions) -> Self {
        let began = Instant::now();
        let dovecot = dovecot_binary();
        let owner = MailOwner::lookup();
        let instance = format!(
            "popgate-{}-{}",
            std::process::id(),
            NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix("popgate-dovecot-")
            .tempdir()
            .expect("create store temp dir");
        // Dovecot's unprivileged processes (dovecot, dovenull, mail) must traverse it.
        set_mode(dir.path(), 0o755);
        write_mailboxes(dir.path(), &opts, owner);
        if let Some(tls) = &opts.tls {
            let tls_dir = dir.path().join("tls");
            fs::create_dir(&tls_dir).expect("create tls dir");
            set_mode(&tls_dir, 0o700);
            fs::write(tls_dir.join("cert.pem"), &tls.cert_pem).expect("write cert");
            fs::write(tls_dir.join("key.pem"), &tls.key_pem).expect("write key");
            set_mode(&tls_dir.join("key.pem"), 0o600);
        }

        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            let ports = Ports::pick(&opts);
            let conf = render_config(&instance, dir.path(), &opts, owner, ports);
            let conf_path = dir.path().join("dovecot.conf");
            fs::write(&conf_path, conf).expect("write dovecot.conf");
            let stderr = fs::File::create(dir.path().join("stderr.log")).expect("stderr.log");
            let mut child = Command::new(&dovecot)
                .arg("-F")
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(stderr.try_clone().expect("clone stderr.log"))
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn `{dovecot} -F -c ...`: {e}"));
            match wait_ready(&mut child, loopback(ports.pop3), began + READY_DEADLINE) {
                Ok(()) => {
                    return DovecotStore {
                        child,
                        instance,
                        pop3: loopback(ports.pop3),
                        pop3s: ports.pop3s.map(loopback),
                        haproxy: ports.haproxy.map(loopback),
                        startup: began.elapsed(),
                        dir,
                    };
                }
                Err(why) => {
                    stop_master(&mut child, &instance);
                    last_failure = format!("{why}\n{}", diagnostics(dir.path()));
                    // Another test took a port between our probe and Dovecot's bind: new ports.
                    // (The master prints `listen(127.0.0.1, N) failed: Address already in use`
                    // to stderr, which is fresh for each attempt, unlike dovecot.log.)
                    let stderr = read_lossy(&dir.path().join("stderr.log"));
                    if !stderr.contains("Address already in use") {
                        break;
                    }
                }
            }
        }
        panic!("Dovecot store {instance} did not start: {last_failure}");
    }

    /// Stops the master (and with it every session) but keeps the dir, config and ports, so
    /// [`Self::restart`] brings the same store back. For "a store goes away" tests.
    pub fn stop(&mut self) {
        stop_master(&mut self.child, &self.instance);
    }

    /// Starts the stopped store again with the same config and ports; waits for its greeting.
    pub fn restart(&mut self) {
        let began = Instant::now();
        let conf_path = self.dir.path().join("dovecot.conf");
        let mut last = String::new();
        // The old master's sockets may linger for a moment; a start that loses that race is retried.
        for _ in 0..START_ATTEMPTS * 5 {
            let stderr = fs::File::create(self.dir.path().join("stderr.log")).expect("stderr.log");
            let mut child = Command::new(dovecot_binary())
                .arg("-F")
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(stderr.try_clone().expect("clone stderr.log"))
                .stderr(stderr)
                .spawn()
                .expect("spawn dovecot");
            match wait_ready(&mut child, self.pop3, began + READY_DEADLINE) {
                Ok(()) => {
                    self.child = child;
                    return;
                }
                Err(why) => {
                    stop_master(&mut child, &self.instance);
                    last = format!("{why}\n{}", diagnostics(self.dir.path()));
                    if !read_lossy(&self.dir.path().join("stderr.log"))
                        .contains("Address already in use")
                    {
                        break;
                    }
                }
            }
        }
        panic!("Dovecot store {} did not restart: {last}", self.instance);
    }

    /// Plain POP3 listener (STLS is offered here when TLS is on).
    pub fn pop3_addr(&self) -> SocketAddr {
        self.pop3
    }

    /// Implicit-TLS listener; panics if the store was started without TLS.
    pub fn pop3s_addr(&self) -> SocketAddr {
        self.pop3s
            .expect("pop3s_addr: store was started without StoreOptions::tls")
    }

    /// Plain listener that requires a PROXY v1/v2 header; panics unless `haproxy` was set.
    pub fn haproxy_addr(&self) -> SocketAddr {
        self.haproxy
            .expect("haproxy_addr: store was started without StoreOptions::haproxy")
    }

    pub fn instance_name(&self) -> &str {
        &self.instance
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Wall time `start` took, from call to first greeting.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// The value Dovecot really uses for `setting` (`doveconf -h`), after `extra_config`.
    pub fn effective_setting(&self, setting: &str) -> String {
        let conf = self.dir.path().join("dovecot.conf");
        let out = Command::new("doveconf")
            .arg("-c")
            .arg(&conf)
            .arg("-h")
            .arg(setting)
            .output()
            .expect("run doveconf (dovecot-core)");
        assert!(
            out.status.success(),
            "doveconf -h {setting}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Dovecot's log so far (written asynchronously by its log process: see `wait_for_log`).
    pub fn log_text(&self) -> String {
        read_lossy(&self.dir.path().join("dovecot.log"))
    }

    /// Polls the log until it contains `needle`, returning the whole log; panics after `timeout`.
    /// Use it for lines of a session that has just ended: Dovecot writes them a moment later.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log_text();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "Dovecot log of {} has no {needle:?} after {timeout:?}:\n{}",
                self.instance,
                tail(&log, 40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Messages really on the store for `login` (files in `new/` + `cur/`), whatever any POP3
    /// session reports; use it to check that nothing was deleted (or that DELE+QUIT did delete).
    pub fn maildir_message_count(&self, login: &str) -> usize {
        let maildir = maildir_path(self.dir.path(), login);
        ["new", "cur"]
            .iter()
            .map(|sub| {
                fs::read_dir(maildir.join(sub))
                    .unwrap_or_else(|e| panic!("read {}/{sub}: {e}", maildir.display()))
                    .filter(|entry| entry.as_ref().is_ok_and(|e| e.path().is_file()))
                    .count()
            })
            .sum()
    }
}

impl Drop for DovecotStore {
    fn drop(&mut self) {
        stop_master(&mut self.child, &self.instance);
    }
}

/// PIDs of processes still running for `instance` (children are titled `dovecot-<instance>/…`).
pub fn instance_processes(instance: &str) -> Vec<u32> {
    let marker = format!("{instance}/");
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(&marker)
                .then_some(pid)
        })
        .collect()
}

/// The bytes a POP3 client gets for a stored message once it has undone dot-stuffing: Dovecot
/// sends bare LFs as CRLF and ends an unterminated last line with CRLF. This is exactly what
/// `curl pop3://host/N` prints and what poplib's `retr` lines joined with CRLF (+ CRLF) give.
pub fn pop3_retr_bytes(stored: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(stored.len() + stored.len() / 16 + 2);
    let mut prev = 0u8;
    for &b in stored {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    if !out.ends_with(b"\r\n") && !out.is_empty() {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The size Dovecot reports for a stored message in STAT / LIST: its CRLF ("virtual") size,
/// without the CRLF Dovecot adds to an unterminated last line.
pub fn pop3_size(stored: &[u8]) -> usize {
    let bare_lfs = stored
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'\n' && (i == 0 || stored[i - 1] != b'\r'))
        .count();
    stored.len() + bare_lfs
}

// === private helpers ===

/// Polls for the pop3 greeting until `deadline`; fails early if the master exits.
fn wait_ready(master: &mut Child, pop3: SocketAddr, deadline: Instant) -> Result<(), String> {
    loop {
        if let Some(status) = master.try_wait().expect("poll dovecot master") {
            return Err(format!("dovecot master exited early with {status}"));
        }
        match read_greeting(pop3) {
            Ok(line) if line.starts_with("+OK") => return Ok(()),
            Ok(line) => return Err(format!("unexpected greeting {line:?}")),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("no +OK greeting within {READY_DEADLINE:?}: {e}")),
        }
    }
}

/// Kills the master (its children exit as soon as they see it die) and waits until no process
/// of the instance is left, so a finished test leaves nothing running.
fn stop_master(master: &mut Child, instance: &str) {
    let _ = master.kill();
    let _ = master.wait();
    let deadline = Instant::now() + STOP_DEADLINE;
    let mut killed_stragglers = false;
    loop {
        let left = instance_processes(instance);
        if left.is_empty() {
            return;
        }
        // Children normally exit with their master; ones busy with a session may linger, and would
        // confuse a restarted instance (stale auth and anvil processes): kill them too.
        if !killed_stragglers {
            let _ = Command::new("kill")
                .arg("-9")
                .args(left.iter().map(u32::to_string))
                .stderr(Stdio::null())
                .status();
            killed_stragglers = true;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "warning: Dovecot {instance} left processes {left:?} after {STOP_DEADLINE:?}"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn diagnostics(dir: &Path) -> String {
    format!(
        "--- stderr of dovecot ---\n{}\n--- tail of dovecot.log ---\n{}",
        tail(&read_lossy(&dir.join("stderr.log")), 20),
        tail(&read_lossy(&dir.join("dovecot.log")), 40)
    )
}

/// The Dovecot binary to run; panics with what to do when there is none.
fn dovecot_binary() -> String {
    let binary = if Path::new(DEBIAN_DOVECOT).exists() {
        DEBIAN_DOVECOT
    } else {
        "dovecot"
    };
    let found = Command::new(binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match found {
        Ok(status) if status.success() => binary.to_owned(),
        Ok(status) => panic!("`{binary} --version` failed with {status}"),
        Err(e) => panic!(
            "Dovecot is not installed ({binary}: {e}). The end-to-end tests need a real \
             Dovecot: run scripts/test as root (it installs dovecot-core and dovecot-pop3d) or \
             `apt-get install dovecot-core dovecot-pop3d`."
        ),
    }
}

impl MailOwner {
    fn lookup() -> Self {
        let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
        passwd
            .lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                (fields.len() >= 4 && fields[0] == "mail").then(|| MailOwner {
                    uid: fields[2].parse().expect("mail uid"),
                    gid: fields[3].parse().expect("mail gid"),
                })
            })
            .expect("no `mail` user in /etc/passwd: Dovecot stores need it to own mailboxes")
    }
}

impl Ports {
    fn pick(opts: &StoreOptions) -> Self {
        Ports {
            pop3: free_port(),
            pop3s: opts.tls.as_ref().map(|_| free_port()),
            haproxy: opts.haproxy.then(free_port),
        }
    }

    fn listeners(self) -> Vec<Listener> {
        let mut listeners = vec![Listener {
            name: "pop3",
            port: self.pop3,
            ssl: false,
            haproxy: false,
        }];
        if let Some(port) = self.pop3s {
            listeners.push(Listener {
                name: "pop3s",
                port,
                ssl: true,
                haproxy: false,
            });
        }
        if let Some(port) = self.haproxy {
            listeners.push(Listener {
                name: "pop3_haproxy",
                port,
                ssl: false,
                haproxy: true,
            });
        }
        listeners
    }
}

/// A port the kernel just handed out on 127.0.0.1; it is free again once the probe is dropped.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn render_config(
    instance: &str,
    dir: &Path,
    opts: &StoreOptions,
    owner: MailOwner,
    ports: Ports,
) -> String {
    let d = dir.display();
    let MailOwner { uid, gid } = owner;
    let mut c = String::new();
    let mut line = |text: String| {
        c.push_str(&text);
        c.push('\n');
    };
    line(format!(
        "# Test store {instance}: written by tests/support/dovecot.rs"
    ));
    line(format!("instance_name = {instance}"));
    line(format!("base_dir = {d}/run"));
    line(format!("state_dir = {d}/state"));
    line(format!("log_path = {d}/dovecot.log"));
    line("protocols = pop3".into());
    line("listen = 127.0.0.1".into());
    line("login_trusted_networks = 127.0.0.0/8".into());
    line("disable_plaintext_auth = no".into());
    line("auth_mechanisms = plain login apop cram-md5".into());
    line("auth_failure_delay = 0".into());
    line("auth_verbose = yes".into());
    line("mail_location = maildir:~/Maildir".into());
    line(format!("first_valid_uid = {uid}"));
    line(format!("last_valid_uid = {uid}"));
    line(format!("first_valid_gid = {gid}"));
    line(format!("last_valid_gid = {gid}"));
    line("pop3_uidl_format = %08Xu%08Xv".into());
    // Every session through the proxy comes from 127.0.0.1; Dovecot's default of 10 would
    // refuse the 11th concurrent session of one user.
    line("mail_max_userip_connections = 1000".into());
    match &opts.tls {
        None => line("ssl = no".into()),
        Some(_) => {
            line("ssl = yes".into());
            line(format!("ssl_cert = <{d}/tls/cert.pem"));
            line(format!("ssl_key = <{d}/tls/key.pem"));
        }
    }
    if opts.haproxy {
        line("haproxy_trusted_networks = 127.0.0.0/8".into());
    }
    line(format!(
        "passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN {d}/passwd\n}}"
    ));
    line(format!(
        "userdb {{\n  driver = static\n  args = uid={uid} gid={gid} home={d}/home/%d/%n\n}}"
    ));
    let mut service = String::from("service pop3-login {\n");
    for l in ports.listeners() {
        let _ = writeln!(service, "  inet_listener {} {{", l.name);
        let _ = writeln!(service, "    port = {}", l.port);
        if l.ssl {
            service.push_str("    ssl = yes\n");
        }
        if l.haproxy {
            service.push_str("    haproxy = yes\n");
        }
        service.push_str("  }\n");
    }
    service.push('}');
    line(service);
    // Failed logins would otherwise delay every later login from 127.0.0.1 by up to 15 s, and
    // login_trusted_networks does not exempt them in 2.3.19. Mode 0 removes the listener.
    line("service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}".into());
    if !opts.extra_config.is_empty() {
        line("# StoreOptions::extra_config".into());
        line(opts.extra_config.clone());
    }
    c
}

/// Writes `passwd` and every user's Maildir (messages into `new/`, named so that Dovecot's
/// ordering of new mail — by the leading timestamp of the file name — is the given order).
fn write_mailboxes(dir: &Path, opts: &StoreOptions, owner: MailOwner) {
    let mut passwd = String::new();
    for (login, password, messages) in &opts.users {
        assert!(
            !login.contains([':', '/', '\n']) && !password.contains([':', '\n']),
            "login {login:?} / its password cannot go into a passwd-file"
        );
        let _ = writeln!(passwd, "{login}:{password}");
        let maildir = maildir_path(dir, login);
        for sub in ["new", "cur", "tmp"] {
            fs::create_dir_all(maildir.join(sub)).expect("create Maildir");
        }
        for (i, message) in messages.iter().enumerate() {
            let name = format!("{}.M{i}P{}.popgate", 1_600_000_000 + i, std::process::id());
            let path = maildir.join("new").join(name);
            fs::File::create(&path)
                .and_then(|mut f| f.write_all(message))
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }
    }
    let home = dir.join("home");
    if home.exists() {
        chown_tree(&home, owner);
    }
    fs::write(dir.join("passwd"), passwd).expect("write passwd");
}

/// `<dir>/home/<domain>/<local>/Maildir` — the userdb's `home=<dir>/home/%d/%n` + `~/Maildir`.
fn maildir_path(dir: &Path, login: &str) -> PathBuf {
    let (local, domain) = login.rsplit_once('@').unwrap_or((login, ""));
    let mut path = dir.join("home");
    if !domain.is_empty() {
        path.push(domain);
    }
    path.join(local).join("Maildir")
}

fn chown_tree(path: &Path, owner: MailOwner) {
    std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid))
        .unwrap_or_else(|e| panic!("chown {}: {e} (tests must run as root)", path.display()));
    if path.is_dir() {
        for entry in fs::read_dir(path).expect("read dir") {
            chown_tree(&entry.expect("dir entry").path(), owner);
        }
    }
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Connects and reads one line; sends QUIT so Dovecot logs a clean logout.
fn read_greeting(addr: SocketAddr) -> std::io::Result<String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let _ = (&stream).write_all(b"QUIT\r\n");
    if line.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line.trim_end().to_owned())
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// === additions for the fault-injection tests and the soak (tests/faults.rs, tests/soak.rs) ===

static NEXT_DELIVERY: AtomicU32 = AtomicU32::new(0);

impl DovecotStore {
    /// Freezes the whole instance (master first, then every child) with SIGSTOP: the ports still
    /// accept TCP connections (the kernel completes them into the backlog) but nothing answers, and
    /// open sessions hang mid-command. The "hung store" of fault tests; undo with [`Self::resume`].
    pub fn pause(&self) {
        signal_instance(&self.child, &self.instance, "-STOP");
    }

    /// Lets a [`Self::pause`]d instance run again.
    pub fn resume(&self) {
        signal_instance(&self.child, &self.instance, "-CONT");
    }

    /// Whether the master process is running (false after [`Self::stop`]).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The raw bytes of every message really on the store for `login` (files in `new/` + `cur/`),
    /// in no particular order: what a checker compares with the messages it expects to remain.
    pub fn maildir_messages(&self, login: &str) -> Vec<Vec<u8>> {
        let maildir = maildir_path(self.dir.path(), login);
        // Dovecot renames files (new/ to cur/, flag changes in cur/) while sessions run; a file that
        // moved between the listing and the read makes the whole listing start again.
        'listing: for _ in 0..10 {
            let mut out = Vec::new();
            for sub in ["new", "cur"] {
                let entries = fs::read_dir(maildir.join(sub))
                    .unwrap_or_else(|e| panic!("read {}/{sub}: {e}", maildir.display()));
                for entry in entries.flatten() {
                    match fs::read(entry.path()) {
                        Ok(bytes) => out.push(bytes),
                        Err(_) => continue 'listing,
                    }
                }
            }
            return out;
        }
        panic!("{} kept changing while it was read", maildir.display());
    }

    /// Delivers one message into `login`'s Maildir as an MTA would (see [`deliver_into`]).
    pub fn deliver(&self, login: &str, message: &[u8]) {
        deliver_into(self.dir.path(), login, message);
    }
}

/// Delivers one message into `login`'s Maildir under a store's dir ([`DovecotStore::dir`]) as an
/// MTA would: written to `tmp/`, owned by the mail user, then renamed into `new/`. Safe while the store
/// runs (or is being restarted) and sessions are open; needs no handle on the store.
pub fn deliver_into(store_dir: &Path, login: &str, message: &[u8]) {
    let owner = MailOwner::lookup();
    let maildir = maildir_path(store_dir, login);
    let name = format!(
        "{}.M{}P{}.popgate-delivery",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        NEXT_DELIVERY.fetch_add(1, Ordering::Relaxed),
        std::process::id()
    );
    let tmp = maildir.join("tmp").join(&name);
    fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(message))
        .unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::os::unix::fs::chown(&tmp, Some(owner.uid), Some(owner.gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", tmp.display()));
    fs::rename(&tmp, maildir.join("new").join(&name))
        .unwrap_or_else(|e| panic!("deliver into {}: {e}", maildir.display()));
}

/// Sends `signal` (`-STOP`, `-CONT`) to the master and every process of the instance. The master is
/// stopped before its children are listed (so it cannot fork one the listing misses) and continued
/// after them.
fn signal_instance(master: &Child, instance: &str, signal: &str) {
    let kill = |pids: &[u32]| {
        if pids.is_empty() {
            return;
        }
        let status = Command::new("kill")
            .arg(signal)
            .args(pids.iter().map(u32::to_string))
            .stderr(Stdio::null())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pids:?} failed: {status}");
    };
    if signal == "-CONT" {
        kill(&instance_processes(instance));
        kill(&[master.id()]);
    } else {
        kill(&[master.id()]);
        kill(&instance_processes(instance));
    }
}
