// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

import "entrypoint/core/BasePaymaster.sol";
import "../eip7702/DelegateBoundHash.sol";

/// @dev EntryPoint v0.8's BasePaymaster is Ownable2Step already (see `base/v07`).
abstract contract TwoStepBasePaymaster is BasePaymaster, DelegateBoundHash {
    constructor(IEntryPoint _entryPoint) BasePaymaster(_entryPoint) {}

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
}
