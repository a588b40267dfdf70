//! `paymasterData` of SessionPaymaster: validity window and signature (DESIGN §3).
//!
//! ```text
//! paymasterAndData = paymaster(20) ‖ pmVerificationGasLimit(16) ‖ pmPostOpGasLimit(16) ‖ paymasterData
//! paymasterData    = validUntil(6) ‖ validAfter(6) ‖ signature(65)
//! ```
//!
//! On v0.9 a client may ask for [`PaymasterLayout::Suffix`]: `paymasterData` is then the window
//! alone and the signature travels as `paymasterSignature`, packed after it outside the
//! userOpHash (see [`super::v0_9`]). The signed hash is the same in both layouts.

use alloy::primitives::{Address, Bytes, hex};

use super::operation::PaymasterFields;

/// Length of `paymasterData` (what ERC-7677 and `pm_sponsorUserOperation` return).
pub const PAYMASTER_DATA_LEN: usize = WINDOW_LEN + 65;

/// `validUntil(6) ‖ validAfter(6)`: all of `paymasterData` in [`PaymasterLayout::Suffix`].
pub const WINDOW_LEN: usize = 6 + 6;

/// The largest timestamp a `uint48` holds.
pub const MAX_UINT48: u64 = (1 << 48) - 1;

/// Base `paymasterVerificationGasLimit`. `validatePaymasterUserOp` measured on the real
/// EntryPoint with cold storage (`cd contracts && forge test --match-test Gas -vvvv`, both
/// profiles): 10.3k gas with empty callData, 20.5k with 16 KiB; hashing callData and initCode is
/// the only part that grows. 40k covers 16 KiB with 2x margin; larger ops get more, see
/// [`PaymasterGas::for_op_size`]. Mirrored by `PM_VERIFICATION_GAS` in the forge test.
pub const PAYMASTER_VERIFICATION_GAS: u128 = 40_000;

/// SessionPaymaster has no postOp.
pub const PAYMASTER_POST_OP_GAS: u128 = 0;

/// A 65-byte signature that is well-formed (r a valid x coordinate, s in the lower half of the
/// curve order, v = 27) but signed by nobody we trust: ERC-7677 stub data. `ecrecover` succeeds,
/// so validation takes the same path and gas as with the real signature and ends in
/// SIG_VALIDATION_FAILED rather than a revert. It is the signature of
/// `keccak256("session-paymaster stub")` by key `keccak256("session-paymaster stub key")`;
/// `tests::stub_signature_is_well_formed` re-derives it.
pub const STUB_SIGNATURE: [u8; 65] = hex!(
    "d9e0ff0754c30bf7145e2de4b811e6ef1672ba9c7771c1288e56b7cb7f4f1902"
    "70a40e48e795a537faed31bf6c38214bb15ba55d08ffaff04f312e0bfe6aa107"
    "1b"
);

/// Gas limits the EntryPoint grants the paymaster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PaymasterGas {
    /// `paymasterVerificationGasLimit`.
    pub verification: u128,
    /// `paymasterPostOpGasLimit`.
    pub post_op: u128,
}

impl PaymasterGas {
    /// Limits for an op whose `initCode` and `callData` together are `hashed_bytes` long:
    /// the measured base, plus hashing and memory growth past 16 KiB (3 + 6 gas a word for
    /// copy and keccak, quadratic memory), doubled as margin.
    pub fn for_op_size(hashed_bytes: usize) -> Self {
        let words = (hashed_bytes.saturating_sub(16 * 1024) as u128).div_ceil(32);
        let extra = 2 * (9 * words + words * words / 512);
        Self {
            verification: PAYMASTER_VERIFICATION_GAS + extra,
            post_op: PAYMASTER_POST_OP_GAS,
        }
    }
}

