//! `session-paymaster`: parse the command line, then call the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use alloy::primitives::{Address, U256};
use alloy::providers::Provider;
use clap::{Parser, Subcommand};
use session_paymaster::app::{self, AppState};
use session_paymaster::chain::deploy::{Artifacts, deploy_dev_stack};
use session_paymaster::chain::watcher::{Cursor, ReleaseClock, Watcher};
use session_paymaster::config::{Config, ServeArgs};
use session_paymaster::policy::file::{PolicyFileError, load_dir, load_sources, read_dir_sources};
use session_paymaster::policy::publish;
use session_paymaster::{server, signer};
use sha2::Digest;

/// mimalloc: `scripts/bench` found glibc's malloc and free at a tenth of a sponsorship's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "session-paymaster",
    version,
    about = "ERC-4337 paymaster for session-key operations"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the JSON-RPC sponsorship service.
    Serve(Box<ServeArgs>),
    /// Print, for each configured paymaster, its deposit, stake, owner, whether the configured
    /// signer is authorised, and the open reservations held against its deposit (with Redis),
    /// as JSON. Takes the same configuration as `serve` (needs `--rpc-url`); reads only.
    Status(Box<ServeArgs>),
    /// Write a new signer key file (mode 0600, never overwritten) and print its address.
    Keygen {
        /// Where to write the key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Deploy a local stack on a development node (anvil): every EntryPoint version from its npm
    /// package (v0.7 and v0.8 at their canonical addresses, v0.9's 0.9.0-rc.1 at a mined
    /// 0x433709… address), SimpleAccountFactory, Simple7702Account (v0.8 on), SessionPaymaster
    /// with a deposit, and the demo Counter.
    /// Prints the addresses as one JSON line. Sends from the node's first unlocked account.
    DeployDev {
        /// Node RPC URL.
        #[arg(long, default_value = "http://127.0.0.1:8545")]
        rpc_url: String,
        /// The repository's contracts directory (npm artifacts and forge output).
        #[arg(long, default_value = "contracts")]
        contracts: PathBuf,
        /// Address authorised to sign for the paymasters (the service's signer).
        #[arg(long)]
        signer: Address,
        /// Deposit per paymaster, in wei.
        #[arg(long, default_value = "10000000000000000000")]
        deposit_wei: U256,
    },
    /// Deploy SessionPaymaster for one EntryPoint to a real chain, or find it deployed: through
    /// the CREATE2 deployer at an address predicted from (EntryPoint, owner, signers), its
    /// deposit and stake topped up to the amounts asked. Prints the plan (and, after sending,
    /// the `serve` configuration lines) as JSON. The sending key comes from an environment
    /// variable or a file, never from a flag's value.
    Deploy(Box<DeployArgs>),
    /// Create an admin API token: prints the token (once) and the SHA-256 the config takes;
    /// with `--name` (and `--policies`), a tenant's admin key, limited to its policies.
    AdminToken {
        /// A tenant's key: its name, shown in logs (prints an `--admin-key` value).
        #[arg(long)]
        name: Option<String>,
        /// The policies a tenant's key reaches the sessions of (comma-separated).
        #[arg(long, value_delimiter = ',', requires = "name")]
        policies: Vec<String>,
    },
    /// Probe a running service's `/healthz` (the container's HEALTHCHECK: the image has no
    /// curl). Exits 0 when it answers 200 within 3 s, 1 otherwise.
    Healthcheck {
        /// The service's listen address; an unspecified one (`0.0.0.0`, `::`) is probed on
        /// loopback.
        #[arg(long, env = "SP_LISTEN", default_value = session_paymaster::config::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
    },
    /// Work with API keys of dapp backends.
    Apikey {
        #[command(subcommand)]
        command: ApikeyCommand,
    },
    /// Work with policy files.
    Policies {
        #[command(subcommand)]
        command: PoliciesCommand,
    },
}

