//! The OCF resource agent (`hablk ocf ACTION`, installed through the thin
//! wrapper `tools/ocf/hablk`): hablk as a promotable clone under Pacemaker,
//! in place of `ocf:linbit:drbd`.
//!
//! The agent never overrides hablk's own safety: promotion is an ordinary
//! `primary` (refused without quorum or current data, which fails the
//! promote so Pacemaker tries elsewhere), and the promotion score only says
//! which node hablk would accept. It lives in the binary rather than in
//! shell because it reads the daemon's state as typed values over the
//! control socket, and its decisions ([`promotion_score`],
//! [`monitor_verdict`]) are unit-tested here.

pub mod device;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::{Config, Node};
use crate::control::client::{ClientError, ControlClient};
use crate::control::protocol::{ExitCode, Request, Response, Status};
use crate::vocabulary::state::{DiskState, Role};
use device::{AttachMode, ExportDevice};

/// OCF exit codes (OCF 1.1, "Return codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OcfStatus {
    Success = 0,
    ErrGeneric = 1,
    ErrArgs = 2,
    ErrUnimplemented = 3,
    ErrInstalled = 5,
    ErrConfigured = 6,
    NotRunning = 7,
    RunningPromoted = 8,
    FailedPromoted = 9,
}

impl From<OcfStatus> for u8 {
    fn from(status: OcfStatus) -> u8 {
        status as u8
    }
}

/// The promotion score of a Primary: it stays where it is.
pub const PROMOTED_SCORE: u32 = 10_000;
/// An UpToDate Secondary: promotable at once.
pub const UP_TO_DATE_SCORE: u32 = 1_000;
/// A Consistent disk (restarted alone): only if nothing better exists, and
/// hablk decides on promotion whether it is current.
pub const CONSISTENT_SCORE: u32 = 10;
// A Primary outranks any Secondary, current data outranks unknown.
const _: () = assert!(PROMOTED_SCORE > UP_TO_DATE_SCORE && UP_TO_DATE_SCORE > CONSISTENT_SCORE);

/// How often start waits for the daemon to answer.
const POLL: Duration = Duration::from_millis(100);
/// How long a monitor waits for the daemon's status.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// Used when Pacemaker does not pass an operation timeout.
const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Kept back from the operation timeout to report a failure before
/// Pacemaker gives up on the action.
const TIMEOUT_MARGIN: Duration = Duration::from_secs(2);
/// Lines of the daemon's log quoted when it fails to start.
const LOG_TAIL_LINES: usize = 5;

const META_DATA: &str = include_str!("meta-data.xml");

/// The score Pacemaker should see for this node: `None` removes it (the
/// node must not be promoted).
///
/// A Consistent disk learns whether it is current as soon as it sees a
/// quorum, so with a quorum it waits for that answer (UpToDate, or Outdated
/// and never promoted); only without one, where hablk decides on
/// promotion, does it get the low score.
pub fn promotion_score(status: &Status) -> Option<u32> {
    match (status.role, status.disk) {
        (Role::Primary, DiskState::UpToDate) => Some(PROMOTED_SCORE),
        (_, DiskState::UpToDate) => Some(UP_TO_DATE_SCORE),
        (_, DiskState::Consistent) if !status.quorum => Some(CONSISTENT_SCORE),
        _ => None,
    }
}

/// The score right after `start`: a daemon that has only just started has
/// not met its peers yet, so a Consistent disk is not yet a candidate.
fn start_score(status: &Status) -> Option<u32> {
    promotion_score(status).filter(|_| status.disk != DiskState::Consistent)
}

/// What `monitor` reports for a running daemon. `device_healthy` says
/// whether the block device the Primary should have is attached and alive.
/// A data node without its disk (failed, or detached after an I/O error)
/// is reported failed, so Pacemaker restarts it, which attaches the disk
/// again.
pub fn monitor_verdict(status: &Status, is_data: bool, device_healthy: bool) -> OcfStatus {
    let lost_disk = is_data && matches!(status.disk, DiskState::Failed | DiskState::Diskless);
    match status.role {
        Role::Primary if lost_disk || !status.quorum || !device_healthy => {
            OcfStatus::FailedPromoted
        }
        Role::Primary => OcfStatus::RunningPromoted,
        _ if lost_disk => OcfStatus::ErrGeneric,
        _ => OcfStatus::Success,
    }
}

