//! The `hablk` command line: argument parsing only; the work is in the
//! library (`hablk::commands`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hablk::commands::{self, Target};
use hablk::control::protocol::Request;

/// A replicated block device in user space.
#[derive(Debug, Parser)]
#[command(name = "hablk", version, about, propagate_version = true)]
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
    CreateMd {
        #[arg(long)]
        force: bool,
    },
    /// Run this node's daemon in the foreground.
    Up,
    /// Demote if Primary, flush, and stop the daemon.
    Down {
        #[arg(long)]
        force: bool,
    },
    /// Promote this node to Primary.
    Primary {
        /// Accept local data as current (first sync, disaster).
        #[arg(long)]
        force: bool,
        /// Promote without quorum (split-brain risk).
        #[arg(long)]
        override_quorum: bool,
    },
    /// Demote this node to Secondary.
    Secondary {
        /// Finish in-flight writes, then disconnect attached clients.
        #[arg(long)]
        force: bool,
    },
    /// Show this node's view of the resource.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Print one line per state change as it happens.
    Events {
        #[arg(long)]
        json: bool,
        /// Print the current state and exit.
        #[arg(long)]
        now: bool,
    },
    /// Connect to a peer (all peers by default).
    Connect {
        peer: Option<String>,
        /// Resolve a split-brain by making this node the sync target.
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Disconnect from a peer (all peers by default).
    Disconnect { peer: Option<String> },
    /// Compare block hashes with a peer and mark differing blocks.
    Verify { peer: Option<String> },
    /// Throw away local data and resync it from an UpToDate peer.
    Invalidate,
    /// Wait until this node and every data node it sees are UpToDate.
    WaitSync {
        #[arg(long)]
        timeout: Option<humantime::Duration>,
    },
    /// Declare all data nodes of a new cluster UpToDate without a sync.
    SkipInitialSync,
}

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
    };
    ExitCode::from(u8::from(code))
}
