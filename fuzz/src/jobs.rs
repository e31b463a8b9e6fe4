//! Job specs.

use super::*;

/// A `job_submit` spec from a client, through parsing, validation, path mappings and the path
/// checks the worker makes before touching the file system.
pub fn job_spec(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    check_path_ref(&text);
    let Ok(v) = serde_json::from_slice::<Value>(data) else { return };
    match job::parse_spec(&v) {
        Ok(spec) => {
            let _ = job::validate(&spec);
            let again = serde_json::to_value(&spec).expect("spec serializes");
            assert_eq!(job::parse_spec(&again).as_ref().ok(), Some(&spec), "spec does not round-trip");
            let mapped = spec.mapped();
            let _ = job::check_paths(&mapped, |r| {
                check_ref(&r);
                PathVerdict::Ok
            });
        }
        Err(errors) => assert!(!errors.is_empty(), "rejection without a reason"),
    }
}

fn check_path_ref(p: &str) {
    if let Ok(r) = job::classify_path(p) {
        check_ref(&r);
    }
}

fn check_ref(r: &PathRef<'_>) {
    match r {
        PathRef::Upload(p) => assert_confined(p),
        PathRef::Worker(p) => {
            assert!(p.starts_with('/') && !p.contains('\0'), "worker path {p:?}");
            assert!(!Path::new(p).components().any(|c| c == Component::ParentDir), "worker path {p:?} has '..'");
        }
        PathRef::Model(id) => {
            registry::check_name("model id", id).expect("model ref passes the registry's name check");
            assert_confined(id);
        }
    }
}
