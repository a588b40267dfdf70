//! The settlement watcher against a chain RPC that misbehaves: sponsorship goes on, readiness
//! stays, the lag and the failures are reported, and polls back off.

use std::time::Duration;

use alloy::primitives::Address;
use alloy::providers::{Provider, ProviderBuilder};
use serde_json::{Value, json};
use session_paymaster::chain::watcher::{Cursor, Watcher};
use session_paymaster::signer::KeySource;
use session_paymaster::userop::EntryPointVersion;

use crate::helpers::{TestApp, TestResult, config, counter_op};

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// The chain RPC is down (connection refused): measured before, `/readyz` answered 503 after a
/// minute on every replica while sponsorship still worked, and the watcher logged a warning
/// every second. Now readiness holds, the lag is reported, and polls back off.
#[tokio::test]
async fn a_chain_rpc_outage_keeps_replicas_ready_and_backs_off() -> TestResult {
    let app = TestApp::spawn(config(
        [Some(Address::repeat_byte(7)), None, None],
        KeySource::Ephemeral,
    ))
    .await?;
    // Port 1: nothing listens there (a port freed by this test could be taken by another's).
    let provider = ProviderBuilder::new()
        .connect_http("http://127.0.0.1:1".parse()?)
        .erased();
    let watcher = Watcher::new(
        provider,
        app.state.sponsor.chain(31337)?,
        0,
        None,
        Cursor::memory(),
    );
    let _task = app.state.spawn_watcher(watcher, Duration::from_millis(50));
    tokio::time::sleep(Duration::from_millis(2300)).await;

    let resp = reqwest::get(format!("{}/readyz", app.url)).await?;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["watcher"]["lagging"], json!(true), "{body}");
    let ep = EntryPointVersion::V0_7.canonical_address();
    let sponsored = app
        .result(
            "pm_sponsorUserOperation",
            json!([
                counter_op(Address::repeat_byte(0x11), 0, "increment()").to_json(),
                ep
            ]),
        )
        .await?;
    assert!(sponsored["paymasterData"].is_string(), "{sponsored}");

    let text = reqwest::get(format!("{}/metrics", app.url))
        .await?
        .text()
        .await?;
    let failed = metric(&text, "sp_watcher_polls_failed_total");
    // 50 ms doubling (waits of 50, 100, 200, 400, 800 ms…): 5 or 6 polls in 2.3 s, 46 without
    // backoff.
    assert!((2..=8).contains(&failed), "{failed} failed polls:\n{text}");
    assert!(metric(&text, "sp_watcher_lag_seconds") >= 1, "{text}");
    Ok(())
}

/// anvil with the local stack, Redis (or the embedded default without), and dev-counter with a
/// policy budget (so sponsorships are reserved); one operation of a v0.7 user sponsored and
/// landed, and its actual cost in gwei.
async fn landed_op(
    redis: Option<&crate::helpers::TestRedis>,
) -> TestResult<(crate::helpers::Stack, crate::helpers::TempDir, u64)> {
    use crate::e2e::User;

    let dir = crate::e2e::budgeted_policies()?;
    let stack =
        crate::helpers::Stack::start_with(Some(dir.0.clone()), redis.map(|r| r.url.clone()))
            .await?;
    let actual = {
        let user = User::new(&stack, EntryPointVersion::V0_7).await?;
        let event = user.submit(&user.sponsored(user.op_json()).await?).await?;
        session_paymaster::ledger::wei_to_gwei_ceil(event.actualGasCost)
    };
    Ok((stack, dir, actual))
}

/// What dev-counter's policy budget has counted (cost in gwei, operations).
async fn day_usage(sponsor: &session_paymaster::sponsor::Sponsor) -> TestResult<(u64, u64)> {
    Ok(sponsor
        .ledger()
        .usage("dev-counter", &crate::helpers::policy_day_scope())
        .await?)
}

/// A watcher of the stack's chain with no cursor stored yet (two confirmations, finality two
/// blocks deep).
fn cursorless_watcher(stack: &crate::helpers::Stack) -> TestResult<Watcher> {
    Ok(Watcher::new(
        stack.anvil.provider.clone(),
        stack.app.state.sponsor.chain(31337)?,
        2,
        None,
        Cursor::memory(),
    )
    .with_finality(session_paymaster::chain::watcher::Finality::Depth(2)))
}

async fn mine(stack: &crate::helpers::Stack, blocks: u64) -> TestResult {
    let _: Value = stack
        .anvil
        .provider
        .raw_request("anvil_mine".into(), (format!("{blocks:#x}"),))
        .await?;
    Ok(())
}

