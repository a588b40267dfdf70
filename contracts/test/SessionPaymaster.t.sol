// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

import "@openzeppelin/contracts/access/Ownable.sol";
import "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";
import "entrypoint/interfaces/IEntryPoint.sol";
import "../src/SessionPaymaster.sol";
import "../src/demo/Counter.sol";
import "./TestBase.sol";

interface ISimpleAccountFactory {
    function createAccount(address owner, uint256 salt) external returns (address);
    function getAddress(address owner, uint256 salt) external view returns (address);
}

interface ISimpleAccount {
    function execute(address dest, uint256 value, bytes calldata func) external;
}

/// Runs against the real EntryPoint (deployed from the official npm artifacts) of the version the
/// Foundry profile selects: `forge test` for v0.7, `FOUNDRY_PROFILE=v08 forge test` for v0.8,
/// `FOUNDRY_PROFILE=v09 forge test` for v0.9.
contract SessionPaymasterTest is TestBase {
    /// Mirrors `PAYMASTER_VERIFICATION_GAS` in src/userop/paymaster_data.rs.
    uint128 internal constant PM_VERIFICATION_GAS = 40_000;
    bytes32 internal constant USER_OPERATION_EVENT =
        keccak256("UserOperationEvent(bytes32,address,address,uint256,bool,uint256,uint256)");

    uint256 internal constant SIGNER_KEY = 0x5E55;
    uint256 internal constant OTHER_KEY = 0xBAD;
    uint256 internal constant ACCOUNT_OWNER_KEY = 0xA11CE;
    address internal constant PM_OWNER = address(0x0DD);
    address payable internal constant BUNDLER = payable(address(0xB0D1E5));

    IEntryPoint internal ep;
    ISimpleAccountFactory internal factory;
    SessionPaymaster internal pm;
    Counter internal counter;

    function setUp() public {
        vm.warp(1_700_000_000);
        ep = IEntryPoint(deploy(artifact("EntryPoint")));
        factory = ISimpleAccountFactory(deploy(abi.encodePacked(artifact("SimpleAccountFactory"), abi.encode(ep))));
        address[] memory signers = new address[](1);
        signers[0] = vm.addr(SIGNER_KEY);
        pm = new SessionPaymaster(ep, PM_OWNER, signers);
        vm.deal(address(this), 100 ether);
        pm.deposit{value: 10 ether}();
        counter = new Counter();
    }

    // ---------------------------------------------------------------- helpers

    function _op() internal view returns (PackedUserOperation memory op) {
        address owner = vm.addr(ACCOUNT_OWNER_KEY);
        op.sender = factory.getAddress(owner, 0);
        op.nonce = 0;
        op.initCode = abi.encodePacked(address(factory), abi.encodeCall(ISimpleAccountFactory.createAccount, (owner, 0)));
        op.callData = abi.encodeCall(ISimpleAccount.execute, (address(counter), 0, abi.encodeCall(Counter.increment, ())));
        op.accountGasLimits = _pack(600_000, 100_000);
        op.preVerificationGas = 60_000;
        op.gasFees = _pack(1 gwei, 2 gwei);
        op.paymasterAndData = _pmData(PM_VERIFICATION_GAS, 0, 0, 0, new bytes(65));
    }

    function _pack(uint256 hi, uint256 lo) internal pure returns (bytes32) {
        return bytes32((hi << 128) | lo);
    }

    function _pmData(uint128 vgl, uint128 postOp, uint48 validUntil, uint48 validAfter, bytes memory sig)
        internal
        view
        returns (bytes memory)
    {
        return abi.encodePacked(address(pm), vgl, postOp, validUntil, validAfter, sig);
    }

    /// What the off-chain service does: sign getHash with an EIP-191 prefix.
    function _sponsor(PackedUserOperation memory op, uint48 validUntil, uint48 validAfter, uint256 key)
        internal
        view
    {
        op.paymasterAndData =
            _pmData(uint128(bytes16(_slice(op.paymasterAndData, 20, 16))), 0, validUntil, validAfter, new bytes(65));
        bytes32 digest = MessageHashUtils.toEthSignedMessageHash(pm.getHash(op, validUntil, validAfter));
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(key, digest);
        op.paymasterAndData = abi.encodePacked(_slice(op.paymasterAndData, 0, 64), r, s, v);
    }

    /// validAfter lies in the past: v0.8 requires `block.timestamp > validAfter` (v0.7 `>=`).
    function _sponsor(PackedUserOperation memory op) internal view {
        _sponsor(op, uint48(block.timestamp + 600), uint48(block.timestamp - 60), SIGNER_KEY);
    }

    /// What the account owner does. v0.7 SimpleAccount checks an EIP-191 signature of the
    /// userOpHash; v0.8 and v0.9 SimpleAccount the raw (EIP-712) userOpHash.
    function _signAccount(PackedUserOperation memory op) internal view {
        bytes32 h = ep.getUserOpHash(op);
        if (entryPointVersion() == 7) h = MessageHashUtils.toEthSignedMessageHash(h);
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(ACCOUNT_OWNER_KEY, h);
        op.signature = abi.encodePacked(r, s, v);
    }

    function _handle(PackedUserOperation memory op) internal {
        PackedUserOperation[] memory ops = new PackedUserOperation[](1);
        ops[0] = op;
        vm.prank(BUNDLER, BUNDLER);
        ep.handleOps(ops, BUNDLER);
    }

    function _expectFailedOp(string memory reason) internal {
        vm.expectRevert(abi.encodeWithSelector(IEntryPoint.FailedOp.selector, 0, reason));
    }

    function _slice(bytes memory b, uint256 start, uint256 len) internal pure returns (bytes memory out) {
        out = new bytes(len);
        for (uint256 i = 0; i < len; i++) {
            out[i] = b[start + i];
        }
    }

    function _validationData(bool failed, uint48 validUntil, uint48 validAfter) internal pure returns (uint256) {
        return (failed ? 1 : 0) | (uint256(validUntil) << 160) | (uint256(validAfter) << 208);
    }

    // ---------------------------------------------------------------- handleOps, end to end

    function test_validSignature_paysAndExecutes() public {
        PackedUserOperation memory op = _op();
        _sponsor(op);
        _signAccount(op);
        uint256 depositBefore = pm.getDeposit();

        vm.recordLogs();
        _handle(op);

        vm.assertEq(counter.count(op.sender), 1, "call executed");
        Vm.Log[] memory logs = vm.getRecordedLogs();
        bool seen;
        for (uint256 i = 0; i < logs.length; i++) {
            if (logs[i].emitter != address(ep) || logs[i].topics[0] != USER_OPERATION_EVENT) continue;
            seen = true;
            vm.assertEq(logs[i].topics[1], ep.getUserOpHash(op), "userOpHash");
            vm.assertEq(address(uint160(uint256(logs[i].topics[3]))), address(pm), "paymaster");
            (, bool success, uint256 actualGasCost,) = abi.decode(logs[i].data, (uint256, bool, uint256, uint256));
            vm.assertTrue(success, "op succeeded");
            vm.assertEq(depositBefore - pm.getDeposit(), actualGasCost, "paymaster paid actualGasCost");
        }
        vm.assertTrue(seen, "UserOperationEvent emitted");
    }

    function test_wrongSigner_AA34() public {
        PackedUserOperation memory op = _op();
        _sponsor(op, uint48(block.timestamp + 600), uint48(block.timestamp - 60), OTHER_KEY);
        _signAccount(op);
        _expectFailedOp("AA34 signature error");
        _handle(op);
    }

    /// Every field the paymaster signature covers, changed after signing: refused.
    function test_tamperedFields_AA34() public {
        for (uint256 field = 0; field < 12; field++) {
            PackedUserOperation memory op = _op();
            _sponsor(op);
            if (field == 0) op.callData[op.callData.length - 1] ^= 0x01;
            else if (field == 1) op.nonce = 1 << 64; // another nonce key, still a valid nonce
            else if (field == 2) op.accountGasLimits = _pack(600_001, 100_000);
            else if (field == 3) op.accountGasLimits = _pack(600_000, 100_001);
            else if (field == 4) op.gasFees = _pack(1 gwei, 2 gwei + 1); // maxFeePerGas
            else if (field == 5) op.preVerificationGas += 1;
            else if (field == 6) op.paymasterAndData[35] ^= 0x01; // paymasterVerificationGasLimit
            else if (field == 7) op.paymasterAndData[57] ^= 0x01; // validUntil
            else if (field == 8) op.gasFees = _pack(1 gwei + 1, 2 gwei); // maxPriorityFeePerGas
            else if (field == 9) op.paymasterAndData[63] ^= 0x01; // validAfter (still past)
            else if (field == 10) {
                // Another sender (and the initCode that deploys it).
                address owner = vm.addr(ACCOUNT_OWNER_KEY);
                op.sender = factory.getAddress(owner, 1);
                op.initCode =
                    abi.encodePacked(address(factory), abi.encodeCall(ISimpleAccountFactory.createAccount, (owner, 1)));
            } else {
                // initCode with a trailing byte: the factory ignores it and returns the same
                // sender, so only the paymaster sees the change.
                op.initCode = abi.encodePacked(op.initCode, uint8(1));
            }
            _signAccount(op); // the account owner re-signs: only the paymaster signature is stale
            _expectFailedOp("AA34 signature error");
            _handle(op);
        }
    }

    /// paymasterPostOpGasLimit is signed too; the service always sends 0 (no postOp), so any
    /// other value is both unsigned and refused.
    function test_tamperedPostOpGas_AA34() public {
        PackedUserOperation memory op = _op();
        _sponsor(op);
        op.paymasterAndData[51] = 0x01;
        _signAccount(op);
        _expectFailedOp("AA34 signature error");
        _handle(op);
    }

    /// A signature made for one chain is refused on another (getHash binds block.chainid).
    function test_wrongChainId_AA34() public {
        PackedUserOperation memory op = _op();
        _sponsor(op);
        vm.chainId(block.chainid + 1);
        _signAccount(op); // the account signs for the new chain: only the paymaster's is stale
        _expectFailedOp("AA34 signature error");
        _handle(op);
    }

    /// A signature for this paymaster does not pay through another one with the same signer.
    function test_wrongPaymaster_AA34() public {
        address[] memory signers = new address[](1);
        signers[0] = vm.addr(SIGNER_KEY);
        SessionPaymaster twin = new SessionPaymaster(ep, PM_OWNER, signers);
        twin.deposit{value: 1 ether}();
        PackedUserOperation memory op = _op();
        _sponsor(op);
        bytes memory pmd = op.paymasterAndData;
        bytes20 twinAddress = bytes20(address(twin));
        for (uint256 i = 0; i < 20; i++) pmd[i] = twinAddress[i];
        _signAccount(op);
        _expectFailedOp("AA34 signature error");
        _handle(op);
    }

    /// The high-s twin of a valid signature (s' = n - s, v flipped) recovers the same signer
    /// in bare ecrecover; OpenZeppelin's ECDSA refuses it, so a signature has one form only.
    function test_highSTwin_refused() public {
        PackedUserOperation memory op = _op();
        _sponsor(op);
        bytes memory pmd = op.paymasterAndData;
        uint256 n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141;
        uint256 s;
        assembly {
            s := mload(add(pmd, add(0x20, 96)))
        }
        bytes32 twinS = bytes32(n - s);
        for (uint256 i = 0; i < 32; i++) pmd[96 + i] = twinS[i];
        pmd[128] = pmd[128] == bytes1(uint8(27)) ? bytes1(uint8(28)) : bytes1(uint8(27));
        // The twin is a valid signature of the signer for bare ecrecover...
        bytes32 r;
        assembly {
            r := mload(add(pmd, add(0x20, 64)))
        }
        (uint48 until, uint48 afterTs,) = pm.parsePaymasterAndData(pmd);
        bytes32 digest = MessageHashUtils.toEthSignedMessageHash(pm.getHash(op, until, afterTs));
        vm.assertEq(ecrecover(digest, uint8(pmd[128]), r, twinS), vm.addr(SIGNER_KEY), "the twin recovers the signer");
        // ...and the paymaster refuses it.
        vm.prank(address(ep));
        (, uint256 data) = pm.validatePaymasterUserOp(op, bytes32(0), 1 ether);
        vm.assertEq(data & 1, 1, "SIG_VALIDATION_FAILED for the high-s twin");
        _signAccount(op);
        _expectFailedOp("AA34 signature error");
        _handle(op);
    }

    function test_expired_AA32() public {
        PackedUserOperation memory op = _op();
        _sponsor(op, uint48(block.timestamp - 1), uint48(block.timestamp - 600), SIGNER_KEY);
        _signAccount(op);
        _expectFailedOp("AA32 paymaster expired or not due");
        _handle(op);
    }

    function test_notYetValid_AA32() public {
        PackedUserOperation memory op = _op();
        _sponsor(op, uint48(block.timestamp + 600), uint48(block.timestamp + 60), SIGNER_KEY);
        _signAccount(op);
        _expectFailedOp("AA32 paymaster expired or not due");
        _handle(op);
    }

    // ---------------------------------------------------------------- validatePaymasterUserOp directly

    function test_validationData_carriesWindow() public {
        uint48 until = uint48(block.timestamp + 300);
        uint48 afterTs = uint48(block.timestamp - 5);
        PackedUserOperation memory op = _op();
        _sponsor(op, until, afterTs, SIGNER_KEY);
        vm.prank(address(ep));
        (bytes memory context, uint256 data) = pm.validatePaymasterUserOp(op, bytes32(0), 1 ether);
        vm.assertEq(context.length, 0, "no context: no postOp");
        vm.assertEq(data, _validationData(false, until, afterTs), "valid, with window");

        _sponsor(op, until, afterTs, OTHER_KEY);
        vm.prank(address(ep));
        (, data) = pm.validatePaymasterUserOp(op, bytes32(0), 1 ether);
        vm.assertEq(data, _validationData(true, until, afterTs), "sig failure, window kept");
    }

    function test_garbageSignature_failsWithoutRevert() public {
        PackedUserOperation memory op = _op();
        _sponsor(op);
        bytes memory pmd = op.paymasterAndData;
        for (uint256 i = 64; i < 129; i++) pmd[i] = 0xff; // s above n/2, v = 255: tryRecover errors
        vm.prank(address(ep));
        (, uint256 data) = pm.validatePaymasterUserOp(op, bytes32(0), 1 ether);
        vm.assertEq(data & 1, 1, "SIG_VALIDATION_FAILED");
    }

    function test_onlyEntryPointValidates() public {
        PackedUserOperation memory op = _op();
        _sponsor(op);
        if (entryPointVersion() < 9) {
            vm.expectRevert(bytes("Sender not EntryPoint"));
        } else {
            vm.expectRevert(
                abi.encodeWithSignature(
                    "NotFromEntryPoint(address,address,address)", address(this), address(pm), address(ep)
                )
            );
        }
        pm.validatePaymasterUserOp(op, bytes32(0), 1 ether);
    }

    function test_malformedLengths_revert() public {
        uint256[5] memory lengths = [uint256(52), 64, 128, 130, 200];
        for (uint256 i = 0; i < lengths.length; i++) {
            PackedUserOperation memory op = _op();
            _sponsor(op);
            bytes memory pmd = new bytes(lengths[i]);
            for (uint256 j = 0; j < lengths[i] && j < 129; j++) pmd[j] = op.paymasterAndData[j];
            op.paymasterAndData = pmd;
            bytes memory err = abi.encodeWithSelector(SessionPaymaster.InvalidPaymasterDataLength.selector, lengths[i]);

            vm.prank(address(ep));
            vm.expectRevert(err);
            pm.validatePaymasterUserOp(op, bytes32(0), 1 ether);

            _signAccount(op);
            vm.expectRevert(abi.encodeWithSelector(IEntryPoint.FailedOpWithRevert.selector, 0, "AA33 reverted", err));
            _handle(op);
        }
    }

    // ---------------------------------------------------------------- v0.9 paymaster-signature suffix

    /// `signedPart ‖ signature ‖ uint16(len) ‖ PAYMASTER_SIG_MAGIC` (UserOperationLib).
    function _withSuffix(bytes memory signedPart, bytes memory signature) internal pure returns (bytes memory) {
        return abi.encodePacked(signedPart, signature, uint16(signature.length), bytes8(0x22e325a297439656));
    }

    /// An op whose paymasterAndData has the signature in the suffix: the account signs first,
    /// over the window and a placeholder signature (outside the userOpHash), then `key` signs
    /// getHash and its signature replaces the placeholder. Returns the account-signed hash.
    function _sponsorInSuffix(PackedUserOperation memory op, uint48 until, uint48 afterTs, uint256 key)
        internal
        view
        returns (bytes32 userOpHash)
    {
        bytes memory signedPart = abi.encodePacked(address(pm), PM_VERIFICATION_GAS, uint128(0), until, afterTs);
        op.paymasterAndData = _withSuffix(signedPart, new bytes(65));
        _signAccount(op);
        userOpHash = ep.getUserOpHash(op);
        bytes32 digest = MessageHashUtils.toEthSignedMessageHash(pm.getHash(op, until, afterTs));
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(key, digest);
        op.paymasterAndData = _withSuffix(signedPart, abi.encodePacked(r, s, v));
    }

    /// v0.9: the account signs first (the userOpHash leaves the suffix out), the paymaster's
    /// signature is appended after, and the op pays and executes.
    function test_v09_signatureInSuffix_accountSignsFirst() public {
        vm.skip(entryPointVersion() < 9);
        PackedUserOperation memory op = _op();
        uint48 until = uint48(block.timestamp + 600);
        uint48 afterTs = uint48(block.timestamp - 60);
        bytes32 userOpHash = _sponsorInSuffix(op, until, afterTs, SIGNER_KEY);
        vm.assertEq(op.paymasterAndData.length, 139, "139 bytes");
        vm.assertEq(ep.getUserOpHash(op), userOpHash, "the paymaster signature is outside the userOpHash");

        vm.prank(address(ep));
        (, uint256 data) = pm.validatePaymasterUserOp(op, userOpHash, 1 ether);
        vm.assertEq(data, _validationData(false, until, afterTs), "valid, window kept");
        _handle(op);
        vm.assertEq(counter.count(op.sender), 1, "call executed");
    }

    /// v0.9: a wrong signature in the suffix fails like an inline one (AA34, no revert).
    function test_v09_wrongSignatureInSuffix_AA34() public {
        vm.skip(entryPointVersion() < 9);
        PackedUserOperation memory op = _op();
        _sponsorInSuffix(op, uint48(block.timestamp + 600), uint48(block.timestamp - 60), OTHER_KEY);
        _expectFailedOp("AA34 signature error");
        _handle(op);
    }

    /// A suffix whose parts are not (64-byte signed part, 65-byte signature) is malformed; and
    /// before v0.9 no suffix is read at all, so the 139-byte form is just a wrong length.
    function test_suffixLayouts_refusedUnlessExact() public {
        PackedUserOperation memory op = _op();
        bytes memory head = abi.encodePacked(address(pm), PM_VERIFICATION_GAS, uint128(0), uint48(1), uint48(0));
        bytes[4] memory bad = [
            _withSuffix(head, new bytes(64)),
            _withSuffix(abi.encodePacked(head, bytes1(0)), new bytes(65)),
            _withSuffix(_slice(head, 0, 63), new bytes(65)),
            _withSuffix(abi.encodePacked(head, new bytes(65)), new bytes(65))
        ];
        for (uint256 i = 0; i < bad.length; i++) {
            vm.expectRevert(abi.encodeWithSelector(SessionPaymaster.InvalidPaymasterDataLength.selector, bad[i].length));
            pm.parsePaymasterAndData(bad[i]);
        }
        op.paymasterAndData = _withSuffix(head, new bytes(65));
        if (entryPointVersion() < 9) {
            vm.expectRevert(abi.encodeWithSelector(SessionPaymaster.InvalidPaymasterDataLength.selector, 139));
            pm.parsePaymasterAndData(op.paymasterAndData);
            return;
        }
        (uint48 until, uint48 afterTs, bytes memory signature) = pm.parsePaymasterAndData(op.paymasterAndData);
        vm.assertEq(until, 1, "validUntil read from the signed part");
        vm.assertEq(afterTs, 0, "validAfter read from the signed part");
        vm.assertEq(keccak256(signature), keccak256(new bytes(65)), "the signature from the suffix");
    }

    // ---------------------------------------------------------------- EIP-7702 accounts

    /// From v0.8 on, getHash puts an EIP-7702 account's delegate (read from its code) where the
    /// initCode's hash goes, as the EntryPoint's userOpHash does: the signature binds the code
    /// that runs. v0.7 has no such accounts: the marker is hashed as any initCode.
    function test_eip7702_delegateBindsTheHash() public {
        PackedUserOperation memory op = _op();
        address eoa = vm.addr(ACCOUNT_OWNER_KEY);
        op.sender = eoa;
        op.initCode = hex"7702";
        address delegate = address(0xD1);
        vm.etch(eoa, abi.encodePacked(hex"ef0100", delegate));
        bytes32 h = pm.getHash(op, 1, 0);
        bytes32 initCodeHash = entryPointVersion() < 8 ? keccak256(op.initCode) : keccak256(abi.encodePacked(delegate));
        bytes32 expected = keccak256(
            abi.encode(
                op.sender, op.nonce, initCodeHash, keccak256(op.callData), op.accountGasLimits,
                uint256(bytes32(_slice(op.paymasterAndData, 20, 32))), op.preVerificationGas, op.gasFees,
                block.chainid, address(pm), uint48(1), uint48(0)
            )
        );
        vm.assertEq(h, expected, "delegate in place of the initCode");
        vm.etch(eoa, abi.encodePacked(hex"ef0100", address(0xD2)));
        if (entryPointVersion() < 8) {
            vm.assertEq(pm.getHash(op, 1, 0), h, "v0.7: the marker is plain initCode");
            return;
        }
        vm.assertTrue(pm.getHash(op, 1, 0) != h, "another delegate, another hash");
        // A marker on an account that delegates nowhere: no hash, as getUserOpHash has none.
        vm.etch(eoa, "");
        vm.expectRevert(); // v0.8: "sender has no code"; v0.9: Eip7702SenderWithoutCode
        pm.getHash(op, 1, 0);
    }

    // ---------------------------------------------------------------- signer set

    function test_signerRotation() public {
        address newSigner = vm.addr(OTHER_KEY);
        vm.prank(PM_OWNER);
        pm.addSigner(newSigner);
        vm.assertTrue(pm.isSigner(newSigner), "new signer added");
        vm.prank(PM_OWNER);
        pm.removeSigner(vm.addr(SIGNER_KEY));
        vm.assertFalse(pm.isSigner(vm.addr(SIGNER_KEY)), "old signer removed");

        PackedUserOperation memory op = _op();
        _sponsor(op); // old key
        _signAccount(op);
        _expectFailedOp("AA34 signature error");
        _handle(op);

        _sponsor(op, uint48(block.timestamp + 600), uint48(block.timestamp - 60), OTHER_KEY);
        _signAccount(op);
        _handle(op);
        vm.assertEq(counter.count(op.sender), 1, "new signer's op executed");
    }

    function test_signersListsTheSetThroughAddsAndRemoves() public {
        address a = vm.addr(SIGNER_KEY);
        address b = vm.addr(OTHER_KEY);
        address c = address(0xC0FFEE);
        _asOwner(abi.encodeCall(pm.addSigner, (b)));
        _asOwner(abi.encodeCall(pm.addSigner, (b))); // again: listed once
        _asOwner(abi.encodeCall(pm.addSigner, (c)));
        _assertSigners(_three(a, b, c), 3);
        _asOwner(abi.encodeCall(pm.removeSigner, (a))); // the first: the last takes its place
        _assertSigners(_three(c, b, address(0)), 2);
        _asOwner(abi.encodeCall(pm.removeSigner, (a))); // not a signer: nothing changes
        _asOwner(abi.encodeCall(pm.removeSigner, (b)));
        _assertSigners(_three(c, address(0), address(0)), 1);
        _asOwner(abi.encodeCall(pm.removeSigner, (c)));
        _assertSigners(_three(address(0), address(0), address(0)), 0);
        _asOwner(abi.encodeCall(pm.addSigner, (a)));
        _assertSigners(_three(a, address(0), address(0)), 1);
        address[3] memory all = [a, b, c];
        address[] memory listed = pm.signers();
        for (uint256 i = 0; i < 3; i++) {
            bool found = false;
            for (uint256 j = 0; j < listed.length; j++) found = found || listed[j] == all[i];
            vm.assertTrue(found == pm.isSigner(all[i]), "the list and isSigner agree");
        }
    }

    function _asOwner(bytes memory call) private {
        vm.prank(PM_OWNER);
        (bool ok,) = address(pm).call(call);
        vm.assertTrue(ok, "owner call");
    }

    function _three(address x, address y, address z) private pure returns (address[3] memory) {
        return [x, y, z];
    }

    function _assertSigners(address[3] memory expected, uint256 n) private view {
        address[] memory got = pm.signers();
        vm.assertEq(got.length, n, "number of signers");
        for (uint256 i = 0; i < n; i++) vm.assertEq(got[i], expected[i], "signer in place");
    }

    function test_onlyOwnerManagesSigners() public {
        address stranger = address(0x5157);
        vm.prank(stranger);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, stranger));
        pm.addSigner(stranger);
        vm.prank(stranger);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, stranger));
        pm.removeSigner(vm.addr(SIGNER_KEY));
        vm.prank(PM_OWNER);
        vm.expectRevert(SessionPaymaster.InvalidSigner.selector);
        pm.addSigner(address(0));
        vm.assertEq(pm.owner(), PM_OWNER, "owner is the constructor argument, not the deployer");
    }

    // ---------------------------------------------------------------- ownership

    function test_zeroOwner_refused() public {
        address[] memory signers = new address[](1);
        signers[0] = vm.addr(SIGNER_KEY);
        vm.expectRevert(SessionPaymaster.InvalidOwner.selector);
        new SessionPaymaster(ep, address(0), signers);
    }

    function test_renounceOwnership_disabled() public {
        vm.prank(PM_OWNER);
        vm.expectRevert(SessionPaymaster.RenounceDisabled.selector);
        pm.renounceOwnership();
        vm.assertEq(pm.owner(), PM_OWNER, "still owned");
    }

    function test_ownershipMovesInTwoSteps() public {
        address next = address(0x4E57);
        address stranger = address(0x5157);
        vm.prank(stranger);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, stranger));
        pm.transferOwnership(stranger);
        vm.prank(PM_OWNER);
        pm.transferOwnership(next);
        vm.assertEq(pm.owner(), PM_OWNER, "unchanged until accepted");
        vm.assertEq(pm.pendingOwner(), next, "pending");
        vm.prank(stranger);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, stranger));
        pm.acceptOwnership();
        vm.prank(next);
        pm.acceptOwnership();
        vm.assertEq(pm.owner(), next, "accepted");
        vm.assertEq(pm.pendingOwner(), address(0), "nothing pending once accepted");
        vm.prank(PM_OWNER);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, PM_OWNER));
        pm.addSigner(address(0x1234));
    }

    // ---------------------------------------------------------------- deposit and stake

    function test_depositAndWithdraw() public {
        uint256 before = pm.getDeposit();
        pm.deposit{value: 1 ether}();
        vm.assertEq(pm.getDeposit(), before + 1 ether, "deposit credited");

        address payable to = payable(address(0x7E57));
        vm.prank(PM_OWNER);
        pm.withdrawTo(to, 0.5 ether);
        vm.assertEq(to.balance, 0.5 ether, "withdrawn to recipient");
        vm.assertEq(pm.getDeposit(), before + 0.5 ether, "deposit debited");

        vm.prank(to);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, to));
        pm.withdrawTo(to, 0.1 ether);
    }

    function test_onlyOwnerStakesAndWithdrawsStake() public {
        address stranger = address(0x5157);
        vm.deal(stranger, 2 ether);
        vm.deal(PM_OWNER, 2 ether);
        vm.prank(stranger);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, stranger));
        pm.addStake{value: 1 ether}(86_400);
        vm.prank(PM_OWNER);
        pm.addStake{value: 1 ether}(86_400);
        vm.assertEq(ep.getDepositInfo(address(pm)).stake, 1 ether, "staked by the owner");
        vm.prank(stranger);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, stranger));
        pm.unlockStake();
        vm.prank(PM_OWNER);
        pm.unlockStake();
        vm.warp(block.timestamp + 86_401);
        address payable to = payable(address(0x7E57));
        vm.prank(stranger);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, stranger));
        pm.withdrawStake(to);
        vm.prank(PM_OWNER);
        pm.withdrawStake(to);
        vm.assertEq(to.balance, 1 ether, "stake withdrawn by the owner to the recipient");
    }

    // ---------------------------------------------------------------- gas

    /// validatePaymasterUserOp gas, cold storage, for callData of 0 B .. 16 KiB (hashing it is
    /// the only part that grows). The service's default paymasterVerificationGasLimit must cover
    /// the largest with margin; `forge test -vv --match-test Gas` prints the measurements.
    function test_validationGas_fitsServiceDefault() public {
        uint256[4] memory sizes = [uint256(16384), 4096, 1024, 0]; // largest first: measured cold
        for (uint256 i = 0; i < sizes.length; i++) {
            PackedUserOperation memory op = _op();
            op.callData = new bytes(sizes[i]);
            _sponsor(op);
            vm.prank(address(ep));
            uint256 start = gasleft();
            pm.validatePaymasterUserOp(op, bytes32(0), 1 ether);
            uint256 used = start - gasleft();
            emit ValidationGas(sizes[i], used);
            vm.assertLt(used, PM_VERIFICATION_GAS, "validation gas under the service default");
        }
    }

    event ValidationGas(uint256 callDataBytes, uint256 gasUsed);
    event ValidationGasThroughHandleOps(uint256 callDataBytes, uint256 smallestLimit);

    /// The same, as the EntryPoint counts it: the smallest paymasterVerificationGasLimit with
    /// which handleOps takes an op of 16 KiB callData (below it: AA33 out of gas, or AA36 over
    /// the limit: the EntryPoint counts the paymaster's whole validation step), found by
    /// bisection with the paymaster, the EntryPoint and the account cold again before each try.
    /// The service's default must exceed it by a fifth.
    function test_validationGas_throughHandleOps_fitsServiceDefault() public {
        PackedUserOperation memory first = _op(); // deploys the account
        _sponsor(first);
        _signAccount(first);
        _handle(first);
        uint256 key = 1;
        vm.assertTrue(_handleOpsTakes(PM_VERIFICATION_GAS, key++), "the default is enough");
        uint256 lo = 1_000;
        uint256 hi = PM_VERIFICATION_GAS;
        vm.assertFalse(_handleOpsTakes(lo, key++), "a tiny limit is refused");
        while (hi - lo > 50) {
            uint256 mid = (lo + hi) / 2;
            if (_handleOpsTakes(mid, key++)) hi = mid;
            else lo = mid;
        }
        emit ValidationGasThroughHandleOps(16384, hi);
        vm.assertLt(hi * 6 / 5, PM_VERIFICATION_GAS, "the default is 20 % above what handleOps needs");
    }

    /// Whether handleOps takes a sponsored 16 KiB-callData op (nonce key `key`, the account
    /// deployed) with paymasterVerificationGasLimit `limit`.
    function _handleOpsTakes(uint256 limit, uint256 key) internal returns (bool) {
        PackedUserOperation memory op = _op();
        op.initCode = "";
        op.nonce = key << 64;
        op.callData = abi.encodePacked(op.callData, new bytes(16384)); // ignored by execute()
        op.paymasterAndData = _pmData(uint128(limit), 0, 0, 0, new bytes(65));
        _sponsor(op);
        _signAccount(op);
        PackedUserOperation[] memory ops = new PackedUserOperation[](1);
        ops[0] = op;
        vm.cool(address(pm));
        vm.cool(address(ep));
        vm.cool(op.sender);
        vm.prank(BUNDLER, BUNDLER);
        (bool ok,) = address(ep).call(abi.encodeCall(IEntryPoint.handleOps, (ops, BUNDLER)));
        return ok;
    }

    receive() external payable {}
}
