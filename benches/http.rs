//! The service as a client meets it: JSON-RPC over real HTTP, budgets in a real Redis, driven
//! by a real load generator (`wrk`, one thread, 64 connections, every body a distinct
//! operation). CPU is read from `/proc` for the service and for redis-server before and after
//! each load, and printed per sponsorship as a ratio to two limits measured in the same run:
//! one bare k256 signature (F, the stock k256 signature issue 13 measures against; both the
//! service's and redis-server's CPU are given in F; measured just before and just after each
//! load, whose row uses their mean, since a shared machine's speed drifts by a third within a
//! run; the service's own signature, k256's with its nonce inverted faster since 0.3.19, is
//! about 0.8 F, and the `limits` line gives it as this bench's build makes it) and one
//! bare `EVALSHA` of an empty script under the same kind of load (redis-server's floor per
//! script call, also given as its own ratio).
//! Latency at half the measured maximum comes from an open-loop schedule (requests are sent
//! at fixed times whatever the answers do, and latency counts from the planned send time, so
//! a stall is not hidden by the generator waiting for it), with three controls at the same
//! rate: `eth_chainId`, a server in this process that only spins for a sponsorship's CPU
//! ([`Burner`]), and the embedded default (no Redis).
//!
//! Loads, in order (`ONLY=name,...` picks some): `chainid`, `sponsor` (closed loop, Redis
//! budgets), `open` (the open loop and its controls), `session` (under session grants; then
//! the paths under and without sessions, each an open loop at one rate: `SAME_RATE` of the
//! session load's req/s, default 0.6), `pimlico` (ERC-7677 `pm_getPaymasterData`, ours and
//! `@pimlico/mock-paymaster`'s, the same bodies; skipped without node), `embedded` (the
//! embedded default before and after a fill). Knobs (environment): `SECS` per load (default
//! 8), `GRANTS` (session grants created before the session load, default 20000),
//! `MEMORY_FILL` (sponsorships made on the embedded default before its second window, default
//! 200000), `RATE` (the `open` load's rate; default half of what `sponsor` reached),
//! `SAME_RATE`, `DEBUG_STALLS` (print each open-loop answer over 10 ms with its due time and
//! wall-clock time, to see whether slow answers come in bursts), `COMMANDS=1` (print, under
//! each row with Redis, the commands redis-server ran per request and their µs, from `INFO
//! commandstats`: how much of its CPU the scripts and the commands took, the rest being its
//! sockets and event loop; see `command_lines`), `COPIES` (the service's `--session-copies`),
//! `GRANTS_AT=other` (the grants created at another replica, so that this one reads each from
//! Redis first: without it, the replica that created them holds copies), `SETTLE` (seconds to
//! wait after the grants are created), `COUNT=instructions` (the service runs under valgrind's
//! callgrind, and each row adds the thousands of instructions it ran per request: the same from
//! run to run where its CPU time moves by a tenth, so two builds compare to a percent; its CPU
//! columns are then callgrind's, about fifty times slower: use `GRANTS=2000` or so; with
//! `KEEP_DUMPS=1` callgrind's dumps stay for `callgrind_annotate`). Run with `scripts/bench`.
//! Asserts nothing; prints one table and one `BENCH_JSON` line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, keccak256};
use k256::ecdsa::SigningKey;
use serde_json::{Value, json};
use session_paymaster::signer::{KeySource, Signer};
use sha2::Digest;

mod common;

type Error = Box<dyn std::error::Error + Send + Sync>;

const CONNECTIONS: u32 = 64;
const ADMIN_TOKEN: &str = "bench-admin-token";
const SIGNER_KEY: &str = "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318";
const PAYMASTER: &str = "0x7777777777777777777777777777777777777777";
const ENTRY_POINT_V07: &str = "0x0000000071727De22E5E9d8BAf0edAc6f37da032";
/// The chain the bench's policy, the service's default and the comparison's anvil share.
const CHAIN_ID: u64 = 31337;

/// The bench's policy: sender, policy and session budgets large enough never to refuse, so
/// every request is a full signed, budgeted sponsorship.
const POLICY: &str = r#"
id = "bench"
chains = [31337]
entry_points = ["0.7"]
max_validity = "10m"

[per_op]
max_cost = "0.05 ether"

[budgets]
session = { cost = "1000000 ether", ops = 1000000 }
sender  = { cost = "1000000 ether", ops = 1000000, period = "1d" }
policy  = { cost = "100000000 ether", period = "30d" }

[[allow]]
target = "0xCF3b87F3D9d62cdF4723D97D8139156c6b2AB4B3"
functions = ["increment()"]
"#;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v: &f64| v.is_finite() && *v > 0.0)
        .unwrap_or(default)
}

fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A child process killed when dropped.
struct Proc(Child);

/// Whether `proc` listens on `port` within `within` (false: it exited, or never did).
fn listening(proc: &mut Proc, port: u16, within: Duration) -> Result<bool, Error> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(true);
        }
        if proc.0.try_wait()?.is_some() {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(false)
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// CPU time (user + system, every thread) the process has used so far.
    fn cpu(&self) -> Result<Duration, Error> {
        cpu_of(&self.0.id().to_string())
    }

    /// Resident memory (bytes, `VmRSS` of `/proc/<pid>/status`).
    fn rss(&self) -> Result<i64, Error> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.id()))?;
        let kib: i64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or("no VmRSS")?;
        Ok(kib * 1024)
    }
}

/// CPU time of process `pid` (`self`: this one) from `/proc/<pid>/stat`.
fn cpu_of(pid: &str) -> Result<Duration, Error> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at its closing ')'.
    let rest = stat.rsplit_once(')').ok_or("odd /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks()?))
}

/// Clock ticks per second of `/proc` times (`getconf CLK_TCK`, read once).
fn clock_ticks() -> Result<f64, Error> {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    if let Some(t) = TICKS.get() {
        return Ok(*t);
    }
    let out = Command::new("getconf").arg("CLK_TCK").output()?;
    let t: f64 = String::from_utf8(out.stdout)?.trim().parse()?;
    Ok(*TICKS.get_or_init(|| t))
}

/// One load's outcome.
#[derive(Debug, Default, Clone)]
struct Load {
    requests: u64,
    errors: u64,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    service_cpu: Duration,
    redis_cpu: Duration,
    /// CPU of the load generator in this process (the open loop; wrk runs apart).
    generator_cpu: Duration,
    redis_bytes: i64,
    /// Reads redis-server made off its sockets (`total_reads_processed`): below one per request
    /// when the service's commands reach it several to a read (pipelined on its connection).
    redis_reads: u64,
    /// `FCALL`s redis-server ran (`INFO commandstats`): the ledger's calls, several
    /// sponsorships of a policy to a call under load (`ledger::batch`).
    redis_fcalls: u64,
    /// F measured just before and just after this load (their mean): the ratios of this row
    /// are to it, so that the machine's speed drifting over a run moves both sides alike.
    floor: Duration,
    /// `COMMANDS`: the lines printed under this row (see `command_lines`).
    commands: Vec<String>,
    /// `COUNT=instructions`: the service's instructions per request it answered (of those the
    /// service answered, by its metrics, which a closed loop's count misses the last few of).
    service_instructions: Option<f64>,
}

