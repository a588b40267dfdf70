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

/// redis-server on a free port (no persistence, `noeviction` as production), killed on drop.
pub(crate) struct RedisServer {
    child: std::process::Child,
    port: u16,
}

impl RedisServer {
    /// Start one and wait until it answers.
    pub(crate) fn start() -> Result<Self, Error> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--maxmemory-policy", "noeviction"])
            .stdout(std::process::Stdio::null())
            .spawn()?;
        let redis = Self { child, port };
        for _ in 0..100 {
            if redis.cli(&["PING"]).is_ok_and(|o| o == "PONG") {
                return Ok(redis);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Err("redis-server did not start".into())
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
    }
}
