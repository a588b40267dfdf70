//! The chain RPC client of every chain path (`deploy`, `status`, `deploy-dev`, the settlement
//! watcher): `http://` or `https://` (rustls, roots from the system store: `SSL_CERT_FILE` /
//! `SSL_CERT_DIR` are honoured), with bounded waits, so an endpoint that accepts a connection
//! and never answers fails a call instead of holding it for good; and errors that keep their
//! cause ("invalid peer certificate: UnknownIssuer", not just "error sending request").

use std::time::Duration;

use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::client::RpcClient;
use alloy::transports::http::reqwest;

/// How long a connection (TCP and TLS) to the chain RPC may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one chain RPC request may take, answer included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A JSON-RPC client for `url` (`http://` or `https://`).
pub fn client(url: &str) -> Result<RpcClient, String> {
    let parsed: reqwest::Url = url.parse().map_err(|e| format!("invalid --rpc-url: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "invalid --rpc-url: scheme {} (http or https)",
            parsed.scheme()
        ));
    }
    let http = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| format!("chain RPC client: {}", error_chain(&e)))?;
    Ok(RpcClient::new_http_with_client(http, parsed))
}

/// A read-only provider for `url`.
pub fn provider(url: &str) -> Result<DynProvider, String> {
    Ok(ProviderBuilder::new().connect_client(client(url)?).erased())
}

/// `e` and each of its sources, joined by ": ", repeats left out (wrappers often print their
/// source's text again).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_other_than_http_are_refused() {
        assert!(client("http://127.0.0.1:8545").is_ok());
        assert!(client("https://rpc.example.org/v1/key").is_ok());
        for bad in [
            "ws://127.0.0.1:8545",
            "127.0.0.1:8545",
            "file:///etc/passwd",
            "",
        ] {
            let err = client(bad).err().unwrap_or_default();
            assert!(err.starts_with("invalid --rpc-url"), "{bad}: {err}");
        }
    }

    #[test]
    fn error_chains_keep_causes_once() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let e = E(
            "error sending request",
            Some(Box::new(E(
                "client error (Connect)",
                Some(Box::new(E("invalid peer certificate: UnknownIssuer", None))),
            ))),
        );
        assert_eq!(
            error_chain(&e),
            "error sending request: client error (Connect): invalid peer certificate: UnknownIssuer"
        );
        let repeat = E(
            "transport error: timed out",
            Some(Box::new(E("timed out", None))),
        );
        assert_eq!(error_chain(&repeat), "transport error: timed out");
    }
}
