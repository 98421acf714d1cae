//! flannel's JSON read the way Go's encoding/json reads it (network config and lease values).

use serde_json::{Map, Value};

/// Case-insensitive key lookup, as Go's encoding/json does for flannel.
pub(crate) fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}
