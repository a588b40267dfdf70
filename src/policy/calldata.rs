//! What an operation really calls: the account's `callData` decoded into calls (DESIGN §6).
//!
//! Shapes decoded: SimpleAccount `execute` and `executeBatch` (v0.6, v0.7, v0.8 / Coinbase Smart
//! Wallet), ERC-7579 `execute(bytes32,bytes)` (single, batch, static, delegatecall), Safe4337Module
//! `executeUserOp[WithErrorString]`, and the canonical Safe MultiSend contracts reached through a
//! delegatecall. A call from the account to itself is decoded again (nested batches), to a bounded
//! depth. Anything else is rejected, never guessed. What one `callData` decodes to is bounded too
//! ([`MAX_CALLS`], [`COPIES_PER_BYTE`]): the ABI lets array entries point at the same data, so
//! 7.5 kB nested five levels deep would otherwise name a hundred million calls.

use alloy::primitives::{Address, Bytes, FixedBytes, U256, address};
use alloy::sol;
use alloy::sol_types::SolCall;
use alloy::sol_types::abi::AbiDecoderConfig;

sol! {
    /// SimpleAccount (all versions): `execute(address,uint256,bytes)`.
    interface SimpleAccount {
        function execute(address dest, uint256 value, bytes func);
    }
    /// SimpleAccount v0.6: `executeBatch(address[],bytes[])`.
    interface SimpleAccountV06 {
        function executeBatch(address[] dest, bytes[] func);
    }
    /// SimpleAccount v0.7: `executeBatch(address[],uint256[],bytes[])`; an empty value array means zero values.
    interface SimpleAccountV07 {
        function executeBatch(address[] dest, uint256[] value, bytes[] func);
    }
    /// `BaseAccount.Call` (SimpleAccount v0.8, Coinbase Smart Wallet) and ERC-7579 `Execution`:
    /// the same ABI tuple.
    struct BatchCall {
        address target;
        uint256 value;
        bytes data;
    }
    /// SimpleAccount v0.8: `executeBatch((address,uint256,bytes)[])`.
    interface SimpleAccountV08 {
        function executeBatch(BatchCall[] calls);
    }
    /// ERC-7579 modular accounts.
    interface Erc7579Account {
        function execute(bytes32 mode, bytes executionCalldata);
    }
    /// Safe4337Module, called on the Safe through its fallback handler.
    interface Safe4337Module {
        function executeUserOp(address to, uint256 value, bytes data, uint8 operation);
        function executeUserOpWithErrorString(address to, uint256 value, bytes data, uint8 operation);
    }
    /// Safe MultiSend / MultiSendCallOnly.
    interface MultiSend {
        function multiSend(bytes transactions);
    }
    /// ERC-20 functions whose amounts count against token spend limits.
    interface Erc20 {
        function transfer(address to, uint256 amount);
        function transferFrom(address from, address to, uint256 amount);
        function approve(address spender, uint256 amount);
    }
}

/// The canonical MultiSend deployments (Safe v1.3.0 and v1.4.1, same address on every chain).
/// Only these are decoded through a delegatecall: other code run by delegatecall could do anything.
/// (MultiSend 1.5 runs a transaction to address(0) as one to the Safe itself: `decode_multisend`
/// refuses those, which adding its address here needs.)
pub const KNOWN_MULTISEND: [Address; 4] = [
    address!("0x40A2aCCbd92BCA938b02010E17A5b8929b49130D"), // MultiSendCallOnly 1.3.0
    address!("0xA238CBeb142c10Ef7Ad8442C6D1f9E89e07e7761"), // MultiSend 1.3.0
    address!("0x9641d764fc13c8B624c04430C7356C1C7C8102e2"), // MultiSendCallOnly 1.4.1
    address!("0x38869bf66a61cF6bDB996A6aE40D5853Fd43B526"), // MultiSend 1.4.1
];

/// How deep self-calls and MultiSend are followed.
pub const MAX_DEPTH: usize = 4;

/// Most calls one `callData` decodes to, every call of every level counted: a self-call or a
/// MultiSend call that wraps others counts as one, besides the calls it wraps. Accounts'
/// batches are rarely above a few dozen calls.
pub const MAX_CALLS: usize = 1024;

/// Most bytes of calls' data decoding one `callData` may copy, per byte of it (plus
/// [`COPY_SLACK_KIB`]). A level of nesting copies what it decodes once, a MultiSend or an
/// ERC-7579 level twice (its argument, then the calls in it), so no layout without repeated
/// offsets passes it at [`MAX_DEPTH`]; batch entries whose offsets point at the same data again
/// (which the ABI allows, and accounts' decoders follow: they are decoded, not refused) copy it
/// once per entry, and soon pass it. With the request body's limit (256 KiB) one request copies
/// at most about 1.4 MB.
pub const COPIES_PER_BYTE: usize = 2 * (MAX_DEPTH + 1);

/// Added to that bound, in KiB: room for the decoder's own bookkeeping of a short `callData`.
pub const COPY_SLACK_KIB: usize = 64;

/// How the account calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// An ordinary call.
    Call,
    /// A static call: cannot change state.
    StaticCall,
    /// A delegatecall: the target's code runs as the account. Denied unless a rule allows it.
    DelegateCall,
}

/// One call the account makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Called contract (or value recipient).
    pub target: Address,
    /// Native value sent.
    pub value: U256,
    /// Calldata (empty for a plain transfer).
    pub data: Bytes,
    /// Call, static call or delegatecall.
    pub kind: CallKind,
}

