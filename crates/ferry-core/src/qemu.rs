//! The one qemu-system command line Ferry boots guests with (ADR 0076): boot verification
//! (`ferry_engine::boot`) and the Xen simulator's NBD-backed VMs (instant recovery) both use
//! it, so a guest that passes boot verification boots the same way in the simulator.
//!
//! `pc` machine under TCG (no KVM needed, nested or not), SeaBIOS, the disk raw on IDE (what
//! every x86 OS can boot), no network, the serial console to a file, no display but a VGA
//! device for QMP screenshots, `-no-reboot`.

use std::ffi::OsString;
use std::path::PathBuf;

/// A guest to boot.
#[derive(Clone, Debug)]
pub struct QemuGuest {
    /// The emulator (`qemu-system-x86_64`).
    pub qemu: PathBuf,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// The boot disk: a qemu `file=` value (an NBD URI or a path), opened raw.
    pub drive: String,
    /// Where the serial console is written.
    pub console: PathBuf,
    /// The QMP socket qemu listens on (server, no wait).
    pub qmp: PathBuf,
}

impl QemuGuest {
    /// The command (program and arguments; the caller adds stdio and process handling).
    pub fn command(&self) -> std::process::Command {
        let mut c = std::process::Command::new(&self.qemu);
        c.args(self.args());
        c
    }

    /// The arguments after the program name.
    pub fn args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = [
            "-machine",
            "pc,accel=tcg",
            "-m",
            &self.memory_mib.to_string(),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-vga",
            "std",
            "-serial",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let mut console = OsString::from("file:");
        console.push(&self.console);
        v.push(console);
        v.push("-qmp".into());
        let mut qmp = OsString::from("unix:");
        qmp.push(&self.qmp);
        qmp.push(",server=on,wait=off");
        v.push(qmp);
        v.push("-drive".into());
        // Writes are never meant to be durable through qemu's cache: the overlay or the
        // simulator holds them, so flushes are skipped (`cache=unsafe`).
        v.push(format!("file={},format=raw,if=ide,cache=unsafe", self.drive).into());
        v.extend(["-boot", "c", "-no-reboot"].iter().map(OsString::from));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line() {
        let g = QemuGuest {
            qemu: "qemu-system-x86_64".into(),
            memory_mib: 256,
            drive: "nbd+unix:///d?socket=/t/n.sock".into(),
            console: "/t/console.log".into(),
            qmp: "/t/qmp.sock".into(),
        };
        let a: Vec<String> = g
            .args()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(
            a.join(" "),
            "-machine pc,accel=tcg -m 256 -nodefaults -no-user-config -display none -vga std \
             -serial file:/t/console.log -qmp unix:/t/qmp.sock,server=on,wait=off \
             -drive file=nbd+unix:///d?socket=/t/n.sock,format=raw,if=ide,cache=unsafe -boot c -no-reboot"
        );
    }
}
