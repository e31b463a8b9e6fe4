//! [`Store`] on the tables: every request path a `GetItem`, a paged `Query` or a `BatchGetItem`.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::ReturnValue;

use super::codec::*;
use super::schema::Table;
use super::{DynamoStore, Item, KEY_WRITE_ATTEMPTS, MAX_TRANSACTION};
use crate::store::{
    AccountKey, AddedKey, Invite, Membership, PublicKey, ROOM_GRACE_SECS, Result, Room, Store, StoreError, User,
    WorkerToken,
};

#[async_trait]
impl Store for DynamoStore {
    async fn health(&self) -> Result<()> {
        self.get(Table::Users, k1("id", "__health__")).await.map(|_| ())
    }

    async fn put_user(&self, u: &User) -> Result<()> {
        let item = Item::from([
            ("id".into(), s(&u.id)),
            ("username".into(), s(&u.username)),
            ("created_at".into(), n(u.created_at)),
        ]);
        self.put_new(Table::Users, item, "attribute_not_exists(id)").await
    }

    async fn get_user(&self, id: &str) -> Result<Option<User>> {
        self.get(Table::Users, k1("id", id)).await?.as_ref().map(user_from).transpose()
    }

    async fn create_room(&self, room: &Room, owner: &Membership) -> Result<()> {
        self.transact(vec![
            self.put(Table::Rooms, room_item(room), Some("attribute_not_exists(id)"))?,
            self.put(Table::Members, member_item(owner), Some("attribute_not_exists(room_id)"))?,
        ])
        .await
    }

