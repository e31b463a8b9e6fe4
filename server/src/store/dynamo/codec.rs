//! Items to and from the store's types, and the SDK's errors to ours.

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::AttributeValue;

use super::Item;
use crate::store::{
    AccountKey, Invite, Membership, PublicKey, ROOM_GRACE_SECS, Result, Role, Room, StoreError, User, WorkerToken,
};

pub(super) fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// The service's error code, if the call reached the service.
pub(super) fn code<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> Option<&str> {
    e.as_service_error().and_then(|s| s.code())
}

pub(super) fn sdk_err<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    e: SdkError<E, R>,
) -> StoreError {
    let detail = match e.as_service_error() {
        Some(s) => format!("{}: {}", s.code().unwrap_or("error"), s.message().unwrap_or_default()),
        None => format!("{}", aws_sdk_dynamodb::error::DisplayErrorContext(&e)),
    };
    StoreError::Backend(detail)
}

pub(super) fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

pub(super) fn n(v: i64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

pub(super) fn get_s(item: &Item, k: &str) -> Result<String> {
    match item.get(k) {
        Some(AttributeValue::S(v)) => Ok(v.clone()),
        _ => Err(StoreError::Backend(format!("item lacks string attribute {k}"))),
    }
}

pub(super) fn get_opt_s(item: &Item, k: &str) -> Option<String> {
    match item.get(k) {
        Some(AttributeValue::S(v)) => Some(v.clone()),
        _ => None,
    }
}

pub(super) fn get_opt_n(item: &Item, k: &str) -> Result<Option<i64>> {
    match item.get(k) {
        Some(AttributeValue::N(v)) => {
            v.parse().map(Some).map_err(|_| StoreError::Backend(format!("attribute {k} is not an integer: {v}")))
        }
        None | Some(AttributeValue::Null(_)) => Ok(None),
        Some(_) => Err(StoreError::Backend(format!("attribute {k} is not a number"))),
    }
}

pub(super) fn get_n(item: &Item, k: &str) -> Result<i64> {
    get_opt_n(item, k)?.ok_or_else(|| StoreError::Backend(format!("item lacks number attribute {k}")))
}

pub(super) fn put_opt_n(item: &mut Item, k: &str, v: Option<i64>) {
    if let Some(v) = v {
        item.insert(k.into(), n(v));
    }
}

pub(super) fn put_opt_s(item: &mut Item, k: &str, v: Option<&str>) {
    if let Some(v) = v {
        item.insert(k.into(), s(v));
    }
}

pub(super) fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// A passed TTL counts as deleted even before DynamoDB gets round to it.
pub(super) fn purged(item: &Item, now: i64) -> bool {
    get_opt_n(item, "purge_at").ok().flatten().is_some_and(|t| t <= now)
}

pub(super) fn user_from(i: &Item) -> Result<User> {
    Ok(User { id: get_s(i, "id")?, username: get_s(i, "username")?, created_at: get_n(i, "created_at")? })
}

pub(super) fn room_from(i: &Item) -> Result<Room> {
    Ok(Room {
        id: get_s(i, "id")?,
        name: get_s(i, "name")?,
        created_by: get_s(i, "created_by")?,
        token_hash: get_s(i, "token_hash")?,
        created_at: get_n(i, "created_at")?,
        expires_at: get_opt_n(i, "expires_at")?,
    })
}

pub(super) fn room_item(r: &Room) -> Item {
    let mut i = Item::from([
        ("id".into(), s(&r.id)),
        ("name".into(), s(&r.name)),
        ("created_by".into(), s(&r.created_by)),
        ("token_hash".into(), s(&r.token_hash)),
        ("created_at".into(), n(r.created_at)),
    ]);
    put_opt_n(&mut i, "expires_at", r.expires_at);
    put_opt_n(&mut i, "purge_at", r.expires_at.map(|t| t.saturating_add(ROOM_GRACE_SECS)));
    i
}

pub(super) fn member_from(i: &Item) -> Result<Membership> {
    Ok(Membership {
        user_id: get_s(i, "user_id")?,
        room_id: get_s(i, "room_id")?,
        role: if get_s(i, "role")? == "owner" { Role::Owner } else { Role::Member },
        invited_by: get_opt_s(i, "invited_by"),
        joined_at: get_n(i, "joined_at")?,
    })
}

pub(super) fn member_item(m: &Membership) -> Item {
    let mut i = Item::from([
        ("room_id".into(), s(&m.room_id)),
        ("user_id".into(), s(&m.user_id)),
        ("role".into(), s(m.role.as_str())),
        ("joined_at".into(), n(m.joined_at)),
    ]);
    put_opt_s(&mut i, "invited_by", m.invited_by.as_deref());
    i
}

pub(super) fn token_from(i: &Item) -> Result<WorkerToken> {
    Ok(WorkerToken {
        id: get_s(i, "id")?,
        secret_hash: get_s(i, "secret_hash")?,
        user_id: get_s(i, "user_id")?,
        room_id: get_s(i, "room_id")?,
        worker_name: get_s(i, "worker_name")?,
        created_at: get_n(i, "created_at")?,
        expires_at: get_opt_n(i, "expires_at")?,
        revoked_at: get_opt_n(i, "revoked_at")?,
    })
}

pub(super) fn token_item(t: &WorkerToken) -> Item {
    let mut i = Item::from([
        ("id".into(), s(&t.id)),
        ("secret_hash".into(), s(&t.secret_hash)),
        ("user_id".into(), s(&t.user_id)),
        ("room_id".into(), s(&t.room_id)),
        ("worker_name".into(), s(&t.worker_name)),
        ("created_at".into(), n(t.created_at)),
    ]);
    put_opt_n(&mut i, "expires_at", t.expires_at);
    put_opt_n(&mut i, "revoked_at", t.revoked_at);
    i
}

pub(super) fn key_from(i: &Item) -> Result<AccountKey> {
    Ok(AccountKey {
        id: get_s(i, "id")?,
        secret_hash: get_s(i, "secret_hash")?,
        user_id: get_s(i, "user_id")?,
        name: get_s(i, "name")?,
        created_at: get_n(i, "created_at")?,
        expires_at: get_opt_n(i, "expires_at")?,
    })
}

pub(super) fn key_item(k: &AccountKey) -> Item {
    let mut i = Item::from([
        ("user_id".into(), s(&k.user_id)),
        ("id".into(), s(&k.id)),
        ("secret_hash".into(), s(&k.secret_hash)),
        ("name".into(), s(&k.name)),
        ("created_at".into(), n(k.created_at)),
    ]);
    put_opt_n(&mut i, "expires_at", k.expires_at);
    i
}

pub(super) fn invite_from(i: &Item) -> Result<Invite> {
    Ok(Invite {
        code_hash: get_s(i, "code_hash")?,
        room_id: get_s(i, "room_id")?,
        created_by: get_s(i, "created_by")?,
        expires_at: get_n(i, "expires_at")?,
    })
}

/// The item holding all of a user's public keys.
pub(super) fn key_owner_id(user_id: &str) -> String {
    format!("u#{user_id}")
}

/// The item that claims a public key for one user (keys are unique among users).
pub(super) fn key_claim_id(public_key: &str) -> String {
    format!("k#{public_key}")
}

/// A user's key item: its version (0 when there is none yet) and its keys.
pub(super) fn public_keys_from(item: Option<&Item>, user_id: &str) -> Result<(i64, Vec<PublicKey>)> {
    let Some(i) = item else { return Ok((0, Vec::new())) };
    let version = get_n(i, "version")?;
    let mut keys = Vec::new();
    if let Some(AttributeValue::M(m)) = i.get("keys") {
        for (id, v) in m {
            let AttributeValue::M(k) = v else {
                return Err(StoreError::Backend(format!("public key {id} is not a map")));
            };
            keys.push(PublicKey {
                id: id.clone(),
                user_id: user_id.to_owned(),
                public_key: get_s(k, "public_key")?,
                device_name: get_s(k, "device_name")?,
                created_at: get_n(k, "created_at")?,
            });
        }
    }
    Ok((version, keys))
}

pub(super) fn public_keys_item(user_id: &str, version: i64, keys: &[PublicKey]) -> Item {
    let map = keys
        .iter()
        .map(|k| {
            let entry = Item::from([
                ("public_key".into(), s(&k.public_key)),
                ("device_name".into(), s(&k.device_name)),
                ("created_at".into(), n(k.created_at)),
            ]);
            (k.id.clone(), AttributeValue::M(entry))
        })
        .collect();
    Item::from([
        ("id".into(), s(&key_owner_id(user_id))),
        ("user_id".into(), s(user_id)),
        ("version".into(), n(version)),
        ("keys".into(), AttributeValue::M(map)),
    ])
}

/// Newest first, then by id, as [`Store::list_public_keys`] promises.
pub(super) fn newest_first(keys: &mut [PublicKey]) {
    keys.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| a.id.cmp(&b.id)));
}

pub(super) fn k1(name: &str, v: &str) -> Item {
    Item::from([(name.to_owned(), s(v))])
}

pub(super) fn k2(a: &str, av: &str, b: &str, bv: &str) -> Item {
    Item::from([(a.to_owned(), s(av)), (b.to_owned(), s(bv))])
}
