//! [`Store`] on DynamoDB (`--store dynamodb://PREFIX`), for running several server instances
//! against one managed database.
//!
//! Eight tables, all `PREFIX-<name>`, on-demand billing:
//!
//! | table | key | indexes | holds |
//! |---|---|---|---|
//! | `users` | `id` | | users |
//! | `rooms` | `id` | | rooms; `purge_at` (TTL) = `expires_at` + 7 days |
//! | `members` | `room_id`, `user_id` | `by_user` (`user_id`, `room_id`) | memberships |
//! | `tokens` | `id` | `by_user` (`user_id`), `by_room` (`room_id`) | worker tokens (hashed) |
//! | `keys` | `user_id`, `id` | | account keys (hashed) |
//! | `secrets` | `secret_hash` | | secret hash → the token or key it belongs to |
//! | `invites` | `code_hash` | `by_room` (`room_id`) | invites; `purge_at` (TTL) = `expires_at` |
//! | `pubkeys` | `id` | | users' Ed25519 public keys: `u#USER` holds all of a user's keys (a map and a version), `k#KEY` claims a key for its user |
//!
//! Why it looks like this: every request path is a `GetItem`, a `Query` on a key or an index
//! (paged to the end: a 1 MB page is not the whole answer, B21) or a `BatchGetItem`, never a
//! `Scan`. Lookups by secret go through `secrets` with strongly consistent reads, because a
//! worker registers with a token seconds after it was created and a global index is only
//! eventually consistent. Creates are conditional (`attribute_not_exists`) and multi-item
//! writes are transactions, so nothing is silently overwritten (B20). DynamoDB deletes items
//! whose TTL passed lazily (up to days later), so reads treat a passed `purge_at` as absent.
//! A user's public keys live in one item so that a room's keys are one `Query` of its members and
//! one `BatchGetItem` of their key items, and so the per-user cap is checked on the item a write
//! replaces (optimistic: its `version` is the condition, retried on a race).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, Delete, GlobalSecondaryIndex, KeySchemaElement, KeyType,
    KeysAndAttributes, Projection, ProjectionType, Put, ReturnValue, ScalarAttributeType, TableStatus,
    TimeToLiveSpecification, TransactWriteItem,
};

use super::{
    AccountKey, AddedKey, Invite, Membership, PublicKey, ROOM_GRACE_SECS, Result, Role, Room, Store, StoreError, User,
    WorkerToken,
};

/// DynamoDB's limit on items per transaction.
const MAX_TRANSACTION: usize = 100;
/// DynamoDB's limit on keys per BatchGetItem.
const MAX_BATCH_GET: usize = 100;
/// Attempts at a public-key write that lost a race with another write of the same user's keys.
const KEY_WRITE_ATTEMPTS: usize = 10;

type Item = HashMap<String, AttributeValue>;

/// Where the tables are: `dynamodb://PREFIX[?endpoint=URL&region=REGION]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamoUrl {
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
}

impl DynamoUrl {
    pub fn parse(s: &str) -> std::result::Result<DynamoUrl, String> {
        let rest = s.strip_prefix("dynamodb://").ok_or_else(|| format!("{s}: expected dynamodb://PREFIX"))?;
        let (prefix, query) = rest.split_once('?').unwrap_or((rest, ""));
        let prefix = prefix.trim_end_matches('/');
        // Table names allow [A-Za-z0-9_.-], 3 to 255 characters; ours add "-members" at most.
        if prefix.is_empty()
            || prefix.len() > 200
            || !prefix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            return Err(format!("{s}: the table prefix must be 1 to 200 characters of letters, digits, _ . -"));
        }
        let mut url = DynamoUrl { prefix: prefix.to_owned(), endpoint: None, region: None };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("endpoint", v)) if !v.is_empty() => url.endpoint = Some(v.to_owned()),
                Some(("region", v)) if !v.is_empty() => url.region = Some(v.to_owned()),
                _ => return Err(format!("{s}: unknown parameter {pair:?} (endpoint=URL, region=NAME)")),
            }
        }
        Ok(url)
    }
}

#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    prefix: String,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// The service's error code, if the call reached the service.
fn code<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> Option<&str> {
    e.as_service_error().and_then(|s| s.code())
}