/// A watcher started without a cursor (the first `--rpc-url` against a Redis that already holds
/// reservations, or an evicted key) started at the head: it missed the events of operations
/// that landed before it, and then released their reservations. It now starts before the
/// oldest open reservation.
#[tokio::test]
async fn a_watcher_without_cursor_starts_before_the_oldest_open_reservation() -> TestResult {
    let redis = crate::helpers::TestRedis::start().await?;
    let (stack, _dir, actual) = landed_op(Some(&redis)).await?;
    mine(&stack, 50).await?;
    let sponsor = &stack.app.state.sponsor;
    let poll = cursorless_watcher(&stack)?.poll_once(sponsor).await?;
    assert_eq!(poll.settled, 1, "{poll:?}");
    assert_eq!(day_usage(sponsor).await?, (actual, 1));
    Ok(())
}

/// A watcher without a cursor went back from the oldest open reservation by its own set's
/// longest validity only: an operation signed under a longer one (another replica's policy, or
/// one since removed or shortened) that landed before that was never read, and its reservation
/// was released at `validUntil`. It now goes back by the longest validity any replica noted
/// serving too (found by review).
#[tokio::test]
async fn a_watcher_without_cursor_goes_back_by_the_longest_validity_served() -> TestResult {
    use crate::e2e::User;
    use session_paymaster::policy::file::{load_sources, read_dir_sources};

    let redis = crate::helpers::TestRedis::start().await?;
    let dir = crate::e2e::budgeted_policies()?;
    let file = dir.0.join("dev-counter.toml");
    let text = std::fs::read_to_string(&file)?;
    assert!(text.contains("max_validity = \"10m\""), "{text}");
    std::fs::write(
        &file,
        text.replace("max_validity = \"10m\"", "max_validity = \"2d\""),
    )?;
    let stack =
        crate::helpers::Stack::start_with(Some(dir.0.clone()), Some(redis.url.clone())).await?;
    let actual = {
        let user = User::new(&stack, EntryPointVersion::V0_7).await?;
        let event = user.submit(&user.sponsored(user.op_json()).await?).await?;
        session_paymaster::ledger::wei_to_gwei_ceil(event.actualGasCost)
    };
    mine(&stack, 50).await?;
    // The policy shortened to a minute, published and in force.
    std::fs::write(
        &file,
        text.replace("max_validity = \"10m\"", "max_validity = \"1m\""),
    )?;
    let sources = read_dir_sources(&dir.0).map_err(|e| format!("{e:?}"))?;
    let set = load_sources(&dir.0, sources.clone()).map_err(|e| format!("{e:?}"))?;
    let conn =
        session_paymaster::session::redis::connect(&redis.url, Duration::from_secs(2)).await?;
    session_paymaster::policy::publish::push(&conn, set.version(), &sources).await?;
    stack.app.state.refresh_policies().await;
    let sponsor = &stack.app.state.sponsor;
    assert_eq!(sponsor.policies().version(), set.version());
    // (The set's other policies: ten minutes at most.)
    assert_eq!(sponsor.policies().longest_validity(), 600);
    let poll = cursorless_watcher(&stack)?.poll_once(sponsor).await?;
    assert_eq!(poll.settled, 1, "{poll:?}");
    assert_eq!(day_usage(sponsor).await?, (actual, 1));
    Ok(())
}

/// `eth_getLogs` spanned a fixed 1,000 blocks; providers that cap ranges or results refused
/// every poll. The range now halves while refused (and grows back after successes).
#[tokio::test]
async fn log_ranges_narrow_while_the_provider_refuses() -> TestResult {
    let redis = crate::helpers::TestRedis::start().await?;
    let (stack, _dir, actual) = landed_op(Some(&redis)).await?;
    mine(&stack, 30).await?;
    let proxy = crate::helpers::RpcProxy::start(stack.anvil.url.clone()).await?;
    proxy
        .max_log_blocks
        .store(4, std::sync::atomic::Ordering::Relaxed);
    let provider = ProviderBuilder::new()
        .connect_http(proxy.url.parse()?)
        .erased();
    let sponsor = &stack.app.state.sponsor;
    let watcher = crate::helpers::dev_watcher(provider, sponsor.chain(31337)?);
    let poll = watcher.poll_once(sponsor).await?;
    assert_eq!(poll.settled, 1, "{poll:?}");
    assert_eq!(day_usage(sponsor).await?, (actual, 1));
    Ok(())
}

