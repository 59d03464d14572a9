//! Key slots wrapped by AWS KMS (ADR 0182).
//!
//! A KMS slot `keys/<16 hex>` holds the repository's master key encrypted by AWS KMS `Encrypt`
//! under a customer key, with an *encryption context* that binds the ciphertext to this
//! repository and to this slot:
//!
//! ```text
//! 0   magic "FRYW", version u16 LE = 1, reserved u16 = 0, body_len u32 LE (≤ 64 KiB), body JSON
//! ```
//!
//! Body ([`KmsSlot`]): `provider` (`aws-kms`), `key-id` (as given: id, ARN or alias), `key-arn`
//! (what `Encrypt` answered), `region`, `endpoint` (optional), `ciphertext` (base64
//! `CiphertextBlob`), `created`. The plaintext master key is never stored; the encryption context
//! `{"ferry-repository": <id>, "ferry-key-slot": <slot key>}` is not stored either but rebuilt
//! from the repository being opened, so a slot copied to another repository (or renamed) cannot
//! be decrypted.
//!
//! Requests use the KMS JSON protocol (`X-Amz-Target: TrentService.*`,
//! `application/x-amz-json-1.1`) over ferry-http's reqwest client, signed with
//! `object_store`'s SigV4 signer (the one the S3 Object Lock requests use; ADR 0183) with the
//! credentials the S3 backend finds (environment, shared credentials file).

use crate::config::{decode_small, encode_small};
use crate::error::{RepoError, Result};
use base64::Engine as _;
use bytes::Bytes;
use ferry_http::{ClientOptions, HttpClient};
use object_store::aws::AwsCredentialProvider;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Magic of a KMS key slot object.
pub const MAGIC_KMS_SLOT: [u8; 4] = *b"FRYW";
/// The one provider implemented.
pub const PROVIDER_AWS_KMS: &str = "aws-kms";
/// Environment variable the AWS SDKs read for a KMS-only endpoint.
pub const ENDPOINT_ENV: &str = "AWS_ENDPOINT_URL_KMS";
/// Largest `CiphertextBlob` KMS returns (AWS documents 6144 bytes).
const MAX_CIPHERTEXT: usize = 6144;
/// Largest key id, ARN or alias accepted (AWS: 2048).
const MAX_KEY_ID: usize = 2048;

/// Which KMS key wraps a slot, and where to reach it. Carries no secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct KmsKey {
    /// Key id, key ARN, alias name (`alias/…`) or alias ARN (`key_id` accepted too, as the
    /// appliance's JSON API spells fields).
    #[serde(alias = "key_id")]
    pub key_id: String,
    /// AWS region; default: the ARN's region, else `AWS_REGION` / `AWS_DEFAULT_REGION`, else
    /// `us-east-1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// KMS endpoint URL (a VPC endpoint, a test server); default: `AWS_ENDPOINT_URL_KMS`,
    /// `AWS_ENDPOINT_URL`, else `https://kms.<region>.amazonaws.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

impl KmsKey {
    /// A key in the default region and endpoint.
    pub fn new(key_id: impl Into<String>) -> Self {
        Self {
            key_id: key_id.into(),
            region: None,
            endpoint: None,
        }
    }

