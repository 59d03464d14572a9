//! A bounded XML element tree for WS-Management messages, sans I/O.
//!
//! WS-Man packs meaning into attributes as much as into elements (`Selector Name="ShellId"`,
//! `Stream Name="stdout" End="true"`, `xsi:nil="true"`), so unlike a plain value tree every
//! attribute is kept, by local name. Namespace prefixes are dropped: no two WS-Man elements that
//! Ferry reads share a local name in different namespaces within one parent. Parsing is bounded
//! (depth, element count, no DTD) so a hostile peer cannot exhaust the proxy's memory.

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};

/// Deepest element nesting accepted.
pub const MAX_DEPTH: usize = 64;
/// Most elements in one message.
pub const MAX_ELEMENTS: usize = 1_000_000;

/// A malformed message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed WS-Management message: {0}")]
pub struct XmlError(pub String);

/// One element.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// Local name (prefix dropped).
    pub name: String,
    /// Attributes by local name, in document order (`xmlns` declarations left out).
    pub attrs: Vec<(String, String)>,
    /// Text content (entities resolved), concatenated.
    pub text: String,
    /// Child elements in document order.
    pub children: Vec<Node>,
}

impl Node {
    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child named `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The element at a `/`-separated path of child names.
    pub fn at(&self, path: &str) -> Option<&Node> {
        path.split('/').try_fold(self, |n, p| n.child(p))
    }

    /// The trimmed text at `path`.
    pub fn text_at(&self, path: &str) -> Option<&str> {
        self.at(path).map(|n| n.text.trim())
    }

    /// The value of attribute `name` (local name).
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// First descendant (depth first, self included) named `name`.
    pub fn find(&self, name: &str) -> Option<&Node> {
        if self.name == name {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(name))
    }
}

/// Parses one document into its root element.
pub fn parse(xml: &[u8]) -> Result<Node, XmlError> {
    let mut r = Reader::from_reader(xml);
    let err = |pos: u64, m: String| XmlError(format!("at byte {pos}: {m}"));
    let mut stack: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;
    let mut count = 0usize;
    loop {
        let pos = r.buffer_position();
        let ev = r.read_event().map_err(|e| err(pos, e.to_string()))?;
        match ev {
            Event::Start(_) | Event::Empty(_) if root.is_some() => {
                return Err(err(pos, "content after the root element".into()));
            }
            Event::Start(ref e) | Event::Empty(ref e) => {
                count += 1;
                if stack.len() >= MAX_DEPTH || count > MAX_ELEMENTS {
                    return Err(err(pos, "document too deep or too large".into()));
                }
                let empty = matches!(ev, Event::Empty(_));
                let n = element(e).map_err(|m| err(pos, m))?;
                if empty {
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(n),
                        None => root = Some(n),
                    }
                } else {
                    stack.push(n);
                }
            }
            Event::End(_) => {
                let n = stack
                    .pop()
                    .ok_or_else(|| err(pos, "unbalanced end tag".into()))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(n),
                    None => root = Some(n),
                }
            }
            Event::Text(t) => {
                let s = t.decode().map_err(|e| err(pos, e.to_string()))?;
                match stack.last_mut() {
                    Some(n) => n.text.push_str(&s),
                    None if s.trim().is_empty() => {}
                    None => return Err(err(pos, "text outside the root".into())),
                }
            }
            Event::CData(t) => {
                let s = t.decode().map_err(|e| err(pos, e.to_string()))?;
                if let Some(n) = stack.last_mut() {
                    n.text.push_str(&s);
                }
            }
            Event::GeneralRef(g) => {
                let c = if g.is_char_ref() {
                    g.resolve_char_ref().map_err(|e| err(pos, e.to_string()))?
                } else {
                    let name = g.decode().map_err(|e| err(pos, e.to_string()))?;
                    Some(match name.as_ref() {
                        "lt" => '<',
                        "gt" => '>',
                        "amp" => '&',
                        "apos" => '\'',
                        "quot" => '"',
                        other => return Err(err(pos, format!("unknown entity &{other};"))),
                    })
                };
                let c = c.ok_or_else(|| err(pos, "invalid character reference".into()))?;
                if let Some(n) = stack.last_mut() {
                    n.text.push(c);
                }
            }
            // No DTDs: entity definitions are how XML bombs are built.
            Event::DocType(_) => return Err(err(pos, "DOCTYPE is not allowed".into())),
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if let Some(open) = stack.last() {
        return Err(XmlError(format!("document ends inside <{}>", open.name)));
    }
    root.ok_or_else(|| XmlError("no root element".into()))
}

fn element(e: &BytesStart<'_>) -> Result<Node, String> {
    let mut n = Node {
        name: String::from_utf8_lossy(e.local_name().as_ref()).into_owned(),
        ..Node::default()
    };
    for a in e.attributes() {
        let a = a.map_err(|e| e.to_string())?;
        let key = a.key;
        if key.as_ref() == b"xmlns" || key.prefix().is_some_and(|p| p.as_ref() == b"xmlns") {
            continue;
        }
        let v = a.unescape_value().map_err(|e| e.to_string())?.into_owned();
        n.attrs.push((
            String::from_utf8_lossy(key.local_name().as_ref()).into_owned(),
            v,
        ));
    }
    Ok(n)
}

/// Escapes text for element content or an attribute value.
pub fn escape(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_text_and_bounds() {
        let n = parse(
            br#"<?xml version="1.0"?><s:E xmlns:s="x" xmlns:w="y"><w:Selector Name="ShellId">A&amp;B</w:Selector><b xsi:nil="true"/></s:E>"#,
        )
        .unwrap();
        assert_eq!(n.name, "E");
        let s = n.child("Selector").unwrap();
        assert_eq!(s.attr("Name"), Some("ShellId"));
        assert_eq!(s.text, "A&B");
        assert_eq!(n.child("b").unwrap().attr("nil"), Some("true"));
        assert!(parse(b"<!DOCTYPE x [<!ENTITY a 'b'>]><x/>").is_err());
        assert!(parse(b"<a><b></a>").is_err());
        assert!(parse(b"<a/><b/>").is_err());
        let deep = "<a>".repeat(MAX_DEPTH + 1);
        assert!(parse(deep.as_bytes()).is_err());
    }
}
