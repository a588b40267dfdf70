//! Real dependencies on free ports, stopped on drop: anvil (from contracts/node_modules), the
//! service itself over HTTP on 127.0.0.1:0, and the deployed local stack.

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use serde_json::{Value, json};
use session_paymaster::app::{self, AppState};
use session_paymaster::chain::deploy::{Artifacts, DevStack, deploy_dev_stack};
use session_paymaster::config::{ChainConfig, Config, EntryPointConfig};
use session_paymaster::server::{self, ConnectionLimits};
use session_paymaster::signer::{KeySource, keygen};
use session_paymaster::userop::EntryPointVersion;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn contracts_dir() -> PathBuf {
    repo_dir().join("contracts")
}

/// A port free on loopback now (0 if none could be found: the bind then fails loudly).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// The scope of a policy-wide daily budget today (`policy:<day>`).
pub fn policy_day_scope() -> String {
    format!("policy:{}", session_paymaster::clock::unix_now() / 86_400)
}

/// A child process (the real binary, say) killed and reaped when dropped, so that an assertion
/// that fails leaves no process holding its ports.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// `kill -9`: no shutdown, nothing flushed.
    pub fn kill(&mut self) -> TestResult {
        self.0.kill()?;
        self.0.wait()?;
        Ok(())
    }

    /// Kill it; what it wrote to its stderr, where that was piped.
    pub fn stop(mut self) -> TestResult<String> {
        self.kill()?;
        let mut stderr = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut stderr)?;
        }
        Ok(stderr)
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sp-it-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("temp dir {}: {e}", dir.display()));
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The policy file `id` that sponsors `increment()` of [`COUNTER`] on chain 31337's EntryPoint
/// v0.7, at most `ops` operations a day across all senders.
pub fn counter_policy(id: &str, ops: u64) -> String {
    format!(
        "id = \"{id}\"\nchains = [31337]\nentry_points = [\"0.7\"]\n\
         [budgets]\npolicy = {{ ops = {ops}, period = \"1d\" }}\n\
         [[allow]]\ntarget = \"{COUNTER}\"\nfunctions = [\"increment()\"]\n"
    )
}

/// The policy file `id` that sponsors any function of [`COUNTER`] on chain 31337's EntryPoint
/// v0.7, only under a session grant, with at most `max_sessions` grants live if given.
pub fn session_policy(id: &str, max_sessions: Option<u64>) -> String {
    let bound = max_sessions.map_or(String::new(), |n| format!("max_sessions = {n}\n"));
    format!(
        "id = \"{id}\"\nchains = [31337]\nentry_points = [\"0.7\"]\nrequire_session = true\n\
         {bound}\n[[allow]]\ntarget = \"{COUNTER}\"\nfunctions = [\"*\"]\n"
    )
}

/// A policies directory (`tag` names it) holding only [`counter_policy`] `id`, as `<id>.toml`.
pub fn counter_policy_dir(tag: &str, id: &str, ops: u64) -> TestResult<TempDir> {
    let dir = TempDir::new(tag);
    std::fs::write(dir.0.join(format!("{id}.toml")), counter_policy(id, ops))?;
    Ok(dir)
}

/// anvil on a free port, killed on drop.
pub struct TestAnvil {
    child: Child,
    pub url: String,
    pub provider: DynProvider,
}

impl TestAnvil {
    pub async fn start() -> TestResult<Self> {
        Self::start_on(31337).await
    }

