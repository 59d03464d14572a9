//! A WS-Management client on [`ferry_http::HttpClient`]: WMI Enumerate/Pull (with WQL filters),
//! Get and method invocation in `root/virtualization/v2`, Msvm_ConcreteJob polling, and the
//! Windows remote shell cycle. Authentication (NTLM with message encryption by default, Basic
//! for labs) lives in [`crate::auth`] (ADR 0112).

use crate::auth::AuthMethod;
use crate::cim::{self, Epr, Instance, Param};
use crate::error::{FaultKind, HypervError};
use crate::wsman::{self, Reply, Request};
use ferry_core::Secret;
use ferry_http::{ClientOptions, HttpClient};
use std::time::{Duration, Instant};

/// Items asked for per Enumerate/Pull.
pub const PAGE: u32 = 512;
/// Longest a WMI job may run before Ferry gives up on it.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(3600);

/// WMI's "method parameters checked, job started" return value.
pub const JOB_STARTED: u64 = 4096;
/// `Msvm_ConcreteJob.JobState`: completed.
pub const JOB_COMPLETED: u64 = 7;

/// Credentials (NTLM or Basic).
#[derive(Clone)]
pub struct Credentials {
    /// User (`DOMAIN\user`, `user@domain` or a local account).
    pub user: String,
    /// Password.
    pub password: Secret,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// What a remote command printed and how it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandOutput {
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
    /// Exit code.
    pub exit_code: i64,
}

/// A WS-Man endpoint with credentials.
#[derive(Debug)]
pub struct WsmanClient {
    http: HttpClient,
    url: url::Url,
    source: String,
    creds: Credentials,
    auth: crate::auth::Auth,
}

impl WsmanClient {
    /// A client for `url` (`https://host:5986/wsman`; a URL without a path gets `/wsman`) that
    /// logs in with NTLM (see [`Self::with_auth`]). Nothing is sent until the first call.
    pub fn new(url: &str, opts: &ClientOptions, creds: Credentials) -> Result<Self, HypervError> {
        let source = opts.source.clone();
        let http = HttpClient::new(opts)?;
        let mut u = url::Url::parse(url).map_err(|e| {
            HypervError::protocol(&source, "connect", format!("bad url `{url}`: {e}"))
        })?;
        if u.path().is_empty() || u.path() == "/" {
            u.set_path("/wsman");
        }
        u.set_query(None);
        let auth = crate::auth::Auth::new(AuthMethod::default(), None, &u);
        Ok(Self {
            http,
            url: u,
            source,
            creds,
            auth,
        })
    }

    /// Logs in with `method` (NTLM `domain`, when the user name does not carry one).
    pub fn with_auth(mut self, method: AuthMethod, domain: Option<String>) -> Self {
        self.auth = crate::auth::Auth::new(method, domain, &self.url);
        self
    }

    /// Kerberos settings: realm, KDC, keytab (ADR 0159).
    pub fn with_kerberos(mut self, opts: crate::kerberos::KerberosOptions) -> Self {
        self.auth.set_kerberos(opts);
        self
    }

    /// Whether NTLM over HTTPS binds its login to the TLS channel (default true; ADR 0172).
    pub fn with_channel_binding(mut self, on: bool) -> Self {
        self.auth.set_channel_binding(on);
        self
    }

    /// How this client logs in.
    pub fn auth_method(&self) -> AuthMethod {
        self.auth.method()
    }

    /// Whether messages are sealed (NTLM or Kerberos over HTTP).
    pub fn encrypts(&self) -> bool {
        self.auth.encrypts()
    }