    /// The region requests go to.
    pub fn resolved_region(&self) -> String {
        if let Some(r) = self.region.as_deref().filter(|r| !r.is_empty()) {
            return r.to_string();
        }
        // arn:aws:kms:REGION:ACCOUNT:key/ID
        if let Some(r) = self
            .key_id
            .strip_prefix("arn:")
            .and_then(|rest| rest.split(':').nth(2))
            .filter(|r| !r.is_empty())
        {
            return r.to_string();
        }
        ["AWS_REGION", "AWS_DEFAULT_REGION"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|r| !r.is_empty()))
            .unwrap_or_else(|| "us-east-1".into())
    }

    fn check(&self, slot: &str) -> Result<()> {
        let bad = |reason: String| RepoError::corrupt(slot, reason);
        if self.key_id.is_empty() || self.key_id.len() > MAX_KEY_ID {
            return Err(bad(format!(
                "KMS key id must have 1 to {MAX_KEY_ID} characters"
            )));
        }
        if self.key_id.chars().any(char::is_control) {
            return Err(bad("KMS key id contains control characters".into()));
        }
        if let Some(r) = &self.region {
            let valid = !r.is_empty()
                && r.len() <= 32
                && r.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid {
                return Err(bad(format!("`{r}` is not an AWS region name")));
            }
        }
        if let Some(e) = &self.endpoint {
            endpoint_url(e).map_err(bad)?;
        }
        Ok(())
    }
}

fn endpoint_url(e: &str) -> std::result::Result<url::Url, String> {
    let u = url::Url::parse(e).map_err(|err| format!("KMS endpoint `{e}` is not a URL: {err}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(format!("KMS endpoint `{e}` must be an http(s) URL"));
    }
    Ok(u)
}

/// The body of a KMS key slot. No field is secret: the ciphertext opens only through KMS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct KmsSlot {
    /// `aws-kms`.
    pub provider: String,
    /// The key as given at creation (id, ARN or alias); sent as `KeyId` to `Decrypt`.
    pub key_id: String,
    /// The key's ARN as `Encrypt` answered it.
    pub key_arn: String,
    /// Region of the key.
    pub region: String,
    /// Endpoint given at creation, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// KMS `CiphertextBlob` of the master key (base64).
    pub ciphertext: String,
    /// When the slot was added (RFC 3339).
    pub created: String,
}

impl KmsSlot {
    /// Encodes the slot object.
    pub fn encode(&self) -> Vec<u8> {
        encode_small(
            MAGIC_KMS_SLOT,
            &serde_json::to_vec(self).expect("slot serializes"),
            None,
        )
    }

    /// Decodes and checks slot object `key`.
    pub fn decode(key: &str, data: &[u8]) -> Result<Self> {
        let (body, _) = decode_small(MAGIC_KMS_SLOT, key, data, 0)?;
        let slot: Self = serde_json::from_slice(body)
            .map_err(|e| RepoError::corrupt(key, format!("KMS key slot JSON: {e}")))?;
        if slot.provider != PROVIDER_AWS_KMS {
            return Err(RepoError::corrupt(
                key,
                format!(
                    "unknown KMS provider `{}` (this build supports `{PROVIDER_AWS_KMS}`)",
                    slot.provider
                ),
            ));
        }
        slot.kms_key().check(key)?;
        slot.blob(key)?;
        Ok(slot)
    }

    /// The key this slot names, with its stored region and endpoint.
    pub fn kms_key(&self) -> KmsKey {
        KmsKey {
            key_id: self.key_id.clone(),
            region: Some(self.region.clone()),
            endpoint: self.endpoint.clone(),
        }
    }

