// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

import "@openzeppelin/contracts/access/Ownable2Step.sol";
import "entrypoint/core/BasePaymaster.sol";

/// @dev EntryPoint v0.7's BasePaymaster is Ownable; this adds the two-step transfer that v0.8's
///      has already (`base/v08`). foundry.toml remaps `paymaster-base/` per profile, as it
///      remaps `entrypoint/`, so SessionPaymaster is one source for both.
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
}
