//! Names that travel through the whole system as distinct types, so a key
//! id is never passed where a backend id belongs. On the wire each is a
//! plain string (`serde(transparent)`).

use std::borrow::Borrow;
use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(id: impl Into<String>) -> Self {
                $name(id.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        /// As the string itself, so messages read `backend "x"`.
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        /// Maps keyed by id are looked up with a `&str` from the wire.
        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                $name(id.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                $name(id)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

id_type! {
    /// Names a backend (one upstream server): in metrics, logs, status and
    /// sticky hashing.
    BackendId
}

id_type! {
    /// Names an API key; safe to log and to put in metrics (never the key).
    KeyId
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_a_plain_string_on_the_wire() {
        let id = BackendId::new("ai/vllm/10.0.0.7");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"ai/vllm/10.0.0.7\"");
        let back: KeyId = serde_json::from_str("\"team-a\"").unwrap();
        assert_eq!(back, "team-a");
        let map: std::collections::HashMap<BackendId, u8> = [(id.clone(), 1)].into();
        assert_eq!(map.get("ai/vllm/10.0.0.7"), Some(&1));
    }
}
