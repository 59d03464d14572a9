//! A vim25 SOAP client on [`ferry_http::HttpClient`]: one pooled keep-alive connection, the
//! `vmware_soap_session` cookie kept by the client's cookie store, TLS pinned as the source says.

use crate::error::VimError;
use crate::xml::{self, Body, MoRef, Node, Response};
use ferry_core::Secret;
use ferry_http::{ClientOptions, HttpClient};
use std::collections::BTreeMap;
use std::time::Duration;

/// Largest response accepted (a page of 1,000 VMs with their devices is a few MiB).
const MAX_RESPONSE: usize = 256 << 20;
/// Tries of a read-only call whose connection broke.
pub const ATTEMPTS: u32 = 4;
/// Calls that read only (or create only a throwaway view), so a retry after a lost answer is
/// harmless. `ContinueRetrievePropertiesEx` is not: its token may have advanced.
pub const IDEMPOTENT: &[&str] = &[
    "RetrieveServiceContent",
    "RetrievePropertiesEx",
    "RetrieveProperties",
    "CreateContainerView",
    "QueryChangedDiskAreas",
];
/// Longest a task may run before Ferry gives up on it.
pub const TASK_TIMEOUT: Duration = Duration::from_secs(3600);

/// What `RetrieveServiceContent` answered (the parts Ferry uses).
#[derive(Debug, Clone)]
pub struct ServiceContent {
    /// The inventory root folder.
    pub root_folder: MoRef,
    /// The property collector.
    pub property_collector: MoRef,
    /// The view manager.
    pub view_manager: MoRef,
    /// The session manager.
    pub session_manager: MoRef,
    /// `about.apiVersion` (`8.0.2.0`).
    pub api_version: String,
    /// `about.fullName`.
    pub full_name: String,
    /// `about.apiType`: `VirtualCenter` or `HostAgent`.
    pub api_type: String,
    /// `about.instanceUuid`.
    pub instance_uuid: String,
}

/// One object of a property collector answer.
#[derive(Debug, Clone, Default)]
pub struct ObjectContent {
    /// The object.
    pub obj: Option<MoRef>,
    /// Property path → value element (`<val>`).
    pub props: BTreeMap<String, Node>,
}

impl ObjectContent {
    /// The value element of `path`.
    pub fn prop(&self, path: &str) -> Option<&Node> {
        self.props.get(path)
    }

    /// The trimmed text of `path`.
    pub fn text(&self, path: &str) -> Option<&str> {
        self.props.get(path).map(|n| n.text.trim())
    }
}

/// A changed area of a disk, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Area {
    /// Start offset.
    pub start: u64,
    /// Length.
    pub length: u64,
}

/// A logged-in vim25 session.
#[derive(Debug)]
pub struct VimClient {
    http: HttpClient,
    url: url::Url,
    source: String,
    content: ServiceContent,
    soap_action: String,
}