/// An ERC-20 amount a call moves or approves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenSpend {
    /// The token contract.
    pub token: Address,
    /// `transfer`/`transferFrom` amount or `approve` allowance.
    pub amount: U256,
    /// Whether it is an allowance (`approve`).
    pub approval: bool,
}

impl Call {
    /// An ordinary call.
    pub fn new(target: Address, value: U256, data: Bytes) -> Self {
        Self {
            target,
            value,
            data,
            kind: CallKind::Call,
        }
    }

    /// The 4-byte function selector, if the calldata has one.
    pub fn selector(&self) -> Option<FixedBytes<4>> {
        self.data.get(..4).map(FixedBytes::<4>::from_slice)
    }

    /// The ERC-20 amount this call spends or approves, if it is `transfer`, `transferFrom` or
    /// `approve` and decodes as such.
    pub fn token_spend(&self) -> Option<TokenSpend> {
        if self.kind != CallKind::Call {
            return None;
        }
        let spend = |amount, approval| {
            Some(TokenSpend {
                token: self.target,
                amount,
                approval,
            })
        };
        match self.selector()?.0 {
            Erc20::transferCall::SELECTOR => spend(
                Erc20::transferCall::abi_decode_validate(&self.data)
                    .ok()?
                    .amount,
                false,
            ),
            Erc20::transferFromCall::SELECTOR => spend(
                Erc20::transferFromCall::abi_decode_validate(&self.data)
                    .ok()?
                    .amount,
                false,
            ),
            Erc20::approveCall::SELECTOR => spend(
                Erc20::approveCall::abi_decode_validate(&self.data)
                    .ok()?
                    .amount,
                true,
            ),
            _ => None,
        }
    }
}

/// Why callData could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalldataError {
    /// The outer selector is no account shape we decode.
    #[error("unknown account call {0}: not an account shape this paymaster decodes")]
    UnknownAccountCall(String),
    /// A known shape whose arguments do not decode, or arrays of different lengths.
    #[error("malformed {shape} calldata: {reason}")]
    Malformed {
        /// The account function.
        shape: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Self-calls or MultiSend nested deeper than [`MAX_DEPTH`].
    #[error("calls nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// More calls than [`MAX_CALLS`].
    #[error(
        "callData makes more than {MAX_CALLS} calls (each self-call or MultiSend call that wraps \
         others counted too): split them across operations"
    )]
    TooManyCalls,
    /// More bytes of calls' data than [`COPIES_PER_BYTE`] times the `callData`'s size.
    #[error(
        "decoding callData would copy more than {COPIES_PER_BYTE} times its size (plus \
         {COPY_SLACK_KIB} KiB) in calls' data: batch entries whose offsets point at the same \
         data, which no ABI encoder writes; encode each entry once"
    )]
    TooManyBytes,
}

fn malformed(shape: &'static str) -> impl Fn(alloy::sol_types::Error) -> CalldataError {
    move |e| match e {
        // The decoder's limit is what the budget has left (Budget::config).
        alloy::sol_types::Error::MemoryLimitExceeded(_) => CalldataError::TooManyBytes,
        e => CalldataError::Malformed {
            shape,
            reason: e.to_string(),
        },
    }
}

fn bad(shape: &'static str, reason: &str) -> CalldataError {
    CalldataError::Malformed {
        shape,
        reason: reason.to_owned(),
    }
}

/// Decode the `callData` an account `sender` receives from the EntryPoint into the calls it makes.
pub fn decode(call_data: &[u8], sender: Address) -> Result<Vec<Call>, CalldataError> {
    let mut out = Vec::new();
    let mut budget = Budget {
        calls: MAX_CALLS,
        bytes: call_data
            .len()
            .saturating_mul(COPIES_PER_BYTE)
            .saturating_add(COPY_SLACK_KIB * 1024),
    };
    decode_account_call(call_data, sender, 0, &mut budget, &mut out)?;
    Ok(out)
}

/// What decoding one `callData` may still make: calls, and bytes copied. Every ABI decode runs
/// with the bytes left as its memory limit (alloy's decoder charges each `bytes` value it reads,
/// again when a second offset points at it, before it copies any), and what it made is then
/// charged here.
struct Budget {
    calls: usize,
    bytes: usize,
}

impl Budget {
    /// Validating ABI decoding (dirty bits refused), within the bytes left.
    fn config(&self) -> AbiDecoderConfig {
        AbiDecoderConfig::new()
            .validate(true)
            .memory_limit(self.bytes)
    }

    fn take_bytes(&mut self, n: usize) -> Result<(), CalldataError> {
        self.bytes = self
            .bytes
            .checked_sub(n)
            .ok_or(CalldataError::TooManyBytes)?;
        Ok(())
    }

    /// Calls one level decoded, with their data.
    fn take(&mut self, calls: &[Call]) -> Result<(), CalldataError> {
        self.calls = self
            .calls
            .checked_sub(calls.len())
            .ok_or(CalldataError::TooManyCalls)?;
        self.take_bytes(calls.iter().map(|c| c.data.len()).sum())
    }
}

