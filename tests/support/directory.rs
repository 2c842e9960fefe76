//! Real directory servers for the placement-lookup tests: OpenLDAP's slapd, PostgreSQL and MariaDB
//! (Debian's `slapd`, `ldap-utils`, `postgresql` and `mariadb-server`, installed by scripts/test).
//!
//! Owns: each server's temp dir (config, data, log), loopback port(s) and processes, from start to a
//! kill on `Drop`. The data lives in the temp dir, so `stop` then `restart` brings a server back on
//! the same port(s) with the same entries or rows. Every server runs from a config of its own
//! (`slapd -f`, its own `initdb` data dir, `mariadbd --no-defaults`); readiness is a real query
//! (ldapsearch, psql, mariadb) answered under a deadline, never a sleep. Entries and rows are written
//! through the packages' own clients with values passed so that quotes and backslashes arrive as
//! written (LDIF base64, psql `:'var'` variables, hex literals).
//!
//! Every server runs in the foreground as a child of the test process (no daemon outlives a test that
//! drops it, and no orphan waits for an init to reap it): slapd with `-d stats` (which also keeps it
//! from detaching; each connection and operation goes to `slapd.log`), the postmaster under
//! `setpriv` as the `postgres` user when the tests run as root (initdb and postgres refuse root;
//! `pg_ctl stop` stops it), and mariadbd.
//!
//! Must not: skip when a server or client is missing (it panics naming the package), bind anything
//! but 127.0.0.1, or touch the packaged services' config or data (/etc/ldap/slapd.d,
//! /var/lib/postgresql, /var/lib/mysql, their sockets): each server reads only its own temp dir.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

/// How long a server may take to answer its first query before `start` or `restart` gives up.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How long a stopped server's port may stay open, or a stopping server may take to exit.
const STOP_DEADLINE: Duration = Duration::from_secs(15);
/// Port races (another test took the port between our probe and the server's bind) are retried.
const START_ATTEMPTS: usize = 4;
/// The interval between readiness probes.
const POLL: Duration = Duration::from_millis(20);

const SLAPD: &str = "/usr/sbin/slapd";
const LDAPADD: &str = "/usr/bin/ldapadd";
const LDAPMODIFY: &str = "/usr/bin/ldapmodify";
const LDAPSEARCH: &str = "/usr/bin/ldapsearch";
const LDAP_SCHEMA: &str = "/etc/ldap/schema";
const LDAP_MODULES: &str = "/usr/lib/ldap";
/// Debian keeps each PostgreSQL major version's binaries in /usr/lib/postgresql/<version>/bin.
const POSTGRES_LIB: &str = "/usr/lib/postgresql";
const SETPRIV: &str = "/usr/bin/setpriv";
const MARIADBD: &str = "/usr/sbin/mariadbd";
const MARIADB_INSTALL_DB: &str = "/usr/bin/mariadb-install-db";
const MARIADB: &str = "/usr/bin/mariadb";
const MARIADB_ADMIN: &str = "/usr/bin/mariadb-admin";

/// A free loopback port (another process may take it before the server binds: starts retry).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Panics unless `path` exists, naming the Debian package that provides it.
fn require(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: install Debian's {package} (scripts/test does, as root: \
         apt-get install -y --no-install-recommends slapd ldap-utils postgresql mariadb-server)"
    );
}

/// Whether this process runs as root (the owner of /proc/self is the effective uid).
fn is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The last lines of a log file, for a panic message.
fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(30)..].join("\n");
    format!("--- {} (last lines) ---\n{tail}", path.display())
}

/// Runs `command` with `stdin` as its input; its output, whatever the exit status.
fn run(command: &mut Command, stdin: &str) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    // A small input fits the pipe; a large one is written while the child runs, then closed.
    let mut input = child.stdin.take().unwrap();
    let bytes = stdin.as_bytes().to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&bytes);
    });
    let output = child.wait_with_output().unwrap();
    let _ = writer.join();
    output
}

/// Runs `command`; its stdout, or a panic with both outputs when it fails.
fn run_ok(command: &mut Command, stdin: &str) -> String {
    let output = run(command, stdin);
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .is_ok()
}