    /// anvil serving chain `chain_id`.
    pub async fn start_on(chain_id: u64) -> TestResult<Self> {
        let bin = contracts_dir().join("node_modules/.bin/anvil");
        assert!(
            bin.exists(),
            "{} is missing: run scripts/setup-contracts (scripts/test does)",
            bin.display()
        );
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let child = Command::new(&bin)
                .args([
                    "--port",
                    &port.to_string(),
                    "--host",
                    "127.0.0.1",
                    "--chain-id",
                    &chain_id.to_string(),
                    "--silent",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let url = format!("http://127.0.0.1:{port}");
            let provider = ProviderBuilder::new().connect_http(url.parse()?).erased();
            let mut anvil = Self {
                child,
                url,
                provider,
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                match anvil.provider.get_chain_id().await {
                    Ok(_) => return Ok(anvil),
                    Err(e) => last_err = e.to_string(),
                }
                if let Ok(Some(_)) = anvil.child.try_wait() {
                    break; // port taken between probe and bind: try another
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Err(format!("anvil did not start: {last_err}").into())
    }

    /// The node's first unlocked account (bundler, deployer).
    pub async fn account(&self) -> TestResult<Address> {
        Ok(*self
            .provider
            .get_accounts()
            .await?
            .first()
            .ok_or("no accounts")?)
    }
}

impl Drop for TestAnvil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The service on 127.0.0.1:0, stopped on drop.
pub struct TestApp {
    pub url: String,
    pub state: Arc<AppState>,
    client: reqwest::Client,
    _shutdown: oneshot::Sender<()>,
}

impl TestApp {
    pub async fn spawn(config: Config) -> TestResult<Self> {
        Self::spawn_with_limits(config, ConnectionLimits::default()).await
    }

    /// The service, its connections held to `limits`.
    pub async fn spawn_with_limits(config: Config, limits: ConnectionLimits) -> TestResult<Self> {
        let state = Arc::new(AppState::build(&config).await?);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (tx, rx) = oneshot::channel::<()>();
        let serve_state = state.clone();
        tokio::spawn(async move {
            let _ = server::run(
                listener,
                app::router(serve_state),
                async {
                    let _ = rx.await;
                },
                limits,
            )
            .await;
        });
        Ok(Self {
            url,
            state,
            client: reqwest::Client::new(),
            _shutdown: tx,
        })
    }

    /// POST a raw body; returns status and parsed JSON (Null for an empty body).
    pub async fn post(&self, body: &str) -> TestResult<(u16, Value)> {
        self.post_at("", body).await
    }

    /// POST a raw body to `path` (`/8453`); returns status and parsed JSON.
    pub async fn post_at(&self, path: &str, body: &str) -> TestResult<(u16, Value)> {
        let resp = self
            .client
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok((
            status,
            if text.is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text)?
            },
        ))
    }

    /// One JSON-RPC call; returns the whole response object.
    pub async fn call(&self, method: &str, params: Value) -> TestResult<Value> {
        self.call_at("", method, params).await
    }

    /// One JSON-RPC call to `path` (`""` is `/`); returns the whole response object.
    pub async fn call_at(&self, path: &str, method: &str, params: Value) -> TestResult<Value> {
        let body = json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params });
        let (status, v) = self.post_at(path, &body.to_string()).await?;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["id"], json!(1), "{v}");
        Ok(v)
    }

    /// One JSON-RPC call that must succeed; returns `result`.
    pub async fn result(&self, method: &str, params: Value) -> TestResult<Value> {
        self.result_at("", method, params).await
    }

    /// [`Self::result`] at `path`.
    pub async fn result_at(&self, path: &str, method: &str, params: Value) -> TestResult<Value> {
        let v = self.call_at(path, method, params).await?;
        if v.get("error").is_some() {
            return Err(format!("{method} failed: {v}").into());
        }
        Ok(v["result"].clone())
    }

    /// One JSON-RPC call that must fail; returns `error`.
    pub async fn error(&self, method: &str, params: Value) -> TestResult<Value> {
        self.error_at("", method, params).await
    }

    /// [`Self::error`] at `path`.
    pub async fn error_at(&self, path: &str, method: &str, params: Value) -> TestResult<Value> {
        let v = self.call_at(path, method, params).await?;
        v.get("error")
            .cloned()
            .ok_or_else(|| format!("{method} succeeded: {v}").into())
    }
}

alloy::sol! {
    function execute(address dest, uint256 value, bytes func);
}

/// The demo Counter's deterministic address (`policies/dev-counter.toml` allows it).
pub const COUNTER: Address =
    alloy::primitives::address!("0xCF3b87F3D9d62cdF4723D97D8139156c6b2AB4B3");

