//! Outbound HTTP: the one place every channel and connector gets its HTTP client from, and the
//! policy on where URLs that arrive through the API or in payloads may lead (SPEC "Access and
//! outbound safety").
//!
//! Two levels of [`Trust`]:
//! - [`Trust::Caller`] — URLs from API callers and payloads (user webhook and Slack URLs, rule
//!   recipients). They may not reach loopback, private, link-local, multicast, unspecified,
//!   broadcast, documentation or otherwise reserved addresses, nor IPv6 forms that embed such an
//!   IPv4 address, unless the operator's [`Policy`] (`CONVEYOR_OUTBOUND_ALLOW`) names them.
//!   Names are checked *after* DNS resolution, by the client's own resolver, so the connection
//!   goes to the address that was checked (no DNS rebinding between check and connect). IP
//!   literals never reach a resolver (reqwest connects to them directly), so [`Client::check`]
//!   checks them before a request is built.
//! - [`Trust::Operator`] — URLs from configuration (`CONVEYOR_SMS_URL`, `CONVEYOR_SLACK_WEBHOOK`,
//!   the sync partners): any address.
//!
//! For both: only `http` and `https`, no redirects (a 3xx is a permanent failure), response
//! bodies read up to a cap, and errors that say what happened without internal detail (no
//! resolved address, no internal service's body beyond a short excerpt).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::{Method, Url};

/// Who chose a URL, and so how far it is trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    /// Configured by the operator: any destination.
    Operator,
    /// Supplied through the API or a payload: public destinations, or what the policy allows.
    Caller,
}

/// Why an outbound call did not produce an answer, or produced one that is not accepted.
/// Messages carry no resolved address and no secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboundError {
    #[error("not a valid URL")]
    BadUrl,
    #[error("only http:// and https:// URLs are allowed")]
    Scheme,
    /// The destination is loopback, private or reserved (the reason says which, never the
    /// resolved address).
    #[error("destination not allowed: {0}")]
    NotAllowed(String),
    #[error("timed out")]
    Timeout,
    #[error("connection refused")]
    Refused,
    #[error("could not resolve the host")]
    Dns,
    #[error("connection failed")]
    Connect,
    #[error("request failed")]
    Request,
    #[error("HTTP {0}: redirects are not followed")]
    Redirect(u16),
    #[error("the response body is over {0} bytes")]
    TooLarge(usize),
}

impl OutboundError {
    /// Whether another try may succeed (the network), as opposed to a destination or answer
    /// that will stay wrong.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            OutboundError::Timeout | OutboundError::Refused | OutboundError::Dns | OutboundError::Connect | OutboundError::Request
        )
    }
}

/// Destinations the operator lets callers' URLs reach although they are private:
/// `CONVEYOR_OUTBOUND_ALLOW` (`[outbound] allow`), comma-separated host names and CIDRs, e.g.
/// `127.0.0.1/32,receiver.internal`. A bare address counts as a /32 (or /128).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    hosts: Vec<String>,
    nets: Vec<(IpAddr, u8)>,
}

impl Policy {
    /// Parses the allow list; an entry that is neither a host name nor a CIDR is an error
    /// naming it.
    pub fn parse(list: &str) -> Result<Policy, String> {
        let mut p = Policy::default();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if let Some((ip, bits)) = entry.split_once('/') {
                let ip: IpAddr = ip.trim_matches(['[', ']']).parse().map_err(|_| format!("{entry:?} is not a CIDR like 10.0.0.0/8"))?;
                let max = if ip.is_ipv4() { 32 } else { 128 };
                let bits: u8 =
                    bits.parse().ok().filter(|b| *b <= max).ok_or_else(|| format!("{entry:?}: the prefix must be 0 to {max}"))?;
                p.nets.push((ip, bits));
            } else if let Ok(ip) = entry.trim_matches(['[', ']']).parse::<IpAddr>() {
                p.nets.push((ip, if ip.is_ipv4() { 32 } else { 128 }));
            } else if entry.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)) {
                p.hosts.push(normal_host(entry));
            } else {
                return Err(format!("{entry:?} is neither a host name nor a CIDR"));
            }
        }
        Ok(p)
    }

    /// Whether the host (a name as in a URL) is named by the list.
    pub fn allows_host(&self, host: &str) -> bool {
        let host = normal_host(host);
        self.hosts.contains(&host)
    }

    /// Whether a caller's URL may connect to `ip`: a public address, or one the list covers.
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        blocked(ip).is_none() || self.nets.iter().any(|(net, bits)| in_net(ip, *net, *bits))
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.nets.is_empty()
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nets = self.nets.iter().map(|(ip, bits)| format!("{ip}/{bits}"));
        let all: Vec<String> = self.hosts.iter().cloned().chain(nets).collect();
        f.write_str(&all.join(","))
    }
}

