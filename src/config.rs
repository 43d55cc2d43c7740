//! The resource configuration (docs/operations.md, "Configuration"): one TOML file describes one
//! resource and every node in it, and every node reads the same file.
//!
//! Parsing happens in two steps. serde + toml turn the text into `Raw*`
//! structs that keep the byte span of every value (`toml::Spanned`), so that
//! the second step — validation of the relations serde cannot express (unique
//! ids, one address per node, a witness without a disk export) — can still
//! point at the offending line. Anything wrong is refused before the daemon
//! touches a disk or a socket: `file:line: reason`.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use thiserror::Error;
use toml::Spanned;

pub use crate::vocabulary::node::{NodeSet, MAX_NODES, MAX_NODE_ID};
/// Upper bound for `max-peers`: a node can track every other possible id.
pub const MAX_PEERS_LIMIT: u8 = MAX_NODE_ID;
/// DRBD's accepted range for the activity log size, in 4 MiB extents.
pub const AL_EXTENTS_RANGE: Range<u32> = 7..65_535;
/// Data sizes are whole 4 KiB blocks: the bitmap has one bit per block.
pub const DATA_BLOCK_BYTES: u64 = 4096;
/// Shortest and longest accepted ping timeouts.
pub const PING_TIMEOUT_RANGE: Range<Duration> =
    Duration::from_millis(100)..Duration::from_secs(301);
/// Resource and node names end up in file names, socket names, NBD export
/// names and log lines: keep them short and plain.
pub const MAX_NAME_LEN: usize = 64;

const DEFAULT_CONFIG_PATH: &str = "/etc/hablk/hablk.toml";

/// What went wrong with a config file, worded for the operator.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Invalid {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error(
        "node '{name}' is not in {path} (nodes there: {known}); \
         pass -n NODE or set HABLK_NODE"
    )]
    UnknownNode {
        name: String,
        path: PathBuf,
        known: String,
    },
}

/// The replication protocol: what a write acknowledgement waits for (§5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum Protocol {
    /// Acknowledged once sent to the peers.
    A,
    /// Acknowledged once the peers have it in memory.
    B,
    /// Acknowledged once written on the local disk and every connected peer.
    C,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuorumMode {
    Off,
    Majority,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnNoQuorum {
    IoError,
    SuspendIo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnIoError {
    Detach,
    PassOn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AfterSplitBrain {
    Disconnect,
    DiscardZeroChanges,
}

/// Which storage engine serves the backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoEngineKind {
    Uring,
    Threads,
}

/// A size in bytes, written as `4096`, `"64KiB"` or `"1GiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Number(u64),
            Text(String),
        }
        match Either::deserialize(deserializer)? {
            Either::Number(n) => Ok(ByteSize(n)),
            Either::Text(text) => parse_byte_size(&text).map(ByteSize).map_err(|_| {
                serde::de::Error::custom(format!(
                    "'{text}' is not a size; write e.g. 4096, \"64KiB\" or \"1GiB\""
                ))
            }),
        }
    }
}

/// Parses `4096`, `64KiB`, `1GiB`, `2MB` into bytes.
pub fn parse_byte_size(text: &str) -> Result<u64, parse_size::Error> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(text.trim())
}

/// A duration written as `"500ms"` or `"5s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(text.trim())
            .map(ConfigDuration)
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "'{text}' is not a duration; write e.g. \"500ms\" or \"5s\""
                ))
            })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    resource: Spanned<RawResource>,
    #[serde(default)]
    node: Vec<Spanned<RawNode>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawResource {
    name: Spanned<String>,
    protocol: Option<Protocol>,
    quorum: Option<QuorumMode>,
    on_no_quorum: Option<OnNoQuorum>,
    on_io_error: Option<OnIoError>,
    auto_promote: Option<bool>,
    secret: Option<Spanned<String>>,
    size: Option<Spanned<ByteSize>>,
    max_peers: Option<Spanned<u8>>,
    al_extents: Option<Spanned<u32>>,
    after_split_brain: Option<AfterSplitBrain>,
    resync_rate: Option<ByteSize>,
    io: Option<IoEngineKind>,
    direct: Option<bool>,
    ping_timeout: Option<Spanned<ConfigDuration>>,
    metrics: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Spanned<String>,
    id: Spanned<u8>,
    address: Option<Spanned<String>>,
    nbd: Option<Spanned<String>>,
    disk: Option<Spanned<PathBuf>>,
    meta: Option<Spanned<String>>,
    control: Option<Spanned<PathBuf>>,
}

