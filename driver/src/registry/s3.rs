//! The registry on S3 (or anything speaking its API: MinIO, Ceph, moto): `{prefix}/{room_id}/
//! manifest.json` written with conditional `PutObject` (`If-Match: <etag>` to update,
//! `If-None-Match: *` to create), model files streamed up (multipart above 64 MiB) and down.
//! Endpoint, region and credentials come from the standard AWS chain (`AWS_ENDPOINT_URL`,
//! `AWS_REGION`, `AWS_ACCESS_KEY_ID`, profiles, instance roles).

use std::path::Path;

use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};

use super::StoreError;

/// Files larger than this go up in parts of this size.
const PART: u64 = 64 << 20;

/// An S3 (or compatible) store. Opaque: open it with `AnyStore::open("s3://...")`.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
}

fn s3_err<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> StoreError + '_ {
    move |e| StoreError::Other(format!("S3 {what}: {e:?}"))
}

impl S3Store {
    /// `url` is `s3://bucket[/prefix]`. Path-style addressing is used when an endpoint override
    /// is set (S3-compatible stores rarely do virtual hosts).
    pub(crate) async fn connect(url: &str) -> Result<S3Store, StoreError> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| StoreError::Other(format!("{url}: not an s3:// URL")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StoreError::Other(format!("{url}: no bucket")));
        }
        crate::init_tls();
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest()).load().await;
        let path_style =
            std::env::var_os("AWS_ENDPOINT_URL").is_some() || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some();
        let s3 = aws_sdk_s3::config::Builder::from(&conf).force_path_style(path_style).build();
        Ok(S3Store {
            client: aws_sdk_s3::Client::from_conf(s3),
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
        })
    }

    fn key(&self, parts: &[&str]) -> String {
        let tail = parts.join("/");
        if self.prefix.is_empty() { tail } else { format!("{}/{tail}", self.prefix) }
    }

    async fn put_multipart(&self, key: &str, src: &Path, size: u64) -> Result<(), StoreError> {
        let up = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(s3_err("create multipart upload"))?;
        let id = up.upload_id().unwrap_or_default().to_owned();
        let mut parts = Vec::new();
        let mut offset = 0;
        let mut n = 1;
        let result: Result<(), StoreError> = async {
            while offset < size {
                let len = PART.min(size - offset);
                let body = ByteStream::read_from()
                    .path(src)
                    .offset(offset)
                    .length(Length::Exact(len))
                    .build()
                    .await
                    .map_err(s3_err("read part"))?;
                let r = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(&id)
                    .part_number(n)
                    .body(body)
                    .send()
                    .await
                    .map_err(s3_err("upload part"))?;
                parts.push(CompletedPart::builder().part_number(n).set_e_tag(r.e_tag().map(str::to_owned)).build());
                offset += len;
                n += 1;
            }
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&id)
                .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                .send()
                .await
                .map_err(s3_err("complete multipart upload"))?;
            Ok(())
        }
        .await;
        if result.is_err() {
            let _ = self.client.abort_multipart_upload().bucket(&self.bucket).key(key).upload_id(&id).send().await;
        }
        result
    }
}

// Not a `Store` itself, and crate-private: the AWS SDK is tokio-based and these panic without a
// tokio reactor, so they are only reached through `AnyStore`, which runs each under the runtime's
// `tokio_compat`.
impl S3Store {
    pub(crate) async fn read_manifest(&self, room: &str) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        super::component("room id", room)?;
        let key = self.key(&[room, "manifest.json"]);
        match self.client.get_object().bucket(&self.bucket).key(&key).send().await {
            Ok(o) => {
                let etag = o.e_tag().unwrap_or_default().to_owned();
                let bytes = o.body.collect().await.map_err(s3_err("read manifest"))?.into_bytes().to_vec();
                Ok(Some((bytes, etag)))
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(StoreError::Other(format!("S3 get {key}: {e:?}"))),
        }
    }

    pub(crate) async fn write_manifest(
        &self,
        room: &str,
        bytes: &[u8],
        expected: Option<&str>,
    ) -> Result<bool, StoreError> {
        super::component("room id", room)?;
        let key = self.key(&[room, "manifest.json"]);
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .content_type("application/json")
            .body(ByteStream::from(bytes.to_vec()));
        req = match expected {
            Some(etag) => req.if_match(etag),
            None => req.if_none_match("*"),
        };
        match req.send().await {
            Ok(_) => Ok(true),
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                // 412: the ETag moved (or the object appeared); 409: a concurrent conditional write.
                if matches!(status, Some(412) | Some(409)) {
                    Ok(false)
                } else {
                    Err(StoreError::Other(format!("S3 put {key}: {e:?}")))
                }
            }
        }
    }

    pub(crate) async fn put_file(&self, room: &str, model: &str, name: &str, src: &Path) -> Result<(), StoreError> {
        super::component("room id", room)?;
        super::component("model id", model)?;
        sleap_rtc_core::transfer::validate_name(name).map_err(|e| StoreError::Other(e.to_string()))?;
        let key = self.key(&[room, "models", model, name]);
        let size = tokio::fs::metadata(src).await.map_err(super::io(src.display()))?.len();
        if size > PART {
            return self.put_multipart(&key, src, size).await;
        }
        let body = ByteStream::from_path(src).await.map_err(s3_err("read file"))?;
        self.client.put_object().bucket(&self.bucket).key(&key).body(body).send().await.map_err(s3_err("put file"))?;
        Ok(())
    }

    pub(crate) async fn get_file(&self, room: &str, model: &str, name: &str, dest: &Path) -> Result<(), StoreError> {
        use tokio::io::AsyncWriteExt;
        super::component("room id", room)?;
        super::component("model id", model)?;
        sleap_rtc_core::transfer::validate_name(name).map_err(|e| StoreError::Other(e.to_string()))?;
        let key = self.key(&[room, "models", model, name]);
        let o = self.client.get_object().bucket(&self.bucket).key(&key).send().await.map_err(s3_err("get file"))?;
        let mut body = o.body;
        let mut f = tokio::fs::File::create(dest).await.map_err(super::io(dest.display()))?;
        while let Some(chunk) = body.try_next().await.map_err(s3_err("download"))? {
            f.write_all(&chunk).await.map_err(super::io(dest.display()))?;
        }
        f.sync_all().await.map_err(super::io(dest.display()))?;
        Ok(())
    }

    pub(crate) fn location(&self, room: &str, model: &str) -> String {
        format!("s3://{}/{}/", self.bucket, self.key(&[room, "models", model]))
    }
}
