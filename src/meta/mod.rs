//! On-disk metadata (docs/design.md, "Metadata on disk"): the superblock, the per-peer bitmaps and
//! the activity log, internal (end of the disk) or in a separate file.
//!
//! [`MetaStore`] owns the file that holds the metadata and the current
//! superblock. A change is staged in memory ([`MetaStore::stage`]) and made
//! durable by [`MetaStore::commit`], which writes the next sequence number
//! into the copy not holding the last durable one and waits for it to be
//! on disk. The cluster core stages the changes of a step and commits them
//! once, before anything of the step leaves the node: so a peer or a client
//! acts on a new state (a vote, a new generation) only once it is safe on
//! disk. [`MetaStore::update`] does both, for callers outside the core.

pub mod activity_log;
pub mod bitmap;
pub mod layout;
pub mod superblock;
pub mod tracker;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::config::{Config, MetaLocation, Node, NodeKind};
use crate::vocabulary::generation::{Generation, Lineage};
use layout::{Layout, Placement, META_BLOCK_BYTES, SUPERBLOCK_COPIES};
use superblock::{DecodeError, PeerSlot, StoredDisk, StoredKind, Superblock, SuperblockFlags};

/// Metadata failures, worded for the operator.
#[derive(Debug, Error)]
pub enum MetaError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "disk {} does not exist; create it (e.g. `truncate -s 1G {}`) or point `disk` at a \
         block device",
        path.display(), path.display()
    )]
    DiskMissing { path: PathBuf },
    #[error(
        "device of {device_bytes} bytes is too small for {meta_bytes} bytes of metadata plus data"
    )]
    DeviceTooSmall { device_bytes: u64, meta_bytes: u64 },
    #[error("no valid hablk metadata on {} ({reason}); {}", path.display(), reason.advice())]
    NoMetadata { path: PathBuf, reason: DecodeError },
    #[error(
        "{} already holds hablk metadata (resource {resource}, node {node}, generation \
         {generation}); `create-md --force` overwrites it and forgets this node's sync state",
        path.display()
    )]
    AlreadyExists {
        path: PathBuf,
        resource: String,
        node: String,
        generation: Generation,
    },
    #[error(
        "metadata on {} belongs to {found}, but this node is {expected}; check -n NODE and \
         the config, or run `create-md --force`",
        path.display()
    )]
    Mismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "disk {} has {now} bytes but had {recorded} when its metadata was created; \
         internal metadata cannot follow a resized disk",
        path.display()
    )]
    DeviceResized {
        path: PathBuf,
        now: u64,
        recorded: u64,
    },
}

/// Owns the metadata file and the current superblock.
#[derive(Debug)]
pub struct MetaStore {
    file: File,
    path: PathBuf,
    superblock: Superblock,
    /// The newest superblock on disk: `superblock` goes back to it when a
    /// write fails.
    durable: Superblock,
    /// Staged changes not yet on disk.
    staged: bool,
    /// A write failed: the metadata is given up on until a restart, and
    /// nothing more is staged (the superblock stays the durable one, what
    /// a restart would read).
    detached: bool,
    /// Unit tests of the cluster core, and fault injection, make
    /// superblock writes fail.
    #[cfg(any(test, feature = "failpoints"))]
    failing: bool,
}

/// Where one node's metadata is, and how it is laid out around its data.
struct Site {
    /// The file holding the metadata.
    path: PathBuf,
    placement: Placement,
    /// The data device, when it is a separate file (external metadata).
    data_disk: Option<PathBuf>,
}

fn site(node: &Node) -> Site {
    match (&node.kind, &node.meta) {
        (NodeKind::Data { disk, .. }, MetaLocation::Internal) => Site {
            path: disk.clone(),
            placement: Placement::Internal,
            data_disk: None,
        },
        (NodeKind::Data { disk, .. }, MetaLocation::File(meta)) => Site {
            path: meta.clone(),
            placement: Placement::External,
            data_disk: Some(disk.clone()),
        },
        (NodeKind::Witness, MetaLocation::File(meta)) => Site {
            path: meta.clone(),
            placement: Placement::WitnessState,
            data_disk: None,
        },
        // The config always gives a witness a state file.
        (NodeKind::Witness, MetaLocation::Internal) => Site {
            path: PathBuf::new(),
            placement: Placement::WitnessState,
            data_disk: None,
        },
    }
}

