//! The peer handshake: identities, protocol version, config digest, and —
//! when `secret` is set — HMAC-SHA256 challenge-response, before any state
//! or data moves. Every refusal names its reason, is sent to the peer in a
//! `Refuse` message and logged on both sides.

use std::time::Duration;

use bytes::BytesMut;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::wire::{self, Message, WireError, PROTOCOL_VERSION};
use crate::config::Config;

/// A peer must complete the handshake within this time.
pub const PEER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshake messages are small: anything bigger is not a hablk peer.
pub const MAX_HANDSHAKE_FRAME_BYTES: usize = 64 << 10;
/// The side that accepted a connection gives the dialer this long to send
/// its `Hello`, which a peer does at once: a connection that holds a
/// handshake slot without a word is dropped quickly.
pub const FIRST_FRAME_TIMEOUT: Duration = Duration::from_millis(500);
const AUTH_CONTEXT: &[u8] = b"hablk peer auth v1";

#[derive(Debug, Error)]
pub enum PeerHandshakeError {
    #[error("connection failed during the handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("garbage on the replication port: {0}")]
    Wire(#[from] WireError),
    #[error("refused by the peer: {0}")]
    RefusedByPeer(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("the peer did not finish the handshake in time")]
    Timeout,
    #[error("sent nothing within {} ms of connecting", FIRST_FRAME_TIMEOUT.as_millis())]
    Silent,
    #[error(
        "handshake frame of {bytes} bytes exceeds the handshake limit of {limit} bytes: not a \
         hablk peer"
    )]
    FrameTooLarge { bytes: usize, limit: usize },
}

/// Who this node is, as the handshake presents it.
#[derive(Debug, Clone)]
pub struct Identity {
    pub resource: String,
    pub node_id: u8,
    pub node_name: String,
    pub digest: [u8; 32],
    pub secret: Option<String>,
}

impl Identity {
    pub fn of(config: &Config, node_id: u8) -> Option<Identity> {
        let me = config.node_by_id(node_id)?;
        Some(Identity {
            resource: config.resource.name.clone(),
            node_id,
            node_name: me.name.clone(),
            digest: config.cluster_digest(),
            secret: config.resource.secret.clone(),
        })
    }
}

fn proof(secret: &str, nonce: &[u8; 32], prover: u8) -> Result<[u8; 32], PeerHandshakeError> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .map_err(|e| PeerHandshakeError::Refused(format!("bad secret: {e}")))?;
    mac.update(AUTH_CONTEXT);
    mac.update(nonce);
    mac.update(&[prover]);
    Ok(mac.finalize().into_bytes().into())
}

fn verify_proof(secret: &str, nonce: &[u8; 32], prover: u8, claimed: &[u8; 32]) -> bool {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(AUTH_CONTEXT);
    mac.update(nonce);
    mac.update(&[prover]);
    // Constant-time comparison.
    mac.verify_slice(claimed).is_ok()
}

/// Reads one frame during the handshake.
pub async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    limit: usize,
) -> Result<wire::Frame, PeerHandshakeError> {
    loop {
        if let Some(prefix) = buf.get(..4) {
            let bytes = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
            if bytes > limit {
                return Err(PeerHandshakeError::FrameTooLarge { bytes, limit });
            }
        }
        let needed = wire::check(buf)?;
        if needed == 0 {
            return Ok(wire::decode(buf)?);
        }
        buf.reserve(needed);
        if stream.read_buf(buf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    message: &Message,
) -> Result<(), PeerHandshakeError> {
    let mut out = BytesMut::new();
    wire::encode(&mut out, message, &[])?;
    stream.write_all(&out).await?;
    Ok(())
}

async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, reason: String) -> PeerHandshakeError {
    let _ = send(
        stream,
        &Message::Refuse {
            reason: reason.clone(),
        },
    )
    .await;
    let _ = stream.flush().await;
    PeerHandshakeError::Refused(reason)
}

/// Whether this node takes a connection from a peer: `Err(reason)` when it
/// keeps that peer StandAlone.
pub type Admit<'a> = &'a (dyn Fn(u8) -> Result<(), String> + Sync);

/// Runs the handshake on a fresh connection. `expected` is the peer this
/// side dialed (None when accepting). Returns the peer's node id, and any
/// bytes read past the handshake (the start of the session).
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    me: &Identity,
    config: &Config,
    expected: Option<u8>,
    admit: Admit<'_>,
) -> Result<(u8, BytesMut), PeerHandshakeError> {
    tokio::time::timeout(
        PEER_HANDSHAKE_TIMEOUT,
        run(stream, me, config, expected, admit),
    )
    .await
    .map_err(|_| PeerHandshakeError::Timeout)?
}

