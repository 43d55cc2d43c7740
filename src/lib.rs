//! hablk: a replicated block device in user space.
//!
//! The modules follow the data flow of docs/design.md: [`nbd`] speaks to
//! clients, [`volume`] is the write path (role and quorum gate, then
//! storage and peers), [`storage`] does the backing I/O, [`meta`] keeps the
//! on-disk metadata, [`cluster`] owns roles, generations and quorum, and
//! [`control`] answers the CLI over a unix socket. [`vocabulary`] holds
//! the states and generations they all share; [`admission`] keeps floods
//! of idle connections from locking real clients and peers out. [`daemon`]
//! wires them together for `hablk up`; [`commands`] is what each CLI
//! command does, and [`ocf`] is the Pacemaker resource agent.

pub mod admission;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod control;
pub mod daemon;
pub mod meta;
pub mod nbd;
pub mod ocf;
pub mod replication;
pub mod storage;
pub mod vocabulary;
pub mod volume;