/// Deposits were read only after a successful log pass: low-deposit alerts stopped while logs
/// failed. They are read on their own now.
#[tokio::test]
async fn deposits_are_read_while_logs_fail() -> TestResult {
    let redis = crate::helpers::TestRedis::start().await?;
    let (stack, _dir, _) = landed_op(Some(&redis)).await?;
    let proxy = crate::helpers::RpcProxy::start(stack.anvil.url.clone()).await?;
    proxy
        .max_log_blocks
        .store(0, std::sync::atomic::Ordering::Relaxed);
    let provider = ProviderBuilder::new()
        .connect_http(proxy.url.parse()?)
        .erased();
    let sponsor = &stack.app.state.sponsor;
    let watcher = Watcher::new(
        provider,
        sponsor.chain(31337)?,
        0,
        Some(0),
        Cursor::memory(),
    )
    .with_low_deposit(alloy::primitives::U256::MAX);
    assert!(watcher.poll_once(sponsor).await.is_err(), "logs fail");
    let text = reqwest::get(format!("{}/metrics", stack.app.url))
        .await?
        .text()
        .await?;
    assert!(
        text.lines()
            .any(|l| l.starts_with("sp_paymaster_deposit_low{") && l.ends_with(" 1")),
        "{text}"
    );
    Ok(())
}

/// A reorg deeper than the confirmations replaced the block the cursor names: the watcher reads
/// again from further back instead of going on from a block that no longer exists.
#[tokio::test]
async fn a_reorganised_cursor_block_is_read_again() -> TestResult {
    let redis = crate::helpers::TestRedis::start().await?;
    let (stack, _dir, _) = landed_op(Some(&redis)).await?;
    let provider = &stack.anvil.provider;
    let snapshot: Value = provider.raw_request("evm_snapshot".into(), ()).await?;
    mine(&stack, 3).await?;
    let sponsor = &stack.app.state.sponsor;
    let watcher = crate::helpers::dev_watcher(provider.clone(), sponsor.chain(31337)?);
    assert!(!watcher.poll_once(sponsor).await?.reorg);
    let _: Value = provider
        .raw_request("evm_revert".into(), (snapshot,))
        .await?;
    let _: Value = provider
        .raw_request("evm_increaseTime".into(), (7u64,))
        .await?;
    mine(&stack, 4).await?;
    let poll = watcher.poll_once(sponsor).await?;
    assert!(poll.reorg, "{poll:?}");
    assert_eq!(
        poll.settled, 0,
        "read again, settled nothing twice: {poll:?}"
    );
    Ok(())
}

alloy::sol! {
    #[sol(rpc)]
    interface IWithdraw {
        function withdrawTo(address payable withdrawAddress, uint256 withdrawAmount) external;
    }
}

/// Bundlers refuse a paymaster whose deposit does not cover its pending operations, and a
/// dry deposit strands every signed one: with the watcher reading the deposit, sponsorships
/// whose worst case would pass the deposit less its margin are refused (`deposit_low`).
#[tokio::test]
async fn sponsorship_stops_before_the_deposit_runs_dry() -> TestResult {
    let stack = crate::helpers::Stack::start().await?;
    let sponsor = &stack.app.state.sponsor;
    let watcher = memory_watcher(&stack)?
        .with_finality(session_paymaster::chain::watcher::Finality::Depth(0));
    let op = |nonce: u64| counter_op(Address::repeat_byte(0x11), nonce, "increment()");
    let worst = leave_two_and_a_half_worst_cases(&stack, &op(0)).await?;
    watcher.poll_once(sponsor).await?;

    let ep = EntryPointVersion::V0_7.canonical_address();
    for nonce in 0..2 {
        let ok = stack
            .app
            .result("pm_sponsorUserOperation", json!([op(nonce).to_json(), ep]))
            .await?;
        assert!(ok["paymasterData"].is_string(), "{ok}");
    }
    let err = stack
        .app
        .error("pm_sponsorUserOperation", json!([op(2).to_json(), ep]))
        .await?;
    assert_eq!(err["data"]["reason"], json!("deposit_low"), "{err}");
    // The next poll sums the open reservations (replacing this replica's own count): still full.
    watcher.poll_once(sponsor).await?;
    let err = stack
        .app
        .error("pm_sponsorUserOperation", json!([op(3).to_json(), ep]))
        .await?;
    assert_eq!(err["data"]["reason"], json!("deposit_low"), "{err}");
    let text = reqwest::get(format!("{}/metrics", stack.app.url))
        .await?
        .text()
        .await?;
    let open: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!(
                "sp_paymaster_open_wei{{chain=\"31337\",entry_point=\"{ep}\"}} "
            ))
        })
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no open gauge in {text}"))?;
    assert_eq!(open, (2 * worst) as f64 * 1e9, "{text}");
    Ok(())
}

