//! The simulator's own reading and writing of vim25 SOAP: a small element tree for requests and
//! vcsim's answers, envelopes and faults, and the streaming rewrite that adds `changeId` to disk
//! backings in property collector answers. Independent of the driver's client on purpose: two
//! implementations that agree are the point of a simulator.

use quick_xml::Reader;
use quick_xml::events::Event;
use std::fmt::Write as _;

/// One element.
#[derive(Debug, Clone, Default)]
pub struct El {
    pub name: String,
    pub xsi_type: Option<String>,
    pub type_attr: Option<String>,
    pub text: String,
    pub children: Vec<El>,
}

impl El {
    pub fn child(&self, n: &str) -> Option<&El> {
        self.children.iter().find(|c| c.name == n)
    }
    pub fn at(&self, path: &str) -> Option<&El> {
        path.split('/').try_fold(self, |e, p| e.child(p))
    }
    pub fn text_at(&self, path: &str) -> Option<&str> {
        self.at(path).map(|e| e.text.trim())
    }
    pub fn all<'a>(&'a self, n: &'a str) -> impl Iterator<Item = &'a El> + 'a {
        self.children.iter().filter(move |c| c.name == n)
    }
    pub fn type_name(&self) -> &str {
        self.xsi_type.as_deref().unwrap_or(&self.name)
    }
}

/// Parses a document (bounded depth; no DTDs).
pub fn parse(xml: &[u8]) -> Result<El, String> {
    let mut r = Reader::from_reader(xml);
    let mut stack: Vec<El> = Vec::new();
    let mut root = None;
    loop {
        match r.read_event().map_err(|e| e.to_string())? {
            Event::Start(e) => {
                if stack.len() > 128 {
                    return Err("too deep".into());
                }
                stack.push(element(&e)?);
            }
            Event::Empty(e) => {
                let n = element(&e)?;
                match stack.last_mut() {
                    Some(p) => p.children.push(n),
                    None => root = Some(n),
                }
            }
            Event::End(_) => {
                let n = stack.pop().ok_or("unbalanced")?;
                match stack.last_mut() {
                    Some(p) => p.children.push(n),
                    None => root = Some(n),
                }
            }
            Event::Text(t) => {
                if let Some(p) = stack.last_mut() {
                    p.text.push_str(&t.decode().map_err(|e| e.to_string())?);
                }
            }
            Event::GeneralRef(g) => {
                let c = if g.is_char_ref() {
                    g.resolve_char_ref().map_err(|e| e.to_string())?
                } else {
                    match g.decode().map_err(|e| e.to_string())?.as_ref() {
                        "lt" => Some('<'),
                        "gt" => Some('>'),
                        "amp" => Some('&'),
                        "apos" => Some('\''),
                        "quot" => Some('"'),
                        _ => None,
                    }
                };
                if let (Some(p), Some(c)) = (stack.last_mut(), c) {
                    p.text.push(c);
                }
            }
            Event::DocType(_) => return Err("DOCTYPE not allowed".into()),
            Event::Eof => break,
            _ => {}
        }
    }
    root.ok_or_else(|| "no root element".into())
}

fn element(e: &quick_xml::events::BytesStart<'_>) -> Result<El, String> {
    let mut n = El {
        name: String::from_utf8_lossy(e.local_name().as_ref()).into_owned(),
        ..El::default()
    };
    for a in e.attributes() {
        let a = a.map_err(|e| e.to_string())?;
        if a.key.local_name().as_ref() == b"type" {
            let v = a.unescape_value().map_err(|e| e.to_string())?.into_owned();
            if a.key.prefix().is_some() {
                n.xsi_type = Some(v.rsplit(':').next().unwrap_or(&v).to_string());
            } else {
                n.type_attr = Some(v);
            }
        }
    }
    Ok(n)
}

/// The method element of a request envelope.
pub fn request_method(xml: &[u8]) -> Result<El, String> {
    let env = parse(xml)?;
    env.child("Body")
        .and_then(|b| b.children.first())
        .cloned()
        .ok_or_else(|| "no SOAP Body".into())
}

