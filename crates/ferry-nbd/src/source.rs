//! [`BlockSource`] and [`BlockTarget`] over an [`NbdClient`]: backups read NBD exports (with
//! allocation from `base:allocation`), restores write into NBD targets.

use crate::client::NbdClient;
use async_trait::async_trait;
use bytes::Bytes;
use ferry_core::{BlockError, BlockSource, BlockTarget, ExtentMap};
use std::ops::Range;

#[async_trait]
impl BlockSource for NbdClient {
    fn size(&self) -> u64 {
        NbdClient::size(self)
    }

    fn name(&self) -> String {
        self.uri_redacted()
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        BlockError::check_range(&self.uri_redacted(), offset, buf.len() as u64, self.size())?;
        self.read(offset, buf)
            .await
            .map_err(|e| e.into_block_error(&self.uri_redacted()))
    }

    async fn read_shared(&self, offset: u64, len: usize) -> Result<Option<Bytes>, BlockError> {
        BlockError::check_range(&self.uri_redacted(), offset, len as u64, self.size())?;
        NbdClient::read_shared(self, offset, len)
            .await
            .map(Some)
            .map_err(|e| e.into_block_error(&self.uri_redacted()))
    }

    async fn allocated(&self, range: Range<u64>) -> Result<ExtentMap, BlockError> {
        NbdClient::allocated(self, range)
            .await
            .map_err(|e| e.into_block_error(&self.uri_redacted()))
    }

    fn preferred_read_size(&self) -> u64 {
        u64::from(self.info().block_preferred)
    }
}

#[async_trait]
impl BlockTarget for NbdClient {
    fn size(&self) -> u64 {
        NbdClient::size(self)
    }

    fn name(&self) -> String {
        self.uri_redacted()
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        BlockError::check_range(&self.uri_redacted(), offset, data.len() as u64, self.size())?;
        self.write(offset, data)
            .await
            .map_err(|e| e.into_block_error(&self.uri_redacted()))
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        BlockError::check_range(&self.uri_redacted(), offset, len, self.size())?;
        NbdClient::write_zeroes(self, offset, len)
            .await
            .map_err(|e| e.into_block_error(&self.uri_redacted()))
    }

    async fn flush(&self) -> Result<(), BlockError> {
        NbdClient::flush(self)
            .await
            .map_err(|e| e.into_block_error(&self.uri_redacted()))
    }
}