    /// The source name.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The endpoint URL.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    fn protocol(&self, call: &str, m: impl Into<String>) -> HypervError {
        HypervError::protocol(&self.source, call, m)
    }

    /// Sends `req`; returns the reply's body element after checking `RelatesTo`.
    pub async fn send(&self, call: &str, req: Request) -> Result<crate::xml::Node, HypervError> {
        let crate::auth::Exchanged {
            status,
            body: bytes,
        } = self
            .auth
            .exchange(&self.http, &self.url, &self.creds, call, req.to_xml())
            .await?;
        match wsman::parse_reply(&bytes) {
            Ok(Reply::Ok {
                relates_to, body, ..
            }) if (200..300).contains(&status) => {
                if relates_to != req.message_id {
                    return Err(self.protocol(
                        call,
                        format!(
                            "the reply relates to `{relates_to}`, not to the request `{}`",
                            req.message_id
                        ),
                    ));
                }
                Ok(body)
            }
            Ok(Reply::Ok { .. }) => Err(self.protocol(call, format!("HTTP {status}"))),
            Ok(Reply::Fault(f)) => Err(HypervError::Fault {
                source_name: self.source.clone(),
                call: call.into(),
                kind: FaultKind::of(&f),
                fault: Box::new(f),
            }),
            Err(e) if !(200..300).contains(&status) => {
                Err(self.protocol(call, format!("HTTP {status} without a SOAP envelope ({e})")))
            }
            Err(e) => Err(HypervError::xml(&self.source, call, e)),
        }
    }

    fn request(&self, action: &str, resource_uri: &str) -> Request {
        Request::new(self.url.as_str(), action, resource_uri)
    }

    /// Every instance of `class` (in `root/virtualization/v2`), optionally filtered by a WQL
    /// `query` (`SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Virtual Machine'`), read in
    /// pages of [`PAGE`].
    pub async fn enumerate(
        &self,
        class: &str,
        query: Option<&str>,
    ) -> Result<Vec<Instance>, HypervError> {
        self.enumerate_in(cim::VIRTUALIZATION_V2, class, query)
            .await
    }

    /// [`Self::enumerate`] in another WMI namespace, given by its resource URI prefix
    /// (`…/wmi/root/mscluster/`).
    pub async fn enumerate_in(
        &self,
        namespace: &str,
        class: &str,
        query: Option<&str>,
    ) -> Result<Vec<Instance>, HypervError> {
        let call = format!("Enumerate {class}");
        // WinRM takes filtered enumerations on the namespace's wildcard resource.
        let uri = match query {
            Some(_) => format!("{namespace}*"),
            None => format!("{namespace}{class}"),
        };
        let filter = query
            .map(|q| {
                format!(
                    "<w:Filter Dialect=\"{}\">{}</w:Filter>",
                    wsman::WQL,
                    crate::xml::escape(q)
                )
            })
            .unwrap_or_default();
        let body = format!(
            "<n:Enumerate><w:OptimizeEnumeration/><w:MaxElements>{PAGE}</w:MaxElements>{filter}</n:Enumerate>"
        );
        let r = self
            .send(
                &call,
                self.request(wsman::ACTION_ENUMERATE, &uri).body(body),
            )
            .await?;
        let mut out = Vec::new();
        let mut page = r;
        loop {
            if let Some(items) = page.child("Items") {
                out.extend(items.children.iter().map(Instance::from_node));
            }
            let done = page.child("EndOfSequence").is_some();
            let ctx = page.text_at("EnumerationContext").unwrap_or("").to_string();
            if done {
                break;
            }
            if ctx.is_empty() {
                return Err(self.protocol(&call, "no EnumerationContext and no EndOfSequence"));
            }
            let body = format!(
                "<n:Pull><n:EnumerationContext>{}</n:EnumerationContext><n:MaxElements>{PAGE}</n:MaxElements></n:Pull>",
                crate::xml::escape(&ctx)
            );
            page = self
                .send(&call, self.request(wsman::ACTION_PULL, &uri).body(body))
                .await?;
        }
        Ok(out)
    }

    /// The instance `epr` points at.
    pub async fn get(&self, epr: &Epr) -> Result<Instance, HypervError> {
        let mut req = self.request(wsman::ACTION_GET, &epr.resource_uri);
        req.selectors = epr.selectors.clone();
        let n = self.send(&format!("Get {}", epr.class()), req).await?;
        Ok(Instance::from_node(&n))
    }

    /// Invokes `method` on the object `epr` points at; returns its `_OUTPUT` (ReturnValue and
    /// out parameters) without interpreting the return value.
    pub async fn invoke_raw(
        &self,
        epr: &Epr,
        method: &str,
        params: &[Param],
    ) -> Result<Instance, HypervError> {
        let action = format!("{}/{method}", epr.resource_uri);
        let mut req = self
            .request(&action, &epr.resource_uri)
            .body(cim::invoke_body(&epr.resource_uri, method, params));
        req.selectors = epr.selectors.clone();
        let call = format!("{}.{method}", epr.class());
        let n = self.send(&call, req).await?;
        Ok(Instance::from_node(&n))
    }

    /// Invokes `method` and waits for it: return value 0 is done, 4096 starts a job that is
    /// polled to completion; anything else is an error naming the code.
    pub async fn invoke(
        &self,
        epr: &Epr,
        method: &str,
        params: &[Param],
    ) -> Result<Instance, HypervError> {
        let call = format!("{}.{method}", epr.class());
        let out = self.invoke_raw(epr, method, params).await?;
        match out.u64("ReturnValue") {
            Some(0) => Ok(out),
            Some(JOB_STARTED) => {
                let job = out
                    .reference("Job")
                    .ok_or_else(|| self.protocol(&call, "return value 4096 without a Job"))?
                    .clone();
                self.wait_job(&call, &job).await?;
                Ok(out)
            }
            Some(code) => Err(HypervError::Wmi {
                source_name: self.source.clone(),
                call,
                code,
                message: format!("WMI returned {code} ({})", return_value_name(code)),
            }),
            None => Err(self.protocol(&call, "no ReturnValue")),
        }
    }

    /// Polls the `Msvm_ConcreteJob` at `job` until it completes (`JobState` 7) or fails.
    pub async fn wait_job(&self, call: &str, job: &Epr) -> Result<Instance, HypervError> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(20);
        loop {
            let j = self.get(job).await?;
            match j.u64("JobState") {
                Some(JOB_COMPLETED) => return Ok(j),
                Some(2..=6) => {}
                Some(state) => {
                    return Err(HypervError::Wmi {
                        source_name: self.source.clone(),
                        call: call.into(),
                        code: j.u64("ErrorCode").unwrap_or(state),
                        message: format!(
                            "job {} ended in state {state}: {}",
                            job.selector("InstanceID").unwrap_or("?"),
                            j.text("ErrorDescription").unwrap_or("no description")
                        ),
                    });
                }
                None => return Err(self.protocol(call, "job without JobState")),
            }
            if start.elapsed() > JOB_TIMEOUT {
                return Err(self.protocol(call, "job did not finish in time"));
            }
            tracing::debug!(call, progress = j.u64("PercentComplete"), "waiting for job");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// Runs `command` with `args` in a `cmd` shell on the host (the WinRS cycle: Create,
    /// Command, Receive until Done, Signal terminate, Delete).
    pub async fn run_command(
        &self,
        command: &str,
        args: &[&str],
    ) -> Result<CommandOutput, HypervError> {
        let shell_uri = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd";
        let mut create = self.request(wsman::ACTION_CREATE, shell_uri).body(
            "<rsp:Shell><rsp:InputStreams>stdin</rsp:InputStreams><rsp:OutputStreams>stdout stderr</rsp:OutputStreams></rsp:Shell>",
        );
        create.options = vec![
            ("WINRS_NOPROFILE".into(), "FALSE".into()),
            ("WINRS_CODEPAGE".into(), "65001".into()),
        ];
        let r = self.send("shell Create", create).await?;
        let shell = r
            .find("Selector")
            .filter(|s| s.attr("Name") == Some("ShellId"))
            .map(|s| s.text.trim().to_string())
            .or_else(|| r.find("ShellId").map(|s| s.text.trim().to_string()))
            .ok_or_else(|| self.protocol("shell Create", "no ShellId"))?;
        let result = self.run_in_shell(shell_uri, &shell, command, args).await;
        let delete = self
            .request(wsman::ACTION_DELETE, shell_uri)
            .selector("ShellId", &shell);
        if let Err(e) = self.send("shell Delete", delete).await {
            tracing::debug!(error = %e, "closing the remote shell failed");
        }
        result
    }

    async fn run_in_shell(
        &self,
        shell_uri: &str,
        shell: &str,
        command: &str,
        args: &[&str],
    ) -> Result<CommandOutput, HypervError> {
        use crate::xml::escape;
        let argv: String = args
            .iter()
            .map(|a| format!("<rsp:Arguments>{}</rsp:Arguments>", escape(a)))
            .collect();
        let mut cmd = self
            .request(&format!("{}/Command", wsman::NS_SHELL), shell_uri)
            .selector("ShellId", shell)
            .body(format!(
                "<rsp:CommandLine><rsp:Command>{}</rsp:Command>{argv}</rsp:CommandLine>",
                escape(command)
            ));
        cmd.options = vec![
            ("WINRS_CONSOLEMODE_STDIN".into(), "TRUE".into()),
            ("WINRS_SKIP_CMD_SHELL".into(), "FALSE".into()),
        ];
        let r = self.send("shell Command", cmd).await?;
        let id = r
            .find("CommandId")
            .map(|c| c.text.trim().to_string())
            .ok_or_else(|| self.protocol("shell Command", "no CommandId"))?;
        let mut out = CommandOutput::default();
        loop {
            let recv = self
                .request(&format!("{}/Receive", wsman::NS_SHELL), shell_uri)
                .selector("ShellId", shell)
                .body(format!(
                    "<rsp:Receive><rsp:DesiredStream CommandId=\"{}\">stdout stderr</rsp:DesiredStream></rsp:Receive>",
                    escape(&id)
                ));
            let r = match self.send("shell Receive", recv).await {
                Err(HypervError::Fault {
                    kind: FaultKind::TimedOut,
                    ..
                }) => continue,
                r => r?,
            };
            for s in r.all("Stream") {
                let data =
                    base64_decode(s.text.trim()).map_err(|m| self.protocol("shell Receive", m))?;
                match s.attr("Name") {
                    Some("stderr") => out.stderr.extend(data),
                    _ => out.stdout.extend(data),
                }
            }
            if let Some(state) = r.child("CommandState")
                && state.attr("State").is_some_and(|s| s.ends_with("/Done"))
            {
                out.exit_code = state
                    .text_at("ExitCode")
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                break;
            }
        }
        let signal = self
            .request(&format!("{}/Signal", wsman::NS_SHELL), shell_uri)
            .selector("ShellId", shell)
            .body(format!(
                "<rsp:Signal CommandId=\"{}\"><rsp:Code>{}/signal/terminate</rsp:Code></rsp:Signal>",
                escape(&id),
                wsman::NS_SHELL
            ));
        self.send("shell Signal", signal).await?;
        Ok(out)
    }
}

fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| format!("stream is not base64: {e}"))
}

/// The documented meaning of a WMI virtualization method's return value.
pub fn return_value_name(code: u64) -> &'static str {
    match code {
        0 => "completed",
        4096 => "job started",
        32768 => "failed",
        32769 => "access denied",
        32770 => "not supported",
        32771 => "status is unknown",
        32772 => "timeout",
        32773 => "invalid parameter",
        32774 => "system is in use",
        32775 => "invalid state for this operation",
        32776 => "incorrect data type",
        32777 => "system is not available",
        32778 => "out of memory",
        _ => "unknown",
    }
}
