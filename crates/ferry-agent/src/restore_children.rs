//! The checkpoint files Hyper-V made over a restore's disks (ADR 0187): a replica standby's
//! standard checkpoints add `<disk>_<GUID>.avhdx` children next to the disks the agent wrote,
//! and `DestroySystem` leaves them, as every file of the VM. `delete:<folder>` removes them
//! with the listed files, so the folder goes; any other file keeps it.

use std::path::Path;

/// The `.avhdx` files directly in `folder` whose parent chain (by their VHDX parent locators)
/// leads to one of `listed` (file names in `folder`), children of children included.
pub fn checkpoint_children(folder: &Path, listed: &[String]) -> Vec<String> {
    let mut avhdx: Vec<(String, String)> = std::fs::read_dir(folder)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.to_ascii_lowercase().ends_with(".avhdx") && !n.starts_with('.'))
        .filter_map(|n| {
            // The locator's last path component: Hyper-V keeps a checkpoint's file next to
            // its parent (a relative `.\x.vhdx` or an absolute `C:\…\x.vhdx`).
            let parent = ferry_image::vhdx_parent_locator(&folder.join(&n))
                .ok()?
                .into_iter()
                .next()?;
            let base = parent.rsplit(['\\', '/']).next()?.to_string();
            Some((n, base))
        })
        .collect();
    let mut known: Vec<String> = listed.to_vec();
    let mut out = Vec::new();
    loop {
        let (found, rest): (Vec<_>, Vec<_>) = avhdx
            .into_iter()
            .partition(|(_, p)| known.iter().any(|k| k.eq_ignore_ascii_case(p)));
        if found.is_empty() {
            return out;
        }
        for (n, _) in found {
            if !known.iter().any(|k| k.eq_ignore_ascii_case(&n)) {
                known.push(n.clone());
                out.push(n);
            }
        }
        avhdx = rest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_image::{ImageWriter, OutputFormat, create_vhdx_child};

    #[test]
    fn children_of_listed_disks_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for n in ["disk0.vhdx", "other.vhdx"] {
            let w = ImageWriter::create(d.join(n), OutputFormat::Vhdx, 4 << 20).unwrap();
            w.finish().unwrap();
        }
        create_vhdx_child(&d.join("disk0_A.avhdx"), &d.join("disk0.vhdx"), None).unwrap();
        create_vhdx_child(&d.join("disk0_B.avhdx"), &d.join("disk0_A.avhdx"), None).unwrap();
        create_vhdx_child(&d.join("other_C.avhdx"), &d.join("other.vhdx"), None).unwrap();
        std::fs::write(d.join("junk.avhdx"), b"not a vhdx").unwrap();
        let mut got = checkpoint_children(d, &["disk0.vhdx".to_string()]);
        got.sort();
        assert_eq!(got, ["disk0_A.avhdx", "disk0_B.avhdx"]);
        assert!(checkpoint_children(d, &[]).is_empty());
    }
}
