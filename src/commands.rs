//! What each CLI command does, and what it prints. `main.rs` only parses
//! arguments and calls one of these; each returns one of the exit statuses
//! of docs/operations.md (0 done, 1 failed, 2 bad usage or config, 3
//! refused).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::control::client::{ClientError, ControlClient};
use crate::control::protocol::{ExitCode, Request, Response, Status};
use crate::meta::MetaStore;

/// Which config and node a command is about.
#[derive(Debug, Clone)]
pub struct Target {
    pub config: PathBuf,
    /// `None`: the host name.
    pub node: Option<String>,
}

impl Target {
    fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(|| {
            rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned()
        })
    }

    fn load(&self) -> Result<(Config, String), ExitCode> {
        match Config::load(&self.config) {
            Ok(config) => {
                let node = self.node_name();
                if let Err(e) = config.node(&node) {
                    eprintln!("hablk: {e}");
                    return Err(ExitCode::Usage);
                }
                Ok((config, node))
            }
            Err(e) => {
                eprintln!("hablk: {e}");
                Err(ExitCode::Usage)
            }
        }
    }
}

/// Sets up logging to stderr: `info` for the daemon, `warn` for commands,
/// overridable with `RUST_LOG`.
pub fn init_logging(daemon: bool) {
    let default = if daemon { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// `create-md [--force]`.
pub fn create_md(target: &Target, force: bool) -> ExitCode {
    let (config, node) = match target.load() {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let Ok(me) = config.node(&node) else {
        return ExitCode::Usage;
    };
    match MetaStore::create(&config, me, force) {
        Ok(store) => {
            let sb = store.superblock();
            println!(
                "created metadata for {} on {} in {} ({} bytes usable for data)",
                node,
                config.resource.name,
                store.path().display(),
                sb.layout.data_capacity_bytes
            );
            ExitCode::Done
        }
        Err(e) => {
            eprintln!("hablk: {e}");
            ExitCode::Failed
        }
    }
}

/// `up`: runs the daemon in the foreground.
pub fn up(target: &Target) -> ExitCode {
    let (config, node) = match target.load() {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    stop_on_broken_invariant();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hablk")
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("hablk: cannot start the runtime: {e}");
            return ExitCode::Failed;
        }
    };
    match runtime.block_on(crate::daemon::up(config, &node)) {
        Ok(()) => ExitCode::Done,
        // The daemon logs to stderr already: one line, not two.
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::Failed
        }
    }
}

/// A failed invariant check (an `assert!` guarding data) stops the whole
/// daemon at once, with one log line saying where: a crash is a state hablk
/// recovers from (the activity log and generations cover it), a node going
/// on with a broken invariant is not. Without this hook only the task that
/// panicked would end, and the rest would carry on around it.
fn stop_on_broken_invariant() {
    std::panic::set_hook(Box::new(|info| {
        tracing::error!("stopping to protect the data: an internal check failed ({info}); a restart recovers as after a crash");
        std::process::abort();
    }));
}

fn connect(target: &Target) -> Result<(ControlClient, Config, String), ExitCode> {
    let (config, node) = target.load()?;
    let socket = match config.node(&node) {
        Ok(me) => me.control.clone(),
        Err(_) => return Err(ExitCode::Usage),
    };
    match ControlClient::connect(&socket, &node) {
        Ok(client) => Ok((client, config, node)),
        Err(e) => Err(report(&e)),
    }
}

fn report(error: &ClientError) -> ExitCode {
    eprintln!("hablk: {error}");
    ExitCode::Failed
}

fn finish(response: &Response) -> ExitCode {
    if let Some(message) = response.message.as_deref().filter(|m| !m.is_empty()) {
        if response.exit == ExitCode::Done {
            println!("{message}");
        } else {
            eprintln!("{message}");
        }
    }
    response.exit
}

/// `primary`, `secondary`, `down`: a request to the running daemon.
pub fn role_command(target: &Target, request: Request) -> ExitCode {
    let is_down = matches!(request, Request::Down { .. });
    let client = match connect(target) {
        Ok((client, _, _)) => client,
        Err(ExitCode::Failed) if is_down => {
            // `down` with no daemon running is done (idempotent for
            // cluster managers).
            return ExitCode::Done;
        }
        Err(code) => return code,
    };
    match client.request(&request) {
        Ok(response) => finish(&response),
        Err(e) => report(&e),
    }
}

/// `status [--json]`.
pub fn status(target: &Target, json: bool) -> ExitCode {
    let (client, config) = match connect(target) {
        Ok((client, config, _)) => (client, config),
        Err(code) => return code,
    };
    let response = match client.request(&Request::Status) {
        Ok(response) => response,
        Err(e) => return report(&e),
    };
    let Some(status) = &response.status else {
        return finish(&response);
    };
    if json {
        match serde_json::to_string(status) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("hablk: {e}");
                return ExitCode::Failed;
            }
        }
    } else {
        print!("{}", status_text(status, &config));
    }
    ExitCode::Done
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// The text form of `status`, in the spirit of `drbdadm status`.
pub fn status_text(status: &Status, config: &Config) -> String {
    let mut out = format!("{} role:{}\n", status.resource, status.role);
    out.push_str(&format!(
        "  disk:{} quorum:{}{}\n",
        status.disk,
        if status.quorum { "yes" } else { "no" },
        if status.io_suspended {
            " io:suspended"
        } else {
            ""
        }
    ));
    out.push_str(&format!(
        "  generation:{} size:{}\n",
        status.generation.0,
        status.size_bytes.map_or("unset".to_owned(), human_bytes)
    ));
    if let Some(nbd) = &status.nbd {
        out.push_str(&format!("  nbd:{} clients:{}\n", nbd.listen, nbd.clients));
    }
    for peer in &status.peers {
        out.push_str(&format!(
            "  {} connection:{} role:{}{}\n",
            peer.node,
            peer.connection,
            peer.role,
            if peer.split_brain {
                " split-brain:yes"
            } else {
                ""
            }
        ));
        out.push_str(&format!(
            "    replication:{} peer-disk:{} out-of-sync:{}",
            peer.replication,
            peer.peer_disk,
            human_bytes(peer.out_of_sync_bytes)
        ));
        if peer.sync.active {
            out.push_str(&format!(
                " done:{:.1}% rate:{}/s eta:{}",
                peer.sync.percent,
                human_bytes(peer.sync.bytes_per_sec),
                peer.sync
                    .eta_seconds
                    .map_or("?".to_owned(), |s| format!("{s}s"))
            ));
        }
        out.push('\n');
    }
    let missing = not_in_sync(status, config);
    if missing.is_empty() {
        out.push_str("  in-sync:yes (every data node connected and UpToDate)\n");
    } else {
        out.push_str(&format!("  in-sync:no ({})\n", missing.join(", ")));
    }
    out
}

