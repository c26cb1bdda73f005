//! Photos: media ids, the formats a server takes and how each is
//! recognised, and the bounds of an upload. Pure functions, shared so that
//! a client refuses what a server would refuse before sending any bytes.

use crate::proto::MediaType;

/// Length of a media id: 32 lowercase hex digits (128 random bits).
pub const MEDIA_ID_LEN: usize = 32;

/// Largest width or height a photo may declare, in pixels.
pub const MAX_PHOTO_DIMENSION: u32 = 65_535;

/// Largest photo the protocol allows (64 MiB). Servers default to far less
/// ([`DEFAULT_MAX_PHOTO_BYTES`]).
pub const MAX_PHOTO_BYTES: u64 = 64 * 1024 * 1024;

/// Default largest photo a server takes (16 MiB): a phone camera's JPEG or
/// HEIC at full resolution is 2-8 MB; apps usually send less.
pub const DEFAULT_MAX_PHOTO_BYTES: u64 = 16 * 1024 * 1024;

/// Bytes of a photo's start that [`MediaType::matches`] looks at: no
/// format needs more. A server checks them once it has this many (or the
/// whole photo, if smaller), across chunks.
pub const SIGNATURE_LEN: usize = 12;

/// Length of a SHA-256 digest.
pub const SHA256_LEN: usize = 32;

/// Largest preview an upload may carry (`MediaUpload.preview`); a server
/// also holds it to its text limit, since a photo's caption and preview
/// together must fit in that.
pub const MAX_PREVIEW_BYTES: usize = 4096;

/// The formats a photo, or its preview, may have.
pub const FORMATS: [MediaType; 4] = [
    MediaType::Jpeg,
    MediaType::Png,
    MediaType::Webp,
    MediaType::Heic,
];

/// Checks an upload's preview as a server does: none (empty), or at most
/// [`MAX_PREVIEW_BYTES`] and `max_text_len` bytes that begin as one of the
/// [`FORMATS`]. The error says why, for a MEDIA_REJECTED refusal.
pub fn check_preview(preview: &[u8], max_text_len: usize) -> Result<(), String> {
    if preview.is_empty() {
        return Ok(());
    }
    let max = MAX_PREVIEW_BYTES.min(max_text_len);
    if preview.len() > max {
        return Err(format!(
            "the preview is {} bytes; the limit is {max}",
            preview.len()
        ));
    }
    let start = &preview[..preview.len().min(SIGNATURE_LEN)];
    if !FORMATS.iter().any(|format| format.matches(start)) {
        return Err("the preview is not a JPEG, PNG, WebP or HEIC image".into());
    }
    Ok(())
}

