//! Outgoing JSON-RPC: the one client of every call the service makes to a chain node
//! (`deploy`, `status`, `deploy-dev`, the settlement watcher) or to a bundler (gas
//! estimation). `http://` or `https://` (rustls, roots from the system store: `SSL_CERT_FILE`
//! / `SSL_CERT_DIR` are honoured), with bounded waits, so an endpoint that accepts a
//! connection and never answers fails a call instead of holding it for good; and errors that
//! keep their cause ("invalid peer certificate: UnknownIssuer", not just "error sending
//! request") but not the URL's path or query, where hosted providers put their API keys.

use std::time::Duration;

use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::client::RpcClient;
use alloy::transports::http::reqwest;

/// How long a connection (TCP and TLS) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request may take, answer included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A JSON-RPC client for `url` (`http://` or `https://`); `flag` names the option it came
/// from in errors (`--rpc-url`, `--bundler-url`).
pub fn json_rpc(url: &str, flag: &str) -> Result<RpcClient, String> {
    let parsed: reqwest::Url = url.parse().map_err(|e| format!("invalid {flag}: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "invalid {flag}: scheme {} (http or https)",
            parsed.scheme()
        ));
    }
    let http = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| format!("{flag} client: {}", error_chain(&e)))?;
    Ok(RpcClient::new_http_with_client(http, parsed))
}

/// A provider for the chain node at `url` (`--rpc-url`); it sends only what a wallet layer
/// added on top of it signs.
pub fn provider(url: &str) -> Result<DynProvider, String> {
    Ok(ProviderBuilder::new()
        .connect_client(json_rpc(url, "--rpc-url")?)
        .erased())
}

/// `e` and each of its sources, joined by ": ", repeats left out (wrappers often print their
/// source's text again), URLs cut to scheme, host and port ([`redact_urls`]): errors reach
/// logs and terminals, and hosted RPC URLs carry their API key in the path or query.
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
    redact_urls(&out)
}

/// Every `scheme://user:pass@host:port/path?query` in `text` as `scheme://host:port/…`: the
/// credentials, path and query (where providers put API keys) left out.
pub fn redact_urls(text: &str) -> String {
    let ends = |c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | ',' | '>');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        out.push_str(&rest[..at + 3]);
        let after = &rest[at + 3..];
        let url_end = after.find(ends).unwrap_or(after.len());
        let url = &after[..url_end];
        let authority_end = url.find(['/', '?', '#']).unwrap_or(url.len());
        let authority = &url[..authority_end];
        out.push_str(
            authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host),
        );
        match &url[authority_end..] {
            "" | "/" => out.push_str(&url[authority_end..]),
            _ => out.push_str("/…"),
        }
        rest = &after[url_end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_other_than_http_are_refused() {
        assert!(json_rpc("http://127.0.0.1:8545", "--rpc-url").is_ok());
        assert!(json_rpc("https://rpc.example.org/v1/key", "--rpc-url").is_ok());
        for bad in [
            "ws://127.0.0.1:8545",
            "127.0.0.1:8545",
            "file:///etc/passwd",
            "",
        ] {
            let err = json_rpc(bad, "--bundler-url").err().unwrap_or_default();
            assert!(err.starts_with("invalid --bundler-url"), "{bad}: {err}");
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

    #[test]
    fn urls_in_errors_lose_credentials_path_and_query() {
        for (text, shown) in [
            (
                "error sending request for url (https://eth.example.org/v3/0123abcd)",
                "error sending request for url (https://eth.example.org/…)",
            ),
            (
                "for url (https://rpc.example.org/?apikey=secret): timed out",
                "for url (https://rpc.example.org/…): timed out",
            ),
            (
                "redis://:secret@10.0.0.5:6379/0 refused",
                "redis://10.0.0.5:6379/… refused",
            ),
            (
                "http://127.0.0.1:8545/ and http://127.0.0.1:8546",
                "http://127.0.0.1:8545/ and http://127.0.0.1:8546",
            ),
            ("no url here", "no url here"),
            ("dangling ://", "dangling ://"),
        ] {
            let redacted = redact_urls(text);
            assert_eq!(redacted, shown, "{text}");
            assert!(!redacted.contains("secret") && !redacted.contains("0123abcd"));
        }
    }
}
