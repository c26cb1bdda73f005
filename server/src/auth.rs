//! Passwords and session tokens.
//!
//! * Passwords are hashed with Argon2id (OWASP's minimum parameters: 19 MiB,
//!   2 passes, 1 lane) into a PHC string with its own random salt. Hashing
//!   takes tens of milliseconds of CPU on purpose, so it runs on tokio's
//!   blocking pool, never on a runtime thread.
//! * A session token is 32 random bytes from the OS, given to the client as
//!   64 hex characters. The server stores only its SHA-256: a leaked
//!   database does not leak usable tokens, and a fast hash is enough
//!   because the token has 256 bits of entropy (no dictionary to try).
//!
//! Neither passwords nor tokens are ever logged.

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use chat_protocol::limits::{PASSWORD_LEN, USERNAME_LEN};
use sha2::{Digest, Sha256};

/// Bytes of randomness in a session token.
const TOKEN_BYTES: usize = 32;

/// Why credentials were refused before touching the store.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    /// The user name breaks the naming rules.
    #[error("username must be {min}-{max} characters of a-z, 0-9, '_', '.', '-'", min = USERNAME_LEN.start(), max = USERNAME_LEN.end())]
    BadUsername,
    /// The password is too short or too long.
    #[error("password must be {min}-{max} bytes", min = PASSWORD_LEN.start(), max = PASSWORD_LEN.end())]
    BadPassword,
}

/// User names are case-insensitive: this returns the canonical lower-case
/// form, or an error if the name is not allowed.
pub fn canonical_username(name: &str) -> Result<String, CredentialError> {
    let ok_len = USERNAME_LEN.contains(&name.len());
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok_len && ok_chars {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(CredentialError::BadUsername)
    }
}

/// Checks the password length rules.
pub fn check_password(password: &str) -> Result<(), CredentialError> {
    if PASSWORD_LEN.contains(&password.len()) {
        Ok(())
    } else {
        Err(CredentialError::BadPassword)
    }
}

fn hasher() -> Argon2<'static> {
    // Params::default() is OWASP's Argon2id recommendation (m=19456 KiB,
    // t=2, p=1). Spelled out so a dependency upgrade cannot weaken it
    // silently.
    let params = Params::new(19 * 1024, 2, 1, None).expect("valid Argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes a password into a PHC string (blocking, CPU heavy).
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    hasher()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Checks a password against a stored PHC string (blocking, CPU heavy).
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => hasher()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// A fresh random token (hex) and the hash to store.
pub fn new_token() -> (String, [u8; 32]) {
    let mut bytes = [0u8; TOKEN_BYTES];
    OsRng.fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    let hash = token_hash(&token);
    (token, hash)
}

/// The stored form of a token.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        assert_eq!(canonical_username("Alice_1.x-y").unwrap(), "alice_1.x-y");
        for bad in ["ab", "", "has space", "ünï", &"a".repeat(33), "semi;colon"] {
            assert_eq!(
                canonical_username(bad),
                Err(CredentialError::BadUsername),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn passwords() {
        assert!(check_password("12345678").is_ok());
        assert_eq!(check_password("1234567"), Err(CredentialError::BadPassword));
        assert_eq!(
            check_password(&"p".repeat(129)),
            Err(CredentialError::BadPassword)
        );
    }

    #[test]
    fn hash_and_verify() {
        let phc = hash_password("correct horse battery").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(!phc.contains("correct horse"));
        assert!(verify_password("correct horse battery", &phc));
        assert!(!verify_password("wrong horse battery", &phc));
        assert!(!verify_password(
            "correct horse battery",
            "not a phc string"
        ));
        // Salted: the same password hashes differently.
        assert_ne!(phc, hash_password("correct horse battery").unwrap());
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let (t1, h1) = new_token();
        let (t2, h2) = new_token();
        assert_eq!(t1.len(), 64);
        assert_ne!(t1, t2);
        assert_ne!(h1, h2);
        assert_eq!(token_hash(&t1), h1);
    }
}
