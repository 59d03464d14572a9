//! Simulators of hypervisor management APIs and their data paths, for tests and `ferry demo`.
//!
//! * [`xen`]: a XenAPI server (Citrix Hypervisor / XCP-ng) that the official Python SDK accepts:
//!   XML-RPC and JSON-RPC over HTTPS, VMs/VDIs/VBDs/VIFs/SRs/networks/tasks, snapshots stored as
//!   VHD chains, real changed-block tracking, an NBD server with TLS, raw VDI export/import, and
//!   a side door through which tests write into guests and inject faults.
//! * [`hyperv`]: a WS-Management (WinRM) endpoint over a small WMI `root/virtualization/v2` model
//!   that pywinrm and pypsrp accept: Basic auth, Enumerate/Pull/Get/Invoke with jobs, the WinRS
//!   shell cycle.
//! * [`vmware`]: a vSphere front on govmomi's vcsim that adds disk contents, VMDK files on a
//!   datastore directory, changed block tracking (changeIds, QueryChangedDiskAreas) and faults.
//!
//! The simulators favour fidelity on the wire (shapes of records, error codes, bit orders) over
//! completeness of the API; `docs/simulators.md` lists what is covered.

pub mod hyperv;
pub mod vmware;
pub mod xen;
