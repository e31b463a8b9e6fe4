//! The room's model registry as the worker uses it: resolving, fetching and caching models,
//! and answering registry questions from the room.

use super::*;

impl<R: Runtime> Worker<R> {
    /// Registry models a track job names must exist in the room's registry.
    pub(super) async fn check_models(&self, spec: &JobSpec) -> Vec<FieldError> {
        let JobSpec::Track(t) = spec else { return vec![] };
        let refs: Vec<(usize, &str)> = t
            .model_paths
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.strip_prefix(sleap_rtc_core::job::MODEL_REF).map(|id| (i, id)))
            .collect();
        if refs.is_empty() {
            return vec![];
        }
        let field = |i: usize| format!("model_paths[{i}]");
        let manifest = match self.registry_manifest().await {
            Ok(m) => m,
            Err(e) => return vec![FieldError::new(field(refs[0].0), ErrorCode::Internal, format!("registry: {e}"))],
        };
        refs.into_iter()
            .filter_map(|(i, id)| {
                manifest.resolve(id).err().map(|e| FieldError::new(field(i), ErrorCode::PathNotFound, e.to_string()))
            })
            .collect()
    }

    pub(super) async fn registry(&self) -> Result<(crate::registry::AnyStore<R>, String), String> {
        let root = self.cfg.registry.as_deref().ok_or("this worker has no model registry")?;
        let room = self.room.lock().ok().and_then(|r| r.clone()).ok_or("not registered in a room yet")?;
        let store = crate::registry::AnyStore::<R>::open(root).await.map_err(|e| e.to_string())?;
        Ok((store, room))
    }

    pub(super) async fn registry_manifest(&self) -> Result<sleap_rtc_core::registry::Manifest, String> {
        let (store, room) = self.registry().await?;
        crate::registry::manifest(&store, &room).await.map_err(|e| e.to_string())
    }

    pub(super) fn model_cache(&self) -> PathBuf {
        self.cfg.work_dir.join("model-cache")
    }

    /// A registry model on local disk: from the cache, or pulled (verified) into it. Records this
    /// worker in the model's `available_on_workers` and keeps the cache under its cap.
    pub(super) async fn ensure_model(&self, query: &str) -> Result<PathBuf, String> {
        let (store, room) = self.registry().await?;
        let manifest = crate::registry::manifest(&store, &room).await.map_err(|e| e.to_string())?;
        let entry = manifest.resolve(query).map_err(|e| e.to_string())?.clone();
        let cache = self.model_cache();
        let dir = cache.join(&entry.id);
        let complete = dir.join(".complete");
        if complete.is_file() {
            // Recently used: LRU goes by this file's modification time.
            let _ =
                std::fs::File::options().write(true).open(&complete).and_then(|f| f.set_modified(SystemTime::now()));
            return Ok(dir);
        }
        let d = dir.clone();
        let _ = R::spawn_blocking(move || std::fs::remove_dir_all(d)).await;
        let (_, dir) = crate::registry::pull(&store, &room, &entry.id, &cache).await.map_err(|e| e.to_string())?;
        std::fs::write(&complete, b"").map_err(|e| e.to_string())?;
        let op = sleap_rtc_core::registry::Op::AddWorker { id: entry.id.clone(), worker: self.peer_id.clone() };
        if let Err(e) = crate::registry::update(&store, &room, vec![op]).await {
            tracing::warn!(model = %entry.id, error = %e, "cannot record this worker in available_on_workers");
        }
        Ok(dir)
    }

    /// `registry_query` (a signaling peer_message): does this worker have a model cached?
    pub(super) async fn answer_registry_query(&self, query: &str) -> serde_json::Value {
        let id = match self.registry_manifest().await {
            Ok(m) => m.resolve(query).map(|e| e.id.clone()).ok(),
            Err(_) => None,
        };
        let cached = id.as_ref().is_some_and(|id| self.model_cache().join(id).join(".complete").is_file());
        json!({"type": "registry_answer", "model": query, "model_id": id, "cached": cached,
               "registry": self.cfg.registry.is_some()})
    }

    /// `registry_list` (a signaling peer_message from any room member, e.g. the dashboard): a
    /// summary of the room's registry and which of its models this worker has cached.
    pub(super) async fn answer_registry_list(&self) -> Value {
        if self.cfg.registry.is_none() {
            return json!({"type": "registry_list_answer", "registry": false});
        }
        match self.registry_manifest().await {
            Ok(m) => {
                let cached: Vec<String> = m
                    .models
                    .keys()
                    .filter(|id| self.model_cache().join(id).join(".complete").is_file())
                    .cloned()
                    .collect();
                registry_summary(&m, &cached)
            }
            Err(e) => {
                // The detail (store addresses, SDK errors) stays in this log, not in the room.
                tracing::warn!(error = %e, "cannot read the registry for registry_list");
                json!({"type": "registry_list_answer", "registry": true, "error": "the worker cannot read the registry"})
            }
        }
    }
}