/// A SimpleAccount operation of `sender` calling `func` (a signature) on the Counter, with
/// gas limits and fees every example policy accepts.
pub fn counter_op(
    sender: Address,
    nonce: u64,
    func: &str,
) -> session_paymaster::userop::UserOperation {
    use alloy::sol_types::SolCall;
    session_paymaster::userop::UserOperation {
        sender,
        nonce: U256::from(nonce),
        call_data: executeCall {
            dest: COUNTER,
            value: U256::ZERO,
            func: alloy::primitives::keccak256(func)[..4].to_vec().into(),
        }
        .abi_encode()
        .into(),
        call_gas_limit: 100_000,
        verification_gas_limit: 200_000,
        pre_verification_gas: U256::from(50_000),
        max_fee_per_gas: 2_000_000_000,
        max_priority_fee_per_gas: 1_000_000_000,
        ..Default::default()
    }
}

/// The admin bearer token every test app accepts.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Config of the embedded defaults, with the given paymasters (in the order of
/// `EntryPointVersion::ALL`, each EntryPoint at its canonical address) and a key file.
pub fn config(paymasters: [Option<Address>; 3], signer: KeySource) -> Config {
    Config {
        chains: vec![ChainConfig {
            chain_id: 31337,
            entry_points: EntryPointVersion::ALL
                .iter()
                .zip(paymasters)
                .map(|(&version, paymaster)| EntryPointConfig {
                    version,
                    address: version.canonical_address(),
                    paymaster,
                })
                .collect(),
            rpc_url: None,
            bundler_url: None,
        }],
        signer,
        policies_dir: repo_dir().join("policies"),
        sponsor_name: "test sponsor".into(),
        max_body_bytes: 256 * 1024,
        api_keys: Vec::new(),
        rate_per_key: None,
        bundler_timeout: Duration::from_secs(10),
        deposit_margin: 10,
        publish_policies: false,
        redis_url: None,
        redis_timeout: Duration::from_millis(500),
        admin_token_sha256: Some(B256::from_slice(&Sha256::digest(ADMIN_TOKEN.as_bytes()))),
        admin_keys: Vec::new(),
        tenant_default_max_sessions: std::num::NonZeroU64::new(
            session_paymaster::config::TENANT_DEFAULT_MAX_SESSIONS,
        ),
        redis_wait: None,
        session_copies: session_paymaster::config::DEFAULT_SESSION_COPIES,
        admin_on_main: true,
        metrics_on_main: true,
    }
}

/// The chain a stack deployed, as the service configures it: its EntryPoints where the stack put
/// them (0.9.0-rc.1 is not at the canonical v0.9 address) with its paymasters.
pub fn chain_config(deployed: &DevStack) -> ChainConfig {
    ChainConfig {
        chain_id: deployed.chain_id,
        entry_points: deployed
            .entry_points
            .iter()
            .map(|d| EntryPointConfig {
                version: d.version,
                address: d.entry_point,
                paymaster: Some(d.paymaster),
            })
            .collect(),
        rpc_url: None,
        bundler_url: None,
    }
}

/// anvil with the local stack deployed, and the service pointed at it.
pub struct Stack {
    pub anvil: TestAnvil,
    pub deployed: DevStack,
    pub app: TestApp,
    pub bundler: Address,
    _keys: TempDir,
}

impl Stack {
    pub async fn start() -> TestResult<Self> {
        Self::start_with(None, None).await
    }

    /// A stack whose service uses `policies` (default: the repository's) and Redis at `redis_url`.
    pub async fn start_with(
        policies: Option<PathBuf>,
        redis_url: Option<String>,
    ) -> TestResult<Self> {
        let keys = TempDir::new("stack");
        let key_file = keys.0.join("signer.key");
        keygen(&key_file)?;
        Self::start_on(31337, policies, redis_url, key_file, keys).await
    }

    /// A stack on chain `chain_id` whose paymasters trust the signer in `key_file` (kept with
    /// `keys`): stacks of several chains can share one signer.
    pub async fn start_on(
        chain_id: u64,
        policies: Option<PathBuf>,
        redis_url: Option<String>,
        key_file: PathBuf,
        keys: TempDir,
    ) -> TestResult<Self> {
        let anvil = TestAnvil::start_on(chain_id).await?;
        let signer =
            session_paymaster::signer::Signer::load(KeySource::File(key_file.clone()))?.address();
        let bundler = anvil.account().await?;
        let deployed = deploy_dev_stack(
            &anvil.provider,
            &Artifacts::new(contracts_dir()),
            bundler,
            bundler,
            &[signer],
            U256::from(10u64).pow(U256::from(19u64)),
        )
        .await?;
        let mut c = config([None; 3], KeySource::File(key_file));
        c.chains = vec![chain_config(&deployed)];
        if let Some(dir) = policies {
            c.policies_dir = dir;
        }
        c.redis_url = redis_url;
        let app = TestApp::spawn(c).await?;
        Ok(Self {
            anvil,
            deployed,
            app,
            bundler,
            _keys: keys,
        })
    }