#[derive(clap::Args)]
struct DeployArgs {
    /// Chain RPC URL.
    #[arg(long, env = "SP_RPC_URL")]
    rpc_url: String,
    /// The chain to deploy on: the RPC must serve it (a wrong URL spends on another chain).
    /// Needed to send; optional with --dry-run.
    #[arg(long)]
    chain_id: Option<u64>,
    /// EntryPoint version: 0.7, 0.8 or 0.9.
    #[arg(long)]
    entry_point: session_paymaster::userop::EntryPointVersion,
    /// EntryPoint address (default: the version's canonical address).
    #[arg(long)]
    entry_point_address: Option<Address>,
    /// Owner of the paymaster (signers, stake, deposit): a multisig in production. May differ
    /// from the sender; then staking is left to the owner (printed as `ownerTransactions`).
    #[arg(long)]
    owner: Address,
    /// A signer to authorise (the service's address, see `keygen`); repeat for more.
    #[arg(long = "signer", required = true)]
    signers: Vec<Address>,
    /// Deposit to have at the EntryPoint, e.g. `1ether`, `0.5 ether`, `10 gwei` (topped up).
    #[arg(long, default_value = "0", value_parser = parse_amount)]
    deposit: U256,
    /// Stake to have, e.g. `1ether` (topped up; staking is the owner's).
    #[arg(long, default_value = "0", value_parser = parse_amount)]
    stake: U256,
    /// Unstake delay of the stake, e.g. `1d`.
    #[arg(long, default_value = "1d")]
    unstake_delay: humantime::Duration,
    /// Name of the environment variable holding the sending key (hex).
    #[arg(long, default_value = "SP_DEPLOYER_KEY")]
    key_env: String,
    /// File holding the sending key (hex) instead of the environment.
    #[arg(long, conflicts_with = "keystore")]
    key_file: Option<PathBuf>,
    /// Encrypted JSON keystore holding the sending key (`cast wallet import`, geth), instead
    /// of the environment; its password from the variable --password-env names.
    #[arg(long)]
    keystore: Option<PathBuf>,
    /// Name of the environment variable holding the --keystore password.
    #[arg(long, default_value = "SP_DEPLOYER_KEYSTORE_PASSWORD")]
    password_env: String,
    /// Print the plan (transactions, predicted address) and send nothing; no key needed.
    #[arg(long)]
    dry_run: bool,
    /// Sender to plan for with --dry-run and no key (default: the owner).
    #[arg(long)]
    from: Option<Address>,
    /// The repository's contracts directory (forge output of SessionPaymaster).
    #[arg(long, default_value = "contracts")]
    contracts: PathBuf,
}

/// An amount of wei: `1ether`, `0.5 ether`, `30 gwei`, `1000`.
fn parse_amount(text: &str) -> Result<U256, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .map_or(text.to_owned(), |at| {
            format!("{} {}", text[..at].trim(), &text[at..])
        });
    session_paymaster::policy::file::parse_amount_text(&split)
}

#[derive(Subcommand)]
enum ApikeyCommand {
    /// Create a key: prints it once, and the `--api-key` value the config takes (its hash).
    New {
        /// Name shown in logs.
        #[arg(long)]
        name: String,
        /// Policies it may use (comma-separated); all when omitted.
        #[arg(long, value_delimiter = ',')]
        policies: Vec<String>,
    },
}

