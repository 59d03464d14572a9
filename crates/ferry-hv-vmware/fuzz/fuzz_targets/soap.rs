#![no_main]
//! The vim25 response parser and what reads its tree (faults, DiskChangeInfo, devices) never panic.

use ferry_hv_vmware::{client, model, xml};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match xml::parse_response(data) {
        Ok(xml::Response::Ok(n)) => {
            if let Some(rv) = n.child("returnval") {
                if let Ok(p) = client::parse_change_info(rv) {
                    assert!(p.start.checked_add(p.length).is_some());
                }
                let _ = model::parse_devices(rv);
            }
        }
        Ok(xml::Response::Fault(f)) => {
            let _ = ferry_hv_vmware::FaultKind::from_name(f.kind.as_deref().unwrap_or(&f.code));
        }
        Err(_) => {}
    }
});
