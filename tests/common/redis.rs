//! A real `redis-server` on a free loopback port, owned by one test.
//!
//! Data is kept in an append-only file synced on every write, so a server
//! killed and started again comes back with what it had (as a production
//! Redis with persistence does); [`RedisProcess::wipe`] starts it empty
//! instead (as one without persistence does).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::PATIENCE;

/// Set to `1` where `redis-server` must be present (CI): a missing one fails the test.
const REQUIRE: &str = "GOTO_PROXY_REQUIRE_REDIS";

/// A `redis-server` process; killed when dropped.
pub struct RedisProcess {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    password: Option<String>,
    /// Served over TLS only, with this certificate chain, key and CA.
    tls: Option<super::pki::Pki>,
}

impl RedisProcess {
    /// Starts a server, or says why the test is skipped and returns `None`
    /// when `redis-server` is not installed (and not required).
    pub async fn start() -> Option<Self> {
        Self::start_with_password(None).await
    }

    /// As [`RedisProcess::start`], with `requirepass`.
    pub async fn start_with_password(password: Option<&str>) -> Option<Self> {
        Self::start_as(password, None).await
    }

    /// A server that speaks TLS only (with a certificate for 127.0.0.1 from
    /// `pki`) and wants `password`.
    pub async fn start_tls(password: &str, pki: super::pki::Pki) -> Option<Self> {
        Self::start_as(Some(password), Some(pki)).await
    }

    async fn start_as(password: Option<&str>, tls: Option<super::pki::Pki>) -> Option<Self> {
        let installed = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            assert!(
                std::env::var(REQUIRE).as_deref() != Ok("1"),
                "redis-server is required ({REQUIRE}=1) but not installed: apt-get install redis-server"
            );
            eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
            return None;
        }
        let mut server = Self {
            child: None,
            port: 0,
            dir: tempfile::tempdir().unwrap(),
            password: password.map(str::to_owned),
            tls,
        };
        for _ in 0..5 {
            server.port = free_port();
            if server.launch().await {
                return Some(server);
            }
        }
        panic!("redis-server did not start on a free loopback port in five tries");
    }

    /// `redis://127.0.0.1:PORT` (`rediss://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once, as a crash or a lost node would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the killed server again on the same port, with its data.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "kill the server first");
        assert!(
            self.launch().await,
            "redis-server did not start again on port {}",
            self.port
        );
    }

    /// Kills the server and starts it again empty.
    pub async fn wipe(&mut self) {
        self.kill();
        self.dir = tempfile::tempdir().unwrap();
        self.restart().await;
    }

    /// A connection for the test to look at and change what is stored.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        let mut info =
            redis::IntoConnectionInfo::into_connection_info(self.url().as_str()).unwrap();
        if let Some(password) = &self.password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        redis::Client::open(info)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Starts `redis-server` and waits until it answers; false when it exited (port taken).
    async fn launch(&mut self) -> bool {
        let mut command = Command::new("redis-server");
        let port = self.port.to_string();
        match &self.tls {
            None => command.args(["--port", &port]),
            Some(pki) => command
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(&pki.chain)
                .arg("--tls-key-file")
                .arg(&pki.key)
                .arg("--tls-ca-cert-file")
                .arg(&pki.ca),
        };
        command
            .args(["--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        let mut child = command.spawn().expect("redis-server starts");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            if answers(self.port, self.tls.is_some()).await {
                self.child = Some(child);
                return true;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not answer"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether something on `port` answers a Redis PING (or asks for a
/// password); over TLS, whether it accepts connections.
async fn answers(port: u16, tls: bool) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if tls {
        return true;
    }
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut reply = [0u8; 16];
    matches!(stream.read(&mut reply).await, Ok(n) if n > 0 && (reply.starts_with(b"+PONG") || reply.starts_with(b"-NOAUTH")))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
