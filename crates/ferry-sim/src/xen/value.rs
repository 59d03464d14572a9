//! XenAPI values and their two wire encodings: XML-RPC (what the Python SDK speaks) and
//! JSON-RPC. The XML-RPC decoder is sans-I/O, bounded (input size, nesting depth) and accepts
//! untyped `<value>text</value>` as a string, as xapi does. XenAPI sends 64-bit integers as
//! decimal strings over XML-RPC but as numbers over JSON-RPC; [`Value::Int`] does both.

use std::collections::BTreeMap;

/// Largest XML-RPC request body the decoder accepts.
pub const MAX_XML: usize = 16 << 20;
/// Deepest nesting of values the decoder accepts.
pub const MAX_DEPTH: usize = 64;

/// One XenAPI value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A string (also refs, uuids, enums).
    Str(String),
    /// A 64-bit integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// A float.
    Double(f64),
    /// An ISO 8601 date (`20261122T02:48:11Z`).
    DateTime(String),
    /// An array.
    Array(Vec<Value>),
    /// A struct (also XenAPI maps and records).
    Struct(BTreeMap<String, Value>),
    /// Nil (only JSON-RPC null; XenAPI itself never sends it).
    Nil,
}

impl Value {
    /// A string value.
    pub fn s(v: impl Into<String>) -> Self {
        Self::Str(v.into())
    }
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }
    /// A struct from pairs.
    pub fn record<I: IntoIterator<Item = (&'static str, Value)>>(pairs: I) -> Self {
        Self::Struct(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }
    /// A `(string → string)` map.
    pub fn map(m: &BTreeMap<String, String>) -> Self {
        Self::Struct(m.iter().map(|(k, v)| (k.clone(), Value::s(v))).collect())
    }
    /// An array of strings.
    pub fn strs<S: AsRef<str>>(v: &[S]) -> Self {
        Self::Array(v.iter().map(|s| Value::s(s.as_ref())).collect())
    }

    /// Encodes as an XML-RPC `<value>`.
    pub fn to_xml(&self, out: &mut String) {
        out.push_str("<value>");
        match self {
            Self::Str(s) => {
                out.push_str("<string>");
                escape(s, out);
                out.push_str("</string>");
            }
            // XenAPI's convention: int64 travels as a decimal string.
            Self::Int(i) => {
                out.push_str("<string>");
                out.push_str(&i.to_string());
                out.push_str("</string>");
            }
            Self::Bool(b) => out.push_str(if *b {
                "<boolean>1</boolean>"
            } else {
                "<boolean>0</boolean>"
            }),
            Self::Double(d) => {
                out.push_str("<double>");
                out.push_str(&d.to_string());
                out.push_str("</double>");
            }
            Self::DateTime(d) => {
                out.push_str("<dateTime.iso8601>");
                escape(d, out);
                out.push_str("</dateTime.iso8601>");
            }
            Self::Array(a) => {
                out.push_str("<array><data>");
                for v in a {
                    v.to_xml(out);
                }
                out.push_str("</data></array>");
            }
            Self::Struct(m) => {
                out.push_str("<struct>");
                for (k, v) in m {
                    out.push_str("<member><name>");
                    escape(k, out);
                    out.push_str("</name>");
                    v.to_xml(out);
                    out.push_str("</member>");
                }
                out.push_str("</struct>");
            }
            Self::Nil => out.push_str("<nil/>"),
        }
        out.push_str("</value>");
    }

    /// Converts to JSON.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Self::Str(s) | Self::DateTime(s) => J::String(s.clone()),
            Self::Int(i) => J::from(*i),
            Self::Bool(b) => J::Bool(*b),
            Self::Double(d) => J::from(*d),
            Self::Array(a) => J::Array(a.iter().map(Self::to_json).collect()),
            Self::Struct(m) => J::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect()),
            Self::Nil => J::Null,
        }
    }

    /// Converts from JSON.
    pub fn from_json(j: &serde_json::Value) -> Self {
        use serde_json::Value as J;
        match j {
            J::Null => Self::Nil,
            J::Bool(b) => Self::Bool(*b),
            J::Number(n) => n
                .as_i64()
                .map(Self::Int)
                .unwrap_or_else(|| Self::Double(n.as_f64().unwrap_or(0.0))),
            J::String(s) => Self::Str(s.clone()),
            J::Array(a) => Self::Array(a.iter().map(Self::from_json).collect()),
            J::Object(o) => Self::Struct(
                o.iter()
                    .map(|(k, v)| (k.clone(), Self::from_json(v)))
                    .collect(),
            ),
        }
    }
}