impl VimClient {
    /// Connects to `url` (`https://vcenter` or `https://vcenter/sdk`), reads the service content
    /// and logs in. `opts` come from the source's config; cookies are switched on here.
    pub async fn connect(
        url: &str,
        opts: &ClientOptions,
        username: &str,
        password: &Secret,
    ) -> Result<Self, VimError> {
        let source = opts.source.clone();
        let mut o = opts.clone();
        o.cookies = true;
        let http = HttpClient::new(&o)?;
        let mut u = url::Url::parse(url)
            .map_err(|e| VimError::protocol(&source, "connect", format!("bad url `{url}`: {e}")))?;
        if u.path().is_empty() || u.path() == "/" {
            u.set_path("/sdk");
        }
        u.set_query(None);
        let mut me = Self {
            http,
            url: u,
            source,
            content: ServiceContent {
                root_folder: MoRef::new("Folder", ""),
                property_collector: MoRef::new("PropertyCollector", ""),
                view_manager: MoRef::new("ViewManager", ""),
                session_manager: MoRef::new("SessionManager", ""),
                api_version: String::new(),
                full_name: String::new(),
                api_type: String::new(),
                instance_uuid: String::new(),
            },
            // Any version the server knows; refined once `about.apiVersion` is known.
            soap_action: "urn:vim25/6.5".into(),
        };
        let r = me
            .call(
                "RetrieveServiceContent",
                Body::new().moref("_this", &MoRef::new("ServiceInstance", "ServiceInstance")),
            )
            .await?;
        let rv = r
            .child("returnval")
            .ok_or_else(|| me.protocol("RetrieveServiceContent", "no returnval"))?;
        let mo = |path: &str| {
            rv.child(path).and_then(Node::moref).ok_or_else(|| {
                VimError::protocol(
                    &me.source,
                    "RetrieveServiceContent",
                    format!("no {path} in the service content"),
                )
            })
        };
        let about = |f: &str| rv.text_at(&format!("about/{f}")).unwrap_or("").to_string();
        me.content = ServiceContent {
            root_folder: mo("rootFolder")?,
            property_collector: mo("propertyCollector")?,
            view_manager: mo("viewManager")?,
            session_manager: mo("sessionManager")?,
            api_version: about("apiVersion"),
            full_name: about("fullName"),
            api_type: about("apiType"),
            instance_uuid: about("instanceUuid"),
        };
        if !me.content.api_version.is_empty() {
            me.soap_action = format!("urn:vim25/{}", me.content.api_version);
        }
        me.call(
            "Login",
            Body::new()
                .moref("_this", &me.content.session_manager.clone())
                .text("userName", username)
                .text("password", password.expose()),
        )
        .await?;
        tracing::debug!(source = %me.source, server = %me.content.full_name, "vSphere login");
        Ok(me)
    }

    /// The service content.
    pub fn content(&self) -> &ServiceContent {
        &self.content
    }

