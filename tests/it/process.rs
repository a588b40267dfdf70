//! The real binary: graceful stop on SIGTERM with requests in flight, and no secret (signer
//! key, API key, admin token) in its logs, even at debug level.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::helpers::{ADMIN_TOKEN, KillOnDrop, TempDir, TestResult, counter_op, repo_dir};

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_and_no_secret_is_logged() -> TestResult {
    let dir = TempDir::new("process");
    let key_file = dir.0.join("signer.key");
    session_paymaster::signer::keygen(&key_file)?;
    let signer_key = std::fs::read_to_string(&key_file)?
        .trim()
        .trim_start_matches("0x")
        .to_owned();
    let api_key = "sp_process_test_key_0123456789";
    let port = crate::helpers::free_port();
    let log_path = dir.0.join("serve.log");
    let child = Command::new(env!("CARGO_BIN_EXE_session-paymaster"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--policies")
        .arg(repo_dir().join("policies"))
        .arg("--signer-key-file")
        .arg(&key_file)
        .args([
            "--paymaster-v07",
            "0x0707070707070707070707070707070707070707",
        ])
        .args([
            "--api-key",
            &format!("test:0x{}", hex::encode(Sha256::digest(api_key))),
        ])
        .args([
            "--admin-token-sha256",
            &format!("0x{}", hex::encode(Sha256::digest(ADMIN_TOKEN))),
        ])
        .env("SP_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()?;
    let mut child = KillOnDrop(child);
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.get(format!("{url}/healthz")).send().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "service did not start: {}",
            std::fs::read_to_string(&log_path)?
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A default `serve` offers every version at its canonical address.
    let supported: Value = client
        .post(&url)
        .bearer_auth(api_key)
        .json(&json!({ "jsonrpc": "2.0", "id": 1, "method": "pm_supportedEntryPoints", "params": [] }))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        supported["result"],
        json!([
            "0x0000000071727De22E5E9d8BAf0edAc6f37da032",
            "0x4337084D9E255Ff0702461CF8895CE9E3b5Ff108",
            "0x433709009B8330FDa32311DF1C2AFA402eD8D009"
        ]),
        "{supported}"
    );

    // Traffic that touches every secret: good and bad API keys, admin calls, signatures.
    let ep = session_paymaster::userop::EntryPointVersion::V0_7.canonical_address();
    let body = |n: u64| {
        json!({ "jsonrpc": "2.0", "id": n, "method": "pm_sponsorUserOperation",
        "params": [counter_op(alloy::primitives::Address::repeat_byte(0x11), n, "increment()").to_json(), ep] })
    };
    for bearer in [api_key, "sp_wrong_key", ADMIN_TOKEN] {
        let _ = client
            .post(&url)
            .bearer_auth(bearer)
            .json(&body(0))
            .send()
            .await?;
    }
    let _ = client
        .get(format!(
            "{url}/admin/sessions?account=0x1111111111111111111111111111111111111111"
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    let _ = client
        .get(format!("{url}/admin/sessions/0x12"))
        .bearer_auth(api_key)
        .send()
        .await?;

    // Requests in flight when SIGTERM arrives all get complete answers. SIGTERM goes out once
    // the first answer is back, so the stop lands in the middle of the burst.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (1..=200u64)
        .map(|n| {
            let (client, url, body, done) = (client.clone(), url.clone(), body(n), done.clone());
            tokio::spawn(async move {
                let resp = client
                    .post(&url)
                    .bearer_auth(api_key)
                    .json(&body)
                    .send()
                    .await
                    .ok()?;
                let answer = (resp.status().as_u16(), resp.json::<Value>().await.ok()?);
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Some(answer)
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while done.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no answer");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()?;
    assert!(status.success());
    let mut answered = 0;
    for t in tasks {
        // A request either completed with a full answer or was never accepted (connection
        // refused after the stop): never a torn or failed answer.
        if let Some((code, v)) = t.await? {
            assert_eq!(code, 200, "{v}");
            assert!(v["result"]["paymasterData"].is_string(), "{v}");
            answered += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(s) = child.0.try_wait()? {
            break s;
        }
        assert!(Instant::now() < deadline, "did not stop after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "exit status {exit}");
    assert!(answered > 0, "some requests were in flight");

    let mut logs = String::new();
    std::fs::File::open(&log_path)?.read_to_string(&mut logs)?;
    assert!(logs.contains("shutting down"), "{logs}");
    for (what, secret) in [
        ("signer key", signer_key.as_str()),
        ("API key", api_key),
        ("admin token", ADMIN_TOKEN),
    ] {
        assert!(!logs.contains(secret), "the {what} appears in the logs");
    }
    Ok(())
}

/// defaults < configuration file < `SP_*` environment < flags, seen through `--print-config`;
/// secrets masked; unknown keys refused.
#[test]
fn configuration_layers_and_print_config() -> TestResult {
    let dir = TempDir::new("config");
    let file = dir.0.join("sp.toml");
    std::fs::write(
        &file,
        "chain_id = 8453\nsponsor_name = \"file\"\nlisten = \"127.0.0.1:5555\"\nredis_url = \"redis://user:hunter2@localhost:6379\"\n\
         api_key = [\"a:0x1111111111111111111111111111111111111111111111111111111111111111\"]\n\
         no_settlement = true\npublish_policies = false\n",
    )?;
    let run = |extra_env: &[(&str, &str)], args: &[&str]| -> TestResult<(bool, String, String)> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_session-paymaster"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&file)
            .args(args)
            .arg("--print-config");
        for var in [
            "SP_CHAIN_ID",
            "SP_SPONSOR_NAME",
            "SP_LISTEN",
            "SP_REDIS_URL",
            "SP_API_KEYS",
            "SP_CONFIG",
            "SP_NO_SETTLEMENT",
            "SP_PUBLISH_POLICIES",
            "SP_SESSION_COPIES",
        ] {
            cmd.env_remove(var);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let out = cmd.output()?;
        Ok((
            out.status.success(),
            String::from_utf8(out.stdout)?,
            String::from_utf8(out.stderr)?,
        ))
    };
    let (ok, printed, err) = run(
        &[("SP_CHAIN_ID", "10"), ("SP_SESSION_COPIES", "200000")],
        &["--sponsor-name", "flag"],
    )?;
    assert!(ok, "{err}");
    let effective: toml::Table = printed.parse()?;
    assert_eq!(effective["session_copies"].as_integer(), Some(200_000));
    assert_eq!(
        effective["chain_id"].as_integer(),
        Some(10),
        "env beats file"
    );
    assert_eq!(
        effective["sponsor_name"].as_str(),
        Some("flag"),
        "flag beats file"
    );
    assert_eq!(
        effective["listen"].as_str(),
        Some("127.0.0.1:5555"),
        "file beats default"
    );
    assert_eq!(
        effective["confirmations"].as_integer(),
        Some(2),
        "defaults fill the rest"
    );
    assert_eq!(
        effective["redis_url"].as_str(),
        Some("redis://***@localhost:6379")
    );
    assert!(!printed.contains("hunter2"), "{printed}");
    assert_eq!(effective["api_key"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        effective["no_settlement"].as_bool(),
        Some(true),
        "a switch set in the file"
    );
    assert_eq!(effective["publish_policies"].as_bool(), Some(false));

    // What --print-config prints is a configuration file serve takes back.
    std::fs::write(&file, &printed)?;
    let (ok, again, err) = run(&[], &[])?;
    assert!(ok, "{err}");
    assert_eq!(again.parse::<toml::Table>()?, effective);

    let (ok, _, err) = run(&[("SP_SESSION_COPIES", "1")], &[])?;
    assert!(!ok && err.contains("from 2 to 10000000"), "{err}");

    std::fs::write(&file, "chain_idd = 1\n")?;
    let (ok, _, err) = run(&[], &[])?;
    assert!(!ok && err.contains("unknown key `chain_idd`"), "{err}");
    Ok(())
}

/// Several chains come from `[[chains]]` tables of the configuration file (or `--chain` JSON
/// flags), in place of the single-chain settings; `--print-config` prints them back as tables,
/// URLs masked, and they load again.
#[test]
fn chains_from_the_config_file() -> TestResult {
    let dir = TempDir::new("chains-config");
    let file = dir.0.join("sp.toml");
    std::fs::write(
        &file,
        "[[chains]]\nchain_id = 8453\npaymaster_v07 = \"0x0707070707070707070707070707070707070707\"\n\
         rpc_url = \"https://user:hunter2@base.example/v2/key\"\n\
         [[chains]]\nchain_id = 10\nentry_point_v09 = \"0x0909090909090909090909090909090909090909\"\n",
    )?;
    let run = |args: &[&str]| -> TestResult<(bool, String, String)> {
        let out = Command::new(env!("CARGO_BIN_EXE_session-paymaster"))
            .arg("serve")
            .arg("--config")
            .arg(&file)
            .args(args)
            .arg("--print-config")
            .env_remove("SP_CHAIN_ID")
            .env_remove("SP_RPC_URL")
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8(out.stdout)?,
            String::from_utf8(out.stderr)?,
        ))
    };
    let (ok, printed, err) = run(&[])?;
    assert!(ok, "{err}");
    let effective: toml::Table = printed.parse()?;
    let chains = effective["chains"].as_array().ok_or("chains")?;
    assert_eq!(chains.len(), 2, "{printed}");
    assert_eq!(chains[0]["chain_id"].as_integer(), Some(8453));
    assert_eq!(
        chains[0]["rpc_url"].as_str(),
        Some("https://base.example/…")
    );
    assert_eq!(
        chains[1]["entry_point_v09"].as_str(),
        Some("0x0909090909090909090909090909090909090909")
    );
    assert!(
        !printed.contains("hunter2") && !printed.contains("/v2/key"),
        "{printed}"
    );
    assert!(effective.get("chain_id").is_none(), "{printed}");
    std::fs::write(&file, &printed)?;
    let (ok, again, err) = run(&[])?;
    assert!(ok, "{err}");
    assert_eq!(again.parse::<toml::Table>()?, effective);

    // The single-chain settings do not mix with chains.
    let (ok, _, err) = run(&["--chain-id", "5"])?;
    assert!(!ok && err.contains("--chain-id"), "{err}");
    Ok(())
}

/// With Redis and budgets but no chain RPC, nothing would ever settle or release a reservation:
/// `serve` refuses to start unless `--no-settlement` says that is meant.
#[tokio::test]
async fn budgets_on_redis_without_settlement_need_an_explicit_flag() -> TestResult {
    let redis = crate::helpers::TestRedis::start().await?;
    let dir = crate::helpers::counter_policy_dir("no-settlement", "budgeted", 5)?;
    let serve = |extra: &[&str], port: u16| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_session-paymaster"));
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--policies")
            .arg(&dir.0)
            .args(["--redis-url", &redis.url])
            .args(extra)
            .env_remove("SP_RPC_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    };
    let out = serve(&[], crate::helpers::free_port()).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--no-settlement"), "{stderr}");

    let port = crate::helpers::free_port();
    let mut child = KillOnDrop(serve(&["--no-settlement"], port).spawn()?);
    healthy(&mut child.0, port, "with --no-settlement").await?;
    child.kill()?;
    Ok(())
}

/// `serve` with Redis follows the revocation feed every `--policy-poll` (`session::cache`):
/// an entry it cannot use makes it say that copies of grants fall back to 10 s.
#[tokio::test]
async fn serve_follows_the_revocation_feed() -> TestResult {
    let redis = crate::helpers::TestRedis::start().await?;
    let dir = crate::helpers::counter_policy_dir("feed", "budgeted", 5)?;
    let port = crate::helpers::free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_session-paymaster"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--policies")
        .arg(&dir.0)
        .args(["--redis-url", &redis.url, "--no-settlement"])
        .args(["--policy-poll", "100ms"])
        .env_remove("SP_RPC_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut child = KillOnDrop(child);
    healthy(&mut child.0, port, "with Redis").await?;
    // Its lines as they come, to wait for what it says rather than for a fixed time.
    let stderr = child.0.stderr.take().ok_or("stderr")?;
    let (lines, said) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let client = redis::Client::open(redis.url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let feed = session_paymaster::session::redis::REVOCATIONS_KEY;
    // Its first read of the feed found it empty and wrote an entry there.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let length: u64 = redis::cmd("XLEN").arg(feed).query_async(&mut conn).await?;
        if length > 0 {
            break;
        }
        if Instant::now() > deadline {
            child.kill()?;
            return Err("serve did not begin reading the revocation feed".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Then an entry it did not write.
    let _: String = redis::cmd("XADD")
        .arg(feed)
        .arg("*")
        .arg("id")
        .arg("not a grant id")
        .query_async(&mut conn)
        .await?;
    let mut wanted = vec![
        "cannot follow the revocation feed",
        "the revocation feed is read again",
    ];
    let mut heard = Vec::new();
    while !wanted.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = said.recv_timeout(left) else {
            break;
        };
        if wanted.first().is_some_and(|w| line.contains(w)) {
            wanted.remove(0);
        }
        heard.push(line);
    }
    // Following again, and saying so.
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await?
        .text()
        .await?;
    child.kill()?;
    assert!(
        metrics
            .lines()
            .any(|l| l == "sp_session_revocations_followed 1"),
        "{metrics}"
    );
    assert!(
        wanted.is_empty(),
        "not said, in order: {wanted:?}; said:\n{}",
        heard.join("\n")
    );
    Ok(())
}

/// Wait (at most 20 s) until the `serve` of `child` on `port` answers `/healthz`; if it exits
/// or does not answer, kill it and fail with what it wrote to its (piped) stderr.
async fn healthy(child: &mut std::process::Child, port: u16, what: &str) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = reqwest::Client::new();
    while client
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .is_err()
    {
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                e.read_to_string(&mut err)?;
            }
            return Err(format!("did not start {what}: {err}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Started at a soft open-file limit of 1,024 under a hard one of 4,096 (systemd starts services
/// so), `serve` raises the soft limit to the hard one: `--max-connections` would otherwise be
/// lowered to about 770.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn serve_raises_its_soft_open_file_limit_to_the_hard_one() -> TestResult {
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    if hard.is_some_and(|hard| hard < 4096) {
        eprintln!("skipped: this runner's hard open-file limit is below 4,096 ({hard:?})");
        return Ok(());
    }
    let port = crate::helpers::free_port();
    let child = Command::new("sh")
        .args([
            "-c",
            "ulimit -Sn 1024 && ulimit -Hn 4096 && exec \"$@\"",
            "sh",
        ])
        .arg(env!("CARGO_BIN_EXE_session-paymaster"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(repo_dir())
        .env_remove("SP_REDIS_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut child = KillOnDrop(child);
    healthy(&mut child.0, port, "under ulimit").await?;
    // (`exec`: the shell's pid is the service's.)
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.0.id()))?;
    child.kill()?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .ok_or("no open-file line")?;
    let numbers: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    assert_eq!(numbers.get(..2), Some(&["4096", "4096"][..]), "{line}");
    Ok(())
}

/// `serve` with `args` (from the repository, on a free port, with no `SP_*` variable of this
/// environment and no configuration file) exits with a failure within 30 s (bounded: were its
/// check to miss, serve would run on); its stderr.
pub(crate) async fn serve_refuses(args: &[&str]) -> TestResult<String> {
    let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_session-paymaster"))
        .args(["serve", "--config", "/dev/null", "--listen", "127.0.0.1:0"])
        .args(args)
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| !k.starts_with("SP_")))
        .current_dir(crate::helpers::repo_dir())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = serve.try_wait()? {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = serve.kill();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut serve.stderr.take().ok_or("stderr")?, &mut stderr)?;
    assert!(status.is_some_and(|s| !s.success()), "{stderr}");
    Ok(stderr)
}

/// A tenant's admin key without policies would reach every policy's sessions and the policy
/// set's status, as the operator's token does (found by review: the config took
/// `--admin-key name:sha256`, the API key format): `serve` refuses it.
#[tokio::test]
async fn serve_refuses_an_admin_key_without_policies() -> TestResult {
    let key = format!("shop:0x{}", "ab".repeat(32));
    let stderr = serve_refuses(&["--admin-key", &key]).await?;
    assert!(stderr.contains("admin key `shop`"), "{stderr}");
    assert!(stderr.contains("names no policies"), "{stderr}");
    Ok(())
}

/// `--metrics-listen` takes `/metrics` off the main listener (whose tenants would read every
/// policy's budgets there) to an address of its own, or to the admin listener's when it is the
/// same; `--admin-listen` takes the admin API off the main listener. A main listener that is
/// not loopback and still serves `/metrics` is warned of at start, and only then.
#[tokio::test]
async fn metrics_and_admin_leave_the_main_listener_for_their_own() -> TestResult {
    let client = reqwest::Client::new();
    let status = |url: String, token: bool| {
        let mut req = client.get(url);
        if token {
            req = req.bearer_auth(ADMIN_TOKEN);
        }
        async move { Ok::<_, reqwest::Error>(req.send().await?.status().as_u16()) }
    };
    let token_sha = format!("0x{}", hex::encode(Sha256::digest(ADMIN_TOKEN)));
    let [main, admin, metrics] = [(); 3].map(|()| crate::helpers::free_port());
    let start = async |flags: &[(&str, String)]| -> TestResult<KillOnDrop> {
        let mut child = KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_session-paymaster"))
                .args(["serve", "--config", "/dev/null"])
                .args(
                    flags
                        .iter()
                        .flat_map(|(flag, value)| [*flag, value.as_str()]),
                )
                .args(["--admin-token-sha256", &token_sha])
                .current_dir(repo_dir())
                .env_remove("SP_REDIS_URL")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?,
        );
        healthy(&mut child.0, main, &format!("with {flags:?}")).await?;
        Ok(child)
    };
    let at = |port: u16, path: &str| format!("http://127.0.0.1:{port}{path}");
    let warning = "/metrics is served on the main listener";

    // `/metrics` on a listener of its own, then at the admin listener's address (joining it).
    // (On the main listener `GET /metrics` is a chain's URL asked with the wrong method: 405.)
    for (to, expected) in [
        (metrics, [405, 404, 200, 200, 200, 404, 200, 404]),
        (admin, [405, 404, 200, 200, 200, 200, 200, 200]),
    ] {
        let child = start(&[
            ("--listen", format!("127.0.0.1:{main}")),
            ("--admin-listen", format!("127.0.0.1:{admin}")),
            ("--metrics-listen", format!("127.0.0.1:{to}")),
        ])
        .await?;
        let body = client.get(at(to, "/metrics")).send().await?.text().await?;
        assert!(body.contains("sp_policies "), "{body}");
        let found = [
            status(at(main, "/metrics"), false).await?,
            status(at(main, "/admin/policies"), true).await?,
            status(at(main, "/healthz"), false).await?,
            status(at(to, "/metrics"), false).await?,
            status(at(to, "/healthz"), false).await?,
            status(at(to, "/admin/policies"), true).await?,
            status(at(admin, "/admin/policies"), true).await?,
            status(at(admin, "/metrics"), false).await?,
        ];
        child.stop()?;
        assert_eq!(found, expected, "/metrics at port {to}");
    }

    // The admin API on the main listener, `/metrics` apart.
    let child = start(&[
        ("--listen", format!("127.0.0.1:{main}")),
        ("--metrics-listen", format!("127.0.0.1:{metrics}")),
    ])
    .await?;
    let found = [
        status(at(main, "/metrics"), false).await?,
        status(at(main, "/admin/policies"), true).await?,
        status(at(metrics, "/metrics"), false).await?,
    ];
    child.stop()?;
    assert_eq!(found, [405, 200, 200]);

    // A main listener others reach: warned of while it serves `/metrics` (a tenant's key
    // there), not once `/metrics` is elsewhere.
    let tenant = format!("shop:0x{}:example-mint", "ab".repeat(32));
    for apart in [false, true] {
        let mut flags = vec![
            ("--listen", format!("0.0.0.0:{main}")),
            ("--api-key", tenant.clone()),
        ];
        if apart {
            flags.push(("--metrics-listen", format!("127.0.0.1:{metrics}")));
        }
        let child = start(&flags).await?;
        let served = status(at(main, "/metrics"), false).await?;
        let stderr = child.stop()?;
        assert_eq!(
            (served, stderr.contains(warning)),
            if apart { (405, false) } else { (200, true) },
            "{stderr}"
        );
    }
    Ok(())
}
