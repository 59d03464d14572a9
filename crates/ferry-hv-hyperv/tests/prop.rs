//! The fuzz target's entry points on random and mutated input, so CI exercises them: the reply
//! parser and the WMI readers never panic, and well-formed instances survive a round trip.

use ferry_hv_hyperv::cim::{Instance, Value, parse_embedded};
use ferry_hv_hyperv::wsman::{Reply, parse_reply};
use proptest::prelude::*;

const REPLY: &str = r#"<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" xmlns:a="http://schemas.xmlsoap.org/ws/2004/08/addressing"><s:Header><a:RelatesTo>uuid:1</a:RelatesTo></s:Header><s:Body><p:Msvm_ComputerSystem xmlns:p="urn:x"><p:Name>A</p:Name><p:EnabledState>2</p:EnabledState><p:Job><a:Address>x</a:Address><a:ReferenceParameters><w:ResourceURI xmlns:w="urn:w">urn:j</w:ResourceURI><w:SelectorSet xmlns:w="urn:w"><w:Selector Name="InstanceID">J</w:Selector></w:SelectorSet></a:ReferenceParameters></p:Job></p:Msvm_ComputerSystem></s:Body></s:Envelope>"#;

fn exercise(data: &[u8]) {
    if let Ok(Reply::Ok { body, .. }) = parse_reply(data) {
        let i = Instance::from_node(&body);
        for k in i.props.keys() {
            let _ = (i.u64(k), i.bool(k), i.texts(k), i.reference(k));
        }
        let _ = i.to_xml("urn:x");
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = parse_embedded(s);
    }
}

proptest! {
    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        exercise(&data);
    }

    #[test]
    fn mutated_replies_never_panic(at in 0usize..REPLY.len(), cut in 0usize..64, byte in any::<u8>()) {
        let mut d = REPLY.as_bytes().to_vec();
        d[at] = byte;
        d.truncate(d.len().saturating_sub(cut));
        exercise(&d);
    }

    #[test]
    fn instances_round_trip(name in "[A-Za-z]{1,12}", vals in proptest::collection::vec("[ -~]{0,20}", 1..4)) {
        let mut i = Instance { class: "C".into(), ..Instance::default() };
        let v = if vals.len() == 1 {
            Value::Text(vals[0].trim().to_string())
        } else {
            Value::Array(vals.iter().map(|s| Value::Text(s.trim().to_string())).collect())
        };
        i.props.insert(name, v);
        let n = ferry_hv_hyperv::xml::parse(i.to_xml("urn:x").as_bytes()).unwrap();
        prop_assert_eq!(Instance::from_node(&n), i);
    }
}

#[test]
fn the_sample_reply_reads() {
    let Reply::Ok {
        body, relates_to, ..
    } = parse_reply(REPLY.as_bytes()).unwrap()
    else {
        panic!("fault")
    };
    assert_eq!(relates_to, "uuid:1");
    let i = Instance::from_node(&body);
    assert_eq!(i.u64("EnabledState"), Some(2));
    assert_eq!(
        i.reference("Job").unwrap().selector("InstanceID"),
        Some("J")
    );
}
