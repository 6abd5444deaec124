//! Who may use the admin API: requests must name a loopback host (a DNS-rebinding page names
//! its own), and mutating endpoints need the run directory's token (`admin.token`, mode 0600,
//! new at every start) as `Authorization: Bearer TOKEN`.

use std::io::Read;
use std::net::IpAddr;
use std::path::Path;

use http::{HeaderMap, header};

/// The token file in the run directory.
pub const TOKEN_FILE: &str = "admin.token";

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The `Host` header names something other than a loopback host (or there are several).
    ForeignHost,
    /// A mutating request without the token, or with a wrong one.
    Unauthorized,
}

/// The admin credential.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    /// A new random token, written to `run_dir/admin.token` (mode 0600: write, fsync, rename).
    pub fn create(run_dir: &Path) -> std::io::Result<Token> {
        let mut raw = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        detour_proto::files::write_atomic(&run_dir.join(TOKEN_FILE), token.as_bytes(), 0o600)?;
        Ok(Token(token))
    }

    /// The token in `path` (surrounding white space trimmed; an empty file is an error).
    pub fn read(path: &Path) -> std::io::Result<Token> {
        let text = std::fs::read_to_string(path)?;
        let text = text.trim();
        if text.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the token file is empty",
            ));
        }
        Ok(Token(text.to_owned()))
    }

    /// A token with this text (tests).
    pub fn from_text(text: &str) -> Token {
        Token(text.to_owned())
    }

    /// Whether `headers` carry this token (compared in constant time).
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        let (a, b) = (given.trim().as_bytes(), self.0.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// Whether `host` (a `Host` value: name or address, optional port) is a loopback host.
pub fn is_loopback_host(host: &str) -> bool {
    if host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) {
        return true; // a bare address (`::1`)
    }
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(ip, _)| ip)
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Checks one request: its `Host` (absent is allowed: browsers always send one), and the token
/// when it `mutates`.
pub fn check(headers: &HeaderMap, mutates: bool, token: &Token) -> Result<(), Refusal> {
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) => {}
        (Some(h), None) if h.to_str().is_ok_and(is_loopback_host) => {}
        _ => return Err(Refusal::ForeignHost),
    }
    if mutates && !token.matches(headers) {
        return Err(Refusal::Unauthorized);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn loopback_hosts_pass_and_others_are_refused() {
        for ok in [
            "localhost",
            "LOCALHOST:9990",
            "127.0.0.1",
            "127.0.0.2:4191",
            "[::1]:80",
            "::1",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:80",
            "10.0.0.1",
            "localhost.evil.example",
            "[::2]:80",
            "",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn mutating_requests_need_the_token_and_reads_do_not() {
        let t = Token::from_text("s3cret");
        let local = [("host", "127.0.0.1:1")];
        assert_eq!(check(&headers(&local), false, &t), Ok(()));
        assert_eq!(
            check(&headers(&local), true, &t),
            Err(Refusal::Unauthorized)
        );
        let wrong = [("host", "localhost"), ("authorization", "Bearer s3creT")];
        assert_eq!(
            check(&headers(&wrong), true, &t),
            Err(Refusal::Unauthorized)
        );
        let right = [("host", "localhost"), ("authorization", "Bearer s3cret")];
        assert_eq!(check(&headers(&right), true, &t), Ok(()));
        let foreign = [
            ("host", "attacker.example"),
            ("authorization", "Bearer s3cret"),
        ];
        assert_eq!(
            check(&headers(&foreign), true, &t),
            Err(Refusal::ForeignHost)
        );
        let twice = [("host", "localhost"), ("host", "evil.example")];
        assert_eq!(
            check(&headers(&twice), false, &t),
            Err(Refusal::ForeignHost)
        );
        assert_eq!(check(&HeaderMap::new(), false, &t), Ok(()));
    }

    #[test]
    fn the_token_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let t = Token::create(dir.path()).unwrap();
        let meta = std::fs::metadata(dir.path().join(TOKEN_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(TOKEN_FILE)).unwrap(),
            t.0
        );
        assert_eq!(t.0.len(), 64);
    }
}
