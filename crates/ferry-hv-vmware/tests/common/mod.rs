//! What the driver tests against `ferry sim vmware` share (`sim.rs`, `replica.rs`).

use ferry_hv::FerryConfig;
use ferry_sim::vmware::VmwareSim;
use std::path::Path;

/// `[sources.vc]` for `sim` with `transports` (a TOML array) and `extra` lines, state in
/// `dir/state`, SAN reads off the simulator's datastore directories.
pub fn config(sim: &VmwareSim, dir: &Path, transports: &str, extra: &str) -> FerryConfig {
    let mut t = format!(
        "[sources.vc]\nkind = \"vmware\"\nurl = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\ntls-fingerprint = \"{}\"\ntransports = {transports}\nstate-dir = \"{}\"\nproxy = \"none\"\n{extra}\n[sources.vc.san-paths]\n",
        sim.url(),
        sim.username(),
        sim.password(),
        sim.tls_fingerprint(),
        dir.join("state").display()
    );
    for (ds, p) in sim.san_paths() {
        t.push_str(&format!("\"{ds}\" = \"{}\"\n", p.display()));
    }
    FerryConfig::parse(&t, Path::new("test.toml")).unwrap()
}