pub fn esc(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

const ENV_OPEN: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
<soapenv:Envelope xmlns:soapenc=\"http://schemas.xmlsoap.org/soap/encoding/\" \
xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" \
xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" \
xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\"><soapenv:Body>";
const ENV_CLOSE: &str = "</soapenv:Body></soapenv:Envelope>";

/// A request envelope (for the simulator's own calls to vcsim).
pub fn request(method: &str, inner: &str) -> String {
    format!("{ENV_OPEN}<{method} xmlns=\"urn:vim25\">{inner}</{method}>{ENV_CLOSE}")
}

/// A response envelope.
pub fn response(method: &str, returnval: &str) -> String {
    format!(
        "{ENV_OPEN}<{method}Response xmlns=\"urn:vim25\">{returnval}</{method}Response>{ENV_CLOSE}"
    )
}

/// A fault envelope with a vim25 fault type and optional detail fields.
pub fn fault(kind: &str, message: &str, fields: &str) -> String {
    format!(
        "{ENV_OPEN}<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>{}</faultstring>\
<detail><{kind}Fault xmlns=\"urn:vim25\" xsi:type=\"{kind}\">{fields}</{kind}Fault></detail>\
</soapenv:Fault>{ENV_CLOSE}",
        esc(message)
    )
}

/// `<name type="KIND">value</name>`.
pub fn moref(name: &str, kind: &str, value: &str) -> String {
    format!("<{name} type=\"{}\">{}</{name}>", esc(kind), esc(value))
}

/// Inserts `<changeId>` into every `VirtualDisk`'s top backing inside the objects of a property
/// collector answer, asking `change_id(obj_type, obj_value, device_key)` for the value (None:
/// leave the backing alone). Everything else is copied byte for byte.
/// `this` is the object a `Fetch` (pyvmomi's property accessor) was about: its answer names
/// no object.
pub fn add_change_ids(
    xml: &[u8],
    this: Option<(String, String)>,
    mut change_id: impl FnMut(&str, &str, i64) -> Option<String>,
) -> Result<Vec<u8>, String> {
    let mut r = Reader::from_reader(xml);
    let mut out = Vec::with_capacity(xml.len() + 256);
    let mut copied = 0usize;
    // (name, xsi:type) of open elements.
    let mut stack: Vec<(String, Option<String>)> = Vec::new();
    let fixed = this.is_some();
    let mut obj: Option<(String, String)> = this;
    let mut in_obj = false;
    let mut obj_text = String::new();
    let mut obj_type = String::new();
    let mut disk_key: Option<i64> = None;
    let mut key_text: Option<String> = None;
    let mut backing_has_change_id = false;
    loop {
        let before = r.buffer_position() as usize;
        let ev = r.read_event().map_err(|e| e.to_string())?;
        match ev {
            Event::Start(e) => {
                let el = element(&e)?;
                let depth = stack.len();
                // RetrievePropertiesEx wraps objects in `objects`, RetrieveProperties (what
                // pyvmomi uses) answers one `returnval` per object.
                if !fixed && (el.name == "objects" || el.name == "returnval") {
                    obj = None;
                }
                if el.name == "obj"
                    && stack
                        .last()
                        .is_some_and(|(n, _)| n == "objects" || n == "returnval")
                {
                    in_obj = true;
                    obj_text.clear();
                    obj_type = el.type_attr.clone().unwrap_or_default();
                }
                if el.type_name() == "VirtualDisk" {
                    disk_key = None;
                }
                if el.name == "key"
                    && stack
                        .last()
                        .is_some_and(|(_, t)| t.as_deref() == Some("VirtualDisk"))
                {
                    key_text = Some(String::new());
                }
                if el.name == "backing"
                    && stack
                        .last()
                        .is_some_and(|(_, t)| t.as_deref() == Some("VirtualDisk"))
                {
                    backing_has_change_id = false;
                }
                if el.name == "changeId"
                    && depth >= 2
                    && stack[depth - 1].0 == "backing"
                    && stack[depth - 2].1.as_deref() == Some("VirtualDisk")
                {
                    backing_has_change_id = true;
                }
                stack.push((el.name, el.xsi_type));
            }
            Event::Text(t) => {
                let s = t.decode().map_err(|e| e.to_string())?;
                if in_obj {
                    obj_text.push_str(&s);
                }
                if let Some(k) = key_text.as_mut() {
                    k.push_str(&s);
                }
            }
            Event::End(_) => {
                let (name, _) = stack.pop().unwrap_or_default();
                if name == "obj" && in_obj {
                    in_obj = false;
                    obj = Some((obj_type.clone(), obj_text.trim().to_string()));
                }
                if name == "key" {
                    if let Some(k) = key_text.take() {
                        disk_key = k.trim().parse().ok();
                    }
                }
                let parent_is_disk = stack
                    .last()
                    .is_some_and(|(_, t)| t.as_deref() == Some("VirtualDisk"));
                if name == "backing" && parent_is_disk && !backing_has_change_id {
                    if let (Some((t, v)), Some(k)) = (&obj, disk_key) {
                        if let Some(id) = change_id(t, v, k) {
                            out.extend_from_slice(&xml[copied..before]);
                            copied = before;
                            out.extend_from_slice(
                                format!("<changeId>{}</changeId>", esc(&id)).as_bytes(),
                            );
                        }
                    }
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    out.extend_from_slice(&xml[copied..]);
    Ok(out)
}

/// Builds `<returnval>` of a DiskChangeInfo.
pub fn disk_change_info(start: u64, length: u64, areas: &[(u64, u64)]) -> String {
    let mut s = format!("<returnval><startOffset>{start}</startOffset><length>{length}</length>");
    for (a, l) in areas {
        let _ = write!(
            s,
            "<changedArea><start>{a}</start><length>{l}</length></changedArea>"
        );
    }
    s.push_str("</returnval>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_ids_go_into_disk_backings_only() {
        let x = br#"<E xmlns:xsi="x"><objects><obj type="VirtualMachine">vm-1</obj><propSet><val><VirtualDevice xsi:type="VirtualDisk"><key>2000</key><backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[d] a.vmdk</fileName></backing></VirtualDevice><VirtualDevice xsi:type="VirtualCdrom"><key>3000</key><backing><fileName>x</fileName></backing></VirtualDevice></val></propSet></objects></E>"#;
        let out = add_change_ids(x, None, |t, v, k| Some(format!("{t}/{v}/{k}"))).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("<fileName>[d] a.vmdk</fileName><changeId>VirtualMachine/vm-1/2000</changeId></backing>"), "{s}");
        assert_eq!(s.matches("changeId>").count(), 2, "{s}");
        let e = parse(s.as_bytes()).unwrap();
        assert_eq!(e.name, "E");
    }
}
