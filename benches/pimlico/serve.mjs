// @pimlico/mock-paymaster for scripts/bench http's comparison: its JSON-RPC handler (the one its
// prool instance serves) on fastify, over an anvil where its SingletonPaymasterV7 is deployed.
//
//   node benches/pimlico/serve.mjs <anvil RPC URL> <port>
//
// Prints `ready <paymaster address>` once it listens. Only what `pm_getPaymasterData` needs is
// set up: the paymaster's contract, whose `getHash` the handler calls on every request. The
// package's own setup also deposits into EntryPoint v0.6 to v0.8, which this anvil does not
// have; its pm_sponsorUserOperation estimates through a bundler (Alto), which the bench does
// not run.
import cors from "@fastify/cors"
import Fastify from "fastify"
import { http, createPublicClient, createWalletClient, concat } from "viem"
import { privateKeyToAccount } from "viem/accounts"
// Not in the package's exports: imported by path.
import {
    constants,
    getSingletonPaymaster07Address,
    getSingletonPaymaster07InitCode
} from "./node_modules/@pimlico/mock-paymaster/_esm/constants.js"
import { createRpcHandler } from "./node_modules/@pimlico/mock-paymaster/_esm/relay.js"
import { getChain } from "./node_modules/@pimlico/mock-paymaster/_esm/helpers/utils.js"

const [anvilRpc, port] = process.argv.slice(2)
if (!anvilRpc || !port) {
    console.error("usage: serve.mjs <anvil RPC URL> <port>")
    process.exit(2)
}
const chain = await getChain(anvilRpc)
// Its signer, as the package's index.js has it.
const paymasterSigner = createWalletClient({
    chain,
    account: privateKeyToAccount(`0x${"bb".repeat(32)}`),
    transport: http(anvilRpc)
})
// anvil's first dev account deploys it through the deterministic deployer.
const deployer = createWalletClient({
    chain,
    account: privateKeyToAccount(
        "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
    ),
    transport: http(anvilRpc)
})
const publicClient = createPublicClient({ chain, transport: http(anvilRpc) })
const paymaster = getSingletonPaymaster07Address(paymasterSigner.account.address)
if (!(await publicClient.getCode({ address: paymaster }))) {
    const hash = await deployer.sendTransaction({
        to: constants.deterministicDeployer,
        data: concat([
            constants.create2Salt,
            getSingletonPaymaster07InitCode(paymasterSigner.account.address)
        ])
    })
    const receipt = await publicClient.waitForTransactionReceipt({ hash })
    if (receipt.status !== "success" || !(await publicClient.getCode({ address: paymaster }))) {
        console.error(`deploying SingletonPaymasterV7 failed: ${hash}`)
        process.exit(1)
    }
}

const app = Fastify({})
await app.register(cors, { origin: "*", methods: ["POST", "GET", "OPTIONS"] })
// The bundler is never reached by pm_getPaymasterData.
app.post("/", {}, createRpcHandler({ altoRpc: "http://127.0.0.1:9", anvilRpc, paymasterSigner }))
await app.listen({ host: "127.0.0.1", port: Number(port) })
console.log(`ready ${paymaster}`)
