// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

import "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";
import "paymaster-base/TwoStepBasePaymaster.sol";
import "entrypoint/core/Helpers.sol";
import "entrypoint/core/UserOperationLib.sol";

/**
 * @title SessionPaymaster
 * @notice Verifying paymaster for session-paymaster: pays for a user operation when one of its
 *         signers (the off-chain service) signed it for a validity window.
 *
 * The same source builds against EntryPoint v0.7, v0.8 and v0.9: `entrypoint/` and
 * `paymaster-base/` are remapped per Foundry profile (see foundry.toml).
 *
 * paymasterAndData layout (129 bytes, DESIGN §3):
 *   [0:20]   paymaster address
 *   [20:36]  paymasterVerificationGasLimit (uint128)
 *   [36:52]  paymasterPostOpGasLimit       (uint128)
 *   [52:58]  validUntil (uint48)
 *   [58:64]  validAfter (uint48)
 *   [64:129] signature (r, s, v) over toEthSignedMessageHash(getHash(op, validUntil, validAfter))
 * On v0.9 the signature may instead come in the paymaster-signature suffix, outside the
 * userOpHash, so that the account can sign first (139 bytes):
 *   [0:64]    as above
 *   [64:129]  signature
 *   [129:131] uint16 65
 *   [131:139] PAYMASTER_SIG_MAGIC
 * getHash covers neither the signature nor the window bytes (the window is its argument), so
 * both layouts sign the same hash.
 *
 * The hash the service signs is `getHash(userOp, validUntil, validAfter)`, from `paymaster-base/`:
 * the same fields in every build, with an EIP-7702 account's delegate in place of its initCode
 * from v0.8 on (`base/eip7702/DelegateBoundHash.sol`).
 *
 * ERC-7562: validation reads `isSigner`, a storage slot of this contract that is not associated
 * with the sender. Bundlers accept that only from a staked paymaster, so production deployments
 * must `addStake` (see docs/operations.md).
 *
 * Ownership (signers, stake, deposit) moves in two steps (`transferOwnership`, then
 * `acceptOwnership` by the new owner) and can never be renounced: a paymaster without an owner
 * could neither rotate a leaked signer out nor get its deposit and stake back.
 */
