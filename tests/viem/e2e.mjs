// Real clients against the service: permissionless' SimpleAccount (EntryPoint v0.7, v0.8) and
// viem's EIP-7702 Simple7702Account (v0.8, v0.9), viem's ERC-7677 paymaster client
// (pm_getPaymasterStubData, then pm_getPaymasterData) and the Alto bundler
// (eth_estimateUserOperationGas, eth_sendUserOperation), on anvil.
// Input: the JSON line of scripts/dev in STACK, the bundler URL in BUNDLER_URL.
import assert from 'node:assert/strict';
import { createPublicClient, http, parseAbi, parseGwei, getAddress } from 'viem';
import { foundry } from 'viem/chains';
import { createBundlerClient, createPaymasterClient, entryPoint09Abi, formatUserOperationRequest, toSimple7702SmartAccount } from 'viem/account-abstraction';
import { generatePrivateKey, privateKeyToAccount } from 'viem/accounts';
import { toSimpleSmartAccount } from 'permissionless/accounts';

const stack = JSON.parse(process.env.STACK);
// permissionless 0.4.1's SimpleAccount knows EntryPoint 0.6-0.8 only: v0.9 runs below as an
// EIP-7702 account (viem's own toSimple7702SmartAccount). Alto 0.0.20 takes the local v0.9 (the
// npm 0.9.0-rc.1 build) as v0.9 because its address starts 0x433709 (src/userop/v0_9.rs).
const entryPoints = stack.entryPoints.filter((ep) => ep.version !== '0.9');
assert.equal(entryPoints.length, 2, 'v0.7 and v0.8 in the stack');
assert.ok(stack.entryPoints.some((ep) => ep.version === '0.9'), 'v0.9 in the stack');
const counterAbi = parseAbi(['function increment()', 'function reset()', 'function count(address) view returns (uint256)']);
const client = createPublicClient({ chain: foundry, transport: http(stack.rpcUrl) });
const paymaster = createPaymasterClient({ transport: http(stack.paymasterUrl) });

