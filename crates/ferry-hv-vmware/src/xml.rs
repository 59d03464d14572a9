//! The vim25 wire format without I/O: request envelopes are built by [`Body`], responses are
//! parsed by [`parse_response`] into a small element tree ([`Node`]) or a [`Fault`].
//!
//! vim25 responses are SOAP 1.1 documents whose meaning lives in element names, `xsi:type`
//! attributes (polymorphic values such as `VirtualDisk` inside `ArrayOfVirtualDevice`) and the
//! `type` attribute of managed object references. The tree keeps exactly that: local names
//! (namespace prefixes dropped), both attributes, text and children. Parsing is bounded
//! (depth, element count) so a hostile or broken server cannot exhaust the proxy's memory.

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};
use std::fmt::Write as _;

/// Deepest element nesting accepted (vim25 device trees nest about 12 deep).
pub const MAX_DEPTH: usize = 128;
/// Most elements in one response (a 1,000-VM inventory page holds ~10^5).
pub const MAX_ELEMENTS: usize = 4_000_000;

/// A malformed response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed SOAP response: {0}")]
pub struct XmlError(pub String);

/// A managed object reference: `type` and value (`VirtualMachine`, `vm-42`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MoRef {
    /// The managed object type.
    pub kind: String,
    /// Its id.
    pub value: String,
}

impl MoRef {
    /// A reference to `value` of `kind`.
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            value: value.into(),
        }
    }
}

impl std::fmt::Display for MoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// One element of a response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// Local name (prefix dropped).
    pub name: String,
    /// `xsi:type`, prefix dropped.
    pub xsi_type: Option<String>,
    /// The plain `type` attribute (managed object references).
    pub type_attr: Option<String>,
    /// Text content (entities resolved), concatenated.
    pub text: String,
    /// Child elements in document order.
    pub children: Vec<Node>,
}

impl Node {
    /// The first child called `name`.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child called `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The element at `a/b/c` below this one.
    pub fn at(&self, path: &str) -> Option<&Node> {
        path.split('/').try_fold(self, |n, p| n.child(p))
    }

    /// The trimmed text at `path`.
    pub fn text_at(&self, path: &str) -> Option<&str> {
        self.at(path).map(|n| n.text.trim())
    }

    /// The integer at `path`.
    pub fn i64_at(&self, path: &str) -> Option<i64> {
        self.text_at(path)?.parse().ok()
    }

    /// The boolean at `path` (`true`/`false`/`1`/`0`).
    pub fn bool_at(&self, path: &str) -> Option<bool> {
        match self.text_at(path)? {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => None,
        }
    }

    /// This element as a managed object reference, when it carries a `type` attribute.
    pub fn moref(&self) -> Option<MoRef> {
        let kind = self.type_attr.as_ref()?;
        let value = self.text.trim();
        (!value.is_empty()).then(|| MoRef::new(kind.clone(), value))
    }

    /// The type of this value: `xsi:type`, else the element name.
    pub fn type_name(&self) -> &str {
        self.xsi_type.as_deref().unwrap_or(&self.name)
    }
}

/// A SOAP fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// `faultcode` (`ServerFaultCode`, `ClientFaultCode`).
    pub code: String,
    /// `faultstring`, the server's message.
    pub message: String,
    /// The vim25 fault type from `detail` (`InvalidLogin`, `FileNotFound`, …), if any.
    pub kind: Option<String>,
    /// The detail element, for fault-specific fields.
    pub detail: Option<Node>,
}

/// What a call answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The `<MethodResponse>` element.
    Ok(Node),
    /// A SOAP fault.
    Fault(Fault),
}

