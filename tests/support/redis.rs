//! Real Redis servers for the shared-state tests (Debian's `redis-server`, installed by scripts/test).
//!
//! Owns: each server's temp dir, loopback port and process, from start to a kill on `Drop`. A server
//! keeps no data on disk (`--save ''`, no AOF), so a restart is an empty server, as after a crash of an
//! in-memory cache. Readiness is a `PING` answered under a deadline, never a sleep.
//!
//! Must not: skip when Redis is missing (it panics), or bind anything but 127.0.0.1.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SERVER: &str = "/usr/bin/redis-server";
const READY_DEADLINE: Duration = Duration::from_secs(15);

/// One Redis server on 127.0.0.1.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    /// Sentinel mode: the config file (first argument) holds these lines.
    sentinel: Option<String>,
}

/// A free loopback port (another process may take it before the server binds: `start` retries).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Redis {
    /// A standalone server.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A standalone server with extra `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_as(extra, None)
    }

    /// A Sentinel whose config file holds `lines` (e.g. `sentinel monitor NAME 127.0.0.1 PORT 1`).
    pub fn sentinel(lines: &str) -> Self {
        Self::start_as(&[], Some(lines.to_string()))
    }

    fn start_as(extra: &[&str], sentinel: Option<String>) -> Self {
        let args: Vec<String> = extra.iter().map(|s| (*s).to_string()).collect();
        for _ in 0..4 {
            let mut r = Self {
                child: None,
                port: free_port(),
                dir: tempfile::tempdir().unwrap(),
                args: args.clone(),
                sentinel: sentinel.clone(),
            };
            if r.spawn() {
                return r;
            }
        }
        panic!("redis-server did not start (see its log in the temp dir)");
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `host:port` as a config names it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the process on this server's port; true once it answers PING.
    fn spawn(&mut self) -> bool {
        assert!(
            Path::new(SERVER).exists(),
            "{SERVER} is missing: install Debian's redis-server (scripts/test does, as root)"
        );
        let log = self.dir.path().join("redis.log");
        let mut command = Command::new(SERVER);
        if let Some(lines) = &self.sentinel {
            // Sentinel rewrites its config file, and wants it first.
            let conf = self.dir.path().join("sentinel.conf");
            std::fs::write(&conf, lines).unwrap();
            command.arg(&conf).arg("--sentinel");
        }
        let persistence: &[&str] = if self.sentinel.is_some() {
            &[]
        } else {
            &["--save", "", "--appendonly", "no"]
        };
        let child = command
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.dir.path().to_str().unwrap(),
                "--logfile",
                log.to_str().unwrap(),
            ])
            .args(persistence)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + READY_DEADLINE;
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return false; // exited: most likely the port was taken
            }
            if self.command(&["PING"]).is_some_and(|r| r == "+PONG") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server did not restart on {}",
            self.port
        );
    }

    /// One command over RESP; the first line of the answer (`+PONG`, `:3`, `$-1`...), or None when the
    /// server does not answer.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut tcp = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        tcp.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        tcp.write_all(req.as_bytes()).ok()?;
        let mut line = String::new();
        BufReader::new(tcp).read_line(&mut line).ok()?;
        Some(line.trim_end().to_string())
    }

    /// Every key the server holds (`KEYS *`, for the privacy check), via redis-cli.
    pub fn keys(&self) -> Vec<String> {
        let out = Command::new("redis-cli")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "--raw",
                "KEYS",
                "*",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of three masters (no replicas) on loopback ports.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<Redis> = (0..3)
            .map(|_| {
                Redis::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(n.addr());
        }
        let out = create.arg("--cluster-yes").output().unwrap();
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + READY_DEADLINE;
        for n in &nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &n.port.to_string(), "cluster", "info"])
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "the cluster did not come up");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self { nodes }
    }

    /// The nodes' addresses, as `cluster.servers` lists them.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(Redis::addr).collect()
    }

    /// Keys held over all nodes.
    pub fn keys(&self) -> Vec<String> {
        self.nodes.iter().flat_map(Redis::keys).collect()
    }
}

/// Writes the fleet's key secret into `dir` and returns its path.
pub fn key_secret(dir: &Path) -> PathBuf {
    let path = dir.join("cluster.key");
    std::fs::write(&path, "a-test-key-of-more-than-16-bytes\n").unwrap();
    path
}
