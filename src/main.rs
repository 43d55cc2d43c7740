//! The `hablk` command line: argument parsing only; the work is in the
//! library (`hablk::commands`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hablk::commands::{self, Target};
use hablk::control::protocol::Request;

/// Exit statuses, shown under every `--help`.
const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  done (also: primary on a Primary, secondary on a Secondary, down with no daemon)
  1  failed (an I/O or connection error, a timeout)
  2  bad usage or config
  3  refused by the cluster state (no quorum, not UpToDate, another Primary,
     clients attached); stderr says what is missing and what would fix it";

/// A replicated block device in user space.
#[derive(Debug, Parser)]
#[command(
    name = "hablk",
    version,
    about,
    propagate_version = true,
    after_help = EXIT_STATUS_HELP
)]
struct Cli {
    /// The resource's config file.
    #[arg(short = 'c', long = "config", env = "HABLK_CONFIG", global = true,
          default_value = commands::default_config_path().as_os_str())]
    config: PathBuf,
    /// This node's name in the config (default: the host name).
    #[arg(short = 'n', long = "node", env = "HABLK_NODE", global = true)]
    node: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write fresh metadata (refuses to overwrite without --force).
    #[command(after_help = EXIT_STATUS_HELP)]
    CreateMd {
        /// Overwrite existing metadata: this node forgets its generation
        /// history and bitmaps (the data area is left as it is).
        #[arg(long)]
        force: bool,
    },
    /// Run this node's daemon in the foreground (SIGTERM/SIGINT = down --force).
    #[command(after_help = EXIT_STATUS_HELP)]
    Up,
    /// Demote if Primary, flush, and stop the daemon.
    #[command(after_help = EXIT_STATUS_HELP)]
    Down {
        /// Stop even with NBD clients attached (in-flight writes finish,
        /// then they are disconnected) or if leaving costs the Primary its
        /// quorum.
        #[arg(long)]
        force: bool,
    },
    /// Promote this node to Primary.
    #[command(after_help = EXIT_STATUS_HELP)]
    Primary {
        /// Accept local data as current (first sync, disaster).
        #[arg(long)]
        force: bool,
        /// Promote without quorum (split-brain risk).
        #[arg(long)]
        override_quorum: bool,
    },
    /// Demote this node to Secondary.
    #[command(after_help = EXIT_STATUS_HELP)]
    Secondary {
        /// Finish in-flight writes, then disconnect attached clients.
        #[arg(long)]
        force: bool,
    },
    /// Show this node's view of the resource.
    #[command(after_help = EXIT_STATUS_HELP)]
    Status {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print one line per state change as it happens.
    #[command(after_help = EXIT_STATUS_HELP)]
    Events {
        /// One JSON object per line instead of key:value text.
        #[arg(long)]
        json: bool,
        /// Print the current state and exit.
        #[arg(long)]
        now: bool,
    },
    /// Connect to a peer (all peers by default).
    #[command(after_help = EXIT_STATUS_HELP)]
    Connect {
        peer: Option<String>,
        /// Resolve a split-brain by making this node the sync target.
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Disconnect from a peer (all peers by default).
    #[command(after_help = EXIT_STATUS_HELP)]
    Disconnect { peer: Option<String> },
    /// Compare block hashes with a peer and mark differing blocks.
    #[command(after_help = EXIT_STATUS_HELP)]
    Verify { peer: Option<String> },
    /// Throw away local data and resync it from an UpToDate peer.
    #[command(after_help = EXIT_STATUS_HELP)]
    Invalidate,
    /// Wait until every configured data node is connected and UpToDate.
    #[command(after_help = EXIT_STATUS_HELP)]
    WaitSync {
        /// Give up after this long (e.g. 30s, 5m) with exit status 1,
        /// naming the nodes that are not in sync.
        #[arg(long)]
        timeout: Option<humantime::Duration>,
    },
    /// Declare all data nodes of a new cluster UpToDate without a sync.
    #[command(after_help = EXIT_STATUS_HELP)]
    SkipInitialSync,
    /// Run one action of the Pacemaker resource agent (through the OCF
    /// wrapper, with its OCF_RESKEY_* parameters in the environment).
    #[command(after_help = OCF_EXIT_STATUS_HELP)]
    Ocf {
        /// start, stop, monitor, promote, demote, notify, validate-all or
        /// meta-data.
        action: String,
    },
}

/// The agent answers in OCF's exit codes, not in hablk's.
const OCF_EXIT_STATUS_HELP: &str = "\
Exit status (OCF): 0 success, 1 generic error, 5 not installed, 6 not
configured, 7 not running, 8 running Promoted, 9 failed Promoted";

fn main() -> ExitCode {
    // Fault-injection builds configure their fault points from FAILPOINTS.
    #[cfg(feature = "failpoints")]
    let _faults = fail::FailScenario::setup();
    let cli = Cli::parse();
    commands::init_logging(matches!(cli.command, Command::Up));
    let target = Target {
        config: cli.config,
        node: cli.node,
    };
    let code = match cli.command {
        Command::CreateMd { force } => commands::create_md(&target, force),
        Command::Up => commands::up(&target),
        Command::Down { force } => commands::role_command(&target, Request::Down { force }),
        Command::Primary {
            force,
            override_quorum,
        } => commands::role_command(
            &target,
            Request::Primary {
                force,
                override_quorum,
            },
        ),
        Command::Secondary { force } => {
            commands::role_command(&target, Request::Secondary { force })
        }
        Command::Status { json } => commands::status(&target, json),
        Command::Events { json, now } => commands::events(&target, json, now),
        Command::Connect {
            peer,
            discard_my_data,
        } => commands::role_command(
            &target,
            Request::Connect {
                peer,
                discard_my_data,
            },
        ),
        Command::Disconnect { peer } => {
            commands::role_command(&target, Request::Disconnect { peer })
        }
        Command::Verify { peer } => commands::role_command(&target, Request::Verify { peer }),
        Command::Invalidate => commands::role_command(&target, Request::Invalidate),
        Command::WaitSync { timeout } => commands::wait_sync(&target, timeout.map(Into::into)),
        Command::SkipInitialSync => commands::role_command(&target, Request::SkipInitialSync),
        Command::Ocf { action } => return ExitCode::from(u8::from(hablk::ocf::run(&action))),
    };
    ExitCode::from(u8::from(code))
}