    /// The ciphertext bytes.
    fn blob(&self, key: &str) -> Result<Vec<u8>> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.ciphertext)
            .ok()
            .filter(|b| (1..=MAX_CIPHERTEXT).contains(&b.len()))
            .ok_or_else(|| {
                RepoError::corrupt(
                    key,
                    format!("KMS key slot field `ciphertext` is not base64 of 1 to {MAX_CIPHERTEXT} bytes"),
                )
            })
    }

    /// Whether `filter` (an id, ARN or alias as the user typed it) names this slot's key.
    pub fn matches(&self, filter: &str) -> bool {
        filter == self.key_id
            || filter == self.key_arn
            || self.key_arn.ends_with(&format!("/{filter}"))
    }

    /// Wraps `master` with KMS `Encrypt` into the slot `slot_key` of repository `repo_id`.
    pub async fn create(
        repo_id: &str,
        slot_key: &str,
        master: &[u8; 32],
        key: &KmsKey,
        credentials: AwsCredentialProvider,
    ) -> Result<Self> {
        key.check(slot_key)
            .map_err(|e| RepoError::Usage(e.to_string()))?;
        let client = KmsClient::new(key, None, credentials, slot_key)?;
        let (blob, arn) = client
            .encrypt(&key.key_id, master, &context(repo_id, slot_key))
            .await?;
        Ok(Self {
            provider: PROVIDER_AWS_KMS.into(),
            key_id: key.key_id.clone(),
            key_arn: arn,
            region: key.resolved_region(),
            endpoint: key.endpoint.clone(),
            ciphertext: base64::engine::general_purpose::STANDARD.encode(blob),
            created: crate::time::now_rfc3339(),
        })
    }

    /// The master key, decrypted by KMS `Decrypt` with this repository's encryption context.
    /// `endpoint` replaces the stored one.
    pub async fn unwrap_master(
        &self,
        slot_key: &str,
        repo_id: &str,
        endpoint: Option<&str>,
        credentials: AwsCredentialProvider,
    ) -> Result<[u8; 32]> {
        let blob = self.blob(slot_key)?;
        let client = KmsClient::new(&self.kms_key(), endpoint, credentials, slot_key)?;
        client.check_key_state(&self.key_id).await?;
        client
            .decrypt(&self.key_id, &blob, &context(repo_id, slot_key))
            .await
    }
}

/// The encryption context of slot `slot_key` in repository `repo_id`.
pub fn context(repo_id: &str, slot_key: &str) -> serde_json::Value {
    serde_json::json!({ "ferry-repository": repo_id, "ferry-key-slot": slot_key })
}

/// One KMS endpoint with credentials. Its `Debug` shows neither credentials nor payloads.
struct KmsClient {
    http: HttpClient,
    credentials: AwsCredentialProvider,
    region: String,
    endpoint: url::Url,
    key_id: String,
    slot: String,
}

/// An error answer of KMS: its `__type` (without namespace) and message.
struct KmsFault {
    kind: String,
    message: String,
}

impl KmsClient {
    fn new(
        key: &KmsKey,
        endpoint_override: Option<&str>,
        credentials: AwsCredentialProvider,
        slot: &str,
    ) -> Result<Self> {
        let region = key.resolved_region();
        let endpoint = endpoint_override
            .map(str::to_string)
            .or_else(|| key.endpoint.clone())
            .or_else(|| {
                [ENDPOINT_ENV, "AWS_ENDPOINT_URL"]
                    .iter()
                    .find_map(|v| std::env::var(v).ok().filter(|e| !e.is_empty()))
            })
            .unwrap_or_else(|| format!("https://kms.{region}.amazonaws.com"));
        let endpoint = endpoint_url(&endpoint).map_err(RepoError::Usage)?;
        let http = HttpClient::new(&ClientOptions {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            ..ClientOptions::new("AWS KMS", ferry_tls::Trust::System)
        })
        .map_err(|e| RepoError::Usage(format!("AWS KMS client: {e}")))?;
        Ok(Self {
            http,
            credentials,
            region,
            endpoint,
            key_id: key.key_id.clone(),
            slot: slot.to_string(),
        })
    }

    fn error(&self, reason: impl Into<String>) -> RepoError {
        RepoError::Kms {
            slot: self.slot.clone(),
            key_id: self.key_id.clone(),
            reason: reason.into(),
        }
    }

