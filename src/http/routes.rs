//! Routes and the URLs they are reached by: a role's route table (`find`
//! gives the endpoint and the path's parameters, decoded, or 404/405 from the
//! same table), and names escaped into URLs and query values read back.

use crate::protocol::{ApiError, ErrorCode};

/// One row of a role's route table: method, path pattern, endpoint. In a
/// pattern, `{}` stands for one path segment, handed to the handler.
pub type Route<E> = (hyper::Method, &'static str, E);

/// Finds the endpoint for a request in a route table, with the path's `{}`
/// segments; a path in the table under another method is 405, else 404.
/// The endpoint `method path` reaches, and the path's `{}` segments,
/// percent-decoded (`my%20model` is `my model`).
pub fn find<E: Copy>(
    table: &[Route<E>],
    method: &hyper::Method,
    path: &str,
) -> Result<(E, Vec<String>), ApiError> {
    let mut path_known = false;
    for (m, pattern, endpoint) in table {
        if let Some(params) = match_path(pattern, path) {
            if m == method {
                return Ok((*endpoint, params));
            }
            path_known = true;
        }
    }
    Err(if path_known {
        ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("{method} is not allowed on {path}"),
        )
    } else {
        ApiError::new(ErrorCode::NotFound, format!("no endpoint {path}"))
    })
}

/// The `{}` segments of `path`, decoded, if it matches `pattern`.
fn match_path(pattern: &str, path: &str) -> Option<Vec<String>> {
    let mut params = Vec::new();
    let mut want = pattern.split('/');
    let mut have = path.split('/');
    loop {
        match (want.next(), have.next()) {
            (None, None) => return Some(params),
            (Some("{}"), Some(seg)) if !seg.is_empty() => params.push(percent_decode(seg)),
            (Some(w), Some(h)) if w == h => {}
            _ => return None,
        }
    }
}

/// `%XX` escapes decoded (`+` is left alone: it is a path's); an escape that
/// is not two hex digits stays as written, bytes that are not UTF-8 become
/// U+FFFD.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `s` as one path segment or query value: everything but letters, digits
/// and `-._~` percent-encoded.
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `name`'s value in a query string, decoded.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
}

#[cfg(test)]
/// For each role's tests: every path of a route table, asked with a method it
/// does not serve, must be 405 — and with the right one, its own endpoint.
pub fn assert_routes_are_consistent<E: Copy + PartialEq + std::fmt::Debug>(table: &[Route<E>]) {
    use hyper::Method;
    let methods = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
    ];
    for (method, pattern, endpoint) in table {
        let path = pattern.replace("{}", "x");
        let (found, _) = find(table, method, &path).expect(pattern);
        assert_eq!(found, *endpoint, "{method} {pattern}");
        for other in methods.iter().filter(|m| {
            !table
                .iter()
                .any(|(m2, p2, _)| m2 == *m && match_path(p2, &path).is_some())
        }) {
            let e = find(table, other, &path).unwrap_err();
            assert_eq!(e.code, ErrorCode::MethodNotAllowed, "{other} {path}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum E {
        Health,
        Job,
        JobStream,
    }

    const TABLE: &[Route<E>] = &[
        (hyper::Method::GET, "/health", E::Health),
        (hyper::Method::POST, "/v1/jobs", E::Job),
        (hyper::Method::GET, "/v1/jobs/{}/stream", E::JobStream),
    ];

    #[test]
    fn the_route_table_gives_endpoints_404_and_405() {
        use hyper::Method;
        assert_eq!(
            find(TABLE, &Method::GET, "/health").unwrap(),
            (E::Health, vec![])
        );
        assert_eq!(
            find(TABLE, &Method::GET, "/v1/jobs/job-1/stream").unwrap(),
            (E::JobStream, vec!["job-1".to_string()])
        );
        // A name with a space, as a client that escapes it sends it.
        assert_eq!(
            find(TABLE, &Method::GET, "/v1/jobs/my%20job/stream").unwrap(),
            (E::JobStream, vec!["my job".to_string()])
        );
        let code = |m: &Method, p: &str| find(TABLE, m, p).unwrap_err().code;
        assert_eq!(code(&Method::GET, "/v1/jobs"), ErrorCode::MethodNotAllowed);
        assert_eq!(
            code(&Method::DELETE, "/v1/jobs/x/stream"),
            ErrorCode::MethodNotAllowed
        );
        assert_eq!(code(&Method::GET, "/v1/jobs//stream"), ErrorCode::NotFound);
        assert_eq!(
            code(&Method::GET, "/v1/jobs/x/stream/more"),
            ErrorCode::NotFound
        );
        assert_eq!(code(&Method::GET, "/nope"), ErrorCode::NotFound);
    }

    #[test]
    fn names_go_into_urls_escaped_and_come_out_whole() {
        for name in [
            "my model",
            "a/b",
            "50%",
            "qu\"ote",
            "naïve",
            "x?y=1&z",
            "plain-1.0_x~",
        ] {
            assert_eq!(percent_decode(&segment(name)), name);
            assert!(!segment(name).contains(['/', ' ', '?', '&', '"']), "{name}");
        }
        assert_eq!(segment("plain-1.0_x~"), "plain-1.0_x~");
        assert_eq!(percent_decode("my%20model"), "my model");
        assert_eq!(percent_decode("100%"), "100%", "a lone % stays");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
        assert_eq!(
            query_param(Some("a=1&id=dl%2D1%20x"), "id").as_deref(),
            Some("dl-1 x")
        );
        assert_eq!(query_param(Some("a=1"), "id"), None);
    }
}