impl Load {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.secs
    }
    fn per_request(&self, cpu: Duration) -> Duration {
        cpu / u32::try_from(self.requests.max(1)).unwrap_or(u32::MAX)
    }
    fn reads_per_request(&self) -> f64 {
        (self.redis_reads as f64 / self.requests.max(1) as f64 * 100.0).round() / 100.0
    }
    /// Requests per `FCALL` (0 without one).
    fn requests_per_fcall(&self) -> f64 {
        if self.redis_fcalls == 0 {
            return 0.0;
        }
        (self.requests as f64 / self.redis_fcalls as f64 * 10.0).round() / 10.0
    }
    fn json(&self, evalsha: Duration) -> Value {
        let floor = self.floor;
        let us = |d: Duration| (d.as_secs_f64() * 1e7).round() / 10.0;
        json!({
            "requests": self.requests, "errors": self.errors, "rps": self.rate().round(),
            "p50_us": self.p50_us, "p99_us": self.p99_us, "p999_us": self.p999_us,
            "service_cpu_us": us(self.per_request(self.service_cpu)),
            "service_cpu_x_floor": ratio(self.per_request(self.service_cpu), floor),
            "redis_cpu_us": us(self.per_request(self.redis_cpu)),
            "redis_cpu_x_floor": ratio(self.per_request(self.redis_cpu), floor),
            "redis_cpu_x_evalsha": ratio(self.per_request(self.redis_cpu), evalsha),
            "redis_bytes_per_request": self.redis_bytes / i64::try_from(self.requests.max(1)).unwrap_or(1),
            "redis_reads_per_request": self.reads_per_request(),
            "requests_per_fcall": self.requests_per_fcall(),
            "generator_cpu_us": us(self.per_request(self.generator_cpu)),
            "floor_k256_us": us(floor),
            "service_instructions_per_request": self.service_instructions.map(f64::round),
        })
    }
}

/// `a / b`, two decimals; NaN (`null` in JSON) when `b` was not measured.
fn ratio(a: Duration, b: Duration) -> f64 {
    if b.is_zero() {
        return f64::NAN;
    }
    (a.as_secs_f64() / b.as_secs_f64() * 100.0).round() / 100.0
}

/// F: median over batches of one bare k256 recoverable signature of a prehash. Measured
/// just before and just after each load (a row's ratios are to their mean: a shared machine's
/// speed drifts within a run), and at the start, between the loads and at the end for the
/// `limits` line (the median of those three).
fn k256_floor() -> Result<Duration, Error> {
    let key = SigningKey::from_slice(keccak256("bench key").as_slice())?;
    per_signature(|hash| {
        std::hint::black_box(key.sign_prehash_recoverable(hash.as_slice()).ok());
    })
}

/// The service's own signature (`Signer::sign_eip191`: the EIP-191 hash, then k256's signature
/// with the nonce inverted faster, `signer::ecdsa`), measured as F is, right after it, for the
/// `limits` line: what of a sponsorship's CPU is its signature, in F. It is the code this bench
/// was built with, in its own process: not the service binary a load measures, which an A/B of
/// two builds swaps.
fn bench_build_signature() -> Result<Duration, Error> {
    let signer = Signer::load(KeySource::Ephemeral)?;
    per_signature(|hash| {
        std::hint::black_box(signer.sign_eip191(hash).ok());
    })
}

/// Median over nine batches of 2,000 calls of `sign` with distinct hashes: CPU time of this
/// thread per call.
fn per_signature(mut sign: impl FnMut(B256)) -> Result<Duration, Error> {
    let mut batches: Vec<Duration> = (0..9)
        .map(|i| {
            // CPU time of this thread, like the /proc times it is compared with (a wall clock
            // would count the time the scheduler gave others).
            let start = thread_cpu()?;
            for j in 0..2_000u32 {
                sign(keccak256([i as u8, (j >> 8) as u8, j as u8]));
            }
            Ok((thread_cpu()? - start) / 2_000)
        })
        .collect::<Result<_, Error>>()?;
    batches.sort();
    Ok(batches[4])
}

/// CPU time of the calling thread (nanoseconds, from `/proc/thread-self/schedstat`).
fn thread_cpu() -> Result<Duration, Error> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    let ns: u64 = stat
        .split_whitespace()
        .next()
        .ok_or("empty schedstat")?
        .parse()?;
    Ok(Duration::from_nanos(ns))
}

/// The bench's redis-server (see `common::RedisServer`), with what the loads read of it.
struct Redis(common::RedisServer);

impl Redis {
    fn start() -> Result<Self, Error> {
        common::RedisServer::start().map(Self)
    }

    fn url(&self) -> String {
        self.0.url()
    }

    fn cli(&self, args: &[&str]) -> Result<String, Error> {
        self.0.cli(args)
    }

    fn cpu(&self) -> Result<Duration, Error> {
        cpu_of(&self.0.pid().to_string())
    }

    fn used_memory(&self) -> Result<i64, Error> {
        self.info_field("memory", "used_memory")
    }

    fn fcalls(&self) -> Result<u64, Error> {
        let stats = self.cli(&["INFO", "commandstats"])?;
        Ok(stats
            .lines()
            .find_map(|l| {
                l.strip_prefix("cmdstat_fcall:calls=")?
                    .split(',')
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0))
    }

    /// `INFO commandstats`: per command, its calls and microseconds so far.
    fn command_stats(&self) -> Result<Vec<(String, u64, u64)>, Error> {
        let stats = self.cli(&["INFO", "commandstats"])?;
        Ok(stats
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let field = |f: &str| -> Option<u64> {
                    rest.split(',')
                        .find_map(|kv| kv.strip_prefix(f)?.parse().ok())
                };
                Some((name.to_owned(), field("calls=")?, field("usec=")?))
            })
            .collect())
    }

    fn reads(&self) -> Result<u64, Error> {
        Ok(u64::try_from(
            self.info_field("stats", "total_reads_processed")?,
        )?)
    }

    fn info_field(&self, section: &str, field: &str) -> Result<i64, Error> {
        let info = self.cli(&["INFO", section])?;
        info.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .ok_or_else(|| format!("no {field} in INFO {section}"))?
            .trim()
            .parse()
            .map_err(Into::into)
    }

    /// The Redis limit: redis-server CPU per `EVALSHA` of an empty script, driven by
    /// `redis-benchmark` with as many connections as the HTTP loads use.
    fn evalsha_floor(&self) -> Result<Duration, Error> {
        let sha = self.cli(&["SCRIPT", "LOAD", "return 1"])?;
        let n = 200_000u32;
        let before = self.cpu()?;
        let status = Command::new("redis-benchmark")
            .args([
                "-p",
                &self.0.port().to_string(),
                "-c",
                &CONNECTIONS.to_string(),
            ])
            .args(["-n", &n.to_string(), "-q", "EVALSHA", &sha, "0"])
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            return Err("redis-benchmark failed".into());
        }
        Ok((self.cpu()? - before) / n)
    }
}

struct Service {
    proc: Proc,
    port: u16,
    /// `COUNT=instructions`: the service's count under callgrind.
    counted: Option<Counted>,
}

/// Where callgrind writes the service's dumps, and the instructions those read so far held.
struct Counted {
    dir: PathBuf,
    total: std::cell::Cell<u64>,
}