/// The policy the HTTP API validates callers' URLs with. The server's state is assembled in
/// `conveyor-server`'s router, which knows nothing of the applications' settings, so the
/// process that serves installs its configured policy here once at start-up; without one,
/// nothing private is allowed. Deliveries never read this: they use the policy of the
/// `NotifyConfig` they were registered with.
pub fn install_api_policy(policy: Policy) {
    let _ = API_POLICY.set(policy);
}

/// See [`install_api_policy`].
pub fn api_policy() -> Policy {
    API_POLICY.get().cloned().unwrap_or_default()
}

static API_POLICY: OnceLock<Policy> = OnceLock::new();

/// How a client is built.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The whole request, answer included.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// The most bytes of a response body read.
    pub body_limit: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { timeout: Duration::from_secs(10), connect_timeout: Duration::from_secs(5), body_limit: 64 * 1024 }
    }
}

/// An HTTP client with its trust level and policy: [`Client::check`] before building a request,
/// [`Client::send`] to send it, [`read_capped`] (or [`Client::body`]) to read the answer.
#[derive(Clone)]
pub struct Client {
    inner: reqwest::Client,
    trust: Trust,
    policy: Arc<Policy>,
    body_limit: usize,
}

impl Client {
    /// The one constructor of outbound clients.
    pub fn new(trust: Trust, policy: Policy, settings: Settings) -> Client {
        let policy = Arc::new(policy);
        let mut b = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.connect_timeout.min(settings.timeout))
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true);
        if trust == Trust::Caller {
            // Through a proxy, the proxy would resolve the name and the check would be moot.
            b = b.no_proxy().dns_resolver(Arc::new(Guarded { policy: policy.clone() }));
        }
        let inner = b.build().expect("an HTTP client with these settings");
        Client { inner, trust, policy, body_limit: settings.body_limit }
    }

    pub fn trust(&self) -> Trust {
        self.trust
    }

    pub fn body_limit(&self) -> usize {
        self.body_limit
    }

    /// Parses `url` and checks what can be checked before resolution: the scheme, and for a
    /// caller's URL a literal address (every IPv4 spelling — decimal, hex, octal, short — is
    /// normalised by WHATWG host parsing first) or a `localhost` name.
    pub fn check(&self, url: &str) -> Result<Url, OutboundError> {
        check_url(url, self.trust, &self.policy)
    }

    /// A checked request.
    pub fn request(&self, method: Method, url: &str) -> Result<reqwest::RequestBuilder, OutboundError> {
        let u = self.check(url)?;
        Ok(self.inner.request(method, u))
    }

    pub fn post(&self, url: &str) -> Result<reqwest::RequestBuilder, OutboundError> {
        self.request(Method::POST, url)
    }

    pub fn get(&self, url: &str) -> Result<reqwest::RequestBuilder, OutboundError> {
        self.request(Method::GET, url)
    }

    pub fn put(&self, url: &str) -> Result<reqwest::RequestBuilder, OutboundError> {
        self.request(Method::PUT, url)
    }

    /// Sends; a 3xx is [`OutboundError::Redirect`], other statuses are the caller's to judge.
    /// A call made in a trace (a job's attempt) passes it on as W3C `traceparent`.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, OutboundError> {
        let req = match conveyor_core::trace::current() {
            Some(ctx) => req.header("traceparent", ctx.traceparent()),
            None => req,
        };
        let resp = req.send().await.map_err(|e| classify(&e))?;
        if resp.status().is_redirection() {
            return Err(OutboundError::Redirect(resp.status().as_u16()));
        }
        Ok(resp)
    }

    /// The response body, at most this client's limit.
    pub async fn body(&self, resp: reqwest::Response) -> Result<Vec<u8>, OutboundError> {
        read_capped(resp, self.body_limit).await
    }
}

