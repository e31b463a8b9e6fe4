//! The tables' layout, and `--store-init`: creating what is missing, turning on TTL.

use std::time::Duration;

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection, ProjectionType,
    ScalarAttributeType, TableStatus, TimeToLiveSpecification,
};

use super::DynamoStore;
use super::codec::{backend, code, sdk_err};
use crate::store::{Result, StoreError};

/// The tables, each `PREFIX-<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Table {
    Users,
    Rooms,
    Members,
    Tokens,
    Keys,
    Secrets,
    Invites,
    PubKeys,
}

impl Table {
    pub(super) fn name(self) -> &'static str {
        match self {
            Table::Users => "users",
            Table::Rooms => "rooms",
            Table::Members => "members",
            Table::Tokens => "tokens",
            Table::Keys => "keys",
            Table::Secrets => "secrets",
            Table::Invites => "invites",
            Table::PubKeys => "pubkeys",
        }
    }
}

/// One table's layout, for `--store-init`.
struct TableSpec {
    table: Table,
    hash: &'static str,
    range: Option<&'static str>,
    /// (index name, hash key, range key)
    indexes: &'static [(&'static str, &'static str, Option<&'static str>)],
    ttl: bool,
}

const TABLES: &[TableSpec] = &[
    TableSpec { table: Table::Users, hash: "id", range: None, indexes: &[], ttl: false },
    TableSpec { table: Table::Rooms, hash: "id", range: None, indexes: &[], ttl: true },
    TableSpec {
        table: Table::Members,
        hash: "room_id",
        range: Some("user_id"),
        indexes: &[("by_user", "user_id", Some("room_id"))],
        ttl: false,
    },
    TableSpec {
        table: Table::Tokens,
        hash: "id",
        range: None,
        indexes: &[("by_user", "user_id", Some("id")), ("by_room", "room_id", Some("id"))],
        ttl: false,
    },
    TableSpec { table: Table::Keys, hash: "user_id", range: Some("id"), indexes: &[], ttl: false },
    TableSpec { table: Table::Secrets, hash: "secret_hash", range: None, indexes: &[], ttl: false },
    TableSpec {
        table: Table::Invites,
        hash: "code_hash",
        range: None,
        indexes: &[("by_room", "room_id", Some("code_hash"))],
        ttl: true,
    },
    TableSpec { table: Table::PubKeys, hash: "id", range: None, indexes: &[], ttl: false },
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
    /// Creates the tables that are missing and turns on TTL where the layout wants it. Safe to run
    /// from several instances at once: a table another instance is creating counts as present.
    pub async fn init(&self) -> Result<()> {
        for spec in TABLES {
            let table = self.t(spec.table);
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
            let table = self.t(spec.table);
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
}
