// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

import "entrypoint/core/BasePaymaster.sol";
import "../eip7702/DelegateBoundHash.sol";
import "entrypoint/core/UserOperationLib.sol";

/// @dev EntryPoint v0.9's BasePaymaster is Ownable2Step already (through Stakeable) and takes an
///      initial owner; SessionPaymaster's constructor sets the real owner right after, so the
///      deployer (a CREATE2 proxy, for deterministic deployments) never keeps it.
abstract contract TwoStepBasePaymaster is BasePaymaster, DelegateBoundHash {
    constructor(IEntryPoint _entryPoint) BasePaymaster(_entryPoint, msg.sender) {}

    /// @dev See `base/v07`: v0.9 reads a paymaster-signature suffix.
    bool internal constant PAYMASTER_SIGNATURE_SUFFIX = true;

    /// @dev v0.9 lets paymasterAndData end with `paymasterSignature ‖ uint16 length ‖
    ///      PAYMASTER_SIG_MAGIC`, outside the userOpHash (UserOperationLib.getPaymasterSignature),
    ///      so the account can sign before the paymaster. Returns the part before that suffix
    ///      and the signature in it (empty without a suffix).
    function _splitPaymasterSignature(bytes calldata paymasterAndData)
        internal
        pure
        returns (bytes calldata signedPart, bytes calldata paymasterSignature)
    {
        uint256 length = UserOperationLib.getPaymasterSignatureLength(paymasterAndData);
        if (length == 0) return (paymasterAndData, paymasterAndData[0:0]);
        uint256 end = paymasterAndData.length - UserOperationLib.PAYMASTER_SUFFIX_LEN;
        return (paymasterAndData[:end - length], paymasterAndData[end - length:end]);
    }
}
