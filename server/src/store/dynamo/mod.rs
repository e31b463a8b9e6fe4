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

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, Delete, KeysAndAttributes, Put, ReturnValue, TransactWriteItem};

use super::{PublicKey, Result, StoreError};

mod codec;
mod schema;
mod store;

use codec::*;
use schema::Table;

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

    /// A table's full name: `PREFIX-<name>`.
    fn t(&self, table: Table) -> String {
        format!("{}-{}", self.prefix, table.name())
    }

    async fn get(&self, table: Table, key: Item) -> Result<Option<Item>> {
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
    async fn query_all(&self, table: Table, index: Option<&str>, key: &str, value: &str) -> Result<Vec<Item>> {
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
    async fn batch_get(&self, table: Table, keys: Vec<Item>) -> Result<Vec<Item>> {
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

    fn put(&self, table: Table, item: Item, condition: Option<&str>) -> Result<TransactWriteItem> {
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
        let mut put = Put::builder().table_name(self.t(Table::PubKeys)).set_item(Some(item));
        put = if read_version == 0 {
            put.condition_expression("attribute_not_exists(id)")
        } else {
            put.condition_expression("version = :v").expression_attribute_values(":v", n(read_version))
        };
        Ok(TransactWriteItem::builder().put(put.build().map_err(backend)?).build())
    }

    async fn user_public_keys(&self, user_id: &str) -> Result<(i64, Vec<PublicKey>)> {
        let item = self.get(Table::PubKeys, k1("id", &key_owner_id(user_id))).await?;
        public_keys_from(item.as_ref(), user_id)
    }

    fn delete(&self, table: Table, key: Item, condition: Option<&str>) -> Result<TransactWriteItem> {
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
    async fn put_new(&self, table: Table, item: Item, condition: &str) -> Result<()> {
        if self.put_single(table, item, condition).await? { Ok(()) } else { Err(StoreError::Conflict) }
    }

    async fn put_single(&self, table: Table, item: Item, condition: &str) -> Result<bool> {
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
    async fn delete_existing(&self, table: Table, key: Item, pk: &str) -> Result<Option<Item>> {
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
