//! The WS-Management wire format (MS-WSMV, DMTF DSP0226), sans I/O: request envelopes built by
//! [`Request`], replies parsed by [`parse_reply`] into the body element or a [`WsmanFault`].
//!
//! SOAP 1.2 with WS-Addressing 2004/08, as Windows' WinRM service speaks it: every request
//! carries `To`, `ReplyTo` (anonymous), a fresh `MessageID`, the `Action`, the `ResourceURI`, the
//! envelope size and operation timeout; every reply echoes the `MessageID` in `RelatesTo`.

use crate::xml::{self, Node, XmlError, escape};

/// SOAP 1.2 envelope namespace.
pub const NS_SOAP: &str = "http://www.w3.org/2003/05/soap-envelope";
/// WS-Addressing (2004/08).
pub const NS_ADDRESSING: &str = "http://schemas.xmlsoap.org/ws/2004/08/addressing";
/// DMTF WS-Management.
pub const NS_WSMAN: &str = "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd";
/// Microsoft's WS-Management extensions.
pub const NS_MS_WSMAN: &str = "http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd";
/// WS-Enumeration.
pub const NS_ENUMERATION: &str = "http://schemas.xmlsoap.org/ws/2004/09/enumeration";
/// WS-Transfer.
pub const NS_TRANSFER: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer";
/// The Windows remote shell.
pub const NS_SHELL: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell";
/// XML Schema instance (`xsi:nil`).
pub const NS_XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";
/// The anonymous reply address.
pub const ANONYMOUS: &str = "http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous";
/// The WQL filter dialect.
pub const WQL: &str = "http://schemas.microsoft.com/wbem/wsman/1/WQL";

/// WS-Transfer Get.
pub const ACTION_GET: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Get";
/// WS-Transfer Create.
pub const ACTION_CREATE: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Create";
/// WS-Transfer Delete.
pub const ACTION_DELETE: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Delete";
/// WS-Enumeration Enumerate.
pub const ACTION_ENUMERATE: &str = "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Enumerate";
/// WS-Enumeration Pull.
pub const ACTION_PULL: &str = "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Pull";
/// WS-Enumeration Release.
pub const ACTION_RELEASE: &str = "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Release";

/// The WinRM fault code of an operation timeout (a Receive with no output yet): clients retry.
pub const WSMAN_OPERATION_TIMEOUT: u32 = 2_150_858_793;

/// Default `MaxEnvelopeSize` Ferry asks for (WinRM's default is 512 KiB).
pub const MAX_ENVELOPE: u32 = 512 << 10;

/// One request.
#[derive(Debug, Clone)]
pub struct Request {
    /// `a:To`: the endpoint URL.
    pub to: String,
    /// `a:Action`.
    pub action: String,
    /// `w:ResourceURI`.
    pub resource_uri: String,
    /// `w:SelectorSet` (name, value).
    pub selectors: Vec<(String, String)>,
    /// `w:OptionSet` (name, value).
    pub options: Vec<(String, String)>,
    /// `a:MessageID` (`uuid:…`).
    pub message_id: String,
    /// `w:OperationTimeout`, seconds.
    pub timeout_secs: u32,
    /// The body's content, already XML.
    pub body: String,
}

impl Request {
    /// A request for `action` on `resource_uri` with a fresh message id and an empty body.
    pub fn new(to: &str, action: &str, resource_uri: &str) -> Self {
        Self {
            to: to.to_string(),
            action: action.to_string(),
            resource_uri: resource_uri.to_string(),
            selectors: Vec::new(),
            options: Vec::new(),
            message_id: format!("uuid:{}", new_uuid()),
            timeout_secs: 60,
            body: String::new(),
        }
    }

    /// Adds a selector.
    pub fn selector(mut self, name: &str, value: &str) -> Self {
        self.selectors.push((name.into(), value.into()));
        self
    }

    /// Sets the body (XML).
    pub fn body(mut self, body: impl Into<String>) -> Self {
        self.body = body.into();
        self
    }

