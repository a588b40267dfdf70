//! What the benches share (`mod common;` in each; each uses part of it).
#![allow(dead_code)]

use alloy::primitives::{Address, U256, address, keccak256};
use alloy::sol;
use alloy::sol_types::SolCall;
use session_paymaster::userop::UserOperation;

sol! {
    function execute(address dest, uint256 value, bytes func);
}

/// A SimpleAccount operation of `sender` calling `increment()` on the demo Counter (the one
/// `policies/dev-counter.toml` and the bench policies allow), with gas limits and fees set, as
/// a client sends it for a final signature.
pub(crate) fn counter_op(sender: Address, nonce: u64) -> UserOperation {
    UserOperation {
        sender,
        nonce: U256::from(nonce),
        call_data: executeCall {
            dest: address!("0xCF3b87F3D9d62cdF4723D97D8139156c6b2AB4B3"),
            value: U256::ZERO,
            func: keccak256("increment()")[..4].to_vec().into(),
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

type Error = Box<dyn std::error::Error + Send + Sync>;

/// redis-server on a free port (`noeviction` as production), killed on drop. No persistence,
/// unless `APPENDFSYNC` is set (`always`, as docs/operations.md recommends, `everysec` or `no`):
/// then an append-only file in a directory of its own, removed on drop.
pub(crate) struct RedisServer {
    child: std::process::Child,
    port: u16,
    /// The append-only file's directory and `appendfsync`, with persistence.
    aof: Option<(std::path::PathBuf, String)>,
}

impl RedisServer {
    /// Start one and wait until it answers.
    pub(crate) fn start() -> Result<Self, Error> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--maxmemory-policy", "noeviction"])
            .stdout(std::process::Stdio::null());
        let fsync = std::env::var("APPENDFSYNC").ok().filter(|v| !v.is_empty());
        let aof = match fsync {
            Some(mode) => {
                if !["always", "everysec", "no"].contains(&mode.as_str()) {
                    return Err(format!("APPENDFSYNC={mode}: always, everysec or no").into());
                }
                let dir = std::env::temp_dir().join(format!("sp-bench-redis-{port}"));
                std::fs::create_dir_all(&dir)?;
                cmd.args(["--appendonly", "yes", "--appendfsync", &mode])
                    .arg("--dir")
                    .arg(&dir);
                Some((dir, mode))
            }
            None => {
                cmd.args(["--appendonly", "no"]);
                None
            }
        };
        let child = cmd.spawn()?;
        let redis = Self { child, port, aof };
        for _ in 0..100 {
            if redis.cli(&["PING"]).is_ok_and(|o| o == "PONG") {
                return Ok(redis);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Err("redis-server did not start".into())
    }

    /// Its `appendfsync` (`APPENDFSYNC`), or "off" without persistence.
    pub(crate) fn persistence(&self) -> String {
        match &self.aof {
            Some((_, mode)) => format!("appendfsync {mode}"),
            None => "off".into(),
        }
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis-cli` against it: its trimmed output.
    pub(crate) fn cli(&self, args: &[&str]) -> Result<String, Error> {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()?;
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some((dir, _)) = &self.aof {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