    async fn get_room(&self, id: &str) -> Result<Option<Room>> {
        match self.get(Table::Rooms, k1("id", id)).await? {
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
            .table_name(self.t(Table::Rooms))
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
        let members = self.query_all(Table::Members, None, "room_id", id).await?;
        let tokens = self.query_all(Table::Tokens, Some("by_room"), "room_id", id).await?;
        let invites = self.query_all(Table::Invites, Some("by_room"), "room_id", id).await?;
        let mut ops = vec![self.delete(Table::Rooms, k1("id", id), Some("attribute_exists(id)"))?];
        for m in &members {
            ops.push(self.delete(Table::Members, k2("room_id", id, "user_id", &get_s(m, "user_id")?), None)?);
        }
        for t in &tokens {
            ops.push(self.delete(Table::Tokens, k1("id", &get_s(t, "id")?), None)?);
            ops.push(self.delete(Table::Secrets, k1("secret_hash", &get_s(t, "secret_hash")?), None)?);
        }
        for i in &invites {
            ops.push(self.delete(Table::Invites, k1("code_hash", &get_s(i, "code_hash")?), None)?);
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
        self.put_single(Table::Members, member_item(m), "attribute_not_exists(room_id)").await
    }

    async fn get_member(&self, room_id: &str, user_id: &str) -> Result<Option<Membership>> {
        self.get(Table::Members, k2("room_id", room_id, "user_id", user_id))
            .await?
            .as_ref()
            .map(member_from)
            .transpose()
    }

    async fn list_user_rooms(&self, user_id: &str) -> Result<Vec<(Membership, Room)>> {
        let members: Vec<Membership> = self
            .query_all(Table::Members, Some("by_user"), "user_id", user_id)
            .await?
            .iter()
            .map(member_from)
            .collect::<Result<_>>()?;
        let keys = members.iter().map(|m| k1("id", &m.room_id)).collect();
        let now = now_secs();
        let mut rooms: HashMap<String, Room> = HashMap::new();
        for i in self.batch_get(Table::Rooms, keys).await? {
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
            .query_all(Table::Members, None, "room_id", room_id)
            .await?
            .iter()
            .map(member_from)
            .collect::<Result<_>>()?;
        let keys = members.iter().map(|m| k1("id", &m.user_id)).collect();
        let mut users: HashMap<String, User> = HashMap::new();
        for i in self.batch_get(Table::Users, keys).await? {
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
        Ok(self.delete_existing(Table::Members, k2("room_id", room_id, "user_id", user_id), "room_id").await?.is_some())
    }

    async fn put_worker_token(&self, t: &WorkerToken) -> Result<()> {
        let secret = Item::from([
            ("secret_hash".into(), s(&t.secret_hash)),
            ("kind".into(), s("token")),
            ("id".into(), s(&t.id)),
        ]);
        self.transact(vec![
            self.put(Table::Tokens, token_item(t), Some("attribute_not_exists(id)"))?,
            self.put(Table::Secrets, secret, Some("attribute_not_exists(secret_hash)"))?,
        ])
        .await
    }

    async fn find_worker_token(&self, secret_hash: &str) -> Result<Option<WorkerToken>> {
        let Some(sec) = self.get(Table::Secrets, k1("secret_hash", secret_hash)).await? else { return Ok(None) };
        if get_opt_s(&sec, "kind").as_deref() != Some("token") {
            return Ok(None);
        }
        self.get_worker_token(&get_s(&sec, "id")?).await
    }

    async fn get_worker_token(&self, id: &str) -> Result<Option<WorkerToken>> {
        self.get(Table::Tokens, k1("id", id)).await?.as_ref().map(token_from).transpose()
    }

    async fn list_worker_tokens(&self, user_id: &str, room_id: Option<&str>) -> Result<Vec<WorkerToken>> {
        let mut out: Vec<WorkerToken> = self
            .query_all(Table::Tokens, Some("by_user"), "user_id", user_id)
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
            .table_name(self.t(Table::Tokens))
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
            self.delete(Table::Tokens, k1("id", id), Some("attribute_exists(id)"))?,
            self.delete(Table::Secrets, k1("secret_hash", &t.secret_hash), None)?,
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
            self.put(Table::Keys, key_item(k), Some("attribute_not_exists(id)"))?,
            self.put(Table::Secrets, secret, Some("attribute_not_exists(secret_hash)"))?,
        ])
        .await
    }

    async fn find_account_key(&self, secret_hash: &str) -> Result<Option<AccountKey>> {
        let Some(sec) = self.get(Table::Secrets, k1("secret_hash", secret_hash)).await? else { return Ok(None) };
        if get_opt_s(&sec, "kind").as_deref() != Some("key") {
            return Ok(None);
        }
        let key = k2("user_id", &get_s(&sec, "user_id")?, "id", &get_s(&sec, "id")?);
        self.get(Table::Keys, key).await?.as_ref().map(key_from).transpose()
    }

    async fn list_account_keys(&self, user_id: &str) -> Result<Vec<AccountKey>> {
        let mut out: Vec<AccountKey> =
            self.query_all(Table::Keys, None, "user_id", user_id).await?.iter().map(key_from).collect::<Result<_>>()?;
        out.sort_by_key(|t| std::cmp::Reverse(t.created_at));
        Ok(out)
    }

    async fn delete_account_key(&self, user_id: &str, id: &str) -> Result<bool> {
        let Some(i) = self.get(Table::Keys, k2("user_id", user_id, "id", id)).await? else { return Ok(false) };
        let k = key_from(&i)?;
        self.transact_if(vec![
            self.delete(Table::Keys, k2("user_id", user_id, "id", id), Some("attribute_exists(id)"))?,
            self.delete(Table::Secrets, k1("secret_hash", &k.secret_hash), None)?,
        ])
        .await
    }

    async fn add_public_key(&self, k: &PublicKey, max_per_user: usize) -> Result<AddedKey> {
        let claim_id = key_claim_id(&k.public_key);
        for _ in 0..KEY_WRITE_ATTEMPTS {
            // A claim decides idempotence and ownership; a lost race lands here on the next try.
            if let Some(claim) = self.get(Table::PubKeys, k1("id", &claim_id)).await? {
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
                    self.put(Table::PubKeys, claim, Some("attribute_not_exists(id)"))?,
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
                    self.delete(Table::PubKeys, k1("id", &key_claim_id(&gone.public_key)), None)?,
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
            .query_all(Table::Members, None, "room_id", room_id)
            .await?
            .iter()
            .map(member_from)
            .collect::<Result<_>>()?;
        members.sort_by(|a, b| a.joined_at.cmp(&b.joined_at).then_with(|| a.user_id.cmp(&b.user_id)));
        let mut users: HashMap<String, User> = HashMap::new();
        for i in self.batch_get(Table::Users, members.iter().map(|m| k1("id", &m.user_id)).collect()).await? {
            let u = user_from(&i)?;
            users.insert(u.id.clone(), u);
        }
        let mut keys: HashMap<String, Vec<PublicKey>> = HashMap::new();
        let owners = members.iter().map(|m| k1("id", &key_owner_id(&m.user_id))).collect();
        for i in self.batch_get(Table::PubKeys, owners).await? {
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
        self.put_new(Table::Invites, item, "attribute_not_exists(code_hash)").await
    }

    async fn take_invite(&self, code_hash: &str, now: i64) -> Result<Option<Invite>> {
        // One conditional delete: of two concurrent takers exactly one gets the item back.
        match self
            .client
            .delete_item()
            .table_name(self.t(Table::Invites))
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