/// `events [--json] [--now]`.
pub fn events(target: &Target, json: bool, now: bool) -> ExitCode {
    let client = match connect(target) {
        Ok((client, _, _)) => client,
        Err(code) => return code,
    };
    let stdout = std::io::stdout();
    let result = client.events(now, |event| {
        let mut out = stdout.lock();
        if json {
            serde_json::to_writer(&mut out, event).map_err(std::io::Error::other)?;
            writeln!(out)?;
        } else {
            writeln!(out, "{}", event.to_text())?;
        }
        out.flush()
    });
    match result {
        Ok(None) => ExitCode::Done,
        Ok(Some(response)) => finish(&response),
        Err(ClientError::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::Done
        }
        Err(e) => report(&e),
    }
}

/// How often `wait-sync` looks at the daemon's status.
const WAIT_SYNC_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// What keeps the resource from full redundancy, as `node: reason` lines:
/// this node's disk if it holds data and is not UpToDate, and every other
/// configured data node that is not Connected and UpToDate with no resync
/// running. A data node that is away counts: it is out of sync by whatever
/// is written meanwhile. Empty when every data node holds the same,
/// current data.
pub fn not_in_sync(status: &Status, config: &Config) -> Vec<String> {
    use crate::vocabulary::state::{ConnectionState, DiskState};
    let mut missing = Vec::new();
    let me_holds_data = config
        .node(&status.node)
        .map(|n| n.is_data())
        .unwrap_or(true);
    if me_holds_data && status.disk != DiskState::UpToDate {
        missing.push(format!("{} (this node): disk {}", status.node, status.disk));
    }
    for node in config.data_nodes().filter(|n| n.name != status.node) {
        let Some(peer) = status.peers.iter().find(|p| p.node == node.name) else {
            missing.push(format!("{}: not a peer of this node", node.name));
            continue;
        };
        if peer.connection != ConnectionState::Connected {
            missing.push(format!("{}: {}", peer.node, peer.connection));
        } else if peer.sync.active {
            missing.push(format!(
                "{}: resync {:.1}% done",
                peer.node, peer.sync.percent
            ));
        } else if peer.peer_disk != DiskState::UpToDate {
            missing.push(format!("{}: disk {}", peer.node, peer.peer_disk));
        }
    }
    missing
}