let passed = 0;
let failed = 0;
async function test(name, fn) {
  try {
    await fn();
    passed++;
    console.log(`ok   ${name}`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}\n${e?.stack ?? e}`);
  }
}

async function user(ep) {
  const owner = privateKeyToAccount(generatePrivateKey());
  const account = await toSimpleSmartAccount({ client, owner, entryPoint: { address: getAddress(ep.entryPoint), version: ep.version } });
  const bundler = createBundlerClient({ account, client, paymaster, transport: http(process.env.BUNDLER_URL) });
  return { account, bundler };
}

for (const ep of entryPoints) {
  await test(`v${ep.version}: sponsored counterfactual SimpleAccount op lands through Alto`, async () => {
    const { account, bundler } = await user(ep);
    const hash = await bundler.sendUserOperation({ calls: [{ to: stack.counter, abi: counterAbi, functionName: 'increment' }] });
    const receipt = await bundler.waitForUserOperationReceipt({ hash, timeout: 60_000 });
    assert.equal(receipt.success, true);
    assert.equal(getAddress(receipt.paymaster), getAddress(ep.paymaster));
    assert.equal(getAddress(receipt.sender), getAddress(account.address));
    const count = await client.readContract({ address: stack.counter, abi: counterAbi, functionName: 'count', args: [account.address] });
    assert.equal(count, 1n);

    // A second op from the deployed account (no factory).
    const hash2 = await bundler.sendUserOperation({ calls: [{ to: stack.counter, abi: counterAbi, functionName: 'increment' }] });
    assert.equal((await bundler.waitForUserOperationReceipt({ hash: hash2, timeout: 60_000 })).success, true);
  });

  await test(`v${ep.version}: a call outside the policy is refused by the paymaster`, async () => {
    const { bundler } = await user(ep);
    await assert.rejects(
      bundler.sendUserOperation({ calls: [{ to: stack.counter, abi: counterAbi, functionName: 'reset' }] }),
      (e) => {
        const text = `${e?.message} ${JSON.stringify(e?.walk?.((x) => x?.data) ?? {})}`;
        assert.match(text, /function_not_allowed/);
        return true;
      },
    );
  });
}

// pm_sponsorUserOperation without gas limits: the service estimates them through the bundler
// (SP_BUNDLER_URL, set by ./run) with its stub data, then signs; the op lands as returned.
for (const ep of entryPoints) {
  await test(`v${ep.version}: pm_sponsorUserOperation estimates missing gas through the bundler`, async () => {
    const { account, bundler } = await user(ep);
    const factory = await account.getFactoryArgs();
    const fees = await client.estimateFeesPerGas();
    const hex = (n) => `0x${BigInt(n).toString(16)}`;
    const op = {
      sender: account.address,
      nonce: hex(await account.getNonce()),
      factory: factory.factory,
      factoryData: factory.factoryData,
      callData: await account.encodeCalls([{ to: stack.counter, data: '0xd09de08a' }]),
      maxFeePerGas: hex(fees.maxFeePerGas),
      maxPriorityFeePerGas: hex(fees.maxPriorityFeePerGas),
      signature: await account.getStubSignature(),
    };
    const res = await fetch(stack.paymasterUrl, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'pm_sponsorUserOperation', params: [op, ep.entryPoint] }),
    }).then((r) => r.json());
    assert.ok(res.result, JSON.stringify(res));
    const sponsored = { ...op, ...res.result };
    assert.ok(BigInt(sponsored.callGasLimit) > 0n && BigInt(sponsored.verificationGasLimit) > 0n);
    // viem signs the unpacked form with bigint quantities.
    const quantities = ['nonce', 'callGasLimit', 'verificationGasLimit', 'preVerificationGas', 'maxFeePerGas',
      'maxPriorityFeePerGas', 'paymasterVerificationGasLimit', 'paymasterPostOpGasLimit'];
    const unpacked = { ...sponsored };
    for (const k of quantities) unpacked[k] = BigInt(sponsored[k]);
    unpacked.signature = await account.signUserOperation(unpacked);
    const final = { ...sponsored, signature: unpacked.signature };
    const hash = await bundler.request({ method: 'eth_sendUserOperation', params: [final, ep.entryPoint] });
    const receipt = await bundler.waitForUserOperationReceipt({ hash, timeout: 60_000 });
    assert.equal(receipt.success, true);
    assert.equal(getAddress(receipt.paymaster), getAddress(ep.paymaster));
  });
}

// EIP-7702: a fresh EOA delegated to the version's Simple7702Account by the authorization it signs,
// sent with the op (viem puts it in eip7702Auth; Alto in its type-4 transaction). The service
// hashes it with that delegate and checks the policy's `delegates`; it lands sponsored, and
// the EOA's code is the delegation afterwards.
const with7702 = stack.entryPoints.filter((e) => e.simple7702Account);
assert.deepEqual(with7702.map((e) => e.version), ['0.8', '0.9'], 'Simple7702Account for v0.8 and v0.9');
for (const ep of with7702) {
  await test(`v${ep.version}: EIP-7702 account (toSimple7702SmartAccount) lands through Alto`, async () => {
    const owner = privateKeyToAccount(generatePrivateKey());
    const entryPoint = ep.version === '0.9'
      ? { address: getAddress(ep.entryPoint), version: '0.9', abi: entryPoint09Abi }
      : undefined;
    const account = await toSimple7702SmartAccount({ client, owner, entryPoint, implementation: getAddress(ep.simple7702Account) });
    const bundler = createBundlerClient({ account, client, paymaster, transport: http(process.env.BUNDLER_URL) });
    const authorization = await owner.signAuthorization({
      address: getAddress(ep.simple7702Account),
      chainId: foundry.id,
      nonce: await client.getTransactionCount({ address: owner.address }),
    });
    const hash = await bundler.sendUserOperation({
      calls: [{ to: stack.counter, abi: counterAbi, functionName: 'increment' }],
      authorization,
    });
    const receipt = await bundler.waitForUserOperationReceipt({ hash, timeout: 60_000 });
    assert.equal(receipt.success, true);
    assert.equal(getAddress(receipt.paymaster), getAddress(ep.paymaster));
    assert.equal(await client.readContract({ address: stack.counter, abi: counterAbi, functionName: 'count', args: [owner.address] }), 1n);
    const code = await client.getCode({ address: owner.address });
    assert.equal(code?.toLowerCase(), `0xef0100${ep.simple7702Account.slice(2).toLowerCase()}`);
  });
}

// v0.9, the account signs before the paymaster: with context paymasterSignature "suffix" the
// service answers the window as paymasterData and its signature as paymasterSignature, which
// the userOpHash leaves out. The wallet estimates with the stub, then signs and asks for the
// final data at the same time; the final data keeps the stub's window, so the account's
// signature stays valid, and Alto packs the signature after it (viem's toPackedUserOperation).
async function service(method, params) {
  const res = await fetch(stack.paymasterUrl, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ jsonrpc: '2.0', id: 1, method, params }),
  });
  const body = await res.json();
  if (body.error) throw new Error(`${method}: ${JSON.stringify(body.error)}`);
  return body.result;
}
for (const ep of stack.entryPoints.filter((e) => e.version === '0.9')) {
  await test('v0.9: the account signs in parallel with the paymaster (signature suffix) through Alto', async () => {
    const owner = privateKeyToAccount(generatePrivateKey());
    const entryPoint = { address: getAddress(ep.entryPoint), version: '0.9', abi: entryPoint09Abi };
    const account = await toSimple7702SmartAccount({ client, owner, entryPoint, implementation: getAddress(ep.simple7702Account) });
    const bundler = createBundlerClient({ account, client, transport: http(process.env.BUNDLER_URL) });
    const authorization = await owner.signAuthorization({
      address: getAddress(ep.simple7702Account),
      chainId: foundry.id,
      nonce: await client.getTransactionCount({ address: owner.address }),
    });
    const context = { paymasterSignature: 'suffix' };
    const ask = (method) => async (p) => {
      const { chainId, entryPointAddress, context: _, ...op } = p;
      const r = await service(method, [formatUserOperationRequest(op), entryPointAddress, `0x${chainId.toString(16)}`, context]);
      assert.equal(r.paymasterData.length, 2 + 2 * 12, 'the window alone');
      return { ...r, paymasterVerificationGasLimit: BigInt(r.paymasterVerificationGasLimit), paymasterPostOpGasLimit: BigInt(r.paymasterPostOpGasLimit) };
    };
    // Estimated with the stub (its window and a stub signature in the suffix).
    const fees = await client.estimateFeesPerGas();
    const prepared = await bundler.prepareUserOperation({
      calls: [{ to: stack.counter, abi: counterAbi, functionName: 'increment' }],
      authorization,
      // Within dev-counter's caps (100 gwei tip), whatever the node suggests after the runs above.
      maxFeePerGas: fees.maxFeePerGas + parseGwei('1'),
      maxPriorityFeePerGas: parseGwei('1'),
      paymaster: { getPaymasterStubData: ask('pm_getPaymasterStubData'), getPaymasterData: ask('pm_getPaymasterStubData') },
    });
    // In parallel: the account's signature and the paymaster's.
    const [signature, final] = await Promise.all([
      account.signUserOperation(prepared),
      ask('pm_getPaymasterData')({ ...prepared, chainId: foundry.id, entryPointAddress: entryPoint.address }),
    ]);
    assert.equal(final.paymasterData, prepared.paymasterData, 'the stub window is kept');
    assert.notEqual(final.paymasterSignature, prepared.paymasterSignature);
    const op = { ...prepared, paymasterSignature: final.paymasterSignature, signature };
    const hash = await bundler.request({ method: 'eth_sendUserOperation', params: [formatUserOperationRequest(op), entryPoint.address] });
    const receipt = await bundler.waitForUserOperationReceipt({ hash, timeout: 60_000 });
    assert.equal(receipt.success, true);
    assert.equal(getAddress(receipt.paymaster), getAddress(ep.paymaster));
    assert.equal(await client.readContract({ address: stack.counter, abi: counterAbi, functionName: 'count', args: [owner.address] }), 1n);
  });
}

console.log(`viem: ${passed} passed, ${failed} failed`);
process.exit(failed === 0 && passed > 0 ? 0 : 1);