    /// The source name.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn protocol(&self, call: &str, m: impl Into<String>) -> VimError {
        VimError::protocol(&self.source, call, m)
    }

    /// Calls `method` with `body`; returns the `<methodResponse>` element. Read-only calls
    /// ([`IDEMPOTENT`]) are retried when the connection breaks or times out, up to [`ATTEMPTS`]
    /// times; anything that changes vCenter is not, since it may have run.
    pub async fn call(&self, method: &str, body: Body) -> Result<Node, VimError> {
        let envelope = body.envelope(method);
        let mut attempt = 1;
        loop {
            match self.call_once(method, &envelope).await {
                Err(e)
                    if attempt < ATTEMPTS
                        && IDEMPOTENT.contains(&method)
                        && e.is_transport_retryable() =>
                {
                    tracing::warn!(source = %self.source, call = method, attempt, error = %e, "vSphere call failed in transit; retrying");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    async fn call_once(&self, method: &str, envelope: &str) -> Result<Node, VimError> {
        let req = self
            .http
            .inner()
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "text/xml; charset=utf-8")
            .header("SOAPAction", &self.soap_action)
            .body(envelope.to_string());
        let resp = self.http.send(method, req).await?;
        let status = resp.status().as_u16();
        let bytes = self.http.body_limited(method, resp, MAX_RESPONSE).await?;
        // Faults come with HTTP 500; anything else non-2xx without an envelope is transport.
        match xml::parse_response(&bytes) {
            Ok(Response::Ok(n)) if (200..300).contains(&status) => Ok(n),
            Ok(Response::Ok(_)) => Err(self.protocol(method, format!("HTTP {status}"))),
            Ok(Response::Fault(f)) => Err(VimError::from_fault(&self.source, method, f)),
            Err(e) if !(200..300).contains(&status) => Err(self.protocol(
                method,
                format!("HTTP {status} without a SOAP envelope ({e})"),
            )),
            Err(e) => Err(VimError::xml(&self.source, method, e)),
        }
    }

    /// Logs out; errors are logged, not returned (the session expires anyway).
    pub async fn logout(&self) {
        let b = Body::new().moref("_this", &self.content.session_manager);
        if let Err(e) = self.call("Logout", b).await {
            tracing::debug!(error = %e, "vSphere logout failed");
        }
    }

    /// Every object of `kind` (`VirtualMachine`, `HostSystem`, …) under the root folder with the
    /// properties `paths`, through a ContainerView and RetrievePropertiesEx pages of `page`
    /// objects (ContinueRetrievePropertiesEx until the token ends). One round trip per page,
    /// not per object.
    pub async fn retrieve_all(
        &self,
        kind: &str,
        paths: &[&str],
        page: u32,
    ) -> Result<Vec<ObjectContent>, VimError> {
        self.retrieve_kinds(&[(kind, paths)], page).await
    }

    /// [`Self::retrieve_all`] for several kinds at once, each with its own paths: one view and
    /// one set of pages for all of them (tell them apart by `obj.kind`).
    pub async fn retrieve_kinds(
        &self,
        kinds: &[(&str, &[&str])],
        page: u32,
    ) -> Result<Vec<ObjectContent>, VimError> {
        let mut view = Body::new()
            .moref("_this", &self.content.view_manager)
            .moref("container", &self.content.root_folder);
        for (kind, _) in kinds {
            view = view.text("type", kind);
        }
        let r = self
            .call("CreateContainerView", view.text("recursive", "true"))
            .await?;
        let view = r
            .child("returnval")
            .and_then(Node::moref)
            .ok_or_else(|| self.protocol("CreateContainerView", "no view in the answer"))?;
        let out = self.retrieve_view(&view, kinds, page).await;
        let d = self
            .call("DestroyView", Body::new().moref("_this", &view))
            .await;
        if let Err(e) = d {
            tracing::debug!(error = %e, "DestroyView failed");
        }
        out
    }

    async fn retrieve_view(
        &self,
        view: &MoRef,
        kinds: &[(&str, &[&str])],
        page: u32,
    ) -> Result<Vec<ObjectContent>, VimError> {
        let traversal = Body::new()
            .text("name", "traverseView")
            .text("type", "ContainerView")
            .text("path", "view")
            .text("skip", "false");
        let obj_spec = Body::new().moref("obj", view).text("skip", "true").nested(
            "selectSet",
            Some("TraversalSpec"),
            traversal,
        );
        let mut spec = Body::new();
        for (kind, paths) in kinds {
            spec = spec.nested("propSet", None, prop_spec(kind, paths));
        }
        let spec = spec.nested("objectSet", None, obj_spec);
        let body = Body::new()
            .moref("_this", &self.content.property_collector)
            .nested("specSet", None, spec)
            .nested(
                "options",
                None,
                Body::new().text("maxObjects", &page.max(1).to_string()),
            );
        let mut out = Vec::new();
        let mut r = self.call("RetrievePropertiesEx", body).await?;
        // No `returnval` at all: nothing matched.
        while let Some(rv) = r.child("returnval") {
            out.extend(rv.all("objects").map(object_content));
            let Some(token) = rv.text_at("token").filter(|t| !t.is_empty()) else {
                break;
            };
            r = self
                .call(
                    "ContinueRetrievePropertiesEx",
                    Body::new()
                        .moref("_this", &self.content.property_collector)
                        .text("token", token),
                )
                .await?;
        }
        Ok(out)
    }

    /// Properties `paths` of one object.
    pub async fn retrieve_one(
        &self,
        obj: &MoRef,
        paths: &[&str],
    ) -> Result<ObjectContent, VimError> {
        let spec = Body::new()
            .nested("propSet", None, prop_spec(&obj.kind, paths))
            .nested(
                "objectSet",
                None,
                Body::new().moref("obj", obj).text("skip", "false"),
            );
        let body = Body::new()
            .moref("_this", &self.content.property_collector)
            .nested("specSet", None, spec)
            .nested("options", None, Body::new());
        let r = self.call("RetrievePropertiesEx", body).await?;
        Ok(r.at("returnval/objects")
            .map(object_content)
            .unwrap_or_default())
    }

    /// Waits for `task` to end; returns its `info.result` (e.g. the snapshot a
    /// CreateSnapshot_Task made) or its error as a [`VimError::Fault`] named after `what`.
    pub async fn wait_task(&self, task: &MoRef, what: &str) -> Result<Option<Node>, VimError> {
        let started = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(20);
        let mut last_progress = -1;
        loop {
            let info = self.retrieve_one(task, &["info"]).await?;
            let info = info
                .prop("info")
                .ok_or_else(|| self.protocol(what, format!("task {task} has no info")))?;
            match info.text_at("state").unwrap_or("") {
                "success" => return Ok(info.child("result").cloned()),
                "error" => {
                    let err = info.child("error");
                    let kind = err
                        .and_then(|e| e.child("fault"))
                        .map(|f| f.type_name().to_string());
                    let message = err
                        .and_then(|e| e.text_at("localizedMessage"))
                        .unwrap_or("")
                        .to_string();
                    return Err(VimError::from_fault(
                        &self.source,
                        what,
                        xml::Fault {
                            code: "TaskError".into(),
                            message,
                            kind,
                            detail: None,
                        },
                    ));
                }
                "queued" | "running" => {}
                other => {
                    return Err(self.protocol(what, format!("task {task} in state `{other}`")));
                }
            }
            if let Some(p) = info.i64_at("progress").filter(|p| *p != last_progress) {
                last_progress = p;
                tracing::debug!(task = %task, progress = p, "{what}");
            }
            if started.elapsed() > TASK_TIMEOUT {
                let _ = self
                    .call("CancelTask", Body::new().moref("_this", task))
                    .await;
                return Err(self.protocol(what, "task did not finish in time; cancelled"));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// Runs a `*_Task` method and waits for it.
    pub async fn run_task(&self, method: &str, body: Body) -> Result<Option<Node>, VimError> {
        let r = self.call(method, body).await?;
        let task = r
            .child("returnval")
            .and_then(Node::moref)
            .ok_or_else(|| self.protocol(method, "no task in the answer"))?;
        self.wait_task(&task, method).await
    }

    /// CreateSnapshot_Task without memory; returns the snapshot.
    pub async fn create_snapshot(
        &self,
        vm: &MoRef,
        name: &str,
        description: &str,
        quiesce: bool,
    ) -> Result<MoRef, VimError> {
        let r = self
            .run_task(
                "CreateSnapshot_Task",
                Body::new()
                    .moref("_this", vm)
                    .text("name", name)
                    .text("description", description)
                    .text("memory", "false")
                    .text("quiesce", if quiesce { "true" } else { "false" }),
            )
            .await?;
        r.as_ref()
            .and_then(Node::moref)
            .ok_or_else(|| self.protocol("CreateSnapshot_Task", "the task returned no snapshot"))
    }

    /// RemoveSnapshot_Task of one snapshot (children kept, disks consolidated).
    pub async fn remove_snapshot(&self, snapshot: &MoRef) -> Result<(), VimError> {
        self.run_task(
            "RemoveSnapshot_Task",
            Body::new()
                .moref("_this", snapshot)
                .text("removeChildren", "false")
                .text("consolidate", "true"),
        )
        .await?;
        Ok(())
    }

    /// ReconfigVM_Task with `changeTrackingEnabled = enabled`.
    pub async fn set_change_tracking(&self, vm: &MoRef, enabled: bool) -> Result<(), VimError> {
        self.run_task(
            "ReconfigVM_Task",
            Body::new().moref("_this", vm).nested(
                "spec",
                None,
                Body::new().text(
                    "changeTrackingEnabled",
                    if enabled { "true" } else { "false" },
                ),
            ),
        )
        .await?;
        Ok(())
    }

    /// QueryChangedDiskAreas of disk `device_key` in `snapshot` since `change_id` (`*`: every
    /// allocated area), paged: each answer covers `[startOffset, startOffset + length)` and the
    /// next call starts where it ended, until `capacity`. Areas come back sorted and clipped to
    /// the capacity.
    pub async fn query_changed_disk_areas(
        &self,
        vm: &MoRef,
        snapshot: &MoRef,
        device_key: i32,
        capacity: u64,
        change_id: &str,
    ) -> Result<Vec<Area>, VimError> {
        const CALL: &str = "QueryChangedDiskAreas";
        let mut out = Vec::new();
        let mut offset = 0u64;
        while offset < capacity {
            let r = self
                .call(
                    CALL,
                    Body::new()
                        .moref("_this", vm)
                        .moref("snapshot", snapshot)
                        .text("deviceKey", &device_key.to_string())
                        .text("startOffset", &offset.to_string())
                        .text("changeId", change_id),
                )
                .await?;
            let rv = r
                .child("returnval")
                .ok_or_else(|| self.protocol(CALL, "no DiskChangeInfo in the answer"))?;
            let page = parse_change_info(rv).map_err(|m| self.protocol(CALL, m))?;
            if page.start != offset {
                return Err(self.protocol(
                    CALL,
                    format!("asked from offset {offset}, answered from {}", page.start),
                ));
            }
            for a in page.areas {
                if a.start < page.start || a.start + a.length > page.start + page.length {
                    return Err(self.protocol(
                        CALL,
                        format!(
                            "area {}+{} lies outside the answered window {}+{}",
                            a.start, a.length, page.start, page.length
                        ),
                    ));
                }
                let end = (a.start + a.length).min(capacity);
                if end > a.start {
                    out.push(Area {
                        start: a.start,
                        length: end - a.start,
                    });
                }
            }
            if page.length == 0 {
                // A server that makes no progress would loop forever; the rest is unknown.
                return Err(self.protocol(
                    CALL,
                    format!("empty window at offset {offset} of {capacity}"),
                ));
            }
            offset = page.start + page.length;
        }
        out.sort_by_key(|a| a.start);
        Ok(out)
    }
}

/// One page of QueryChangedDiskAreas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangePage {
    /// `startOffset`.
    pub start: u64,
    /// `length` of the window.
    pub length: u64,
    /// `changedArea`.
    pub areas: Vec<Area>,
}

/// Reads a `DiskChangeInfo` (sans I/O; overflow and negative values refused).
pub fn parse_change_info(n: &Node) -> Result<ChangePage, String> {
    let num = |n: &Node, f: &str| -> Result<u64, String> {
        let t = n
            .text_at(f)
            .ok_or_else(|| format!("DiskChangeInfo without {f}"))?;
        t.parse::<u64>()
            .map_err(|_| format!("DiskChangeInfo {f} `{t}` is not a byte count"))
    };
    let start = num(n, "startOffset")?;
    let length = num(n, "length")?;
    start
        .checked_add(length)
        .ok_or("DiskChangeInfo window overflows")?;
    let mut areas = Vec::new();
    for a in n.all("changedArea") {
        let s = num(a, "start")?;
        let l = num(a, "length")?;
        s.checked_add(l).ok_or("changed area overflows")?;
        areas.push(Area {
            start: s,
            length: l,
        });
    }
    Ok(ChangePage {
        start,
        length,
        areas,
    })
}

fn prop_spec(kind: &str, paths: &[&str]) -> Body {
    let mut b = Body::new().text("type", kind).text("all", "false");
    for p in paths {
        b = b.text("pathSet", p);
    }
    b
}

fn object_content(n: &Node) -> ObjectContent {
    let mut props = BTreeMap::new();
    for p in n.all("propSet") {
        if let (Some(name), Some(val)) = (p.text_at("name"), p.child("val")) {
            props.insert(name.to_string(), val.clone());
        }
    }
    ObjectContent {
        obj: n.child("obj").and_then(Node::moref),
        props,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_info_is_checked() {
        let n = xml::parse(b"<r><startOffset>0</startOffset><length>100</length><changedArea><start>10</start><length>5</length></changedArea></r>").unwrap();
        let p = parse_change_info(&n).unwrap();
        assert_eq!(
            p.areas,
            vec![Area {
                start: 10,
                length: 5
            }]
        );
        for bad in [
            &b"<r><length>1</length></r>"[..],
            b"<r><startOffset>-1</startOffset><length>1</length></r>",
            b"<r><startOffset>18446744073709551615</startOffset><length>1</length></r>",
            b"<r><startOffset>0</startOffset><length>1</length><changedArea><start>x</start><length>1</length></changedArea></r>",
        ] {
            assert!(parse_change_info(&xml::parse(bad).unwrap()).is_err());
        }
    }
}