/// Validating ABI decoding throughout (`Budget::config`): values with dirty bits
/// (an address's high bytes, a bool above 1) are refused. Offsets are followed from the same
/// bases as Solidity's decoder and the accounts' own assembly follow them, so a layout that is
/// not canonical (gaps, overlaps, trailing bytes) decodes to what the account reads; data out of
/// bounds is refused.
fn decode_account_call(
    data: &[u8],
    sender: Address,
    depth: usize,
    budget: &mut Budget,
    out: &mut Vec<Call>,
) -> Result<(), CalldataError> {
    if depth > MAX_DEPTH {
        return Err(CalldataError::TooDeep);
    }
    let Some(selector) = data.get(..4).map(|s| [s[0], s[1], s[2], s[3]]) else {
        return Err(CalldataError::UnknownAccountCall(format!(
            "0x{}",
            hex::encode(data)
        )));
    };
    let calls: Vec<Call> = match selector {
        SimpleAccount::executeCall::SELECTOR => {
            let c = SimpleAccount::executeCall::abi_decode_with_config(data, budget.config())
                .map_err(malformed("execute"))?;
            vec![Call::new(c.dest, c.value, c.func)]
        }
        SimpleAccountV06::executeBatchCall::SELECTOR => {
            let shape = "executeBatch(address[],bytes[])";
            let c =
                SimpleAccountV06::executeBatchCall::abi_decode_with_config(data, budget.config())
                    .map_err(malformed(shape))?;
            if c.dest.len() != c.func.len() {
                return Err(bad(shape, "array lengths differ"));
            }
            c.dest
                .into_iter()
                .zip(c.func)
                .map(|(t, d)| Call::new(t, U256::ZERO, d))
                .collect()
        }
        SimpleAccountV07::executeBatchCall::SELECTOR => {
            let shape = "executeBatch(address[],uint256[],bytes[])";
            let c =
                SimpleAccountV07::executeBatchCall::abi_decode_with_config(data, budget.config())
                    .map_err(malformed(shape))?;
            // SimpleAccount v0.7: `value.length == 0 || value.length == func.length`.
            if c.dest.len() != c.func.len()
                || !(c.value.is_empty() || c.value.len() == c.func.len())
            {
                return Err(bad(shape, "array lengths differ"));
            }
            let values = c.value;
            c.dest
                .into_iter()
                .zip(c.func)
                .enumerate()
                .map(|(i, (t, d))| Call::new(t, values.get(i).copied().unwrap_or_default(), d))
                .collect()
        }
        SimpleAccountV08::executeBatchCall::SELECTOR => {
            let c =
                SimpleAccountV08::executeBatchCall::abi_decode_with_config(data, budget.config())
                    .map_err(malformed("executeBatch((address,uint256,bytes)[])"))?;
            c.calls
                .into_iter()
                .map(|c| Call::new(c.target, c.value, c.data))
                .collect()
        }
        Erc7579Account::executeCall::SELECTOR => {
            let c = Erc7579Account::executeCall::abi_decode_with_config(data, budget.config())
                .map_err(malformed("ERC-7579 execute"))?;
            budget.take_bytes(c.executionCalldata.len())?;
            let calls = decode_7579(c.mode, &c.executionCalldata, budget)?;
            // ERC-7821 accounts (Solady's among them) share the selector and the batch mode,
            // and run a call to address(0) as a call to the account itself: with any data, a
            // self-call no rule would see. An ERC-7579 account's call there only burns the
            // value it sends.
            if calls.iter().any(|c| c.target.is_zero()) {
                return Err(bad(
                    "ERC-7579 execute",
                    "a call to address(0) (an ERC-7821 account runs it as a call to itself)",
                ));
            }
            calls
        }
        Safe4337Module::executeUserOpCall::SELECTOR => {
            let c =
                Safe4337Module::executeUserOpCall::abi_decode_with_config(data, budget.config())
                    .map_err(malformed("Safe executeUserOp"))?;
            vec![safe_call(
                c.to,
                c.value,
                c.data,
                c.operation,
                "Safe executeUserOp",
            )?]
        }
        Safe4337Module::executeUserOpWithErrorStringCall::SELECTOR => {
            let c = Safe4337Module::executeUserOpWithErrorStringCall::abi_decode_with_config(
                data,
                budget.config(),
            )
            .map_err(malformed("Safe executeUserOpWithErrorString"))?;
            vec![safe_call(
                c.to,
                c.value,
                c.data,
                c.operation,
                "Safe executeUserOpWithErrorString",
            )?]
        }
        other => {
            return Err(CalldataError::UnknownAccountCall(format!(
                "0x{}",
                hex::encode(other)
            )));
        }
    };
    budget.take(&calls)?;
    for call in calls {
        expand(call, sender, depth, budget, out)?;
    }
    Ok(())
}

