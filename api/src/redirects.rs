//! Where a re-auth link may send the customer back to: `MONO_REAUTH_REDIRECT_URLS`.
//!
//! A link that redirects wherever its requester says is a phishing tool carrying our name and
//! Mono's, so a redirect is allowed only if it is one of the entries, read the way a browser reads
//! it. An entry that is a bare origin (`https://app.example.com`, `/` or nothing after the host)
//! allows any URL of that origin; any other entry allows exactly itself. Both sides are parsed with
//! the WHATWG URL parser, so case, default ports and percent-encoding compare as a browser sees
//! them, and the normalised URL is what goes to Mono (no parser differential between our check and
//! Mono's use). Refused whatever the entries: anything not absolute (`//evil.com`), schemes other
//! than http(s), user info (`https://app.example.com@evil.com`), a backslash, whitespace or control
//! characters, and an empty path segment (`https://app.example.com//evil.com`, which some routers
//! take for another host).

use std::fmt;
use url::{Origin, Url};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    Origin(Origin),
    Exact(Url),
}

/// The allowed redirects; the first is the default when a request names none.
#[derive(Clone, Debug, Default)]
pub struct RedirectAllowlist {
    entries: Vec<(Entry, Url)>,
}

/// Why a redirect (or an entry of the setting) is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotAllowed(pub &'static str);

impl RedirectAllowlist {
    /// Parses `MONO_REAUTH_REDIRECT_URLS` (comma-separated; empty allows none).
    pub fn parse(setting: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for raw in setting.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let url = parse_url(raw).map_err(|why| format!("{raw:?} is not an allowed redirect: {why}"))?;
            let bare_origin = url.path() == "/" && url.query().is_none() && url.fragment().is_none();
            let entry = if bare_origin { Entry::Origin(url.origin()) } else { Entry::Exact(url.clone()) };
            entries.push((entry, url));
        }
        Ok(Self { entries })
    }

    /// The redirect to send Mono: `requested` if an entry allows it (normalised), else the first
    /// entry when nothing is requested (`None` if there are none).
    pub fn choose(&self, requested: Option<&str>) -> Result<Option<Url>, NotAllowed> {
        let Some(requested) = requested else {
            return Ok(self.entries.first().map(|(_, url)| url.clone()));
        };
        let url = parse_url(requested)?;
        let allowed = self.entries.iter().any(|(entry, _)| match entry {
            Entry::Origin(origin) => url.origin() == *origin,
            Entry::Exact(exact) => url == *exact,
        });
        if allowed { Ok(Some(url)) } else { Err(NotAllowed("not in MONO_REAUTH_REDIRECT_URLS")) }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl fmt::Display for RedirectAllowlist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<&str> = self.entries.iter().map(|(_, url)| url.as_str()).collect();
        f.write_str(&urls.join(","))
    }
}

/// An absolute http(s) URL with a host, no user info and nothing a browser and a server could read
/// differently.
fn parse_url(raw: &str) -> Result<Url, NotAllowed> {
    if raw.chars().any(|c| c.is_whitespace() || c.is_control() || c == '\\') {
        return Err(NotAllowed("whitespace, control characters and backslashes are refused"));
    }
    let url = Url::parse(raw).map_err(|_| NotAllowed("not an absolute URL"))?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err(NotAllowed("only http and https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(NotAllowed("no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(NotAllowed("user info is refused"));
    }
    if url.path().contains("//") {
        return Err(NotAllowed("empty path segments are refused"));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowlist() -> RedirectAllowlist {
        RedirectAllowlist::parse("https://app.example.com, https://web.example.com/reauth/done").unwrap()
    }

    fn allowed(candidate: &str) -> bool {
        allowlist().choose(Some(candidate)).is_ok()
    }

    #[test]
    fn an_origin_entry_allows_its_own_origin_as_a_browser_reads_it() {
        for ok in [
            "https://app.example.com",
            "https://app.example.com/",
            "https://app.example.com/reauth/done?x=1",
            "HTTPS://APP.EXAMPLE.COM/back",
            "https://app.example.com:443/back",
            "https://app.example.com/back#frag",
        ] {
            assert!(allowed(ok), "{ok} should be allowed");
        }
    }

    #[test]
    fn an_exact_entry_allows_only_itself() {
        assert!(allowed("https://web.example.com/reauth/done"));
        assert!(allowed("https://WEB.example.com:443/reauth/done"));
        for no in [
            "https://web.example.com/",
            "https://web.example.com/reauth/done/",
            "https://web.example.com/reauth/DONE",
            "https://web.example.com/reauth/done?next=https://evil.com",
            "https://web.example.com/reauth/done#x",
            "https://web.example.com/reauth/done/../../evil",
        ] {
            assert!(!allowed(no), "{no} should be refused");
        }
    }

    #[test]
    fn look_alikes_user_info_other_schemes_ports_and_relative_urls_are_refused() {
        for no in [
            "https://app.example.com.evil.com/",
            "https://app.example.com.evil.com",
            "https://evil-app.example.com/",
            "https://example.com/",
            "https://app.example.co/",
            "https://app.example.com@evil.com/",
            "https://app.example.com:pw@evil.com/",
            "https://user@app.example.com/",
            "https://evil.com/app.example.com",
            "https://evil.com?https://app.example.com",
            "//evil.com",
            "//app.example.com/",
            "/\\evil.com",
            "https://app.example.com//evil.com",
            "https://app.example.com\\@evil.com/",
            "https:\\\\evil.com",
            "http://app.example.com/",
            "https://app.example.com:8443/",
            "javascript:alert(1)",
            "data:text/html,hi",
            "ftp://app.example.com/",
            "app.example.com",
            " https://app.example.com/",
            "https://app.example.com/\nx",
            "",
        ] {
            assert!(!allowed(no), "{no:?} should be refused");
        }
    }

    #[test]
    fn the_first_entry_is_the_default_and_an_empty_list_allows_nothing() {
        assert_eq!(allowlist().choose(None).unwrap().unwrap().as_str(), "https://app.example.com/");
        let none = RedirectAllowlist::parse("").unwrap();
        assert_eq!(none.choose(None), Ok(None));
        assert!(none.choose(Some("https://app.example.com/")).is_err());
    }

    #[test]
    fn a_setting_with_a_bad_entry_is_refused_at_start() {
        for bad in ["//app.example.com", "https://u@app.example.com", "ftp://x", "not a url"] {
            assert!(RedirectAllowlist::parse(bad).is_err(), "{bad}");
        }
    }
}
