//! WMI (CIM) objects as WS-Man carries them, sans I/O: instances, endpoint references,
//! method inputs and the CIM-XML text of embedded instances.
//!
//! An instance travels as an element named after its class whose children are its properties;
//! arrays repeat the property element; `xsi:nil="true"` is null; a reference is an element with
//! `Address` and `ReferenceParameters/{ResourceURI,SelectorSet}` children.

use crate::envelope::{ANONYMOUS, NS_ADDRESSING, NS_WSMAN, NS_XSI};
use crate::xml::{Node, escape};
use std::collections::BTreeMap;

/// Resource URI prefix of `root/virtualization/v2` classes.
pub const VIRTUALIZATION_V2: &str =
    "http://schemas.microsoft.com/wbem/wsman/1/wmi/root/virtualization/v2/";

/// The resource URI of a `root/virtualization/v2` class.
pub fn class_uri(class: &str) -> String {
    format!("{VIRTUALIZATION_V2}{class}")
}

/// A WS-Addressing endpoint reference to one WMI object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Epr {
    /// `ReferenceParameters/ResourceURI`.
    pub resource_uri: String,
    /// `ReferenceParameters/SelectorSet` (name, value).
    pub selectors: Vec<(String, String)>,
}

impl Epr {
    /// A reference to `class` (in `root/virtualization/v2`) with `selectors`.
    pub fn new(class: &str, selectors: &[(&str, &str)]) -> Self {
        Self {
            resource_uri: class_uri(class),
            selectors: selectors
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// The class name: the last segment of the resource URI.
    pub fn class(&self) -> &str {
        self.resource_uri
            .rsplit('/')
            .next()
            .unwrap_or(&self.resource_uri)
    }

    /// The value of selector `name`.
    pub fn selector(&self, name: &str) -> Option<&str> {
        self.selectors
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Reads a reference from an element with `Address` and `ReferenceParameters` children.
    pub fn from_node(n: &Node) -> Option<Self> {
        let rp = n.child("ReferenceParameters")?;
        Some(Self {
            resource_uri: rp.text_at("ResourceURI")?.to_string(),
            selectors: rp
                .child("SelectorSet")
                .map(|s| {
                    s.all("Selector")
                        .map(|x| {
                            (
                                x.attr("Name").unwrap_or("").to_string(),
                                x.text.trim().to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// The reference as the content of element `<prefix:tag>` (namespaces declared inline).
    pub fn to_xml(&self, tag: &str) -> String {
        let mut s = format!(
            "<{tag}><a:Address xmlns:a=\"{NS_ADDRESSING}\">{ANONYMOUS}</a:Address><a:ReferenceParameters xmlns:a=\"{NS_ADDRESSING}\"><w:ResourceURI xmlns:w=\"{NS_WSMAN}\">{}</w:ResourceURI><w:SelectorSet xmlns:w=\"{NS_WSMAN}\">",
            escape(&self.resource_uri)
        );
        for (k, v) in &self.selectors {
            s.push_str(&format!(
                "<w:Selector Name=\"{}\">{}</w:Selector>",
                escape(k),
                escape(v)
            ));
        }
        let close = tag.split_whitespace().next().unwrap_or(tag);
        s.push_str(&format!(
            "</w:SelectorSet></a:ReferenceParameters></{close}>"
        ));
        s
    }
}

/// One property value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `xsi:nil="true"`.
    Null,
    /// A scalar, as text.
    Text(String),
    /// A reference to another object.
    Ref(Epr),
    /// A repeated property.
    Array(Vec<Value>),
}

impl Value {
    fn from_node(n: &Node) -> Self {
        if n.attr("nil") == Some("true") {
            return Self::Null;
        }
        if n.child("ReferenceParameters").is_some() {
            if let Some(e) = Epr::from_node(n) {
                return Self::Ref(e);
            }
        }
        Self::Text(n.text.trim().to_string())
    }
}

/// An instance (or a method's output, which has the same shape).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Instance {
    /// The element's name: the class (or `<Method>_OUTPUT`).
    pub class: String,
    /// Properties by name.
    pub props: BTreeMap<String, Value>,
}

impl Instance {
    /// Reads an instance element.
    pub fn from_node(n: &Node) -> Self {
        let mut props: BTreeMap<String, Value> = BTreeMap::new();
        for c in &n.children {
            let v = Value::from_node(c);
            match props.remove(&c.name) {
                None => {
                    props.insert(c.name.clone(), v);
                }
                Some(Value::Array(mut a)) => {
                    a.push(v);
                    props.insert(c.name.clone(), Value::Array(a));
                }
                Some(first) => {
                    props.insert(c.name.clone(), Value::Array(vec![first, v]));
                }
            }
        }
        Self {
            class: n.name.clone(),
            props,
        }
    }

    /// The text of scalar property `name` (None when missing or null).
    pub fn text(&self, name: &str) -> Option<&str> {
        match self.props.get(name)? {
            Value::Text(t) => Some(t),
            Value::Array(a) => match a.first()? {
                Value::Text(t) => Some(t),
                _ => None,
            },
            _ => None,
        }
    }

    /// Property `name` as an unsigned number.
    pub fn u64(&self, name: &str) -> Option<u64> {
        self.text(name)?.parse().ok()
    }

    /// Property `name` as a boolean (`true` / `false`).
    pub fn bool(&self, name: &str) -> Option<bool> {
        match self.text(name)? {
            "true" | "TRUE" | "True" => Some(true),
            "false" | "FALSE" | "False" => Some(false),
            _ => None,
        }
    }

    /// Every text value of property `name` (a scalar gives one, null or missing none).
    pub fn texts(&self, name: &str) -> Vec<&str> {
        match self.props.get(name) {
            Some(Value::Text(t)) => vec![t.as_str()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| match v {
                    Value::Text(t) => Some(t.as_str()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The reference in property `name`.
    pub fn reference(&self, name: &str) -> Option<&Epr> {
        match self.props.get(name)? {
            Value::Ref(e) => Some(e),
            _ => None,
        }
    }

    /// The instance as WS-Man XML, in namespace `ns` (the class's resource URI).
    pub fn to_xml(&self, ns: &str) -> String {
        let mut s = format!(
            "<p:{} xmlns:p=\"{}\" xmlns:xsi=\"{NS_XSI}\">",
            self.class,
            escape(ns)
        );
        for (k, v) in &self.props {
            push_value(&mut s, k, v);
        }
        s.push_str(&format!("</p:{}>", self.class));
        s
    }
}

fn push_value(s: &mut String, k: &str, v: &Value) {
    match v {
        Value::Null => s.push_str(&format!("<p:{k} xsi:nil=\"true\"/>")),
        Value::Text(t) => s.push_str(&format!("<p:{k}>{}</p:{k}>", escape(t))),
        Value::Ref(e) => s.push_str(&e.to_xml(&format!("p:{k}"))),
        Value::Array(a) => {
            for x in a {
                push_value(s, k, x);
            }
        }
    }
}

/// A method parameter.
#[derive(Debug, Clone)]
pub enum Param {
    /// A scalar.
    Text(String, String),
    /// A reference.
    Ref(String, Epr),
    /// An embedded instance, sent as CIM-XML text (see [`embedded_instance`]).
    Embedded(String, String),
    /// An array of scalars.
    Texts(String, Vec<String>),
}

/// The body of an invocation of `method` on an object of `resource_uri`.
pub fn invoke_body(resource_uri: &str, method: &str, params: &[Param]) -> String {
    let mut s = format!(
        "<p:{method}_INPUT xmlns:p=\"{}\" xmlns:xsi=\"{NS_XSI}\">",
        escape(resource_uri)
    );
    for p in params {
        match p {
            Param::Text(k, v) | Param::Embedded(k, v) => {
                s.push_str(&format!("<p:{k}>{}</p:{k}>", escape(v)))
            }
            Param::Ref(k, e) => s.push_str(&e.to_xml(&format!("p:{k}"))),
            Param::Texts(k, vs) => {
                for v in vs {
                    s.push_str(&format!("<p:{k}>{}</p:{k}>", escape(v)));
                }
            }
        }
    }
    s.push_str(&format!("</p:{method}_INPUT>"));
    s
}

/// An embedded instance as CIM-XML text (DSP0201), the form WMI's methods take for string
/// parameters such as `SnapshotSettings`: `(name, CIM type, value)` per property.
pub fn embedded_instance(class: &str, props: &[(&str, &str, &str)]) -> String {
    let mut s = format!("<INSTANCE CLASSNAME=\"{}\">", escape(class));
    for (name, ty, value) in props {
        s.push_str(&format!(
            "<PROPERTY NAME=\"{}\" TYPE=\"{}\"><VALUE>{}</VALUE></PROPERTY>",
            escape(name),
            escape(ty),
            escape(value)
        ));
    }
    s.push_str("</INSTANCE>");
    s
}

/// Reads CIM-XML embedded instance text back into (class, property → value).
pub fn parse_embedded(text: &str) -> Option<(String, BTreeMap<String, String>)> {
    let n = crate::xml::parse(text.as_bytes()).ok()?;
    if n.name != "INSTANCE" {
        return None;
    }
    let props = n
        .all("PROPERTY")
        .filter_map(|p| {
            Some((
                p.attr("NAME")?.to_string(),
                p.text_at("VALUE").unwrap_or("").to_string(),
            ))
        })
        .collect();
    Some((n.attr("CLASSNAME")?.to_string(), props))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xml::parse;

    #[test]
    fn instances_references_and_embedded_round_trip() {
        let job = Epr::new("Msvm_ConcreteJob", &[("InstanceID", "J1")]);
        let mut i = Instance {
            class: "CreateSnapshot_OUTPUT".into(),
            props: BTreeMap::new(),
        };
        i.props.insert("Job".into(), Value::Ref(job.clone()));
        i.props
            .insert("ReturnValue".into(), Value::Text("4096".into()));
        i.props.insert("ResultingSnapshot".into(), Value::Null);
        i.props.insert(
            "Paths".into(),
            Value::Array(vec![Value::Text("a".into()), Value::Text("b".into())]),
        );
        let back = Instance::from_node(&parse(i.to_xml("urn:x").as_bytes()).unwrap());
        assert_eq!(back, i);
        assert_eq!(back.reference("Job").unwrap().class(), "Msvm_ConcreteJob");
        assert_eq!(back.u64("ReturnValue"), Some(4096));
        assert_eq!(back.texts("Paths"), vec!["a", "b"]);
        let e = embedded_instance(
            "Msvm_VirtualSystemSnapshotSettingData",
            &[("ConsistencyLevel", "uint8", "1")],
        );
        let (c, p) = parse_embedded(&e).unwrap();
        assert_eq!(c, "Msvm_VirtualSystemSnapshotSettingData");
        assert_eq!(p["ConsistencyLevel"], "1");
    }
}