/// Resource-wide settings.
#[derive(Debug, Clone)]
pub struct Resource {
    pub name: String,
    pub protocol: Protocol,
    pub quorum: QuorumMode,
    pub on_no_quorum: OnNoQuorum,
    pub on_io_error: OnIoError,
    pub auto_promote: bool,
    pub secret: Option<String>,
    /// Fixed data size; `None` means "the smallest usable disk at first
    /// promotion".
    pub size_bytes: Option<u64>,
    pub max_peers: u8,
    pub al_extents: u32,
    pub after_split_brain: AfterSplitBrain,
    /// 0 = adaptive / unlimited.
    pub resync_rate_bytes_per_sec: u64,
    pub io: IoEngineKind,
    pub direct: bool,
    pub ping_timeout: Duration,
    pub metrics: Option<SocketAddr>,
}

/// Where a node's NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NbdListen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for NbdListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdListen::Tcp(addr) => write!(f, "{addr}"),
            NbdListen::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Where a node keeps its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaLocation {
    /// At the end of the backing disk.
    Internal,
    /// In a separate file (always so for a witness).
    File(PathBuf),
}

/// A data node stores the resource's data; a witness only votes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    Data { disk: PathBuf, nbd: NbdListen },
    Witness,
}

/// One `[[node]]` entry.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub id: u8,
    pub address: SocketAddr,
    pub kind: NodeKind,
    pub meta: MetaLocation,
    pub control: PathBuf,
}

impl Node {
    pub fn is_data(&self) -> bool {
        matches!(self.kind, NodeKind::Data { .. })
    }

    pub fn nbd(&self) -> Option<&NbdListen> {
        match &self.kind {
            NodeKind::Data { nbd, .. } => Some(nbd),
            NodeKind::Witness => None,
        }
    }

    pub fn disk(&self) -> Option<&Path> {
        match &self.kind {
            NodeKind::Data { disk, .. } => Some(disk),
            NodeKind::Witness => None,
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub resource: Resource,
    pub nodes: Vec<Node>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Validates config text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let invalid = |span: Option<Range<usize>>, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            line: span.map_or(1, |span| line_of(text, span.start)),
            reason,
        };
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| invalid(e.span(), e.message().to_owned()))?;
        Validator { invalid: &invalid }.validate(path, raw)
    }

    /// The default config path: `$HABLK_CONFIG` is handled by the CLI.
    pub fn default_path() -> PathBuf {
        PathBuf::from(DEFAULT_CONFIG_PATH)
    }

    /// Finds the node this process runs as.
    pub fn node(&self, name: &str) -> Result<&Node, ConfigError> {
        self.nodes
            .iter()
            .find(|node| node.name == name)
            .ok_or_else(|| ConfigError::UnknownNode {
                name: name.to_owned(),
                path: self.path.clone(),
                known: self.node_names().join(", "),
            })
    }

    pub fn node_by_id(&self, id: u8) -> Option<&Node> {
        self.nodes.iter().find(|node| node.id == id)
    }

    pub fn node_names(&self) -> Vec<&str> {
        self.nodes.iter().map(|node| node.name.as_str()).collect()
    }

    pub fn data_nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|node| node.is_data())
    }

    /// The ids of the data nodes.
    pub fn data_node_set(&self) -> NodeSet {
        self.data_nodes().map(|node| node.id).collect()
    }

    /// Every other node of the resource, seen from `me`.
    pub fn peers_of<'a>(&'a self, me: &'a Node) -> impl Iterator<Item = &'a Node> + 'a {
        self.nodes.iter().filter(move |node| node.id != me.id)
    }

    /// A digest of what every node must agree on; the peer handshake refuses
    /// a peer whose digest differs.
    pub fn cluster_digest(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        hasher.update(self.resource.name.as_bytes());
        hasher.update(&[0, quorum_code(self.resource.quorum)]);
        hasher.update(&[protocol_code(self.resource.protocol)]);
        // Leases assume one ping timeout everywhere: a Primary's lease runs
        // 0.8 x its timeout, a voter waits out its own before backing a new
        // Primary. A voter with a shorter timeout could back one while the
        // old lease still runs.
        hasher.update(&self.resource.ping_timeout.as_nanos().to_le_bytes());
        let mut nodes: Vec<&Node> = self.nodes.iter().collect();
        nodes.sort_by_key(|node| node.id);
        for node in nodes {
            hasher.update(&[node.id, u8::from(node.is_data())]);
            hasher.update(node.name.as_bytes());
            hasher.update(&[0]);
        }
        *hasher.finalize().as_bytes()
    }
}

