//! The one redaction helper: what a URL or an error message may show in logs, errors, audit
//! rows and API responses. Every crate that prints a URL or stores an outside error goes
//! through here, so a secret has one place to leak from, and one test.

/// The replacement of every secret.
pub const MASK: &str = "***";

/// Query parameters whose values are credentials (matched case-insensitively, as a part of the
/// name: `api_key`, `X-Amz-Signature`, `access_token`, `sig` …).
const SECRET_PARAMS: [&str; 10] = ["token", "key", "secret", "password", "passwd", "pwd", "signature", "sig", "auth", "credential"];

/// A URL as it may be shown: the password of its user info and the values of query parameters
/// that look like credentials become `***`. Works on any `scheme://…` string (database, broker,
/// SMTP and HTTP URLs alike) without parsing it strictly, so a malformed URL is redacted too.
/// Path segments are kept: a URL that carries a secret in its path (a Slack incoming webhook)
/// is an operator's or a caller's secret as a whole, and is shown with [`origin`] instead.
pub fn url(url: &str) -> String {
    let (head, fragment) = match url.split_once('#') {
        Some((h, _)) => (h, Some(MASK)),
        None => (url, None),
    };
    let (base, query) = match head.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (head, None),
    };
    let mut out = userinfo(base);
    if let Some(q) = query {
        out.push('?');
        let pairs: Vec<String> = q
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if is_secret_name(k) => format!("{k}={MASK}"),
                _ => pair.to_string(),
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// Only the scheme, host and port of a URL, then `/…`: how a read-only caller sees a Slack or
/// webhook URL whose path is the credential.
pub fn origin(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else { return MASK.to_string() };
    let rest = &url[start..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{}{host}/…", &url[..start])
}

fn userinfo(base: &str) -> String {
    let Some(start) = base.find("://").map(|i| i + 3) else { return base.to_string() };
    let rest = &base[start..];
    let end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..end];
    match authority.rsplit_once('@') {
        Some((info, host)) => {
            let user = info.split_once(':').map_or(info, |(u, _)| u);
            let shown = if info.contains(':') { format!("{user}:{MASK}") } else { user.to_string() };
            format!("{}{shown}@{host}{}", &base[..start], &rest[end..])
        }
        None => base.to_string(),
    }
}

fn is_secret_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    SECRET_PARAMS.iter().any(|s| lower.contains(s))
}

/// Replaces in `text` every URL (`scheme://…` up to white space or a quote) by its redacted
/// form and every known secret by `***`: for error messages of drivers and outside servers,
/// which may quote the URL or the credential they were given.
pub fn text(text: &str, secrets: &Secrets) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        // The scheme: the letters, digits, `+`, `-` and `.` just before `://`.
        let scheme_start = rest[..i].rfind(|c: char| !(c.is_ascii_alphanumeric() || "+-.".contains(c))).map_or(0, |p| p + 1);
        let end = rest[i..].find(|c: char| c.is_whitespace() || "\"'<>`)".contains(c)).map_or(rest.len(), |e| i + e);
        out.push_str(&rest[..scheme_start]);
        out.push_str(&url(&rest[scheme_start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    secrets.mask(&out)
}

/// The secrets a process knows (tokens, passwords, keys), so that text from elsewhere can be
/// scrubbed of them. Values shorter than 6 characters are not kept: masking them would garble
/// ordinary words, and no generated or configured credential is that short.
#[derive(Clone, Default)]
pub struct Secrets(Vec<String>);

impl Secrets {
    pub fn new() -> Self {
        Secrets(Vec::new())
    }

    /// Adds a secret (empty and short values are ignored); also the user-info password of a URL.
    pub fn add(&mut self, secret: impl Into<String>) -> &mut Self {
        let s: String = secret.into();
        if let Some(start) = s.find("://").map(|i| i + 3) {
            let rest = &s[start..];
            let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
            if let Some((info, _)) = authority.rsplit_once('@') {
                if let Some((_, password)) = info.split_once(':') {
                    self.add(password.to_string());
                }
            }
            return self;
        }
        self.push(s);
        self
    }

    /// Adds a value masked as a whole, URL or not (a Slack webhook URL, whose path is the
    /// credential).
    pub fn add_whole(&mut self, secret: impl Into<String>) -> &mut Self {
        let s: String = secret.into();
        // A server that quotes only the path of what it was asked still shows the credential.
        if let Some(start) = s.find("://").map(|i| i + 3) {
            if let Some(slash) = s[start..].find('/') {
                self.push(s[start + slash..].to_string());
            }
        }
        self.push(s);
        self
    }

    fn push(&mut self, s: String) {
        if s.len() >= 6 && !self.0.contains(&s) {
            self.0.push(s);
            // Longest first, so a secret that contains another is masked whole.
            self.0.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
    }

    pub fn mask(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.0 {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), MASK);
            }
        }
        out
    }
}

