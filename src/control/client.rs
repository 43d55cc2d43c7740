//! The CLI side of the control socket.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use super::events::Event;
use super::protocol::{Request, Response};

/// How long the CLI waits for a daemon that accepted a request. Generous:
/// a demotion waits for in-flight writes to finish.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Error)]
pub enum ClientError {
    #[error(
        "hablk is not running for node {node} (no daemon answers at {}); start it with `hablk up`",
        socket.display()
    )]
    NotRunning { node: String, socket: PathBuf },
    #[error("control socket {}: {source}", socket.display())]
    Io { socket: PathBuf, source: io::Error },
    #[error("the daemon sent an unreadable answer: {0}")]
    Protocol(String),
}

/// A connection to a node's daemon.
#[derive(Debug)]
pub struct ControlClient {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
}

impl ControlClient {
    pub fn connect(socket: &Path, node: &str) -> Result<ControlClient, ClientError> {
        let stream = UnixStream::connect(socket).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NotRunning {
                node: node.to_owned(),
                socket: socket.to_owned(),
            },
            _ => ClientError::Io {
                socket: socket.to_owned(),
                source,
            },
        })?;
        Ok(ControlClient {
            socket: socket.to_owned(),
            reader: BufReader::new(stream),
        })
    }

    fn io(&self, source: io::Error) -> ClientError {
        ClientError::Io {
            socket: self.socket.clone(),
            source,
        }
    }

    fn send(&mut self, request: &Request, timeout: Option<Duration>) -> Result<(), ClientError> {
        let mut line =
            serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');
        let stream = self.reader.get_mut();
        stream.set_read_timeout(timeout).map_err(|e| self.io(e))?;
        let stream = self.reader.get_mut();
        stream.write_all(&line).map_err(|e| self.io(e))
    }

    fn read_line(&mut self) -> Result<Option<String>, ClientError> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(line)),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Sends one request and reads its response.
    pub fn request(self, request: &Request) -> Result<Response, ClientError> {
        self.request_within(request, RESPONSE_TIMEOUT)
    }

    /// [`ControlClient::request`], giving up after `timeout`.
    pub fn request_within(
        mut self,
        request: &Request,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        self.send(request, Some(timeout))?;
        let line = self.read_line()?.ok_or_else(|| {
            ClientError::Protocol("the daemon closed the connection without answering".into())
        })?;
        let response: Response =
            serde_json::from_str(&line).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if matches!(request, Request::Down { .. }) {
            // The daemon answers `down` as its last act; wait for it to go.
            while self.read_line()?.is_some() {}
        }
        Ok(response)
    }

    /// Streams events to `print` until the daemon stops (or, with `now`,
    /// until the end of the snapshot). A failure line from the daemon (a
    /// watcher that fell behind) is returned as a response.
    pub fn events(
        mut self,
        now: bool,
        mut print: impl FnMut(&Event) -> io::Result<()>,
    ) -> Result<Option<Response>, ClientError> {
        self.send(&Request::Events { now }, None)?;
        while let Some(line) = self.read_line()? {
            if let Ok(event) = serde_json::from_str::<Event>(&line) {
                print(&event).map_err(|e| self.io(e))?;
                continue;
            }
            let response: Response =
                serde_json::from_str(&line).map_err(|e| ClientError::Protocol(e.to_string()))?;
            return Ok(Some(response));
        }
        Ok(None)
    }
}
