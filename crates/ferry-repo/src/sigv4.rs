//! SigV4-signed requests for the AWS calls `object_store` does not make itself (S3 Object Lock,
//! KMS), signed with `object_store`'s own signer (ADR 0183) and sent with ferry-http's client.

use bytes::Bytes;
use ferry_http::HttpClient;
use object_store::aws::{AwsAuthorizer, AwsCredential};
use object_store::client::HttpRequestBody;

/// A request `method url` with `headers` and `body`, signed for `service` in `region`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn signed_request(
    http: &HttpClient,
    cred: &AwsCredential,
    service: &str,
    region: &str,
    method: http::Method,
    url: &url::Url,
    headers: &[(&str, String)],
    body: Bytes,
) -> Result<reqwest::RequestBuilder, http::Error> {
    let mut req = http::Request::builder()
        .method(method.clone())
        .uri(url.as_str());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let mut req = req.body(HttpRequestBody::from(body.clone()))?;
    AwsAuthorizer::new(cred, service, region).authorize(&mut req, None);
    let (parts, _) = req.into_parts();
    let mut rb = http.inner().request(method, url.clone()).body(body);
    for (k, v) in &parts.headers {
        rb = rb.header(k, v);
    }
    Ok(rb)
}