    /// The SOAP envelope.
    pub fn to_xml(&self) -> String {
        let mut s = String::with_capacity(1024 + self.body.len());
        s.push_str(&format!(
            r#"<?xml version="1.0" encoding="UTF-8"?><s:Envelope xmlns:s="{NS_SOAP}" xmlns:a="{NS_ADDRESSING}" xmlns:w="{NS_WSMAN}" xmlns:p="{NS_MS_WSMAN}" xmlns:n="{NS_ENUMERATION}" xmlns:x="{NS_TRANSFER}" xmlns:rsp="{NS_SHELL}" xmlns:xsi="{NS_XSI}"><s:Header>"#
        ));
        s.push_str(&format!(
            "<a:To>{}</a:To><a:ReplyTo><a:Address s:mustUnderstand=\"true\">{ANONYMOUS}</a:Address></a:ReplyTo>",
            escape(&self.to)
        ));
        s.push_str(&format!(
            "<a:Action s:mustUnderstand=\"true\">{}</a:Action><a:MessageID>{}</a:MessageID>",
            escape(&self.action),
            escape(&self.message_id)
        ));
        s.push_str(&format!(
            "<w:ResourceURI s:mustUnderstand=\"true\">{}</w:ResourceURI>",
            escape(&self.resource_uri)
        ));
        s.push_str(&format!(
            "<w:MaxEnvelopeSize s:mustUnderstand=\"true\">{MAX_ENVELOPE}</w:MaxEnvelopeSize><w:OperationTimeout>PT{}S</w:OperationTimeout>",
            self.timeout_secs
        ));
        s.push_str("<w:Locale xml:lang=\"en-US\" s:mustUnderstand=\"false\"/><p:DataLocale xml:lang=\"en-US\" s:mustUnderstand=\"false\"/>");
        if !self.selectors.is_empty() {
            s.push_str("<w:SelectorSet>");
            for (k, v) in &self.selectors {
                s.push_str(&format!(
                    "<w:Selector Name=\"{}\">{}</w:Selector>",
                    escape(k),
                    escape(v)
                ));
            }
            s.push_str("</w:SelectorSet>");
        }
        if !self.options.is_empty() {
            s.push_str("<w:OptionSet>");
            for (k, v) in &self.options {
                s.push_str(&format!(
                    "<w:Option Name=\"{}\">{}</w:Option>",
                    escape(k),
                    escape(v)
                ));
            }
            s.push_str("</w:OptionSet>");
        }
        s.push_str("</s:Header><s:Body>");
        s.push_str(&self.body);
        s.push_str("</s:Body></s:Envelope>");
        s
    }
}

/// A SOAP fault from the WS-Man service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsmanFault {
    /// `Code/Value` (`s:Sender`, `s:Receiver`).
    pub code: String,
    /// `Code/Subcode/Value` (`w:AccessDenied`, `w:InvalidSelectors`, …), prefix dropped.
    pub subcode: String,
    /// `Reason/Text`.
    pub reason: String,
    /// WinRM's `WSManFault Code` (a Win32 / WinRM error number) when present.
    pub wsman_code: Option<u32>,
    /// WinRM's `WSManFault/Message` text (or a provider's error description) when present.
    pub message: String,
}

impl std::fmt::Display for WsmanFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sub = if self.subcode.is_empty() {
            &self.code
        } else {
            &self.subcode
        };
        write!(f, "{sub}")?;
        if !self.reason.is_empty() {
            write!(f, ": {}", self.reason)?;
        }
        if !self.message.is_empty() && self.message != self.reason {
            write!(f, " ({})", self.message)?;
        }
        if let Some(c) = self.wsman_code {
            write!(f, " [code {c}]")?;
        }
        Ok(())
    }
}