#[derive(Subcommand)]
enum PoliciesCommand {
    /// Validate DIR and publish it to Redis as the set every replica serves.
    Push {
        /// Policy directory.
        #[arg(default_value = "policies")]
        dir: PathBuf,
        /// Redis URL.
        #[arg(long, env = "SP_REDIS_URL")]
        redis_url: String,
    },
    /// Check every policy file in DIR; print every problem, or one line per valid policy.
    Check {
        /// Policy directory.
        #[arg(default_value = "policies")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let argv = match session_paymaster::config::with_config_file(std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(argv);
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Status(args) => run_printing(status_async(*args)),
        Command::Deploy(args) => run_printing(deploy_async(*args)),
        Command::AdminToken { name, policies } => admin_token(name.as_deref(), &policies),
        Command::Healthcheck { listen } => match session_paymaster::app::healthcheck(listen) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("unhealthy: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Apikey {
            command: ApikeyCommand::New { name, policies },
        } => apikey_new(&name, &policies),
        Command::Keygen { out } => match signer::keygen(&out) {
            Ok(address) => {
                println!("{address}");
                eprintln!(
                    "wrote {} (mode 0600); add {address} to SessionPaymaster's signers",
                    out.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::DeployDev {
            rpc_url,
            contracts,
            signer,
            deposit_wei,
        } => deploy_dev(&rpc_url, contracts, signer, deposit_wei),
        Command::Policies {
            command: PoliciesCommand::Check { dir },
        } => match load_dir(&dir) {
            Ok(set) => {
                for p in set.iter() {
                    println!(
                        "{}: chains {:?}, entry points {:?}, {} allow rule(s)",
                        p.id,
                        p.chains,
                        p.entry_points
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>(),
                        p.allow.len()
                    );
                }
                println!("version {}", set.version());
                ExitCode::SUCCESS
            }
            Err(errors) => report(&errors),
        },
        Command::Policies {
            command: PoliciesCommand::Push { dir, redis_url },
        } => policies_push(&dir, &redis_url),
    }
}

fn report(errors: &[PolicyFileError]) -> ExitCode {
    for e in errors {
        eprintln!("{e}");
    }
    eprintln!("{} problem(s)", errors.len());
    ExitCode::FAILURE
}

/// Validate and publish: a set with any problem is never published.
fn policies_push(dir: &std::path::Path, redis_url: &str) -> ExitCode {
    let sources = match read_dir_sources(dir) {
        Ok(s) => s,
        Err(errors) => return report(&errors),
    };
    let set = match load_sources(dir, sources.clone()) {
        Ok(set) => set,
        Err(errors) => return report(&errors),
    };
    let pushed = tokio::runtime::Runtime::new()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(async {
                let conn = session_paymaster::session::redis::connect(
                    redis_url,
                    std::time::Duration::from_secs(5),
                )
                .await
                .map_err(|e| e.to_string())?;
                publish::push(&conn, set.version(), &sources)
                    .await
                    .map_err(|e| e.to_string())
            })
        });
    match pushed {
        Ok(()) => {
            println!(
                "published {} policies as version {}",
                set.len(),
                set.version()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn apikey_new(name: &str, policies: &[String]) -> ExitCode {
    if name.is_empty() || name.contains([':', ';']) {
        eprintln!("error: --name must be non-empty, without `:` or `;`");
        return ExitCode::FAILURE;
    }
    let mut bytes = [0u8; 32];
    if let Err(e) = getrandom::fill(&mut bytes) {
        eprintln!("error: random number generator: {e}");
        return ExitCode::FAILURE;
    }
    let key = zeroize::Zeroizing::new(format!("sp_{}", hex::encode(bytes)));
    let hash = hex::encode(sha2::Sha256::digest(key.as_bytes()));
    let scope = if policies.is_empty() {
        String::new()
    } else {
        format!(":{}", policies.join(","))
    };
    println!(
        "key (shown once; clients send `Authorization: Bearer <key>` or `?apikey=<key>`):\n{}",
        key.as_str()
    );
    println!("config:\n--api-key {name}:0x{hash}{scope}");
    ExitCode::SUCCESS
}

fn admin_token(name: Option<&str>, policies: &[String]) -> ExitCode {
    if name.is_some_and(|n| n.is_empty() || n.contains([':', ';'])) {
        eprintln!("error: --name must be non-empty, without `:` or `;`");
        return ExitCode::FAILURE;
    }
    if name.is_some() && policies.is_empty() {
        eprintln!(
            "error: a tenant's admin key needs --policies (the operator's token, without --name, reaches every policy)"
        );
        return ExitCode::FAILURE;
    }
    let mut bytes = [0u8; 32];
    if let Err(e) = getrandom::fill(&mut bytes) {
        eprintln!("error: random number generator: {e}");
        return ExitCode::FAILURE;
    }
    let token = zeroize::Zeroizing::new(hex::encode(bytes));
    let hash = sha2::Sha256::digest(token.as_bytes());
    println!(
        "token (shown once; clients send `Authorization: Bearer <token>`):\n{}",
        token.as_str()
    );
    match name {
        Some(name) => println!(
            "config:\n--admin-key {name}:0x{}:{}",
            hex::encode(hash),
            policies.join(",")
        ),
        None => println!("config:\nSP_ADMIN_TOKEN_SHA256=0x{}", hex::encode(hash)),
    }
    ExitCode::SUCCESS
}

fn deploy_dev(rpc_url: &str, contracts: PathBuf, signer: Address, deposit: U256) -> ExitCode {
    let result = tokio::runtime::Runtime::new()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(async {
                let provider = session_paymaster::chain::client::provider(rpc_url)?;
                let from = *provider
                    .get_accounts()
                    .await
                    .map_err(|e| session_paymaster::chain::client::error_chain(&e))?
                    .first()
                    .ok_or("the node has no unlocked account")?;
                deploy_dev_stack(
                    &provider,
                    &Artifacts::new(contracts),
                    from,
                    from,
                    &[signer],
                    deposit,
                )
                .await
                .map_err(|e| e.to_string())
            })
        });
    match result.and_then(|stack| serde_json::to_string(&stack).map_err(|e| e.to_string())) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Run a one-shot command on a fresh runtime: its report to stdout, or its error to stderr.
fn run_printing(command: impl std::future::Future<Output = Result<String, String>>) -> ExitCode {
    let result = tokio::runtime::Runtime::new()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
        .and_then(|runtime| runtime.block_on(command));
    match result {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn deploy_async(args: DeployArgs) -> Result<String, String> {
    use session_paymaster::chain::deploy::{
        DeployRequest, KeyFrom, PaymasterTarget, deploy_key, run,
    };

    let from = match (&args.keystore, &args.key_file) {
        (Some(path), _) => KeyFrom::Keystore {
            path,
            password_env: &args.password_env,
        },
        (None, Some(path)) => KeyFrom::File(path),
        (None, None) => KeyFrom::Env(&args.key_env),
    };
    let key = deploy_key(from).map_err(|e| e.to_string())?;
    let request = DeployRequest {
        rpc_url: args.rpc_url,
        chain_id: args.chain_id,
        target: PaymasterTarget {
            version: args.entry_point,
            entry_point: args
                .entry_point_address
                .unwrap_or(args.entry_point.canonical_address()),
            owner: args.owner,
            signers: args.signers,
            deposit: args.deposit,
            stake: args.stake,
            unstake_delay_secs: u32::try_from(args.unstake_delay.as_secs())
                .map_err(|_| "--unstake-delay over 2^32 seconds".to_owned())?,
        },
        key,
        from: args.from,
        dry_run: args.dry_run,
        artifacts: Artifacts::new(&args.contracts),
    };
    let report = run(request).await.map_err(|e| e.to_string())?;
    serde_json::to_string_pretty(&report).map_err(|e| e.to_string())
}

async fn status_async(args: ServeArgs) -> Result<String, String> {
    let config = Config::from(&args);
    let mut reports = Vec::new();
    for chain in &config.chains {
        let rpc_url = chain.rpc_url.as_deref().ok_or(format!(
            "status reads the chain: give chain {}'s rpc_url (--rpc-url, or rpc_url in the config)",
            chain.chain_id
        ))?;
        reports.push(session_paymaster::chain::status::report(&config, chain, rpc_url).await?);
    }
    // One chain: its report; several: one per chain.
    match reports.as_slice() {
        [one] => serde_json::to_string_pretty(one),
        many => serde_json::to_string_pretty(many),
    }
    .map_err(|e| e.to_string())
}

fn serve(args: ServeArgs) -> ExitCode {
    if args.print_config {
        print!("{}", args.effective());
        return ExitCode::SUCCESS;
    }
    init_tracing(&args.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve_async(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_async(args: ServeArgs) -> Result<(), String> {
    let config = Config::from(&args);
    let listeners = args.listeners()?;
    if config.api_keys.is_empty() && !args.listen.ip().is_loopback() {
        return Err(format!(
            "no API key configured: refusing to serve {} keyless; configure --api-key (see `session-paymaster apikey new`) or listen on loopback",
            args.listen
        ));
    }
    // A tenant's admin key without policies would reach every policy's sessions and status,
    // the operator's token's reach.
    if let Some(k) = config
        .admin_keys
        .iter()
        .find(|k| k.policies.as_ref().is_none_or(Vec::is_empty))
    {
        return Err(format!(
            "admin key `{}` (--admin-key) names no policies: a tenant's key is `name:sha256:policy,…` (see `admin-token --name … --policies …`); the operator's is --admin-token-sha256",
            k.name
        ));
    }
    if let Some(wait) = config.redis_wait {
        if config.redis_url.is_none() {
            return Err(
                "--redis-wait-replicas waits for Redis' replicas: it needs --redis-url".into(),
            );
        }
        if wait.timeout >= args.redis_timeout {
            return Err(format!(
                "--redis-wait-timeout ({}) must be below --redis-timeout ({}): the client would give up on the wait first",
                humantime::format_duration(wait.timeout),
                humantime::format_duration(args.redis_timeout)
            ));
        }
    }
    // Refused before anything is built (or published to Redis).
    if config.chains.len() > 1 && args.watch_from_block.is_some() {
        return Err(
            "--watch-from-block is a block number of one chain: with several chains, leave it \
             out (each watcher starts before its chain's oldest open reservation)"
                .into(),
        );
    }
    // Each chain's node, checked before anything is built (or published, or noted in Redis
    // for the watchers).
    for chain in &config.chains {
        session_paymaster::chain::preflight::check_node(chain).await?;
    }
    let state = Arc::new(
        AppState::build(&config)
            .await
            .map_err(|e| format!("cannot start: {e}"))?,
    );
    log_startup(&state, &config, args.listen);
    // Reservations in Redis that nothing settles stay at their worst case for good: say so at
    // start rather than find the budgets full later. The embedded default (memory) keeps
    // starting, with its warning below.
    let budgets = state.sponsor.policies().iter().any(|p| {
        p.budgets.session.is_some() || p.budgets.sender.is_some() || p.budgets.policy.is_some()
    });
    if config.redis_url.is_some()
        && budgets
        && !args.no_settlement
        && let Some(chain) = config.chains.iter().find(|c| c.rpc_url.is_none())
    {
        return Err(format!(
            "policies with budgets on Redis but no --rpc-url for chain {}: nothing would settle \
             or release its reservations, which would stay at their worst case for good; give \
             its rpc_url, or --no-settlement to accept that",
            chain.chain_id
        ));
    }
    state.spawn_policy_watcher(args.policy_poll);
    state.spawn_ledger_watcher(args.policy_poll);
    state.spawn_revocation_follower(args.policy_poll);
    state.spawn_rate_limit_eviction(std::time::Duration::from_secs(60));
    // Releases wait for every chain's watcher (see ReleaseClock).
    let clock = ReleaseClock::new(config.chains.len());
    for (slot, chain) in config.chains.iter().enumerate() {
        let Some(url) = &chain.rpc_url else {
            tracing::warn!(
                chain_id = chain.chain_id,
                "no --rpc-url: budget reservations stay counted at their worst case (no settlement), on every chain served"
            );
            continue;
        };
        let provider = session_paymaster::chain::client::provider(url)?;
        let cursor = match state.redis() {
            Some(conn) => Cursor::redis(conn.clone(), chain.chain_id),
            None => Cursor::memory(),
        };
        let served = state
            .sponsor
            .chain(chain.chain_id)
            .map_err(|e| e.to_string())?;
        let watcher = Watcher::new(
            provider,
            served,
            args.confirmations,
            args.watch_from_block,
            cursor,
        )
        .with_low_deposit(args.low_deposit_wei)
        .with_finality(args.finality)
        .with_max_range(args.log_range)
        .with_release_clock(clock.clone(), slot);
        state.spawn_watcher(watcher, args.watch_interval);
        tracing::info!(
            chain_id = chain.chain_id,
            confirmations = args.confirmations,
            "settlement watcher started"
        );
    }

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("bind {}: {e}", args.listen))?;
    tracing::info!(address = %args.listen, "listening");
    // One shutdown signal for every listener.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    server::raise_open_files();
    // The admin API's and `/metrics`' own listeners (`Listeners`), each with a cap of
    // connections of its own, taken off the main listener's share of open files.
    let side_limits = args.connection_limits().for_side_listener();
    let metrics_alone = match listeners.metrics {
        session_paymaster::config::MetricsAt::Own(addr) => Some(addr),
        _ => None,
    };
    let limits = args.connection_limits().within_open_files(
        [listeners.admin, metrics_alone].iter().flatten().count() * side_limits.max_connections,
    );
    let mut side = Vec::new();
    for (addr, what, router) in [
        (
            listeners.admin,
            "admin API",
            app::admin_router(
                state.clone(),
                listeners.metrics == session_paymaster::config::MetricsAt::Admin,
            ),
        ),
        (metrics_alone, "metrics", app::metrics_router(state.clone())),
    ] {
        let Some(addr) = addr else { continue };
        let side_listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("bind {what} {addr}: {e}"))?;
        let bound = side_listener.local_addr().unwrap_or(addr);
        tracing::info!(address = %bound, "{what} listening");
        side.push((
            what,
            tokio::spawn(server::run(
                side_listener,
                router,
                stopped(stop_rx.clone()),
                side_limits,
            )),
        ));
    }
    server::run(listener, app::router(state), stopped(stop_rx), limits)
        .await
        .map_err(|e| format!("server: {e}"))?;
    for (what, server) in side {
        server
            .await
            .map_err(|e| format!("{what} server: {e}"))?
            .map_err(|e| format!("{what} server: {e}"))?;
    }
    Ok(())
}

fn log_startup(state: &AppState, config: &Config, listen: std::net::SocketAddr) {
    let signer = state.sponsor.signer();
    if signer.is_ephemeral() {
        tracing::warn!(
            address = %signer.address(),
            "using an EPHEMERAL development signer: its key dies with this process. NOT FOR PRODUCTION: \
             configure --signer-key-file or --signer-key-env"
        );
    }
    for chain in state.sponsor.chains() {
        for ep in &chain.entry_points {
            match ep.paymaster {
                Some(pm) => {
                    tracing::info!(chain_id = chain.chain_id, version = %ep.version, entry_point = %ep.address, paymaster = %pm, "serving")
                }
                None => tracing::warn!(
                    chain_id = chain.chain_id,
                    version = %ep.version,
                    entry_point = %ep.address,
                    "no paymaster configured: sponsorship for this EntryPoint is refused"
                ),
            }
        }
    }
    if config.redis_url.is_none() {
        tracing::warn!(
            "sessions and budgets are kept in memory: they do not survive a restart and are not shared between replicas (set --redis-url)"
        );
    }
    if config.api_keys.is_empty() {
        tracing::warn!(
            "keyless mode: JSON-RPC answers anyone who can reach this loopback address (configure --api-key)"
        );
    } else {
        tracing::info!(keys = config.api_keys.len(), "API keys required");
    }
    if !config.admin_keys.is_empty() {
        tracing::info!(
            keys = config.admin_keys.len(),
            "tenants' admin keys configured"
        );
    }
    if config.admin_token_sha256.is_none() && config.admin_keys.is_empty() {
        tracing::warn!(
            "admin API closed: no --admin-token-sha256 (create one with `session-paymaster admin-token`)"
        );
    }
    // `/metrics` asks for no credential: whoever reaches a main listener that is not loopback
    // reads every policy and its budgets' remaining amounts there (tenants each other's).
    if config.metrics_on_main && !listen.ip().is_loopback() {
        let tenants =
            !config.admin_keys.is_empty() || config.api_keys.iter().any(|k| k.policies.is_some());
        tracing::warn!(
            tenants,
            "/metrics is served on the main listener, to anyone who reaches it: it names every policy and its budgets' remaining amounts; give --metrics-listen an internal address (or --admin-listen's), or route only the JSON-RPC paths to this listener"
        );
    }
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled");
    if app::heap_gets_huge_pages(
        &thp.unwrap_or_default(),
        std::env::var("MIMALLOC_ALLOW_THP").ok().as_deref(),
    ) {
        tracing::warn!(
            "transparent huge pages are `always` on this host: run with MIMALLOC_ALLOW_THP=0 (a huge-page fault of the heap stalls every request behind it)"
        );
    }
    let chains: Vec<u64> = config.chains.iter().map(|c| c.chain_id).collect();
    tracing::info!(policies = state.sponsor.policies().len(), signer = %signer.address(), ?chains, "loaded");
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