/// A self-call re-enters the account: decode what it runs. A delegatecall to a known MultiSend
/// runs its packed transactions as the account. Any other call to the account itself is
/// refused; everything else is a leaf.
fn expand(
    call: Call,
    sender: Address,
    depth: usize,
    budget: &mut Budget,
    out: &mut Vec<Call>,
) -> Result<(), CalldataError> {
    if call.target == sender
        && call.kind == CallKind::Call
        && call.value.is_zero()
        && call.data.len() >= 4
    {
        return decode_account_call(&call.data, sender, depth + 1, budget, out);
    }
    if call.kind == CallKind::DelegateCall
        && KNOWN_MULTISEND.contains(&call.target)
        && call
            .selector()
            .is_some_and(|s| s.0 == MultiSend::multiSendCall::SELECTOR)
    {
        if depth + 1 > MAX_DEPTH {
            return Err(CalldataError::TooDeep);
        }
        let m = MultiSend::multiSendCall::abi_decode_with_config(&call.data, budget.config())
            .map_err(malformed("multiSend"))?;
        budget.take_bytes(m.transactions.len())?;
        let inner = decode_multisend(&m.transactions)?;
        budget.take(&inner)?;
        for inner in inner {
            expand(inner, sender, depth + 1, budget, out)?;
        }
        return Ok(());
    }
    // A call to the account itself that is not decoded above (with value, static, a
    // delegatecall, or without a function) re-enters it unseen: an account that lets itself
    // call its own `execute` with value runs what that wraps, which no rule would check. (A
    // plain self-call of value 0 to anything but an execution function is refused by
    // `decode_account_call`, as an unknown account call.)
    if call.target == sender {
        return Err(bad(
            "self-call",
            "a call to the account itself with value, static, as a delegatecall or without a \
             function: only plain calls of value 0 to its execution functions are decoded",
        ));
    }
    out.push(call);
    Ok(())
}

/// ERC-7579 mode: byte 0 call type (0x00 single, 0x01 batch, 0xfe static, 0xff delegatecall),
/// byte 1 exec type (0x00 revert, 0x01 try); the rest selects account-specific modes, which
/// we do not decode unless zero.
fn decode_7579(
    mode: FixedBytes<32>,
    exec: &[u8],
    budget: &Budget,
) -> Result<Vec<Call>, CalldataError> {
    const SHAPE: &str = "ERC-7579 execute";
    if mode[1] > 0x01 {
        return Err(bad(SHAPE, "unknown exec type"));
    }
    if mode[2..6] != [0; 4] || mode[6..10] != [0; 4] {
        return Err(bad(SHAPE, "unsupported mode selector"));
    }
    let single = |kind: CallKind| -> Result<Vec<Call>, CalldataError> {
        // abi.encodePacked(target, value, callData)
        if exec.len() < 52 {
            return Err(bad(SHAPE, "single execution shorter than 52 bytes"));
        }
        let target = Address::from_slice(&exec[..20]);
        let value = U256::from_be_slice(&exec[20..52]);
        Ok(vec![Call {
            target,
            value,
            data: Bytes::copy_from_slice(&exec[52..]),
            kind,
        }])
    };
    match mode[0] {
        0x00 => single(CallKind::Call),
        0xfe => single(CallKind::StaticCall),
        0x01 => {
            let calls = <alloy::sol_types::sol_data::Array<BatchCall> as alloy::sol_types::SolType>::abi_decode_with_config(exec, budget.config())
                .map_err(malformed(SHAPE))?;
            Ok(calls
                .into_iter()
                .map(|c| Call::new(c.target, c.value, c.data))
                .collect())
        }
        0xff => {
            // abi.encodePacked(target, callData): no value.
            if exec.len() < 20 {
                return Err(bad(SHAPE, "delegatecall execution shorter than 20 bytes"));
            }
            let target = Address::from_slice(&exec[..20]);
            Ok(vec![Call {
                target,
                value: U256::ZERO,
                data: Bytes::copy_from_slice(&exec[20..]),
                kind: CallKind::DelegateCall,
            }])
        }
        other => Err(bad(SHAPE, &format!("unknown call type 0x{other:02x}"))),
    }
}

fn safe_call(
    to: Address,
    value: U256,
    data: Bytes,
    operation: u8,
    shape: &'static str,
) -> Result<Call, CalldataError> {
    let kind = match operation {
        0 => CallKind::Call,
        1 => CallKind::DelegateCall,
        _ => return Err(bad(shape, "operation must be 0 (call) or 1 (delegatecall)")),
    };
    if kind == CallKind::DelegateCall && !value.is_zero() {
        return Err(bad(shape, "delegatecall with value"));
    }
    Ok(Call {
        target: to,
        value,
        data,
        kind,
    })
}