/// The longest `Retry-After` honoured: a partner, an HTTP kind's endpoint or whoever answers at
/// a URL an API caller gave cannot park a job for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// `Retry-After` as seconds or an HTTP date, at most [`MAX_RETRY_AFTER`].
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    // An HTTP date (IMF-fixdate is RFC 2822 with `GMT`).
    let at = jiff::fmt::rfc2822::parse(v).ok()?.timestamp().as_millisecond();
    let ms = at - conveyor_core::clock::now_ms();
    Some(Duration::from_millis(ms.max(0) as u64).min(MAX_RETRY_AFTER))
}

/// Reads a body chunk by chunk and stops past `limit` bytes, so a huge or endless answer costs
/// at most `limit` of memory.
pub async fn read_capped(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, OutboundError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(OutboundError::TooLarge(limit));
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| classify(&e))? {
        if out.len() + chunk.len() > limit {
            return Err(OutboundError::TooLarge(limit));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// A short excerpt of an error answer for a log row: at most `limit` bytes read, `chars`
/// characters kept (an internal service's error page is not echoed whole).
pub async fn excerpt(resp: reqwest::Response, limit: usize, chars: usize) -> String {
    let mut resp = resp;
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = limit.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= limit {
            break;
        }
    }
    String::from_utf8_lossy(&out).chars().take(chars).collect::<String>().trim().to_string()
}

/// Checks a caller's URL as the API does when it is stored (SPEC: a literal private address or
/// a scheme other than http(s) is refused at once; names are checked at delivery, since DNS
/// can change). Returns why not.
pub fn validate_caller_url(url: &str, policy: &Policy) -> Result<(), OutboundError> {
    check_url(url, Trust::Caller, policy).map(|_| ())
}

/// Checks a URL the operator configured (an HTTP kind's): http(s) with a host.
pub fn check_operator_url(url: &str) -> Result<(), OutboundError> {
    check_url(url, Trust::Operator, &Policy::default()).map(|_| ())
}

fn check_url(url: &str, trust: Trust, policy: &Policy) -> Result<Url, OutboundError> {
    let u = Url::parse(url.trim()).map_err(|_| OutboundError::BadUrl)?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(OutboundError::Scheme);
    }
    let host = u.host().ok_or(OutboundError::BadUrl)?;
    if trust == Trust::Operator {
        return Ok(u);
    }
    match host {
        url::Host::Ipv4(ip) => check_ip(IpAddr::V4(ip), policy)?,
        url::Host::Ipv6(ip) => check_ip(IpAddr::V6(ip), policy)?,
        url::Host::Domain(name) => {
            let n = normal_host(name);
            if !policy.allows_host(&n) && (n == "localhost" || n.ends_with(".localhost")) {
                return Err(OutboundError::NotAllowed("localhost".into()));
            }
        }
    }
    Ok(u)
}

fn check_ip(ip: IpAddr, policy: &Policy) -> Result<(), OutboundError> {
    match blocked(ip) {
        Some(why) if !policy.allows_ip(ip) => Err(OutboundError::NotAllowed(format!("a {why} address"))),
        _ => Ok(()),
    }
}

/// Lower case, without the trailing dot of a fully qualified name.
fn normal_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// The resolver of caller clients: resolves, then keeps only the addresses the policy allows
/// (all of them for a host the policy names). The connector connects only to what this returns,
/// so what was checked is what is reached.
struct Guarded {
    policy: Arc<Policy>,
}

/// A name that resolved only to addresses callers may not reach.
#[derive(Debug)]
struct Blocked(&'static str);

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "resolves to a {} address", self.0)
    }
}

impl std::error::Error for Blocked {}

/// The resolver's own failure to resolve (kept apart from [`Blocked`] to classify it).
#[derive(Debug)]
struct Unresolved;

impl std::fmt::Display for Unresolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("could not resolve the host")
    }
}

impl std::error::Error for Unresolved {}