impl Drop for Service {
    /// Under `COUNT=instructions`, callgrind's dumps go with the service, unless `KEEP_DUMPS`
    /// asks to read them (`callgrind_annotate`): each load's is the dump taken after it.
    fn drop(&mut self) {
        if let Some(Counted { dir, .. }) = &self.counted {
            let _ = self.proc.0.kill();
            let _ = self.proc.0.wait();
            if std::env::var_os("KEEP_DUMPS").is_some() {
                eprintln!("callgrind's dumps of the service: {}", dir.display());
            } else {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// Whether `COUNT=instructions` runs the service under callgrind.
fn counting_instructions() -> bool {
    std::env::var("COUNT").is_ok_and(|v| v == "instructions")
}

impl Service {
    fn start(policies: &Path, redis: Option<&Redis>) -> Result<Self, Error> {
        let port = free_port()?;
        let token_hash = hex::encode(sha2::Sha256::digest(ADMIN_TOKEN));
        let bin = env!("CARGO_BIN_EXE_session-paymaster");
        let counted = if counting_instructions() {
            for tool in ["valgrind", "callgrind_control"] {
                if Command::new("which").arg(tool).output()?.stdout.is_empty() {
                    return Err(format!(
                        "COUNT=instructions needs {tool} (Debian package valgrind)"
                    )
                    .into());
                }
            }
            // Made here, not found (`create_dir` fails on anything already there): no one
            // else's files or links among the dumps.
            let dir = std::env::temp_dir()
                .join(format!("sp-bench-callgrind-{}-{port}", std::process::id()));
            std::fs::create_dir(&dir)?;
            Some(Counted {
                dir,
                total: std::cell::Cell::new(0),
            })
        } else {
            None
        };
        let mut cmd = match &counted {
            Some(Counted { dir, .. }) => {
                let mut cmd = Command::new("valgrind");
                cmd.arg("--tool=callgrind")
                    .arg(format!("--callgrind-out-file={}/cg.out", dir.display()))
                    .arg(format!("--log-file={}/valgrind.log", dir.display()))
                    .arg(bin);
                cmd
            }
            None => Command::new(bin),
        };
        cmd.arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--policies", &policies.display().to_string()])
            .args(["--paymaster-v07", PAYMASTER])
            .args(["--signer-key-env", "SP_BENCH_SIGNER_KEY"])
            .args(["--admin-token-sha256", &token_hash])
            .args(["--redis-timeout", "2s"])
            .env("SP_BENCH_SIGNER_KEY", SIGNER_KEY)
            .env(
                "SP_LOG",
                std::env::var("SP_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(redis) = redis {
            cmd.args(["--redis-url", &redis.url(), "--no-settlement"]);
        }
        if let Ok(copies) = std::env::var("COPIES") {
            cmd.args(["--session-copies", &copies]);
        }
        let mut service = Self {
            proc: Proc(cmd.spawn()?),
            port,
            counted,
        };
        let within = Duration::from_secs(if service.counted.is_some() { 120 } else { 10 });
        if listening(&mut service.proc, port, within)? {
            return Ok(service);
        }
        Err("the service did not start".into())
    }

    /// `COUNT=instructions`: the instructions the service has run so far (callgrind's dump,
    /// taken now, added to the dumps before), once it has answered every request it took (its
    /// `sp_requests_total` still for half a second), with that count of requests; `None` when
    /// not counting.
    fn instructions(&self) -> Result<Option<(u64, u64)>, Error> {
        let Some(Counted { dir, total }) = &self.counted else {
            return Ok(None);
        };
        let mut requests = self.requests_answered()?;
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let now = self.requests_answered()?;
            if now == requests {
                break;
            }
            requests = now;
        }
        let before = std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<Vec<_>, _>>()?;
        let done = Command::new("callgrind_control")
            .args(["-d", &self.proc.0.id().to_string()])
            .output()?;
        if !done.status.success() {
            return Err(format!(
                "callgrind_control failed: {}",
                String::from_utf8_lossy(&done.stderr)
            )
            .into());
        }
        for _ in 0..600 {
            for entry in std::fs::read_dir(dir)? {
                let name = entry?.file_name();
                if before.contains(&name) || !name.to_string_lossy().starts_with("cg.out") {
                    continue;
                }
                // A dump's `totals:` line ends it: read once it is there, whole.
                let text = std::fs::read_to_string(dir.join(&name))?;
                let whole = text.ends_with('\n');
                if let Some(n) = text.lines().find_map(|l| l.strip_prefix("totals:"))
                    && whole
                {
                    total.set(total.get() + n.trim().parse::<u64>()?);
                    return Ok(Some((total.get(), requests)));
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err("callgrind wrote no whole dump of the service in 60 s".into())
    }

    /// The requests the service has answered (the sum of its `sp_requests_total`), read with
    /// a plain HTTP/1.0 GET (the loads' own clients are async).
    fn requests_answered(&self) -> Result<u64, Error> {
        use std::io::Read;
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        let mut sum = 0.0;
        for line in text.lines().filter(|l| l.starts_with("sp_requests_total")) {
            sum += line
                .rsplit_once(' ')
                .ok_or("odd metrics line")?
                .1
                .parse::<f64>()?;
        }
        Ok(sum as u64)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }
}

/// @pimlico/mock-paymaster (`benches/pimlico/serve.mjs`) over an anvil of its own: the same
/// load's comparison. Its CPU per request is node's and anvil's together (its handler asks
/// anvil for `getHash` and the chain id on every request).
struct MockPaymaster {
    node: Proc,
    anvil: Proc,
    port: u16,
}

impl MockPaymaster {
    /// Started, or why not: a missing tool or a mock that does not come up is a skipped row
    /// (said so), not a failed bench.
    fn start() -> Result<Result<Self, String>, Error> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let anvil_bin = root.join("contracts/node_modules/.bin/anvil");
        let serve = root.join("benches/pimlico/serve.mjs");
        if Command::new("which")
            .arg("node")
            .output()?
            .stdout
            .is_empty()
        {
            return Ok(Err("node is not installed".into()));
        }
        let package =
            root.join("benches/pimlico/node_modules/@pimlico/mock-paymaster/package.json");
        for needed in [&anvil_bin, &package] {
            if !needed.exists() {
                return Ok(Err(format!(
                    "{} is missing (scripts/bench installs it)",
                    needed.display()
                )));
            }
        }
        let anvil_port = free_port()?;
        let mut anvil = Proc(
            Command::new(&anvil_bin)
                .args(["--port", &anvil_port.to_string()])
                .args(["--chain-id", &CHAIN_ID.to_string(), "--silent"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        if !listening(&mut anvil, anvil_port, Duration::from_secs(20))? {
            return Ok(Err("anvil did not start".into()));
        }
        let port = free_port()?;
        let mut node = Proc(
            Command::new("node")
                .arg(&serve)
                .args([format!("http://127.0.0.1:{anvil_port}"), port.to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?,
        );
        let stdout = node.0.stdout.take().ok_or("no stdout of node")?;
        // `ready <paymaster>` once it deployed its paymaster and listens; its stdout is then
        // drained for as long as it runs (the mock logs each failed request there, and writing
        // to a closed pipe would end it).
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
            let first = lines.next().and_then(Result::ok).unwrap_or_default();
            let _ = ready_tx.send(first);
            for _ in lines.map_while(Result::ok) {}
        });
        match ready.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.starts_with("ready ") => {}
            Ok(line) => return Ok(Err(format!("the mock did not start: {line:?}"))),
            Err(_) => return Ok(Err("the mock did not start within 60 s".into())),
        }
        if !listening(&mut node, port, Duration::from_secs(10))? {
            return Ok(Err("the mock does not listen".into()));
        }
        Ok(Ok(Self { node, anvil, port }))
    }

    fn cpu(&self) -> Result<Duration, Error> {
        Ok(self.node.cpu()? + self.anvil.cpu()?)
    }
}

/// The JSON-RPC body of a sponsorship, as a Lua `string.format` template (`0x%s` the sender's
/// 40 hex digits, `0x%x` the nonce, `%s` the context object) and the order of those three
/// (`sender`, `nonce`, `ctx`) in it.
struct Template {
    format: String,
    order: Vec<&'static str>,
}

fn sponsorship_template() -> Result<Template, Error> {
    op_template("pm_sponsorUserOperation", |op| {
        json!([op, ENTRY_POINT_V07, "CONTEXT"])
    })
}

/// ERC-7677's final data for the same operation: what a wallet asks any paymaster, ours or
/// @pimlico/mock-paymaster.
fn paymaster_data_template() -> Result<Template, Error> {
    op_template("pm_getPaymasterData", |op| {
        json!([op, ENTRY_POINT_V07, format!("{CHAIN_ID:#x}"), "CONTEXT"])
    })
}

/// A body of `method` whose params `params` makes of the operation.
fn op_template(method: &str, params: impl FnOnce(Value) -> Value) -> Result<Template, Error> {
    let op = common::counter_op(Address::repeat_byte(0x11), 7);
    let mut op = op.to_json();
    op["sender"] = json!("SENDER");
    op["nonce"] = json!("NONCE");
    let body = json!({
        "jsonrpc": "2.0", "id": 1, "method": method,
        "params": params(op),
    })
    .to_string()
    .replace('%', "%%");
    let mut order = [
        ("\"SENDER\"", "sender"),
        ("\"NONCE\"", "nonce"),
        ("\"CONTEXT\"", "ctx"),
    ]
    .map(|(token, name)| (body.find(token).unwrap_or(usize::MAX), name));
    order.sort();
    Ok(Template {
        format: body
            .replace("\"SENDER\"", "\"0x%s\"")
            .replace("\"NONCE\"", "\"0x%x\"")
            .replace("\"CONTEXT\"", "%s"),
        order: order.iter().map(|(_, name)| *name).collect(),
    })
}

impl Template {
    /// The body of operation `i` (what the Lua script sends), for the open-loop generator.
    fn body(&self, i: u64, grants: u64) -> String {
        let (sender, ctx) = op_of(i, grants);
        let mut out = self.format.clone();
        for name in &self.order {
            let (spec, value) = match *name {
                "sender" => ("%s", sender.clone()),
                "nonce" => ("%x", format!("{i:x}")),
                _ => ("%s", ctx.clone()),
            };
            if let Some(at) = out.find(spec) {
                out.replace_range(at..at + 2, &value);
            }
        }
        out.replace("%%", "%")
    }

    /// A template of a fixed body (no operation in it).
    fn fixed(body: &str) -> Self {
        Self {
            format: body.replace('%', "%%"),
            order: Vec::new(),
        }
    }
}

/// Sender and context of operation `i`: without grants, sender `i` under the named policy;
/// with `grants`, the session `i % grants` (its account is the sender).
const LUA_OP: &str = r#"
function op(i)
  if grants > 0 then
    local g = i % grants + 1
    return string.format("%040x", g), string.format('{"sessionId":"0x%064x"}', g)
  end
  return string.format("%040x", i), '{"sponsorshipPolicyId":"bench"}'
end
"#;

/// Drive `url` with wrk for `secs`, each request operation `base + n` (n counting from 1).
fn wrk(url: &str, body: &Template, base: u64, grants: u64, secs: u64) -> Result<Load, Error> {
    let script = std::env::temp_dir().join(format!("sp-bench-{}.lua", std::process::id()));
    let mut f = std::fs::File::create(&script)?;
    writeln!(f, "local template = [==[{}]==]", body.format)?;
    let args: String = body.order.iter().map(|a| format!(", {a}")).collect();
    writeln!(
        f,
        "function fill(sender, nonce, ctx) return string.format(template{args}) end"
    )?;
    writeln!(f, "base = {base}\ngrants = {grants}\n{LUA_OP}")?;
    f.write_all(
        br#"
local n = 0
local threads = {}
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
function setup(thread) table.insert(threads, thread) end
function init(args) errors = 0 end
function request()
  n = n + 1
  local sender, ctx = op(base + n)
  return wrk.format(nil, nil, nil, fill(sender, base + n, ctx))
end
function response(status, headers, body)
  if status ~= 200 or string.find(body, '"error"', 1, true) then errors = errors + 1 end
end
-- Errors: answers counted by response() (not 200, or a JSON-RPC error) plus failed sockets
-- (not wrk's status count: response() has those). One thread (-t1), so threads[1] has them all.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCH {"requests":%d,"errors":%d,"secs":%f,"p50":%d,"p99":%d,"p999":%d}\n',
    summary.requests, threads[1]:get("errors") + e.connect + e.read + e.write + e.timeout,
    summary.duration / 1e6, latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#,
    )?;
    drop(f);
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{CONNECTIONS}"),
            &format!("-d{secs}s"),
            "--timeout",
            "10s",
        ])
        .arg("-s")
        .arg(&script)
        .arg(url)
        .output()?;
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8(out.stdout)?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("BENCH "))
        .ok_or_else(|| {
            format!(
                "wrk printed no result: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let v: Value = serde_json::from_str(line)?;
    Ok(Load {
        requests: v["requests"].as_u64().unwrap_or(0),
        errors: v["errors"].as_u64().unwrap_or(0),
        secs: v["secs"].as_f64().unwrap_or(1.0),
        p50_us: v["p50"].as_f64().unwrap_or(0.0),
        p99_us: v["p99"].as_f64().unwrap_or(0.0),
        p999_us: v["p999"].as_f64().unwrap_or(0.0),
        ..Load::default()
    })
}

/// Open-loop load, as wrk2 makes it: request `k` is due at `start + k / rate`, whatever earlier
/// answers do; each of `CONNECTIONS` kept-alive connections takes the next due request when it
/// is free, and a request's latency counts from its due time (so time spent waiting for a free
/// connection behind a stall counts too). Raw HTTP/1.1 on a thread of its own, to cost the
/// machine as little as wrk does; the load's `generator_cpu` is that thread's CPU.
fn open_loop(
    port: u16,
    body: &Template,
    base: u64,
    grants: u64,
    rate: f64,
    secs: u64,
) -> Result<Load, Error> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let t0 = thread_cpu()?;
            let mut load = open_loop_here(port, body, base, grants, rate, secs)?;
            load.generator_cpu = thread_cpu()? - t0;
            Ok(load)
        })
        .join()
        .unwrap_or_else(|_| Err("the open-loop thread panicked".into()))
    })
}

fn open_loop_here(
    port: u16,
    body: &Template,
    base: u64,
    grants: u64,
    rate: f64,
    secs: u64,
) -> Result<Load, Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let total = (rate * secs as f64) as u64;
    let next = Arc::new(AtomicU64::new(0));
    let debug_stalls = std::env::var("DEBUG_STALLS").is_ok();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let per_connection = runtime.block_on(async {
        let start = tokio::time::Instant::now() + Duration::from_millis(20);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..CONNECTIONS {
            let next = next.clone();
            let format = body.format.clone();
            let order = body.order.clone();
            tasks.spawn(async move {
                let template = Template { format, order };
                let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                stream.set_nodelay(true)?;
                let (mut latencies, mut errors) = (Vec::new(), 0u64);
                let mut buf = Vec::with_capacity(4096);
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= total {
                        return Ok::<_, std::io::Error>((latencies, errors));
                    }
                    let due = start + Duration::from_secs_f64(k as f64 / rate);
                    tokio::time::sleep_until(due).await;
                    let payload = template.body(base + k + 1, grants);
                    let request = format!(
                        "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
                        payload.len()
                    );
                    stream.write_all(request.as_bytes()).await?;
                    // Read the head, then the body its Content-Length announces.
                    buf.clear();
                    let (head_end, length) = loop {
                        let mut chunk = [0u8; 4096];
                        let n = stream.read(&mut chunk).await?;
                        if n == 0 {
                            return Err(std::io::ErrorKind::UnexpectedEof.into());
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..at]).to_ascii_lowercase();
                            let length = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (at + 4, length);
                        }
                    };
                    while buf.len() < head_end + length {
                        let mut chunk = [0u8; 4096];
                        let n = stream.read(&mut chunk).await?;
                        if n == 0 {
                            return Err(std::io::ErrorKind::UnexpectedEof.into());
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    latencies.push(due.elapsed());
                    if debug_stalls && due.elapsed() > Duration::from_millis(10) {
                        eprintln!(
                            "stall {:?} at {:?} (unix {:.3})",
                            due.elapsed(),
                            due - start,
                            std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0.0, |d| d.as_secs_f64())
                        );
                    }
                    let ok = buf.starts_with(b"HTTP/1.1 200")
                        && !String::from_utf8_lossy(&buf[head_end..]).contains("\"error\"");
                    if !ok {
                        errors += 1;
                    }
                }
            });
        }
        let mut all = Vec::new();
        while let Some(r) = tasks.join_next().await {
            all.push(r);
        }
        all
    });
    let mut latencies = Vec::with_capacity(total as usize);
    let mut errors = 0;
    for r in per_connection {
        let (l, e) = r??;
        latencies.extend(l);
        errors += e;
    }
    latencies.sort();
    if latencies.is_empty() {
        return Err("the open-loop load sent nothing".into());
    }
    let at = |q: f64| {
        latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)].as_secs_f64()
            * 1e6
    };
    Ok(Load {
        requests: latencies.len() as u64,
        errors,
        secs: started.elapsed().as_secs_f64(),
        p50_us: at(0.50),
        p99_us: at(0.99),
        p999_us: at(0.999),
        ..Load::default()
    })
}