/// The deposit check and the count of what a replica reserved were two steps with the ledger's
/// round trip between: sponsorships in flight at once each passed the check before any was
/// counted, and together promised the deposit several times over. Each now holds its worst
/// case from the check until the ledger answers.
#[tokio::test]
async fn sponsorships_in_flight_at_once_share_the_deposit() -> TestResult {
    let redis = crate::helpers::TestRedis::start().await?;
    let stack = crate::helpers::Stack::start_with(None, Some(redis.url.clone())).await?;
    let sponsor = &stack.app.state.sponsor;
    let watcher = memory_watcher(&stack)?
        .with_finality(session_paymaster::chain::watcher::Finality::Depth(0));
    let op = |n: u8| counter_op(Address::repeat_byte(n), 0, "increment()");
    leave_two_and_a_half_worst_cases(&stack, &op(1)).await?;
    watcher.poll_once(sponsor).await?;

    let ep = EntryPointVersion::V0_7.canonical_address();
    // Redis holds its writes for a moment, so that all 32 are in flight at once whatever the
    // machine's load (the reservation script writes).
    let mut conn = redis.conn().await?;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(500)
        .arg("WRITE")
        .query_async(&mut conn)
        .await?;
    let requests = (1..=32u8).map(|n| {
        let url = stack.app.url.clone();
        let body = json!({
            "jsonrpc": "2.0", "id": 1, "method": "pm_sponsorUserOperation",
            "params": [op(n).to_json(), ep]
        });
        async move {
            let resp = reqwest::Client::new().post(url).json(&body).send().await?;
            resp.json::<Value>().await
        }
    });
    let answers = crate::sessions::futures_join_all(requests).await;
    assert_eq!(answers.len(), 32);
    let mut signed = 0;
    for v in answers {
        let v = v?;
        if v["result"]["paymasterData"].is_string() {
            signed += 1;
        } else {
            assert_eq!(v["error"]["data"]["reason"], json!("deposit_low"), "{v}");
        }
    }
    assert_eq!(signed, 2, "two worst cases fit");
    Ok(())
}

/// Withdraw the stack's v0.7 paymaster deposit down to what, less its 10 % margin, holds two
/// and a half worst cases of `op`; that worst case, gwei.
async fn leave_two_and_a_half_worst_cases(
    stack: &crate::helpers::Stack,
    op: &session_paymaster::userop::UserOperation,
) -> TestResult<u64> {
    use alloy::primitives::U256;
    use session_paymaster::ledger::wei_to_gwei_ceil;
    use session_paymaster::userop::paymaster_data::PaymasterGas;

    let worst = wei_to_gwei_ceil(op.max_cost(PaymasterGas::for_op_size(op.hashed_len())));
    let keep = U256::from(worst * 25 / 9 + 1) * U256::from(1_000_000_000u64);
    let paymaster = stack.version(EntryPointVersion::V0_7).paymaster;
    let deposit = U256::from(10u64).pow(U256::from(19u64));
    IWithdraw::new(paymaster, &stack.anvil.provider)
        .withdrawTo(stack.bundler, deposit - keep)
        .from(stack.bundler)
        .send()
        .await?
        .get_receipt()
        .await?;
    Ok(worst)
}

/// A watcher on the stack's node (its cursor in memory): from its making on, sponsorships are
/// counted against the paymaster's deposit.
fn memory_watcher(stack: &crate::helpers::Stack) -> TestResult<Watcher> {
    Ok(Watcher::new(
        stack.anvil.provider.clone(),
        stack.app.state.sponsor.chain(31337)?,
        0,
        None,
        Cursor::memory(),
    ))
}

/// Sponsor one counter op of `sender` on v0.7, valid for 5 s: what it holds open against the
/// paymaster's deposit (asserted above zero) and that scope.
async fn sponsor_briefly(stack: &crate::helpers::Stack, sender: u8) -> TestResult<(u64, String)> {
    use session_paymaster::sponsor::deposit::paymaster_scope;

    let ep = EntryPointVersion::V0_7.canonical_address();
    let op = counter_op(Address::repeat_byte(sender), 0, "increment()").to_json();
    stack
        .app
        .result(
            "pm_sponsorUserOperation",
            json!([op, ep, { "validForSeconds": 5 }]),
        )
        .await?;
    let scope = paymaster_scope(31337, ep);
    let open = stack
        .app
        .state
        .sponsor
        .ledger()
        .open("dev-counter", &scope)
        .await?;
    assert!(open > 0, "reserved");
    Ok((open, scope))
}

/// Reservations were released by the time of a block `confirmations` deep: a reorg could undo
/// it and make a landed operation look unlanded. They are released only by the finalized block.
#[tokio::test]
async fn releases_wait_for_the_finalized_block() -> TestResult {
    let stack = crate::helpers::Stack::start().await?;
    mine(&stack, 70).await?;
    // Finality::Finalized is the default; anvil finalizes 64 blocks behind its head.
    released_only_after(&stack, &memory_watcher(&stack)?, 0x11, 64).await
}