    /// Signs and sends one `TrentService.<action>` call, retrying throttling and transient
    /// failures; answers the JSON body or KMS's error.
    async fn call(
        &self,
        action: &str,
        body: &serde_json::Value,
    ) -> Result<std::result::Result<serde_json::Value, KmsFault>> {
        let body = Bytes::from(serde_json::to_vec(body).expect("request serializes"));
        let target = format!("TrentService.{action}");
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let cred = self
                .credentials
                .get_credential()
                .await
                .map_err(|e| self.error(format!("no AWS credentials for KMS: {e}")))?;
            let rb = crate::sigv4::signed_request(
                &self.http,
                &cred,
                "kms",
                &self.region,
                http::Method::POST,
                &self.endpoint,
                &[
                    ("content-type", "application/x-amz-json-1.1".into()),
                    ("x-amz-target", target.clone()),
                ],
                body.clone(),
            )
            .map_err(|e| self.error(format!("building the {action} request: {e}")))?;
            let resp = match self.http.send(action, rb).await {
                Ok(r) => r,
                Err(e) if e.is_retryable() && attempt < 3 => {
                    tracing::debug!(error = %e, action, "retrying AWS KMS request");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                    continue;
                }
                Err(e) => {
                    return Err(
                        self.error(format!("AWS KMS at {} is unreachable: {e}", self.endpoint))
                    );
                }
            };
            let status = resp.status();
            let text = self
                .http
                .body_limited(action, resp, 64 << 10)
                .await
                .map_err(|e| self.error(format!("reading the {action} answer: {e}")))?;
            if status.is_success() {
                return serde_json::from_slice(&text)
                    .map(Ok)
                    .map_err(|e| self.error(format!("{action} answer is not JSON: {e}")));
            }
            if (status.is_server_error() || status.as_u16() == 429) && attempt < 3 {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                continue;
            }
            return Ok(Err(parse_fault(status.as_u16(), &text)));
        }
    }

    /// Explains a KMS error answer to the operator (never quoting request payloads).
    fn fault(&self, action: &str, f: KmsFault) -> RepoError {
        let hint = match f.kind.as_str() {
            "AccessDeniedException" => format!(
                "access denied: the credentials need kms:{action} on the key (and the key policy must allow them)"
            ),
            "DisabledException" => {
                "the KMS key is disabled: enable it (`aws kms enable-key`) or open the repository with a password".into()
            }
            "KMSInvalidStateException" => "the KMS key is not usable in its current state (pending deletion or import): cancel the deletion (`aws kms cancel-key-deletion`) or open the repository with a password".into(),
            "InvalidCiphertextException" => "KMS refused the ciphertext: the slot belongs to another repository or slot (encryption context mismatch) or was altered".into(),
            "IncorrectKeyException" => "the ciphertext was made under another KMS key than the slot names".into(),
            "NotFoundException" => format!("the KMS key does not exist in region {}", self.region),
            "UnrecognizedClientException" | "InvalidSignatureException" | "IncompleteSignature" | "ExpiredTokenException" => {
                "AWS rejected the credentials (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN)".into()
            }
            _ => "AWS KMS refused the request".into(),
        };
        let detail = if f.message.is_empty() {
            f.kind
        } else {
            format!("{}: {}", f.kind, f.message)
        };
        self.error(format!("{action}: {hint} ({detail})"))
    }

    async fn encrypt(
        &self,
        key_id: &str,
        plaintext: &[u8],
        ctx: &serde_json::Value,
    ) -> Result<(Vec<u8>, String)> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let req = serde_json::json!({
            "KeyId": key_id,
            "Plaintext": b64.encode(plaintext),
            "EncryptionContext": ctx,
        });
        let answer = self
            .call("Encrypt", &req)
            .await?
            .map_err(|f| self.fault("Encrypt", f))?;
        let blob = answer["CiphertextBlob"]
            .as_str()
            .and_then(|s| b64.decode(s).ok())
            .filter(|b| (1..=MAX_CIPHERTEXT).contains(&b.len()))
            .ok_or_else(|| self.error("Encrypt answered no usable CiphertextBlob"))?;
        let arn = answer["KeyId"].as_str().unwrap_or(key_id).to_string();
        Ok((blob, arn))
    }

    async fn decrypt(
        &self,
        key_id: &str,
        blob: &[u8],
        ctx: &serde_json::Value,
    ) -> Result<[u8; 32]> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let req = serde_json::json!({
            "KeyId": key_id,
            "CiphertextBlob": b64.encode(blob),
            "EncryptionContext": ctx,
        });
        let answer = self
            .call("Decrypt", &req)
            .await?
            .map_err(|f| self.fault("Decrypt", f))?;
        answer["Plaintext"]
            .as_str()
            .and_then(|s| b64.decode(s).ok())
            .and_then(|p| <[u8; 32]>::try_from(p.as_slice()).ok())
            .ok_or_else(|| self.error("Decrypt answered no 32-byte master key"))
    }

    /// Refuses a key that `DescribeKey` reports as not enabled, with the state and what to
    /// do. KMS refuses `Decrypt` under such a key too, but some emulators do not, and the
    /// state names the cause (disabled, pending deletion) better than the error does. A
    /// policy that grants `Decrypt` but not `DescribeKey` skips the check.
    async fn check_key_state(&self, key_id: &str) -> Result<()> {
        let answer = match self
            .call("DescribeKey", &serde_json::json!({ "KeyId": key_id }))
            .await?
        {
            Ok(a) => a,
            Err(f) if f.kind == "AccessDeniedException" => {
                tracing::debug!(
                    key = key_id,
                    "DescribeKey denied; not checking the key state"
                );
                return Ok(());
            }
            Err(f) => return Err(self.fault("DescribeKey", f)),
        };
        let meta = &answer["KeyMetadata"];
        match meta["KeyState"].as_str() {
            None | Some("Enabled") => Ok(()),
            Some("Disabled") => Err(self.fault(
                "Decrypt",
                KmsFault {
                    kind: "DisabledException".into(),
                    message: "DescribeKey reports KeyState Disabled".into(),
                },
            )),
            Some(state) => {
                let when = meta["DeletionDate"]
                    .as_f64()
                    .and_then(|t| chrono::DateTime::from_timestamp(t as i64, 0))
                    .map(|d| format!(", deletion date {}", d.to_rfc3339()))
                    .unwrap_or_default();
                Err(self.fault(
                    "Decrypt",
                    KmsFault {
                        kind: "KMSInvalidStateException".into(),
                        message: format!("DescribeKey reports KeyState {state}{when}"),
                    },
                ))
            }
        }
    }
}