/// `wait-sync [--timeout DUR]`: until this node and every configured data
/// node are Connected and UpToDate (a node that is away is not in sync);
/// exit 3 at once on StandAlone or split-brain, 1 on timeout naming who is
/// missing.
pub fn wait_sync(target: &Target, timeout: Option<std::time::Duration>) -> ExitCode {
    use std::io::IsTerminal;
    let (config, node) = match target.load() {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let Ok(me) = config.node(&node) else {
        return ExitCode::Usage;
    };
    let socket = me.control.clone();
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    let bar = std::io::stdout().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(1000);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {percent}% eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    loop {
        let status = match ControlClient::connect(&socket, &node)
            .and_then(|c| c.request(&Request::Status))
        {
            Ok(Response {
                status: Some(status),
                ..
            }) => status,
            Ok(response) => return finish(&response),
            Err(e) => return report(&e),
        };
        if let Some(peer) = status.peers.iter().find(|p| {
            p.split_brain || p.connection == crate::vocabulary::state::ConnectionState::StandAlone
        }) {
            if let Some(bar) = &bar {
                bar.abandon();
            }
            let why = if peer.split_brain {
                "split-brain"
            } else {
                "StandAlone"
            };
            eprintln!(
                "refused: {} is {why} with {}; resolve it before waiting for a sync",
                status.node, peer.node
            );
            return ExitCode::Refused;
        }
        let missing = not_in_sync(&status, &config);
        if missing.is_empty() {
            if let Some(bar) = &bar {
                bar.finish_with_message("in sync");
            }
            println!(
                "{}: every data node is connected and UpToDate",
                status.resource
            );
            return ExitCode::Done;
        }
        if let Some(bar) = &bar {
            let percent = status
                .peers
                .iter()
                .filter(|p| p.sync.active)
                .map(|p| p.sync.percent)
                .fold(100.0, f64::min);
            bar.set_position((percent * 10.0) as u64);
            bar.set_message(format!("{} resync", status.resource));
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            if let Some(bar) = &bar {
                bar.abandon();
            }
            eprintln!(
                "hablk: timed out waiting for {} to be in sync; not in sync: {}",
                status.resource,
                missing.join(", ")
            );
            return ExitCode::Failed;
        }
        std::thread::sleep(WAIT_SYNC_POLL);
    }
}

/// The config path when none is given: `$HABLK_CONFIG` is applied by the
/// argument parser.
pub fn default_config_path() -> &'static Path {
    Path::new("/etc/hablk/hablk.toml")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{GenerationText, PeerStatus, SyncStatus};
    use crate::vocabulary::state::{ConnectionState, DiskState, ReplicationState, Role};

    const CONFIG: &str = r#"
[resource]
name = "r0"

[[node]]
name = "alpha"
id = 0
address = "10.0.0.1:7789"
nbd = "127.0.0.1:10809"
disk = "/tmp/a.img"

[[node]]
name = "beta"
id = 1
address = "10.0.0.2:7789"
nbd = "127.0.0.1:10809"
disk = "/tmp/b.img"

[[node]]
name = "witness"
id = 2
address = "10.0.0.3:7789"
"#;

    fn peer(node: &str, connection: ConnectionState, disk: DiskState) -> PeerStatus {
        PeerStatus {
            node: node.into(),
            connection,
            role: Role::Secondary,
            peer_disk: disk,
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
        }
    }

    fn status(node: &str, disk: DiskState, peers: Vec<PeerStatus>) -> Status {
        Status {
            resource: "r0".into(),
            node: node.into(),
            role: Role::Secondary,
            disk,
            quorum: true,
            generation: GenerationText("0".into()),
            known_generation: GenerationText("0".into()),
            size_bytes: None,
            io_suspended: false,
            lease_wait_ms: 0,
            nbd: None,
            peers,
        }
    }

    #[test]
    fn a_data_node_that_is_away_or_behind_is_not_in_sync() {
        use ConnectionState::{Connected, Connecting};
        use DiskState::{DUnknown, Diskless, Outdated, UpToDate};
        let config = Config::parse(Path::new("test.toml"), CONFIG).unwrap();
        let witness = || peer("witness", Connected, Diskless);

        let all = status(
            "alpha",
            UpToDate,
            vec![peer("beta", Connected, UpToDate), witness()],
        );
        assert!(not_in_sync(&all, &config).is_empty());
        // A witness that is away costs no redundancy of the data.
        let no_witness = status(
            "alpha",
            UpToDate,
            vec![
                peer("beta", Connected, UpToDate),
                peer("witness", Connecting, DUnknown),
            ],
        );
        assert!(not_in_sync(&no_witness, &config).is_empty());

        let away = status(
            "alpha",
            UpToDate,
            vec![peer("beta", Connecting, DUnknown), witness()],
        );
        assert_eq!(not_in_sync(&away, &config), vec!["beta: Connecting"]);

        let mut syncing = peer("beta", Connected, DiskState::Inconsistent);
        syncing.sync.active = true;
        syncing.sync.percent = 42.0;
        let resync = status("alpha", UpToDate, vec![syncing, witness()]);
        assert_eq!(
            not_in_sync(&resync, &config),
            vec!["beta: resync 42.0% done"]
        );

        let behind = status(
            "beta",
            Outdated,
            vec![peer("alpha", Connected, UpToDate), witness()],
        );
        assert_eq!(
            not_in_sync(&behind, &config),
            vec!["beta (this node): disk Outdated"]
        );

        // Asked on the witness: both data nodes count, the witness's own
        // disk does not.
        let from_witness = status(
            "witness",
            Diskless,
            vec![
                peer("alpha", Connected, UpToDate),
                peer("beta", Connected, Outdated),
            ],
        );
        assert_eq!(
            not_in_sync(&from_witness, &config),
            vec!["beta: disk Outdated"]
        );
    }
}
