//! Who hears of whom: a peer's [`Interest`] (the roles whose presence it wants, from `register`'s
//! `subscribe` or its role's default) and the rule that presence goes only to the peers that want
//! it. Before this rule every join, leave and metadata change went to every peer of the room, so
//! a room of n peers cost O(n²) frames to fill and an O(n) `registered_auth` per registration.

use crate::signal::{ErrorCode, SignalError};

/// Most roles one `subscribe` may name.
pub const MAX_SUBSCRIBE_ROLES: usize = 16;

/// Whose presence a peer is told: `peer_joined`, `peer_left` and `metadata_updated` of the other
/// peers, and which peers `registered_auth` lists in `peer_list` and `peer_metadata`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Interest {
    /// No one (a worker: clients find it, it never looks for anyone).
    #[default]
    Nobody,
    /// Every peer, whatever its role.
    Everyone,
    /// Peers of these roles (sorted, no duplicates, never empty).
    Roles(Vec<String>),
}

impl Interest {
    /// The interest a `register` asks for: its `subscribe` when present (`"*"` anywhere means
    /// every role), else its role's default. The defaults keep what each kind of peer uses:
    /// upstream's clients and GUI find workers with `discover_peers` and never read presence;
    /// our dashboard follows workers only; a worker follows no one (upstream's server pushed
    /// nothing, and its worker reads `registered_auth.peer_list` only to seed a mesh whose admin
    /// it also learns from `admin_peer_id` and `admin_conflict`, which are unchanged). Any other
    /// role keeps everyone, as every peer had before `subscribe` existed.
    pub fn for_register(
        subscribe: Option<&[String]>,
        role: &str,
        max_role_len: usize,
    ) -> Result<Interest, SignalError> {
        let Some(roles) = subscribe else {
            return Ok(match role {
                "worker" => Interest::Nobody,
                "client" | "dashboard" => Interest::Roles(vec!["worker".to_owned()]),
                _ => Interest::Everyone,
            });
        };
        if roles.len() > MAX_SUBSCRIBE_ROLES || roles.iter().any(|r| r.is_empty() || r.len() > max_role_len) {
            return Err(SignalError::new(
                ErrorCode::InvalidMessage,
                format!(
                    "subscribe must list at most {MAX_SUBSCRIBE_ROLES} roles of 1 to {max_role_len} bytes (\"*\" for all)"
                ),
            ));
        }
        if roles.iter().any(|r| r == "*") {
            return Ok(Interest::Everyone);
        }
        let mut roles = roles.to_vec();
        roles.sort_unstable();
        roles.dedup();
        Ok(if roles.is_empty() { Interest::Nobody } else { Interest::Roles(roles) })
    }

    /// Whether a peer with this interest hears of a peer of `role`.
    pub fn wants(&self, role: &str) -> bool {
        match self {
            Interest::Nobody => false,
            Interest::Everyone => true,
            Interest::Roles(r) => r.iter().any(|x| x == role),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn defaults_by_role_and_explicit_subscriptions() {
        let d = |role| Interest::for_register(None, role, 64).unwrap();
        assert_eq!(d("worker"), Interest::Nobody);
        assert_eq!(d("client"), Interest::Roles(roles(&["worker"])));
        assert_eq!(d("dashboard"), Interest::Roles(roles(&["worker"])));
        assert_eq!(d("peer"), Interest::Everyone);
        assert_eq!(d("anything-else"), Interest::Everyone);
        let s = |sub: &[&str], role| Interest::for_register(Some(&roles(sub)), role, 64);
        assert_eq!(s(&[], "client").unwrap(), Interest::Nobody);
        assert_eq!(s(&["worker"], "worker").unwrap(), Interest::Roles(roles(&["worker"])));
        assert_eq!(s(&["worker", "client", "worker"], "peer").unwrap(), Interest::Roles(roles(&["client", "worker"])));
        assert_eq!(s(&["worker", "*"], "worker").unwrap(), Interest::Everyone);
        assert!(s(&[""], "client").is_err());
        assert!(s(&[&"x".repeat(65)], "client").is_err());
        let many: Vec<String> = (0..=MAX_SUBSCRIBE_ROLES).map(|i| format!("r{i}")).collect();
        assert!(Interest::for_register(Some(&many), "client", 64).is_err());
        let i = s(&["worker", "dashboard"], "client").unwrap();
        assert!(i.wants("worker") && i.wants("dashboard") && !i.wants("client"));
        assert!(Interest::Everyone.wants("x") && !Interest::Nobody.wants("worker"));
    }
}