    pub fn version(
        &self,
        v: EntryPointVersion,
    ) -> session_paymaster::chain::deploy::VersionDeployment {
        *self
            .deployed
            .entry_points
            .iter()
            .find(|d| d.version == v)
            .unwrap_or_else(|| panic!("{v} deployed"))
    }
}

/// redis-server on a free port, killed on drop. `persistent` ones keep an append-only file
/// (fsync on every write) in their own directory and can be restarted on the same port.
pub struct TestRedis {
    child: Child,
    pub url: String,
    port: u16,
    data: Option<TempDir>,
    /// Its directory when it keeps no append-only file (`data`): what it writes (a replica's
    /// first sync) goes there, not in the working directory.
    _scratch: Option<TempDir>,
}

impl TestRedis {
    pub async fn start() -> TestResult<Self> {
        Self::spawn(None).await
    }

    /// A connection of its own to this server, which waits up to 15 s for an answer (redis-rs
    /// gives up after 500 ms by default: on a busy runner `caught_up`'s `WAIT` for a replica's
    /// first sync took longer, and `start_replica_of` failed with `timed out`: two runs in
    /// eight of the replica-wait test with three busy loops beside it, none in ten since).
    pub async fn conn(&self) -> TestResult<redis::aio::MultiplexedConnection> {
        let config =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(15)));
        Ok(redis::Client::open(self.url.as_str())?
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    /// With an append-only file.
    pub async fn start_persistent() -> TestResult<Self> {
        Self::spawn(Some(TempDir::new("redis-aof"))).await
    }

    /// A replica of `primary`, once the primary counts it online (what `WAIT` counts).
    pub async fn start_replica_of(primary: &TestRedis) -> TestResult<Self> {
        let replica = Self::spawn_with(None, Some(primary.port)).await?;
        let mut c = primary.conn().await?;
        let online = format!("port={},state=online", replica.port);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut c)
                .await?;
            if info.contains(&online) {
                replica.caught_up(primary).await?;
                return Ok(replica);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err("the primary did not count its replica online".into())
    }

    /// Once this replica acknowledges a write to `primary` (it may be loading its first sync,
    /// or catching up after a pause): a write, then `WAIT` of up to 10 s for it.
    pub async fn caught_up(&self, primary: &TestRedis) -> TestResult {
        let mut c = primary.conn().await?;
        let _: () = redis::cmd("SET")
            .arg("test:replica-caught-up")
            .arg(self.port)
            .query_async(&mut c)
            .await?;
        let acknowledged: i64 = redis::cmd("WAIT")
            .arg(1)
            .arg(10_000)
            .query_async(&mut c)
            .await?;
        if acknowledged < 1 {
            return Err("the replica acknowledged nothing within 10 s".into());
        }
        Ok(())
    }

    /// Stop the server's process (`SIGSTOP`): connections stay open, nothing is answered or
    /// acknowledged, as a replica that stalls.
    pub fn pause(&self) -> TestResult {
        self.signal("-STOP")
    }

    /// Let a paused server go on (`SIGCONT`).
    pub fn resume(&self) -> TestResult {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> TestResult {
        let sent = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()?
            .success();
        if sent {
            Ok(())
        } else {
            Err(format!("kill {signal}").into())
        }
    }

    async fn spawn(data: Option<TempDir>) -> TestResult<Self> {
        Self::spawn_with(data, None).await
    }

    async fn spawn_with(data: Option<TempDir>, replica_of: Option<u16>) -> TestResult<Self> {
        let mut last_err = String::new();
        // A directory of its own whatever it keeps: nothing it writes (a replica's first sync)
        // lands in the working directory, where every redis-server started there would load it.
        let scratch = data.is_none().then(|| TempDir::new("redis"));
        for _ in 0..5 {
            let port = free_port();
            let dir = data.as_ref().or(scratch.as_ref()).ok_or("a directory")?;
            match Self::launch(port, dir, data.is_some(), replica_of) {
                Ok(child) => {
                    let mut redis = Self {
                        child,
                        url: format!("redis://127.0.0.1:{port}"),
                        port,
                        data: None,
                        _scratch: None,
                    };
                    match redis.wait_ready().await {
                        Ok(()) => {
                            redis.data = data;
                            redis._scratch = scratch;
                            return Ok(redis);
                        }
                        Err(e) => last_err = e.to_string(),
                    }
                }
                Err(e) => last_err = e.to_string(),
            }
        }
        Err(format!("redis-server did not start: {last_err}").into())
    }

    /// In `dir`, with an append-only file there if `persistent`; a replica of the primary on
    /// port `replica_of` if given.
    fn launch(
        port: u16,
        dir: &TempDir,
        persistent: bool,
        replica_of: Option<u16>,
    ) -> TestResult<Child> {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            // (A replica's first sync starts at once, not after the default 5 s.)
            "--repl-diskless-sync-delay",
            "0",
            "--appendonly",
            if persistent { "yes" } else { "no" },
            "--appendfsync",
            "always",
            "--dir",
        ])
        .arg(&dir.0);
        if let Some(primary) = replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        Ok(cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server: {e} (scripts/test installs it)"))?)
    }

    async fn wait_ready(&mut self) -> TestResult {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(mut c) = redis::Client::open(self.url.as_str())?
                .get_multiplexed_async_connection()
                .await
            {
                let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut c).await;
                if pong.is_ok() {
                    return Ok(());
                }
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return Err("redis-server exited".into());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err("redis-server not ready".into())
    }

    /// Kill the server (as a crash would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start it again on the same port, with the same append-only file.
    pub async fn restart(&mut self) -> TestResult {
        self.kill();
        let dir = self
            .data
            .as_ref()
            .or(self._scratch.as_ref())
            .ok_or("a directory")?;
        self.child = Self::launch(self.port, dir, self.data.is_some(), None)?;
        self.wait_ready().await
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A three-master Redis Cluster on free ports, made with `redis-cli --cluster create`, stopped
/// on drop.
pub struct TestRedisCluster {
    nodes: Vec<Child>,
    ports: Vec<u16>,
    persistent: bool,
    data: TempDir,
    /// Comma-separated node URLs, as `--redis-url` takes a Cluster.
    pub url: String,
}

impl TestRedisCluster {
    pub async fn start() -> TestResult<Self> {
        Self::start_with(false).await
    }

    /// Nodes with an append-only file: a node restarted keeps its keys.
    pub async fn start_persistent() -> TestResult<Self> {
        Self::start_with(true).await
    }

    fn spawn_node(data: &TempDir, port: u16, persistent: bool) -> TestResult<Child> {
        Ok(Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                if persistent { "yes" } else { "no" },
                // As docs/operations.md asks: with `everysec`, a node killed under load lost
                // the write of a reservation it had answered (the AOF write is put off while
                // the last fsync runs).
                "--appendfsync",
                "always",
                "--appendfilename",
                &format!("aof-{port}"),
                "--appenddirname",
                &format!("aof-{port}"),
            ])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &format!("nodes-{port}.conf"),
            ])
            .arg("--dir")
            .arg(&data.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?)
    }

    async fn start_with(persistent: bool) -> TestResult<Self> {
        let data = TempDir::new("redis-cluster");
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for port in &ports {
            nodes.push(Self::spawn_node(&data, *port, persistent)?);
        }
        let mut cluster = Self {
            nodes,
            ports: ports.clone(),
            persistent,
            data,
            url: ports
                .iter()
                .map(|p| format!("redis://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(","),
        };
        for port in &ports {
            cluster.wait_for(*port, "PING", "PONG").await?;
        }
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "redis-cli --cluster create: {}",
                String::from_utf8_lossy(&out.stdout)
            )
            .into());
        }
        for port in &ports {
            cluster
                .wait_for(*port, "CLUSTER INFO", "cluster_state:ok")
                .await?;
        }
        Ok(cluster)
    }

    /// The index of the node that serves `key`'s slot.
    pub fn owner_of(&self, key: &str) -> TestResult<usize> {
        let cli = |port: u16, args: &[&str]| -> TestResult<String> {
            let out = Command::new("redis-cli")
                .args(["-p", &port.to_string()])
                .args(args)
                .output()?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let slot: u16 = cli(self.ports[0], &["CLUSTER", "KEYSLOT", key])?
            .trim()
            .parse()?;
        for (i, port) in self.ports.iter().enumerate() {
            let nodes = cli(*port, &["CLUSTER", "NODES"])?;
            let mine = nodes
                .lines()
                .find(|l| l.contains("myself"))
                .ok_or("no myself line")?;
            let serves = mine.split(' ').skip(8).any(|range| {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
            });
            if serves {
                return Ok(i);
            }
        }
        Err(format!("no node serves slot {slot}").into())
    }

    /// Kill node `i` outright.
    pub fn kill(&mut self, i: usize) -> TestResult {
        self.nodes[i].kill()?;
        self.nodes[i].wait()?;
        Ok(())
    }

    /// Start node `i` again (same port, data and cluster config) and wait until the cluster
    /// is whole.
    pub async fn restart(&mut self, i: usize) -> TestResult {
        let port = self.ports[i];
        self.nodes[i] = Self::spawn_node(&self.data, port, self.persistent)?;
        self.wait_for(port, "PING", "PONG").await?;
        self.wait_for(port, "CLUSTER INFO", "cluster_state:ok")
            .await
    }

    async fn wait_for(&mut self, port: u16, command: &str, expect: &str) -> TestResult {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let out = Command::new("redis-cli")
                .args(["-p", &port.to_string()])
                .args(command.split(' '))
                .output()?;
            if String::from_utf8_lossy(&out.stdout).contains(expect) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("redis node {port}: `{command}` never answered {expect}").into())
    }
}