/// A parsed reply.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Success: the header's `Action` and `RelatesTo`, and the body element (an empty `Body`
    /// gives an element named `Body` with no children).
    Ok {
        /// `a:Action`.
        action: String,
        /// `a:RelatesTo`.
        relates_to: String,
        /// The body element.
        body: Node,
    },
    /// A SOAP fault.
    Fault(WsmanFault),
}

fn local(v: &str) -> String {
    v.rsplit(':').next().unwrap_or(v).to_string()
}

/// Parses a reply envelope.
pub fn parse_reply(bytes: &[u8]) -> Result<Reply, XmlError> {
    let env = xml::parse(bytes)?;
    if env.name != "Envelope" {
        return Err(XmlError(format!(
            "expected a SOAP Envelope, got <{}>",
            env.name
        )));
    }
    let header = env.child("Header");
    let body = env
        .child("Body")
        .ok_or_else(|| XmlError("the envelope has no Body".into()))?;
    if let Some(f) = body.child("Fault") {
        let wf = f.find("WSManFault");
        let provider = f.find("ProviderFault");
        let message = wf
            .and_then(|w| w.child("Message"))
            .map(|m| m.text.trim().to_string())
            .filter(|m| !m.is_empty())
            .or_else(|| provider.map(|p| p.text.trim().to_string()))
            .unwrap_or_default();
        return Ok(Reply::Fault(WsmanFault {
            code: local(f.text_at("Code/Value").unwrap_or("")),
            subcode: local(f.text_at("Code/Subcode/Value").unwrap_or("")),
            reason: f.text_at("Reason/Text").unwrap_or("").to_string(),
            wsman_code: wf.and_then(|w| w.attr("Code")).and_then(|c| c.parse().ok()),
            message,
        }));
    }
    let h = |name: &str| {
        header
            .and_then(|h| h.text_at(name))
            .unwrap_or("")
            .to_string()
    };
    let body = match body.children.first() {
        Some(first) => first.clone(),
        None => body.clone(),
    };
    Ok(Reply::Ok {
        action: h("Action"),
        relates_to: h("RelatesTo"),
        body,
    })
}

/// A random (version 4) UUID in lower-case hex.
pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).unwrap_or_else(|_| {
        // Message ids only need to be unique per connection; the clock will do if the OS RNG
        // is unavailable.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = t.to_le_bytes();
    });
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_through_the_parser() {
        let r = Request::new("http://h:5985/wsman", ACTION_GET, "http://x/C")
            .selector("Name", "a<b")
            .body("<p:X>1</p:X>");
        let n = xml::parse(r.to_xml().as_bytes()).unwrap();
        assert_eq!(n.text_at("Header/Action"), Some(ACTION_GET));
        assert_eq!(
            n.at("Header/SelectorSet/Selector").unwrap().attr("Name"),
            Some("Name")
        );
        assert_eq!(n.text_at("Header/SelectorSet/Selector"), Some("a<b"));
        assert!(r.message_id.starts_with("uuid:") && r.message_id.len() == 41);
    }

    #[test]
    fn faults_keep_winrm_codes() {
        let f = br#"<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" xmlns:w="x"><s:Body><s:Fault><s:Code><s:Value>s:Sender</s:Value><s:Subcode><s:Value>w:TimedOut</s:Value></s:Subcode></s:Code><s:Reason><s:Text xml:lang="en-US">The WS-Management service cannot complete the operation within the time specified in OperationTimeout.</s:Text></s:Reason><s:Detail><f:WSManFault xmlns:f="http://schemas.microsoft.com/wbem/wsman/1/wsmanfault" Code="2150858793" Machine="h"><f:Message>timed out</f:Message></f:WSManFault></s:Detail></s:Fault></s:Body></s:Envelope>"#;
        match parse_reply(f).unwrap() {
            Reply::Fault(f) => {
                assert_eq!(f.subcode, "TimedOut");
                assert_eq!(f.wsman_code, Some(WSMAN_OPERATION_TIMEOUT));
                assert_eq!(f.message, "timed out");
            }
            r => panic!("{r:?}"),
        }
    }
}