/// Waits until 127.0.0.1:`port` refuses connections; panics after [`STOP_DEADLINE`].
fn wait_port_closed(port: u16, what: &str) {
    let deadline = Instant::now() + STOP_DEADLINE;
    while port_open(port) {
        assert!(
            Instant::now() < deadline,
            "{what} still accepts connections on 127.0.0.1:{port} after stopping"
        );
        std::thread::sleep(POLL);
    }
}

/// Waits for `child` to exit, up to [`STOP_DEADLINE`]; kills it (SIGKILL) when it does not.
fn wait_or_kill(mut child: Child) {
    let deadline = Instant::now() + STOP_DEADLINE;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(POLL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Kills (SIGKILL) `child` and reaps it.
fn kill(child: Option<Child>) {
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Whether `child` has exited (reaped by this call when it has).
fn exited(child: &mut Option<Child>) -> bool {
    match child.as_mut().map(Child::try_wait) {
        Some(Ok(None)) => false,
        None | Some(_) => true,
    }
}

// --- OpenLDAP ---------------------------------------------------------------------------------

/// One OpenLDAP slapd on 127.0.0.1 serving [`Slapd::SUFFIX`] from an MDB database in its temp dir.
///
/// Anonymous binds may read everything (slapd's default access); [`Slapd::ROOT_DN`] with
/// [`Slapd::ROOT_PW`] may also write. `slapd.log` in [`Slapd::dir`] records every connection and
/// operation (`-d stats`), e.g. the filters popgate sent.
pub struct Slapd {
    pub port: u16,
    /// LDAPS, when started with TLS (StartTLS is then offered on `port` too).
    pub tls_port: Option<u16>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Slapd {
    pub const SUFFIX: &'static str = "dc=example,dc=com";
    pub const ROOT_DN: &'static str = "cn=admin,dc=example,dc=com";
    pub const ROOT_PW: &'static str = "slapd-root-pw";
    /// Where [`Slapd::add_mailbox`] puts its entries.
    pub const PEOPLE: &'static str = "ou=people,dc=example,dc=com";

    /// Plain `ldap://` on `port`, holding the base entries `dc=example,dc=com` and
    /// `ou=people,dc=example,dc=com`.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// As [`Slapd::start`], plus LDAPS on `tls_port` and StartTLS on the plain port, serving this
    /// certificate (chain) and key (PEM).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Self {
        Self::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Self {
        require(SLAPD, "slapd");
        require(LDAPADD, "ldap-utils");
        require(LDAPSEARCH, "ldap-utils");
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new().prefix("slapd.").tempdir().unwrap();
            let port = free_port();
            let tls_port = tls.map(|_| {
                loop {
                    let p = free_port();
                    if p != port {
                        break p;
                    }
                }
            });
            let mut slapd = Self {
                port,
                tls_port,
                child: None,
                dir,
            };
            slapd.write_config(tls);
            if slapd.spawn() {
                slapd.add_ldif(&format!(
                    "dn: {suffix}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\n\
                     o: Example\n\ndn: {people}\nobjectClass: organizationalUnit\nou: people\n",
                    suffix = Self::SUFFIX,
                    people = Self::PEOPLE,
                ));
                return slapd;
            }
            last_log = log_tail(&slapd.log_path());
        }
        panic!("slapd did not start in {START_ATTEMPTS} attempts\n{last_log}");
    }

    fn write_config(&self, tls: Option<(&str, &str)>) {
        let d = self.dir.path();
        fs::create_dir(d.join("db")).unwrap();
        let mut conf = String::new();
        for schema in ["core", "cosine", "inetorgperson", "misc"] {
            writeln!(conf, "include \"{LDAP_SCHEMA}/{schema}.schema\"").unwrap();
        }
        writeln!(conf, "pidfile \"{}\"", d.join("slapd.pid").display()).unwrap();
        writeln!(conf, "modulepath \"{LDAP_MODULES}\"\nmoduleload back_mdb").unwrap();
        if let Some((cert, key)) = tls {
            fs::write(d.join("tls.crt"), cert).unwrap();
            fs::write(d.join("tls.key"), key).unwrap();
            writeln!(
                conf,
                "TLSCertificateFile \"{}\"",
                d.join("tls.crt").display()
            )
            .unwrap();
            writeln!(
                conf,
                "TLSCertificateKeyFile \"{}\"",
                d.join("tls.key").display()
            )
            .unwrap();
        }
        writeln!(conf, "database mdb").unwrap();
        writeln!(conf, "suffix \"{}\"", Self::SUFFIX).unwrap();
        writeln!(conf, "rootdn \"{}\"", Self::ROOT_DN).unwrap();
        writeln!(conf, "rootpw \"{}\"", Self::ROOT_PW).unwrap();
        writeln!(conf, "directory \"{}\"", d.join("db").display()).unwrap();
        writeln!(conf, "dbnosync").unwrap(); // a crash of the test machine loses nothing of value
        writeln!(conf, "index objectClass,uid,mail eq").unwrap();
        fs::write(d.join("slapd.conf"), conf).unwrap();
    }

    /// The temp dir: `slapd.conf`, `slapd.log`, `db/`, `tls.crt` and `tls.key` with TLS.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("slapd.log")
    }

    /// What slapd logged (every connection and operation).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `ldap://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    /// `ldaps://127.0.0.1:tls_port`, when started with TLS.
    pub fn ldaps_url(&self) -> Option<String> {
        self.tls_port.map(|p| format!("ldaps://127.0.0.1:{p}"))
    }

    /// Starts slapd on this server's port(s); true once it answers a root DSE search.
    fn spawn(&mut self) -> bool {
        let d = self.dir.path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let pidfile = d.join("slapd.pid");
        let _ = fs::remove_file(&pidfile);
        let mut urls = format!("ldap://127.0.0.1:{}/", self.port);
        if let Some(p) = self.tls_port {
            write!(urls, " ldaps://127.0.0.1:{p}/").unwrap();
        }
        let child = Command::new(SLAPD)
            .arg("-d")
            .arg("stats") // in the foreground, logging each operation to stderr
            .arg("-f")
            .arg(d.join("slapd.conf"))
            .arg("-h")
            .arg(&urls)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id().to_string();
        self.child = Some(child);
        let deadline = Instant::now() + READY_DEADLINE;
        while Instant::now() < deadline {
            if exited(&mut self.child) {
                self.child = None;
                return false; // most likely a port was taken
            }
            // slapd writes its pid file after binding its listeners and opening the database, so a
            // search answered after that comes from this slapd, not from whatever else had the port.
            let ours = fs::read_to_string(&pidfile).is_ok_and(|p| p.trim() == pid);
            if ours && self.root_dse_answers() && self.tls_port.is_none_or(port_open) {
                return true;
            }
            std::thread::sleep(POLL);
        }
        kill(self.child.take());
        false
    }

    fn root_dse_answers(&self) -> bool {
        ldap_client(LDAPSEARCH)
            .args(["-x", "-H", &self.url(), "-s", "base", "-b", "", "-LLL"])
            .arg("objectClass=*")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Adds the entries in `ldif` as the root DN (`ldapadd`); panics when slapd refuses one.
    pub fn add_ldif(&self, ldif: &str) {
        self.write_ldif(LDAPADD, ldif);
    }

    /// Applies the LDIF change records in `ldif` as the root DN (`ldapmodify`), e.g. to move a
    /// mailbox: `dn: uid=…\nchangetype: modify\nreplace: mailHost\nmailHost: …\n`.
    pub fn modify_ldif(&self, ldif: &str) {
        self.write_ldif(LDAPMODIFY, ldif);
    }

    fn write_ldif(&self, tool: &str, ldif: &str) {
        run_ok(
            ldap_client(tool).args([
                "-x",
                "-H",
                &self.url(),
                "-D",
                Self::ROOT_DN,
                "-w",
                Self::ROOT_PW,
            ]),
            ldif,
        );
    }

    /// Adds `uid=<uid, or mail's local part>,ou=people,dc=example,dc=com` (objectClasses
    /// inetOrgPerson and inetLocalMailRecipient) with `mail`, `mailHost`, `uid`, and `cn` and `sn`
    /// set to the uid. Any value may hold quotes, backslashes, commas or UTF-8: the DN is escaped
    /// (RFC 4514) and every value goes base64-encoded in the LDIF.
    pub fn add_mailbox(&self, mail: &str, mail_host: &str, uid: Option<&str>) {
        let uid = uid.unwrap_or_else(|| mail.rsplit_once('@').map_or(mail, |(local, _)| local));
        let dn = format!("uid={},{}", escape_dn_value(uid), Self::PEOPLE);
        let mut ldif = ldif_line("dn", &dn);
        ldif.push_str("objectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\n");
        for (attr, value) in [
            ("uid", uid),
            ("cn", uid),
            ("sn", uid),
            ("mail", mail),
            ("mailHost", mail_host),
        ] {
            ldif.push_str(&ldif_line(attr, value));
        }
        self.add_ldif(&ldif);
    }

    /// `ldapsearch -LLL` under [`Slapd::SUFFIX`] (anonymous): the LDIF it prints (values that are
    /// not plain ASCII come base64-encoded, `attr:: …`).
    pub fn search(&self, filter: &str, attrs: &[&str]) -> String {
        run_ok(
            ldap_client(LDAPSEARCH)
                .args(["-x", "-LLL", "-o", "ldif-wrap=no", "-H", &self.url()])
                .args(["-b", Self::SUFFIX, filter])
                .args(attrs),
            "",
        )
    }

    /// Kills slapd (SIGKILL, as a crash would) and waits until its ports refuse connections. Nothing
    /// when it is stopped already.
    pub fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        kill(self.child.take());
        wait_port_closed(self.port, "slapd");
        if let Some(p) = self.tls_port {
            wait_port_closed(p, "slapd (LDAPS)");
        }
    }

    /// Starts slapd again on the same port(s) with the same data.
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.spawn(),
            "slapd did not restart on 127.0.0.1:{}\n{}",
            self.port,
            log_tail(&self.log_path())
        );
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        kill(self.child.take());
    }
}