async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    me: &Identity,
    config: &Config,
    expected: Option<u8>,
    admit: Admit<'_>,
) -> Result<(u8, BytesMut), PeerHandshakeError> {
    let nonce: [u8; 32] = rand::random();
    send(
        stream,
        &Message::Hello {
            version: PROTOCOL_VERSION as u16,
            digest: me.digest,
            resource: me.resource.clone(),
            node_id: me.node_id,
            node_name: me.node_name.clone(),
            nonce,
        },
    )
    .await?;
    let mut buf = BytesMut::with_capacity(4096);
    let first = read_frame(stream, &mut buf, MAX_HANDSHAKE_FRAME_BYTES);
    let frame = if expected.is_none() {
        tokio::time::timeout(FIRST_FRAME_TIMEOUT, first)
            .await
            .map_err(|_| PeerHandshakeError::Silent)??
    } else {
        first.await?
    };
    let (peer_id, peer_nonce) = match frame.message {
        Message::Hello {
            version,
            digest,
            resource,
            node_id,
            node_name,
            nonce,
        } => {
            if version != PROTOCOL_VERSION as u16 {
                return Err(refuse(
                    stream,
                    format!(
                        "peer speaks replication protocol v{version}, this node v{}; run the same \
                         hablk version on every node",
                        PROTOCOL_VERSION as u16
                    ),
                )
                .await);
            }
            if resource != me.resource {
                return Err(refuse(
                    stream,
                    format!(
                        "peer serves resource '{resource}', this node '{}'",
                        me.resource
                    ),
                )
                .await);
            }
            let Some(peer) = config.node_by_id(node_id).filter(|_| node_id != me.node_id) else {
                return Err(refuse(
                    stream,
                    format!("node id {node_id} is not a peer in this node's config"),
                )
                .await);
            };
            if peer.name != node_name {
                return Err(refuse(
                    stream,
                    format!(
                        "peer calls itself '{node_name}' but the config names id {node_id} '{}'",
                        peer.name
                    ),
                )
                .await);
            }
            if expected.is_some_and(|id| id != node_id) {
                return Err(refuse(
                    stream,
                    format!("dialed another node but '{node_name}' answered"),
                )
                .await);
            }
            if digest != me.digest {
                return Err(refuse(
                    stream,
                    format!(
                        "config of '{node_name}' differs from this node's (resource, node ids, \
                         names, kinds, quorum, protocol or ping-timeout); give every node the \
                         same config file"
                    ),
                )
                .await);
            }
            (node_id, nonce)
        }
        Message::Refuse { reason } => return Err(PeerHandshakeError::RefusedByPeer(reason)),
        other => {
            return Err(refuse(stream, format!("expected Hello, got {}", other.name())).await);
        }
    };
    if let Some(secret) = &me.secret {
        send(
            stream,
            &Message::Auth {
                proof: proof(secret, &peer_nonce, me.node_id)?,
            },
        )
        .await?;
        let frame = read_frame(stream, &mut buf, MAX_HANDSHAKE_FRAME_BYTES).await?;
        match frame.message {
            Message::Auth { proof: claimed } if verify_proof(secret, &nonce, peer_id, &claimed) => {
            }
            Message::Auth { .. } => {
                return Err(refuse(stream, "authentication failed: wrong secret".into()).await);
            }
            Message::Refuse { reason } => return Err(PeerHandshakeError::RefusedByPeer(reason)),
            _ => {
                return Err(refuse(
                    stream,
                    "authentication failed: the peer sent no proof (is its secret set?)".into(),
                )
                .await);
            }
        }
    }
    if let Err(reason) = admit(peer_id) {
        return Err(refuse(stream, reason).await);
    }
    send(stream, &Message::Welcome).await?;
    let frame = read_frame(stream, &mut buf, MAX_HANDSHAKE_FRAME_BYTES).await?;
    match frame.message {
        Message::Welcome => Ok((peer_id, buf)),
        Message::Refuse { reason } => Err(PeerHandshakeError::RefusedByPeer(reason)),
        other => Err(refuse(stream, format!("expected Welcome, got {}", other.name())).await),
    }
}

