// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

import "../src/SessionPaymaster.sol";
import "../test/TestBase.sol";

/**
 * Deterministic deployment of SessionPaymaster (CREATE2 through the deployer at
 * 0x4e59b44847b379578588920cA78FbF26c0B4956C, salt 0): the same EntryPoint, owner and signer
 * give the same address on every chain, and the same address as `session-paymaster deploy-dev`.
 *
 * Build profile = EntryPoint version (the constructor refuses a mismatched EntryPoint):
 *   ENTRY_POINT=0x0000000071727De22E5E9d8BAf0edAc6f37da032 PAYMASTER_OWNER=0x… PAYMASTER_SIGNER=0x… \
 *   [PAYMASTER_DEPOSIT_WEI=…] forge script script/Deploy.s.sol --rpc-url $RPC --broadcast --ledger
 *   FOUNDRY_PROFILE=v08 ENTRY_POINT=0x4337084D9E255Ff0702461CF8895CE9E3b5Ff108 … (for v0.8)
 *   FOUNDRY_PROFILE=v09 ENTRY_POINT=<the chain's v0.9 EntryPoint> … (for v0.9; docs/operations.md)
 *
 * Then stake it (`addStake`, owner only): validation reads the signer set, which ERC-7562
 * allows only for staked paymasters (docs/operations.md).
 */
contract Deploy is TestBase {
    function run() external returns (SessionPaymaster pm) {
        IEntryPoint entryPoint = IEntryPoint(vm.envAddress("ENTRY_POINT"));
        address[] memory signers = new address[](1);
        signers[0] = vm.envAddress("PAYMASTER_SIGNER");
        uint256 deposit = vm.envOr("PAYMASTER_DEPOSIT_WEI", uint256(0));

        vm.startBroadcast();
        pm = new SessionPaymaster{salt: bytes32(0)}(entryPoint, vm.envAddress("PAYMASTER_OWNER"), signers);
        if (deposit > 0) pm.deposit{value: deposit}();
        vm.stopBroadcast();
    }
}