contract SessionPaymaster is TwoStepBasePaymaster {

    uint256 private constant VALID_UNTIL_OFFSET = PAYMASTER_DATA_OFFSET; // 52
    uint256 private constant VALID_AFTER_OFFSET = VALID_UNTIL_OFFSET + 6; // 58
    uint256 private constant SIGNATURE_OFFSET = VALID_AFTER_OFFSET + 6; // 64
    uint256 private constant SIGNATURE_LENGTH = 65;
    /// @notice Exact length of a well-formed paymasterAndData for this paymaster.
    uint256 public constant PAYMASTER_AND_DATA_LENGTH = SIGNATURE_OFFSET + SIGNATURE_LENGTH; // 129

    /// @notice Addresses whose signatures this paymaster honours (what validation reads).
    mapping(address => bool) public isSigner;
    /// @dev The same set as a list, for `signers()`; position + 1 of each in it.
    address[] private _signerList;
    mapping(address => uint256) private _signerPosition;

    /// @notice A signer was authorised.
    event SignerAdded(address indexed signer);
    /// @notice A signer was de-authorised.
    event SignerRemoved(address indexed signer);

    /// @notice paymasterAndData is not exactly PAYMASTER_AND_DATA_LENGTH bytes long.
    error InvalidPaymasterDataLength(uint256 length);
    /// @notice The zero address can never be a signer (ecrecover failures yield it).
    error InvalidSigner();
    /// @notice The zero address can never own the paymaster.
    error InvalidOwner();
    /// @notice Ownership cannot be renounced (see the contract's notes).
    error RenounceDisabled();

    /**
     * @param _entryPoint the EntryPoint this paymaster serves.
     * @param _owner      manages signers, stake and deposit. Explicit (not msg.sender) so that a
     *                    deterministic CREATE2 deployment does not leave the deployer proxy as owner.
     * @param _signers    initial signer set.
     */
    constructor(IEntryPoint _entryPoint, address _owner, address[] memory _signers) TwoStepBasePaymaster(_entryPoint) {
        if (_owner == address(0)) revert InvalidOwner();
        _transferOwnership(_owner);
        for (uint256 i = 0; i < _signers.length; i++) {
            _addSigner(_signers[i]);
        }
    }

    /// @notice Always reverts: see the contract's notes on ownership.
    function renounceOwnership() public view override onlyOwner {
        revert RenounceDisabled();
    }

    /// @notice Authorise `signer` (owner only). Used to rotate keys without redeploying.
    function addSigner(address signer) external onlyOwner {
        _addSigner(signer);
    }

    /// @notice De-authorise `signer` (owner only). Signatures it made stop validating at once.
    function removeSigner(address signer) external onlyOwner {
        if (isSigner[signer]) {
            isSigner[signer] = false;
            uint256 position = _signerPosition[signer];
            address last = _signerList[_signerList.length - 1];
            _signerList[position - 1] = last;
            _signerPosition[last] = position;
            _signerList.pop();
            delete _signerPosition[signer];
            emit SignerRemoved(signer);
        }
    }

    /// @notice Every address whose signatures this paymaster honours, in no set order (an
    ///         operator checks that a rotated-out key is gone: `session-paymaster status`).
    function signers() external view returns (address[] memory) {
        return _signerList;
    }

    function _addSigner(address signer) internal {
        if (signer == address(0)) revert InvalidSigner();
        if (!isSigner[signer]) {
            isSigner[signer] = true;
            _signerList.push(signer);
            _signerPosition[signer] = _signerList.length;
            emit SignerAdded(signer);
        }
    }

    /// @notice Split paymasterAndData into its validity window and signature (inline, or on
    ///         v0.9 in the paymaster-signature suffix); reverts on any other length.
    function parsePaymasterAndData(bytes calldata paymasterAndData)
        public
        pure
        returns (uint48 validUntil, uint48 validAfter, bytes calldata signature)
    {
        // A constant per build (`paymaster-base/`): false before v0.9, where this branch is
        // compiled out and the v0.7/v0.8 bytecode stays what it was before v0.9 existed, so
        // `deploy` still finds paymasters deployed earlier at their predicted addresses.
        if (PAYMASTER_SIGNATURE_SUFFIX && paymasterAndData.length != PAYMASTER_AND_DATA_LENGTH) {
            return _parseWithSuffix(paymasterAndData);
        }
        if (paymasterAndData.length != PAYMASTER_AND_DATA_LENGTH) {
            revert InvalidPaymasterDataLength(paymasterAndData.length);
        }
        validUntil = uint48(bytes6(paymasterAndData[VALID_UNTIL_OFFSET:VALID_AFTER_OFFSET]));
        validAfter = uint48(bytes6(paymasterAndData[VALID_AFTER_OFFSET:SIGNATURE_OFFSET]));
        signature = paymasterAndData[SIGNATURE_OFFSET:];
    }

    /// @dev v0.9: `paymaster ‖ gas ‖ validUntil ‖ validAfter` signed by the account, then our
    ///      signature in the suffix (139 bytes in all); nothing else.
    function _parseWithSuffix(bytes calldata paymasterAndData)
        private
        pure
        returns (uint48 validUntil, uint48 validAfter, bytes calldata signature)
    {
        (bytes calldata signedPart, bytes calldata suffixSignature) = _splitPaymasterSignature(paymasterAndData);
        if (signedPart.length != SIGNATURE_OFFSET || suffixSignature.length != SIGNATURE_LENGTH) {
            revert InvalidPaymasterDataLength(paymasterAndData.length);
        }
        validUntil = uint48(bytes6(paymasterAndData[VALID_UNTIL_OFFSET:VALID_AFTER_OFFSET]));
        validAfter = uint48(bytes6(paymasterAndData[VALID_AFTER_OFFSET:SIGNATURE_OFFSET]));
        signature = suffixSignature;
    }

    /**
     * A bad signature never reverts: it returns SIG_VALIDATION_FAILED packed with the window, so
     * that gas estimation with the service's stub signature takes the same path (ERC-7677 stub
     * data) and bundlers can tell a signature failure from a malformed op.
     */
    function _validatePaymasterUserOp(PackedUserOperation calldata userOp, bytes32, uint256)
        internal
        view
        override
        returns (bytes memory context, uint256 validationData)
    {
        (uint48 validUntil, uint48 validAfter, bytes calldata signature) =
            parsePaymasterAndData(userOp.paymasterAndData);
        bytes32 hash = MessageHashUtils.toEthSignedMessageHash(getHash(userOp, validUntil, validAfter));
        (address recovered, ECDSA.RecoverError err,) = ECDSA.tryRecover(hash, signature);
        bool failed = err != ECDSA.RecoverError.NoError || !isSigner[recovered];
        return ("", _packValidationData(failed, validUntil, validAfter));
    }
}
