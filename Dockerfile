# session-paymaster in a container: the release binary on slim Debian, run as a non-root user.
#
#   docker build -t session-paymaster .
#   docker run --rm -p 4337:4337 \
#     -v "$PWD/policies:/etc/session-paymaster/policies:ro" \
#     -v "$PWD/signer.key:/run/secrets/signer.key:ro" -e SP_SIGNER_KEY_FILE=/run/secrets/signer.key \
#     -e SP_API_KEYS=… -e SP_CHAIN_ID=8453 -e SP_PAYMASTER_V07=0x… \
#     -e SP_REDIS_URL=redis://redis:6379 -e SP_RPC_URL=https://… \
#     session-paymaster
#
# Configuration is `serve`'s SP_* environment (docs/operations.md), or a
# /etc/session-paymaster/session-paymaster.toml mounted into the working directory. The image
# holds no policies and no key: without mounted policies `serve` refuses to start. The key file
# must be readable by uid 10001 (or use SP_SIGNER_KEY_ENV and a secret-injected variable).
#
# The base images are build arguments, so a machine without a registry can build from local
# stand-ins (tests/container/run does); the defaults are the public images.
ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# The dependencies in a layer of their own, rebuilt only when Cargo.toml or Cargo.lock change:
# built once against stub sources, which the real sources then replace.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && echo '//! stub' > src/lib.rs \
 && for b in sponsor ledger http; do echo 'fn main() {}' > "benches/$b.rs"; done \
 && cargo build --release --locked --bin session-paymaster \
 && rm -rf src benches
COPY src src
COPY benches benches
# COPY keeps the files' times, which can be older than the stub build's: without the touch,
# cargo would take the stub binary as up to date.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin session-paymaster \
 && install -m 0755 target/release/session-paymaster /usr/local/bin/session-paymaster \
 && /usr/local/bin/session-paymaster --version | grep -q '^session-paymaster '

FROM ${RUNTIME_IMAGE}
# ca-certificates: the roots https:// chain RPCs and rediss:// Redis are verified against.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 paymaster \
 && useradd --system --uid 10001 --gid paymaster --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin paymaster \
 && mkdir -p /etc/session-paymaster/policies
COPY --from=build /usr/local/bin/session-paymaster /usr/local/bin/session-paymaster
WORKDIR /etc/session-paymaster
# MIMALLOC_ALLOW_THP=0: no transparent huge pages for the heap, even on a host whose
# transparent_hugepage is `always` (a 2 MiB page fault stalls every request behind it;
# docs/performance.md).
# /metrics names every policy and its budgets, and asks for no credential: on a port of its
# own, which only the scraper's network should reach (4337 then answers its path 405).
ENV SP_LISTEN=0.0.0.0:4337 \
    SP_METRICS_LISTEN=0.0.0.0:9464 \
    SP_POLICIES=/etc/session-paymaster/policies \
    SP_LOG_FORMAT=json \
    MIMALLOC_ALLOW_THP=0
USER 10001:10001
EXPOSE 4337 9464
# The binary probes its own /healthz: the image has no curl.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["session-paymaster", "healthcheck"]
# SIGTERM (docker stop): the service stops accepting, finishes what is in flight, and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["session-paymaster"]
CMD ["serve"]
