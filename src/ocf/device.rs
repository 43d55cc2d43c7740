//! The block device on the Promoted node: the local NBD export attached with
//! `nbd-client` (kernel nbd module) or with nbdfuse and a loop device (no
//! module), and linked at `/dev/hablk/<resource>` so the Filesystem resource
//! on top names one device whatever the attachment.
//!
//! What was attached is recorded under `/run/hablk/ocf/<resource>/`, which a
//! reboot clears along with the attachment itself.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::config::NbdListen;

/// Where the stable device links live.
pub const LINK_DIR: &str = "/dev/hablk";
/// Where the agent records what it attached.
pub const STATE_ROOT: &str = "/run/hablk/ocf";
/// How long nbdfuse may take to serve, and a detach to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

/// How the export becomes a block device (the agent's `attach` parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    Auto,
    NbdClient,
    Nbdfuse,
    None,
}

impl AttachMode {
    pub fn parse(text: &str) -> Option<AttachMode> {
        match text {
            "" | "auto" => Some(AttachMode::Auto),
            "nbd-client" => Some(AttachMode::NbdClient),
            "nbdfuse" => Some(AttachMode::Nbdfuse),
            "none" => Some(AttachMode::None),
            _ => None,
        }
    }

    /// `Auto` made concrete for this host: the kernel client where the nbd
    /// module is loaded (or loads), nbdfuse otherwise.
    pub fn resolve(self) -> Result<AttachMode, DeviceError> {
        let resolved = match self {
            AttachMode::Auto if nbd_module_available() && on_path("nbd-client") => {
                AttachMode::NbdClient
            }
            AttachMode::Auto => AttachMode::Nbdfuse,
            other => other,
        };
        let needed: &[&str] = match resolved {
            AttachMode::NbdClient => &["nbd-client"],
            AttachMode::Nbdfuse => &["nbdfuse", "losetup", "fusermount3"],
            AttachMode::None | AttachMode::Auto => &[],
        };
        match needed.iter().find(|tool| !on_path(tool)) {
            Some(tool) => Err(DeviceError::Missing {
                tool: (*tool).to_owned(),
                mode: resolved,
            }),
            None => Ok(resolved),
        }
    }
}

fn nbd_module_available() -> bool {
    Path::new("/sys/module/nbd").exists()
        || Command::new("modprobe")
            .arg("nbd")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
}

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("attach={mode:?} needs {tool}, which is not installed")]
    Missing { tool: String, mode: AttachMode },
    #[error("{command} failed: {detail}")]
    Command { command: String, detail: String },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(
        "{device} is still mounted at {mountpoint}; stop what uses it first (order the \
         Filesystem resource after the promotion of this clone)"
    )]
    Mounted { device: String, mountpoint: String },
    #[error("{0} did not happen within {SETTLE_TIMEOUT:?}")]
    Timeout(String),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> DeviceError {
    let what = what.into();
    move |source| DeviceError::Io { what, source }
}