/// Sponsor an operation of `sender` valid for 5 s and move the chain 100 s on: `watcher`
/// releases nothing while the new head is all it has, and releases it once `blocks` more are
/// mined (its finality or its confirmations behind).
async fn released_only_after(
    stack: &crate::helpers::Stack,
    watcher: &Watcher,
    sender: u8,
    blocks: u64,
) -> TestResult {
    let sponsor = &stack.app.state.sponsor;
    let (_, scope) = sponsor_briefly(stack, sender).await?;
    let _: Value = stack
        .anvil
        .provider
        .raw_request("evm_increaseTime".into(), (100u64,))
        .await?;
    mine(stack, 1).await?;
    assert_eq!(
        watcher.poll_once(sponsor).await?.released,
        0,
        "the head is past it, not the block releases go by"
    );
    mine(stack, blocks).await?;
    assert_eq!(
        watcher.poll_once(sponsor).await?.released,
        1,
        "{blocks} blocks on"
    );
    assert_eq!(sponsor.ledger().open("dev-counter", &scope).await?, 0);
    Ok(())
}

/// A reorganisation deeper than the rewind (128 blocks) but above the final block: the watcher
/// read again only the last 128 blocks, so an operation that landed further back in the new
/// chain was never read, and its reservation would have been released. It now reads again from
/// the block after the final one.
#[tokio::test]
async fn a_reorganisation_deeper_than_the_rewind_is_read_again() -> TestResult {
    use crate::e2e::User;
    use session_paymaster::chain::watcher::{Finality, REORG_REWIND};

    let dir = crate::e2e::budgeted_policies()?;
    let stack = crate::helpers::Stack::start_with(Some(dir.0.clone()), None).await?;
    let provider = &stack.anvil.provider;
    let sponsor = &stack.app.state.sponsor;
    let watcher = Watcher::new(
        provider.clone(),
        sponsor.chain(31337)?,
        0,
        Some(0),
        Cursor::memory(),
    )
    .with_finality(Finality::Depth(1000));
    let snapshot: Value = provider.raw_request("evm_snapshot".into(), ()).await?;
    mine(&stack, REORG_REWIND + 72).await?;
    assert!(!watcher.poll_once(sponsor).await?.reorg);

    // The new chain: the operation lands in its first block, then it outgrows the old one.
    let _: Value = provider
        .raw_request("evm_revert".into(), (snapshot,))
        .await?;
    let user = User::new(&stack, EntryPointVersion::V0_7).await?;
    user.submit(&user.sponsored(user.op_json()).await?).await?;
    mine(&stack, REORG_REWIND + 90).await?;
    let poll = watcher.poll_once(sponsor).await?;
    assert!(poll.reorg, "{poll:?}");
    assert_eq!(poll.settled, 1, "the landed operation was read: {poll:?}");
    Ok(())
}

/// With `--finality` shallower than `--confirmations`, reservations were released by a block
/// whose earlier blocks had not been read yet: an operation that landed there was released
/// first (its cost given back until its event was read, and forgotten if its hash matched no
/// reservation). Releases now wait for the blocks the watcher has read.
#[tokio::test]
async fn releases_wait_for_the_blocks_read() -> TestResult {
    let stack = crate::helpers::Stack::start().await?;
    let watcher = Watcher::new(
        stack.anvil.provider.clone(),
        stack.app.state.sponsor.chain(31337)?,
        3,
        Some(0),
        Cursor::memory(),
    )
    .with_finality(session_paymaster::chain::watcher::Finality::Depth(0));
    released_only_after(&stack, &watcher, 0x12, 3).await
}

/// An event of our paymaster that no reservation knows (an operation sponsored before the
/// watcher counted anything) is reported, not silently dropped; one already closed is not.
#[tokio::test]
async fn events_no_reservation_knows_are_counted() -> TestResult {
    use crate::e2e::User;

    let stack = crate::helpers::Stack::start().await?;
    // Sponsored without budgets and before any watcher: nothing is reserved.
    let user = User::new(&stack, EntryPointVersion::V0_7).await?;
    user.submit(&user.sponsored(user.op_json()).await?).await?;
    let sponsor = &stack.app.state.sponsor;
    let watcher = crate::helpers::dev_watcher(stack.anvil.provider.clone(), sponsor.chain(31337)?);
    let poll = watcher.poll_once(sponsor).await?;
    assert_eq!((poll.ignored, poll.settled), (1, 0), "{poll:?}");
    Ok(())
}

