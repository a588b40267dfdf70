// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

import "entrypoint/core/Eip7702Support.sol";
import "entrypoint/core/UserOperationLib.sol";

/// @dev getHash for EntryPoint v0.8 and later (`base/v08`, `base/v09`; v0.7's is in `base/v07`).
abstract contract DelegateBoundHash {
    /**
     * @notice The hash the service signs (EIP-191 prefixed) for `userOp` and a validity window.
     * Same construction as eth-infinitism's VerifyingPaymaster; it covers every op field except
     * the paymaster data itself (which carries the signature) and binds chain and paymaster.
     * An EIP-7702 account (initCode = the 0x7702 marker) is hashed with `keccak256(delegate)` in
     * place of `keccak256(initCode)`, read from the sender's code as the EntryPoint's userOpHash
     * reads it (Eip7702Support; a marker on an undelegated sender reverts, as getUserOpHash
     * does): a signature made for one delegate fails once the account runs another's code, so
     * what the service checked is what runs, and the userOpHash is one the service computed.
     * Reading the sender's code is allowed in validation (ERC-7562: it is the sender's).
     */
    function getHash(PackedUserOperation calldata userOp, uint48 validUntil, uint48 validAfter)
        public
        view
        returns (bytes32)
    {
        bytes32 initCodeHash = Eip7702Support._getEip7702InitCodeHashOverride(userOp);
        if (initCodeHash == 0) initCodeHash = keccak256(userOp.initCode);
        return keccak256(
            abi.encode(
                userOp.sender,
                userOp.nonce,
                initCodeHash,
                keccak256(userOp.callData),
                userOp.accountGasLimits,
                uint256(
                    bytes32(
                        userOp.paymasterAndData[
                            UserOperationLib.PAYMASTER_VALIDATION_GAS_OFFSET:UserOperationLib.PAYMASTER_DATA_OFFSET
                        ]
                    )
                ),
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