/// Runs a command to completion; its stderr becomes the error.
fn run(command: &mut Command) -> Result<String, DeviceError> {
    let name = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(io_error(name.clone()))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(DeviceError::Command {
            command: name,
            detail: format!(
                "{} ({})",
                String::from_utf8_lossy(&output.stderr).trim(),
                output.status
            ),
        })
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> Result<(), DeviceError> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while !done() {
        if Instant::now() > deadline {
            return Err(DeviceError::Timeout(what.to_owned()));
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// The export of one resource on this node, as a block device.
#[derive(Debug)]
pub struct ExportDevice {
    resource: String,
    listen: NbdListen,
    mode: AttachMode,
    nbd_device: PathBuf,
    log: PathBuf,
    state_dir: PathBuf,
}

impl ExportDevice {
    /// `mode` must be resolved ([`AttachMode::resolve`]).
    pub fn new(
        resource: &str,
        listen: NbdListen,
        mode: AttachMode,
        nbd_device: PathBuf,
        log: PathBuf,
    ) -> ExportDevice {
        ExportDevice {
            resource: resource.to_owned(),
            listen,
            mode,
            nbd_device,
            log,
            state_dir: Path::new(STATE_ROOT).join(resource),
        }
    }

    /// The stable path the Filesystem resource names.
    pub fn link(&self) -> PathBuf {
        Path::new(LINK_DIR).join(&self.resource)
    }

    fn state(&self, name: &str) -> PathBuf {
        self.state_dir.join(name)
    }

    fn fuse_dir(&self) -> PathBuf {
        self.state("fuse")
    }

    /// The export's NBD URI as seen from this host.
    pub fn uri(&self) -> String {
        nbd_uri(&self.listen, &self.resource)
    }

    /// Attaches the export (nothing to do if it already is) and returns the
    /// stable link.
    pub fn attach(&self) -> Result<PathBuf, DeviceError> {
        if self.mode == AttachMode::None {
            return Ok(self.link());
        }
        if self.healthy() {
            return Ok(self.link());
        }
        // A half-attached leftover (a crashed nbdfuse, a stale link).
        self.detach()?;
        fs::create_dir_all(&self.state_dir).map_err(io_error("creating the state directory"))?;
        let device = match self.mode {
            AttachMode::NbdClient => self.attach_nbd_client()?,
            _ => self.attach_nbdfuse()?,
        };
        fs::create_dir_all(LINK_DIR).map_err(io_error(format!("creating {LINK_DIR}")))?;
        let link = self.link();
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&device, &link)
            .map_err(io_error(format!("linking {}", link.display())))?;
        Ok(link)
    }

    fn attach_nbd_client(&self) -> Result<PathBuf, DeviceError> {
        let mut command = Command::new("nbd-client");
        match &self.listen {
            NbdListen::Tcp(address) => {
                let host = local_host(address);
                command.args(["-N", &self.resource, &host, &address.port().to_string()]);
            }
            NbdListen::Unix(path) => {
                command.args(["-N", &self.resource, "-unix"]).arg(path);
            }
        }
        command.arg(&self.nbd_device);
        run(&mut command)?;
        write_state(&self.state("device"), &self.nbd_device.to_string_lossy())?;
        Ok(self.nbd_device.clone())
    }

    fn attach_nbdfuse(&self) -> Result<PathBuf, DeviceError> {
        let fuse_dir = self.fuse_dir();
        fs::create_dir_all(&fuse_dir).map_err(io_error("creating the nbdfuse mount point"))?;
        let pid_file = self.state("nbdfuse.pid");
        let _ = fs::remove_file(&pid_file);
        let log = open_log(&self.log)?;
        let log_err = log.try_clone().map_err(io_error("the log file"))?;
        let mut child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pid_file)
            .arg(fuse_dir.join("disk"))
            .arg(self.uri())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(io_error("starting nbdfuse"))?;
        let mut exited = None;
        wait_until("nbdfuse serving the export", || {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                return true;
            }
            fs::read_to_string(&pid_file).is_ok_and(|pid| !pid.trim().is_empty())
        })?;
        if let Some(status) = exited {
            return Err(DeviceError::Command {
                command: format!("nbdfuse {}", self.uri()),
                detail: format!("exited with {status}; see {}", self.log.display()),
            });
        }
        let device = run(Command::new("losetup")
            .args(["-f", "--show"])
            .arg(fuse_dir.join("disk")))?;
        write_state(&self.state("loop"), &device)?;
        Ok(PathBuf::from(device))
    }

    /// The block device the link points at, if any.
    fn device(&self) -> Option<PathBuf> {
        ["loop", "device"]
            .iter()
            .find_map(|name| fs::read_to_string(self.state(name)).ok())
            .map(|text| PathBuf::from(text.trim()))
    }

    /// Whether the device is attached and its client alive.
    pub fn healthy(&self) -> bool {
        if self.mode == AttachMode::None {
            return true;
        }
        let Some(device) = self.device() else {
            return false;
        };
        let is_block = fs::metadata(self.link()).is_ok_and(|m| m.file_type().is_block_device());
        let client_alive = match self.mode {
            AttachMode::NbdClient => device
                .file_name()
                .map(|name| Path::new("/sys/block").join(name).join("pid").exists())
                .unwrap_or(false),
            _ => self.nbdfuse_pid().is_some_and(process_alive),
        };
        is_block && client_alive
    }

    fn nbdfuse_pid(&self) -> Option<i32> {
        fs::read_to_string(self.state("nbdfuse.pid"))
            .ok()
            .and_then(|pid| pid.trim().parse().ok())
    }

    /// Where the device is mounted, if it is.
    pub fn mountpoint(&self) -> Option<String> {
        let device = self.device()?;
        let rdev = fs::metadata(&device).ok()?.rdev();
        let wanted = format!("{}:{}", rustix::fs::major(rdev), rustix::fs::minor(rdev));
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
        mountinfo.lines().find_map(|line| {
            let mut fields = line.split(' ');
            let id = fields.nth(2)?;
            let mountpoint = fields.nth(1)?;
            (id == wanted).then(|| mountpoint.to_owned())
        })
    }

    /// Detaches the device (nothing to do if it is not attached). Refused
    /// while it is mounted: a file system is stopped by its own resource,
    /// never pulled from under it.
    pub fn detach(&self) -> Result<(), DeviceError> {
        if let Some(mountpoint) = self.mountpoint() {
            return Err(DeviceError::Mounted {
                device: self.link().display().to_string(),
                mountpoint,
            });
        }
        let _ = fs::remove_file(self.link());
        if let Some(device) = self.device() {
            let device_text = device.display().to_string();
            let result = if fs::read_to_string(self.state("loop")).is_ok() {
                run(Command::new("losetup").args(["-d", &device_text]))
            } else {
                run(Command::new("nbd-client").args(["-d", &device_text]))
            };
            // Already gone is detached.
            if let Err(error) = result {
                if device.exists() && self.mode == AttachMode::NbdClient {
                    return Err(error);
                }
            }
            let _ = fs::remove_file(self.state("loop"));
            let _ = fs::remove_file(self.state("device"));
        }
        self.stop_nbdfuse()
    }

    fn stop_nbdfuse(&self) -> Result<(), DeviceError> {
        let fuse_dir = self.fuse_dir();
        let pid = self.nbdfuse_pid();
        if fuse_mounted(&fuse_dir) {
            // losetup -d lets go of the file a moment later.
            wait_until("fusermount3 -u of the nbdfuse mount", || {
                run(Command::new("fusermount3").arg("-u").arg(&fuse_dir)).is_ok()
                    || !fuse_mounted(&fuse_dir)
            })?;
        }
        if let Some(pid) = pid {
            let gone = wait_until("nbdfuse to exit", || !process_alive(pid));
            if gone.is_err() {
                let _ = rustix::process::kill_process(
                    rustix::process::Pid::from_raw(pid)
                        .ok_or_else(|| DeviceError::Timeout("a valid nbdfuse pid".to_owned()))?,
                    rustix::process::Signal::Kill,
                );
            }
        }
        let _ = fs::remove_file(self.state("nbdfuse.pid"));
        // Empty by now; a reboot would clear them anyway.
        let _ = fs::remove_dir(&fuse_dir);
        let _ = fs::remove_dir(&self.state_dir);
        Ok(())
    }
}

