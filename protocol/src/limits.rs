//! Hard bounds of the protocol. Servers may configure tighter limits; no
//! peer may exceed these.

/// Largest frame the protocol allows (1 MiB). Servers default to far less
/// (see [`DEFAULT_MAX_FRAME_LEN`]); this cap exists so that a
/// misconfigured peer can never be made to allocate more than this for one
/// frame.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;

/// Default maximum frame size (64 KiB): comfortably above the largest text
/// message plus envelope, and the size of one photo chunk.
pub const DEFAULT_MAX_FRAME_LEN: usize = 64 * 1024;

/// Default maximum text length in bytes (UTF-8). Messenger allows roughly
/// 20,000 characters; 16 KiB of UTF-8 covers ordinary use.
pub const DEFAULT_MAX_TEXT_LEN: usize = 16 * 1024;

/// Longest idempotency key a client may choose.
pub const MAX_CLIENT_MSG_ID_LEN: usize = 64;

/// Largest history or conversation page the server returns.
pub const MAX_PAGE_SIZE: u32 = 200;

/// Most friends a server may allow a user. A user's friends, the requests
/// they sent and the requests waiting for their answer are each bounded by
/// the server's `max-friends`, so at this many the friend list reply (at
/// most ~47 bytes an entry) stays well inside [`MAX_FRAME_LEN`] even when
/// racing requests take a list a little over.
pub const MAX_FRIENDS: u64 = 5_000;

/// Most users one user may block: the blocked list rides in the friend
/// list reply (about 47 bytes an entry), beside lists of up to
/// [`MAX_FRIENDS`] each.
pub const MAX_BLOCKED: u64 = 1_000;

/// User names: length bounds in bytes (ASCII only).
pub const USERNAME_LEN: std::ops::RangeInclusive<usize> = 3..=32;

/// Passwords: length bounds in bytes.
pub const PASSWORD_LEN: std::ops::RangeInclusive<usize> = 8..=128;

/// Shortest heartbeat interval: clients heartbeat at most this often
/// whatever a server asks (a server asking every millisecond would make a
/// client queue a thousand frames a second once it stopped reading), so a
/// server must not ask for less or its online window would run out
/// between two heartbeats.
pub const MIN_HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Unread counts are counted up to this; a longer backlog reads as this
/// (apps show "999+"). Counting further would read every unread message of
/// a busy muted group for each conversation list page.
pub const MAX_UNREAD_COUNT: u64 = 1_000;

/// A typing client repeats `Typing { typing: true }` this often while the
/// user goes on typing.
pub const TYPING_REPEAT_MS: u64 = 3_000;

/// A member shows as typing for this long after their latest
/// `TypingUpdate`, unless another one, or a message (not a reaction, an
/// edit nor an unsend) from them, comes first:
/// twice the repeat, so one lost repeat does not blink it off.
pub const TYPING_LAPSE_MS: u64 = 6_000;

/// Longest reaction (a REACTION message's text), in bytes: room for the
/// longest emoji sequences in use (a family of four with skin tones, joined
/// by zero-width joiners, is 41 bytes; flags of subdivisions 28).
pub const MAX_REACTION_LEN: usize = 64;

/// Whether `text` may be a REACTION's: empty (taking one's reaction back),
/// or an emoji-sized token, at most [`MAX_REACTION_LEN`] bytes with no
/// whitespace, control or invisible formatting character (bidirectional
/// controls, zero-width spaces and non-joiners, word joiners, the byte
/// order mark, the soft hyphen) nor the blank fillers people paste as
/// "empty" (Hangul fillers, the Braille blank, the grapheme joiner). Which
/// emoji it is, apps judge: an emoji's zero-width joiners (U+200D),
/// variation selectors and tag characters pass, and so does "lol".
pub fn is_reaction(text: &str) -> bool {
    let invisible = |c: char| {
        matches!(
            c,
            '\u{00ad}'
                | '\u{061c}'
                | '\u{180e}'
                | '\u{200b}'
                | '\u{200c}'
                | '\u{200e}'..='\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2060}'..='\u{206f}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
                | '\u{034f}'
                | '\u{115f}'
                | '\u{1160}'
                | '\u{2800}'
                | '\u{3164}'
                | '\u{ffa0}'
        )
    };
    text.len() <= MAX_REACTION_LEN
        && !text
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || invisible(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reactions_are_emoji_sized_tokens() {
        for ok in ["", "👍", "❤️", "👨🏻‍👩🏻‍👧🏻‍👦🏻", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "lol"]
        {
            assert!(is_reaction(ok), "{ok:?}");
        }
        let long = "👍".repeat(MAX_REACTION_LEN / 4 + 1);
        for bad in [
            "a b",
            "👍\n",
            "\t",
            "\u{202e}👍",
            "👍\u{2066}",
            "\u{0}",
            "\u{200b}",
            "\u{feff}",
            "\u{ad}",
            "\u{3164}",
            "\u{2800}",
            long.as_str(),
        ] {
            assert!(!is_reaction(bad), "{bad:?}");
        }
    }
}