/// Timestamps between which the EntryPoint accepts our signature.
///
/// v0.7 accepts `validAfter <= block.timestamp <= validUntil`; v0.8 and later require
/// `block.timestamp > validAfter` (EntryPoint.sol `_getValidationData`), so callers put
/// `valid_after` in the past rather than at "now".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidityWindow {
    /// Last second the signature is valid (never 0: 0 would mean "forever" on chain).
    pub valid_until: u64,
    /// The signature is not valid before this second.
    pub valid_after: u64,
}

/// A malformed validity window or paymasterData.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymasterDataError {
    /// `valid_until` is 0, past `uint48`, or not after `valid_after`.
    #[error("invalid validity window: validAfter {valid_after}, validUntil {valid_until}")]
    Window {
        /// Start.
        valid_after: u64,
        /// End.
        valid_until: u64,
    },
    /// Not [`PAYMASTER_DATA_LEN`] bytes.
    #[error("paymasterData must be {PAYMASTER_DATA_LEN} bytes, got {0}")]
    Length(usize),
    /// Not [`WINDOW_LEN`] bytes where only a window is expected.
    #[error("paymasterData must be the {WINDOW_LEN}-byte window, got {0} bytes")]
    WindowLength(usize),
}

impl ValidityWindow {
    /// A window, checked: `0 <= valid_after < valid_until <= uint48 max`.
    pub fn new(valid_after: u64, valid_until: u64) -> Result<Self, PaymasterDataError> {
        if valid_until == 0 || valid_until > MAX_UINT48 || valid_after >= valid_until {
            return Err(PaymasterDataError::Window {
                valid_after,
                valid_until,
            });
        }
        Ok(Self {
            valid_until,
            valid_after,
        })
    }
}

/// `keccak256("PaymasterSignature")[:8]`, the last 8 bytes of a `paymasterAndData` that carries
/// a paymaster signature in a suffix (v0.9 `UserOperationLib.PAYMASTER_SIG_MAGIC`).
pub const PAYMASTER_SIG_MAGIC: [u8; 8] = hex!("22e325a297439656");

/// `uint16 length ‖ PAYMASTER_SIG_MAGIC`, after the paymaster signature.
pub const PAYMASTER_SIG_SUFFIX_LEN: usize = 2 + PAYMASTER_SIG_MAGIC.len();

/// The paymaster's static fields (address and two gas limits) and the suffix, at least.
const MIN_LEN_WITH_SUFFIX: usize = 52 + PAYMASTER_SIG_SUFFIX_LEN;

/// The length of the paymaster signature at the end of `paymaster_and_data` (0: none), as
/// v0.9 `UserOperationLib.getPaymasterSignatureLength` reads it; `None` where that reverts (a
/// length reaching into the static fields), so no such operation can be hashed or land.
pub fn paymaster_signature_len(paymaster_and_data: &[u8]) -> Option<usize> {
    let len = paymaster_and_data.len();
    if len < MIN_LEN_WITH_SUFFIX || paymaster_and_data[len - 8..] != PAYMASTER_SIG_MAGIC {
        return Some(0);
    }
    let at = len - PAYMASTER_SIG_SUFFIX_LEN;
    let sig_len = usize::from(u16::from_be_bytes([
        paymaster_and_data[at],
        paymaster_and_data[at + 1],
    ]));
    (sig_len <= len - MIN_LEN_WITH_SUFFIX).then_some(sig_len)
}

/// `signed_part ‖ signature ‖ uint16(len) ‖ PAYMASTER_SIG_MAGIC`; `None` for a signature
/// longer than a `uint16`. (`UserOperationLib.encodePaymasterSignature` writes nothing for an
/// empty signature; this writes a zero length, which the EntryPoint reads as no suffix and
/// hashes whole: parsing turns an empty `paymasterSignature` into none.)
pub fn with_paymaster_signature(signed_part: &[u8], signature: &[u8]) -> Option<Bytes> {
    let len = u16::try_from(signature.len()).ok()?;
    Some(
        [
            signed_part,
            signature,
            &len.to_be_bytes(),
            &PAYMASTER_SIG_MAGIC,
        ]
        .concat()
        .into(),
    )
}

