#![no_main]
//! The WS-Man reply parser and what reads its tree (WMI instances, references, embedded CIM-XML)
//! never panic.

use ferry_hv_hyperv::{cim, wsman};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(wsman::Reply::Ok { body, .. }) = wsman::parse_reply(data) {
        let i = cim::Instance::from_node(&body);
        for (k, _) in &i.props {
            let _ = (i.u64(k), i.bool(k), i.texts(k), i.reference(k));
        }
        if let Some(items) = body.child("Items") {
            for c in &items.children {
                let _ = cim::Instance::from_node(c).to_xml("urn:x");
            }
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = cim::parse_embedded(s);
    }
});
