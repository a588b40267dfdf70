// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

import "entrypoint/core/BasePaymaster.sol";

/// @dev EntryPoint v0.8's BasePaymaster is Ownable2Step already (see `base/v07`).
abstract contract TwoStepBasePaymaster is BasePaymaster {
    constructor(IEntryPoint _entryPoint) BasePaymaster(_entryPoint) {}
}
