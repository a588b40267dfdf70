// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

/// @dev The subset of Foundry's cheatcodes these tests use. forge-std is not installable from npm
///      (DESIGN §7), so the tests talk to the cheatcode contract directly.
interface Vm {
    struct Log {
        bytes32[] topics;
        bytes data;
        address emitter;
    }

    function addr(uint256 privateKey) external pure returns (address);
    function sign(uint256 privateKey, bytes32 digest) external pure returns (uint8 v, bytes32 r, bytes32 s);
    function prank(address msgSender) external;
    function prank(address msgSender, address txOrigin) external;
    function deal(address account, uint256 newBalance) external;
    function warp(uint256 newTimestamp) external;
    function chainId(uint256 newChainId) external;
    function cool(address target) external;
    function expectRevert(bytes calldata revertData) external;
    function expectRevert() external;
    function expectRevert(bytes4 revertData) external;
    function getCode(string calldata artifactPath) external view returns (bytes memory);
    function envOr(string calldata name, string calldata defaultValue) external view returns (string memory);
    function recordLogs() external;
    function getRecordedLogs() external returns (Log[] memory);
    function startBroadcast() external;
    function stopBroadcast() external;
    function envAddress(string calldata name) external view returns (address);
    function envOr(string calldata name, uint256 defaultValue) external view returns (uint256);
    function assertEq(uint256 left, uint256 right, string calldata error) external pure;
    function assertEq(address left, address right, string calldata error) external pure;
    function assertEq(bytes32 left, bytes32 right, string calldata error) external pure;
    function assertTrue(bool condition, string calldata error) external pure;
    function assertFalse(bool condition, string calldata error) external pure;
    function assertLt(uint256 left, uint256 right, string calldata error) external pure;
    function skip(bool skipTest) external;
    function etch(address target, bytes calldata newRuntimeBytecode) external;
}

abstract contract TestBase {
    Vm internal constant vm = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));

    /// @dev The EntryPoint minor version this run builds against (7, 8 or 9): the `v08` and `v09`
    ///      Foundry profiles remap `entrypoint/` to the 0.8.0 and 0.9.0-rc.1 contracts packages,
    ///      the default profile to 0.7.0.
    function entryPointVersion() internal view returns (uint256) {
        bytes32 profile = keccak256(bytes(vm.envOr("FOUNDRY_PROFILE", string("default"))));
        if (profile == keccak256("default")) return 7;
        if (profile == keccak256("v08")) return 8;
        if (profile == keccak256("v09")) return 9;
        revert("unknown FOUNDRY_PROFILE: add the EntryPoint version it builds against");
    }

    function artifact(string memory name) internal view returns (bytes memory) {
        string memory package = ["aa07", "aa08", "aa09"][entryPointVersion() - 7];
        return vm.getCode(string.concat("node_modules/", package, "/artifacts/", name, ".json"));
    }

    function deploy(bytes memory initCode) internal returns (address deployed) {
        assembly {
            deployed := create(0, add(initCode, 0x20), mload(initCode))
        }
        vm.assertTrue(deployed != address(0), "deployment failed");
    }
}
