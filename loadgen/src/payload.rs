//! The header each load-generator message carries in its text, so the
//! receiving virtual user can tell which send it is and when it was meant
//! to be sent.
//!
//! Format: `"{run}:{sender}:{send_no}:{intended_ns} "` followed by `x`
//! padding up to the text length. `run` is a random number per process, so
//! messages left over from an earlier run (delivered on resume) are
//! recognised and ignored. `intended_ns` counts from the process's clock
//! epoch; sender and receiver share the process, so it is comparable.

/// What a receiver learns from a message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Which run sent it.
    pub run: u32,
    /// Virtual user index of the sender.
    pub sender: usize,
    /// Process-wide send number.
    pub send_no: u64,
    /// Scheduled send time, nanoseconds since the clock epoch.
    pub intended_ns: u64,
}

/// The longest header: four numbers at their widest plus separators.
pub const MAX_HEADER_LEN: usize = 10 + 20 + 20 + 20 + 4;

impl Header {
    /// The message text: the header, padded with `x` to `len` bytes (or
    /// just the header if it is longer).
    pub fn encode(&self, len: usize) -> String {
        let mut text = format!(
            "{}:{}:{}:{} ",
            self.run, self.sender, self.send_no, self.intended_ns
        );
        if text.len() < len {
            let pad = len - text.len();
            text.extend(std::iter::repeat_n('x', pad));
        }
        text
    }

    /// Parses a message text; `None` if it is not a load-generator message.
    pub fn parse(text: &str) -> Option<Header> {
        let head = text.split(' ').next()?;
        let mut parts = head.split(':');
        let header = Header {
            run: parts.next()?.parse().ok()?,
            sender: parts.next()?.parse().ok()?,
            send_no: parts.next()?.parse().ok()?,
            intended_ns: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_padding() {
        let h = Header {
            run: 77,
            sender: 3,
            send_no: 12,
            intended_ns: 4_000_000_123,
        };
        let text = h.encode(128);
        assert_eq!(text.len(), 128);
        assert!(text.starts_with("77:3:12:4000000123 xx"), "{text}");
        assert_eq!(Header::parse(&text), Some(h));
        let short = h.encode(4);
        assert_eq!(short, "77:3:12:4000000123 ");
        assert_eq!(Header::parse(&short), Some(h));
        let widest = Header {
            run: u32::MAX,
            sender: usize::MAX,
            send_no: u64::MAX,
            intended_ns: u64::MAX,
        };
        assert!(widest.encode(0).len() <= MAX_HEADER_LEN);
    }

    #[test]
    fn foreign_texts_are_not_headers() {
        for text in [
            "hello",
            "",
            "1:2:3",
            "1:2:3:4:5 x",
            "a:b:c:d x",
            "1:2:3:-4 ",
        ] {
            assert_eq!(Header::parse(text), None, "{text:?}");
        }
    }
}