/// An OpenLDAP client that reads no ldap.conf or ldaprc (`LDAPNOINIT`): only its arguments count.
fn ldap_client(tool: &str) -> Command {
    let mut command = Command::new(tool);
    command.env("LDAPNOINIT", "1");
    command
}

/// `attr:: base64(value)` and a newline: LDIF that carries any value as is.
fn ldif_line(attr: &str, value: &str) -> String {
    format!(
        "{attr}:: {}\n",
        base64::engine::general_purpose::STANDARD.encode(value)
    )
}

/// An RDN value escaped as RFC 4514 asks (`,+"\<>;=`, a leading space or `#`, a trailing space).
fn escape_dn_value(value: &str) -> String {
    let mut out = String::new();
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && matches!(c, ' ' | '#'))
            || (i == last && c == ' ');
        if c == '\0' {
            out.push_str("\\00");
            continue;
        }
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

// --- PostgreSQL -------------------------------------------------------------------------------

/// One PostgreSQL server on 127.0.0.1 (the newest version installed), with scram-sha-256
/// authentication for every connection, superuser [`Postgres::USER`] and database `mail` holding
/// `mailboxes(address text primary key, host text not null, login text)`.
pub struct Postgres {
    pub port: u16,
    /// /usr/lib/postgresql/<version>/bin.
    bin: PathBuf,
    /// The `postgres` user's uid and gid when this process is root (initdb and postgres refuse root).
    server_user: Option<(u32, u32)>,
    /// The postmaster.
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Postgres {
    pub const USER: &'static str = "popgate";
    pub const PASSWORD: &'static str = "pg-secret-pw";

    pub fn start() -> Self {
        let bin = postgres_bin();
        // The postgres user must reach the data dir: under /tmp (world-traversable), owned by it.
        let dir = tempfile::Builder::new()
            .prefix("postgres.")
            .tempdir_in("/tmp")
            .unwrap();
        let pwfile = dir.path().join("pwfile");
        fs::write(&pwfile, format!("{}\n", Self::PASSWORD)).unwrap();
        let server_user = is_root().then(|| system_user("postgres"));
        if let Some((uid, gid)) = server_user {
            require(SETPRIV, "util-linux");
            for path in [dir.path(), &pwfile] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
            }
        }
        let mut pg = Self {
            port: 0,
            bin,
            server_user,
            child: None,
            dir,
        };
        run_ok(
            pg.as_server_user("initdb")
                .arg("-D")
                .arg(pg.data())
                .args(["-A", "scram-sha-256", "-U", Self::USER, "-E", "UTF8"])
                .arg(format!("--pwfile={}", pwfile.display()))
                .args(["--no-locale", "--no-sync", "--no-instructions"]),
            "",
        );
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            pg.port = free_port();
            if pg.spawn() {
                pg.sql_in("postgres", "CREATE DATABASE mail", &[]);
                pg.sql(
                    "CREATE TABLE mailboxes (address text PRIMARY KEY, host text NOT NULL, login text)",
                );
                return pg;
            }
            last_log = log_tail(&pg.log_path());
        }
        panic!("PostgreSQL did not start in {START_ATTEMPTS} attempts\n{last_log}");
    }

    /// The temp dir: `data/` (the cluster), `postgres.log`, and the Unix socket.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `postgres://popgate@127.0.0.1:PORT/mail` (no password: it is [`Postgres::PASSWORD`]).
    pub fn url(&self) -> String {
        format!("postgres://{}@127.0.0.1:{}/mail", Self::USER, self.port)
    }

    /// A server binary run as the `postgres` user when this process is root (`setpriv` execs it, so
    /// a spawned postgres is this process's own child), from the temp dir (postgres may not enter the
    /// test's working directory).
    fn as_server_user(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        let mut command = match self.server_user {
            Some((uid, gid)) => {
                let mut c = Command::new(SETPRIV);
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .args(["--clear-groups", "--"])
                    .arg(path);
                c
            }
            None => Command::new(path),
        };
        command.current_dir(self.dir.path());
        command
    }

    /// Starts the postmaster on this port; true once it answers a query.
    fn spawn(&mut self) -> bool {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = self
            .as_server_user("postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args(["-c", "fsync=off", "-c", "shared_buffers=16MB"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let data = self.data().display().to_string();
        let deadline = Instant::now() + READY_DEADLINE;
        while Instant::now() < deadline {
            if exited(&mut self.child) {
                self.child = None;
                return false; // most likely the port was taken
            }
            // The data directory names this server: an answer from whatever else held the port is
            // not ready.
            let answer = run(&mut self.psql("postgres", &[]), "SHOW data_directory");
            if answer.status.success() && String::from_utf8_lossy(&answer.stdout).trim() == data {
                return true;
            }
            std::thread::sleep(POLL);
        }
        self.kill();
        false
    }

    /// psql as [`Postgres::USER`] over TCP, reading no psqlrc, stopping at the first error, printing
    /// bare values (unaligned, tuples only), with `:'name'` variables set from `vars`.
    fn psql(&self, database: &str, vars: &[(&str, &str)]) -> Command {
        let mut command = Command::new(self.bin.join("psql"));
        command
            .env("PGPASSWORD", Self::PASSWORD)
            .env("PGCONNECT_TIMEOUT", "5")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", Self::USER, "-d", database]);
        for (name, value) in vars {
            command.arg("-v").arg(format!("{name}={value}"));
        }
        command
    }

    fn sql_in(&self, database: &str, sql: &str, vars: &[(&str, &str)]) -> String {
        // SQL on stdin, not -c: psql substitutes variables only in what it reads.
        let sql = sql.trim_end().trim_end_matches(';');
        run_ok(&mut self.psql(database, vars), &format!("{sql};\n"))
    }

    /// Runs `sql` in database `mail` as [`Postgres::USER`]; what psql printed (one row a line,
    /// columns separated by `|`).
    pub fn sql(&self, sql: &str) -> String {
        self.sql_in("mail", sql, &[])
    }

    /// Adds a row to `mailboxes`; values go as psql variables (`:'var'`), so any text arrives as is.
    pub fn insert(&self, address: &str, host: &str, login: Option<&str>) {
        let mut vars = vec![("address", address), ("host", host)];
        let login_sql = match login {
            Some(login) => {
                vars.push(("login", login));
                ":'login'"
            }
            None => "NULL",
        };
        self.sql_in(
            "mail",
            &format!(
                "INSERT INTO mailboxes (address, host, login) VALUES (:'address', :'host', {login_sql})"
            ),
            &vars,
        );
    }

    /// Stops the server (`pg_ctl stop -m fast`: clients disconnected, data flushed) and waits until
    /// its port refuses connections. Nothing when it is stopped already.
    pub fn stop(&mut self) {
        if self.stop_mode("fast") {
            wait_port_closed(self.port, "PostgreSQL");
        }
    }

    /// Starts the server again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.spawn(),
            "PostgreSQL did not restart on 127.0.0.1:{}\n{}",
            self.port,
            log_tail(&self.log_path())
        );
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`), or kills the postmaster (SIGKILL)
    /// when pg_ctl cannot.
    fn kill(&mut self) {
        let _ = self.stop_mode("immediate");
    }

    /// `pg_ctl stop -m <mode>`, waiting for the postmaster to exit; SIGKILL when pg_ctl fails.
    /// False when no postmaster was running.
    fn stop_mode(&mut self, mode: &str) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let stopped = run(
            self.as_server_user("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-w", "-t", "30", "-m", mode, "stop"]),
            "",
        );
        if stopped.status.success() {
            wait_or_kill(child);
        } else {
            let _ = child.kill();
            let _ = child.wait();
        }
        true
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill();
    }
}

/// /usr/lib/postgresql/<version>/bin of the newest version with an `initdb`, as scripts/test's
/// glob `/usr/lib/postgresql/*/bin/initdb` finds it.
fn postgres_bin() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(POSTGRES_LIB)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    let (_, bin) = versions.pop().unwrap_or_else(|| {
        panic!(
            "no {POSTGRES_LIB}/*/bin/initdb: install Debian's postgresql (scripts/test does, as root: \
             apt-get install -y --no-install-recommends slapd ldap-utils postgresql mariadb-server)"
        )
    });
    for tool in ["postgres", "pg_ctl", "psql"] {
        require(bin.join(tool).to_str().unwrap(), "postgresql");
    }
    bin
}