/// Why an XML-RPC document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed XML-RPC at byte {at}: {message}")]
pub struct XmlError {
    /// Byte offset (into the document) where decoding stopped.
    pub at: usize,
    /// What is wrong.
    pub message: String,
}

fn err<T>(at: usize, message: impl Into<String>) -> Result<T, XmlError> {
    Err(XmlError {
        at,
        message: message.into(),
    })
}

/// Escapes text for XML.
pub fn escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Open(String),
    Close(String),
    Empty(String),
    Text(String),
}

fn unescape(raw: &str, at: usize) -> Result<String, XmlError> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let Some(end) = after.find(';').filter(|e| *e <= 10) else {
            return err(at, "unterminated character reference");
        };
        let name = &after[..end];
        let c = match name {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            n if n.starts_with("#x") => u32::from_str_radix(&n[2..], 16)
                .ok()
                .and_then(char::from_u32)
                .ok_or_else(|| XmlError {
                    at,
                    message: format!("bad character reference &{n};"),
                })?,
            n if n.starts_with('#') => n[1..]
                .parse::<u32>()
                .ok()
                .and_then(char::from_u32)
                .ok_or_else(|| XmlError {
                    at,
                    message: format!("bad character reference &{n};"),
                })?,
            n => return err(at, format!("unknown entity &{n};")),
        };
        out.push(c);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn tokenize(doc: &str) -> Result<Vec<(usize, Tok)>, XmlError> {
    if doc.len() > MAX_XML {
        return err(
            0,
            format!("document of {} bytes exceeds {MAX_XML}", doc.len()),
        );
    }
    let mut toks = Vec::new();
    let mut i = 0;
    let b = doc.as_bytes();
    while i < b.len() {
        if b[i] == b'<' {
            let rest = &doc[i..];
            let skip_to = |pat: &str| rest.find(pat).map(|e| i + e + pat.len());
            let next = if rest.starts_with("<?") {
                skip_to("?>")
            } else if rest.starts_with("<!--") {
                skip_to("-->")
            } else {
                let Some(e) = rest.find('>') else {
                    return err(i, "unterminated tag");
                };
                let inner = &rest[1..e];
                let (tok, body) = if let Some(n) = inner.strip_prefix('/') {
                    (0, n)
                } else if let Some(n) = inner.strip_suffix('/') {
                    (2, n)
                } else {
                    (1, inner)
                };
                // Attributes never matter in XML-RPC; keep the element name only.
                let name = body.split_whitespace().next().unwrap_or("").to_string();
                if name.is_empty() || name.contains(['<', '&']) {
                    return err(i, "bad tag");
                }
                toks.push((
                    i,
                    match tok {
                        0 => Tok::Close(name),
                        1 => Tok::Open(name),
                        _ => Tok::Empty(name),
                    },
                ));
                Some(i + e + 1)
            };
            let Some(n) = next else {
                return err(i, "unterminated markup");
            };
            i = n;
        } else {
            let end = doc[i..].find('<').map_or(doc.len(), |e| i + e);
            toks.push((i, Tok::Text(unescape(&doc[i..end], i)?)));
            i = end;
        }
    }
    Ok(toks)
}

struct Parser {
    toks: Vec<(usize, Tok)>,
    pos: usize,
    len: usize,
}

