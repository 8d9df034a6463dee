//! Real Redis and PostgreSQL servers for the tests: the ones `REDIS_URL` / `DATABASE_URL` name,
//! or else our own, started once per test binary on free ports in temporary directories
//! (PostgreSQL as the `postgres` user when the tests run as root, since it refuses root). Each
//! server is watched by a small shell that stops it and removes its directory when the test
//! process exits, so nothing outlives the run.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

pub struct Servers {
    pub redis_url: String,
    /// A URL to the maintenance database (`postgres`), used to create one database per test.
    pub postgres_admin_url: String,
}

pub static SERVERS: LazyLock<Servers> = LazyLock::new(|| Servers {
    redis_url: std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| start_redis().url),
    postgres_admin_url: std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| start_postgres().admin_url),
});

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// Runs `command` (a shell command line) under a supervisor that, once this test process is
/// gone, runs `stop` (with `$server` the command's pid) and removes `cleanup_dir`. A server that
/// stops earlier (a fault test) may be started again meanwhile; the supervisor waits regardless.
fn supervise(command: &str, stop: &str, cleanup_dir: &Path, as_postgres: bool) {
    let script = format!(
        "{command} & server=$!; while [ -d /proc/{pid} ]; do sleep 0.5; done; {stop}; wait $server; rm -rf '{dir}'",
        pid = std::process::id(),
        dir = cleanup_dir.display(),
    );
    let mut shell = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "sh", "-c", &script]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", &script]);
        c
    };
    // Never waited on: the supervisor must outlive this call and ends on its own when we exit.
    #[allow(clippy::zombie_processes)]
    shell.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start a server supervisor");
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ready() {
        assert!(started.elapsed() < Duration::from_secs(60), "{what} did not start within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub struct RedisServer {
    pub url: String,
    pub port: u16,
}

/// A fresh `redis-server` of our own (no persistence: the ledger is the authority).
pub fn start_redis() -> RedisServer {
    start_redis_on(free_port())
}

/// A fresh `redis-server` on a given port (to bring one back where it was).
pub fn start_redis_on(port: u16) -> RedisServer {
    let dir = tempfile::Builder::new().prefix("yibao-redis").tempdir().unwrap().keep();
    let command = format!(
        "exec redis-server --port {port} --bind 127.0.0.1 --save '' --appendonly no --dir '{}' --logfile '{}/redis.log'",
        dir.display(),
        dir.display()
    );
    supervise(&command, "kill -TERM $server 2>/dev/null", &dir, false);
    let url = format!("redis://127.0.0.1:{port}/");
    let client = redis::Client::open(url.as_str()).unwrap();
    wait_for("redis-server", || {
        client.get_connection().and_then(|mut c| redis::cmd("PING").query::<String>(&mut c)).is_ok()
    });
    RedisServer { url, port }
}

#[derive(Clone)]
pub struct PostgresServer {
    pub admin_url: String,
    pub port: u16,
    pub data_dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
}

fn postgres_bin() -> PathBuf {
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (apt-get install postgresql), or set DATABASE_URL")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("no PostgreSQL binaries under /usr/lib/postgresql")
}

/// A fresh PostgreSQL cluster of our own, with durable commits (fsync and synchronous_commit on).
pub fn start_postgres() -> PostgresServer {
    let bin = postgres_bin();
    let as_postgres = is_root();
    let dir = tempfile::Builder::new().prefix("yibao-pg").tempdir().unwrap().keep();
    let data_dir = dir.join("data");
    if as_postgres {
        let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status().unwrap();
        assert!(status.success(), "chown the PostgreSQL directory");
    }
    let initdb = format!(
        "'{}' -D '{}' -A trust -U postgres --no-sync -E UTF8 --locale=C",
        bin.join("initdb").display(),
        data_dir.display()
    );
    let mut command = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "sh", "-c", &initdb]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", &initdb]);
        c
    };
    let output = command.output().expect("run initdb");
    assert!(output.status.success(), "initdb failed: {}", String::from_utf8_lossy(&output.stderr));
    let port = free_port();
    let server = PostgresServer {
        admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        port,
        data_dir,
        bin,
        as_postgres,
    };
    server.launch(&dir);
    server
}

impl PostgresServer {
    fn launch(&self, cleanup_dir: &Path) {
        let command = format!(
            "exec '{}' -D '{}' -p {} -k '{}' -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on \
             -c max_connections=200 -c shared_buffers=64MB > '{}/postgres.log' 2>&1",
            self.bin.join("postgres").display(),
            self.data_dir.display(),
            self.port,
            self.data_dir.display(),
            cleanup_dir.display(),
        );
        let stop = format!(
            "'{}' -D '{}' stop -m immediate >/dev/null 2>&1 || kill -INT $server 2>/dev/null",
            self.bin.join("pg_ctl").display(),
            self.data_dir.display()
        );
        supervise(&command, &stop, cleanup_dir, self.as_postgres);
        self.wait_ready();
    }

    pub fn wait_ready(&self) {
        let url = self.admin_url.clone();
        wait_for("PostgreSQL", || {
            let probe = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .output();
            probe.map(|o| o.status.success()).unwrap_or(false) && !url.is_empty()
        });
    }

    fn pg_ctl(&self, args: &str) {
        let line = format!("'{}' -D '{}' {args}", self.bin.join("pg_ctl").display(), self.data_dir.display());
        let status = if self.as_postgres {
            Command::new("runuser").args(["-u", "postgres", "--", "sh", "-c", &line]).stdout(Stdio::null()).status()
        } else {
            Command::new("sh").args(["-c", &line]).stdout(Stdio::null()).status()
        };
        assert!(status.map(|s| s.success()).unwrap_or(false), "pg_ctl {args}");
    }

    /// Stops the server (fast shutdown: sessions are cut, committed data stays).
    pub fn stop(&self) {
        self.pg_ctl("stop -m fast -w");
    }

    /// Starts it again on the same port and data.
    pub fn restart(&self) {
        let log = self.data_dir.parent().unwrap().join("postgres-restart.log");
        self.pg_ctl(&format!(
            "start -w -l '{}' -o \"-p {} -k '{}' -c listen_addresses=127.0.0.1 -c fsync=on\"",
            log.display(),
            self.port,
            self.data_dir.display()
        ));
        self.wait_ready();
    }
}

/// A new, empty database on the shared server; returns its URL.
pub async fn fresh_database(name: &str) -> String {
    let admin = &SERVERS.postgres_admin_url;
    let (client, connection) =
        tokio_postgres::connect(admin, tokio_postgres::NoTls).await.expect("connect to PostgreSQL");
    tokio::spawn(connection);
    client.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).await.unwrap();
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    let (base, _) = admin.rsplit_once('/').expect("a database URL ends in /<database>");
    format!("{base}/{name}")
}