fn sdk_err<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(e: SdkError<E, R>) -> StoreError {
    let detail = match e.as_service_error() {
        Some(s) => format!("{}: {}", s.code().unwrap_or("error"), s.message().unwrap_or_default()),
        None => format!("{}", aws_sdk_dynamodb::error::DisplayErrorContext(&e)),
    };
    StoreError::Backend(detail)
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

fn n(v: i64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn get_s(item: &Item, k: &str) -> Result<String> {
    match item.get(k) {
        Some(AttributeValue::S(v)) => Ok(v.clone()),
        _ => Err(StoreError::Backend(format!("item lacks string attribute {k}"))),
    }
}

fn get_opt_s(item: &Item, k: &str) -> Option<String> {
    match item.get(k) {
        Some(AttributeValue::S(v)) => Some(v.clone()),
        _ => None,
    }
}

fn get_opt_n(item: &Item, k: &str) -> Result<Option<i64>> {
    match item.get(k) {
        Some(AttributeValue::N(v)) => {
            v.parse().map(Some).map_err(|_| StoreError::Backend(format!("attribute {k} is not an integer: {v}")))
        }
        None | Some(AttributeValue::Null(_)) => Ok(None),
        Some(_) => Err(StoreError::Backend(format!("attribute {k} is not a number"))),
    }
}

fn get_n(item: &Item, k: &str) -> Result<i64> {
    get_opt_n(item, k)?.ok_or_else(|| StoreError::Backend(format!("item lacks number attribute {k}")))
}

fn put_opt_n(item: &mut Item, k: &str, v: Option<i64>) {
    if let Some(v) = v {
        item.insert(k.into(), n(v));
    }
}

fn put_opt_s(item: &mut Item, k: &str, v: Option<&str>) {
    if let Some(v) = v {
        item.insert(k.into(), s(v));
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// A passed TTL counts as deleted even before DynamoDB gets round to it.
fn purged(item: &Item, now: i64) -> bool {
    get_opt_n(item, "purge_at").ok().flatten().is_some_and(|t| t <= now)
}

fn user_from(i: &Item) -> Result<User> {
    Ok(User { id: get_s(i, "id")?, username: get_s(i, "username")?, created_at: get_n(i, "created_at")? })
}

fn room_from(i: &Item) -> Result<Room> {
    Ok(Room {
        id: get_s(i, "id")?,
        name: get_s(i, "name")?,
        created_by: get_s(i, "created_by")?,
        token_hash: get_s(i, "token_hash")?,
        created_at: get_n(i, "created_at")?,
        expires_at: get_opt_n(i, "expires_at")?,
    })
}

fn room_item(r: &Room) -> Item {
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

fn member_from(i: &Item) -> Result<Membership> {
    Ok(Membership {
        user_id: get_s(i, "user_id")?,
        room_id: get_s(i, "room_id")?,
        role: if get_s(i, "role")? == "owner" { Role::Owner } else { Role::Member },
        invited_by: get_opt_s(i, "invited_by"),
        joined_at: get_n(i, "joined_at")?,
    })
}

fn member_item(m: &Membership) -> Item {
    let mut i = Item::from([
        ("room_id".into(), s(&m.room_id)),
        ("user_id".into(), s(&m.user_id)),
        ("role".into(), s(m.role.as_str())),
        ("joined_at".into(), n(m.joined_at)),
    ]);
    put_opt_s(&mut i, "invited_by", m.invited_by.as_deref());
    i
}

fn token_from(i: &Item) -> Result<WorkerToken> {
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

fn token_item(t: &WorkerToken) -> Item {
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

fn key_from(i: &Item) -> Result<AccountKey> {
    Ok(AccountKey {
        id: get_s(i, "id")?,
        secret_hash: get_s(i, "secret_hash")?,
        user_id: get_s(i, "user_id")?,
        name: get_s(i, "name")?,
        created_at: get_n(i, "created_at")?,
        expires_at: get_opt_n(i, "expires_at")?,
    })
}

fn key_item(k: &AccountKey) -> Item {
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

fn invite_from(i: &Item) -> Result<Invite> {
    Ok(Invite {
        code_hash: get_s(i, "code_hash")?,
        room_id: get_s(i, "room_id")?,
        created_by: get_s(i, "created_by")?,
        expires_at: get_n(i, "expires_at")?,
    })
}

/// The item holding all of a user's public keys.
fn key_owner_id(user_id: &str) -> String {
    format!("u#{user_id}")
}

/// The item that claims a public key for one user (keys are unique among users).
fn key_claim_id(public_key: &str) -> String {
    format!("k#{public_key}")
}

/// A user's key item: its version (0 when there is none yet) and its keys.
fn public_keys_from(item: Option<&Item>, user_id: &str) -> Result<(i64, Vec<PublicKey>)> {
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

fn public_keys_item(user_id: &str, version: i64, keys: &[PublicKey]) -> Item {
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
fn newest_first(keys: &mut [PublicKey]) {
    keys.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| a.id.cmp(&b.id)));
}

/// One table's layout, for `--store-init`.
struct TableSpec {
    name: &'static str,
    hash: &'static str,
    range: Option<&'static str>,
    /// (index name, hash key, range key)
    indexes: &'static [(&'static str, &'static str, Option<&'static str>)],
    ttl: bool,
}

const TABLES: &[TableSpec] = &[
    TableSpec { name: "users", hash: "id", range: None, indexes: &[], ttl: false },
    TableSpec { name: "rooms", hash: "id", range: None, indexes: &[], ttl: true },
    TableSpec {
        name: "members",
        hash: "room_id",
        range: Some("user_id"),
        indexes: &[("by_user", "user_id", Some("room_id"))],
        ttl: false,
    },
    TableSpec {
        name: "tokens",
        hash: "id",
        range: None,
        indexes: &[("by_user", "user_id", Some("id")), ("by_room", "room_id", Some("id"))],
        ttl: false,
    },
    TableSpec { name: "keys", hash: "user_id", range: Some("id"), indexes: &[], ttl: false },
    TableSpec { name: "secrets", hash: "secret_hash", range: None, indexes: &[], ttl: false },
    TableSpec {
        name: "invites",
        hash: "code_hash",
        range: None,
        indexes: &[("by_room", "room_id", Some("code_hash"))],
        ttl: true,
    },
    TableSpec { name: "pubkeys", hash: "id", range: None, indexes: &[], ttl: false },
];

fn key_schema(hash: &str, range: Option<&str>) -> Result<Vec<KeySchemaElement>> {
    let mut v =
        vec![KeySchemaElement::builder().attribute_name(hash).key_type(KeyType::Hash).build().map_err(backend)?];
    if let Some(r) = range {
        v.push(KeySchemaElement::builder().attribute_name(r).key_type(KeyType::Range).build().map_err(backend)?);
    }
    Ok(v)
}

impl DynamoStore {
    /// Connects with the standard AWS credential and region chain (environment, profile, instance
    /// role); `url` may override the endpoint (DynamoDB Local, moto) and the region.
    pub async fn connect(url: &DynamoUrl) -> DynamoStore {
        Self::connect_inner(url, None).await
    }

    /// With fixed credentials instead of the chain: for local endpoints (moto, DynamoDB Local),
    /// which accept any.
    pub async fn connect_with_static_credentials(url: &DynamoUrl, key_id: &str, secret: &str) -> DynamoStore {
        let creds = aws_sdk_dynamodb::config::Credentials::new(key_id, secret, None, None, "sleap-rtc-static");
        Self::connect_inner(url, Some(creds)).await
    }

    async fn connect_inner(url: &DynamoUrl, creds: Option<aws_sdk_dynamodb::config::Credentials>) -> DynamoStore {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(r) = &url.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        if let Some(c) = creds {
            loader = loader.credentials_provider(c);
        }
        let shared = loader.load().await;
        let mut conf = aws_sdk_dynamodb::config::Builder::from(&shared).timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_timeout(Duration::from_secs(10))
                .build(),
        );
        if shared.region().is_none() {
            // DynamoDB needs a region to sign; a local endpoint does not care which.
            conf = conf.region(aws_config::Region::new("us-east-1"));
        }
        if let Some(e) = &url.endpoint {
            conf = conf.endpoint_url(e);
        }
        DynamoStore { client: Client::from_conf(conf.build()), prefix: url.prefix.clone() }
    }

    fn t(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// Creates the tables that are missing and turns on TTL where the layout wants it. Safe to run
    /// from several instances at once: a table another instance is creating counts as present.
    pub async fn init(&self) -> Result<()> {
        for spec in TABLES {
            let table = self.t(spec.name);
            let mut attrs = vec![spec.hash];
            attrs.extend(spec.range);
            for (_, h, r) in spec.indexes {
                attrs.push(h);
                attrs.extend(r.iter());
            }
            attrs.sort_unstable();
            attrs.dedup();
            let mut req = self
                .client
                .create_table()
                .table_name(&table)
                .billing_mode(BillingMode::PayPerRequest)
                .set_key_schema(Some(key_schema(spec.hash, spec.range)?));
            for a in attrs {
                req = req.attribute_definitions(
                    AttributeDefinition::builder()
                        .attribute_name(a)
                        .attribute_type(ScalarAttributeType::S)
                        .build()
                        .map_err(backend)?,
                );
            }
            for (name, h, r) in spec.indexes {
                req = req.global_secondary_indexes(
                    GlobalSecondaryIndex::builder()
                        .index_name(*name)
                        .set_key_schema(Some(key_schema(h, *r)?))
                        .projection(Projection::builder().projection_type(ProjectionType::All).build())
                        .build()
                        .map_err(backend)?,
                );
            }
            match req.send().await {
                Ok(_) => tracing::info!(table, "created table"),
                Err(e) if code(&e) == Some("ResourceInUseException") => {}
                Err(e) => return Err(sdk_err(e)),
            }
            self.wait_active(&table).await?;
            if spec.ttl {
                self.enable_ttl(&table).await?;
            }
        }
        Ok(())
    }

    /// Fails with the name of the first table that is missing (a deployment made before a table
    /// was added: `--store-init` creates it), so the server stops at start rather than answering
    /// 503 at the first use of that table.
    pub async fn check_tables(&self) -> Result<()> {
        for spec in TABLES {
            let table = self.t(spec.name);
            match self.client.describe_table().table_name(&table).send().await {
                Ok(_) => {}
                Err(e) if code(&e) == Some("ResourceNotFoundException") => {
                    return Err(StoreError::Backend(format!("table {table} does not exist")));
                }
                Err(e) => return Err(sdk_err(e)),
            }
        }
        Ok(())
    }

    async fn wait_active(&self, table: &str) -> Result<()> {
        for _ in 0..120 {
            let d = self.client.describe_table().table_name(table).send().await.map_err(sdk_err)?;
            if d.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(StoreError::Backend(format!("table {table} did not become active within a minute")))
    }

    async fn enable_ttl(&self, table: &str) -> Result<()> {
        let d = self.client.describe_time_to_live().table_name(table).send().await.map_err(sdk_err)?;
        let on = d
            .time_to_live_description()
            .and_then(|t| t.time_to_live_status())
            .is_some_and(|s| matches!(s.as_str(), "ENABLED" | "ENABLING"));
        if on {
            return Ok(());
        }
        let spec =
            TimeToLiveSpecification::builder().enabled(true).attribute_name("purge_at").build().map_err(backend)?;
        match self.client.update_time_to_live().table_name(table).time_to_live_specification(spec).send().await {
            Ok(_) => Ok(()),
            // Another instance enabled it between our check and our call.
            Err(e) if e.as_service_error().and_then(|s| s.message()).is_some_and(|m| m.contains("already enabled")) => {
                Ok(())
            }
            Err(e) => Err(sdk_err(e)),
        }
    }

    async fn get(&self, table: &str, key: Item) -> Result<Option<Item>> {
        let out = self
            .client
            .get_item()
            .table_name(self.t(table))
            .set_key(Some(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_err)?;
        Ok(out.item)
    }

    /// Every item of a query, following `LastEvaluatedKey` to the end. Reads on an index are
    /// eventually consistent (DynamoDB offers nothing else there); on the table, consistent.
    async fn query_all(&self, table: &str, index: Option<&str>, key: &str, value: &str) -> Result<Vec<Item>> {
        let mut items = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(self.t(table))
                .set_index_name(index.map(str::to_owned))
                .key_condition_expression("#k = :v")
                .expression_attribute_names("#k", key)
                .expression_attribute_values(":v", s(value))
                .set_consistent_read(index.is_none().then_some(true))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(sdk_err)?;
            items.extend(out.items.unwrap_or_default());
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(items),
            }
        }
    }

    /// Items by key from one table, 100 keys per call, retrying what DynamoDB left unprocessed.
    async fn batch_get(&self, table: &str, keys: Vec<Item>) -> Result<Vec<Item>> {
        let table = self.t(table);
        let mut out = Vec::new();
        for chunk in keys.chunks(MAX_BATCH_GET) {
            let mut pending = Some(
                KeysAndAttributes::builder()
                    .set_keys(Some(chunk.to_vec()))
                    .consistent_read(true)
                    .build()
                    .map_err(backend)?,
            );
            let mut backoff = Duration::from_millis(20);
            while let Some(req) = pending.take() {
                let resp = self.client.batch_get_item().request_items(&table, req).send().await.map_err(sdk_err)?;
                if let Some(mut r) = resp.responses {
                    out.extend(r.remove(&table).unwrap_or_default());
                }
                pending = resp.unprocessed_keys.and_then(|mut u| u.remove(&table)).filter(|k| !k.keys().is_empty());
                if pending.is_some() {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        Ok(out)
    }

    fn put(&self, table: &str, item: Item, condition: Option<&str>) -> Result<TransactWriteItem> {
        let put = Put::builder()
            .table_name(self.t(table))
            .set_item(Some(item))
            .set_condition_expression(condition.map(str::to_owned))
            .build()
            .map_err(backend)?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// A transactional put of a user's key item that succeeds only over the version it read.
    fn put_public_keys(&self, user_id: &str, read_version: i64, keys: &[PublicKey]) -> Result<TransactWriteItem> {
        let item = public_keys_item(user_id, read_version + 1, keys);
        let mut put = Put::builder().table_name(self.t("pubkeys")).set_item(Some(item));
        put = if read_version == 0 {
            put.condition_expression("attribute_not_exists(id)")
        } else {
            put.condition_expression("version = :v").expression_attribute_values(":v", n(read_version))
        };
        Ok(TransactWriteItem::builder().put(put.build().map_err(backend)?).build())
    }

    async fn user_public_keys(&self, user_id: &str) -> Result<(i64, Vec<PublicKey>)> {
        let item = self.get("pubkeys", k1("id", &key_owner_id(user_id))).await?;
        public_keys_from(item.as_ref(), user_id)
    }

    fn delete(&self, table: &str, key: Item, condition: Option<&str>) -> Result<TransactWriteItem> {
        let del = Delete::builder()
            .table_name(self.t(table))
            .set_key(Some(key))
            .set_condition_expression(condition.map(str::to_owned))
            .build()
            .map_err(backend)?;
        Ok(TransactWriteItem::builder().delete(del).build())
    }

    /// Runs one transaction; `Conflict` when one of its conditions failed.
    async fn transact(&self, items: Vec<TransactWriteItem>) -> Result<()> {
        match self.client.transact_write_items().set_transact_items(Some(items)).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError as E;
                let conditional = match e.as_service_error() {
                    Some(E::TransactionCanceledException(c)) => {
                        c.cancellation_reasons().iter().any(|r| r.code() == Some("ConditionalCheckFailed"))
                    }
                    _ => false,
                };
                if conditional { Err(StoreError::Conflict) } else { Err(sdk_err(e)) }
            }
        }
    }

    /// A transaction whose first condition says whether there was anything to do: `false` when a
    /// condition failed.
    async fn transact_if(&self, items: Vec<TransactWriteItem>) -> Result<bool> {
        match self.transact(items).await {
            Ok(()) => Ok(true),
            Err(StoreError::Conflict) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A conditional create: `Conflict` when the item exists.
    async fn put_new(&self, table: &str, item: Item, condition: &str) -> Result<()> {
        if self.put_single(table, item, condition).await? { Ok(()) } else { Err(StoreError::Conflict) }
    }

    async fn put_single(&self, table: &str, item: Item, condition: &str) -> Result<bool> {
        match self
            .client
            .put_item()
            .table_name(self.t(table))
            .set_item(Some(item))
            .condition_expression(condition)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if code(&e) == Some("ConditionalCheckFailedException") => Ok(false),
            Err(e) => Err(sdk_err(e)),
        }
    }

    /// Deletes an item if it exists; returns what it held.
    async fn delete_existing(&self, table: &str, key: Item, pk: &str) -> Result<Option<Item>> {
        match self
            .client
            .delete_item()
            .table_name(self.t(table))
            .set_key(Some(key))
            .condition_expression(format!("attribute_exists({pk})"))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
        {
            Ok(out) => Ok(out.attributes),
            Err(e) if code(&e) == Some("ConditionalCheckFailedException") => Ok(None),
            Err(e) => Err(sdk_err(e)),
        }
    }
}

fn k1(name: &str, v: &str) -> Item {
    Item::from([(name.to_owned(), s(v))])
}

fn k2(a: &str, av: &str, b: &str, bv: &str) -> Item {
    Item::from([(a.to_owned(), s(av)), (b.to_owned(), s(bv))])
}

#[async_trait]
impl Store for DynamoStore {
    async fn health(&self) -> Result<()> {
        self.get("users", k1("id", "__health__")).await.map(|_| ())
    }

    async fn put_user(&self, u: &User) -> Result<()> {
        let item = Item::from([
            ("id".into(), s(&u.id)),
            ("username".into(), s(&u.username)),
            ("created_at".into(), n(u.created_at)),
        ]);
        self.put_new("users", item, "attribute_not_exists(id)").await
    }

    async fn get_user(&self, id: &str) -> Result<Option<User>> {
        self.get("users", k1("id", id)).await?.as_ref().map(user_from).transpose()
    }

    async fn create_room(&self, room: &Room, owner: &Membership) -> Result<()> {
        self.transact(vec![
            self.put("rooms", room_item(room), Some("attribute_not_exists(id)"))?,
            self.put("members", member_item(owner), Some("attribute_not_exists(room_id)"))?,
        ])
        .await
    }

    async fn get_room(&self, id: &str) -> Result<Option<Room>> {
        match self.get("rooms", k1("id", id)).await? {
            Some(i) if !purged(&i, now_secs()) => Ok(Some(room_from(&i)?)),
            _ => Ok(None),
        }
    }

    async fn update_room(&self, id: &str, name: Option<&str>, expires_at: Option<Option<i64>>) -> Result<Option<Room>> {
        if name.is_none() && expires_at.is_none() {
            return self.get_room(id).await;
        }
        let mut sets = Vec::new();
        let mut removes = Vec::new();
        let mut req = self
            .client
            .update_item()
            .table_name(self.t("rooms"))
            .key("id", s(id))
            .condition_expression("attribute_exists(id) AND (attribute_not_exists(purge_at) OR purge_at > :now)")
            .expression_attribute_values(":now", n(now_secs()))
            .return_values(ReturnValue::AllNew);
        if let Some(nm) = name {
            sets.push("#n = :n");
            req = req.expression_attribute_names("#n", "name").expression_attribute_values(":n", s(nm));
        }
        match expires_at {
            Some(Some(t)) => {
                sets.push("expires_at = :e, purge_at = :p");
                req = req
                    .expression_attribute_values(":e", n(t))
                    .expression_attribute_values(":p", n(t.saturating_add(ROOM_GRACE_SECS)));
            }
            Some(None) => removes.push("expires_at, purge_at"),
            None => {}
        }
        let mut expr = String::new();
        if !sets.is_empty() {
            expr.push_str("SET ");
            expr.push_str(&sets.join(", "));
        }
        if !removes.is_empty() {
            expr.push_str(" REMOVE ");
            expr.push_str(&removes.join(", "));
        }
        match req.update_expression(expr.trim()).send().await {
            Ok(out) => out.attributes.as_ref().map(room_from).transpose(),
            Err(e) if code(&e) == Some("ConditionalCheckFailedException") => Ok(None),
            Err(e) => Err(sdk_err(e)),
        }
    }

    async fn delete_room(&self, id: &str) -> Result<bool> {
        // The room goes first, conditionally and together with as many dependents as fit in one
        // transaction; later transactions (rooms with more than 99 dependents) remove the rest,
        // which are inert meanwhile: every use of a membership, token or invite looks the room up.
        let members = self.query_all("members", None, "room_id", id).await?;
        let tokens = self.query_all("tokens", Some("by_room"), "room_id", id).await?;
        let invites = self.query_all("invites", Some("by_room"), "room_id", id).await?;
        let mut ops = vec![self.delete("rooms", k1("id", id), Some("attribute_exists(id)"))?];
        for m in &members {
            ops.push(self.delete("members", k2("room_id", id, "user_id", &get_s(m, "user_id")?), None)?);
        }
        for t in &tokens {
            ops.push(self.delete("tokens", k1("id", &get_s(t, "id")?), None)?);
            ops.push(self.delete("secrets", k1("secret_hash", &get_s(t, "secret_hash")?), None)?);
        }
        for i in &invites {
            ops.push(self.delete("invites", k1("code_hash", &get_s(i, "code_hash")?), None)?);
        }
        let mut rest = ops.split_off(ops.len().min(MAX_TRANSACTION));
        if !self.transact_if(ops).await? {
            return Ok(false);
        }
        while !rest.is_empty() {
            let next = rest.split_off(rest.len().min(MAX_TRANSACTION));
            self.transact(rest).await?;
            rest = next;
        }
        Ok(true)
    }

    async fn purge_expired_rooms(&self, _now: i64, _limit: usize) -> Result<u64> {
        // `purge_at` is the rooms table's TTL attribute: DynamoDB deletes them itself, and finding
        // them here would take a Scan. Their dependents are inert (every use looks the room up).
        Ok(0)
    }

    async fn add_member(&self, m: &Membership) -> Result<bool> {
        self.put_single("members", member_item(m), "attribute_not_exists(room_id)").await
    }

    async fn get_member(&self, room_id: &str, user_id: &str) -> Result<Option<Membership>> {
        self.get("members", k2("room_id", room_id, "user_id", user_id)).await?.as_ref().map(member_from).transpose()
    }

    async fn list_user_rooms(&self, user_id: &str) -> Result<Vec<(Membership, Room)>> {
        let members: Vec<Membership> = self
            .query_all("members", Some("by_user"), "user_id", user_id)
            .await?
            .iter()
            .map(member_from)
            .collect::<Result<_>>()?;
        let keys = members.iter().map(|m| k1("id", &m.room_id)).collect();
        let now = now_secs();
        let mut rooms: HashMap<String, Room> = HashMap::new();
        for i in self.batch_get("rooms", keys).await? {
            if !purged(&i, now) {
                let r = room_from(&i)?;
                rooms.insert(r.id.clone(), r);
            }
        }
        let mut out: Vec<(Membership, Room)> =
            members.into_iter().filter_map(|m| rooms.get(&m.room_id).cloned().map(|r| (m, r))).collect();
        out.sort_by_key(|(m, _)| std::cmp::Reverse(m.joined_at));
        Ok(out)
    }

    async fn list_members(&self, room_id: &str) -> Result<Vec<(Membership, Option<User>)>> {
        let members: Vec<Membership> = self
            .query_all("members", None, "room_id", room_id)
            .await?
            .iter()
            .map(member_from)
            .collect::<Result<_>>()?;
        let keys = members.iter().map(|m| k1("id", &m.user_id)).collect();
        let mut users: HashMap<String, User> = HashMap::new();
        for i in self.batch_get("users", keys).await? {
            let u = user_from(&i)?;
            users.insert(u.id.clone(), u);
        }
        let mut out: Vec<_> = members
            .into_iter()
            .map(|m| {
                let u = users.get(&m.user_id).cloned();
                (m, u)
            })
            .collect();
        out.sort_by_key(|(m, _)| m.joined_at);
        Ok(out)
    }

    async fn remove_member(&self, room_id: &str, user_id: &str) -> Result<bool> {
        Ok(self.delete_existing("members", k2("room_id", room_id, "user_id", user_id), "room_id").await?.is_some())
    }

    async fn put_worker_token(&self, t: &WorkerToken) -> Result<()> {
        let secret = Item::from([
            ("secret_hash".into(), s(&t.secret_hash)),
            ("kind".into(), s("token")),
            ("id".into(), s(&t.id)),
        ]);
        self.transact(vec![
            self.put("tokens", token_item(t), Some("attribute_not_exists(id)"))?,
            self.put("secrets", secret, Some("attribute_not_exists(secret_hash)"))?,
        ])
        .await
    }

    async fn find_worker_token(&self, secret_hash: &str) -> Result<Option<WorkerToken>> {
        let Some(sec) = self.get("secrets", k1("secret_hash", secret_hash)).await? else { return Ok(None) };
        if get_opt_s(&sec, "kind").as_deref() != Some("token") {
            return Ok(None);
        }
        self.get_worker_token(&get_s(&sec, "id")?).await
    }

    async fn get_worker_token(&self, id: &str) -> Result<Option<WorkerToken>> {
        self.get("tokens", k1("id", id)).await?.as_ref().map(token_from).transpose()
    }

    async fn list_worker_tokens(&self, user_id: &str, room_id: Option<&str>) -> Result<Vec<WorkerToken>> {
        let mut out: Vec<WorkerToken> = self
            .query_all("tokens", Some("by_user"), "user_id", user_id)
            .await?
            .iter()
            .map(token_from)
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .filter(|t| room_id.is_none_or(|r| r == t.room_id))
            .collect();
        out.sort_by_key(|t| std::cmp::Reverse(t.created_at));
        Ok(out)
    }

    async fn revoke_worker_token(&self, id: &str, at: i64) -> Result<bool> {
        match self
            .client
            .update_item()
            .table_name(self.t("tokens"))
            .key("id", s(id))
            .update_expression("SET revoked_at = :at")
            .condition_expression("attribute_exists(id) AND attribute_not_exists(revoked_at)")
            .expression_attribute_values(":at", n(at))
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if code(&e) == Some("ConditionalCheckFailedException") => Ok(false),
            Err(e) => Err(sdk_err(e)),
        }
    }

    async fn delete_worker_token(&self, id: &str) -> Result<bool> {
        let Some(t) = self.get_worker_token(id).await? else { return Ok(false) };
        self.transact_if(vec![
            self.delete("tokens", k1("id", id), Some("attribute_exists(id)"))?,
            self.delete("secrets", k1("secret_hash", &t.secret_hash), None)?,
        ])
        .await
    }

    async fn put_account_key(&self, k: &AccountKey) -> Result<()> {
        let secret = Item::from([
            ("secret_hash".into(), s(&k.secret_hash)),
            ("kind".into(), s("key")),
            ("id".into(), s(&k.id)),
            ("user_id".into(), s(&k.user_id)),
        ]);
        self.transact(vec![
            self.put("keys", key_item(k), Some("attribute_not_exists(id)"))?,
            self.put("secrets", secret, Some("attribute_not_exists(secret_hash)"))?,
        ])
        .await
    }

    async fn find_account_key(&self, secret_hash: &str) -> Result<Option<AccountKey>> {
        let Some(sec) = self.get("secrets", k1("secret_hash", secret_hash)).await? else { return Ok(None) };
        if get_opt_s(&sec, "kind").as_deref() != Some("key") {
            return Ok(None);
        }
        let key = k2("user_id", &get_s(&sec, "user_id")?, "id", &get_s(&sec, "id")?);
        self.get("keys", key).await?.as_ref().map(key_from).transpose()
    }

    async fn list_account_keys(&self, user_id: &str) -> Result<Vec<AccountKey>> {
        let mut out: Vec<AccountKey> =
            self.query_all("keys", None, "user_id", user_id).await?.iter().map(key_from).collect::<Result<_>>()?;
        out.sort_by_key(|t| std::cmp::Reverse(t.created_at));
        Ok(out)
    }

    async fn delete_account_key(&self, user_id: &str, id: &str) -> Result<bool> {
        let Some(i) = self.get("keys", k2("user_id", user_id, "id", id)).await? else { return Ok(false) };
        let k = key_from(&i)?;
        self.transact_if(vec![
            self.delete("keys", k2("user_id", user_id, "id", id), Some("attribute_exists(id)"))?,
            self.delete("secrets", k1("secret_hash", &k.secret_hash), None)?,
        ])
        .await
    }

    async fn add_public_key(&self, k: &PublicKey, max_per_user: usize) -> Result<AddedKey> {
        let claim_id = key_claim_id(&k.public_key);
        for _ in 0..KEY_WRITE_ATTEMPTS {
            // A claim decides idempotence and ownership; a lost race lands here on the next try.
            if let Some(claim) = self.get("pubkeys", k1("id", &claim_id)).await? {
                if get_s(&claim, "user_id")? != k.user_id {
                    return Ok(AddedKey::TakenByOther);
                }
                let key_id = get_s(&claim, "key_id")?;
                let (_, keys) = self.user_public_keys(&k.user_id).await?;
                return match keys.into_iter().find(|e| e.id == key_id) {
                    Some(e) => Ok(AddedKey::Existing(e)),
                    None => Err(StoreError::Backend(format!("public key claim {claim_id} without its key"))),
                };
            }
            let (version, mut keys) = self.user_public_keys(&k.user_id).await?;
            if keys.len() >= max_per_user {
                return Ok(AddedKey::LimitReached);
            }
            keys.push(k.clone());
            let claim = Item::from([
                ("id".into(), s(&claim_id)),
                ("user_id".into(), s(&k.user_id)),
                ("key_id".into(), s(&k.id)),
            ]);
            match self
                .transact(vec![
                    self.put("pubkeys", claim, Some("attribute_not_exists(id)"))?,
                    self.put_public_keys(&k.user_id, version, &keys)?,
                ])
                .await
            {
                Ok(()) => return Ok(AddedKey::Created),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Backend("public keys of this user changed too often concurrently; try again".into()))
    }

    async fn list_public_keys(&self, user_id: &str) -> Result<Vec<PublicKey>> {
        let (_, mut keys) = self.user_public_keys(user_id).await?;
        newest_first(&mut keys);
        Ok(keys)
    }

    async fn delete_public_key(&self, user_id: &str, id: &str) -> Result<bool> {
        for _ in 0..KEY_WRITE_ATTEMPTS {
            let (version, mut keys) = self.user_public_keys(user_id).await?;
            let Some(pos) = keys.iter().position(|k| k.id == id) else { return Ok(false) };
            let gone = keys.remove(pos);
            match self
                .transact(vec![
                    self.put_public_keys(user_id, version, &keys)?,
                    self.delete("pubkeys", k1("id", &key_claim_id(&gone.public_key)), None)?,
                ])
                .await
            {
                Ok(()) => return Ok(true),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Backend("public keys of this user changed too often concurrently; try again".into()))
    }

    async fn room_public_keys(&self, room_id: &str) -> Result<Vec<(PublicKey, Option<User>)>> {
        let mut members: Vec<Membership> = self
            .query_all("members", None, "room_id", room_id)
            .await?
            .iter()
            .map(member_from)
            .collect::<Result<_>>()?;
        members.sort_by(|a, b| a.joined_at.cmp(&b.joined_at).then_with(|| a.user_id.cmp(&b.user_id)));
        let mut users: HashMap<String, User> = HashMap::new();
        for i in self.batch_get("users", members.iter().map(|m| k1("id", &m.user_id)).collect()).await? {
            let u = user_from(&i)?;
            users.insert(u.id.clone(), u);
        }
        let mut keys: HashMap<String, Vec<PublicKey>> = HashMap::new();
        let owners = members.iter().map(|m| k1("id", &key_owner_id(&m.user_id))).collect();
        for i in self.batch_get("pubkeys", owners).await? {
            let user_id = get_s(&i, "user_id")?;
            let (_, mut ks) = public_keys_from(Some(&i), &user_id)?;
            ks.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
            keys.insert(user_id, ks);
        }
        let mut out = Vec::new();
        for m in &members {
            for k in keys.remove(&m.user_id).unwrap_or_default() {
                out.push((k, users.get(&m.user_id).cloned()));
            }
        }
        Ok(out)
    }

    async fn put_invite(&self, inv: &Invite) -> Result<()> {
        let item = Item::from([
            ("code_hash".into(), s(&inv.code_hash)),
            ("room_id".into(), s(&inv.room_id)),
            ("created_by".into(), s(&inv.created_by)),
            ("expires_at".into(), n(inv.expires_at)),
            ("purge_at".into(), n(inv.expires_at)),
        ]);
        self.put_new("invites", item, "attribute_not_exists(code_hash)").await
    }

    async fn take_invite(&self, code_hash: &str, now: i64) -> Result<Option<Invite>> {
        // One conditional delete: of two concurrent takers exactly one gets the item back.
        match self
            .client
            .delete_item()
            .table_name(self.t("invites"))
            .key("code_hash", s(code_hash))
            .condition_expression("expires_at > :now")
            .expression_attribute_values(":now", n(now))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
        {
            Ok(out) => out.attributes.as_ref().map(invite_from).transpose(),
            Err(e) if code(&e) == Some("ConditionalCheckFailedException") => Ok(None),
            Err(e) => Err(sdk_err(e)),
        }
    }
}
