//! Requests from other web pages are refused. The server answers only requests whose
//! `Host` is the address it is bound to, an IP literal, or localhost, so a site that
//! points its own name at 127.0.0.1 (DNS rebinding) cannot read the answers; a request
//! a browser marks as coming from another origin is refused; and a POST must be JSON,
//! which a cross-site form or "simple" request cannot send without asking first.

use super::ApiError;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use std::net::SocketAddr;

/// The middleware: checks the request against the address the server is `bound` to.
pub async fn same_site_only(
    State(bound): State<SocketAddr>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    check(request.method(), request.headers(), bound)?;
    Ok(next.run(request).await)
}

fn check(method: &Method, headers: &HeaderMap, bound: SocketAddr) -> Result<(), ApiError> {
    let forbidden = |message: String| Err(ApiError(StatusCode::FORBIDDEN, message));
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !allowed_host(host, bound) {
        return forbidden(format!(
            "this server answers requests for {bound} or localhost, not for host {host:?}"
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if origin != format!("http://{host}") {
            return forbidden(format!(
                "requests from {origin:?} are refused: the page must come from this server"
            ));
        }
    }
    if method == Method::POST {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|c| c.to_str().ok())
            .and_then(|c| c.split(';').next())
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "requests must be JSON (content-type: application/json)".into(),
            ));
        }
    }
    Ok(())
}

/// `localhost` or an IP literal (IPv6 in brackets), with the bound port.
fn allowed_host(host: &str, bound: SocketAddr) -> bool {
    let Some((name, port)) = host.rsplit_once(':') else {
        return false;
    };
    if port.parse::<u16>().ok() != Some(bound.port()) {
        return false;
    }
    match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_ip_literals_or_localhost_on_the_bound_port() {
        let bound: SocketAddr = "127.0.0.1:8765".parse().unwrap();
        for good in [
            "127.0.0.1:8765",
            "localhost:8765",
            "LocalHost:8765",
            "[::1]:8765",
        ] {
            assert!(allowed_host(good, bound), "{good}");
        }
        for bad in [
            "evil.example:8765",
            "127.0.0.1:80",
            "127.0.0.1",
            "localhost",
            "",
            "127.0.0.1.nip.io:8765",
            "::1:8765",
        ] {
            assert!(!allowed_host(bad, bound), "{bad}");
        }
    }
}