/// The secrets of this process, registered once at start (the binary registers every configured
/// credential); [`scrub`] masks them in any text, and the log writer passes every line through it.
static PROCESS: std::sync::RwLock<Secrets> = std::sync::RwLock::new(Secrets(Vec::new()));

/// Adds a credential of this process (a token, a password, the password of a URL) to what
/// [`scrub`] masks.
pub fn register(secret: impl Into<String>) {
    PROCESS.write().unwrap_or_else(|e| e.into_inner()).add(secret);
}

/// Adds a value masked whole (a URL whose path is the credential, such as a Slack webhook).
pub fn register_whole(secret: impl Into<String>) {
    PROCESS.write().unwrap_or_else(|e| e.into_inner()).add_whole(secret);
}

/// `text` with its URLs redacted and every registered secret masked: for error messages that
/// are logged, stored (a job's last error, a delivery's error) or answered.
pub fn scrub(text: &str) -> String {
    let s = PROCESS.read().unwrap_or_else(|e| e.into_inner());
    self::text(text, &s)
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} kept)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_passwords_and_secret_parameters() {
        assert_eq!(url("postgres://app:hunter22@db:5432/prod?sslmode=require"), "postgres://app:***@db:5432/prod?sslmode=require");
        assert_eq!(url("redis://:pw@127.0.0.1:6379/0"), "redis://:***@127.0.0.1:6379/0");
        assert_eq!(url("amqp://guest@host/%2f"), "amqp://guest@host/%2f");
        assert_eq!(url("https://h/x?api_key=abc&page=2&X-Amz-Signature=f"), "https://h/x?api_key=***&page=2&X-Amz-Signature=***");
        assert_eq!(url("https://h/x#access_token=abc"), "https://h/x#***");
        assert_eq!(url("not a url"), "not a url");
        assert_eq!(url("smtp://u:p%40ss@mail:25"), "smtp://u:***@mail:25");
    }

    #[test]
    fn origins_hide_paths_and_user_info() {
        assert_eq!(origin("https://hooks.slack.com/services/T0/B0/abcd"), "https://hooks.slack.com/…");
        assert_eq!(origin("http://u:p@127.0.0.1:9000?x=1"), "http://127.0.0.1:9000/…");
        assert_eq!(origin("garbage"), "***");
    }

    #[test]
    fn text_masks_urls_and_known_secrets() {
        let mut secrets = Secrets::new();
        secrets.add("s3cr3t-token").add("postgres://u:dbpass99@h/db").add("abc");
        secrets.add_whole("https://hooks.slack.com/services/T0/B0/XYZ");
        let msg = "error sending request for url (http://u:pw@10.0.0.1/hook?token=zz): bearer s3cr3t-token; db dbpass99; abc";
        assert_eq!(text(msg, &secrets), "error sending request for url (http://u:***@10.0.0.1/hook?token=***): bearer ***; db ***; abc");
    }
}
