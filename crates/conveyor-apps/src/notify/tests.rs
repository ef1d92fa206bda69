//! The notifications' unit tests (the flow end to end is in `tests/apps`).

use super::quiet_until;

fn ms(s: &str) -> i64 {
    s.parse::<jiff::Timestamp>().unwrap().as_millisecond()
}

#[test]
fn quiet_hours_defer_to_their_end_in_the_users_time_zone() {
    // 23:30 in Paris (UTC+1 in November) is inside 22:00–07:00: deferred to 07:00 next day.
    assert_eq!(quiet_until(ms("2026-11-23T22:30:00Z"), "Europe/Paris", "22:00", "07:00"), Some(ms("2026-11-24T06:00:00Z")));
    // 06:59 Paris: still quiet, ends the same morning.
    assert_eq!(quiet_until(ms("2026-11-24T05:59:00Z"), "Europe/Paris", "22:00", "07:00"), Some(ms("2026-11-24T06:00:00Z")));
    assert_eq!(quiet_until(ms("2026-11-24T11:00:00Z"), "Europe/Paris", "22:00", "07:00"), None, "noon is not quiet");
    // A daytime window.
    assert_eq!(quiet_until(ms("2026-11-24T10:00:00Z"), "UTC", "09:00", "17:00"), Some(ms("2026-11-24T17:00:00Z")));
    assert_eq!(quiet_until(ms("2026-11-24T17:00:00Z"), "UTC", "09:00", "17:00"), None, "the end is not quiet");
    assert_eq!(quiet_until(ms("2026-11-24T10:00:00Z"), "Not/AZone", "09:00", "17:00"), None);
    assert_eq!(quiet_until(ms("2026-11-24T10:00:00Z"), "UTC", "25:00", "17:00"), None);
}
