//! The two deployment paths agree: `contracts/script/Deploy.s.sol` (what operators run with
//! their own key) puts SessionPaymaster exactly where the Rust deploy path predicts.

use std::process::Command;

use alloy::primitives::{Address, U256};
use alloy::providers::Provider;
use session_paymaster::chain::deploy::{Artifacts, create2, entry_point_salt};
use session_paymaster::userop::{EntryPointVersion, ISessionPaymaster};

use crate::helpers::{TestAnvil, TestRedis, TestResult, TlsForwarder, contracts_dir};

/// `deploy` predicts a paymaster's address from its build: a change to the bytecode of a
/// version already in production makes it plan a second paymaster (with a second deposit and
/// stake) beside the one operators run. The v0.7 build is the one of before v0.9 and EIP-7702
/// (both live in `contracts/base/v08`, `v09`); v0.8's changed once, for EIP-7702 accounts
/// (docs/operations.md, "Upgrading"). Changing a build on purpose means telling operators there
/// and updating its hash here.
#[test]
fn the_deployed_builds_are_unchanged() -> TestResult {
    let artifacts = Artifacts::new(contracts_dir());
    for (version, expected) in [
        (
            EntryPointVersion::V0_7,
            "0xe532dbe581548e8e4f915db883d42baddbbc70956885ff9967d22ee5aa9fa20b",
        ),
        (
            EntryPointVersion::V0_8,
            "0x6567bd605d9aef6b809ddaf78ca21d94c95eab411d54a0800be5e6b691273068",
        ),
    ] {
        let code = artifacts.session_paymaster(version)?;
        assert_eq!(
            alloy::primitives::keccak256(&code).to_string(),
            expected,
            "SessionPaymaster's v{version} bytecode changed"
        );
    }
    Ok(())
}

#[tokio::test]
async fn forge_deploy_script_lands_at_the_predicted_address() -> TestResult {
    for version in EntryPointVersion::ALL {
        // A forge that does not end is tried once more on a fresh anvil (a suite's run once
        // hung here until its 1500 s guard, with nothing said): what it printed is shown.
        let mut attempt = 1;
        loop {
            match deploy_and_check(version).await? {
                None => break,
                Some(printed) if attempt == 1 => {
                    eprintln!(
                        "forge script (v{version}) did not end within {FORGE_LIMIT:?}; trying once more. It printed:\n{printed}"
                    );
                    attempt += 1;
                }
                Some(printed) => {
                    return Err(format!(
                        "forge script (v{version}) did not end within {FORGE_LIMIT:?}, twice. It printed:\n{printed}"
                    )
                    .into());
                }
            }
        }
    }
    Ok(())
}

/// Longest one `forge script` of Deploy.s.sol may take (it takes about a second).
const FORGE_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// The EntryPoint of `version`, created on `anvil` by `from` through the deterministic
/// deployer, checked at its canonical address.
async fn canonical_entry_point(
    anvil: &TestAnvil,
    from: Address,
    artifacts: &Artifacts,
    version: EntryPointVersion,
) -> TestResult<Address> {
    let ep = create2(
        &anvil.provider,
        from,
        entry_point_salt(version),
        &artifacts.entry_point(version)?,
        "EntryPoint",
    )
    .await?;
    assert_eq!(
        ep,
        version.spec().package_entry_point,
        "EntryPoint v{version}"
    );
    Ok(ep)
}

