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
}

abstract contract TestBase {
    Vm internal constant vm = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));

    /// @dev The EntryPoint version this run builds against: the v08 Foundry profile remaps
    ///      `entrypoint/` to the 0.8.0 contracts package, the default profile to 0.7.0.
    function isV08() internal view returns (bool) {
        return keccak256(bytes(vm.envOr("FOUNDRY_PROFILE", string("default")))) == keccak256("v08");
    }

    function artifact(string memory name) internal view returns (bytes memory) {
        string memory dir = isV08() ? "node_modules/aa08/artifacts/" : "node_modules/aa07/artifacts/";
        return vm.getCode(string.concat(dir, name, ".json"));
    }

    function deploy(bytes memory initCode) internal returns (address deployed) {
        assembly {
            deployed := create(0, add(initCode, 0x20), mload(initCode))
        }
        vm.assertTrue(deployed != address(0), "deployment failed");
    }
}