/// Writes `bytes` at `offset` and waits until they are durable, without
/// flushing the rest of the file: internal metadata shares its file with
/// the data, and an fdatasync would write back every dirty data page too.
pub fn write_durable(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    let mut done = 0;
    while done < bytes.len() {
        let slices = [std::io::IoSlice::new(&bytes[done..])];
        let n = rustix::io::pwritev2(
            file.as_fd(),
            &slices,
            offset + done as u64,
            rustix::io::ReadWriteFlags::DSYNC,
        )?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
        }
        done += n;
    }
    Ok(())
}

/// Size of a regular file or block device.
pub fn device_size(path: &Path) -> Result<u64, MetaError> {
    let mut file = File::open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            MetaError::DiskMissing {
                path: path.to_owned(),
            }
        } else {
            MetaError::Io {
                what: "cannot open disk",
                path: path.to_owned(),
                source,
            }
        }
    })?;
    file.seek(SeekFrom::End(0)).map_err(|source| MetaError::Io {
        what: "cannot size disk",
        path: path.to_owned(),
        source,
    })
}

fn read_superblock(file: &File, path: &Path, layout_base: u64) -> Result<Superblock, MetaError> {
    let mut copies = Vec::with_capacity(SUPERBLOCK_COPIES as usize);
    for copy in 0..SUPERBLOCK_COPIES {
        let mut block = vec![0u8; META_BLOCK_BYTES as usize];
        let offset = layout_base + copy * META_BLOCK_BYTES;
        let decoded = match file.read_exact_at(&mut block, offset) {
            Ok(()) => Superblock::decode(&block),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(DecodeError::Truncated),
            Err(source) => {
                return Err(MetaError::Io {
                    what: "cannot read superblock of",
                    path: path.to_owned(),
                    source,
                })
            }
        };
        copies.push(decoded);
    }
    let second = copies.pop().unwrap_or(Err(DecodeError::Truncated));
    let first = copies.pop().unwrap_or(Err(DecodeError::Truncated));
    Superblock::newest(first, second).map_err(|reason| MetaError::NoMetadata {
        path: path.to_owned(),
        reason,
    })
}

/// Where the superblock copies start, given the placement and the size of
/// the file that holds them.
fn superblock_base(placement: Placement, meta_file_bytes: u64) -> u64 {
    match placement {
        Placement::Internal => {
            let aligned = meta_file_bytes - meta_file_bytes % META_BLOCK_BYTES;
            aligned.saturating_sub(layout::SUPERBLOCK_AREA_BYTES)
        }
        Placement::External | Placement::WitnessState => 0,
    }
}