fn fuse_mounted(dir: &Path) -> bool {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let dir = dir.to_string_lossy();
    mountinfo
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(dir.as_ref()))
}

fn process_alive(pid: i32) -> bool {
    // A zombie has exited: only its parent has not collected it yet.
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

fn write_state(path: &Path, text: &str) -> Result<(), DeviceError> {
    fs::write(path, text).map_err(io_error(format!("writing {}", path.display())))
}

/// Opens (creating it and its directory) a log file for appending.
pub fn open_log(path: &Path) -> Result<fs::File, DeviceError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))?;
    }
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_error(format!("opening {}", path.display())))
}

/// The address to dial for a listener that may be a wildcard.
fn local_host(address: &std::net::SocketAddr) -> String {
    match address.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_owned(),
        ip if ip.is_unspecified() => "::1".to_owned(),
        ip => ip.to_string(),
    }
}

/// The NBD URI of a resource exported on `listen`, dialled from this host.
pub fn nbd_uri(listen: &NbdListen, resource: &str) -> String {
    match listen {
        NbdListen::Tcp(address) => {
            let host = local_host(address);
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host
            };
            format!("nbd://{host}:{}/{resource}", address.port())
        }
        NbdListen::Unix(path) => format!("nbd+unix:///{resource}?socket={}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_dial_wildcards_on_loopback() {
        let tcp = |text: &str| NbdListen::Tcp(text.parse().unwrap());
        assert_eq!(
            nbd_uri(&tcp("0.0.0.0:10809"), "r0"),
            "nbd://127.0.0.1:10809/r0"
        );
        assert_eq!(nbd_uri(&tcp("[::]:10809"), "r0"), "nbd://[::1]:10809/r0");
        assert_eq!(nbd_uri(&tcp("10.0.0.1:1"), "r0"), "nbd://10.0.0.1:1/r0");
        assert_eq!(
            nbd_uri(&NbdListen::Unix("/run/r0.sock".into()), "r0"),
            "nbd+unix:///r0?socket=/run/r0.sock"
        );
    }

    #[test]
    fn attach_modes_parse_as_documented() {
        assert_eq!(AttachMode::parse(""), Some(AttachMode::Auto));
        assert_eq!(AttachMode::parse("nbdfuse"), Some(AttachMode::Nbdfuse));
        assert_eq!(AttachMode::parse("nbd-client"), Some(AttachMode::NbdClient));
        assert_eq!(AttachMode::parse("none"), Some(AttachMode::None));
        assert_eq!(AttachMode::parse("nbd"), None);
    }
}