fn quorum_code(mode: QuorumMode) -> u8 {
    match mode {
        QuorumMode::Off => 0,
        QuorumMode::Majority => 1,
    }
}

fn protocol_code(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::A => b'A',
        Protocol::B => b'B',
        Protocol::C => b'C',
    }
}

fn line_of(text: &str, byte_offset: usize) -> usize {
    let end = byte_offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.')
}

struct Validator<'a, F: Fn(Option<Range<usize>>, String) -> ConfigError> {
    invalid: &'a F,
}

impl<F: Fn(Option<Range<usize>>, String) -> ConfigError> Validator<'_, F> {
    fn err<T>(&self, span: Range<usize>, reason: impl Into<String>) -> Result<T, ConfigError> {
        Err((self.invalid)(Some(span), reason.into()))
    }

    fn validate(&self, path: &Path, raw: RawConfig) -> Result<Config, ConfigError> {
        let resource_span = raw.resource.span();
        let resource = self.resource(raw.resource.into_inner())?;
        if raw.node.is_empty() {
            return self.err(
                resource_span,
                "no [[node]] entries: a resource needs at least one",
            );
        }
        if raw.node.len() > MAX_NODES {
            return self.err(
                raw.node[MAX_NODES].span(),
                format!("too many nodes: at most {MAX_NODES}"),
            );
        }
        let mut nodes = Vec::with_capacity(raw.node.len());
        let mut ids: HashMap<u8, String> = HashMap::new();
        let mut names: HashMap<String, ()> = HashMap::new();
        let mut addresses: HashMap<SocketAddr, String> = HashMap::new();
        // An NBD listener or a control socket can only collide between
        // nodes on one host, i.e. with the same replication IP: on their
        // own hosts, every node may use the same `127.0.0.1:10809`.
        let mut nbd_listeners: HashMap<(IpAddr, NbdListen), String> = HashMap::new();
        let mut controls: HashMap<(IpAddr, PathBuf), String> = HashMap::new();
        for spanned in raw.node {
            let span = spanned.span();
            let node_raw = spanned.into_inner();
            let id_span = node_raw.id.span();
            let name_span = node_raw.name.span();
            let node = self.node(&resource, node_raw, span.clone())?;
            if names.insert(node.name.clone(), ()).is_some() {
                return self.err(name_span, format!("two nodes are named '{}'", node.name));
            }
            if let Some(other) = ids.insert(node.id, node.name.clone()) {
                return self.err(
                    id_span,
                    format!(
                        "nodes '{other}' and '{}' both have id {}",
                        node.name, node.id
                    ),
                );
            }
            if let Some(other) = addresses.insert(node.address, node.name.clone()) {
                return self.err(
                    span,
                    format!(
                        "nodes '{other}' and '{}' both use address {}",
                        node.name, node.address
                    ),
                );
            }
            if let Some(nbd) = node.nbd() {
                let host = node.address.ip();
                if let Some(other) = nbd_listeners.insert((host, nbd.clone()), node.name.clone()) {
                    return self.err(
                        span,
                        format!(
                            "nodes '{other}' and '{}' are on one host ({host}) and both use nbd {nbd}",
                            node.name
                        ),
                    );
                }
            }
            let host = node.address.ip();
            if let Some(other) = controls.insert((host, node.control.clone()), node.name.clone()) {
                return self.err(
                    span,
                    format!(
                        "nodes '{other}' and '{}' are on one host ({host}) and both use control socket {}",
                        node.name,
                        node.control.display()
                    ),
                );
            }
            nodes.push(node);
        }
        let data_nodes = nodes.iter().filter(|node| node.is_data()).count();
        if data_nodes == 0 {
            return self.err(
                resource_span,
                "no data node: at least one [[node]] needs a disk",
            );
        }
        if data_nodes - 1 > usize::from(resource.max_peers) {
            return self.err(
                resource_span,
                format!(
                    "{data_nodes} data nodes need {} bitmap slots each, but max-peers is {}",
                    data_nodes - 1,
                    resource.max_peers
                ),
            );
        }
        Ok(Config {
            path: path.to_owned(),
            resource,
            nodes,
        })
    }

    fn resource(&self, raw: RawResource) -> Result<Resource, ConfigError> {
        let name = raw.name.get_ref();
        if !valid_name(name) {
            return self.err(
                raw.name.span(),
                format!(
                    "resource name '{name}' must be 1..={MAX_NAME_LEN} characters of \
                     letters, digits, '-', '_' and '.'"
                ),
            );
        }
        let secret = match raw.secret {
            Some(secret) if secret.get_ref().is_empty() => {
                return self.err(secret.span(), "secret is empty; remove it or set one");
            }
            Some(secret) => Some(secret.into_inner()),
            None => None,
        };
        let size_bytes = match raw.size {
            Some(size) => {
                let bytes = size.get_ref().0;
                if bytes == 0 || bytes % DATA_BLOCK_BYTES != 0 {
                    return self.err(
                        size.span(),
                        format!("size {bytes} must be a positive multiple of 4096 bytes"),
                    );
                }
                Some(bytes)
            }
            None => None,
        };
        let max_peers = match raw.max_peers {
            Some(max) if *max.get_ref() == 0 || *max.get_ref() > MAX_PEERS_LIMIT => {
                return self.err(
                    max.span(),
                    format!("max-peers must be 1..={MAX_PEERS_LIMIT}"),
                );
            }
            Some(max) => max.into_inner(),
            None => 7,
        };
        let al_extents = match raw.al_extents {
            Some(al) if !AL_EXTENTS_RANGE.contains(al.get_ref()) => {
                return self.err(
                    al.span(),
                    format!(
                        "al-extents must be {}..={}",
                        AL_EXTENTS_RANGE.start,
                        AL_EXTENTS_RANGE.end - 1
                    ),
                );
            }
            Some(al) => al.into_inner(),
            None => 1237,
        };
        let ping_timeout = match raw.ping_timeout {
            Some(ping) if !PING_TIMEOUT_RANGE.contains(&ping.get_ref().0) => {
                return self.err(ping.span(), "ping-timeout must be between 100ms and 300s");
            }
            Some(ping) => ping.into_inner().0,
            None => Duration::from_millis(500),
        };
        let metrics = match raw.metrics {
            Some(metrics) => match metrics.get_ref().parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    return self.err(
                        metrics.span(),
                        format!("metrics '{}' is not IP:PORT", metrics.get_ref()),
                    )
                }
            },
            None => None,
        };
        Ok(Resource {
            name: name.clone(),
            protocol: raw.protocol.unwrap_or(Protocol::C),
            quorum: raw.quorum.unwrap_or(QuorumMode::Majority),
            on_no_quorum: raw.on_no_quorum.unwrap_or(OnNoQuorum::IoError),
            on_io_error: raw.on_io_error.unwrap_or(OnIoError::Detach),
            auto_promote: raw.auto_promote.unwrap_or(false),
            secret,
            size_bytes,
            max_peers,
            al_extents,
            after_split_brain: raw.after_split_brain.unwrap_or(AfterSplitBrain::Disconnect),
            resync_rate_bytes_per_sec: raw.resync_rate.map_or(0, |rate| rate.0),
            io: raw.io.unwrap_or(IoEngineKind::Uring),
            direct: raw.direct.unwrap_or(false),
            ping_timeout,
            metrics,
        })
    }

    fn node(
        &self,
        resource: &Resource,
        raw: RawNode,
        span: Range<usize>,
    ) -> Result<Node, ConfigError> {
        let name = raw.name.get_ref().clone();
        if !valid_name(&name) {
            return self.err(
                raw.name.span(),
                format!(
                    "node name '{name}' must be 1..={MAX_NAME_LEN} characters of \
                     letters, digits, '-', '_' and '.'"
                ),
            );
        }
        let id = *raw.id.get_ref();
        if id > MAX_NODE_ID {
            return self.err(
                raw.id.span(),
                format!("node id {id} is out of range 0..={MAX_NODE_ID}"),
            );
        }
        let Some(address) = raw.address else {
            return self.err(
                span,
                format!("node '{name}' has no address (the replication IP:PORT)"),
            );
        };
        let address = match address.get_ref().parse::<SocketAddr>() {
            Ok(addr) if addr.port() != 0 => addr,
            _ => {
                return self.err(
                    address.span(),
                    format!(
                        "address '{}' of node '{name}' is not IP:PORT (e.g. 10.0.0.1:7789)",
                        address.get_ref()
                    ),
                )
            }
        };
        let nbd = match raw.nbd {
            Some(nbd) => Some(self.nbd_listen(&name, nbd)?),
            None => None,
        };
        let meta = match raw.meta {
            Some(meta) if meta.get_ref() == "internal" => MetaLocation::Internal,
            Some(meta) if meta.get_ref().is_empty() => {
                return self.err(meta.span(), "meta is empty: write \"internal\" or a path");
            }
            Some(meta) => MetaLocation::File(PathBuf::from(meta.into_inner())),
            None => MetaLocation::Internal,
        };
        let kind = match (raw.disk, nbd) {
            (Some(disk), Some(nbd)) => NodeKind::Data {
                disk: disk.into_inner(),
                nbd,
            },
            (Some(_), None) => {
                return self.err(
                    span,
                    format!(
                        "data node '{name}' has no nbd listener; add nbd = \"127.0.0.1:10809\" \
                         or a unix socket path"
                    ),
                )
            }
            (None, Some(_)) => {
                return self.err(
                    span,
                    format!("node '{name}' has nbd but no disk: a witness cannot export data"),
                )
            }
            (None, None) => NodeKind::Witness,
        };
        let meta = match (&kind, meta) {
            (NodeKind::Witness, MetaLocation::Internal) => MetaLocation::File(PathBuf::from(
                format!("/var/lib/hablk/{}-{name}.meta", resource.name),
            )),
            (_, meta) => meta,
        };
        let control = raw.control.map_or_else(
            || PathBuf::from(format!("/run/hablk/{}-{name}.sock", resource.name)),
            Spanned::into_inner,
        );
        Ok(Node {
            name,
            id,
            address,
            kind,
            meta,
            control,
        })
    }

    fn nbd_listen(&self, node: &str, raw: Spanned<String>) -> Result<NbdListen, ConfigError> {
        let text = raw.get_ref();
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(NbdListen::Tcp(addr));
        }
        if text.starts_with('/') {
            return Ok(NbdListen::Unix(PathBuf::from(text)));
        }
        self.err(
            raw.span(),
            format!("nbd '{text}' of node '{node}' is neither IP:PORT nor an absolute socket path"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[resource]
name = "r0"
size = "64MiB"
ping-timeout = "1s"

[[node]]
name = "alpha"
id = 0
address = "127.0.0.1:7789"
nbd = "127.0.0.1:10809"
disk = "/tmp/a.img"

[[node]]
name = "beta"
id = 1
address = "127.0.0.2:7789"
nbd = "/run/beta.nbd"
disk = "/tmp/b.img"
meta = "/tmp/b.meta"

[[node]]
name = "witness"
id = 2
address = "127.0.0.3:7789"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    fn refusal(text: &str) -> (usize, String) {
        match parse(text) {
            Err(ConfigError::Invalid { line, reason, .. }) => (line, reason),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.resource.name, "r0");
        assert_eq!(config.resource.protocol, Protocol::C);
        assert_eq!(config.resource.quorum, QuorumMode::Majority);
        assert_eq!(config.resource.size_bytes, Some(64 << 20));
        assert_eq!(config.resource.max_peers, 7);
        assert_eq!(config.resource.al_extents, 1237);
        assert_eq!(config.resource.ping_timeout, Duration::from_secs(1));
        assert_eq!(config.nodes.len(), 3);
        let beta = config.node("beta").unwrap();
        assert_eq!(beta.nbd(), Some(&NbdListen::Unix("/run/beta.nbd".into())));
        assert_eq!(beta.meta, MetaLocation::File("/tmp/b.meta".into()));
        let witness = config.node("witness").unwrap();
        assert_eq!(witness.kind, NodeKind::Witness);
        assert_eq!(
            witness.meta,
            MetaLocation::File("/var/lib/hablk/r0-witness.meta".into())
        );
        assert_eq!(witness.control, PathBuf::from("/run/hablk/r0-witness.sock"));
    }

    #[test]
    fn every_key_of_the_contract_is_accepted() {
        let text = r#"
[resource]
name = "r0"
protocol = "A"
quorum = "off"
on-no-quorum = "suspend-io"
on-io-error = "pass-on"
auto-promote = true
secret = "s3cret"
size = "1GiB"
max-peers = 3
al-extents = 1237
after-split-brain = "discard-zero-changes"
resync-rate = "100MiB"
io = "threads"
direct = true
ping-timeout = "500ms"
metrics = "127.0.0.1:9942"

[[node]]
name = "alpha"
id = 0
address = "10.0.0.1:7789"
nbd = "127.0.0.1:10809"
disk = "/var/lib/hablk/r0.img"
meta = "internal"
control = "/run/hablk/r0-alpha.sock"
"#;
        let config = parse(text).unwrap();
        let resource = &config.resource;
        assert_eq!(resource.protocol, Protocol::A);
        assert_eq!(resource.quorum, QuorumMode::Off);
        assert_eq!(resource.on_no_quorum, OnNoQuorum::SuspendIo);
        assert_eq!(resource.on_io_error, OnIoError::PassOn);
        assert!(resource.auto_promote);
        assert_eq!(resource.secret.as_deref(), Some("s3cret"));
        assert_eq!(resource.resync_rate_bytes_per_sec, 100 << 20);
        assert_eq!(resource.io, IoEngineKind::Threads);
        assert!(resource.direct);
        assert_eq!(resource.metrics, Some("127.0.0.1:9942".parse().unwrap()));
        assert_eq!(
            resource.after_split_brain,
            AfterSplitBrain::DiscardZeroChanges
        );
    }

    #[test]
    fn syntax_error_names_the_line() {
        let (line, reason) = refusal("[resource]\nname = \"r0\"\nsize = = 3\n");
        assert_eq!(line, 3);
        assert!(!reason.is_empty());
    }

    #[test]
    fn unknown_key_is_refused_with_its_line() {
        let text = GOOD.replace("ping-timeout = \"1s\"", "ping-timout = \"1s\"");
        let (line, reason) = refusal(&text);
        assert_eq!(line, 5);
        assert!(reason.contains("ping-timout"), "{reason}");
    }

    #[test]
    fn unknown_node_key_is_refused() {
        let text = GOOD.replace("disk = \"/tmp/a.img\"", "disc = \"/tmp/a.img\"");
        let (line, reason) = refusal(&text);
        assert_eq!(line, 12);
        assert!(reason.contains("disc"), "{reason}");
    }

    #[test]
    fn duplicate_id_is_refused() {
        let text = GOOD.replace("id = 1", "id = 0");
        let (line, reason) = refusal(&text);
        assert_eq!(line, 16);
        assert!(reason.contains("both have id 0"), "{reason}");
    }

    #[test]
    fn duplicate_address_is_refused() {
        let text = GOOD.replace("127.0.0.2:7789", "127.0.0.1:7789");
        let (_, reason) = refusal(&text);
        assert!(
            reason.contains("both use address 127.0.0.1:7789"),
            "{reason}"
        );
    }

    #[test]
    fn one_nbd_listener_per_host() {
        // On their own hosts, nodes may all listen on the same address.
        let text = GOOD.replace("nbd = \"/run/beta.nbd\"", "nbd = \"127.0.0.1:10809\"");
        let config = parse(&text).unwrap();
        assert_eq!(
            config.node("alpha").unwrap().nbd(),
            config.node("beta").unwrap().nbd()
        );
        // Two nodes of one host (same replication IP) cannot.
        let text = text.replace("127.0.0.2:7789", "127.0.0.1:7790");
        let (_, reason) = refusal(&text);
        assert!(
            reason.contains("are on one host (127.0.0.1) and both use nbd 127.0.0.1:10809"),
            "{reason}"
        );
    }

    #[test]
    fn duplicate_name_is_refused() {
        let text = GOOD.replace("name = \"beta\"", "name = \"alpha\"");
        let (line, reason) = refusal(&text);
        assert_eq!(line, 15);
        assert!(reason.contains("two nodes are named 'alpha'"), "{reason}");
    }

    #[test]
    fn bad_values_are_refused() {
        for (from, to, expect) in [
            ("size = \"64MiB\"", "size = \"lots\"", "not a size"),
            ("size = \"64MiB\"", "size = 1000", "multiple of 4096"),
            (
                "ping-timeout = \"1s\"",
                "ping-timeout = \"soon\"",
                "not a duration",
            ),
            (
                "ping-timeout = \"1s\"",
                "ping-timeout = \"1ms\"",
                "between 100ms",
            ),
            ("name = \"r0\"", "name = \"r 0\"", "resource name"),
            (
                "name = \"r0\"",
                "name = \"r0\"\nprotocol = \"D\"",
                "unknown variant",
            ),
            ("id = 2", "id = 40", "out of range"),
            (
                "address = \"127.0.0.3:7789\"",
                "address = \"nowhere\"",
                "not IP:PORT",
            ),
            (
                "nbd = \"/run/beta.nbd\"",
                "nbd = \"beta.nbd\"",
                "neither IP:PORT",
            ),
        ] {
            let text = GOOD.replacen(from, to, 1);
            let (_, reason) = refusal(&text);
            assert!(reason.contains(expect), "{to}: {reason}");
        }
    }

    #[test]
    fn data_node_needs_nbd_and_witness_cannot_have_it() {
        let text = GOOD.replace("nbd = \"/run/beta.nbd\"\n", "");
        assert!(refusal(&text).1.contains("has no nbd listener"));
        let text = GOOD.replace(
            "address = \"127.0.0.3:7789\"",
            "address = \"127.0.0.3:7789\"\nnbd = \"127.0.0.1:1\"",
        );
        assert!(refusal(&text).1.contains("a witness cannot export"));
    }

    #[test]
    fn too_few_bitmap_slots_is_refused() {
        let text = GOOD.replace("ping-timeout = \"1s\"", "max-peers = 1");
        assert!(parse(&text).is_ok(), "two data nodes need one slot");
        let three = format!(
            "{GOOD}\n[[node]]\nname = \"gamma\"\nid = 3\naddress = \"127.0.0.4:1\"\n\
             nbd = \"127.0.0.1:2\"\ndisk = \"/tmp/c.img\"\n"
        );
        let text = three.replace("ping-timeout = \"1s\"", "max-peers = 1");
        assert!(refusal(&text).1.contains("bitmap slots"));
    }

    #[test]
    fn unknown_node_name_lists_the_known_ones() {
        let config = parse(GOOD).unwrap();
        let err = config.node("delta").unwrap_err().to_string();
        assert!(
            err.contains("'delta'") && err.contains("alpha, beta, witness"),
            "{err}"
        );
    }

    #[test]
    fn digest_ignores_addresses_but_not_membership_or_ping_timeout() {
        let a = parse(GOOD).unwrap().cluster_digest();
        let moved = parse(&GOOD.replace("127.0.0.3:7789", "127.0.0.9:7789")).unwrap();
        assert_eq!(a, moved.cluster_digest());
        let renamed = parse(&GOOD.replace("\"witness\"", "\"tie\"")).unwrap();
        assert_ne!(a, renamed.cluster_digest());
        let slower =
            parse(&GOOD.replace("ping-timeout = \"1s\"", "ping-timeout = \"2s\"")).unwrap();
        assert_ne!(a, slower.cluster_digest(), "the ping timeout must match");
    }
}