/// Whether `id` is shaped like a media id (32 lowercase hex digits). A
/// server uses the id as a file name, so nothing else is ever looked up.
pub fn is_media_id(id: &str) -> bool {
    id.len() == MEDIA_ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl MediaType {
    /// The type for a raw wire value; `None` for unspecified and unknown
    /// values.
    pub fn from_wire(value: i32) -> Option<Self> {
        match MediaType::try_from(value) {
            Ok(MediaType::Unspecified) | Err(_) => None,
            Ok(kind) => Some(kind),
        }
    }

    /// The MIME type, for apps and HTTP front ends.
    pub fn mime(self) -> &'static str {
        match self {
            MediaType::Unspecified => "application/octet-stream",
            MediaType::Jpeg => "image/jpeg",
            MediaType::Png => "image/png",
            MediaType::Webp => "image/webp",
            MediaType::Heic => "image/heic",
        }
    }

    /// Whether `start`, the first bytes of a file (at least
    /// [`SIGNATURE_LEN`] of them, or the whole file), begins as this format
    /// does. Checks the signature only; the image is not decoded.
    pub fn matches(self, start: &[u8]) -> bool {
        match self {
            MediaType::Unspecified => false,
            // Start of image, then the marker of the next segment.
            MediaType::Jpeg => start.starts_with(&[0xff, 0xd8, 0xff]),
            MediaType::Png => start.starts_with(b"\x89PNG\r\n\x1a\n"),
            // A RIFF container of WEBP data.
            MediaType::Webp => {
                start.len() >= 12 && start.starts_with(b"RIFF") && &start[8..12] == b"WEBP"
            }
            // An ISO base media file whose first box is `ftyp` with a HEIF
            // brand for images.
            MediaType::Heic => {
                start.len() >= 12
                    && &start[4..8] == b"ftyp"
                    && matches!(
                        &start[8..12],
                        b"heic" | b"heix" | b"heim" | b"heis" | b"mif1" | b"msf1"
                    )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_ids_are_32_lowercase_hex_digits() {
        assert!(is_media_id("0123456789abcdef0123456789abcdef"));
        assert!(!is_media_id("0123456789ABCDEF0123456789abcdef"));
        assert!(!is_media_id("0123456789abcdef0123456789abcde"));
        assert!(!is_media_id("../../../../etc/passwd/0123456789"));
        assert!(!is_media_id(""));
    }

    #[test]
    fn signatures_are_recognised_and_told_apart() {
        let jpeg = [
            0xff, 0xd8, 0xff, 0xe0, 0, 0x10, b'J', b'F', b'I', b'F', 0, 1,
        ];
        let png = *b"\x89PNG\r\n\x1a\n\0\0\0\x0d";
        let webp = *b"RIFF\x24\0\0\0WEBPVP8 ";
        let heic = *b"\0\0\0\x18ftypheic";
        let samples = [
            (MediaType::Jpeg, &jpeg[..]),
            (MediaType::Png, &png[..]),
            (MediaType::Webp, &webp[..]),
            (MediaType::Heic, &heic[..]),
        ];
        for (kind, bytes) in samples {
            for (other, _) in samples {
                assert_eq!(other.matches(bytes), other == kind, "{other:?} on {kind:?}");
            }
            assert!(!kind.matches(&bytes[..2]), "{kind:?} on too few bytes");
            assert!(!MediaType::Unspecified.matches(bytes));
        }
        assert!(!MediaType::Webp.matches(b"RIFF\x24\0\0\0WAVEfmt "));
        assert!(!MediaType::Heic.matches(b"\0\0\0\x18ftypisom"));
        assert_eq!(MediaType::from_wire(1), Some(MediaType::Jpeg));
        assert_eq!(MediaType::from_wire(0), None);
        assert_eq!(MediaType::from_wire(99), None);
    }

    #[test]
    fn previews_are_small_images_or_none() {
        let jpeg = |len: usize| {
            let mut bytes = vec![0xff, 0xd8, 0xff, 0xe0];
            bytes.resize(len, 7);
            bytes
        };
        assert_eq!(check_preview(&[], 16_384), Ok(()));
        assert_eq!(check_preview(&jpeg(MAX_PREVIEW_BYTES), 16_384), Ok(()));
        assert_eq!(check_preview(b"\x89PNG\r\n\x1a\n", 16_384), Ok(()));
        assert_eq!(
            check_preview(&jpeg(MAX_PREVIEW_BYTES + 1), 16_384),
            Err("the preview is 4097 bytes; the limit is 4096".into())
        );
        // Held to the server's text limit too, when that is smaller.
        assert_eq!(check_preview(&jpeg(1000), 1000), Ok(()));
        assert_eq!(
            check_preview(&jpeg(1001), 1000),
            Err("the preview is 1001 bytes; the limit is 1000".into())
        );
        assert_eq!(
            check_preview(b"GIF89a\x01\0\x01\0\0\0", 16_384),
            Err("the preview is not a JPEG, PNG, WebP or HEIC image".into())
        );
        assert!(
            check_preview(&[0xff, 0xd8], 16_384).is_err(),
            "too short to tell"
        );
    }
}