/// On a new anvil, the EntryPoint of `version` at its address, then `forge script` of
/// Deploy.s.sol, and its paymaster checked at the address `deploy` predicts. `Some(printed)`:
/// forge did not end within [`FORGE_LIMIT`] (killed; what it printed).
async fn deploy_and_check(version: EntryPointVersion) -> TestResult<Option<String>> {
    let anvil = TestAnvil::start().await?;
    let from = anvil.account().await?;
    let artifacts = Artifacts::new(contracts_dir());
    let ep = canonical_entry_point(&anvil, from, &artifacts, version).await?;

    let (owner, signer) = (Address::repeat_byte(0x0d), Address::repeat_byte(0x5e));
    let predicted = artifacts.session_paymaster_address(version, ep, owner, &[signer])?;
    let profile = version.spec().forge_profile;
    // Its output to a file (a pipe nobody reads while it runs could fill and stop it).
    let out_dir = crate::helpers::TempDir::new("forge");
    let out_path = out_dir.0.join("out.txt");
    let out_file = std::fs::File::create(&out_path)?;
    let mut forge = Command::new(contracts_dir().join("node_modules/.bin/forge"))
        .current_dir(contracts_dir())
        .args([
            "script",
            "script/Deploy.s.sol",
            "--rpc-url",
            &anvil.url,
            "--broadcast",
            "--unlocked",
        ])
        .args(["--sender", &from.to_string()])
        .env("FOUNDRY_PROFILE", profile)
        .env("ENTRY_POINT", ep.to_string())
        .env("PAYMASTER_OWNER", owner.to_string())
        .env("PAYMASTER_SIGNER", signer.to_string())
        .env("PAYMASTER_DEPOSIT_WEI", "12345")
        .stdout(out_file.try_clone()?)
        .stderr(out_file)
        .spawn()?;
    let deadline = std::time::Instant::now() + FORGE_LIMIT;
    let status = loop {
        if let Some(status) = forge.try_wait()? {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = forge.kill();
            let _ = forge.wait();
            return Ok(Some(std::fs::read_to_string(&out_path).unwrap_or_default()));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(
        status.success(),
        "forge script: {}",
        std::fs::read_to_string(&out_path).unwrap_or_default()
    );

    assert!(
        !anvil.provider.get_code_at(predicted).await?.is_empty(),
        "code at {predicted}"
    );
    let pm = ISessionPaymaster::new(predicted, &anvil.provider);
    assert_eq!(pm.owner().call().await?, owner);
    assert!(pm.isSigner(signer).call().await?);
    assert_eq!(pm.getDeposit().call().await?, U256::from(12345));
    Ok(None)
}

/// A new signer key at `key_file`, and the dev stack on `anvil` with paymasters of both
/// versions owned by the node's account, `deposit` each: (signer, owner, [v0.7, v0.8]).
async fn paymasters_with_a_signer(
    anvil: &TestAnvil,
    key_file: &std::path::Path,
    deposit: U256,
) -> TestResult<(Address, Address, [Address; 2])> {
    let signer = session_paymaster::signer::keygen(key_file)?;
    let from = anvil.account().await?;
    let deployed = session_paymaster::chain::deploy::deploy_dev_stack(
        &anvil.provider,
        &Artifacts::new(contracts_dir()),
        from,
        from,
        &[signer],
        deposit,
    )
    .await?;
    let paymasters = [
        deployed.entry_points[0].paymaster,
        deployed.entry_points[1].paymaster,
    ];
    Ok((signer, from, paymasters))
}

/// `session-paymaster status`, the binary against anvil: each configured paymaster's deposit
/// (what deploy-dev put there), owner, the configured signer authorised, no stake (warned);
/// after the owner stakes, the stake and its delay; with a key the paymasters do not know, a
/// warning that its sponsorships would fail.
#[tokio::test]
async fn status_reports_deposit_stake_owner_and_signer() -> TestResult {
    let anvil = TestAnvil::start().await?;
    let keys = crate::helpers::TempDir::new("status");
    let key_file = keys.0.join("signer.key");
    let deposit = U256::from(10u64).pow(U256::from(19u64));
    let (signer, from, [pm07, pm08]) = paymasters_with_a_signer(&anvil, &key_file, deposit).await?;
    let status = |key: &std::path::Path| -> TestResult<serde_json::Value> {
        let out = Command::new(env!("CARGO_BIN_EXE_session-paymaster"))
            .args(["status", "--rpc-url", &anvil.url])
            .args(["--paymaster-v07", &pm07.to_string()])
            .args(["--paymaster-v08", &pm08.to_string()])
            .arg("--signer-key-file")
            .arg(key)
            .output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let report = status(&key_file)?;
    assert_eq!(report["chainId"], 31337);
    let pms = report["paymasters"].as_array().ok_or("paymasters")?;
    assert_eq!(pms.len(), 2);
    for (pm, expected) in pms.iter().zip([pm07, pm08]) {
        assert_eq!(pm["paymaster"], format!("{expected:#x}"));
        assert_eq!(pm["deployed"], true);
        assert_eq!(pm["depositWei"], "10000000000000000000");
        assert_eq!(pm["owner"], format!("{from:#x}"));
        assert_eq!(pm["signer"]["address"], format!("{signer:#x}"));
        assert_eq!(pm["signer"]["authorised"], true);
        assert_eq!(pm["signers"], serde_json::json!([format!("{signer:#x}")]));
        assert_eq!(pm["staked"], false);
        assert!(pm["openReservationsWei"].is_null(), "no Redis configured");
        let warnings = pm["warnings"].to_string();
        assert!(
            warnings.contains("not staked") && !warnings.contains("other signer"),
            "{warnings}"
        );
    }

    let receipt = ISessionPaymaster::new(pm07, &anvil.provider)
        .addStake(86_400)
        .value(U256::from(10u64).pow(U256::from(18u64)))
        .from(from)
        .send()
        .await?
        .get_receipt()
        .await?;
    assert!(receipt.status());
    let other_key = keys.0.join("other.key");
    let other = session_paymaster::signer::keygen(&other_key)?;
    let report = status(&other_key)?;
    let v07 = &report["paymasters"][0];
    assert_eq!(v07["staked"], true);
    assert_eq!(v07["stakeWei"], "1000000000000000000");
    assert_eq!(v07["unstakeDelaySecs"], 86_400);
    assert_eq!(v07["signer"]["address"], format!("{other:#x}"));
    assert_eq!(v07["signer"]["authorised"], false);
    let warnings = v07["warnings"].to_string();
    assert!(
        warnings.contains("AA34") && !warnings.contains("not staked"),
        "{warnings}"
    );

    // A second signer (a rotation half done): listed, and named as one to remove if unused.
    let receipt = ISessionPaymaster::new(pm07, &anvil.provider)
        .addSigner(other)
        .from(from)
        .send()
        .await?
        .get_receipt()
        .await?;
    assert!(receipt.status());
    let report = status(&key_file)?;
    let v07 = &report["paymasters"][0];
    let listed = v07["signers"].as_array().ok_or("signers")?;
    assert_eq!(listed.len(), 2, "{v07}");
    assert!(
        listed.contains(&serde_json::json!(format!("{other:#x}"))),
        "{v07}"
    );
    assert!(
        v07["warnings"].to_string().contains("1 other signer(s)"),
        "{v07}"
    );
    Ok(())
}

alloy::sol! {
    #[sol(rpc)]
    interface IStakeUnlock {
        function unlockStake() external;
        function transferOwnership(address newOwner) external;
    }
}

/// `session-paymaster deploy` against anvil, as an operator runs it: the key from the
/// environment; the paymaster lands at the address predicted from (EntryPoint, owner,
/// signers), deposited and staked; a second run finds it and sends nothing; a larger deposit
/// is topped up by the difference, also with the key from an encrypted keystore; `--dry-run`
/// for another owner sends nothing and leaves the stake to that owner; without a key it refuses.
#[tokio::test]
async fn deploy_is_predicted_idempotent_and_tops_up() -> TestResult {
    use alloy::network::TransactionBuilder;
    use alloy::signers::local::PrivateKeySigner;

    let anvil = TestAnvil::start().await?;
    let unlocked = anvil.account().await?;
    let artifacts = Artifacts::new(contracts_dir());
    let version = EntryPointVersion::V0_7;
    let ep = canonical_entry_point(&anvil, unlocked, &artifacts, version).await?;
    // A fresh operator key, funded by the node's account.
    let operator = PrivateKeySigner::random();
    let ether = U256::from(10u64).pow(U256::from(18u64));
    let fund = alloy::rpc::types::TransactionRequest::default()
        .with_from(unlocked)
        .with_to(operator.address())
        .with_value(ether * U256::from(10u64));
    session_paymaster::chain::deploy::send(&anvil.provider, fund).await?;
    let key_hex = hex::encode(operator.to_bytes());
    let signer = Address::repeat_byte(0x5e);
    let deploy =
        |extra: &[&str], key: Option<&str>| -> TestResult<(bool, serde_json::Value, String)> {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_session-paymaster"));
            cmd.args(["deploy", "--rpc-url", &anvil.url, "--entry-point", "0.7"])
                .args(["--signer", &signer.to_string()])
                .arg("--contracts")
                .arg(contracts_dir())
                .args(extra)
                .env_remove("SP_DEPLOYER_KEY");
            if !extra.contains(&"--chain-id") {
                cmd.args(["--chain-id", "31337"]);
            }
            if let Some(k) = key {
                cmd.env("SP_DEPLOYER_KEY", k);
            }
            let out = cmd.output()?;
            let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            Ok((
                out.status.success(),
                json,
                String::from_utf8_lossy(&out.stderr).into(),
            ))
        };
    let owner = operator.address().to_string();
    let asked = [
        "--owner",
        &owner,
        "--deposit",
        "1ether",
        "--stake",
        "1 ether",
        "--unstake-delay",
        "1d",
    ];

    let (ok, first, err) = deploy(&asked, Some(&key_hex))?;
    assert!(ok, "{err}");
    let predicted =
        artifacts.session_paymaster_address(version, ep, operator.address(), &[signer])?;
    assert_eq!(first["plan"]["paymaster"], format!("{predicted:#x}"));
    assert_eq!(first["plan"]["deployed"], false);
    assert_eq!(
        first["plan"]["transactions"].as_array().map(Vec::len),
        Some(3),
        "{first}"
    );
    assert!(
        first["serveConfig"]
            .to_string()
            .contains(&format!("paymaster_v07 = \\\"{predicted}\\\"")),
        "{first}"
    );
    let info = session_paymaster::userop::IEntryPoint::new(ep, &anvil.provider)
        .getDepositInfo(predicted)
        .call()
        .await?;
    assert_eq!(info.deposit, ether);
    assert!(info.staked);
    assert_eq!(U256::from(info.stake), ether);
    assert_eq!(info.unstakeDelaySec, 86_400);
    let pm = ISessionPaymaster::new(predicted, &anvil.provider);
    assert_eq!(pm.owner().call().await?, operator.address());
    assert!(pm.isSigner(signer).call().await?);

    // Again: found, nothing to send.
    let (ok, again, err) = deploy(&asked, Some(&key_hex))?;
    assert!(ok, "{err}");
    assert_eq!(again["plan"]["deployed"], true);
    assert_eq!(again["plan"]["transactions"], serde_json::json!([]));
    assert_eq!(again["plan"]["ownerTransactions"], serde_json::json!([]));
    assert_eq!(again["transactionsSent"], 0);

    // A larger deposit: topped up by the difference only.
    let more = ["--owner", &owner, "--deposit", "3ether"];
    let (ok, top_up, err) = deploy(&more, Some(&key_hex))?;
    assert!(ok, "{err}");
    assert_eq!(
        top_up["plan"]["transactions"][0]["value"],
        (ether * U256::from(2u64)).to_string()
    );
    let info = session_paymaster::userop::IEntryPoint::new(ep, &anvil.provider)
        .getDepositInfo(predicted)
        .call()
        .await?;
    assert_eq!(info.deposit, ether * U256::from(3u64));

    // The key from an encrypted keystore (as `cast wallet import` writes it), its password
    // from the environment: a wrong password is refused, echoing neither it nor the key; the
    // right one tops the deposit up.
    let keystores = crate::helpers::TempDir::new("keystore");
    let out = Command::new(contracts_dir().join("node_modules/.bin/cast"))
        .args(["wallet", "import", "operator", "--private-key", &key_hex])
        .args(["--unsafe-password", "correct horse", "--keystore-dir"])
        .arg(&keystores.0)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let with_keystore = |password: &str| -> TestResult<(bool, String)> {
        let out = Command::new(env!("CARGO_BIN_EXE_session-paymaster"))
            .args(["deploy", "--rpc-url", &anvil.url, "--entry-point", "0.7"])
            .args(["--chain-id", "31337", "--signer", &signer.to_string()])
            .args(["--owner", &owner, "--deposit", "4ether", "--contracts"])
            .arg(contracts_dir())
            .arg("--keystore")
            .arg(keystores.0.join("operator"))
            .env_remove("SP_DEPLOYER_KEY")
            .env("SP_DEPLOYER_KEYSTORE_PASSWORD", password)
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into(),
        ))
    };
    let (ok, err) = with_keystore("wrong horse")?;
    assert!(!ok && err.contains("cannot decrypt"), "{err}");
    assert!(
        !err.contains("wrong horse") && !err.contains(&key_hex),
        "{err}"
    );
    let (ok, err) = with_keystore("correct horse")?;
    assert!(ok, "{err}");
    let info = session_paymaster::userop::IEntryPoint::new(ep, &anvil.provider)
        .getDepositInfo(predicted)
        .call()
        .await?;
    assert_eq!(info.deposit, ether * U256::from(4u64));

    // Another owner, dry run for the operator as sender, no key: the plan only; staking is
    // the owner's.
    let other = Address::repeat_byte(0x0d).to_string();
    let dry = [
        "--owner",
        &other,
        "--from",
        &owner,
        "--deposit",
        "1ether",
        "--stake",
        "1ether",
        "--dry-run",
    ];
    let (ok, plan, err) = deploy(&dry, None)?;
    assert!(ok, "{err}");
    let elsewhere: Address = plan["plan"]["paymaster"]
        .as_str()
        .ok_or("address")?
        .parse()?;
    assert_ne!(elsewhere, predicted, "the owner is part of the address");
    assert_eq!(
        plan["plan"]["transactions"].as_array().map(Vec::len),
        Some(2),
        "{plan}"
    );
    assert_eq!(
        plan["plan"]["ownerTransactions"].as_array().map(Vec::len),
        Some(1),
        "{plan}"
    );
    assert!(
        anvil.provider.get_code_at(elsewhere).await?.is_empty(),
        "nothing sent"
    );

    // The owner unlocks the stake: a run asking for the stake locks it again (staked, the
    // same amount, nothing added).
    // (The operator's key is not one the node unlocks: its transactions are signed here, by a
    // provider made for each, since the binary sends from the same key in between.)
    let operator_provider = || -> TestResult<alloy::providers::DynProvider> {
        Ok(alloy::providers::ProviderBuilder::new()
            .wallet(alloy::network::EthereumWallet::from(operator.clone()))
            .connect_http(anvil.url.parse()?)
            .erased())
    };
    let receipt = IStakeUnlock::new(predicted, &operator_provider()?)
        .unlockStake()
        .send()
        .await?
        .get_receipt()
        .await?;
    assert!(receipt.status());
    let (ok, relock, err) = deploy(&asked, Some(&key_hex))?;
    assert!(ok, "{err}");
    assert_eq!(
        relock["plan"]["transactions"].as_array().map(Vec::len),
        Some(1),
        "{relock}"
    );
    assert_eq!(relock["plan"]["transactions"][0]["value"], "0");
    let info = session_paymaster::userop::IEntryPoint::new(ep, &anvil.provider)
        .getDepositInfo(predicted)
        .call()
        .await?;
    assert!(info.staked, "locked again");
    assert_eq!(U256::from(info.stake), ether);

    // The owner hands the paymaster on: a run for the old owner refuses to fund it.
    let receipt = ISessionPaymaster::new(predicted, &operator_provider()?)
        .removeSigner(signer)
        .send()
        .await?
        .get_receipt()
        .await?;
    assert!(receipt.status());
    let (ok, _, err) = deploy(&more, Some(&key_hex))?;
    assert!(!ok && err.contains("no longer one of its signers"), "{err}");

    // Offered to a new owner (who may accept, then withdraw): a run for the signer still
    // there refuses to fund it.
    let signer_again = ["--owner", &owner, "--deposit", "5ether"];
    let receipt = IStakeUnlock::new(predicted, &operator_provider()?)
        .transferOwnership(Address::repeat_byte(0x77))
        .send()
        .await?
        .get_receipt()
        .await?;
    assert!(receipt.status());
    let receipt = ISessionPaymaster::new(predicted, &operator_provider()?)
        .addSigner(signer)
        .send()
        .await?
        .get_receipt()
        .await?;
    assert!(receipt.status());
    let (ok, _, err) = deploy(&signer_again, Some(&key_hex))?;
    assert!(!ok && err.contains("being transferred"), "{err}");

    // A chain id the RPC does not serve: refused before anything is planned or sent.
    let (ok, _, err) = deploy(&["--owner", &owner, "--chain-id", "1"], Some(&key_hex))?;
    assert!(!ok && err.contains("not --chain-id 1"), "{err}");

    // A key pasted as --key-env by mistake: refused, and not echoed.
    let pasted = format!("0x{key_hex}");
    let (ok, _, err) = deploy(&["--owner", &owner, "--key-env", &pasted], None)?;
    assert!(
        !ok && err.contains("NAME of an environment variable"),
        "{err}"
    );
    assert!(!err.contains(&key_hex), "the key is never echoed");

    // No key, not a dry run: refused, nothing sent.
    let (ok, _, err) = deploy(&["--owner", &other], None)?;
    assert!(!ok);
    assert!(err.contains("SP_DEPLOYER_KEY"), "{err}");
    Ok(())
}

/// A production chain RPC is `https://` and a managed Redis often `rediss://`: `status` reads
/// both through TLS, verifies the certificates against the system store (`SSL_CERT_FILE`, as an
/// operator's private CA would be), and refuses one it cannot verify, naming why.
#[tokio::test]
async fn status_reads_the_chain_over_https_and_redis_over_tls() -> TestResult {
    let anvil = TestAnvil::start().await?;
    let redis = TestRedis::start().await?;
    let keys = crate::helpers::TempDir::new("status-tls");
    let key_file = keys.0.join("signer.key");
    let (_, _, [pm07, _]) = paymasters_with_a_signer(&anvil, &key_file, U256::from(7u64)).await?;
    let plain = |url: &str| -> TestResult<std::net::SocketAddr> {
        Ok(url.split("://").nth(1).ok_or("url")?.parse()?)
    };
    let https = TlsForwarder::start(plain(&anvil.url)?).await?;
    let rediss = TlsForwarder::start(plain(&redis.url)?).await?;
    let bundle = keys.0.join("ca.pem");
    std::fs::write(
        &bundle,
        [std::fs::read(&https.cert)?, std::fs::read(&rediss.cert)?].concat(),
    )?;
    // The forwarders run on this test's runtime: the command waits off it.
    let status = async |ca: Option<&std::path::Path>| -> TestResult<std::process::Output> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_session-paymaster"));
        cmd.args([
            "status",
            "--rpc-url",
            &format!("https://localhost:{}", https.port),
        ])
        .args([
            "--redis-url",
            &format!("rediss://localhost:{}", rediss.port),
        ])
        .args(["--paymaster-v07", &pm07.to_string()])
        .arg("--signer-key-file")
        .arg(&key_file)
        .env_remove("SSL_CERT_DIR");
        match ca {
            Some(ca) => cmd.env("SSL_CERT_FILE", ca),
            None => cmd.env("SSL_CERT_FILE", "/nonexistent"),
        };
        Ok(tokio::task::spawn_blocking(move || cmd.output()).await??)
    };

    let out = status(Some(&bundle)).await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["chainId"], 31337);
    let pm = &report["paymasters"][0];
    assert_eq!(pm["depositWei"], "7");
    assert_eq!(pm["signer"]["authorised"], true);
    assert_eq!(pm["openReservationsWei"], "0", "read from Redis over TLS");

    // A certificate nobody vouches for is refused, and the operator is told why.
    let out = status(None).await?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("certificate"), "{stderr}");
    Ok(())
}