impl Resolve for Guarded {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await.map_err(|_| Box::new(Unresolved))?.collect();
            if policy.allows_host(&host) {
                return Ok(Box::new(addrs.into_iter()) as Addrs);
            }
            let first_reason = addrs.iter().find_map(|a| blocked(a.ip()));
            let ok: Vec<SocketAddr> = addrs.into_iter().filter(|a| policy.allows_ip(a.ip())).collect();
            match (ok.is_empty(), first_reason) {
                (true, Some(why)) => Err(Box::new(Blocked(why)) as Box<dyn std::error::Error + Send + Sync>),
                (true, None) => Err(Box::new(Unresolved) as Box<dyn std::error::Error + Send + Sync>),
                (false, _) => Ok(Box::new(ok.into_iter()) as Addrs),
            }
        })
    }
}

/// Maps a client error to what may be stored: the kind of failure, never the URL, the resolved
/// address or the internal chain of messages.
fn classify(e: &reqwest::Error) -> OutboundError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(b) = s.downcast_ref::<Blocked>() {
            return OutboundError::NotAllowed(b.to_string());
        }
        if s.downcast_ref::<Unresolved>().is_some() {
            return OutboundError::Dns;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return OutboundError::Refused,
                std::io::ErrorKind::TimedOut => return OutboundError::Timeout,
                _ => {}
            }
        }
        source = s.source();
    }
    if e.is_timeout() {
        OutboundError::Timeout
    } else if e.is_connect() {
        OutboundError::Connect
    } else {
        OutboundError::Request
    }
}

/// Why a caller may not reach `ip` (a word for the error: "loopback", "private", …), or `None`
/// for a public address.
pub fn blocked(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => blocked_v4(v4),
        IpAddr::V6(v6) => blocked_v6(v6),
    }
}

fn blocked_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match () {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() || a == 0 => "unspecified",
        _ if ip.is_private() => "private",
        // 100.64.0.0/10, carrier-grade NAT.
        _ if a == 100 && (64..128).contains(&b) => "private",
        _ if ip.is_link_local() => "link-local",
        _ if ip.is_multicast() => "multicast",
        _ if ip.is_broadcast() => "broadcast",
        _ if ip.is_documentation() => "documentation",
        // 192.0.0.0/24 (protocol assignments), 198.18.0.0/15 (benchmarking), 240.0.0.0/4.
        _ if a == 192 && b == 0 && c == 0 => "reserved",
        _ if a == 198 && (b == 18 || b == 19) => "reserved",
        _ if a >= 240 => "reserved",
        _ => return None,
    })
}