/// Runs one OCF action and returns its exit code.
pub fn run(action: &str) -> OcfStatus {
    match action {
        "meta-data" => {
            print!("{META_DATA}");
            return OcfStatus::Success;
        }
        "usage" | "help" => {
            println!("usage: hablk ocf {{start|stop|monitor|promote|demote|notify|validate-all|meta-data}}");
            return OcfStatus::Success;
        }
        _ => {}
    }
    let agent = match Agent::from_env() {
        Ok(agent) => agent,
        Err((status, reason)) => {
            return match (action, status) {
                // Nothing of this resource can run here: it is stopped.
                ("stop", _) => OcfStatus::Success,
                ("monitor", OcfStatus::ErrInstalled) => OcfStatus::NotRunning,
                _ => fail(status, &reason),
            };
        }
    };
    match action {
        "start" => agent.start(),
        "stop" => agent.stop(),
        "monitor" => agent.monitor(),
        "promote" => agent.promote(),
        "demote" => agent.demote(),
        "notify" => agent.notify(),
        "validate-all" => agent.validate(),
        _ => fail(
            OcfStatus::ErrUnimplemented,
            &format!("action {action} is not implemented"),
        ),
    }
}

/// Logs why an action failed; Pacemaker shows the exit reason in
/// `crm_mon`.
fn fail(status: OcfStatus, reason: &str) -> OcfStatus {
    eprintln!("ocf-exit-reason:{reason}");
    status
}

fn log(message: &str) {
    eprintln!("hablk-ocf: {message}");
}

fn env(name: &str) -> Option<String> {
    std::env::var(format!("OCF_RESKEY_{name}"))
        .ok()
        .filter(|value| !value.is_empty())
}

struct Agent {
    config_path: PathBuf,
    config: Config,
    node: Node,
    attach: AttachMode,
    nbd_device: PathBuf,
    log: PathBuf,
    deadline: Instant,
}

