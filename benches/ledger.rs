//! Budget reservations on a real Redis, as ratios to the floor measured in the same run: one
//! bare `EVALSHA` round trip of a trivial script. Also counts the calls of the ledger's scripts
//! (`FCALL`) a sponsorship makes (DESIGN §1: exactly one, plus at most one session read). Run with `scripts/bench`;
//! starts its own redis-server on a free port. Asserts nothing.

use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, keccak256};
use session_paymaster::config::EntryPointConfig;
use session_paymaster::ledger::redis::RedisLedger;
use session_paymaster::ledger::{Ledger, Reservation, Scope};
use session_paymaster::policy::file::load_dir;
use session_paymaster::session::SessionStore;
use session_paymaster::session::memory::MemorySessions;
use session_paymaster::signer::{KeySource, Signer};
use session_paymaster::sponsor::{Mode, RequestContext, Sponsor, SponsorRequest};
use session_paymaster::userop::paymaster_data::{PaymasterData, ValidityWindow};
use session_paymaster::userop::{EntryPointVersion, UserOperation};

mod common;

const SAMPLES: usize = 3_000;

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Killed when `redis` drops, after the run.
    let redis = common::RedisServer::start().map_err(|e| e.to_string())?;
    run(&redis.url()).await
}

async fn run(url: &str) -> Result<(), Box<dyn std::error::Error>> {
    let conn = session_paymaster::session::redis::connect(url, Duration::from_secs(2)).await?;

    // The floor: one EVALSHA round trip of a script that does nothing.
    let trivial = redis::Script::new("return 1");
    let mut c = conn.clone();
    let _: i64 = trivial.invoke_async(&mut c).await?;
    let mut bare = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let t = Instant::now();
        let _: i64 = trivial.invoke_async(&mut c).await?;
        bare.push(t.elapsed());
    }
    let (bare50, bare99) = percentiles(bare);

    // A reservation in three scopes.
    let ledger = Ledger::Redis(RedisLedger::connect(conn.clone()).await?);
    let scope = |name: &str| Scope {
        name: name.into(),
        rule: name.into(),
        cost_limit: Some(u64::MAX / 4),
        ops_limit: None,
        expires_at: 4_000_000_000,
        resets_at: None,
        starts_at: None,
    };
    let mut reserve = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let r = Reservation {
            policy: "bench".into(),
            op_key: keccak256(i.to_be_bytes()),
            cost_gwei: 123_456,
            scopes: vec![
                scope("session:1"),
                scope("sender:0x1111111111111111111111111111111111111111:1"),
                scope("policy:1"),
            ],
            landing_key: keccak256((i as u64 ^ u64::MAX).to_be_bytes()),
            user_op_hashes: vec![B256::ZERO],
            answer: PaymasterData {
                window: ValidityWindow::new(1_799_999_940, 1_800_000_600)?,
                signature: [7; 65],
            },
            session: None,
            expires_at: 1_800_004_200,
        };
        let t = Instant::now();
        ledger.reserve(&r, false, 1_800_000_000).await?;
        reserve.push(t.elapsed());
    }
    let (res50, res99) = percentiles(reserve);

    // Whole sponsorships (decode, policy, sign, reserve) of a budgeted policy, counting FCALLs.
    let dir = std::env::temp_dir().join(format!("sp-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let counter: Address = "0xCF3b87F3D9d62cdF4723D97D8139156c6b2AB4B3".parse()?;
    std::fs::write(
        dir.join("b.toml"),
        format!(
            "id = \"b\"\nchains = [31337]\nentry_points = [\"0.7\"]\n[budgets]\nsender = {{ cost = \"1000 ether\", period = \"1d\" }}\n\
             policy = {{ cost = \"1000000 ether\", period = \"1d\" }}\n[[allow]]\ntarget = \"{counter}\"\nfunctions = [\"increment()\"]\n"
        ),
    )?;
    let policies = load_dir(&dir).map_err(|e| format!("{e:?}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    let ep = EntryPointConfig {
        version: EntryPointVersion::V0_7,
        address: EntryPointVersion::V0_7.canonical_address(),
        paymaster: Some(Address::repeat_byte(7)),
    };
    let sponsor = Sponsor::new(
        vec![(31337, vec![ep])],
        policies,
        Signer::load(KeySource::Ephemeral)?,
        SessionStore::Memory(MemorySessions::new()),
        ledger,
        session_paymaster::ratelimit::RateLimits::new(None),
    );
    // As `serve` does before it signs: the watchers then read its paymaster's events.
    sponsor
        .serve_paymasters(&sponsor.policies(), session_paymaster::clock::unix_now())
        .await?;
    let context = RequestContext::default();
    let fcalls = |info: &str| -> u64 {
        info.lines()
            .find(|l| l.starts_with("cmdstat_fcall:"))
            .and_then(|l| l.split("calls=").nth(1))
            .and_then(|s| s.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let mut c = conn.clone();
    let before: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await?;
    let n = SAMPLES / 3;
    let mut whole = Vec::with_capacity(n);
    for i in 0..n {
        let op = UserOperation {
            max_priority_fee_per_gas: 0,
            ..common::counter_op(Address::repeat_byte(0x11), i as u64)
        };
        let req = SponsorRequest {
            chain_id: 31337,
            op: &op,
            entry_point: ep.address,
            context: &context,
            mode: Mode::Final,
            keep_client_gas: false,
            allowed_policies: None,
        };
        let t = Instant::now();
        sponsor
            .sponsor(req, session_paymaster::clock::unix_now())
            .await?;
        whole.push(t.elapsed());
    }
    let after: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await?;
    let (whole50, whole99) = percentiles(whole);
    let per_op = (fcalls(&after) - fcalls(&before)) as f64 / n as f64;

    println!("limit  bare EVALSHA round trip        p50 {bare50:>8.1?}  p99 {bare99:>8.1?}");
    println!(
        "reserve (3 scopes)                  p50 {res50:>8.1?}  p99 {res99:>8.1?}  {:.2}x / {:.2}x limit",
        ratio(res50, bare50),
        ratio(res99, bare99)
    );
    println!(
        "sponsorship with budgets, signed    p50 {whole50:>8.1?}  p99 {whole99:>8.1?}  {:.2}x / {:.2}x limit",
        ratio(whole50, bare50),
        ratio(whole99, bare99)
    );
    println!("FCALL per sponsorship               {per_op:.2}");
    memory_flatness();
    Ok(())
}

/// The embedded ledger's cost per reservation does not grow with the records it keeps: the
/// median of 20k reservations into an empty ledger against 20k more after 1M (every record
/// still live, as within a signature's lifetime).
fn memory_flatness() {
    use session_paymaster::ledger::memory::MemoryLedger;

    let ledger = MemoryLedger::new();
    let scope = |name: &str| Scope {
        name: name.into(),
        rule: "bench".into(),
        cost_limit: Some(u64::MAX / 4),
        ops_limit: None,
        expires_at: 4_000_000_000,
        resets_at: None,
        starts_at: None,
    };
    let reservation = |i: u64| Reservation {
        policy: "bench".into(),
        op_key: keccak256(i.to_be_bytes()),
        landing_key: keccak256((i ^ u64::MAX).to_be_bytes()),
        cost_gwei: 1,
        scopes: vec![scope("sender"), scope("policy")],
        user_op_hashes: vec![B256::ZERO],
        answer: PaymasterData {
            window: ValidityWindow {
                valid_after: 1_799_999_940,
                valid_until: 1_800_000_600 + i % 600,
            },
            signature: [7; 65],
        },
        session: None,
        expires_at: 1_800_004_200 + i % 600,
    };
    let median = |from: u64| {
        let mut v: Vec<Duration> = (from..from + 20_000)
            .map(|i| {
                let t = Instant::now();
                ledger.reserve_now(&reservation(i), 1_800_000_000);
                t.elapsed()
            })
            .collect();
        v.sort();
        v[v.len() / 2]
    };
    let first = median(0);
    for i in 20_000..1_000_000 {
        ledger.reserve_now(&reservation(i), 1_800_000_000);
    }
    let later = median(1_000_000);
    println!(
        "memory ledger reservation           p50 {first:>8.1?} empty, {later:>8.1?} after 1M records  ({:.2}x)",
        ratio(later, first)
    );
}
