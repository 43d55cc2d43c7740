//! The volume: where a client request meets the cluster's verdict.
//!
//! Every NBD request goes through here. The volume first reads the gate —
//! the cluster core's current verdict on whether this node may serve I/O
//! (it is Primary, its generation is recorded, it has quorum) — and only
//! then touches the storage. The cluster core is the only writer of the
//! gate; the I/O path only reads it, a lock-free load per request.
//!
//! A write is acknowledged (the returned future resolves `Ok`) once it is
//! durable as far as the replication protocol requires; FUA and FLUSH add
//! an fdatasync on top.

use std::io;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use thiserror::Error;

use crate::storage::Storage;

/// Why the gate refuses I/O, mapped to the NBD error a client sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not Primary: `EPERM`.
    NotPrimary,
    /// Being demoted or shut down: `ESHUTDOWN`.
    ShuttingDown,
    /// Lost quorum (or lease) under `on-no-quorum = "io-error"`: `EIO`.
    NoQuorum,
}

/// The cluster core's verdict, as the I/O path sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Serve I/O on an export of this size.
    Open { size_bytes: u64 },
    /// Refuse I/O; `reason` is shown to NBD clients at `OPT_GO`.
    Closed { refusal: Refusal, reason: String },
}

/// A failed volume operation.
#[derive(Debug, Error)]
pub enum VolumeError {
    #[error("refused: {reason}")]
    Refused { refusal: Refusal, reason: String },
    #[error("fast zeroing is not supported by this disk")]
    FastZeroUnsupported,
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// What an NBD client needs to know to use the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size_bytes: u64,
    pub fast_zero: bool,
    /// O_DIRECT backing: requests must be 512-byte aligned.
    pub direct: bool,
}

/// The resource's block device as this node serves it.
#[derive(Debug)]
pub struct Volume {
    resource: String,
    storage: Storage,
    gate: ArcSwap<Gate>,
}

impl Volume {
    pub fn new(resource: String, storage: Storage, gate: Gate) -> Volume {
        Volume {
            resource,
            storage,
            gate: ArcSwap::from_pointee(gate),
        }
    }

    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// Only the cluster core calls this.
    pub fn set_gate(&self, gate: Gate) {
        self.gate.store(Arc::new(gate));
    }

    pub fn gate(&self) -> Arc<Gate> {
        self.gate.load_full()
    }

    /// Whether a client may attach now, and to what.
    pub fn export(&self) -> Result<ExportInfo, String> {
        match &**self.gate.load() {
            Gate::Open { size_bytes } => Ok(ExportInfo {
                size_bytes: *size_bytes,
                fast_zero: self.storage.can_zero_fast(),
                direct: self.storage.direct(),
            }),
            Gate::Closed { reason, .. } => Err(reason.clone()),
        }
    }

    fn admit(&self) -> Result<(), VolumeError> {
        match &**self.gate.load() {
            Gate::Open { .. } => Ok(()),
            Gate::Closed { refusal, reason } => Err(VolumeError::Refused {
                refusal: *refusal,
                reason: reason.clone(),
            }),
        }
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<BytesMut, VolumeError> {
        self.admit()?;
        Ok(self.storage.read(offset, len as usize).await?)
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), VolumeError> {
        self.admit()?;
        Ok(self.storage.write(offset, data, fua).await?)
    }

    pub async fn flush(&self) -> Result<(), VolumeError> {
        self.admit()?;
        Ok(self.storage.flush().await?)
    }

    pub async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), VolumeError> {
        self.admit()?;
        self.storage.trim(offset, u64::from(len)).await?;
        self.flush_if(fua).await
    }

    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_punch: bool,
        fast_only: bool,
        fua: bool,
    ) -> Result<(), VolumeError> {
        self.admit()?;
        if fast_only {
            if !self.storage.can_zero_fast() {
                return Err(VolumeError::FastZeroUnsupported);
            }
            self.storage
                .write_zeroes_fast(offset, u64::from(len), may_punch)
                .await?;
        } else {
            self.storage
                .write_zeroes(offset, u64::from(len), may_punch)
                .await?;
        }
        self.flush_if(fua).await
    }

    async fn flush_if(&self, fua: bool) -> Result<(), VolumeError> {
        if fua {
            self.storage.flush().await?;
        }
        Ok(())
    }

    /// CACHE: a read-ahead hint.
    pub fn cache(&self, offset: u64, len: u32) -> Result<(), VolumeError> {
        self.admit()?;
        Ok(self.storage.prefetch(offset, u64::from(len))?)
    }

    /// Allocation map for BLOCK_STATUS: runs of (length, is_hole).
    pub fn allocation(&self, offset: u64, len: u32) -> Result<Vec<(u64, bool)>, VolumeError> {
        self.admit()?;
        Ok(self.storage.allocation(offset, u64::from(len))?)
    }

    /// Flushes everything written so far (used on demotion and shutdown,
    /// whatever the gate says).
    pub async fn flush_all(&self) -> io::Result<()> {
        self.storage.flush().await
    }
}