impl Agent {
    fn from_env() -> Result<Agent, (OcfStatus, String)> {
        let timeout = env("CRM_meta_timeout")
            .and_then(|ms| ms.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_OPERATION_TIMEOUT);
        let deadline = Instant::now() + timeout.saturating_sub(TIMEOUT_MARGIN);
        let Some(config_path) = env("config").map(PathBuf::from) else {
            return Err((
                OcfStatus::ErrConfigured,
                "the config parameter is required (the resource's config file)".to_owned(),
            ));
        };
        if !config_path.exists() {
            return Err((
                OcfStatus::ErrInstalled,
                format!("{} does not exist on this node", config_path.display()),
            ));
        }
        let config =
            Config::load(&config_path).map_err(|e| (OcfStatus::ErrConfigured, e.to_string()))?;
        let node_name = env("node")
            .or_else(|| env("CRM_meta_on_node"))
            .unwrap_or_else(|| {
                rustix::system::uname()
                    .nodename()
                    .to_string_lossy()
                    .into_owned()
            });
        // Not configured *here* only: Pacemaker keeps the resource off
        // this node and runs it on the nodes of the config.
        let node = config
            .node(&node_name)
            .map_err(|e| (OcfStatus::ErrInstalled, e.to_string()))?
            .clone();
        let attach_text = env("attach").unwrap_or_default();
        let attach = AttachMode::parse(&attach_text).ok_or_else(|| {
            (
                OcfStatus::ErrConfigured,
                format!("attach={attach_text}: expected auto, nbd-client, nbdfuse or none"),
            )
        })?;
        let log = env("log").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(format!(
                "/var/log/hablk/{}-{}.log",
                config.resource.name, node.name
            ))
        });
        Ok(Agent {
            config_path,
            nbd_device: env("nbd_device")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/dev/nbd0")),
            config,
            node,
            attach,
            log,
            deadline,
        })
    }

    fn resource(&self) -> &str {
        &self.config.resource.name
    }

    /// The block device of a data node; `None` on a witness.
    fn device(&self) -> Result<Option<ExportDevice>, (OcfStatus, String)> {
        let Some(listen) = self.node.nbd() else {
            return Ok(None);
        };
        let mode = self
            .attach
            .resolve()
            .map_err(|e| (OcfStatus::ErrInstalled, e.to_string()))?;
        Ok(Some(ExportDevice::new(
            self.resource(),
            listen.clone(),
            mode,
            self.nbd_device.clone(),
            self.log.clone(),
        )))
    }

    fn client(&self) -> Result<ControlClient, ClientError> {
        ControlClient::connect(&self.node.control, &self.node.name)
    }

    /// The daemon's status; `None` when no daemon runs.
    fn status(&self) -> Result<Option<Status>, String> {
        let response = match self.client() {
            Ok(client) => client.request_within(&Request::Status, STATUS_TIMEOUT),
            Err(ClientError::NotRunning { .. }) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        match response {
            Ok(Response {
                status: Some(status),
                ..
            }) => Ok(Some(status)),
            Ok(response) => Err(response.message.unwrap_or_default()),
            Err(ClientError::NotRunning { .. }) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    fn request(&self, request: &Request) -> Result<Response, String> {
        self.client()
            .and_then(|client| client.request(request))
            .map_err(|e| e.to_string())
    }

    /// Publishes this node's promotion score. A failure is logged, not
    /// fatal: the next monitor tries again.
    fn set_score(&self, score: Option<u32>) {
        let mut command = Command::new("crm_attribute");
        command.args(["--promotion", "--lifetime", "reboot"]);
        match score {
            Some(score) => command.args(["--update", &score.to_string()]),
            None => command.arg("--delete"),
        };
        let result = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match result {
            Ok(output) if output.status.success() => {}
            Ok(output) => log(&format!(
                "could not set the promotion score to {score:?}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )),
            Err(e) => log(&format!("could not run crm_attribute: {e}")),
        }
    }

    fn validate(&self) -> OcfStatus {
        match self.device() {
            Ok(_) => OcfStatus::Success,
            Err((status, reason)) => fail(status, &reason),
        }
    }

    fn start(&self) -> OcfStatus {
        if let Err((status, reason)) = self.device() {
            return fail(status, &reason);
        }
        match self.status() {
            Ok(Some(status)) => {
                self.set_score(start_score(&status));
                return OcfStatus::Success;
            }
            Ok(None) => {}
            Err(e) => return fail(OcfStatus::ErrGeneric, &e),
        }
        let log_file = match device::open_log(&self.log) {
            Ok(file) => file,
            Err(e) => return fail(OcfStatus::ErrGeneric, &e.to_string()),
        };
        let log_err = match log_file.try_clone() {
            Ok(file) => file,
            Err(e) => return fail(OcfStatus::ErrGeneric, &format!("the log file: {e}")),
        };
        let exe = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => return fail(OcfStatus::ErrInstalled, &format!("the hablk binary: {e}")),
        };
        // Its own process group, and none of Pacemaker's pipes: the daemon
        // outlives this action.
        use std::os::unix::process::CommandExt;
        let spawned = Command::new(exe)
            .arg("-c")
            .arg(&self.config_path)
            .arg("-n")
            .arg(&self.node.name)
            .arg("up")
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .process_group(0)
            .spawn();
        let mut daemon = match spawned {
            Ok(child) => child,
            Err(e) => return fail(OcfStatus::ErrGeneric, &format!("starting hablk up: {e}")),
        };
        loop {
            if let Ok(Some(exit)) = daemon.try_wait() {
                let code = if exit.code() == Some(u8::from(ExitCode::Usage).into()) {
                    OcfStatus::ErrConfigured
                } else {
                    OcfStatus::ErrGeneric
                };
                return fail(
                    code,
                    &format!("hablk up exited ({exit}): {}", self.log_tail()),
                );
            }
            if let Ok(Some(status)) = self.status() {
                log(&format!(
                    "started {} on {}: {} {}",
                    self.resource(),
                    self.node.name,
                    status.role,
                    status.disk
                ));
                self.set_score(start_score(&status));
                return OcfStatus::Success;
            }
            if Instant::now() > self.deadline {
                return fail(
                    OcfStatus::ErrGeneric,
                    &format!("hablk up did not answer in time: {}", self.log_tail()),
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join(" | ")
    }

    fn stop(&self) -> OcfStatus {
        let status = match self.status() {
            Ok(status) => status,
            Err(e) => return fail(OcfStatus::ErrGeneric, &e),
        };
        if status.as_ref().is_some_and(|s| s.role == Role::Primary) {
            let demoted = self.demote();
            if demoted != OcfStatus::Success {
                return demoted;
            }
        } else if let Err(status) = self.detach() {
            // Leftovers of a daemon that died Primary.
            return status;
        }
        if status.is_none() {
            self.set_score(None);
            return OcfStatus::Success;
        }
        let response = match self.request(&Request::Down { force: false }) {
            Ok(response) => response,
            Err(e) => return fail(OcfStatus::ErrGeneric, &format!("hablk down: {e}")),
        };
        if response.exit == ExitCode::Refused {
            // Pacemaker stops this node whatever hablk thinks of it; a
            // Primary that loses its quorum stops writing, it does not
            // diverge.
            log(&format!(
                "down refused ({}); stopping anyway as Pacemaker asked",
                response.message.unwrap_or_default()
            ));
            if let Err(e) = self.request(&Request::Down { force: true }) {
                return fail(OcfStatus::ErrGeneric, &format!("hablk down --force: {e}"));
            }
        } else if response.exit != ExitCode::Done {
            return fail(
                OcfStatus::ErrGeneric,
                &format!("hablk down: {}", response.message.unwrap_or_default()),
            );
        }
        self.set_score(None);
        OcfStatus::Success
    }

    fn monitor(&self) -> OcfStatus {
        let status = match self.status() {
            Ok(Some(status)) => status,
            Ok(None) => {
                self.set_score(None);
                return OcfStatus::NotRunning;
            }
            Err(e) => return fail(OcfStatus::ErrGeneric, &e),
        };
        self.set_score(promotion_score(&status));
        let device_healthy = match self.device() {
            Ok(Some(device)) if status.role == Role::Primary => device.healthy(),
            Ok(_) => true,
            Err((code, reason)) => return fail(code, &reason),
        };
        let verdict = monitor_verdict(&status, self.node.is_data(), device_healthy);
        match verdict {
            OcfStatus::FailedPromoted => fail(
                verdict,
                &format!(
                    "Primary but {}",
                    if !device_healthy {
                        "its block device is gone".to_owned()
                    } else if !status.quorum {
                        "without quorum".to_owned()
                    } else {
                        format!("disk {}: the backing disk failed", status.disk)
                    }
                ),
            ),
            OcfStatus::ErrGeneric => fail(
                verdict,
                &format!(
                    "disk {}: the backing disk failed (see {})",
                    status.disk,
                    self.log.display()
                ),
            ),
            _ => verdict,
        }
    }

    fn promote(&self) -> OcfStatus {
        let device = match self.device() {
            Ok(device) => device,
            Err((status, reason)) => return fail(status, &reason),
        };
        let Some(device) = device else {
            return fail(OcfStatus::ErrGeneric, "a witness cannot be promoted");
        };
        let response = match self.request(&Request::Primary {
            force: false,
            override_quorum: false,
        }) {
            Ok(response) => response,
            Err(e) => return fail(OcfStatus::ErrGeneric, &format!("hablk primary: {e}")),
        };
        if response.exit != ExitCode::Done {
            if let Ok(Some(status)) = self.status() {
                self.set_score(promotion_score(&status));
            }
            return fail(
                OcfStatus::ErrGeneric,
                &format!("hablk primary: {}", response.message.unwrap_or_default()),
            );
        }
        self.set_score(Some(PROMOTED_SCORE));
        match device.attach() {
            Ok(link) => {
                log(&format!("Primary; {} at {}", device.uri(), link.display()));
                OcfStatus::Success
            }
            Err(e) => {
                // Not Primary without the device it promised.
                let _ = self.request(&Request::Secondary { force: true });
                fail(OcfStatus::ErrGeneric, &format!("attaching the device: {e}"))
            }
        }
    }

    fn detach(&self) -> Result<(), OcfStatus> {
        match self.device() {
            Ok(Some(device)) => device
                .detach()
                .map_err(|e| fail(OcfStatus::ErrGeneric, &e.to_string())),
            Ok(None) => Ok(()),
            Err((status, reason)) => Err(fail(status, &reason)),
        }
    }

    fn demote(&self) -> OcfStatus {
        if let Err(status) = self.detach() {
            return status;
        }
        match self.status() {
            // A daemon that died is no Primary: demoted. The monitor's
            // "not running" has Pacemaker start it again.
            Ok(None) => {
                log("demote: the daemon is not running; nothing is Primary here");
                self.set_score(None);
                return OcfStatus::Success;
            }
            Ok(Some(_)) => {}
            Err(e) => return fail(OcfStatus::ErrGeneric, &e),
        }
        let mut response = match self.request(&Request::Secondary { force: false }) {
            Ok(response) => response,
            Err(e) => return fail(OcfStatus::ErrGeneric, &format!("hablk secondary: {e}")),
        };
        if response.exit == ExitCode::Refused {
            // Our own device is detached and nothing of ours is mounted:
            // the clients left are remote, and Pacemaker moves the role.
            log(&format!(
                "secondary refused ({}); forcing, as the block device is detached",
                response.message.unwrap_or_default()
            ));
            response = match self.request(&Request::Secondary { force: true }) {
                Ok(response) => response,
                Err(e) => {
                    return fail(
                        OcfStatus::ErrGeneric,
                        &format!("hablk secondary --force: {e}"),
                    )
                }
            };
        }
        if response.exit != ExitCode::Done {
            return fail(
                OcfStatus::ErrGeneric,
                &format!("hablk secondary: {}", response.message.unwrap_or_default()),
            );
        }
        if let Ok(Some(status)) = self.status() {
            self.set_score(promotion_score(&status));
        }
        OcfStatus::Success
    }

    /// Keeps the score current as peers come and go.
    fn notify(&self) -> OcfStatus {
        if let Ok(Some(status)) = self.status() {
            self.set_score(promotion_score(&status));
        }
        OcfStatus::Success
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::GenerationText;

    fn status(role: Role, disk: DiskState, quorum: bool) -> Status {
        Status {
            resource: "r0".into(),
            node: "alpha".into(),
            role,
            disk,
            quorum,
            generation: GenerationText("0".into()),
            known_generation: GenerationText("0".into()),
            size_bytes: None,
            io_suspended: false,
            lease_wait_ms: 0,
            nbd: None,
            peers: Vec::new(),
        }
    }

    #[test]
    fn only_current_data_gets_a_promotion_score() {
        use DiskState::*;
        assert_eq!(
            promotion_score(&status(Role::Primary, UpToDate, true)),
            Some(PROMOTED_SCORE)
        );
        assert_eq!(
            promotion_score(&status(Role::Secondary, UpToDate, false)),
            Some(UP_TO_DATE_SCORE)
        );
        assert_eq!(
            promotion_score(&status(Role::Secondary, Consistent, false)),
            Some(CONSISTENT_SCORE)
        );
        // With a quorum it is about to learn UpToDate or Outdated; just
        // started, it has not met anyone yet.
        assert_eq!(
            promotion_score(&status(Role::Secondary, Consistent, true)),
            None
        );
        assert_eq!(
            start_score(&status(Role::Secondary, Consistent, false)),
            None
        );
        assert_eq!(
            start_score(&status(Role::Secondary, UpToDate, false)),
            Some(UP_TO_DATE_SCORE)
        );
        for disk in [Diskless, Inconsistent, Outdated, Failed, DUnknown] {
            assert_eq!(
                promotion_score(&status(Role::Secondary, disk, true)),
                None,
                "{disk}"
            );
        }
    }

    #[test]
    fn monitor_reports_a_primary_that_cannot_serve_as_failed() {
        use DiskState::*;
        let primary = status(Role::Primary, UpToDate, true);
        assert_eq!(
            monitor_verdict(&primary, true, true),
            OcfStatus::RunningPromoted
        );
        assert_eq!(
            monitor_verdict(&primary, true, false),
            OcfStatus::FailedPromoted
        );
        let no_quorum = status(Role::Primary, UpToDate, false);
        assert_eq!(
            monitor_verdict(&no_quorum, true, true),
            OcfStatus::FailedPromoted
        );
        for disk in [Failed, Diskless] {
            let without_disk = status(Role::Primary, disk, true);
            assert_eq!(
                monitor_verdict(&without_disk, true, true),
                OcfStatus::FailedPromoted
            );
        }
    }

    #[test]
    fn monitor_reports_a_data_node_that_lost_its_disk_as_failed() {
        use DiskState::*;
        let outdated = status(Role::Secondary, Outdated, false);
        assert_eq!(monitor_verdict(&outdated, true, true), OcfStatus::Success);
        for disk in [Failed, Diskless] {
            let broken = status(Role::Secondary, disk, true);
            assert_eq!(monitor_verdict(&broken, true, true), OcfStatus::ErrGeneric);
        }
        // A witness has no disk to lose.
        let witness = status(Role::Secondary, Diskless, true);
        assert_eq!(monitor_verdict(&witness, false, true), OcfStatus::Success);
    }

    #[test]
    fn meta_data_names_every_action_and_the_dtd() {
        assert!(META_DATA.contains("<!DOCTYPE resource-agent SYSTEM \"ra-api-1.dtd\">"));
        for action in [
            "start",
            "stop",
            "promote",
            "demote",
            "notify",
            "monitor",
            "validate-all",
        ] {
            assert!(
                META_DATA.contains(&format!("<action name=\"{action}\"")),
                "{action}"
            );
        }
    }
}
