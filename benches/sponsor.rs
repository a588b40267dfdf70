//! Cost of one sponsorship, as a ratio to a limit measured in the same run: one bare k256
//! ECDSA signature (DESIGN §1: the hot path is one signature plus decoding and checks). The
//! service's own signature (k256's, its nonce inverted faster since 0.3.19: `signer::ecdsa`)
//! is a row too, so a sponsorship below 1.0x is no surprise, and so is k256's inversion of a
//! nonce, the step it makes faster: the bare signature less the service's is what that saved.
//! Run with `scripts/bench`. Prints medians of several batches; asserts nothing.

use std::hint::black_box;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, keccak256};
use k256::ecdsa::SigningKey;
use k256::elliptic_curve::PrimeField as _;
use session_paymaster::config::EntryPointConfig;
use session_paymaster::ledger::Ledger;
use session_paymaster::ledger::memory::MemoryLedger;
use session_paymaster::policy::file::load_dir;
use session_paymaster::session::SessionStore;
use session_paymaster::session::memory::MemorySessions;
use session_paymaster::signer::{KeySource, Signer};
use session_paymaster::sponsor::{Mode, RequestContext, Sponsor, SponsorRequest};
use session_paymaster::userop::{EntryPointVersion, UserOperation};

mod common;

const BATCHES: usize = 7;
const PER_BATCH: u32 = 2_000;

/// Without a session the pipeline does no I/O: its future is ready on the first poll, so the
/// bench measures it without an async runtime.
fn now_or_never<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    match fut
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Median over batches of the mean time per call.
fn measure(mut f: impl FnMut()) -> Duration {
    for _ in 0..PER_BATCH / 10 {
        f(); // warm up
    }
    let mut batches: Vec<Duration> = (0..BATCHES)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..PER_BATCH {
                f();
            }
            start.elapsed() / PER_BATCH
        })
        .collect();
    batches.sort();
    batches[BATCHES / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let policies = load_dir(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"))
        .map_err(|e| format!("{e:?}"))?;
    let entry_points = EntryPointVersion::ALL
        .iter()
        .map(|&version| EntryPointConfig {
            version,
            address: version.canonical_address(),
            paymaster: Some(Address::repeat_byte(0x77)),
        })
        .collect();
    let sponsor = Sponsor::new(
        vec![(31337, entry_points)],
        policies,
        Signer::load(KeySource::Ephemeral)?,
        SessionStore::Memory(MemorySessions::new()),
        Ledger::Memory(MemoryLedger::new()),
        session_paymaster::ratelimit::RateLimits::new(None),
    );
    let op = common::counter_op(Address::repeat_byte(0x11), 7);
    let context = RequestContext::default();
    let now = 1_800_000_000;
    let request = |mode| SponsorRequest {
        chain_id: 31337,
        op: &op,
        entry_point: EntryPointVersion::V0_7.canonical_address(),
        context: &context,
        mode,
        keep_client_gas: false,
        allowed_policies: None,
    };
    now_or_never(sponsor.sponsor(request(Mode::Final), now)).ok_or("sponsorship awaited I/O")??; // fails loudly here, not in the loop

    let key = SigningKey::from_slice(keccak256("bench key").as_slice())?;
    let hash = B256::repeat_byte(0xab);
    let bare = measure(|| {
        black_box(
            key.sign_prehash_recoverable(black_box(hash.as_slice()))
                .ok(),
        );
    });
    let signer = Signer::load(KeySource::Ephemeral)?;
    let ours = measure(|| {
        black_box(signer.sign_eip191(black_box(hash)).ok());
    });
    let nonce = k256::Scalar::from_repr(keccak256("a nonce").0.into())
        .into_option()
        .ok_or("a nonce below n")?;
    let inversion = measure(|| {
        black_box(black_box(nonce).invert());
    });
    let final_data = measure(|| {
        black_box(now_or_never(
            sponsor.sponsor(black_box(request(Mode::Final)), now),
        ));
    });
    let stub = measure(|| {
        black_box(now_or_never(
            sponsor.sponsor(black_box(request(Mode::Stub)), now),
        ));
    });
    let parse_json = op.to_json();
    let parse = measure(|| {
        black_box(UserOperation::from_json(black_box(&parse_json)).ok());
    });

    println!("limit  bare k256 signature           {:>9.1?}", bare);
    for (name, t) in [
        ("the service's own signature", ours),
        ("k256's inversion of a nonce", inversion),
        ("sponsor (final, signed)", final_data),
        ("sponsor (stub, no signature)", stub),
        ("parse RPC user op", parse),
    ] {
        println!(
            "{name:<32} {:>9.1?}  {:.2}x limit",
            t,
            t.as_secs_f64() / bare.as_secs_f64()
        );
    }
    Ok(())
}