/// Admits every peer (a dialer; tests).
pub fn admit_all(_: u8) -> Result<(), String> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(secret: Option<&str>, name_b: &str) -> Config {
        let secret = secret
            .map(|s| format!("secret = \"{s}\""))
            .unwrap_or_default();
        let text = format!(
            r#"
[resource]
name = "r0"
{secret}
[[node]]
name = "alpha"
id = 0
address = "127.0.0.1:7000"
nbd = "127.0.0.1:7001"
disk = "/tmp/a"
[[node]]
name = "{name_b}"
id = 1
address = "127.0.0.2:7000"
nbd = "127.0.0.2:7001"
disk = "/tmp/b"
"#
        );
        Config::parse(Path::new("t.toml"), &text).unwrap()
    }

    async fn pair(a: Config, b: Config) -> (Result<u8, String>, Result<u8, String>) {
        let (mut x, mut y) = tokio::io::duplex(1 << 16);
        let ia = Identity::of(&a, 0).unwrap();
        let ib = Identity::of(&b, 1).unwrap();
        let (ra, rb) = tokio::join!(
            handshake(&mut x, &ia, &a, Some(1), &admit_all),
            handshake(&mut y, &ib, &b, None, &admit_all)
        );
        (
            ra.map(|r| r.0).map_err(|e| e.to_string()),
            rb.map(|r| r.0).map_err(|e| e.to_string()),
        )
    }

    #[tokio::test]
    async fn matching_peers_connect() {
        assert_eq!(
            pair(config(None, "beta"), config(None, "beta")).await,
            (Ok(1), Ok(0))
        );
        assert_eq!(
            pair(config(Some("s"), "beta"), config(Some("s"), "beta")).await,
            (Ok(1), Ok(0))
        );
    }

    #[tokio::test]
    async fn wrong_secret_is_refused_on_both_sides() {
        let (a, b) = pair(config(Some("right"), "beta"), config(Some("wrong"), "beta")).await;
        assert!(a.unwrap_err().contains("authentication failed"));
        assert!(b.is_err());
    }

    #[tokio::test]
    async fn missing_secret_is_refused() {
        let (a, b) = pair(config(Some("s"), "beta"), config(None, "beta")).await;
        assert!(a.is_err() && b.is_err(), "{a:?} {b:?}");
    }

    #[tokio::test]
    async fn different_configs_are_refused_with_the_reason() {
        let (a, b) = pair(config(None, "beta"), config(None, "gamma")).await;
        let a = a.unwrap_err();
        assert!(
            a.contains("config names id 1 'beta'") || a.contains("differs"),
            "{a}"
        );
        assert!(b.is_err());
    }

    #[tokio::test]
    async fn a_standalone_peer_is_refused_with_the_reason() {
        let a = config(None, "beta");
        let b = config(None, "beta");
        let (mut x, mut y) = tokio::io::duplex(1 << 16);
        let ia = Identity::of(&a, 0).unwrap();
        let ib = Identity::of(&b, 1).unwrap();
        let standalone = |_: u8| Err("beta keeps alpha StandAlone".to_string());
        let (ra, rb) = tokio::join!(
            handshake(&mut x, &ia, &a, Some(1), &admit_all),
            handshake(&mut y, &ib, &b, None, &standalone)
        );
        assert!(ra.unwrap_err().to_string().contains("StandAlone"));
        assert!(rb.is_err());
    }

    #[tokio::test]
    async fn an_oversized_handshake_frame_names_the_handshake_limit() {
        let a = config(None, "beta");
        let (mut x, mut y) = tokio::io::duplex(1 << 16);
        let ia = Identity::of(&a, 0).unwrap();
        let mut frame = ((32u32 << 20) + 8).to_le_bytes().to_vec();
        frame.extend_from_slice(&[0; 4]);
        let (result, _) = tokio::join!(handshake(&mut x, &ia, &a, None, &admit_all), async {
            y.write_all(&frame).await.unwrap();
        });
        let error = result.unwrap_err().to_string();
        assert!(
            error.contains("33554440 bytes exceeds the handshake limit of 65536 bytes"),
            "{error}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_gives_up_its_slot_quickly() {
        let a = config(None, "beta");
        let (mut x, _y) = tokio::io::duplex(1 << 16);
        let ia = Identity::of(&a, 0).unwrap();
        let started = tokio::time::Instant::now();
        let result = handshake(&mut x, &ia, &a, None, &admit_all).await;
        assert!(
            matches!(result, Err(PeerHandshakeError::Silent)),
            "{result:?}"
        );
        assert_eq!(started.elapsed(), FIRST_FRAME_TIMEOUT);
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        let a = config(None, "beta");
        let (mut x, mut y) = tokio::io::duplex(1 << 16);
        let ia = Identity::of(&a, 0).unwrap();
        let (result, _) = tokio::join!(handshake(&mut x, &ia, &a, None, &admit_all), async {
            y.write_all(&[0xFF; 64]).await.unwrap();
        });
        assert!(
            matches!(result, Err(PeerHandshakeError::FrameTooLarge { .. })),
            "{result:?}"
        );
        // Garbage that fits the limit fails its checksum.
        let (mut x, mut y) = tokio::io::duplex(1 << 16);
        let (result, _) = tokio::join!(handshake(&mut x, &ia, &a, None, &admit_all), async {
            let mut frame = 16u32.to_le_bytes().to_vec();
            frame.extend_from_slice(&[0xFF; 20]);
            y.write_all(&frame).await.unwrap();
        });
        assert!(
            matches!(result, Err(PeerHandshakeError::Wire(_))),
            "{result:?}"
        );
    }
}
