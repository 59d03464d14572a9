//! `ferry.toml` as the appliance validates it (jobs, cron expressions, time zones, windows,
//! patterns): any input is a document or a problem naming what is wrong, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ferry_daemon::config::Document::parse(text, std::path::Path::new("fuzz.toml")) {
        Ok(doc) => {
            for (name, job) in &doc.jobs {
                let _ = job.selects(name, text);
                if let Ok(Some(w)) = job.window() {
                    let _ = w.contains(chrono::Utc::now());
                }
            }
        }
        Err(p) => assert!(!p.detail.is_empty()),
    }
    if let Some((p, s)) = text.split_once('\n') {
        let _ = ferry_daemon::config::glob(&p[..p.len().min(64)], &s[..s.len().min(256)]);
    }
});