/// Where our signature goes in `paymasterAndData`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PaymasterLayout {
    /// At the end of `paymasterData`, inside the userOpHash: the account signs after us.
    #[default]
    Inline,
    /// v0.9: in the paymaster-signature suffix, outside the userOpHash: the account may sign
    /// as soon as it knows the window (`paymasterData`), in parallel with us.
    Suffix,
}

/// Decoded `paymasterData`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymasterData {
    /// Validity window the signature covers.
    pub window: ValidityWindow,
    /// `r ‖ s ‖ v`.
    pub signature: [u8; 65],
}

impl PaymasterData {
    /// Stub data for gas estimation: final length, final window, [`STUB_SIGNATURE`].
    pub fn stub(window: ValidityWindow) -> Self {
        Self {
            window,
            signature: STUB_SIGNATURE,
        }
    }

    /// `validUntil(6) ‖ validAfter(6) ‖ signature(65)`.
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(PAYMASTER_DATA_LEN);
        out.extend_from_slice(&self.window.valid_until.to_be_bytes()[2..]);
        out.extend_from_slice(&self.window.valid_after.to_be_bytes()[2..]);
        out.extend_from_slice(&self.signature);
        out.into()
    }

    /// Our paymaster fields in an operation, in `layout`.
    pub fn fields(
        &self,
        paymaster: Address,
        gas: PaymasterGas,
        layout: PaymasterLayout,
    ) -> PaymasterFields {
        let (data, signature) = match layout {
            PaymasterLayout::Inline => (self.encode(), None),
            PaymasterLayout::Suffix => (
                self.encode()[..WINDOW_LEN].to_vec().into(),
                Some(self.signature.to_vec().into()),
            ),
        };
        PaymasterFields {
            paymaster,
            gas,
            data,
            signature,
        }
    }

    /// The window of a [`PaymasterLayout::Suffix`] `paymasterData` (exactly [`WINDOW_LEN`]
    /// bytes, checked as [`ValidityWindow::new`] checks).
    pub fn decode_window(data: &[u8]) -> Result<ValidityWindow, PaymasterDataError> {
        if data.len() != WINDOW_LEN {
            return Err(PaymasterDataError::WindowLength(data.len()));
        }
        let u48 = |b: &[u8]| b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
        ValidityWindow::new(u48(&data[6..12]), u48(&data[0..6]))
    }

    /// Inverse of [`Self::encode`].
    pub fn decode(data: &[u8]) -> Result<Self, PaymasterDataError> {
        if data.len() != PAYMASTER_DATA_LEN {
            return Err(PaymasterDataError::Length(data.len()));
        }
        let window = Self::decode_window(&data[..WINDOW_LEN])?;
        let mut signature = [0u8; 65];
        signature.copy_from_slice(&data[WINDOW_LEN..]);
        Ok(Self { window, signature })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::{B256, U256, keccak256};
    use k256::ecdsa::{RecoveryId, Signature, SigningKey, VerifyingKey};
    use proptest::prelude::*;

    #[test]
    fn stub_signature_is_well_formed() -> Result<(), Box<dyn std::error::Error>> {
        let key = SigningKey::from_slice(keccak256("session-paymaster stub key").as_slice())?;
        let digest = keccak256("session-paymaster stub");
        let (sig, recid) = key.sign_prehash_recoverable(digest.as_slice())?;
        let mut expected = [0u8; 65];
        expected[..64].copy_from_slice(&sig.to_bytes());
        expected[64] = 27 + u8::from(recid.is_y_odd());
        assert_eq!(hex::encode(STUB_SIGNATURE), hex::encode(expected));

        // Low s (EIP-2 / OpenZeppelin ECDSA) and v in {27, 28}: ecrecover succeeds.
        let half_n = U256::from_str_radix(
            "7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0",
            16,
        )?;
        assert!(U256::from_be_slice(&STUB_SIGNATURE[32..64]) <= half_n);
        let sig = Signature::from_slice(&STUB_SIGNATURE[..64])?;
        let recid = RecoveryId::from_byte(STUB_SIGNATURE[64] - 27).ok_or("bad v")?;
        VerifyingKey::recover_from_prehash(B256::from(digest).as_slice(), &sig, recid)?;
        Ok(())
    }

    #[test]
    fn magic_is_keccak_of_its_name() {
        assert_eq!(keccak256("PaymasterSignature")[..8], PAYMASTER_SIG_MAGIC);
    }

    #[test]
    fn suffix_is_read_as_the_entry_point_reads_it() {
        let head = [7u8; 64];
        let sig = [9u8; 65];
        let pad = with_paymaster_signature(&head, &sig).unwrap_or_default();
        assert_eq!(pad.len(), 64 + 65 + 10);
        assert_eq!(paymaster_signature_len(&pad), Some(65));
        // Without the magic, or with a length of 0, there is no suffix.
        assert_eq!(paymaster_signature_len(&pad[..pad.len() - 1]), Some(0));
        let zero = with_paymaster_signature(&head, &[]).unwrap_or_default();
        assert_eq!(paymaster_signature_len(&zero), Some(0));
        // A length reaching into the static fields: the EntryPoint reverts.
        let mut long = pad.to_vec();
        let n = long.len();
        long[n - 10..n - 8].copy_from_slice(&u16::try_from(n - 61).unwrap_or(0).to_be_bytes());
        assert_eq!(paymaster_signature_len(&long), None);
        long[n - 10..n - 8].copy_from_slice(&u16::try_from(n - 62).unwrap_or(0).to_be_bytes());
        assert_eq!(paymaster_signature_len(&long), Some(n - 62));
        assert!(with_paymaster_signature(&head, &vec![0; 65_536]).is_none());
    }

    #[test]
    fn window_is_checked() {
        assert!(ValidityWindow::new(10, 10).is_err());
        assert!(ValidityWindow::new(0, 0).is_err());
        assert!(ValidityWindow::new(0, MAX_UINT48 + 1).is_err());
        assert!(ValidityWindow::new(0, MAX_UINT48).is_ok());
    }

    #[test]
    fn decode_rejects_wrong_lengths() {
        for len in [0, 12, 76, 78, 129] {
            assert_eq!(
                PaymasterData::decode(&vec![0; len]),
                Err(PaymasterDataError::Length(len))
            );
        }
    }

    #[test]
    fn gas_grows_only_past_16_kib() {
        assert_eq!(
            PaymasterGas::for_op_size(0).verification,
            PAYMASTER_VERIFICATION_GAS
        );
        assert_eq!(
            PaymasterGas::for_op_size(16 * 1024).verification,
            PAYMASTER_VERIFICATION_GAS
        );
        // A cost model of validation (measured 10.3k base; calldata copy + keccak + memory
        // expansion for every word hashed) stays under the limit with at least 1.5x margin.
        for kib in [1usize, 16, 17, 64, 128, 256] {
            let words = (kib * 1024 / 32) as u128;
            let model = 10_300 + 12 * words + words * words / 512;
            let limit = PaymasterGas::for_op_size(kib * 1024).verification;
            assert!(
                limit * 2 >= model * 3,
                "{kib} KiB: limit {limit}, model {model}"
            );
        }
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(after in 0u64..MAX_UINT48, len in 1u64..1_000_000, sig in prop::array::uniform32(any::<u8>())) {
            let until = (after + len).min(MAX_UINT48);
            prop_assume!(until > after);
            let mut signature = [0u8; 65];
            signature[..32].copy_from_slice(&sig);
            signature[64] = 27;
            let pd = PaymasterData { window: ValidityWindow::new(after, until)?, signature };
            let encoded = pd.encode();
            prop_assert_eq!(encoded.len(), PAYMASTER_DATA_LEN);
            prop_assert_eq!(PaymasterData::decode(&encoded)?, pd);
        }
    }
}
