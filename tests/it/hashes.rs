//! Our hashes against the contracts: for random operations, `EntryPoint.getUserOpHash` (v0.7
//! plain, v0.8 and v0.9 EIP-712; v0.9 with and without a paymaster signature suffix; EIP-7702
//! accounts from v0.8 on) and `SessionPaymaster.getHash` on anvil equal the Rust computation.

use alloy::primitives::aliases::U48;
use alloy::primitives::{Address, Bytes, U256};
use alloy::providers::Provider;
use serde_json::Value;
use session_paymaster::userop::PaymasterFields;
use session_paymaster::userop::eip7702::{Eip7702, Eip7702Auth};
use session_paymaster::userop::hash::{paymaster_hash, user_op_hash};
use session_paymaster::userop::paymaster_data::{PaymasterGas, ValidityWindow};
use session_paymaster::userop::{EntryPointVersion, IEntryPoint, ISessionPaymaster, UserOperation};

use crate::helpers::{Stack, TestResult};

const OPS_PER_VERSION: usize = 100;

/// xorshift64*: reproducible from the seed printed on failure.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn bytes(&mut self, max_len: usize) -> Bytes {
        let len = (self.next() as usize) % (max_len + 1);
        (0..len)
            .map(|_| self.next() as u8)
            .collect::<Vec<u8>>()
            .into()
    }
    fn u128(&mut self) -> u128 {
        // Mix small and full-width values: edge cases live at both ends.
        match self.next() % 3 {
            0 => u128::from(self.next() % 1_000_000),
            1 => u128::MAX - u128::from(self.next() % 3),
            _ => (u128::from(self.next()) << 64) | u128::from(self.next()),
        }
    }
    fn u256(&mut self) -> U256 {
        U256::from_limbs([self.next(), self.next(), self.next(), self.next()])
    }
    fn address(&mut self) -> Address {
        Address::from_slice(&self.u256().to_be_bytes::<32>()[12..])
    }
}

fn random_op(rng: &mut Rng) -> UserOperation {
    let factory = rng.next().is_multiple_of(2).then(|| rng.address());
    UserOperation {
        sender: rng.address(),
        nonce: rng.u256(),
        factory,
        factory_data: if factory.is_some() {
            rng.bytes(200)
        } else {
            Bytes::new()
        },
        call_data: rng.bytes(600),
        call_gas_limit: rng.u128(),
        verification_gas_limit: rng.u128(),
        pre_verification_gas: rng.u256(),
        max_fee_per_gas: rng.u128(),
        max_priority_fee_per_gas: rng.u128(),
        paymaster: None,
        signature: rng.bytes(70),
        eip7702: None,
    }
}

#[tokio::test]
async fn hashes_match_the_contracts_for_random_ops() -> TestResult {
    let stack = Stack::start().await?;
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| e.to_string())?;
    let seed = u64::from_le_bytes(seed) | 1;
    let mut rng = Rng(seed);
    for version in EntryPointVersion::ALL {
        let d = stack.version(version);
        let ep = IEntryPoint::new(d.entry_point, &stack.anvil.provider);
        let pm = ISessionPaymaster::new(d.paymaster, &stack.anvil.provider);
        for i in 0..OPS_PER_VERSION {
            let mut op = random_op(&mut rng);
            // Every other op on v0.8 and later: an EIP-7702 account, delegated on anvil to a
            // random address (its code is the designator the EntryPoint and getHash read).
            if version.spec().eip7702 && i % 2 == 1 {
                let delegate = rng.address();
                let code = [&[0xef, 0x01, 0x00][..], delegate.as_slice()].concat();
                let _: Value = stack
                    .anvil
                    .provider
                    .raw_request("anvil_setCode".into(), (op.sender, Bytes::from(code)))
                    .await?;
                let mut marker = vec![0u8; 2 + (rng.next() % 19) as usize];
                marker[..2].copy_from_slice(&[0x77, 0x02]);
                op.factory = None;
                op.factory_data = Bytes::new();
                op.eip7702 = Some(Eip7702 {
                    marker: marker.into(),
                    auth: Eip7702Auth {
                        address: delegate,
                        chain_id: U256::from(31337),
                        nonce: 0,
                        r: U256::from(1),
                        s: U256::from(1),
                        y_parity: 0,
                    },
                });
            }
            let gas = PaymasterGas {
                verification: rng.u128(),
                post_op: rng.u128(),
            };
            let after = rng.next() % (1 << 47);
            let window = ValidityWindow::new(after, after + 1 + rng.next() % (1 << 40))?;
            op.paymaster = Some(PaymasterFields {
                paymaster: d.paymaster,
                gas,
                data: rng.bytes(100),
                // v0.9 leaves a paymaster signature suffix out of the hash, earlier versions
                // hash it as any other bytes; an empty one reads as no suffix on v0.9.
                signature: rng.next().is_multiple_of(2).then(|| rng.bytes(80)),
            });
            let packed = op.pack(None);
            let ctx = format!("v{version} op {i}, seed {seed:#x}: {op:?}");

            let onchain = ep.getUserOpHash(packed.clone()).call().await?;
            assert_eq!(
                user_op_hash(version, &op, None, d.entry_point, 31337),
                onchain,
                "userOpHash, {ctx}"
            );

            let onchain = pm
                .getHash(
                    packed,
                    U48::from(window.valid_until),
                    U48::from(window.valid_after),
                )
                .call()
                .await?;
            assert_eq!(
                paymaster_hash(&op, gas, d.paymaster, 31337, window),
                onchain,
                "paymaster hash, {ctx}"
            );
        }
    }
    Ok(())
}