/// MultiSend's packed transactions: `operation(1) ‖ to(20) ‖ value(32) ‖ dataLength(32) ‖ data`.
fn decode_multisend(mut packed: &[u8]) -> Result<Vec<Call>, CalldataError> {
    const SHAPE: &str = "multiSend";
    let mut calls = Vec::new();
    while !packed.is_empty() {
        if packed.len() < 85 {
            return Err(bad(SHAPE, "truncated transaction header"));
        }
        let to = Address::from_slice(&packed[1..21]);
        // MultiSend 1.5 runs a transaction to address(0) as one to the Safe itself: with any
        // data, a self-call no rule would see.
        if to.is_zero() {
            return Err(bad(
                SHAPE,
                "a transaction to address(0) (MultiSend 1.5 runs it as a call to the Safe itself)",
            ));
        }
        let value = U256::from_be_slice(&packed[21..53]);
        let len = U256::from_be_slice(&packed[53..85]);
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= packed.len() - 85)
            .ok_or_else(|| bad(SHAPE, "data length past the end"))?;
        let data = Bytes::copy_from_slice(&packed[85..85 + len]);
        calls.push(safe_call(to, value, data, packed[0], SHAPE)?);
        packed = &packed[85 + len..];
    }
    Ok(calls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::sol_types::SolValue;
    use proptest::prelude::*;

    const SENDER: Address = Address::repeat_byte(0xaa);

    #[test]
    fn selectors_match_design() {
        assert_eq!(
            hex::encode(SimpleAccount::executeCall::SELECTOR),
            "b61d27f6"
        );
        assert_eq!(
            hex::encode(SimpleAccountV06::executeBatchCall::SELECTOR),
            "18dfb3c7"
        );
        assert_eq!(
            hex::encode(SimpleAccountV07::executeBatchCall::SELECTOR),
            "47e1da2a"
        );
        assert_eq!(
            hex::encode(SimpleAccountV08::executeBatchCall::SELECTOR),
            "34fcd5be"
        );
        assert_eq!(
            hex::encode(Erc7579Account::executeCall::SELECTOR),
            "e9ae5c53"
        );
        assert_eq!(
            hex::encode(Safe4337Module::executeUserOpCall::SELECTOR),
            "7bb37428"
        );
        assert_eq!(
            hex::encode(Safe4337Module::executeUserOpWithErrorStringCall::SELECTOR),
            "541d63c8"
        );
        assert_eq!(hex::encode(MultiSend::multiSendCall::SELECTOR), "8d80ff0a");
        assert_eq!(hex::encode(Erc20::transferCall::SELECTOR), "a9059cbb");
        assert_eq!(hex::encode(Erc20::transferFromCall::SELECTOR), "23b872dd");
        assert_eq!(hex::encode(Erc20::approveCall::SELECTOR), "095ea7b3");
    }

    #[test]
    fn rejects_unknown_and_malformed() {
        assert!(matches!(
            decode(&[], SENDER),
            Err(CalldataError::UnknownAccountCall(_))
        ));
        assert!(matches!(
            decode(&[1, 2, 3, 4, 5], SENDER),
            Err(CalldataError::UnknownAccountCall(_))
        ));
        let mut truncated = SimpleAccount::executeCall {
            dest: Address::ZERO,
            value: U256::ZERO,
            func: Bytes::new(),
        }
        .abi_encode();
        truncated.truncate(40);
        assert!(matches!(
            decode(&truncated, SENDER),
            Err(CalldataError::Malformed { .. })
        ));
        let mismatched = SimpleAccountV07::executeBatchCall {
            dest: vec![Address::ZERO; 2],
            value: vec![U256::ZERO],
            func: vec![Bytes::new(), Bytes::new()],
        }
        .abi_encode();
        assert!(matches!(
            decode(&mismatched, SENDER),
            Err(CalldataError::Malformed { .. })
        ));
    }

    fn mode(call_type: u8) -> FixedBytes<32> {
        let mut m = [0u8; 32];
        m[0] = call_type;
        m.into()
    }

    #[test]
    fn erc7579_single_static_delegate_and_bad_modes() {
        let target = Address::repeat_byte(0x12);
        let packed = [
            target.as_slice(),
            &U256::from(5).to_be_bytes::<32>(),
            &[0xde, 0xad, 0xbe, 0xef],
        ]
        .concat();
        for (ct, kind) in [(0x00, CallKind::Call), (0xfe, CallKind::StaticCall)] {
            let data = Erc7579Account::executeCall {
                mode: mode(ct),
                executionCalldata: packed.clone().into(),
            }
            .abi_encode();
            let calls = decode(&data, SENDER).unwrap();
            assert_eq!(
                calls,
                vec![Call {
                    target,
                    value: U256::from(5),
                    data: vec![0xde, 0xad, 0xbe, 0xef].into(),
                    kind
                }]
            );
        }
        let dc = [target.as_slice(), &[1, 2, 3, 4]].concat();
        let data = Erc7579Account::executeCall {
            mode: mode(0xff),
            executionCalldata: dc.into(),
        }
        .abi_encode();
        assert_eq!(
            decode(&data, SENDER).unwrap()[0].kind,
            CallKind::DelegateCall
        );
        for bad_mode in [
            mode(0x02),
            {
                let mut m = mode(0);
                m[1] = 2;
                m
            },
            {
                let mut m = mode(0);
                m[7] = 1;
                m
            },
        ] {
            let data = Erc7579Account::executeCall {
                mode: bad_mode,
                executionCalldata: packed.clone().into(),
            }
            .abi_encode();
            assert!(
                matches!(decode(&data, SENDER), Err(CalldataError::Malformed { .. })),
                "{bad_mode}"
            );
        }
        let short = Erc7579Account::executeCall {
            mode: mode(0),
            executionCalldata: vec![0; 51].into(),
        }
        .abi_encode();
        assert!(decode(&short, SENDER).is_err());
        // A call to address(0), alone or in a batch: an ERC-7821 account runs it as a call to
        // itself.
        let to_zero = [
            Address::ZERO.as_slice(),
            &[0; 32],
            &[0xde, 0xad, 0xbe, 0xef],
        ]
        .concat();
        let batch = vec![
            BatchCall {
                target,
                value: U256::ZERO,
                data: vec![1, 2, 3, 4].into(),
            },
            BatchCall {
                target: Address::ZERO,
                value: U256::ZERO,
                data: vec![0xde, 0xad, 0xbe, 0xef].into(),
            },
        ];
        for (m, exec) in [(mode(0), to_zero), (mode(0x01), batch.abi_encode())] {
            let data = Erc7579Account::executeCall {
                mode: m,
                executionCalldata: exec.into(),
            }
            .abi_encode();
            assert!(
                matches!(decode(&data, SENDER), Err(CalldataError::Malformed { .. })),
                "{m}"
            );
        }
    }

    fn multisend(calls: &[(u8, Call)]) -> Bytes {
        let mut packed = Vec::new();
        for (op, c) in calls {
            packed.push(*op);
            packed.extend_from_slice(c.target.as_slice());
            packed.extend_from_slice(&c.value.to_be_bytes::<32>());
            packed.extend_from_slice(&U256::from(c.data.len()).to_be_bytes::<32>());
            packed.extend_from_slice(&c.data);
        }
        MultiSend::multiSendCall {
            transactions: packed.into(),
        }
        .abi_encode()
        .into()
    }

    #[test]
    fn safe_multisend_through_delegatecall_is_expanded() {
        let a = Call::new(
            Address::repeat_byte(1),
            U256::from(1),
            vec![1, 2, 3, 4].into(),
        );
        let b = Call::new(Address::repeat_byte(2), U256::ZERO, Bytes::new());
        let ms = multisend(&[(0, a.clone()), (0, b.clone())]);
        let data = Safe4337Module::executeUserOpCall {
            to: KNOWN_MULTISEND[2],
            value: U256::ZERO,
            data: ms.clone(),
            operation: 1,
        }
        .abi_encode();
        assert_eq!(decode(&data, SENDER).unwrap(), vec![a.clone(), b]);

        // An unknown contract reached by delegatecall stays a delegatecall leaf (denied by policy
        // unless a rule allows it).
        let other = Address::repeat_byte(9);
        let data = Safe4337Module::executeUserOpCall {
            to: other,
            value: U256::ZERO,
            data: ms,
            operation: 1,
        }
        .abi_encode();
        assert_eq!(
            decode(&data, SENDER).unwrap()[0].kind,
            CallKind::DelegateCall
        );

        // Truncated packed transactions, bad operations.
        let mut broken = multisend(&[(0, a.clone())]).to_vec();
        broken.truncate(broken.len() - 40);
        let bad = MultiSend::multiSendCall::abi_decode(&broken).map(|m| m.transactions);
        if let Ok(t) = bad {
            assert!(decode_multisend(&t[..t.len().saturating_sub(3)]).is_err());
        }
        assert!(decode_multisend(&multisend(&[(2, a)])[68..]).is_err());
    }

    /// A MultiSend transaction to address(0), which MultiSend 1.5 runs as a call to the Safe
    /// itself, is refused (found by review).
    #[test]
    fn a_multisend_transaction_to_address_zero_is_refused() {
        let zero = Call::new(Address::ZERO, U256::ZERO, vec![1, 2, 3, 4].into());
        let data = Safe4337Module::executeUserOpCall {
            to: KNOWN_MULTISEND[2],
            value: U256::ZERO,
            data: multisend(&[(0, zero)]),
            operation: 1,
        }
        .abi_encode();
        assert!(
            matches!(decode(&data, SENDER), Err(CalldataError::Malformed { shape: "multiSend", ref reason }) if reason.contains("address(0)")),
            "{:?}",
            decode(&data, SENDER)
        );
    }

    /// A call to the account itself that is not decoded (with value, static, a delegatecall,
    /// or without a function) is refused: an account that accepts a payable self-call of its
    /// own `execute` would run what that wraps unchecked (found by review).
    #[test]
    fn a_self_call_that_is_not_decoded_is_refused() {
        let hidden = SimpleAccount::executeCall {
            dest: Address::repeat_byte(7),
            value: U256::ZERO,
            func: vec![9, 9, 9, 9].into(),
        }
        .abi_encode();
        let self_call = |value: u64, func: Vec<u8>| {
            SimpleAccount::executeCall {
                dest: SENDER,
                value: U256::from(value),
                func: func.into(),
            }
            .abi_encode()
        };
        let safe = |operation: u8| {
            Safe4337Module::executeUserOpCall {
                to: SENDER,
                value: U256::ZERO,
                data: hidden.clone().into(),
                operation,
            }
            .abi_encode()
        };
        let static_self = Erc7579Account::executeCall {
            mode: mode(0xfe),
            executionCalldata: [SENDER.as_slice(), &[0; 32], &hidden].concat().into(),
        }
        .abi_encode();
        for (what, data) in [
            ("with value", self_call(1, hidden.clone())),
            ("with value, no function", self_call(1, Vec::new())),
            ("no function", self_call(0, vec![1, 2])),
            ("empty, of value 0", self_call(0, Vec::new())),
            ("a Safe delegatecall", safe(1)),
            ("an ERC-7579 static call", static_self),
        ] {
            assert!(
                matches!(
                    decode(&data, SENDER),
                    Err(CalldataError::Malformed {
                        shape: "self-call",
                        ..
                    })
                ),
                "{what}: {:?}",
                decode(&data, SENDER)
            );
        }
        // A plain self-call of value 0 is still decoded.
        assert_eq!(
            decode(&self_call(0, hidden), SENDER).unwrap(),
            vec![Call::new(
                Address::repeat_byte(7),
                U256::ZERO,
                vec![9, 9, 9, 9].into()
            )]
        );
    }

    #[test]
    fn self_calls_are_decoded_and_bounded() {
        let leaf = Call::new(Address::repeat_byte(3), U256::ZERO, vec![9, 9, 9, 9].into());
        let mut data = SimpleAccount::executeCall {
            dest: leaf.target,
            value: leaf.value,
            func: leaf.data.clone(),
        }
        .abi_encode();
        for _ in 0..MAX_DEPTH {
            data = SimpleAccount::executeCall {
                dest: SENDER,
                value: U256::ZERO,
                func: data.into(),
            }
            .abi_encode();
        }
        assert_eq!(decode(&data, SENDER).unwrap(), vec![leaf]);
        let deeper = SimpleAccount::executeCall {
            dest: SENDER,
            value: U256::ZERO,
            func: data.into(),
        }
        .abi_encode();
        assert_eq!(decode(&deeper, SENDER), Err(CalldataError::TooDeep));
    }

    /// `executeBatch((address,uint256,bytes)[])` of `n` entries whose offsets all point at one
    /// call (`target`, no value, `data`): no encoder writes it, and Solidity's decoder (so the
    /// account) reads it as that call `n` times.
    fn aliased_batch(n: usize, target: Address, data: &[u8]) -> Vec<u8> {
        let word = |v: usize| U256::from(v).to_be_bytes::<32>();
        let mut out = SimpleAccountV08::executeBatchCall::SELECTOR.to_vec();
        out.extend(word(0x20));
        out.extend(word(n));
        for _ in 0..n {
            out.extend(word(32 * n));
        }
        out.extend([0; 12]);
        out.extend(target.as_slice());
        out.extend(word(0));
        out.extend(word(0x60));
        out.extend(word(data.len()));
        out.extend(data);
        out.resize(out.len() + data.len().next_multiple_of(32) - data.len(), 0);
        out
    }

    /// `executeBatch(address[],bytes[])` (v0.6), or with an empty `uint256[]` of values between
    /// (v0.7), of `n` calls to `target` whose `bytes` entries all point at one `data`.
    fn aliased_bytes_batch(v07: bool, n: usize, target: Address, data: &[u8]) -> Vec<u8> {
        let word = |v: usize| U256::from(v).to_be_bytes::<32>().to_vec();
        let mut dest = word(n);
        for _ in 0..n {
            dest.extend([0; 12]);
            dest.extend(target.as_slice());
        }
        let mut func = word(n);
        for _ in 0..n {
            func.extend(word(32 * n));
        }
        func.extend(word(data.len()));
        func.extend(data);
        func.resize(func.len() + data.len().next_multiple_of(32) - data.len(), 0);
        let (selector, arrays) = if v07 {
            (
                SimpleAccountV07::executeBatchCall::SELECTOR,
                vec![dest, word(0), func],
            )
        } else {
            (
                SimpleAccountV06::executeBatchCall::SELECTOR,
                vec![dest, func],
            )
        };
        let mut out = selector.to_vec();
        let mut at = 32 * arrays.len();
        for a in &arrays {
            out.extend(word(at));
            at += a.len();
        }
        out.extend(arrays.concat());
        out
    }

    /// Found in review: entries of a batch may point at the same data, and each level of self-
    /// calls multiplied the calls of the one below, so 2.4 kB named 8^5 = 32,768 calls (7.5 kB,
    /// 40^5: a hundred million, gigabytes, before any policy ran).
    #[test]
    fn repeated_offsets_cannot_multiply_calls_or_bytes() {
        let leaf = Address::repeat_byte(0x12);
        // Decoded as the account reads it.
        assert_eq!(
            decode(&aliased_batch(4, leaf, &[0xde, 0xad]), SENDER).unwrap(),
            vec![Call::new(leaf, U256::ZERO, vec![0xde, 0xad].into()); 4]
        );
        let mut nested = aliased_batch(8, leaf, &[]);
        for _ in 0..MAX_DEPTH {
            nested = aliased_batch(8, SENDER, &nested);
        }
        assert_eq!(nested.len(), 2_372);
        // (The bytes run out before the calls: every entry copies the whole level below.)
        assert_eq!(
            decode(&nested, SENDER).map(|c| c.len()),
            Err(CalldataError::TooManyBytes)
        );
        // The calls' count alone: a level of 1,024 entries naming an empty call (32 KiB of
        // heads), then one more.
        let wide = |n| aliased_batch(n, leaf, &[]);
        assert_eq!(
            decode(&wide(MAX_CALLS), SENDER).map(|c| c.len()),
            Ok(MAX_CALLS)
        );
        assert_eq!(
            decode(&wide(MAX_CALLS + 1), SENDER),
            Err(CalldataError::TooManyCalls)
        );
        // One level copying 64 KiB 64 times; the same as ERC-7579's batch (its execution data
        // is the array alone), and through `bytes[]` entries (v0.6 and v0.7 executeBatch).
        let exec = aliased_batch(64, leaf, &[0xab; 64 * 1024]).split_off(4);
        let erc7579 = Erc7579Account::executeCall {
            mode: mode(0x01),
            executionCalldata: exec.into(),
        }
        .abi_encode();
        assert_eq!(decode(&erc7579, SENDER), Err(CalldataError::TooManyBytes));
        for v07 in [false, true] {
            assert_eq!(
                decode(&aliased_bytes_batch(v07, 4, leaf, &[0xde, 0xad]), SENDER),
                Ok(vec![
                    Call::new(leaf, U256::ZERO, vec![0xde, 0xad].into());
                    4
                ]),
                "v0.7: {v07}"
            );
            assert_eq!(
                decode(
                    &aliased_bytes_batch(v07, 64, leaf, &[0xab; 64 * 1024]),
                    SENDER
                ),
                Err(CalldataError::TooManyBytes),
                "v0.7: {v07}"
            );
        }
        assert_eq!(
            decode(&aliased_batch(64, leaf, &[0xab; 64 * 1024]), SENDER),
            Err(CalldataError::TooManyBytes)
        );
        // What an encoder writes passes both bounds: 1,020 calls of 100 bytes under four
        // wrapping calls (two self-calls, a Safe call to MultiSend, its self-call): exactly
        // MAX_CALLS counted, at the deepest level followed.
        let call = Call::new(leaf, U256::ZERO, vec![7; 100].into());
        let mut data = SimpleAccountV08::executeBatchCall {
            calls: vec![
                BatchCall {
                    target: call.target,
                    value: call.value,
                    data: call.data.clone(),
                };
                MAX_CALLS - MAX_DEPTH
            ],
        }
        .abi_encode();
        data = Safe4337Module::executeUserOpCall {
            to: KNOWN_MULTISEND[2],
            value: U256::ZERO,
            data: multisend(&[(0, Call::new(SENDER, U256::ZERO, data.into()))]),
            operation: 1,
        }
        .abi_encode();
        for _ in 0..MAX_DEPTH - 2 {
            data = SimpleAccount::executeCall {
                dest: SENDER,
                value: U256::ZERO,
                func: data.into(),
            }
            .abi_encode();
        }
        assert_eq!(decode(&data, SENDER), Ok(vec![call; MAX_CALLS - MAX_DEPTH]));
    }

    #[test]
    fn token_spends() {
        let token = Address::repeat_byte(0x70);
        let t = |data: Vec<u8>| Call::new(token, U256::ZERO, data.into()).token_spend();
        let to = Address::repeat_byte(1);
        assert_eq!(
            t(Erc20::transferCall {
                to,
                amount: U256::from(7)
            }
            .abi_encode()),
            Some(TokenSpend {
                token,
                amount: U256::from(7),
                approval: false
            })
        );
        assert_eq!(
            t(Erc20::transferFromCall {
                from: to,
                to,
                amount: U256::from(8)
            }
            .abi_encode())
            .map(|s| s.amount),
            Some(U256::from(8))
        );
        assert_eq!(
            t(Erc20::approveCall {
                spender: to,
                amount: U256::MAX
            }
            .abi_encode())
            .map(|s| s.approval),
            Some(true)
        );
        assert_eq!(t(vec![1, 2, 3, 4]), None);
        let _ = (to, U256::from(1)).abi_encode();
    }

    fn arb_call() -> impl Strategy<Value = Call> {
        (
            any::<[u8; 20]>(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..80),
        )
            .prop_map(|(a, v, d)| Call::new(Address::from(a), U256::from(v), d.into()))
            .prop_filter("not a self-call, nor one to address(0)", |c| {
                c.target != SENDER && !c.target.is_zero()
            })
    }

    proptest! {
        /// Random batches, encoded by the ABI encoder in every shape, decode to the calls that built them.
        #[test]
        fn batches_round_trip(calls in prop::collection::vec(arb_call(), 0..6)) {
            let tuples: Vec<BatchCall> = calls.iter().map(|c| BatchCall { target: c.target, value: c.value, data: c.data.clone() }).collect();
            let v08 = SimpleAccountV08::executeBatchCall { calls: tuples.clone() }.abi_encode();
            prop_assert_eq!(decode(&v08, SENDER)?, calls.clone());

            let erc7579 = Erc7579Account::executeCall { mode: mode(0x01), executionCalldata: tuples.abi_encode().into() }.abi_encode();
            prop_assert_eq!(decode(&erc7579, SENDER)?, calls.clone());

            let v07 = SimpleAccountV07::executeBatchCall {
                dest: calls.iter().map(|c| c.target).collect(),
                value: calls.iter().map(|c| c.value).collect(),
                func: calls.iter().map(|c| c.data.clone()).collect(),
            }.abi_encode();
            prop_assert_eq!(decode(&v07, SENDER)?, calls.clone());

            let zero_values: Vec<Call> = calls.iter().map(|c| Call { value: U256::ZERO, ..c.clone() }).collect();
            let v06 = SimpleAccountV06::executeBatchCall {
                dest: calls.iter().map(|c| c.target).collect(),
                func: calls.iter().map(|c| c.data.clone()).collect(),
            }.abi_encode();
            prop_assert_eq!(decode(&v06, SENDER)?, zero_values);

            let ms = multisend(&calls.iter().map(|c| (0u8, c.clone())).collect::<Vec<_>>());
            let safe = Safe4337Module::executeUserOpCall { to: KNOWN_MULTISEND[0], value: U256::ZERO, data: ms, operation: 1 }.abi_encode();
            prop_assert_eq!(decode(&safe, SENDER)?, calls.clone());

            // Nested: a v0.8 batch whose first call re-enters the account with a v0.7 batch.
            let nested = SimpleAccountV08::executeBatchCall {
                calls: vec![BatchCall { target: SENDER, value: U256::ZERO, data: v07.into() }],
            }.abi_encode();
            prop_assert_eq!(decode(&nested, SENDER)?, calls.clone());

            if let Some(c) = calls.first() {
                let single = SimpleAccount::executeCall { dest: c.target, value: c.value, func: c.data.clone() }.abi_encode();
                prop_assert_eq!(decode(&single, SENDER)?, vec![c.clone()]);
            }
        }
    }
}
