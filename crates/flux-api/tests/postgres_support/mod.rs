//! A throw-away PostgreSQL server on loopback for the store tests and the bench.
//!
//! `FLUX_TEST_PG_URL` points the tests at an existing server instead (a fresh database is
//! created in it per test). Otherwise the server binaries are taken from `FLUX_PG_BIN` or the
//! distribution's `/usr/lib/postgresql/<version>/bin` (newest first), `initdb` makes a cluster
//! in a temporary directory, and `pg_ctl` starts it on a free port with its unix socket in the
//! same directory; dropping the handle stops it. As root (initdb refuses root) every server
//! command runs as the unprivileged `postgres` user through `runuser`.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A server for one test: either started here or an outside one.
pub struct PgServer {
    url: String,
    local: Option<Local>,
}

struct Local {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    run_as: Option<String>,
    durable: bool,
}

fn find_bin() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("FLUX_PG_BIN") {
        let dir = PathBuf::from(dir);
        if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
            return Ok(dir);
        }
        return Err(format!(
            "FLUX_PG_BIN={} has no initdb and pg_ctl",
            dir.display()
        ));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let version = e.file_name().to_str()?.parse::<u32>().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").is_file().then_some((version, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(|| {
        "no PostgreSQL server binaries: install the distribution's postgresql package, or set \
         FLUX_PG_BIN (a directory with initdb and pg_ctl) or FLUX_TEST_PG_URL"
            .to_string()
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn id_of(user: &str, flag: &str) -> u32 {
    let out = Command::new("id")
        .args([flag, user])
        .output()
        .expect("run `id`");
    assert!(
        out.status.success(),
        "running as root needs an unprivileged '{user}' user for initdb (it refuses root)"
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("numeric id")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Local {
    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.current_dir(self.dir.path());
        cmd
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, cmd: &mut Command, what: &str) {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        assert!(
            out.status.success(),
            "{what} failed: {}\n{}\nserver log:\n{log}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(&self) {
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        if !self.durable {
            options.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-o", &options, "-w", "-t", "60", "start"]);
        self.run(&mut cmd, "pg_ctl start");
    }

    fn stop(&self, mode: &str) {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data())
            .args(["-m", mode, "-w", "-t", "60", "stop"]);
        self.run(&mut cmd, "pg_ctl stop");
    }
}

impl PgServer {
    /// A server for tests (no fsync: fast, not crash-safe).
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// A server; `durable` keeps PostgreSQL's default fsync settings.
    pub fn start_with(durable: bool) -> Self {
        if let Ok(url) = std::env::var("FLUX_TEST_PG_URL")
            && !url.is_empty()
        {
            return Self::external(&url);
        }
        Self::start_local(durable)
    }

    /// A server started here even when `FLUX_TEST_PG_URL` is set (tests that restart it).
    pub fn start_local(durable: bool) -> Self {
        let bin = find_bin().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::Builder::new()
            .prefix("flux-pg-")
            .tempdir()
            .expect("temporary directory");
        let run_as = is_root().then(|| "postgres".to_string());
        if let Some(user) = &run_as {
            let (uid, gid) = (id_of(user, "-u"), id_of(user, "-g"));
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("hand the temporary directory to the postgres user");
        }
        let local = Local {
            dir,
            bin,
            port: free_port(),
            run_as,
            durable,
        };
        let mut initdb = local.command("initdb");
        initdb.arg("-D").arg(local.data()).args([
            "-U",
            "flux",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        local.run(&mut initdb, "initdb");
        local.start();
        Self {
            url: format!("postgres://flux@127.0.0.1:{}/postgres", local.port),
            local: Some(local),
        }
    }

    fn external(base: &str) -> Self {
        let name = format!("flux_test_{}", uuid::Uuid::new_v4().simple());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(base, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("FLUX_TEST_PG_URL: cannot connect: {e}"));
            let task = tokio::spawn(conn);
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .unwrap_or_else(|e| panic!("FLUX_TEST_PG_URL: cannot create a database: {e}"));
            drop(client);
            let _ = task.await;
        });
        let mut config: tokio_postgres::Config = base.parse().expect("FLUX_TEST_PG_URL");
        config.dbname(&name);
        Self {
            url: config_to_url(&config, &name),
            local: None,
        }
    }

    /// The connection URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether this server was started here (and can be restarted).
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// Stops the server (fast shutdown: open connections are closed).
    pub fn stop(&self) {
        self.local.as_ref().expect("a local server").stop("fast");
    }

    /// Starts it again on the same port.
    pub fn start_again(&self) {
        self.local.as_ref().expect("a local server").start();
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.local
            .as_ref()
            .and_then(|l| std::fs::read_to_string(l.dir.path().join("server.log")).ok())
            .unwrap_or_default()
    }

    /// The data directory (local servers only).
    pub fn data_dir(&self) -> Option<&Path> {
        self.local.as_ref().map(|l| l.dir.path())
    }
}

/// Rebuilds a key=value connection string for `config` with database `name`.
fn config_to_url(config: &tokio_postgres::Config, name: &str) -> String {
    let mut parts = vec![format!("dbname={name}")];
    if let Some(user) = config.get_user() {
        parts.push(format!("user={user}"));
    }
    if let Some(pw) = config.get_password() {
        parts.push(format!("password={}", String::from_utf8_lossy(pw)));
    }
    for host in config.get_hosts() {
        match host {
            tokio_postgres::config::Host::Tcp(h) => parts.push(format!("host={h}")),
            tokio_postgres::config::Host::Unix(p) => parts.push(format!("host={}", p.display())),
        }
    }
    if let Some(port) = config.get_ports().first() {
        parts.push(format!("port={port}"));
    }
    parts.join(" ")
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(local) = &self.local {
            let mut cmd = local.command("pg_ctl");
            cmd.arg("-D")
                .arg(local.data())
                .args(["-m", "immediate", "-w", "stop"]);
            let _ = cmd.output();
        }
    }
}
