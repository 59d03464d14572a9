//! The appliance's side of restore requests (ADR 0169): what the Hyper-V driver calls to make
//! a restored VM's folder, write its disks as VHDX files and remove them after a failure.

use crate::AgentError;
use crate::restore::RestoreRequest;
use ferry_core::{BlockSource, ExtentMap};
use ferry_nbd::{NbdClient, NbdError};
use ferry_tls::ClientIdentity;
use futures::{StreamExt, TryStreamExt};

/// Bytes read from the source and written per request.
const PIECE: u64 = 1 << 20;
/// Pieces in flight while a disk is written.
const IN_FLIGHT: usize = 8;

/// Granularity at which zeros are skipped (the agent stages in 64 KiB cells).
const ZERO_STEP: usize = 64 << 10;

/// The runs `[start, end)` of `buf` that hold a non-zero byte, in steps of `step` bytes.
fn nonzero_runs(buf: &[u8], step: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, c) in buf.chunks(step).enumerate() {
        if c.iter().all(|b| *b == 0) {
            continue;
        }
        let (start, end) = (i * step, i * step + c.len());
        match runs.last_mut() {
            Some(r) if r.1 == start => r.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

/// One agent, pinned both ways, that takes restore requests.
#[derive(Clone)]
pub struct RestoreClient {
    addr: String,
    pin: String,
    identity: ClientIdentity,
}

impl std::fmt::Debug for RestoreClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreClient")
            .field("addr", &self.addr)
            .field("pin", &self.pin)
            .finish_non_exhaustive()
    }
}

impl RestoreClient {
    /// The agent at `addr` (`host:port`), trusted by certificate `agent_pin`, presenting
    /// `identity`.
    pub fn new(
        addr: impl Into<String>,
        agent_pin: impl Into<String>,
        identity: ClientIdentity,
    ) -> Self {
        Self {
            addr: addr.into(),
            pin: agent_pin.into(),
            identity,
        }
    }

    /// Where the agent listens.
    pub fn address(&self) -> &str {
        &self.addr
    }

    /// Asks `req` over `connections` connections; the agent's refusal is
    /// [`AgentError::RestoreRefused`] with its reason.
    async fn ask(&self, req: &RestoreRequest, connections: usize) -> Result<NbdClient, AgentError> {
        let mut cfg =
            crate::client::config(&self.addr, &self.pin, &self.identity, &req.export_name())?;
        cfg.connections = connections;
        match crate::client::connect(cfg, &self.addr, &self.identity).await {
            Err(AgentError::Nbd(e)) => match *e {
                NbdError::Refused { message, .. } => Err(AgentError::RestoreRefused {
                    agent: self.addr.clone(),
                    request: req.describe(),
                    message,
                }),
                other => Err(AgentError::Nbd(Box::new(other))),
            },
            r => r,
        }
    }

    /// Asks a request whose answer is only success or a refusal.
    async fn call(&self, req: RestoreRequest) -> Result<(), AgentError> {
        self.ask(&req, 1).await?.close().await;
        Ok(())
    }

    /// Makes the new folder `folder` (host path) under one of the agent's restore roots; an
    /// existing folder is refused ([`AgentError::already_exists`]).
    pub async fn mkdir(&self, folder: &str) -> Result<(), AgentError> {
        self.call(RestoreRequest::Mkdir {
            folder: folder.into(),
        })
        .await
    }

    /// Removes folder `folder`, made by [`Self::mkdir`], with the disks written into it; a
    /// folder that is gone already is success.
    pub async fn delete(&self, folder: &str) -> Result<(), AgentError> {
        self.call(RestoreRequest::Delete {
            folder: folder.into(),
        })
        .await
    }

    /// Writes `src` as the new dynamic VHDX `path` (host path, in a folder [`Self::mkdir`]
    /// made): its allocated, non-zero pieces over NBD, then the commit that makes the file
    /// appear whole. Returns the bytes sent (non-zero runs only).
    pub async fn write_vhdx(&self, path: &str, src: &dyn BlockSource) -> Result<u64, AgentError> {
        let size = src.size();
        let disk = self
            .ask(
                &RestoreRequest::Create {
                    size,
                    path: path.into(),
                },
                4,
            )
            .await?;
        let sent = self.send(&disk, src).await;
        let sent = match sent {
            Ok(n) => n,
            Err(e) => {
                disk.close().await;
                return Err(e);
            }
        };
        disk.flush().await?;
        disk.close().await;
        self.commit(path, size).await?;
        Ok(sent)
    }