/// Parses a KMS error body (`{"__type": "ns#Kind", "message": "…"}`); bounded, never panics.
fn parse_fault(status: u16, body: &[u8]) -> KmsFault {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let kind = v["__type"]
        .as_str()
        .map(|t| t.rsplit('#').next().unwrap_or(t).to_string())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| format!("HTTP {status}"));
    let message = v["message"]
        .as_str()
        .or_else(|| v["Message"].as_str())
        .unwrap_or("")
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(300)
        .collect();
    KmsFault {
        kind: kind.chars().filter(|c| !c.is_control()).take(100).collect(),
        message,
    }
}

/// Fuzzing entry: the slot decoder and the error-body parser on untrusted bytes.
pub fn fuzz(data: &[u8]) {
    let _ = KmsSlot::decode("keys/fuzz", data);
    let f = parse_fault(400, data);
    let _ = (f.kind, f.message);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn slot() -> KmsSlot {
        KmsSlot {
            provider: PROVIDER_AWS_KMS.into(),
            key_id: "alias/ferry".into(),
            key_arn: "arn:aws:kms:eu-west-1:123456789012:key/0b3e".into(),
            region: "eu-west-1".into(),
            endpoint: Some("http://127.0.0.1:5000".into()),
            ciphertext: base64::engine::general_purpose::STANDARD.encode([7u8; 184]),
            created: "2026-12-07T22:00:00Z".into(),
        }
    }

    #[test]
    fn slot_round_trips_and_refuses_what_it_does_not_know() {
        let s = slot();
        let data = s.encode();
        assert_eq!(&data[..4], b"FRYW");
        assert_eq!(KmsSlot::decode("keys/a", &data).unwrap(), s);
        // A password slot is not a KMS slot and vice versa.
        assert!(crate::config::KeySlot::decode("keys/a", &data).is_err());
        let mut future = data.clone();
        future[4] = 2;
        let e = KmsSlot::decode("keys/a", &future).unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");
        for (field, value) in [
            ("provider", serde_json::json!("azure-key-vault")),
            ("ciphertext", serde_json::json!("not base64!")),
            ("ciphertext", serde_json::json!("")),
            ("region", serde_json::json!("EU WEST")),
            ("endpoint", serde_json::json!("ftp://x")),
            ("key-id", serde_json::json!("")),
        ] {
            let mut v = serde_json::to_value(&s).unwrap();
            v[field] = value;
            let bad = encode_small(MAGIC_KMS_SLOT, &serde_json::to_vec(&v).unwrap(), None);
            let e = KmsSlot::decode("keys/a", &bad).unwrap_err();
            assert!(e.to_string().contains("keys/a"), "{field}: {e}");
        }
        let mut v = serde_json::to_value(&s).unwrap();
        v["plaintext"] = serde_json::json!("00");
        let bad = encode_small(MAGIC_KMS_SLOT, &serde_json::to_vec(&v).unwrap(), None);
        assert!(
            KmsSlot::decode("keys/a", &bad).is_err(),
            "unknown fields refused"
        );
    }

    #[test]
    fn region_comes_from_the_flag_then_the_arn() {
        let mut k = KmsKey::new("arn:aws:kms:ap-south-2:1:key/x");
        assert_eq!(k.resolved_region(), "ap-south-2");
        k.region = Some("eu-central-1".into());
        assert_eq!(k.resolved_region(), "eu-central-1");
    }

    #[test]
    fn slot_matches_its_key_by_id_arn_or_key_uuid() {
        let s = slot();
        assert!(s.matches("alias/ferry"));
        assert!(s.matches("arn:aws:kms:eu-west-1:123456789012:key/0b3e"));
        assert!(s.matches("0b3e"));
        assert!(!s.matches("alias/other"));
    }

    #[test]
    fn faults_parse_without_namespace_and_bounded() {
        let f = parse_fault(
            400,
            br#"{"__type":"com.amazonaws.kms#DisabledException","message":"key is disabled"}"#,
        );
        assert_eq!(f.kind, "DisabledException");
        assert_eq!(f.message, "key is disabled");
        let f = parse_fault(503, b"<html>");
        assert_eq!(f.kind, "HTTP 503");
        let long = format!(r#"{{"__type":"X","Message":"{}"}}"#, "a".repeat(5000));
        assert_eq!(parse_fault(400, long.as_bytes()).message.len(), 300);
    }

    proptest! {
        #[test]
        fn any_slot_round_trips(
            key_id in "[a-zA-Z0-9/:_-]{1,80}",
            region in "[a-z0-9-]{1,20}",
            blob in proptest::collection::vec(any::<u8>(), 1..600),
            endpoint in proptest::option::of("http://[a-z]{1,10}:[1-9][0-9]{0,3}"),
        ) {
            let s = KmsSlot {
                provider: PROVIDER_AWS_KMS.into(),
                key_id,
                key_arn: "arn:aws:kms:r:1:key/k".into(),
                region,
                endpoint,
                ciphertext: base64::engine::general_purpose::STANDARD.encode(&blob),
                created: "2026-12-07T22:00:00Z".into(),
            };
            let back = KmsSlot::decode("keys/p", &s.encode()).unwrap();
            prop_assert_eq!(&back, &s);
            prop_assert_eq!(back.blob("keys/p").unwrap(), blob);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            fuzz(&data);
            let mut framed = encode_small(MAGIC_KMS_SLOT, &data, None);
            fuzz(&framed);
            framed.truncate(framed.len() / 2);
            fuzz(&framed);
        }
    }
}