/// The paymaster has the same address on every chain: a watcher whose RPC serves another
/// chain (a testnet URL in production's config) would see none of our operations land and
/// release reservations whose costs were paid here. It reads nothing of such a node, and
/// `serve` refuses one at start.
#[tokio::test]
async fn a_node_of_another_chain_settles_and_releases_nothing() -> TestResult {
    use session_paymaster::chain::watcher::WatchError;

    let stack = crate::helpers::Stack::start().await?;
    let sponsor = &stack.app.state.sponsor;
    let watcher = memory_watcher(&stack)?;
    let (open, scope) = sponsor_briefly(&stack, 0x12).await?;

    // The node now says it is chain 5; the signature has long expired and blocks are final.
    let _: Value = stack
        .anvil
        .provider
        .raw_request("anvil_setChainId".into(), (5u64,))
        .await?;
    let _: Value = stack
        .anvil
        .provider
        .raw_request("evm_increaseTime".into(), (100u64,))
        .await?;
    mine(&stack, 70).await?;
    match watcher.poll_once(sponsor).await {
        Err(WatchError::WrongChain {
            serves: 5,
            expected: 31337,
        }) => {}
        other => return Err(format!("expected WrongChain, got {other:?}").into()),
    }
    assert_eq!(
        sponsor.ledger().open("dev-counter", &scope).await?,
        open,
        "nothing released"
    );

    // (Bounded: were the check to miss, serve would run on.)
    let stderr = crate::process::serve_refuses(&["--rpc-url", &stack.anvil.url]).await?;
    assert!(stderr.contains("serves chain 5, not 31337"), "{stderr}");
    Ok(())
}

/// A paymaster configured for an EntryPoint it does not serve: our signatures are valid at the
/// paymaster's own EntryPoint, whose events the watcher would not read, so an operation sent
/// there landed unsettled, its reservation released (found by review). `serve` refuses to
/// start on it.
#[tokio::test]
async fn serve_refuses_a_paymaster_of_another_entry_point() -> TestResult {
    let stack = crate::helpers::Stack::start().await?;
    let v08 = stack.version(EntryPointVersion::V0_8);
    let paymaster = v08.paymaster.to_string();
    let stderr = crate::process::serve_refuses(&[
        "--rpc-url",
        &stack.anvil.url,
        "--paymaster-v07",
        &paymaster,
    ])
    .await?;
    assert!(
        stderr.contains(&format!("serves EntryPoint {}", v08.entry_point)),
        "{stderr}"
    );
    Ok(())
}

/// The watcher reads logs again by block hash (EIP-234) near the head; a node that refuses
/// such filters would stall settlement and releases at the first bloom that matched, long
/// after start. `serve` asks at start, and refuses such a node.
#[tokio::test]
async fn serve_refuses_a_node_without_block_hash_log_filters() -> TestResult {
    use std::sync::atomic::Ordering;

    let anvil = crate::helpers::TestAnvil::start().await?;
    let proxy = crate::helpers::RpcProxy::start(anvil.url.clone()).await?;
    proxy.no_block_hash_filter.store(true, Ordering::Relaxed);
    let stderr = crate::process::serve_refuses(&["--rpc-url", &proxy.url]).await?;
    assert!(
        stderr.contains("refuses eth_getLogs by blockHash"),
        "{stderr}"
    );
    Ok(())
}

/// A policy this replica does not serve still has reservations: removed from the set with
/// operations in flight, or another replica's during a rolling change of the published set (or
/// one this replica's version refuses). The watcher read only its own set: it ignored their
/// events and moved the shared cursor past them, and the reservations were released later,
/// the costs of what landed forgotten. It now settles every policy a replica served (Redis) or
/// reserved under (memory).
async fn a_policy_not_served_here_still_settles(
    redis: Option<&crate::helpers::TestRedis>,
) -> TestResult {
    let (stack, dir, actual) = landed_op(redis).await?;
    // The set without dev-counter, in force here.
    std::fs::remove_file(dir.0.join("dev-counter.toml"))?;
    let sponsor = &stack.app.state.sponsor;
    assert!(
        sponsor
            .live_policies()
            .offer(session_paymaster::policy::file::load_dir(&dir.0))
    );
    assert!(sponsor.policies().iter().all(|p| p.id != "dev-counter"));
    a_poll_settles_the_landed_op(&stack, sponsor, actual).await
}

#[tokio::test]
async fn a_policy_not_served_here_still_settles_on_redis() -> TestResult {
    let redis = crate::helpers::TestRedis::start().await?;
    a_policy_not_served_here_still_settles(Some(&redis)).await
}

#[tokio::test]
async fn a_policy_not_served_here_still_settles_in_memory() -> TestResult {
    a_policy_not_served_here_still_settles(None).await
}

/// A watcher of `sponsor`'s chain, from block 0, settles `landed_op`'s operation at `actual`.
async fn a_poll_settles_the_landed_op(
    stack: &crate::helpers::Stack,
    sponsor: &session_paymaster::sponsor::Sponsor,
    actual: u64,
) -> TestResult {
    let watcher = crate::helpers::dev_watcher(stack.anvil.provider.clone(), sponsor.chain(31337)?);
    let poll = watcher.poll_once(sponsor).await?;
    assert_eq!((poll.settled, poll.ignored), (1, 0), "{poll:?}");
    assert_eq!(day_usage(sponsor).await?, (actual, 1));
    Ok(())
}

