//! Push registrations: what a device may give as its app id and push
//! token (`RegisterPush`). Shared so that a client refuses what a server
//! would.

/// Longest app id (a bundle id or package name with its platform).
pub const MAX_APP_ID_LEN: usize = 255;

/// Longest push token. APNs device tokens are 32 bytes (64 hex digits)
/// today and FCM registration tokens about 160 characters; both platforms
/// reserve the right to grow them, so this leaves room.
pub const MAX_PUSH_TOKEN_LEN: usize = 4096;

/// Why a registration is refused, or `None` if it is well formed. An
/// empty token (stop notifications) needs no app id. Both fields are
/// printable ASCII: they go into the push gateway's JSON and its logs.
pub fn check_registration(app_id: &str, token: &str) -> Option<&'static str> {
    if token.is_empty() {
        return None;
    }
    if token.len() > MAX_PUSH_TOKEN_LEN {
        return Some("push token longer than 4096 bytes");
    }
    if !printable(token) {
        return Some("push token must be printable ASCII");
    }
    if app_id.is_empty() || app_id.len() > MAX_APP_ID_LEN {
        return Some("app id must be 1-255 bytes");
    }
    if !printable(app_id) {
        return Some("app id must be printable ASCII");
    }
    None
}

fn printable(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_are_bounded_and_printable() {
        assert_eq!(check_registration("", ""), None, "stopping needs no app id");
        assert_eq!(check_registration("com.example.ios", "ab12"), None);
        let longest = "a".repeat(MAX_PUSH_TOKEN_LEN);
        assert_eq!(check_registration("app", &longest), None);
        assert!(check_registration("app", &format!("{longest}a")).is_some());
        assert!(check_registration("", "ab12").is_some());
        assert!(check_registration(&"x".repeat(MAX_APP_ID_LEN + 1), "ab12").is_some());
        assert!(check_registration("app", "ab 12").is_some());
        assert!(check_registration("app", "ab\u{0}12").is_some());
        assert!(check_registration("app\n", "ab12").is_some());
        assert!(check_registration("äpp", "ab12").is_some());
    }
}