/// The uid and gid of a system user, from /etc/passwd.
fn system_user(name: &str) -> (u32, u32) {
    let passwd = fs::read_to_string("/etc/passwd").unwrap();
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.len() > 3 && fields[0] == name)
        .map(|fields| (fields[2].parse().unwrap(), fields[3].parse().unwrap()))
        .unwrap_or_else(|| {
            panic!(
                "no `{name}` user in /etc/passwd: install Debian's postgresql (scripts/test does)"
            )
        })
}

// --- MariaDB ----------------------------------------------------------------------------------

/// One MariaDB server on 127.0.0.1 with database `mail` holding `mailboxes(address varchar(255)
/// primary key, host varchar(255) not null, login varchar(255))` (utf8mb4, case-insensitive
/// collation), readable by [`Mariadb::USER`]; `root` has no password and may do anything.
pub struct Mariadb {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Mariadb {
    pub const USER: &'static str = "popgate";
    pub const PASSWORD: &'static str = "maria-secret-pw";

    pub fn start() -> Self {
        for (path, package) in [
            (MARIADBD, "mariadb-server"),
            (MARIADB_INSTALL_DB, "mariadb-server"),
            (MARIADB, "mariadb-client"),
            (MARIADB_ADMIN, "mariadb-client"),
        ] {
            require(path, package);
        }
        let dir = tempfile::Builder::new()
            .prefix("mariadb.")
            .tempdir()
            .unwrap();
        let mut install = Command::new(MARIADB_INSTALL_DB);
        install
            .arg("--no-defaults") // must come first: no /etc/mysql, no ~/.my.cnf
            .args(user_root())
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .args(INNODB_OPTIONS);
        run_ok(&mut install, "");
        let mut db = Self {
            port: 0,
            child: None,
            dir,
        };
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            db.port = free_port();
            if db.spawn() {
                let mut setup = String::from(
                    "CREATE DATABASE mail CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci;\n\
                     CREATE TABLE mail.mailboxes (address varchar(255) PRIMARY KEY, \
                     host varchar(255) NOT NULL, login varchar(255));\n",
                );
                for host in ["127.0.0.1", "%"] {
                    writeln!(
                        setup,
                        "CREATE USER '{user}'@'{host}' IDENTIFIED BY '{password}';\n\
                         GRANT SELECT ON mail.* TO '{user}'@'{host}';",
                        user = Self::USER,
                        password = Self::PASSWORD,
                    )
                    .unwrap();
                }
                run_ok(&mut db.client(), &setup);
                return db;
            }
            last_log = format!(
                "{}\n{}",
                log_tail(&db.dir.path().join("stderr.log")),
                log_tail(&db.log_path())
            );
        }
        panic!("mariadbd did not start in {START_ATTEMPTS} attempts\n{last_log}");
    }