/// Replicas share one cursor per chain, but each watcher read the events of its own paymasters
/// only: a replica whose `--paymaster-v07` is another (a rolling change of the paymaster, or a
/// restart with a new one while signatures of the old can still land) moved the cursor past
/// the events of the paymaster another replica signed for, and their reservations were then
/// released, the costs of what landed forgotten. Every watcher now reads every pair a replica
/// noted signing for.
#[tokio::test]
async fn a_paymaster_not_configured_here_still_settles() -> TestResult {
    let redis = crate::helpers::TestRedis::start().await?;
    let (stack, dir, actual) = landed_op(Some(&redis)).await?;
    let mut c = config(
        [Some(Address::repeat_byte(0x77)), None, None],
        KeySource::Ephemeral,
    );
    c.policies_dir = dir.0.clone();
    c.redis_url = Some(redis.url.clone());
    let other = TestApp::spawn(c).await?;
    let sponsor = &other.state.sponsor;
    a_poll_settles_the_landed_op(&stack, sponsor, actual).await
}

/// A replica notes its paymasters at start and on every policy poll, as signing until its
/// longest validity and the grace hour from then; one whose notes fail (the node of their
/// Redis key down) stops signing before a watcher could forget its paymasters. (In process,
/// with a later clock: an hour without a note.)
#[tokio::test]
async fn a_replica_whose_paymasters_are_not_noted_signs_nothing_that_outlasts_the_note()
-> TestResult {
    use session_paymaster::clock::unix_now;
    use session_paymaster::ledger::GRACE_SECS;
    use session_paymaster::sponsor::{Mode, RequestContext, SponsorError, SponsorRequest};

    let redis = crate::helpers::TestRedis::start().await?;
    let mut c = config(
        [Some(Address::repeat_byte(7)), None, None],
        KeySource::Ephemeral,
    );
    c.redis_url = Some(redis.url.clone());
    // Budgets: a reservation is made (without one, nothing is left for a watcher to settle).
    let dir = crate::e2e::budgeted_policies()?;
    c.policies_dir = dir.0.clone();
    let app = TestApp::spawn(c).await?;
    let sponsor = &app.state.sponsor;
    let context = RequestContext::default();
    let op = |n: u64| counter_op(Address::repeat_byte(0x11), n, "increment()");
    let (first, second) = (op(0), op(1));
    let req = |op| SponsorRequest {
        chain_id: 31337,
        op,
        entry_point: EntryPointVersion::V0_7.canonical_address(),
        context: &context,
        mode: Mode::Final,
        keep_client_gas: false,
        allowed_policies: None,
    };
    let now = unix_now();
    assert!(sponsor.sponsor(req(&first), now).await.is_ok());
    let later = now + GRACE_SECS + 60;
    match sponsor.sponsor(req(&second), later).await {
        Err(SponsorError::Store(e)) => assert!(e.to_string().contains("paymasters"), "{e}"),
        other => panic!("signed past the last note: {other:?}"),
    }
    sponsor.serve_paymasters(&sponsor.policies(), later).await?;
    assert!(sponsor.sponsor(req(&second), later).await.is_ok());
    Ok(())
}

/// A landed operation three blocks below the head, and a watcher without a cursor that reads
/// the chain through a proxy (`RpcProxy`) that can play a node's faults.
struct Proxied {
    /// (Kept: its drop stops the Redis the stack uses.)
    _redis: crate::helpers::TestRedis,
    stack: crate::helpers::Stack,
    _dir: crate::helpers::TempDir,
    /// The operation's actual cost, gwei.
    actual: u64,
    proxy: crate::helpers::RpcProxy,
    /// The head when the watcher was made.
    head: u64,
    watcher: Watcher,
}

async fn landed_behind_a_proxy() -> TestResult<Proxied> {
    let redis = crate::helpers::TestRedis::start().await?;
    let (stack, dir, actual) = landed_op(Some(&redis)).await?;
    mine(&stack, 3).await?;
    let proxy = crate::helpers::RpcProxy::start(stack.anvil.url.clone()).await?;
    let provider = ProviderBuilder::new()
        .connect_http(proxy.url.parse()?)
        .erased();
    let head = provider.get_block_number().await?;
    let watcher = crate::helpers::dev_watcher(provider, stack.app.state.sponsor.chain(31337)?);
    Ok(Proxied {
        _redis: redis,
        stack,
        _dir: dir,
        actual,
        proxy,
        head,
        watcher,
    })
}