impl Drop for TestRedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
    }
}

/// A JSON-RPC proxy in front of a node, for watcher tests: it can be down (answers 502), and
/// can refuse `eth_getLogs` over a number of blocks as hosted providers do (0: every one).
pub struct RpcProxy {
    pub url: String,
    pub up: Arc<std::sync::atomic::AtomicBool>,
    pub max_log_blocks: Arc<std::sync::atomic::AtomicU64>,
    /// `eth_getBlockByNumber` of a block number answers `null` (a backend that lags).
    pub missing_blocks: Arc<std::sync::atomic::AtomicBool>,
    /// The `eth_getBlockByNumber` of a block number that comes this many from now (1: the
    /// next) answers another hash (a backend on another fork); 0: none.
    pub other_hash_in: Arc<std::sync::atomic::AtomicU64>,
    /// `eth_getLogs` answers as a backend that lags behind the blocks asked for: none over a
    /// range, an error for a block hash it does not know.
    pub logs_lag: Arc<std::sync::atomic::AtomicBool>,
    /// `eth_getLogs` by block hash answers that the parameter is not taken (`-32602`), as a
    /// node without EIP-234 does.
    pub no_block_hash_filter: Arc<std::sync::atomic::AtomicBool>,
}

impl RpcProxy {
    pub async fn start(upstream: String) -> TestResult<Self> {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let up = Arc::new(AtomicBool::new(true));
        let max_log_blocks = Arc::new(AtomicU64::new(u64::MAX));
        let missing_blocks = Arc::new(AtomicBool::new(false));
        let other_hash_in = Arc::new(AtomicU64::new(0));
        let logs_lag = Arc::new(AtomicBool::new(false));
        let no_block_hash_filter = Arc::new(AtomicBool::new(false));
        let refuse2 = no_block_hash_filter.clone();
        let (up2, max2) = (up.clone(), max_log_blocks.clone());
        let (missing2, other2) = (missing_blocks.clone(), other_hash_in.clone());
        let lag2 = logs_lag.clone();
        let client = reqwest::Client::new();
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move |body: axum::Json<Value>| {
                let (client, upstream) = (client.clone(), upstream.clone());
                let (up, max) = (up2.clone(), max2.load(Ordering::Relaxed));
                let (missing, other) = (missing2.clone(), other2.clone());
                let lag = lag2.load(Ordering::Relaxed);
                let refuse_hash = refuse2.load(Ordering::Relaxed);
                async move {
                    let body = body.0;
                    if !up.load(Ordering::Relaxed) {
                        return (axum::http::StatusCode::BAD_GATEWAY, axum::Json(Value::Null));
                    }
                    let by_number = body["method"] == json!("eth_getBlockByNumber")
                        && body["params"][0].as_str().is_some_and(|b| b.starts_with("0x"));
                    if by_number && missing.load(Ordering::Relaxed) {
                        let none = json!({ "jsonrpc": "2.0", "id": body["id"], "result": null });
                        return (axum::http::StatusCode::OK, axum::Json(none));
                    }
                    let other_hash = by_number
                        && other
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                            == Ok(1);
                    if body["method"] == json!("eth_getLogs")
                        && refuse_hash
                        && body["params"][0]["blockHash"].is_string()
                    {
                        let refusal = json!({
                            "jsonrpc": "2.0", "id": body["id"],
                            "error": { "code": -32602, "message": "invalid params: unknown field `blockHash`" }
                        });
                        return (axum::http::StatusCode::OK, axum::Json(refusal));
                    }
                    if body["method"] == json!("eth_getLogs") && lag {
                        let answer = if body["params"][0]["blockHash"].is_string() {
                            json!({
                                "jsonrpc": "2.0", "id": body["id"],
                                "error": { "code": -32000, "message": "unknown block" }
                            })
                        } else {
                            json!({ "jsonrpc": "2.0", "id": body["id"], "result": [] })
                        };
                        return (axum::http::StatusCode::OK, axum::Json(answer));
                    }
                    if body["method"] == json!("eth_getLogs") {
                        let block = |f: &str| {
                            body["params"][0][f]
                                .as_str()
                                .and_then(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok())
                                .unwrap_or(0)
                        };
                        let span = block("toBlock").saturating_sub(block("fromBlock")) + 1;
                        if span > max {
                            let refusal = json!({
                                "jsonrpc": "2.0", "id": body["id"],
                                "error": { "code": -32005, "message": format!("query exceeds max block range {max}") }
                            });
                            return (axum::http::StatusCode::OK, axum::Json(refusal));
                        }
                    }
                    let mut answer = match client.post(&upstream).json(&body).send().await {
                        Ok(r) => r.json::<Value>().await.unwrap_or(Value::Null),
                        Err(_) => Value::Null,
                    };
                    if other_hash && answer["result"].is_object() {
                        answer["result"]["hash"] = json!(format!("0x{}", "5e".repeat(32)));
                    }
                    (axum::http::StatusCode::OK, axum::Json(answer))
                }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            url,
            up,
            max_log_blocks,
            missing_blocks,
            other_hash_in,
            logs_lag,
            no_block_hash_filter,
        })
    }
}