/// Parses a whole XML document into its root element.
pub fn parse(xml: &[u8]) -> Result<Node, XmlError> {
    let mut r = Reader::from_reader(xml);
    let err = |m: String| XmlError(m);
    let mut stack: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;
    let mut count = 0usize;
    loop {
        let pos = r.buffer_position();
        let ev = r
            .read_event()
            .map_err(|e| err(format!("at byte {pos}: {e}")))?;
        match ev {
            Event::Start(e) | Event::Empty(e) if root.is_some() => {
                let _ = e;
                return Err(err(format!(
                    "at byte {pos}: content after the root element"
                )));
            }
            Event::Start(e) => {
                count += 1;
                if stack.len() >= MAX_DEPTH || count > MAX_ELEMENTS {
                    return Err(err(format!(
                        "at byte {pos}: document too deep or too large"
                    )));
                }
                stack.push(element(&e).map_err(|m| err(format!("at byte {pos}: {m}")))?);
            }
            Event::Empty(e) => {
                count += 1;
                if count > MAX_ELEMENTS {
                    return Err(err(format!("at byte {pos}: document too large")));
                }
                let n = element(&e).map_err(|m| err(format!("at byte {pos}: {m}")))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(n),
                    None => root = Some(n),
                }
            }
            Event::End(_) => {
                let n = stack
                    .pop()
                    .ok_or_else(|| err(format!("at byte {pos}: unbalanced end tag")))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(n),
                    None => root = Some(n),
                }
            }
            Event::Text(t) => {
                let s = t.decode().map_err(|e| err(format!("at byte {pos}: {e}")))?;
                match stack.last_mut() {
                    Some(n) => n.text.push_str(&s),
                    None if s.trim().is_empty() => {}
                    None => return Err(err(format!("at byte {pos}: text outside the root"))),
                }
            }
            Event::CData(t) => {
                let s = t.decode().map_err(|e| err(format!("at byte {pos}: {e}")))?;
                if let Some(n) = stack.last_mut() {
                    n.text.push_str(&s);
                }
            }
            Event::GeneralRef(g) => {
                let c = if g.is_char_ref() {
                    g.resolve_char_ref()
                        .map_err(|e| err(format!("at byte {pos}: {e}")))?
                } else {
                    let name = g.decode().map_err(|e| err(format!("at byte {pos}: {e}")))?;
                    match name.as_ref() {
                        "lt" => Some('<'),
                        "gt" => Some('>'),
                        "amp" => Some('&'),
                        "apos" => Some('\''),
                        "quot" => Some('"'),
                        other => {
                            return Err(err(format!("at byte {pos}: unknown entity &{other};")));
                        }
                    }
                };
                let c =
                    c.ok_or_else(|| err(format!("at byte {pos}: invalid character reference")))?;
                if let Some(n) = stack.last_mut() {
                    n.text.push(c);
                }
            }
            Event::DocType(_) => {
                // No DTDs: entity definitions are how XML bombs are built.
                return Err(err(format!("at byte {pos}: DOCTYPE is not allowed")));
            }
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(err(format!(
            "document ends inside <{}>",
            stack.last().map(|n| n.name.as_str()).unwrap_or("")
        )));
    }
    root.ok_or_else(|| err("no root element".into()))
}

fn element(e: &BytesStart<'_>) -> Result<Node, String> {
    let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
    let mut n = Node {
        name,
        ..Node::default()
    };
    for a in e.attributes() {
        let a = a.map_err(|e| e.to_string())?;
        if a.key.local_name().as_ref() != b"type" {
            continue;
        }
        let v = a.unescape_value().map_err(|e| e.to_string())?.into_owned();
        if a.key.prefix().is_some() {
            // `xsi:type="vim25:VirtualDisk"` → `VirtualDisk`.
            let local = v.rsplit(':').next().unwrap_or(&v).to_string();
            n.xsi_type = Some(local);
        } else {
            n.type_attr = Some(v);
        }
    }
    Ok(n)
}

/// Parses a SOAP response envelope: the body's first element, or its fault.
pub fn parse_response(xml: &[u8]) -> Result<Response, XmlError> {
    let env = parse(xml)?;
    if env.name != "Envelope" {
        return Err(XmlError(format!(
            "expected a SOAP Envelope, got <{}>",
            env.name
        )));
    }
    let body = env
        .child("Body")
        .ok_or_else(|| XmlError("the envelope has no Body".into()))?;
    let first = body
        .children
        .first()
        .ok_or_else(|| XmlError("the SOAP Body is empty".into()))?;
    if first.name != "Fault" {
        return Ok(Response::Ok(first.clone()));
    }
    let detail = first
        .child("detail")
        .and_then(|d| d.children.first())
        .cloned();
    let kind = detail.as_ref().map(|d| match &d.xsi_type {
        Some(t) => t.clone(),
        None => d.name.strip_suffix("Fault").unwrap_or(&d.name).to_string(),
    });
    Ok(Response::Fault(Fault {
        code: first.text_at("faultcode").unwrap_or("").to_string(),
        message: first.text_at("faultstring").unwrap_or("").to_string(),
        kind,
        detail,
    }))
}

