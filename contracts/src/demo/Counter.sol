// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

/// @notice Demo target for the local stack (scripts/dev) and the end-to-end tests: a contract a
///         session key might be allowed to call. Deployed through the CREATE2 deployer with salt
///         0, so its address is fixed and `policies/dev-counter.toml` can name it.
contract Counter {
    /// @notice Increments made by each caller.
    mapping(address => uint256) public count;

    /// @notice `by` incremented its counter to `count`.
    event Incremented(address indexed by, uint256 count);

    /// @notice Count one more for the caller.
    function increment() external {
        uint256 c = count[msg.sender] + 1;
        count[msg.sender] = c;
        emit Incremented(msg.sender, c);
    }
}
