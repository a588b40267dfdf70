// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

import "@openzeppelin/contracts/access/Ownable2Step.sol";
import "entrypoint/core/BasePaymaster.sol";

/// @dev EntryPoint v0.7's BasePaymaster is Ownable; this adds the two-step transfer that v0.8's
///      has already (`base/v08`). foundry.toml remaps `paymaster-base/` per profile, as it
///      remaps `entrypoint/`, so SessionPaymaster is one source for every version. What differs
///      by version lives here: ownership, the signature suffix (v0.9) and getHash (EIP-7702
///      accounts from v0.8 on); this build is byte for byte the one deployed before either.
abstract contract TwoStepBasePaymaster is BasePaymaster, Ownable2Step {
    constructor(IEntryPoint _entryPoint) BasePaymaster(_entryPoint) {}

    function transferOwnership(address newOwner) public virtual override(Ownable, Ownable2Step) {
        Ownable2Step.transferOwnership(newOwner);
    }

    function _transferOwnership(address newOwner) internal virtual override(Ownable, Ownable2Step) {
        Ownable2Step._transferOwnership(newOwner);
    }

    /// @dev EntryPoints before v0.9 hash all of paymasterAndData into the userOpHash: there is no
    ///      paymaster-signature suffix (`base/v09`). With the constant false, SessionPaymaster's
    ///      suffix branch and this function are compiled out.
    bool internal constant PAYMASTER_SIGNATURE_SUFFIX = false;


    /// @dev Never called (see PAYMASTER_SIGNATURE_SUFFIX): the whole of it is the signed part.
    function _splitPaymasterSignature(bytes calldata paymasterAndData)
        internal
        pure
        returns (bytes calldata signedPart, bytes calldata paymasterSignature)
    {
        return (paymasterAndData, paymasterAndData[0:0]);
    }

    /**
     * @notice The hash the service signs (EIP-191 prefixed) for `userOp` and a validity window.
     * Same construction as eth-infinitism's VerifyingPaymaster; it covers every op field except
     * the paymaster data itself (which carries the signature) and binds chain and paymaster.
     */
    function getHash(PackedUserOperation calldata userOp, uint48 validUntil, uint48 validAfter)
        public
        view
        returns (bytes32)
    {
        return keccak256(
            abi.encode(
                userOp.sender,
                userOp.nonce,
                keccak256(userOp.initCode),
                keccak256(userOp.callData),
                userOp.accountGasLimits,
                uint256(bytes32(userOp.paymasterAndData[PAYMASTER_VALIDATION_GAS_OFFSET:PAYMASTER_DATA_OFFSET])),
                userOp.preVerificationGas,
                userOp.gasFees,
                block.chainid,
                address(this),
                validUntil,
                validAfter
            )
        );
    }
}