    /// Makes the disk written into the `create` export of `path` (by this client or any NBD
    /// client, e.g. nbdcopy) the VHDX file `path`, checking it has `size` bytes.
    pub async fn commit(&self, path: &str, size: u64) -> Result<(), AgentError> {
        let done = self
            .ask(&RestoreRequest::Commit { path: path.into() }, 1)
            .await?;
        let got = done.size();
        done.close().await;
        if got != size {
            return Err(AgentError::RestoreRefused {
                agent: self.addr.clone(),
                request: format!("commit {path}"),
                message: format!("the written VHDX has {got} bytes, not {size}"),
            });
        }
        Ok(())
    }

    /// Writes the `extents` of `src` into the EXISTING VHDX `path` (host path, in a folder
    /// [`Self::mkdir`] made): staged over NBD (zero pieces as WRITE_ZEROES), then the commit
    /// that writes the touched VHDX blocks into the file in place. Returns the data bytes sent.
    pub async fn update_vhdx(
        &self,
        path: &str,
        src: &dyn BlockSource,
        extents: &ExtentMap,
    ) -> Result<u64, AgentError> {
        let disk = self
            .ask(&RestoreRequest::Update { path: path.into() }, 1)
            .await?;
        let size = disk.size();
        let end = src.size().min(size);
        let mut sent = 0u64;
        let mut buf = vec![0u8; PIECE as usize];
        let r: Result<(), AgentError> = async {
            for e in extents.iter() {
                let mut at = e.offset;
                while at < e.end().min(end) {
                    let n = (e.end().min(end) - at).min(PIECE) as usize;
                    src.read_at(at, &mut buf[..n])
                        .await
                        .map_err(|x| AgentError::Io {
                            what: format!("read {} at {at}", src.name()),
                            source: std::io::Error::other(x),
                        })?;
                    if buf[..n].iter().all(|b| *b == 0) {
                        disk.write_zeroes(at, n as u64).await?;
                    } else {
                        disk.write(at, &buf[..n]).await?;
                        sent += n as u64;
                    }
                    at += n as u64;
                }
            }
            disk.flush().await?;
            Ok(())
        }
        .await;
        disk.close().await;
        r?;
        self.commit(path, size).await?;
        Ok(sent)
    }

    async fn send(&self, disk: &NbdClient, src: &dyn BlockSource) -> Result<u64, AgentError> {
        let size = src.size();
        let map = src.allocated(0..size).await.map_err(|e| AgentError::Io {
            what: format!("allocation map of {}", src.name()),
            source: std::io::Error::other(e),
        })?;
        let pieces = map.iter().flat_map(|e| {
            (e.offset..e.end())
                .step_by(PIECE as usize)
                .map(move |at| (at, (e.end() - at).min(PIECE) as usize))
        });
        futures::stream::iter(pieces)
            .map(|(at, n)| async move {
                let mut buf = vec![0u8; n];
                src.read_at(at, &mut buf)
                    .await
                    .map_err(|e| AgentError::Io {
                        what: format!("read {} at {at}", src.name()),
                        source: std::io::Error::other(e),
                    })?;
                // Only the non-zero runs (in steps of the agent's staging cell): zeros cost
                // nothing on a new disk.
                let mut sent = 0u64;
                for (start, end) in nonzero_runs(&buf, ZERO_STEP) {
                    disk.write(at + start as u64, &buf[start..end]).await?;
                    sent += (end - start) as u64;
                }
                Ok::<u64, AgentError>(sent)
            })
            .buffer_unordered(IN_FLIGHT)
            .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::nonzero_runs;

    #[test]
    fn only_non_zero_runs_are_sent() {
        let mut b = vec![0u8; 10];
        assert!(nonzero_runs(&b, 4).is_empty());
        b[1] = 1;
        b[5] = 1;
        b[9] = 1;
        assert_eq!(nonzero_runs(&b, 4), [(0, 10)]);
        b[5] = 0;
        assert_eq!(nonzero_runs(&b, 4), [(0, 4), (8, 10)]);
    }
}