    /// The temp dir: `data/`, `mariadb.log` (the error log), `stderr.log`, the socket and pid file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("mariadb.log")
    }

    /// What the server logged (its error log).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("mariadb.sock")
    }

    /// `mysql://popgate@127.0.0.1:PORT/mail` (no password: it is [`Mariadb::PASSWORD`]).
    pub fn url(&self) -> String {
        format!("mysql://{}@127.0.0.1:{}/mail", Self::USER, self.port)
    }

    /// Starts mariadbd on this port; true once it answers a query.
    fn spawn(&mut self) -> bool {
        let d = self.dir.path();
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("stderr.log"))
            .unwrap();
        let child = Command::new(MARIADBD)
            .arg("--no-defaults")
            .args(user_root())
            .arg(format!("--datadir={}", d.join("data").display()))
            .args(["--bind-address=127.0.0.1", "--skip-name-resolve"])
            .arg(format!("--port={}", self.port))
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!("--pid-file={}", d.join("mariadb.pid").display()))
            .arg(format!("--log-error={}", self.log_path().display()))
            .args([
                "--character-set-server=utf8mb4",
                "--collation-server=utf8mb4_general_ci",
            ])
            .args(INNODB_OPTIONS)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + READY_DEADLINE;
        while Instant::now() < deadline {
            if exited(&mut self.child) {
                self.child = None;
                return false; // most likely the port was taken
            }
            // The socket path names this server: an answer from whatever else held the port is not ready.
            let answer = run(&mut self.client(), "SELECT @@socket");
            if answer.status.success()
                && String::from_utf8_lossy(&answer.stdout).trim()
                    == self.socket().display().to_string()
            {
                return true;
            }
            std::thread::sleep(POLL);
        }
        kill(self.child.take());
        false
    }

    /// The mariadb client as root over TCP, reading no option files, printing raw tab-separated rows
    /// without column names.
    fn client(&self) -> Command {
        let mut command = Command::new(MARIADB);
        command
            .arg("--no-defaults")
            .args([
                "-h",
                "127.0.0.1",
                "-P",
                &self.port.to_string(),
                "-u",
                "root",
            ])
            .args([
                "--default-character-set=utf8mb4",
                "--batch",
                "--raw",
                "--skip-column-names",
                "--connect-timeout=5",
            ]);
        command
    }

    /// Runs `sql` (one or more `;`-terminated statements) as root with `mail` as the default
    /// database; what the client printed (one row a line, columns separated by tabs).
    pub fn sql(&self, sql: &str) -> String {
        run_ok(self.client().arg("mail"), sql)
    }

    /// Adds a row to `mailboxes`; values go as hex literals, so any text arrives as is.
    pub fn insert(&self, address: &str, host: &str, login: Option<&str>) {
        self.sql(&format!(
            "INSERT INTO mailboxes (address, host, login) VALUES ({}, {}, {});",
            sql_string(address),
            sql_string(host),
            login.map_or_else(|| "NULL".to_string(), sql_string)
        ));
    }

    /// Stops mariadbd (`mariadb-admin shutdown`; killed if it does not exit in time) and waits until
    /// its port refuses connections. Nothing when it is stopped already.
    pub fn stop(&mut self) {
        let Some(child) = self.child.take() else {
            return;
        };
        let _ = Command::new(MARIADB_ADMIN)
            .arg("--no-defaults")
            .args([
                "-h",
                "127.0.0.1",
                "-P",
                &self.port.to_string(),
                "-u",
                "root",
            ])
            .arg("shutdown")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        wait_or_kill(child);
        wait_port_closed(self.port, "mariadbd");
    }

    /// Starts mariadbd again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.spawn(),
            "mariadbd did not restart on 127.0.0.1:{}\n{}",
            self.port,
            log_tail(&self.log_path())
        );
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        kill(self.child.take());
    }
}

/// Small InnoDB files and buffers: a test database holds a few rows, and many servers may run at once.
const INNODB_OPTIONS: [&str; 2] = ["--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M"];

/// `--user=root` when this process is root (mariadbd refuses to run as root without it).
fn user_root() -> Option<&'static str> {
    is_root().then_some("--user=root")
}

/// A MariaDB string literal for any text: its UTF-8 bytes in hex with the utf8mb4 introducer, so no
/// quote, backslash or SQL mode can change it.
fn sql_string(value: &str) -> String {
    let mut out = String::from("_utf8mb4 X'");
    for byte in value.bytes() {
        write!(out, "{byte:02X}").unwrap();
    }
    out.push('\'');
    out
}
