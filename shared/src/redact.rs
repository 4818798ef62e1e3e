//! URLs fit for logs.

/// A URL fit for logs: the password, if any, is replaced by `***`, in the user info and in any query
/// parameter that carries a credential (`?password=`, `sslpassword=`, `token=`, ...).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<unparseable url>".to_owned();
    };
    let rest = redact_query(rest);
    let rest = rest.as_str();
    // Split at the last '@' rather than parsing: a malformed password (an unescaped '/' or '@') must
    // still end up on the hidden side.
    match rest.rsplit_once('@') {
        Some((userinfo, host_and_path)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host_and_path}"),
            None => format!("{scheme}://{rest}"),
        },
        None => format!("{scheme}://{rest}"),
    }
}

/// Replaces the value of every `?name=value` or `&name=value` whose name suggests a credential.
fn redact_query(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(['?', '&']) {
        out.push_str(&rest[..=at]);
        rest = &rest[at + 1..];
        let Some((name, _)) = rest.split_once('=') else { continue };
        let lower = name.to_ascii_lowercase();
        let plain = !name.contains(['&', '?', '/', '@', '#']);
        if plain && ["pass", "pwd", "secret", "token", "key"].iter().any(|word| lower.contains(word)) {
            let end = rest[name.len() + 1..].find(['&', '#']).map_or(rest.len(), |i| name.len() + 1 + i);
            out.push_str(name);
            out.push_str("=***");
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_passwords_and_keeps_the_rest() {
        assert_eq!(redact_url("amqp://guest:s3cret@rabbit:5672/%2f"), "amqp://guest:***@rabbit:5672/%2f");
        assert_eq!(redact_url("postgres://app:p@ss@db/monohook"), "postgres://app:***@db/monohook");
        assert_eq!(redact_url("postgres://app:pa/ss@db/monohook"), "postgres://app:***@db/monohook");
        assert_eq!(redact_url("postgres://db/monohook"), "postgres://db/monohook");
        assert_eq!(redact_url("postgres://app@db/monohook"), "postgres://app@db/monohook");
        assert_eq!(redact_url("not a url"), "<unparseable url>");
        assert_eq!(
            redact_url("postgres://db/monohook?user=app&password=s3cret&sslmode=require"),
            "postgres://db/monohook?user=app&password=***&sslmode=require"
        );
        assert_eq!(redact_url("postgres://db/m?Password=a@b"), "postgres://db/m?Password=***");
        assert_eq!(
            redact_url("amqps://u:p@rabbit/%2f?sslpassword=x&heartbeat=5"),
            "amqps://u:***@rabbit/%2f?sslpassword=***&heartbeat=5"
        );
    }
}
