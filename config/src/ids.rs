//! Names that travel through the whole system as distinct types, so a key
//! id is never passed where a backend id belongs. On the wire each is a
//! plain string.
//!
//! An id is an `Arc<str>`: the table, metrics, usage and every answer record
//! share one copy, and a clone is a reference-count increment (an answer
//! record keeps its backend and key ids for an hour; a `String` each would
//! be most of the record).

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn new(id: impl Into<Arc<str>>) -> Self {
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
                $name(id.into())
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                $name(id.into())
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }

        /// A plain string on the wire, as `String` was.
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d).map($name::from)
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
        let yaml: Vec<BackendId> = serde_yaml::from_str("[a, \"b\"]").unwrap();
        assert_eq!(yaml, vec![BackendId::new("a"), BackendId::new("b")]);
        assert!(serde_json::from_str::<KeyId>("7").is_err());
    }

    #[test]
    fn a_clone_shares_the_string() {
        let id = KeyId::new("team-a");
        let copy = id.clone();
        assert!(std::ptr::eq(id.as_str(), copy.as_str()));
    }
}