/// A load-balanced RPC's backend that lags may answer `eth_getLogs` over blocks it does not
/// have yet with no logs rather than an error, while another answers the head and the block
/// reads: the cursor moved past the landed operation, whose reservation was then released and
/// its cost forgotten (found by review). A block whose bloom may hold an event of ours now has
/// its logs read again by its hash, which such a backend refuses: the poll fails, and the
/// range is read again once the backend has caught up.
#[tokio::test]
async fn a_backend_that_lags_behind_the_logs_asked_for_fails_the_poll() -> TestResult {
    use session_paymaster::chain::watcher::WatchError;
    use std::sync::atomic::Ordering;

    let p = landed_behind_a_proxy().await?;
    let (sponsor, head, actual) = (&p.stack.app.state.sponsor, p.head, p.actual);

    let reserved = day_usage(sponsor).await?;
    assert!(reserved.0 > actual, "open at its worst case: {reserved:?}");
    p.proxy.logs_lag.store(true, Ordering::Relaxed);
    match p.watcher.poll_once(sponsor).await {
        Err(WatchError::Rpc(m)) if m.contains("a backend that lags") => {}
        other => panic!("logs answered without the landed block pass the poll: {other:?}"),
    }
    assert_eq!(day_usage(sponsor).await?, reserved, "nothing settled yet");
    p.proxy.logs_lag.store(false, Ordering::Relaxed);
    let poll = p.watcher.poll_once(sponsor).await?;
    assert_eq!((poll.settled, poll.to_block), (1, head), "{poll:?}");
    assert_eq!(day_usage(sponsor).await?, (actual, 1));
    // The blocks after it hold no event of ours: their blooms say so, and nothing is read
    // again (a backend lagging now would go unnoticed there, and need not be noticed).
    mine(&p.stack, 2).await?;
    p.proxy.logs_lag.store(true, Ordering::Relaxed);
    let poll = p.watcher.poll_once(sponsor).await?;
    assert_eq!((poll.settled, poll.to_block), (0, head + 2), "{poll:?}");
    Ok(())
}

/// A range's logs and its last block's hash were read in two calls: a block that changed
/// between (a reorganisation deeper than the confirmations, or a load-balanced RPC's backends
/// on two forks) left the cursor naming one fork over the logs of another, so the
/// reorganisation was never seen; and a node without the block (a backend that lags) left a
/// cursor without a hash, never checked again. Either now fails the poll, and the range is
/// read again.
#[tokio::test]
async fn a_range_whose_last_block_changes_while_read_is_read_again() -> TestResult {
    use session_paymaster::chain::watcher::WatchError;
    use std::sync::atomic::Ordering;

    // From block 0 without a cursor: one range, to the head.
    let p = landed_behind_a_proxy().await?;
    let (sponsor, head, actual) = (&p.stack.app.state.sponsor, p.head, p.actual);

    p.proxy.missing_blocks.store(true, Ordering::Relaxed);
    match p.watcher.poll_once(sponsor).await {
        Err(WatchError::Rpc(m)) if m.contains(&format!("has no block {head}")) => {}
        other => panic!("a missing block fails the poll: {other:?}"),
    }
    p.proxy.missing_blocks.store(false, Ordering::Relaxed);
    // The range's last block, read after its logs, answers another hash (its first block
    // lookup is that block before the logs, the second after them).
    p.proxy.other_hash_in.store(2, Ordering::Relaxed);
    match p.watcher.poll_once(sponsor).await {
        Err(WatchError::Rpc(m)) if m.contains(&format!("block {head} changed")) => {}
        other => panic!("a changed block fails the poll: {other:?}"),
    }
    assert_eq!(
        day_usage(sponsor).await?,
        (actual, 1),
        "what it settled stays"
    );
    let poll = p.watcher.poll_once(sponsor).await?;
    assert_eq!(
        (poll.settled, poll.to_block),
        (0, head),
        "read again (closed once), and on: {poll:?}"
    );
    assert_eq!(day_usage(sponsor).await?, (actual, 1));

    // With a cursor: the cursor's block, read again after the next range's logs, answers
    // another hash (a reorganisation deeper than the confirmations since the poll checked it:
    // its lookups are the cursor's block, the range's last block before and after the logs,
    // then the cursor's block again). The range was read on a fork without the cursor's
    // block: the poll fails, and the cursor stays.
    mine(&p.stack, 2).await?;
    p.proxy.other_hash_in.store(4, Ordering::Relaxed);
    match p.watcher.poll_once(sponsor).await {
        Err(WatchError::Rpc(m)) if m.contains(&format!("cursor's block {head} changed")) => {}
        other => panic!("a cursor block that changed fails the poll: {other:?}"),
    }
    let poll = p.watcher.poll_once(sponsor).await?;
    assert_eq!(poll.to_block, head + 2, "{poll:?}");
    Ok(())
}