/// A TLS endpoint in front of a plain TCP one (anvil, redis-server), with a self-signed
/// certificate for `localhost` made by `openssl`: `https://`/`rediss://` to the real thing.
/// Clients trust it through `SSL_CERT_FILE=<cert>`, as an operator's private CA would be.
pub struct TlsForwarder {
    pub port: u16,
    pub cert: PathBuf,
    _dir: TempDir,
}

impl TlsForwarder {
    pub async fn start(upstream: std::net::SocketAddr) -> TestResult<Self> {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let dir = TempDir::new("tls");
        let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
        let out = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=DNS:localhost"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .args(["-addext", "extendedKeyUsage=serverAuth"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .map_err(|e| format!("openssl: {e}"))?;
        if !out.status.success() {
            return Err(format!("openssl: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        let config = tokio_rustls::rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from_pem_file(&cert)?],
                PrivateKeyDer::from_pem_file(&key)?,
            )?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(socket).await else {
                        return;
                    };
                    if let Ok(mut plain) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    }
                });
            }
        });
        Ok(Self {
            port,
            cert,
            _dir: dir,
        })
    }
}

/// A settlement watcher as on a dev chain: every block read as soon as mined and final at once
/// (no confirmations, finality depth 0), from block 0, with its cursor in memory.
pub fn dev_watcher(
    provider: DynProvider,
    chain: &session_paymaster::sponsor::ChainServed,
) -> session_paymaster::chain::watcher::Watcher {
    use session_paymaster::chain::watcher::{Cursor, Finality, Watcher};
    Watcher::new(provider, chain, 0, Some(0), Cursor::memory()).with_finality(Finality::Depth(0))
}