impl MetaStore {
    /// `create-md`: writes fresh metadata for `node`.
    pub fn create(config: &Config, node: &Node, force: bool) -> Result<MetaStore, MetaError> {
        let site = site(node);
        let device_bytes = match (&site.placement, &site.data_disk) {
            (Placement::Internal, _) => device_size(&site.path)?,
            (Placement::External, Some(disk)) => device_size(disk)?,
            _ => 0,
        };
        let layout = Layout::compute(site.placement, device_bytes, config.resource.max_peers)?;
        if let Some(parent) = site.path.parent() {
            if site.placement != Placement::Internal && !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|source| MetaError::Io {
                    what: "cannot create the directory of",
                    path: site.path.clone(),
                    source,
                })?;
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(site.placement != Placement::Internal)
            .truncate(false)
            .open(&site.path)
            .map_err(|source| MetaError::Io {
                what: "cannot open metadata",
                path: site.path.clone(),
                source,
            })?;
        if !force {
            let file_bytes = file_len(&file, &site.path)?;
            let base = superblock_base(site.placement, file_bytes);
            match read_superblock(&file, &site.path, base) {
                Ok(existing) => {
                    return Err(MetaError::AlreadyExists {
                        path: site.path,
                        resource: existing.resource,
                        node: existing.node_name,
                        generation: existing.lineage.current,
                    })
                }
                Err(MetaError::NoMetadata {
                    reason: DecodeError::UnknownVersion(version),
                    ..
                }) => {
                    return Err(MetaError::AlreadyExists {
                        path: site.path,
                        resource: format!("<format v{version}>"),
                        node: "?".into(),
                        generation: Generation::INITIAL,
                    })
                }
                Err(MetaError::NoMetadata { .. }) => {}
                Err(other) => return Err(other),
            }
        }
        if site.placement != Placement::Internal {
            file.set_len(layout.meta_file_bytes())
                .map_err(|source| MetaError::Io {
                    what: "cannot size metadata file",
                    path: site.path.clone(),
                    source,
                })?;
        }
        let mut peer_slots = vec![
            PeerSlot {
                node_id: None,
                tracking: None,
            };
            usize::from(layout.max_peers)
        ];
        if node.is_data() {
            for (slot, peer) in peer_slots
                .iter_mut()
                .zip(config.data_nodes().filter(|peer| peer.id != node.id))
            {
                slot.node_id = Some(peer.id);
            }
        }
        let superblock = Superblock {
            seq: 0,
            instance: rand::random(),
            resource: config.resource.name.clone(),
            node_id: node.id,
            node_name: node.name.clone(),
            kind: if node.is_data() {
                StoredKind::Data
            } else {
                StoredKind::Witness
            },
            device_bytes,
            layout,
            data_size_bytes: 0,
            disk: StoredDisk::Inconsistent,
            flags: SuperblockFlags {
                primary_crashed: false,
                needs_full_sync: node.is_data(),
                wrote_in_generation: false,
            },
            lineage: Lineage::initial(),
            known: Generation::INITIAL,
            peer_slots,
            al_extents: config.resource.al_extents,
            recording_from: None,
            abandoned: Vec::new(),
        };
        let mut store = MetaStore {
            #[cfg(any(test, feature = "failpoints"))]
            failing: false,
            file,
            path: site.path,
            durable: superblock.clone(),
            superblock,
            staged: false,
            detached: false,
        };
        // Write both copies so that no older metadata survives in either.
        store.write_copy(0)?;
        store.superblock.seq = 1;
        store.write_copy(1)?;
        store.durable = store.superblock.clone();
        Ok(store)
    }

