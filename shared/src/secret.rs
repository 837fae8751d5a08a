//! [`Secret`]: a configuration string that never prints.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// A secret string (a key in hex, a password). `Debug` and `Display` print
/// `[redacted]`; the memory is zeroed on drop; it deserializes from a plain
/// string and deliberately does not serialize. Read it with
/// [`expose`](Secret::expose).
#[derive(Clone, Default, Zeroize, ZeroizeOnDrop)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret value. Keep the borrow short; do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn expose_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret(value.to_owned())
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret::from(s))
    }
}

/// Constant-time in the contents (the length may leak).
impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for Secret {}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_and_deserializes_from_a_string() {
        let s: Secret = serde_json::from_str("\"hunter2\"").unwrap();
        assert_eq!(s.expose(), "hunter2");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(format!("{s:?}"), "[redacted]");
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Cfg {
            key: Secret,
        }
        let cfg: Cfg = serde_json::from_str(r#"{"key":"abc"}"#).unwrap();
        assert!(!format!("{cfg:?}").contains("abc"));
        assert_eq!(Secret::from("abc"), cfg.key);
        assert_ne!(Secret::from("abd"), cfg.key);
        assert!(Secret::default().is_empty());
    }
}
