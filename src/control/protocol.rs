//! The control protocol between the CLI and its node's daemon: one JSON
//! object per line over a unix socket. A request line, then one response
//! line (or, for `events`, a stream of event lines).

use serde::{Deserialize, Serialize};

use crate::vocabulary::generation::Generation;
use crate::vocabulary::state::{ConnectionState, DiskState, ReplicationState, Role};

/// Longest request line the daemon reads.
pub const MAX_REQUEST_LINE_BYTES: usize = 64 << 10;

/// Exit status of a command (docs/operations.md, "Status, events, exit statuses").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum ExitCode {
    Done = 0,
    Failed = 1,
    Usage = 2,
    Refused = 3,
}

impl From<ExitCode> for u8 {
    fn from(code: ExitCode) -> u8 {
        code as u8
    }
}

impl TryFrom<u8> for ExitCode {
    type Error = String;
    fn try_from(value: u8) -> Result<ExitCode, String> {
        match value {
            0 => Ok(ExitCode::Done),
            1 => Ok(ExitCode::Failed),
            2 => Ok(ExitCode::Usage),
            3 => Ok(ExitCode::Refused),
            other => Err(format!("unknown exit code {other}")),
        }
    }
}

/// A command for the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    Events {
        now: bool,
    },
    Primary {
        force: bool,
        override_quorum: bool,
    },
    Secondary {
        force: bool,
    },
    Down {
        force: bool,
    },
    Connect {
        peer: Option<String>,
        discard_my_data: bool,
    },
    Disconnect {
        peer: Option<String>,
    },
    Verify {
        peer: Option<String>,
    },
    Invalidate,
    SkipInitialSync,
}

impl Request {
    /// The command name as the CLI spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Events { .. } => "events",
            Request::Primary { .. } => "primary",
            Request::Secondary { .. } => "secondary",
            Request::Down { .. } => "down",
            Request::Connect { .. } => "connect",
            Request::Disconnect { .. } => "disconnect",
            Request::Verify { .. } => "verify",
            Request::Invalidate => "invalidate",
            Request::SkipInitialSync => "skip-initial-sync",
        }
    }
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub exit: ExitCode,
    /// What happened, or what is missing and what would fix it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl Response {
    pub fn done(message: impl Into<String>) -> Response {
        Response {
            exit: ExitCode::Done,
            message: Some(message.into()),
            status: None,
        }
    }

    pub fn refused(message: impl Into<String>) -> Response {
        Response {
            exit: ExitCode::Refused,
            message: Some(message.into()),
            status: None,
        }
    }

    pub fn failed(message: impl Into<String>) -> Response {
        Response {
            exit: ExitCode::Failed,
            message: Some(message.into()),
            status: None,
        }
    }
}

/// `status --json`: fields may be added, never removed (scripts and
/// cluster managers read it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub resource: String,
    pub node: String,
    pub role: Role,
    pub disk: DiskState,
    pub quorum: bool,
    pub generation: GenerationText,
    pub known_generation: GenerationText,
    pub size_bytes: Option<u64>,
    pub io_suspended: bool,
    pub lease_wait_ms: u64,
    pub nbd: Option<NbdStatus>,
    pub peers: Vec<PeerStatus>,
}

/// A generation as printed: 16 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GenerationText(pub String);

impl From<Generation> for GenerationText {
    fn from(generation: Generation) -> Self {
        GenerationText(generation.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdStatus {
    pub listen: String,
    pub clients: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node: String,
    pub connection: ConnectionState,
    pub role: Role,
    pub peer_disk: DiskState,
    pub replication: ReplicationState,
    pub split_brain: bool,
    pub out_of_sync_bytes: u64,
    /// Connections dropped because a frame failed its checksum.
    #[serde(default)]
    pub corrupt_frames: u64,
    pub sync: SyncStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub active: bool,
    /// "source" or "target" while syncing.
    pub direction: Option<String>,
    pub percent: f64,
    pub bytes_per_sec: u64,
    pub eta_seconds: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_fields_are_refused() {
        for request in [
            Request::Status,
            Request::Events { now: true },
            Request::Primary {
                force: true,
                override_quorum: false,
            },
            Request::Secondary { force: false },
            Request::Down { force: true },
            Request::Connect {
                peer: Some("beta".into()),
                discard_my_data: true,
            },
            Request::Disconnect { peer: None },
            Request::Verify { peer: None },
            Request::Invalidate,
            Request::SkipInitialSync,
        ] {
            let line = serde_json::to_string(&request).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), request);
        }
        assert!(
            serde_json::from_str::<Request>(r#"{"command":"down","force":true,"x":1}"#).is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"command":"format-disk"}"#).is_err());
    }

    #[test]
    fn status_json_has_the_contract_fields() {
        let status = Status {
            resource: "r0".into(),
            node: "alpha".into(),
            role: Role::Primary,
            disk: DiskState::UpToDate,
            quorum: true,
            generation: Generation(0x9f1c).into(),
            known_generation: Generation(0x9f1c).into(),
            size_bytes: Some(1 << 30),
            io_suspended: false,
            lease_wait_ms: 0,
            nbd: Some(NbdStatus {
                listen: "127.0.0.1:10809".into(),
                clients: 1,
            }),
            peers: vec![PeerStatus {
                node: "beta".into(),
                connection: ConnectionState::Connected,
                role: Role::Secondary,
                peer_disk: DiskState::UpToDate,
                replication: ReplicationState::Established,
                split_brain: false,
                out_of_sync_bytes: 0,
                corrupt_frames: 0,
                sync: SyncStatus {
                    active: false,
                    direction: None,
                    percent: 100.0,
                    bytes_per_sec: 0,
                    eta_seconds: None,
                },
            }],
        };
        let value = serde_json::to_value(&status).unwrap();
        for key in [
            "resource",
            "node",
            "role",
            "disk",
            "quorum",
            "generation",
            "known_generation",
            "size_bytes",
            "io_suspended",
            "lease_wait_ms",
            "nbd",
            "peers",
        ] {
            assert!(value.get(key).is_some(), "missing {key}");
        }
        assert_eq!(value["role"], "Primary");
        assert_eq!(value["generation"], "0000000000009f1c");
        assert_eq!(value["nbd"]["clients"], 1);
        let peer = &value["peers"][0];
        for key in [
            "node",
            "connection",
            "role",
            "peer_disk",
            "replication",
            "split_brain",
            "out_of_sync_bytes",
            "sync",
        ] {
            assert!(peer.get(key).is_some(), "missing peer {key}");
        }
        assert_eq!(peer["sync"]["eta_seconds"], serde_json::Value::Null);
        let back: Status = serde_json::from_value(value).unwrap();
        assert_eq!(back, status);
    }
}