    /// Opens existing metadata for `node`, checking it belongs to it.
    pub fn open(config: &Config, node: &Node) -> Result<MetaStore, MetaError> {
        let site = site(node);
        if let Some(disk) = &site.data_disk {
            device_size(disk)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&site.path)
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    match site.placement {
                        Placement::Internal => MetaError::DiskMissing {
                            path: site.path.clone(),
                        },
                        _ => MetaError::NoMetadata {
                            path: site.path.clone(),
                            reason: DecodeError::NoMagic,
                        },
                    }
                } else {
                    MetaError::Io {
                        what: "cannot open metadata",
                        path: site.path.clone(),
                        source,
                    }
                }
            })?;
        let file_bytes = file_len(&file, &site.path)?;
        let base = superblock_base(site.placement, file_bytes);
        let superblock = read_superblock(&file, &site.path, base)?;
        let expected_kind = if node.is_data() {
            StoredKind::Data
        } else {
            StoredKind::Witness
        };
        if superblock.resource != config.resource.name
            || superblock.node_id != node.id
            || superblock.node_name != node.name
            || superblock.kind != expected_kind
        {
            return Err(MetaError::Mismatch {
                path: site.path,
                found: format!(
                    "resource {} node {} (id {}, {:?})",
                    superblock.resource, superblock.node_name, superblock.node_id, superblock.kind
                ),
                expected: format!(
                    "resource {} node {} (id {}, {expected_kind:?})",
                    config.resource.name, node.name, node.id
                ),
            });
        }
        if site.placement == Placement::Internal && superblock.device_bytes != file_bytes {
            return Err(MetaError::DeviceResized {
                path: site.path,
                now: file_bytes,
                recorded: superblock.device_bytes,
            });
        }
        Ok(MetaStore {
            #[cfg(any(test, feature = "failpoints"))]
            failing: false,
            file,
            path: site.path,
            durable: superblock.clone(),
            superblock,
            staged: false,
            detached: false,
        })
    }

    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies `change` and makes it durable before returning.
    pub fn update(&mut self, change: impl FnOnce(&mut Superblock)) -> Result<(), MetaError> {
        self.stage(change);
        self.commit()
    }

    /// Applies `change` in memory; the next [`MetaStore::commit`] writes
    /// it. Detached metadata takes no change.
    pub fn stage(&mut self, change: impl FnOnce(&mut Superblock)) {
        if self.detached {
            return;
        }
        let layout = self.superblock.layout;
        change(&mut self.superblock);
        assert_eq!(
            self.superblock.layout, layout,
            "layout is fixed at create-md"
        );
        self.staged = true;
    }

    /// Makes what is staged durable. When the write fails, what was
    /// staged is dropped: the superblock goes back to the durable one.
    /// The write goes into the copy not holding the durable superblock,
    /// so a torn write leaves that one readable.
    pub fn commit(&mut self) -> Result<(), MetaError> {
        if !self.staged {
            return Ok(());
        }
        self.staged = false;
        self.superblock.seq = self.durable.seq + 1;
        match self.write_copy(self.superblock.seq % SUPERBLOCK_COPIES) {
            Ok(()) => {
                self.durable = self.superblock.clone();
                Ok(())
            }
            Err(error) => {
                self.superblock = self.durable.clone();
                Err(error)
            }
        }
    }

    /// Gives up on the metadata after a failed write: nothing more is
    /// staged or written until a restart.
    pub fn detach(&mut self) {
        self.detached = true;
    }

    /// Whether a write failed and the metadata was given up on: this node
    /// can record nothing, so it must promise nothing (a vote).
    pub fn is_detached(&self) -> bool {
        self.detached
    }

    /// From now on every superblock write fails (or succeeds again).
    #[cfg(any(test, feature = "failpoints"))]
    pub fn set_failing(&mut self, failing: bool) {
        self.failing = failing;
    }

    #[cfg(test)]
    pub fn is_failing(&self) -> bool {
        self.failing
    }

    fn write_copy(&mut self, copy: u64) -> Result<(), MetaError> {
        #[cfg(any(test, feature = "failpoints"))]
        if self.failing {
            return Err(MetaError::Io {
                what: "cannot write superblock to",
                path: self.path.clone(),
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        let block = self.superblock.encode();
        let offset = self.superblock.layout.superblock_copy_offset(copy);
        write_durable(&self.file, &block, offset).map_err(|source| MetaError::Io {
            what: "cannot write superblock to",
            path: self.path.clone(),
            source,
        })
    }
}

fn file_len(file: &File, path: &Path) -> Result<u64, MetaError> {
    let mut file = file;
    file.seek(SeekFrom::End(0)).map_err(|source| MetaError::Io {
        what: "cannot size",
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, meta: &str) -> Config {
        let text = format!(
            r#"
[resource]
name = "r0"
[[node]]
name = "alpha"
id = 0
address = "127.0.0.1:7789"
nbd = "127.0.0.1:10809"
disk = "{dir}/alpha.img"
meta = "{meta}"
[[node]]
name = "beta"
id = 4
address = "127.0.0.2:7789"
nbd = "127.0.0.2:10809"
disk = "{dir}/beta.img"
[[node]]
name = "tie"
id = 2
address = "127.0.0.3:7789"
meta = "{dir}/state/tie.meta"
"#,
            dir = dir.display()
        );
        Config::parse(Path::new("t.toml"), &text).unwrap()
    }

    fn make_disk(path: &Path, bytes: u64) {
        File::create(path).unwrap().set_len(bytes).unwrap();
    }

    #[test]
    fn create_then_open_internal() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), "internal");
        make_disk(&dir.path().join("alpha.img"), 64 << 20);
        let alpha = config.node("alpha").unwrap();
        let created = MetaStore::create(&config, alpha, false).unwrap();
        assert_eq!(created.superblock().disk, StoredDisk::Inconsistent);
        assert_eq!(created.superblock().slot_of(4), Some(0), "beta gets slot 0");
        assert_eq!(
            created.superblock().slot_of(2),
            None,
            "a witness has no bitmap"
        );
        let opened = MetaStore::open(&config, alpha).unwrap();
        assert_eq!(opened.superblock(), created.superblock());
        assert!(opened.superblock().layout.data_capacity_bytes < 64 << 20);
    }

    #[test]
    fn create_refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), "internal");
        make_disk(&dir.path().join("alpha.img"), 64 << 20);
        let alpha = config.node("alpha").unwrap();
        MetaStore::create(&config, alpha, false).unwrap();
        let err = MetaStore::create(&config, alpha, false).unwrap_err();
        assert!(matches!(err, MetaError::AlreadyExists { .. }), "{err}");
        assert!(err.to_string().contains("--force"));
        MetaStore::create(&config, alpha, true).unwrap();
    }

    #[test]
    fn open_without_metadata_says_to_run_create_md() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), "internal");
        make_disk(&dir.path().join("alpha.img"), 64 << 20);
        let err = MetaStore::open(&config, config.node("alpha").unwrap()).unwrap_err();
        assert!(
            err.to_string().contains("run `hablk create-md` first"),
            "{err}"
        );
    }

    #[test]
    fn missing_disk_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), "internal");
        let err = MetaStore::create(&config, config.node("alpha").unwrap(), false).unwrap_err();
        assert!(matches!(err, MetaError::DiskMissing { .. }), "{err}");
    }

    #[test]
    fn metadata_of_another_node_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), "internal");
        make_disk(&dir.path().join("alpha.img"), 64 << 20);
        MetaStore::create(&config, config.node("alpha").unwrap(), false).unwrap();
        std::fs::rename(dir.path().join("alpha.img"), dir.path().join("beta.img")).unwrap();
        let err = MetaStore::open(&config, config.node("beta").unwrap()).unwrap_err();
        assert!(matches!(err, MetaError::Mismatch { .. }), "{err}");
    }

    #[test]
    fn updates_survive_a_torn_write_of_the_next_copy() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), &format!("{}/alpha.meta", dir.path().display()));
        make_disk(&dir.path().join("alpha.img"), 64 << 20);
        let alpha = config.node("alpha").unwrap();
        let mut store = MetaStore::create(&config, alpha, false).unwrap();
        store
            .update(|sb| {
                sb.disk = StoredDisk::UpToDate;
                sb.lineage.advance(Generation(42));
            })
            .unwrap();
        let good = store.superblock().clone();
        // Tear the copy the next update would write.
        let next_copy = (good.seq + 1) % SUPERBLOCK_COPIES;
        let offset = good.layout.superblock_copy_offset(next_copy);
        store.file.write_all_at(&[0xAB; 100], offset + 50).unwrap();
        let reopened = MetaStore::open(&config, alpha).unwrap();
        assert_eq!(reopened.superblock(), &good);
    }

    #[test]
    fn witness_state_file_is_created_with_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), "internal");
        let tie = config.node("tie").unwrap();
        let store = MetaStore::create(&config, tie, false).unwrap();
        assert_eq!(store.superblock().kind, StoredKind::Witness);
        assert!(dir.path().join("state/tie.meta").exists());
        MetaStore::open(&config, tie).unwrap();
    }
}
