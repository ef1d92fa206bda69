//! What the applications accept as an email address (orders' customers, notification users).

/// A plausible address: `user@domain.tld`, no whitespace, at most 254 characters.
pub fn valid_email(e: &str) -> bool {
    let Some((user, domain)) = e.split_once('@') else { return false };
    !user.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !e.contains(char::is_whitespace)
        && e.len() <= 254
}