/// Escapes text for an element's content or an attribute value.
pub fn escape(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

/// A request body under construction: the method element's children, in order.
///
/// vim25 is order-sensitive (XML Schema sequences), so fields are written in the order the WSDL
/// declares them; callers add them in that order.
#[derive(Debug, Default, Clone)]
pub struct Body {
    xml: String,
}

impl Body {
    /// An empty body.
    pub fn new() -> Self {
        Self::default()
    }

    /// `<name type="KIND">value</name>`, a managed object reference.
    pub fn moref(mut self, name: &str, r: &MoRef) -> Self {
        let _ = write!(
            self.xml,
            "<{name} type=\"{}\">{}</{name}>",
            escape(&r.kind),
            escape(&r.value)
        );
        self
    }

    /// `<name>text</name>`.
    pub fn text(mut self, name: &str, value: &str) -> Self {
        let _ = write!(self.xml, "<{name}>{}</{name}>", escape(value));
        self
    }

    /// `<name xsi:type="TYPE">text</name>` (an `xsd:anyType` value such as `OptionValue.value`).
    pub fn typed_text(mut self, name: &str, xsi_type: &str, value: &str) -> Self {
        let _ = write!(
            self.xml,
            "<{name} xsi:type=\"{}\">{}</{name}>",
            escape(xsi_type),
            escape(value)
        );
        self
    }

    /// `<name xsi:type="TYPE">…</name>` around a nested body.
    pub fn nested(mut self, name: &str, xsi_type: Option<&str>, inner: Body) -> Self {
        match xsi_type {
            Some(t) => {
                let _ = write!(self.xml, "<{name} xsi:type=\"{}\">", escape(t));
            }
            None => {
                let _ = write!(self.xml, "<{name}>");
            }
        }
        self.xml.push_str(&inner.xml);
        let _ = write!(self.xml, "</{name}>");
        self
    }

    /// `other`'s elements after this body's (repeated elements built apart, e.g. `deviceChange`).
    pub fn append(mut self, other: Body) -> Self {
        self.xml.push_str(&other.xml);
        self
    }

    /// The envelope for calling `method` with this body.
    pub fn envelope(&self, method: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
             <soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" \
             xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" \
             xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">\
             <soapenv:Body><{method} xmlns=\"urn:vim25\">{}</{method}></soapenv:Body></soapenv:Envelope>",
            self.xml
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_response_with_types_and_entities() {
        let x = br#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><token>1</token><objects><obj type="VirtualMachine">vm-42</obj><propSet><name>name</name><val xsi:type="xsd:string">a &amp; b &#x41;</val></propSet></objects></returnval></RetrievePropertiesExResponse></soapenv:Body></soapenv:Envelope>"#;
        let Response::Ok(r) = parse_response(x).unwrap() else {
            panic!("fault")
        };
        assert_eq!(r.name, "RetrievePropertiesExResponse");
        let o = r.at("returnval/objects").unwrap();
        assert_eq!(
            o.child("obj").unwrap().moref(),
            Some(MoRef::new("VirtualMachine", "vm-42"))
        );
        let val = o.at("propSet/val").unwrap();
        assert_eq!(val.text, "a & b A");
        assert_eq!(val.xsi_type.as_deref(), Some("string"));
        assert_eq!(r.text_at("returnval/token"), Some("1"));
    }

    #[test]
    fn parses_faults_with_their_vim_type() {
        let x = br#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>Login failure</faultstring><detail><InvalidLoginFault xmlns="urn:vim25" xsi:type="InvalidLogin"></InvalidLoginFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;
        let Response::Fault(f) = parse_response(x).unwrap() else {
            panic!("not a fault")
        };
        assert_eq!(f.kind.as_deref(), Some("InvalidLogin"));
        assert_eq!(f.message, "Login failure");
        // Without xsi:type the element name says it.
        let x = br#"<Envelope><Body><Fault><faultcode>c</faultcode><faultstring>m</faultstring><detail><FileNotFoundFault/></detail></Fault></Body></Envelope>"#;
        let Response::Fault(f) = parse_response(x).unwrap() else {
            panic!("not a fault")
        };
        assert_eq!(f.kind.as_deref(), Some("FileNotFound"));
    }

    #[test]
    fn refuses_broken_and_hostile_documents() {
        for (x, want) in [
            (&b""[..], "no root"),
            (b"<a><b></a>", "at byte"),
            (b"<a>", "ends inside"),
            (b"<!DOCTYPE a [<!ENTITY x \"y\">]><a>&x;</a>", "DOCTYPE"),
            (b"<a>&bogus;</a>", "unknown entity"),
            (b"<a/><b/>", "after the root"),
            (b"<Envelope><Body/></Envelope>", "Body is empty"),
            (b"<html/>", "expected a SOAP Envelope"),
        ] {
            let e = parse_response(x).unwrap_err().to_string();
            assert!(e.contains(want), "{:?}: {e}", String::from_utf8_lossy(x));
        }
        let deep = "<a>".repeat(MAX_DEPTH + 1);
        assert!(parse(deep.as_bytes()).unwrap_err().0.contains("too deep"));
    }

    #[test]
    fn bodies_escape_and_keep_order() {
        let b = Body::new()
            .moref("_this", &MoRef::new("SessionManager", "SessionManager"))
            .text("userName", "a<b")
            .nested(
                "spec",
                Some("VirtualMachineConfigSpec"),
                Body::new().text("x", "1"),
            );
        let env = b.envelope("Login");
        assert!(env.contains("<Login xmlns=\"urn:vim25\"><_this type=\"SessionManager\">SessionManager</_this><userName>a&lt;b</userName><spec xsi:type=\"VirtualMachineConfigSpec\"><x>1</x></spec></Login>"), "{env}");
        // What we write, we read back.
        let Response::Ok(n) = parse_response(env.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(n.text_at("userName"), Some("a<b"));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(b in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_response(&b);
        }

        #[test]
        fn text_round_trips(s in "\\PC{0,64}") {
            let env = Body::new().text("v", &s).envelope("M");
            let Response::Ok(n) = parse_response(env.as_bytes()).unwrap() else { panic!() };
            proptest::prop_assert_eq!(n.child("v").unwrap().text.as_str(), s.as_str());
        }
    }
}