/// The open loop's control for the machine: an HTTP server in this process (two tokio workers,
/// like the service on two cores) that spins for `spin` before every answer (the service's and
/// redis-server's CPU per sponsorship together; wall-clock time, so a worker preempted
/// meanwhile burns less), then answers a body of a sponsorship's size. Its latency at the
/// same rate is what this machine gives a server that costs about as much, whatever its code.
/// Stops when dropped.
struct Burner {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Burner {
    fn start(spin: Duration) -> Result<Self, Error> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let answer = format!(
            r#"{{"jsonrpc":"2.0","id":1,"result":{{"paymasterAndData":"0x{}"}}}}"#,
            "ab".repeat(250)
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let registered = {
            let _in = runtime.enter();
            tokio::net::TcpListener::from_std(listener)
        };
        let listener = match registered {
            Ok(l) => l,
            Err(e) => {
                // Dropped here, inside the bench's own runtime, it would panic.
                runtime.shutdown_background();
                return Err(e.into());
            }
        };
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let app = axum::Router::new().route(
                    "/",
                    axum::routing::post(move |_body: axum::body::Bytes| {
                        let answer = answer.clone();
                        async move {
                            let until = Instant::now() + spin;
                            while Instant::now() < until {
                                std::hint::spin_loop();
                            }
                            ([("content-type", "application/json")], answer)
                        }
                    }),
                );
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
                if let Err(e) = served {
                    eprintln!("the control server stopped: {e}");
                }
            });
        });
        Ok(Self {
            port,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Burner {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `LUA_OP` in Rust, for the open-loop generator.
fn op_of(i: u64, grants: u64) -> (String, String) {
    if grants > 0 {
        let g = i % grants + 1;
        (
            format!("{g:040x}"),
            format!("{{\"sessionId\":\"0x{g:064x}\"}}"),
        )
    } else {
        (
            format!("{i:040x}"),
            "{\"sponsorshipPolicyId\":\"bench\"}".into(),
        )
    }
}

/// Run `load` and add the CPU the service and redis-server used meanwhile, and Redis' growth.
fn measured(
    service: &Service,
    redis: Option<&Redis>,
    load: impl FnOnce() -> Result<Load, Error>,
) -> Result<Load, Error> {
    bracketed(|| {
        let svc0 = service.proc.cpu()?;
        let (r0, m0, reads0, fcalls0) = match redis {
            Some(r) => (r.cpu()?, r.used_memory()?, r.reads()?, r.fcalls()?),
            None => (Duration::ZERO, 0, 0, 0),
        };
        let commands = std::env::var_os("COMMANDS").is_some_and(|v| !v.is_empty() && v != "0");
        let stats0 = match redis {
            Some(r) if commands => r.command_stats()?,
            _ => Vec::new(),
        };
        let counted0 = service.instructions()?;
        let mut load = load()?;
        if let (Some((i0, n0)), Some((i1, n1))) = (counted0, service.instructions()?) {
            let answered = n1.saturating_sub(n0);
            if answered == 0 {
                return Err(
                    "the service answered no request of the load (COUNT=instructions)".into(),
                );
            }
            load.service_instructions = Some((i1 - i0) as f64 / answered as f64);
        }
        load.service_cpu = service.proc.cpu()? - svc0;
        if let Some(r) = redis {
            load.redis_cpu = r.cpu()? - r0;
            load.redis_bytes = r.used_memory()? - m0;
            load.redis_reads = r
                .reads()?
                .checked_sub(reads0)
                .ok_or("redis-server's read count went back during a load (restarted?)")?;
            load.redis_fcalls = r.fcalls()?.saturating_sub(fcalls0);
            if commands {
                load.commands = command_lines(&stats0, &r.command_stats()?, &load);
            }
        }
        Ok(load)
    })
}

/// `COMMANDS`: the commands redis-server ran during a load (`INFO commandstats` before and
/// after, the `INFO` and `CLIENT` calls of the bench itself left out), each with its calls and
/// µs per request and µs per call, then two sums per request: the script calls (`FCALL`,
/// `EVALSHA`, `EVAL`: their µs include the commands they ran, which are listed too) and every
/// other command (the grant `GET`s sent alone, say, are among the `get`s listed, but counted
/// here), against redis-server's CPU per request. Commandstats' µs are wall time inside the
/// command: on a busy machine a command preempted meanwhile counts more than its CPU.
fn command_lines(
    before: &[(String, u64, u64)],
    after: &[(String, u64, u64)],
    load: &Load,
) -> Vec<String> {
    let n = load.requests.max(1) as f64;
    let (mut scripts, mut nested_or_alone) = (0.0, 0.0);
    let mut lines: Vec<(f64, String)> = Vec::new();
    for (name, calls, usec) in after {
        let (c0, u0) = before
            .iter()
            .find(|(b, ..)| b == name)
            .map_or((0, 0), |(_, c, u)| (*c, *u));
        let (calls, usec) = (calls.saturating_sub(c0), usec.saturating_sub(u0));
        if calls == 0 || name == "info" || name.starts_with("client") {
            continue;
        }
        let per_request = usec as f64 / n;
        lines.push((
            per_request,
            format!(
                "    {name:<20} {:>6.2} calls per request, {:>7.2} µs per call, {:>6.2} µs per request",
                calls as f64 / n,
                usec as f64 / calls as f64,
                per_request
            ),
        ));
        if matches!(name.as_str(), "fcall" | "evalsha" | "eval") {
            scripts += per_request;
        } else {
            nested_or_alone += per_request;
        }
    }
    // The costliest first.
    lines.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut lines: Vec<String> = lines.into_iter().map(|(_, line)| line).collect();
    lines.push(format!(
        "    per request: redis-server CPU {:.1} µs; script calls {scripts:.1} µs (with the commands they ran); the other commands listed {nested_or_alone:.1} µs (run by the scripts, or alone)",
        load.per_request(load.redis_cpu).as_secs_f64() * 1e6
    ));
    lines
}

/// Run `load` between two measurements of F: its ratios are to their mean (measured outside
/// the CPU the load reads).
fn bracketed(load: impl FnOnce() -> Result<Load, Error>) -> Result<Load, Error> {
    let before = k256_floor()?;
    let mut load = load()?;
    load.floor = (before + k256_floor()?) / 2;
    Ok(load)
}

/// The service's `sp_session_grant_reads_total` so far: (from copies, from the store).
async fn grant_reads(service: &Service) -> Result<(u64, u64), Error> {
    let text = reqwest::get(format!("{}metrics", service.url()))
        .await?
        .text()
        .await?;
    let count = |source: &str| {
        let prefix = format!("sp_session_grant_reads_total{{source=\"{source}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .map_or(Ok(0), str::parse)
    };
    Ok((count("copy")?, count("store")?))
}

/// Create grants `1..=n`: session `g` for account `g`, under the bench policy.
async fn create_grants(service: &Service, n: u64) -> Result<(), Error> {
    let client = reqwest::Client::new();
    let url = format!("{}admin/sessions", service.url());
    let next = Arc::new(AtomicU64::new(1));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let (client, url, next) = (client.clone(), url.clone(), next.clone());
        workers.spawn(async move {
            loop {
                let g = next.fetch_add(1, Ordering::Relaxed);
                if g > n {
                    return Ok::<(), String>(());
                }
                let grant = json!({
                    "sessionId": format!("0x{g:064x}"), "account": format!("0x{g:040x}"),
                    "sessionKey": format!("0x{:040x}", g + (1 << 60)), "chainId": 31337,
                    "policy": "bench", "validAfter": now - 60, "validUntil": now + 86_400,
                });
                let resp = client
                    .post(&url)
                    .bearer_auth(ADMIN_TOKEN)
                    .json(&grant)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if resp.status() != 201 {
                    return Err(format!("grant {g}: {}", resp.status()));
                }
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r??;
    }
    Ok(())
}

fn row(name: &str, l: &Load, evalsha: Duration) {
    let floor = l.floor;
    let per = |d: Duration| l.per_request(d);
    let us = |d: Duration| per(d).as_secs_f64() * 1e6;
    // Without Redis (the embedded default) its columns are blank.
    let redis = if l.redis_cpu > Duration::ZERO || l.redis_bytes != 0 {
        format!(
            "redis {:>5.1}us = {:>4.2}x F = {:>4.1}x EVALSHA  {:>5} B/op {:>4.2} reads/op {:>4.1} op/FCALL",
            us(l.redis_cpu),
            ratio(per(l.redis_cpu), floor),
            ratio(per(l.redis_cpu), evalsha),
            l.redis_bytes / i64::try_from(l.requests.max(1)).unwrap_or(1),
            l.reads_per_request(),
            l.requests_per_fcall(),
        )
    } else {
        format!("{:<78}", "redis -")
    };
    let generator = if l.generator_cpu > Duration::ZERO {
        format!("  (generator {:.1}us)", us(l.generator_cpu))
    } else {
        String::new()
    };
    println!(
        "{name:<44} {:>6.0} req/s  p50 {:>6.0}us p99 {:>6.0}us p999 {:>6.0}us  service {:>6.1}us = {:>4.2}x F  {redis}  errors {}{}  F {:.1}us{generator}",
        l.rate(),
        l.p50_us,
        l.p99_us,
        l.p999_us,
        us(l.service_cpu),
        ratio(per(l.service_cpu), floor),
        l.errors,
        // CPU per answer means little when answers failed.
        if l.errors > 0 {
            " (ratios not comparable)"
        } else {
            ""
        },
        floor.as_secs_f64() * 1e6,
    );
    if let Some(n) = l.service_instructions {
        println!(
            "    the service ran {:.1}k instructions per request it answered (callgrind)",
            n / 1e3
        );
    }
    for line in &l.commands {
        println!("{line}");
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    for tool in ["wrk", "redis-server", "redis-benchmark"] {
        if Command::new("which").arg(tool).output()?.stdout.is_empty() {
            return Err(format!("{tool} is needed (scripts/bench installs it)").into());
        }
    }
    let secs = env_u64("SECS", 8);
    let grants = env_u64("GRANTS", 20_000);
    let memory_fill = env_u64("MEMORY_FILL", 200_000);
    // `ONLY=open,session` runs those loads alone (names: chainid, sponsor, open, session,
    // pimlico, embedded); `RATE` fixes the open loop's rate (default: half of what `sponsor` reached).
    let only = std::env::var("ONLY").unwrap_or_default();
    let want = |name: &str| only.is_empty() || only.split(',').any(|n| n == name);
    let policies: PathBuf =
        std::env::temp_dir().join(format!("sp-bench-policies-{}", std::process::id()));
    std::fs::create_dir_all(&policies)?;
    std::fs::write(policies.join("bench.toml"), POLICY)?;
    let template = sponsorship_template()?;
    let chain_id =
        Template::fixed(r#"{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":[]}"#);

    let mut floors = vec![k256_floor()?];
    let mut signatures = vec![bench_build_signature()?];
    let mut rows: Vec<(String, &str, Load)> = Vec::new();
    let redis = Redis::start()?;
    let evalsha = redis.evalsha_floor()?;
    let mut results = serde_json::Map::new();
    let service = Service::start(&policies, Some(&redis))?;
    let url = service.url();

    // The HTTP + JSON floor of this service: eth_chainId, one fixed body.
    if want("chainid") {
        let l = measured(&service, Some(&redis), || wrk(&url, &chain_id, 0, 0, secs))?;
        rows.push((
            "eth_chainId (HTTP + JSON floor)".to_string(),
            "eth_chainId",
            l.clone(),
        ));
    }

    // Signed sponsorships, sender + policy budgets in Redis, every op a new sender.
    let mut base = 0;
    let mut rate = std::env::var("RATE")
        .ok()
        .and_then(|r| r.parse::<f64>().ok());
    if want("sponsor") || (want("open") && rate.is_none()) {
        let full = measured(&service, Some(&redis), || {
            wrk(&url, &template, base, 0, secs)
        })?;
        base += full.requests + u64::from(CONNECTIONS);
        rows.push((
            "sponsor, Redis budgets (sender, policy)".to_string(),
            "sponsor_redis",
            full.clone(),
        ));
        rate = rate.or(Some(full.rate() / 2.0));
    }
    if let (true, Some(rate)) = (want("open"), rate) {
        let half = measured(&service, Some(&redis), || {
            open_loop(service.port, &template, base, 0, rate, secs)
        })?;
        base += half.requests + u64::from(CONNECTIONS);
        rows.push((
            format!("  same, open loop at {rate:.0}/s"),
            "sponsor_redis_open_loop",
            half.clone(),
        ));
        // The same open loop of eth_chainId: the latency of any request at this rate on this
        // machine (waking idle threads and cores), which a sponsorship's latency includes.
        let control = measured(&service, Some(&redis), || {
            open_loop(service.port, &chain_id, 0, 0, rate, secs)
        })?;
        rows.push((
            format!("  eth_chainId, open loop at {rate:.0}/s"),
            "eth_chainId_open_loop",
            control.clone(),
        ));
        // The same open loop against a server that only spins for the CPU one sponsorship costs.
        let spin = half.per_request(half.service_cpu + half.redis_cpu);
        let burner = Burner::start(spin)?;
        let burned = bracketed(|| {
            let t0 = cpu_of("self")?;
            let mut l = open_loop(burner.port, &template, base, 0, rate, secs)?;
            // The server shares this process with the generator: the process less its thread.
            l.service_cpu = (cpu_of("self")? - t0).saturating_sub(l.generator_cpu);
            Ok(l)
        })?;
        drop(burner);
        rows.push((
            format!(
                "  a server spinning {:.0}us a request, same loop",
                spin.as_secs_f64() * 1e6
            ),
            "burner_open_loop",
            burned,
        ));
        // The same loop against the embedded default: the service without Redis.
        let embedded = Service::start(&policies, None)?;
        let alone = measured(&embedded, None, || {
            open_loop(embedded.port, &template, 0, 0, rate, secs)
        })?;
        drop(embedded);
        rows.push((
            "  embedded default (no Redis), same loop".to_string(),
            "embedded_open_loop",
            alone,
        ));
    }

    floors.push(k256_floor()?);
    signatures.push(bench_build_signature()?);

    // Under session grants: session + sender + policy budgets, the grant read from Redis or
    // from the service's copy of it.
    if want("session") {
        // On an empty keyspace: grown by the loads before, its table would double during the
        // grants (a step of megabytes that says nothing about a grant).
        redis.cli(&["FLUSHALL"])?;
        // The flush deleted the key the first replica of a fresh Redis sets (ledger::redis):
        // replicas read it again on every poll of the policy source (2 s), and without it the
        // session load would write records by key, as 0.3.0 did. Only its existence is read.
        // The wait covers a poll that fell between the flush and the write, and the next: the
        // flush emptied the revocation feed, which the replica then finds lost at a poll and
        // follows anew at the one after (copies of grants kept before that live 10 s only).
        let by_id = session_paymaster::ledger::redis::SESSION_RECORDS_BY_ID_KEY;
        redis.cli(&["SET", by_id, "1"])?;
        tokio::time::sleep(Duration::from_millis(4_200)).await;
        let m0 = redis.used_memory()?;
        let rss0 = service.proc.rss()?;
        let t = Instant::now();
        // The replica that creates a grant keeps a copy of it (0.3.16); `GRANTS_AT=other`
        // creates them at another replica, so that this one reads each from Redis once.
        let elsewhere = std::env::var("GRANTS_AT").is_ok_and(|v| v == "other");
        if elsewhere {
            create_grants(&Service::start(&policies, Some(&redis))?, grants).await?;
        } else {
            create_grants(&service, grants).await?;
        }
        let n = i64::try_from(grants.max(1))?;
        let per_grant = (redis.used_memory()? - m0) / n;
        // This replica's memory per copy it keeps (none when another created them): a create's
        // copy goes in the newer half of its copies only (session::cache).
        let copies = env_u64(
            "COPIES",
            session_paymaster::config::DEFAULT_SESSION_COPIES as u64,
        );
        let kept = grants.min(copies / 2).max(1);
        let rss_per_copy =
            (!elsewhere).then_some((service.proc.rss()? - rss0) / i64::try_from(kept)?);
        println!(
            "created {grants} session grants{} in {:.1?}: {per_grant} B of Redis memory per grant{}",
            if elsewhere { " at another replica" } else { "" },
            t.elapsed(),
            rss_per_copy.map_or(String::new(), |b| format!(
                ", {b} B of this replica's per copy it keeps ({kept})"
            ))
        );
        results.insert(
            "grants".into(),
            json!({ "count": grants, "bytes_per_grant": per_grant, "created_elsewhere": elsewhere, "service_rss_per_copy": rss_per_copy }),
        );
        // `SETTLE=<seconds>`: a pause before the load, for Redis to finish moving its keyspace
        // to a larger table (a million grants pass 2^20 keys near their end: every command
        // during the move looks in both tables and moves a step).
        let settle = env_u64("SETTLE", 0);
        if settle > 0 {
            tokio::time::sleep(Duration::from_secs(settle)).await;
        }
        let reads0 = grant_reads(&service).await?;
        let sess = measured(&service, Some(&redis), || {
            wrk(&url, &template, base, grants, secs)
        })?;
        // Each replica keeps copies of the grants it read or created (session::cache, 10 s
        // each, up to 5 minutes while it follows the revocation feed).
        let reads = grant_reads(&service).await?;
        let (copies, store) = (reads.0 - reads0.0, reads.1 - reads0.1);
        println!(
            "grants of the session load read from this replica's copies: {:.0} % ({copies} copies, {store} from Redis)",
            100.0 * copies as f64 / (copies + store).max(1) as f64
        );
        results.insert(
            "grant_reads".into(),
            json!({ "copy": copies, "store": store }),
        );
        rows.push((
            format!("sponsor under sessions ({grants} grants)"),
            "sponsor_session",
            sess.clone(),
        ));
        base += sess.requests + u64::from(CONNECTIONS);
        // The two paths at one rate, below what sessions reached, one after the other on the
        // same keyspace: a closed loop's CPU per request moves with its rate (fewer requests
        // share each wake-up and each read of a socket at a lower one), so the closed loops'
        // ratios above compare the paths at different rates. These two do not, as long as
        // both keep up with it: an open loop whose answers take longer than its connections
        // can cover falls behind (said in its row), and is then a closed loop at a lower rate.
        // Sessions first, while the grant copies the closed loop made are fresh (a copy is
        // served for 10 s): a first pass reading every grant from Redis would be counted in
        // the session row alone.
        let same = (sess.rate() * env_f64("SAME_RATE", 0.6)).max(1.0);
        let behind = |l: &Load| {
            if l.rate() < 0.97 * same {
                format!(", fell behind: {:.0}/s", l.rate())
            } else {
                String::new()
            }
        };
        let reads0 = grant_reads(&service).await?;
        let under = measured(&service, Some(&redis), || {
            open_loop(service.port, &template, base, grants, same, secs)
        })?;
        let reads = grant_reads(&service).await?;
        let (copies, store) = (reads.0 - reads0.0, reads.1 - reads0.1);
        base += under.requests + u64::from(CONNECTIONS);
        rows.push((
            format!(
                "  under sessions, open loop at {same:.0}/s ({:.0} % copies{})",
                100.0 * copies as f64 / (copies + store).max(1) as f64,
                behind(&under)
            ),
            "sponsor_session_same_rate",
            under,
        ));
        let without = measured(&service, Some(&redis), || {
            open_loop(service.port, &template, base, 0, same, secs)
        })?;
        base += without.requests + u64::from(CONNECTIONS);
        rows.push((
            format!("  without sessions, same loop{}", behind(&without)),
            "sponsor_redis_same_rate",
            without,
        ));
    }
    // ERC-7677's pm_getPaymasterData, ours (sender and policy budgets in Redis) and
    // @pimlico/mock-paymaster's, the same bodies under the same load.
    let mut comparison = None;
    if want("pimlico") {
        let data = paymaster_data_template()?;
        let ours = measured(&service, Some(&redis), || wrk(&url, &data, base, 0, secs))?;
        base += ours.requests + u64::from(CONNECTIONS);
        rows.push((
            "pm_getPaymasterData, Redis budgets".to_string(),
            "paymaster_data_redis",
            ours.clone(),
        ));
        match MockPaymaster::start()? {
            Ok(mock) => {
                let mock_url = format!("http://127.0.0.1:{}/", mock.port);
                // Warmed up as ours was by the loads before (node compiles as it goes).
                let warm = wrk(&mock_url, &data, base, 0, 2)?;
                base += warm.requests + u64::from(CONNECTIONS);
                let theirs = bracketed(|| {
                    let cpu0 = mock.cpu()?;
                    let mut load = wrk(&mock_url, &data, base, 0, secs)?;
                    load.service_cpu = mock.cpu()? - cpu0;
                    Ok(load)
                })?;
                rows.push((
                    "  @pimlico/mock-paymaster (node + anvil)".to_string(),
                    "paymaster_data_pimlico_mock",
                    theirs.clone(),
                ));
                comparison = Some((ours, theirs));
            }
            Err(why) => println!("pimlico: skipped, {why}"),
        }
    }
    drop(service);

    // The embedded default (memory ledger and sessions): first window, fill, second window.
    if want("embedded") {
        let service = Service::start(&policies, None)?;
        let url = service.url();
        let first = measured(&service, None, || wrk(&url, &template, 0, 0, secs))?;
        rows.push((
            "embedded default, first ops".into(),
            "embedded_first",
            first.clone(),
        ));
        // (Past each load's unanswered requests too: wrk numbers what it sends.)
        let mut next = first.requests + u64::from(CONNECTIONS);
        let mut filled = 0;
        while filled < memory_fill {
            let l = wrk(&url, &template, next, 0, 10)?;
            filled += l.requests;
            next += l.requests + u64::from(CONNECTIONS);
        }
        let later = measured(&service, None, || wrk(&url, &template, next, 0, secs))?;
        rows.push((
            format!("embedded default, after {filled} more"),
            "embedded_after_fill",
            later,
        ));
        results.insert("embedded_filled".into(), json!(filled));
    }

    floors.push(k256_floor()?);
    signatures.push(bench_build_signature()?);
    // Each signature over the F measured just before it: F drifts within a run.
    let mut signature_ratios: Vec<f64> = floors
        .iter()
        .zip(&signatures)
        .map(|(floor, signature)| ratio(*signature, *floor))
        .collect();
    floors.sort();
    signatures.sort();
    signature_ratios.sort_by(f64::total_cmp);
    let floor = floors[1];
    let signature = signatures[1];
    let signature_ratio = signature_ratios[1];
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "limits: F = one bare k256 signature {:.1}us (median of {:.1?}; each row's ratios use the F measured around its load, its last column); the service's signature as this bench was built (not the binary measured) {:.1}us (median of {:.1?}) = {:.2}x F (median of {:.2?}, each over the F before it); one bare EVALSHA costs redis-server {:.1}us = {:.2}x F; {cores} cores; Redis persistence {}",
        floor.as_secs_f64() * 1e6,
        floors,
        signature.as_secs_f64() * 1e6,
        signatures,
        signature_ratio,
        signature_ratios,
        evalsha.as_secs_f64() * 1e6,
        ratio(evalsha, floor),
        redis.0.persistence(),
    );
    for (label, key, load) in &rows {
        row(label, load, evalsha);
        results.insert((*key).into(), load.json(evalsha));
    }
    if let Some((ours, theirs)) = comparison {
        if ours.errors > 0 || theirs.errors > 0 || ours.requests == 0 || theirs.requests == 0 {
            println!(
                "pm_getPaymasterData: not comparable ({} errors in {} answers ours, {} in {} the mock's)",
                ours.errors, ours.requests, theirs.errors, theirs.requests
            );
            results.insert("pimlico_mock_vs_ours".into(), Value::Null);
        } else {
            // Ours counts redis-server too; theirs node and anvil. Per answer, in µs and in each
            // row's F (the machine's speed while it ran).
            let secs = |l: &Load, cpu: Duration| l.per_request(cpu).as_secs_f64();
            let theirs_cpu = secs(&theirs, theirs.service_cpu);
            let ours_cpu = secs(&ours, ours.service_cpu + ours.redis_cpu);
            let cpu = theirs_cpu / ours_cpu;
            let cpu_in_f =
                (theirs_cpu / theirs.floor.as_secs_f64()) / (ours_cpu / ours.floor.as_secs_f64());
            let rate = ours.rate() / theirs.rate();
            println!(
                "pm_getPaymasterData: @pimlico/mock-paymaster takes {cpu:.0}x our CPU per answer ({cpu_in_f:.0}x in each row's F; ours with redis-server's), and we answer {rate:.0}x as many per second"
            );
            results.insert(
                "pimlico_mock_vs_ours".into(),
                json!({ "cpu_per_answer": cpu, "cpu_per_answer_in_f": cpu_in_f, "answers_per_second": rate }),
            );
        }
    }
    results.insert("floor_k256_us".into(), json!(floor.as_secs_f64() * 1e6));
    results.insert(
        "bench_build_signature_us".into(),
        json!(signature.as_secs_f64() * 1e6),
    );
    results.insert(
        "bench_build_signature_x_floor".into(),
        json!(signature_ratio),
    );
    results.insert(
        "evalsha_redis_cpu_us".into(),
        json!(evalsha.as_secs_f64() * 1e6),
    );
    results.insert("cores".into(), json!(cores));
    results.insert("redis_persistence".into(), json!(redis.0.persistence()));
    println!("BENCH_JSON {}", Value::Object(results));
    let _ = std::fs::remove_dir_all(&policies);
    Ok(())
}
