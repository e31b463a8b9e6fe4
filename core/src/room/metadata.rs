//! What peers say about themselves: peer ids, metadata (its reserved keys, shape and size, and
//! how an update merges), and the filters of `discover_peers`.

use serde_json::Value;

use super::PeerEntry;
use crate::signal::{ErrorCode, Filters, Object, SignalError};

/// Peer ids: 1..=max bytes of ASCII letters, digits and `-_.:@`.
pub fn validate_peer_id(id: &str, max: usize) -> Result<(), SignalError> {
    let ok = !id.is_empty()
        && id.len() <= max
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(SignalError::new(
            ErrorCode::InvalidPeerId,
            format!("peer_id must be 1 to {max} characters of letters, digits and - _ . : @"),
        ))
    }
}

pub(super) fn validate_metadata(m: &Object, max_bytes: usize) -> Result<(), SignalError> {
    let reserved = |o: &Object| o.keys().find(|k| k.starts_with('_')).cloned();
    if let Some(k) = reserved(m) {
        return Err(SignalError::new(
            ErrorCode::ReservedMetadataKey,
            format!("metadata key '{k}' is reserved for the server (keys starting with '_')"),
        ));
    }
    match m.get("tags") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {}
        Some(_) => return Err(SignalError::new(ErrorCode::InvalidMessage, "metadata.tags must be a list of strings")),
    }
    match m.get("properties") {
        None | Some(Value::Null) => {}
        Some(Value::Object(p)) => {
            if let Some(k) = reserved(p) {
                return Err(SignalError::new(
                    ErrorCode::ReservedMetadataKey,
                    format!("metadata property '{k}' is reserved for the server (keys starting with '_')"),
                ));
            }
        }
        Some(_) => return Err(SignalError::new(ErrorCode::InvalidMessage, "metadata.properties must be an object")),
    }
    let size = serde_json::to_string(m).map(|s| s.len()).unwrap_or(usize::MAX);
    if size > max_bytes {
        return Err(SignalError::new(
            ErrorCode::MetadataTooLarge,
            format!("metadata of {size} bytes exceeds the limit of {max_bytes} bytes"),
        ));
    }
    Ok(())
}

/// Upstream semantics, minus its data loss (B19): `tags` are unioned, `properties` shallow-merged
/// (a `null` property deletes it), other keys replaced (a `null` deletes); omitted keys are kept.
pub fn merge_metadata(old: &Object, update: Object) -> Object {
    let mut out = old.clone();
    for (k, v) in update {
        match (k.as_str(), v) {
            ("tags", Value::Array(new)) => {
                let mut tags = match out.remove("tags") {
                    Some(Value::Array(a)) => a,
                    _ => Vec::new(),
                };
                for t in new {
                    if !tags.contains(&t) {
                        tags.push(t);
                    }
                }
                out.insert(k, Value::Array(tags));
            }
            ("properties", Value::Object(new)) => {
                let mut props = match out.remove("properties") {
                    Some(Value::Object(p)) => p,
                    _ => Object::new(),
                };
                for (pk, pv) in new {
                    if pv.is_null() {
                        props.remove(&pk);
                    } else {
                        props.insert(pk, pv);
                    }
                }
                out.insert(k, Value::Object(props));
            }
            (_, Value::Null) => {
                out.remove(&k);
            }
            (_, v) => {
                out.insert(k, v);
            }
        }
    }
    out
}

const OPERATORS: [&str; 3] = ["$eq", "$gte", "$lte"];

fn is_operator_object(v: &Value) -> Option<&Object> {
    match v {
        Value::Object(o) if !o.is_empty() && o.keys().any(|k| k.starts_with('$')) => Some(o),
        _ => None,
    }
}

pub(super) fn validate_filters(f: &Filters) -> Result<(), SignalError> {
    for (k, cond) in f.properties.iter().flatten() {
        if let Some(ops) = is_operator_object(cond) {
            if let Some(bad) = ops.keys().find(|op| !OPERATORS.contains(&op.as_str())) {
                return Err(SignalError::new(
                    ErrorCode::InvalidMessage,
                    format!("filter on '{k}': unsupported operator '{bad}' (use $eq, $gte, $lte)"),
                ));
            }
        }
    }
    Ok(())
}

fn compare(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// Discovery filter: role equal; tags any-of; properties equal or `$eq`/`$gte`/`$lte`. A missing
/// or incomparable value (number vs string) simply does not match: it never errors (B17).
pub(super) fn matches(f: &Filters, p: &PeerEntry) -> bool {
    if f.role.as_ref().is_some_and(|r| *r != p.role) {
        return false;
    }
    if let Some(want) = f.tags.as_ref().filter(|t| !t.is_empty()) {
        let have = p.metadata.get("tags").and_then(Value::as_array);
        let any = have.is_some_and(|h| h.iter().any(|t| t.as_str().is_some_and(|t| want.iter().any(|w| w == t))));
        if !any {
            return false;
        }
    }
    let props = p.metadata.get("properties").and_then(Value::as_object);
    for (k, cond) in f.properties.iter().flatten() {
        let Some(v) = props.and_then(|p| p.get(k)) else { return false };
        let ok = match is_operator_object(cond) {
            Some(ops) => ops.iter().all(|(op, x)| match op.as_str() {
                "$eq" => v == x,
                "$gte" => compare(v, x).is_some_and(|o| o.is_ge()),
                "$lte" => compare(v, x).is_some_and(|o| o.is_le()),
                _ => false,
            }),
            None => v == cond,
        };
        if !ok {
            return false;
        }
    }
    true
}