impl Parser {
    fn at(&self) -> usize {
        self.toks.get(self.pos).map_or(self.len, |t| t.0)
    }
    fn skip_ws(&mut self) {
        while let Some((_, Tok::Text(t))) = self.toks.get(self.pos) {
            if !t.trim().is_empty() {
                break;
            }
            self.pos += 1;
        }
    }
    fn peek(&mut self) -> Option<Tok> {
        self.skip_ws();
        self.toks.get(self.pos).map(|t| t.1.clone())
    }
    fn open(&mut self, name: &str) -> Result<(), XmlError> {
        match self.peek() {
            Some(Tok::Open(n)) if n == name => {
                self.pos += 1;
                Ok(())
            }
            other => err(self.at(), format!("expected <{name}>, found {other:?}")),
        }
    }
    fn close(&mut self, name: &str) -> Result<(), XmlError> {
        match self.peek() {
            Some(Tok::Close(n)) if n == name => {
                self.pos += 1;
                Ok(())
            }
            other => err(self.at(), format!("expected </{name}>, found {other:?}")),
        }
    }
    /// Text up to `</name>` (the open tag already consumed).
    fn text_until(&mut self, name: &str) -> Result<String, XmlError> {
        let mut s = String::new();
        while let Some((_, Tok::Text(t))) = self.toks.get(self.pos) {
            s.push_str(t);
            self.pos += 1;
        }
        match self.toks.get(self.pos) {
            Some((_, Tok::Close(n))) if n == name => {
                self.pos += 1;
                Ok(s)
            }
            other => err(
                self.at(),
                format!("expected </{name}>, found {:?}", other.map(|t| &t.1)),
            ),
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, XmlError> {
        if depth > MAX_DEPTH {
            return err(self.at(), format!("values nested deeper than {MAX_DEPTH}"));
        }
        match self.peek() {
            Some(Tok::Empty(n)) if n == "value" => {
                self.pos += 1;
                return Ok(Value::s(""));
            }
            _ => self.open("value")?,
        }
        // Untyped text (or nothing) is a string.
        let start = self.pos;
        let mut text = String::new();
        while let Some((_, Tok::Text(t))) = self.toks.get(self.pos) {
            text.push_str(t);
            self.pos += 1;
        }
        if let Some((_, Tok::Close(n))) = self.toks.get(self.pos) {
            if n == "value" {
                self.pos += 1;
                return Ok(Value::Str(text));
            }
        }
        self.pos = start;
        let at = self.at();
        let v = match self.peek() {
            Some(Tok::Empty(t)) => {
                self.pos += 1;
                match t.as_str() {
                    "nil" => Value::Nil,
                    "string" => Value::s(""),
                    "array" => Value::Array(vec![]),
                    "struct" => Value::Struct(BTreeMap::new()),
                    other => return err(at, format!("unexpected <{other}/>")),
                }
            }
            Some(Tok::Open(t)) => {
                self.pos += 1;
                match t.as_str() {
                    "string" => Value::Str(self.text_until("string")?),
                    "int" | "i4" | "i8" => {
                        let s = self.text_until(&t)?;
                        Value::Int(s.trim().parse().map_err(|_| XmlError {
                            at,
                            message: format!("bad integer `{s}`"),
                        })?)
                    }
                    "boolean" => match self.text_until("boolean")?.trim() {
                        "1" | "true" => Value::Bool(true),
                        "0" | "false" => Value::Bool(false),
                        o => return err(at, format!("bad boolean `{o}`")),
                    },
                    "double" => {
                        let s = self.text_until("double")?;
                        Value::Double(s.trim().parse().map_err(|_| XmlError {
                            at,
                            message: format!("bad double `{s}`"),
                        })?)
                    }
                    "dateTime.iso8601" => Value::DateTime(self.text_until(&t)?),
                    "base64" => Value::Str(self.text_until("base64")?),
                    "array" => {
                        let mut items = Vec::new();
                        match self.peek() {
                            Some(Tok::Empty(n)) if n == "data" => self.pos += 1,
                            _ => {
                                self.open("data")?;
                                while !matches!(self.peek(), Some(Tok::Close(ref n)) if n == "data")
                                {
                                    items.push(self.value(depth + 1)?);
                                }
                                self.close("data")?;
                            }
                        }
                        self.close("array")?;
                        Value::Array(items)
                    }
                    "struct" => {
                        let mut m = BTreeMap::new();
                        while !matches!(self.peek(), Some(Tok::Close(ref n)) if n == "struct") {
                            self.open("member")?;
                            self.open("name")?;
                            let k = self.text_until("name")?;
                            let v = self.value(depth + 1)?;
                            self.close("member")?;
                            m.insert(k, v);
                        }
                        self.close("struct")?;
                        Value::Struct(m)
                    }
                    other => return err(at, format!("unknown value type <{other}>")),
                }
            }
            other => return err(at, format!("expected a typed value, found {other:?}")),
        };
        self.close("value")?;
        Ok(v)
    }
}

/// Decodes an XML-RPC `<methodCall>` into the method name and its parameters.
pub fn decode_call(doc: &str) -> Result<(String, Vec<Value>), XmlError> {
    let toks = tokenize(doc)?;
    let mut p = Parser {
        toks,
        pos: 0,
        len: doc.len(),
    };
    p.open("methodCall")?;
    p.open("methodName")?;
    let name = p.text_until("methodName")?.trim().to_string();
    let mut params = Vec::new();
    match p.peek() {
        Some(Tok::Empty(n)) if n == "params" => p.pos += 1,
        Some(Tok::Open(n)) if n == "params" => {
            p.pos += 1;
            while !matches!(p.peek(), Some(Tok::Close(ref n)) if n == "params") {
                p.open("param")?;
                params.push(p.value(0)?);
                p.close("param")?;
            }
            p.close("params")?;
        }
        _ => {}
    }
    p.close("methodCall")?;
    if p.peek().is_some() {
        return err(p.at(), "content after </methodCall>");
    }
    Ok((name, params))
}

/// Decodes a single `<value>` document (what `task.result` holds).
pub fn decode_value(doc: &str) -> Result<Value, XmlError> {
    let toks = tokenize(doc)?;
    let mut p = Parser {
        toks,
        pos: 0,
        len: doc.len(),
    };
    let v = p.value(0)?;
    if p.peek().is_some() {
        return err(p.at(), "content after </value>");
    }
    Ok(v)
}

/// Encodes an XML-RPC `<methodCall>` (used by tests and the fuzz corpus).
pub fn encode_call(method: &str, params: &[Value]) -> String {
    let mut out = String::from("<?xml version='1.0'?>\n<methodCall><methodName>");
    escape(method, &mut out);
    out.push_str("</methodName><params>");
    for p in params {
        out.push_str("<param>");
        p.to_xml(&mut out);
        out.push_str("</param>");
    }
    out.push_str("</params></methodCall>");
    out
}

/// Encodes a `<methodResponse>` carrying one value.
pub fn encode_response(v: &Value) -> String {
    let mut out = String::from("<?xml version='1.0'?>\n<methodResponse><params><param>");
    v.to_xml(&mut out);
    out.push_str("</param></params></methodResponse>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_what_python_sends() {
        let doc = "<?xml version='1.0'?>\n<methodCall>\n<methodName>session.login_with_password</methodName>\n<params>\n<param>\n<value><string>root</string></value>\n</param>\n<param>\n<value><string>a&lt;b&amp;c</string></value>\n</param>\n<param><value>untyped</value></param><param><value><int>7</int></value></param><param><value/></param></params>\n</methodCall>\n";
        let (m, p) = decode_call(doc).unwrap();
        assert_eq!(m, "session.login_with_password");
        assert_eq!(
            p,
            vec![
                Value::s("root"),
                Value::s("a<b&c"),
                Value::s("untyped"),
                Value::Int(7),
                Value::s("")
            ]
        );
    }

    #[test]
    fn refuses_bad_documents_with_a_position() {
        for bad in [
            "",
            "<methodCall>",
            "<methodCall><methodName>x</methodName><params><param><value><int>z</int></value></param></params></methodCall>",
            "<methodCall><methodName>x</methodName><params><param><value><foo>1</foo></value></param></params></methodCall>",
            "<methodCall><methodName>x&bogus;</methodName></methodCall>",
        ] {
            assert!(decode_call(bad).is_err(), "{bad}");
        }
        let deep = format!(
            "<methodCall><methodName>x</methodName><params><param>{}{}</param></params></methodCall>",
            "<value><array><data>".repeat(100),
            "</data></array></value>".repeat(100)
        );
        let e = decode_call(&deep).unwrap_err();
        assert!(e.message.contains("nested"), "{e}");
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            ".{0,12}".prop_map(Value::Str),
            any::<bool>().prop_map(Value::Bool),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z_]{1,6}", inner, 0..4).prop_map(Value::Struct),
            ]
        })
    }

    proptest! {
        #[test]
        fn round_trips(v in arb_value(), m in "[A-Za-z_.]{1,20}") {
            let doc = encode_call(&m, std::slice::from_ref(&v));
            let (m2, p) = decode_call(&doc).unwrap();
            prop_assert_eq!(m2, m);
            prop_assert_eq!(p, vec![v]);
        }

        #[test]
        fn never_panics_on_mutated_input(v in arb_value(), cut in 0usize..400, byte in any::<u8>()) {
            let mut doc = encode_call("VM.get_record", &[v]).into_bytes();
            let i = cut % doc.len();
            doc[i] = byte;
            if let Ok(s) = std::str::from_utf8(&doc) {
                let _ = decode_call(s);
                let _ = decode_value(s);
            }
        }
    }
}