fn blocked_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    Some(match () {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_multicast() => "multicast",
        // fc00::/7 unique local.
        _ if s[0] & 0xfe00 == 0xfc00 => "private",
        // fe80::/10 link-local, fec0::/10 the old site-local.
        _ if s[0] & 0xffc0 == 0xfe80 => "link-local",
        _ if s[0] & 0xffc0 == 0xfec0 => "private",
        // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (compatible): the IPv4 address decides.
        _ if s[..5] == [0; 5] && (s[5] == 0xffff || s[5] == 0) => return blocked_v4(embedded(s[6], s[7])),
        // 64:ff9b::/96 (NAT64) embeds an IPv4 address; 64:ff9b:1::/48 is local-use NAT64.
        _ if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] => return blocked_v4(embedded(s[6], s[7])),
        _ if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 => "private",
        // 2002::/16 (6to4) embeds an IPv4 address in bits 16–48.
        _ if s[0] == 0x2002 => return blocked_v4(embedded(s[1], s[2])),
        // 2001::/32 Teredo hides an IPv4 address; 2001:db8::/32 documentation; 100::/64 discard.
        _ if s[0] == 0x2001 && s[1] == 0 => "reserved",
        _ if s[0] == 0x2001 && s[1] == 0xdb8 => "documentation",
        _ if s[..4] == [0x100, 0, 0, 0] => "reserved",
        _ => return None,
    })
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits as u32) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits as u32) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        // A mapped IPv6 form of an allowed IPv4 network is the same destination.
        (IpAddr::V6(a), IpAddr::V4(_)) => a.to_ipv4_mapped().is_some_and(|v4| in_net(IpAddr::V4(v4), net, bits)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(url: &str) -> Result<Url, OutboundError> {
        check_url(url, Trust::Caller, &Policy::default())
    }

    #[test]
    fn every_spelling_of_a_private_address_is_refused() {
        for url in [
            "http://127.0.0.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://0/",
            "http://0.0.0.0/",
            "http://[::1]/",
            "http://[::]/",
            "http://[::ffff:7f00:1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::127.0.0.1]/",
            "http://[64:ff9b::a00:1]/",
            "http://[2002:c0a8:101::1]/",
            "http://[fc00::1]/",
            "http://[fe80::1]/",
            "http://[ff02::1]/",
            "http://10.1.2.3/",
            "http://172.16.0.1/",
            "http://192.168.1.1/",
            "http://100.64.0.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://224.0.0.1/",
            "http://255.255.255.255/",
            "http://192.0.2.1/",
            "http://[2001:db8::1]/",
            "http://localhost/",
            "http://LOCALHOST./",
            "http://api.localhost/",
            "https://127.0.0.1.:8443/x",
        ] {
            let e = caller(url).expect_err(url);
            assert!(matches!(e, OutboundError::NotAllowed(_)), "{url}: {e}");
        }
        assert_eq!(caller("ftp://example.com/").unwrap_err(), OutboundError::Scheme);
        assert_eq!(caller("file:///etc/passwd").unwrap_err(), OutboundError::Scheme);
        assert_eq!(caller("not a url").unwrap_err(), OutboundError::BadUrl);
        assert!(caller("https://hooks.example.com/x").is_ok());
        assert!(caller("http://93.184.216.34/").is_ok());
        assert!(caller("http://[2606:4700::1111]/").is_ok());
        assert!(check_url("http://127.0.0.1/", Trust::Operator, &Policy::default()).is_ok(), "operator URLs are trusted");
        assert_eq!(check_url("gopher://x/", Trust::Operator, &Policy::default()).unwrap_err(), OutboundError::Scheme);
    }

    #[test]
    fn the_allow_list_lets_named_destinations_through() {
        let p = Policy::parse("127.0.0.1/32, receiver.internal., 10.0.0.0/8, ::1").unwrap();
        assert!(check_url("http://127.0.0.1:9/", Trust::Caller, &p).is_ok());
        assert!(check_url("http://2130706433/", Trust::Caller, &p).is_ok(), "the same address spelled otherwise");
        assert!(check_url("http://[::ffff:127.0.0.1]/", Trust::Caller, &p).is_ok());
        assert!(check_url("http://[::1]/", Trust::Caller, &p).is_ok());
        assert!(check_url("http://10.9.8.7/", Trust::Caller, &p).is_ok());
        assert!(check_url("http://127.0.0.2/", Trust::Caller, &p).is_err(), "outside the /32");
        assert!(check_url("http://192.168.0.1/", Trust::Caller, &p).is_err());
        assert!(p.allows_host("Receiver.Internal"));
        assert!(Policy::parse("10.0.0.0/33").is_err());
        assert!(Policy::parse("http://x").is_err());
        assert_eq!(Policy::parse(" ").unwrap(), Policy::default());
    }

    #[tokio::test]
    async fn the_resolver_keeps_only_addresses_the_policy_allows() {
        let resolve = |policy: &str| {
            let r = Guarded { policy: Arc::new(Policy::parse(policy).unwrap()) };
            r.resolve("localhost".parse().unwrap())
        };
        let err = match resolve("").await {
            Err(e) => e.to_string(),
            Ok(a) => panic!("localhost resolved to {:?}", a.collect::<Vec<_>>()),
        };
        assert_eq!(err, "resolves to a loopback address");
        let allowed: Vec<SocketAddr> = resolve("127.0.0.1/32,::1").await.map_err(|e| e.to_string()).unwrap().collect();
        assert!(allowed.iter().all(|a| a.ip().is_loopback()) && !allowed.is_empty(), "{allowed:?}");
        assert!(resolve("localhost").await.is_ok(), "a host the list names");
    }

    #[test]
    fn public_addresses_pass() {
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1"] {
            assert_eq!(blocked(ip.parse().unwrap()), None, "{ip}");
        }
    }
}
