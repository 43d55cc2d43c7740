#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! A deterministic, randomized simulation of hablk's safety rules
//! (docs/design.md, "Safety rules"), over hablk's own decision functions.
//!
//! **What is modelled.** Small clusters — 2 data nodes + a witness, 3 data
//! nodes (quorum on), 2 data nodes with quorum off — run random histories
//! of: link cut/heal, crash/restart, a session finding its connection dead
//! (the link closes) and, separately, the cluster core processing that
//! loss, (re)connect, delivery of one message on one connection (each
//! direction is a FIFO queue, lost with the connection), operator
//! `primary`/`secondary`, client writes and their acknowledgement, a resync
//! finishing, and a new generation's deadline passing. Every *decision* is
//! taken by hablk's own pure functions: `sync_rules::decide` (who resyncs
//! whom, split-brain), `promotion::check` and `majority` (rules (a)–(d),
//! quorum), `Lineage::relation_to` / `contains` / `advance` (rule (d), the
//! voter's compare-and-set, stepping down). The bookkeeping mirrors the
//! cluster core (`core.rs`, `roles.rs`, `peers.rs`) handler by handler and
//! message by message: reports are cached per connection (decisions see
//! peers as last reported; a voter counts once its report is in); promotion
//! asks every connected node afresh (`PromoteQuery`), decides when the last
//! one answered or was lost, and gives up if the node's known generation
//! changed meanwhile (`known_at_start`); on taking the role, the data peers
//! whose last report shows its generation UpToDate with no sync running,
//! and those it streams a resync to, become write targets at once; a new
//! generation is recorded by compare-and-set on the voters — a Primary or a
//! promoting node refuses another node's generation — and without a
//! majority the recorder goes back to its previous generation, keeping the
//! failed id in its history and its `known` as before the attempt (no
//! write was acknowledged in it); a voter whose `known` shows up in the
//! history of a peer's settled lineage (a successor, or a record given up)
//! follows that lineage's current generation; rule (b) counts a voter's
//! connection to a node whose role it has not heard yet as a Primary; two
//! nodes in the same generation resync from the Primary, else from one
//! that crashed as Primary, else from the one that wrote in it; after every
//! step, a source that is no longer UpToDate, or that is not Primary and
//! now sees a Primary, closes the link to its target; no connect
//! decision is taken while a
//! generation is being recorded, on either side (reports say so), and the
//! end of the record decides again; a failed *promotion* also closes the link to every peer
//! it streams a resync to (`drop_source_resyncs`) before stepping down;
//! rule G: a voter in sync with the sender adopts the generation as its
//! data — UpToDate, at the generation the new one descends from, no resync
//! with the sender, and one of the sender's write targets (`may_adopt` in
//! `NewGeneration`) — and answers `adopted` (a write target before the gate
//! opens), a behind one turns `Outdated`; the deadline closes the
//! unanswered peers' links and handles their loss at once; rule A (a
//! Primary that loses a data peer that may hold its current generation
//! starts a new one) reads `saw_generation`, kept across connections: set
//! to the new generation for every data peer asked to record it, and to the
//! current generation by a report showing it (a report showing another
//! leaves it) and by a resync's end on the source; a Primary steps down on
//! meeting a newer UpToDate peer; `check_quorum` runs after every step; the
//! resync exchange runs as `SyncBegin` (refused while another resync into
//! the target runs or another connected peer reports Primary) →
//! `BitmapDone` (a Primary source now adds the target to its write targets)
//! → `SyncEnd` (the source's lineage at completion — a source that is not
//! Primary and whose generation moved on since the exchange began closes
//! the link instead; a target that cannot take it — not its target any
//! more, Primary, another connected peer reports Primary, or the lineage is
//! not newer than or equal to its own — closes the link to the source; the
//! source decides nothing more toward that peer until a report shows it
//! UpToDate in the generation sent, `sync_end_sent`; a target that takes
//! it holds the source's lineage from the SyncEnd as the source's latest
//! report, and a refused `SyncBegin` sends the target a fresh report);
//! `decide` never makes
//! a node that knows a generation its data does not descend from the target
//! of a source whose history lacks it; the volume keeps its own list of
//! target links, set by `refresh_targets` (every link the core holds,
//! closed or not, until the loss is handled); a client write goes to every
//! listed link, is acknowledged once each answered, or failed (or was
//! already closed at fan-out) and the core handled that link's loss
//! (`peer_closed` → `mark_loss_handled`), while the gate is open; a new
//! connection closes the old link, live or already closed, and handles its
//! loss (`established`); a detected split-brain is reported to the peer and
//! both stay StandAlone.
//!
//! Data is a set of write ids (one block each); a resync copies, for the
//! blocks in the union of both bitmaps plus every block the source changed
//! while streaming, the source's content to the target. The bitmaps are
//! taken as exact: the union is the set of writes the two disks differ in
//! at `SyncBegin`, and the target goes `Inconsistent` exactly when it is
//! not empty. The copy takes effect at `SyncEnd`: a resync cut short, or
//! whose `SyncEnd` is refused, changes no data here, where the real target
//! has taken part of the blocks by then (and stays `Inconsistent`) — the
//! model sees such a loss only if a later resync completes.
//!
//! **Invariants**, checked after every step : INV1 no
//! acknowledged write is missing from a Primary that serves I/O (generation
//! recorded, gate open) and has quorum; INV2 never two Primaries that can
//! both acknowledge writes (quorum on); INV3 a resync never drops an
//! acknowledged write; INV4 two nodes that both hold acknowledged writes
//! the other lacks are never resynced (the divergence must be reported as
//! split-brain).
//!
//! **Leases, without a clock.** Heartbeats flow on every established
//! connection; a voter's answer renews a peer's lease only while the
//! voter *grants* it (`grants_lease`: the peer's reported lineage holds
//! the voter's `known`, or `known` is the generation that peer asked it to
//! record). A renewed lease keeps counting that voter, over that session,
//! until a `LeaseExpires` event, possible only once the voter stopped
//! renewing it — so a lease outlives its connection and its grant, as a
//! real one does for up to 0.8 × the ping timeout. A voter that loses a
//! peer that was Primary, recording a generation, or whose generation it
//! recorded, holds promotions until that lease expired (`held`, the lease
//! wait); a restarted voter holds them until every peer has reported on a
//! new connection or the leases it may have renewed before the crash
//! expired (`StartHold`). A voter refuses a new generation while a
//! Primary or recorder it still renews would be superseded by it
//! (`withdraw_superseded_grants`). INV1 and INV2 count a Primary's quorum
//! as its lease.
//!
//! **Not modelled**: time itself, and rule (b)'s retry within the ping
//! timeout, or a promotion's retry after its lease wait (a refused or
//! waiting promotion simply ends). Also not modelled: block contents, write ordering and epochs, the
//! bitmap and activity-log mechanics (bitmap vs hash resync, tracking
//! generations, a crashed Primary's extents), `--force`,
//! `--override-quorum`, `--discard-my-data` and `after-split-brain`
//! (split-brain pairs never reconnect), protocols A/B, disk failures and
//! peers that fail a write, `invalidate`, `verify`, skip-initial-sync, size
//! checks, and clusters of more than three nodes. Messages are delivered
//! only over a live connection, so the core never handles a frame that was
//! read before its link closed.
//!
//! On a violation the test panics with the history's seed, the violated
//! invariant, and the event trace shrunk to the steps still needed, with
//! every node's state after each step. `SAFETY_MODEL_SEED` sets the base
//! seed and `SAFETY_MODEL_HISTORIES` the number of histories per
//! configuration (decimal or 0x-hex).

use std::collections::VecDeque;
use std::fmt::Write as _;

use hablk::cluster::promotion::{check, majority, PromotionInput, PromotionRefusal};
use hablk::cluster::sync_rules::{decide, Decision, Side};
use hablk::config::QuorumMode;
use hablk::vocabulary::generation::{Generation, Lineage, Relation, MAX_GENERATION_HISTORY};
use hablk::vocabulary::state::{DiskState, Role};

// ---------------------------------------------------------------- setups

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data,
    Witness,
}

#[derive(Debug)]
struct Setup {
    name: &'static str,
    names: &'static [&'static str],
    kinds: &'static [Kind],
    quorum: QuorumMode,
}

const TWO_DATA_AND_WITNESS: Setup = Setup {
    name: "2 data + witness, quorum on",
    names: &["A", "B", "W"],
    kinds: &[Kind::Data, Kind::Data, Kind::Witness],
    quorum: QuorumMode::Majority,
};

const THREE_DATA: Setup = Setup {
    name: "3 data, quorum on",
    names: &["A", "B", "C"],
    kinds: &[Kind::Data, Kind::Data, Kind::Data],
    quorum: QuorumMode::Majority,
};

const TWO_DATA_QUORUM_OFF: Setup = Setup {
    name: "2 data, quorum off",
    names: &["A", "B"],
    kinds: &[Kind::Data, Kind::Data],
    quorum: QuorumMode::Off,
};

/// Bounds of one history.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    /// Link cuts, heals, crashes and restarts.
    env_events: u32,
    writes: u32,
    promotions: u32,
    steps: usize,
}

const BOUNDS: Bounds = Bounds {
    env_events: 8,
    writes: 5,
    promotions: 4,
    steps: 200,
};

const DEFAULT_SEED: u64 = 0x6861_626c_6b5f_7361;
const DEFAULT_HISTORIES: u64 = 20_000;

// ---------------------------------------------------------------- state

/// What a node keeps in its metadata as its disk state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    UpToDate,
    Outdated,
    Inconsistent,
}

/// The volume's gate, as the core sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Open,
    Held,
    NotPrimary,
    NoQuorum,
}

/// `NodeReport`, reduced to what the rules read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Report {
    role: Role,
    disk: DiskState,
    lineage: Lineage,
    known: Generation,
    primary_crashed: bool,
    /// Connected peers and the role this node last saw for each.
    connections: Vec<(usize, Role)>,
    /// Its current generation is still being recorded.
    recording: bool,
    /// `may_have_written`.
    wrote: bool,
}

#[derive(Debug, Clone)]
enum Msg {
    Report(Report),
    NewGeneration {
        lineage: Lineage,
        token: u64,
        /// The voter is one of the sender's write targets.
        may_adopt: bool,
    },
    GenerationRecorded {
        token: u64,
        accepted: bool,
        /// The voter, a data node in sync with the sender, took the
        /// generation as its data generation.
        adopted: bool,
    },
    PromoteQuery {
        token: u64,
    },
    PromoteReply {
        token: u64,
        /// `lease_wait_ms > 0`: the voter still backs a lost Primary.
        held: bool,
        report: Report,
    },
    /// The source's bitmap, here: its write set when it began.
    SyncBegin {
        source_data: u64,
    },
    SyncRefuse,
    /// The target's answer: the union of both bitmaps (the blocks that
    /// differ).
    BitmapDone {
        bits: u64,
    },
    /// The streamed blocks (`blocks`, holding `values`) and the source's
    /// lineage.
    SyncEnd {
        lineage: Lineage,
        blocks: u64,
        values: u64,
    },
    Write {
        w: u32,
    },
    WriteAck {
        w: u32,
    },
    /// The detecting side tells the other before closing.
    SplitBrain,
}

impl Msg {
    fn name(&self) -> String {
        match self {
            Msg::Report(r) => format!(
                "Report({:?} {:?} {})",
                r.role,
                r.disk,
                fmt_lineage(&r.lineage)
            ),
            Msg::NewGeneration { lineage, .. } => {
                format!("NewGeneration({})", fmt_lineage(lineage))
            }
            Msg::GenerationRecorded {
                accepted, adopted, ..
            } => {
                format!("GenerationRecorded(accepted={accepted}, adopted={adopted})")
            }
            Msg::PromoteQuery { .. } => "PromoteQuery".into(),
            Msg::PromoteReply { report, .. } => format!(
                "PromoteReply({:?} {:?} {})",
                report.role,
                report.disk,
                fmt_lineage(&report.lineage)
            ),
            Msg::SyncBegin { source_data } => {
                format!("SyncBegin(bits of {})", fmt_set(*source_data))
            }
            Msg::SyncRefuse => "SyncRefuse".into(),
            Msg::BitmapDone { bits } => format!("BitmapDone(union {})", fmt_set(*bits)),
            Msg::SyncEnd {
                lineage,
                blocks,
                values,
            } => format!(
                "SyncEnd({}, blocks {} := {})",
                fmt_lineage(lineage),
                fmt_set(*blocks),
                fmt_set(*values)
            ),
            Msg::Write { w } => format!("Write(w{w})"),
            Msg::WriteAck { w } => format!("WriteAck(w{w})"),
            Msg::SplitBrain => "SplitBrain".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SyncRun {
    source: bool,
    streaming: bool,
    /// Source: its write set at `SyncBegin`.
    snapshot: u64,
    /// Once streaming: the union of both bitmaps at the exchange.
    bits: u64,
    /// This node's data generation when the exchange began.
    generation: Generation,
}

/// `PeerState`: what a node knows of one peer.
#[derive(Debug, Clone, Default)]
struct Peer {
    /// The session this node believes is live.
    link: Option<u64>,
    /// `link.is_closed()`: the session ended, the core has not processed it.
    closed: bool,
    report: Option<Report>,
    standalone: bool,
    receives_writes: bool,
    in_sync_at: Option<Generation>,
    /// `saw_generation`: the newest of this node's generations the peer
    /// may hold (asked to record it, a report showing it as current, or a
    /// resync that ended); a report showing another generation leaves it.
    /// Kept across connections (only a restart forgets it).
    saw_generation: Option<Generation>,
    /// `sync_end_sent`: a `SyncEnd` for this generation went out and no
    /// report since shows the peer UpToDate in it; no decision meanwhile.
    sync_end_sent: Option<Generation>,
    sync: Option<SyncRun>,
}

#[derive(Debug, Clone)]
struct Pending {
    w: u32,
    /// `(peer, session)`: write targets whose ack is still owed, or whose
    /// link was closed (at fan-out or since) and whose loss the core has not
    /// handled yet.
    waiting: Vec<(usize, u64)>,
}

#[derive(Debug, Clone)]
struct GenChange {
    token: u64,
    generation: Generation,
    previous: Lineage,
    /// `known` before it: restored if the record fails.
    known_before: Generation,
    /// `wrote` before it: restored too.
    wrote_before: bool,
    asked: usize,
    waiting: Vec<usize>,
    accepted: Vec<usize>,
    /// A `primary` caller waits for it.
    promoting: bool,
    /// Data peers that answered `adopted`: write targets before the gate
    /// opens.
    adopted: Vec<usize>,
}

#[derive(Debug, Clone)]
struct Promotion {
    token: u64,
    waiting: Vec<usize>,
    /// `known` when the promotion started.
    known_at_start: Generation,
    /// A voter asked still backs a lost Primary's lease (`lease_wait_ms`).
    held: bool,
}

#[derive(Debug, Clone)]
struct Node {
    kind: Kind,
    up: bool,
    // Metadata (survives a crash).
    lineage: Lineage,
    known: Generation,
    stored: Stored,
    data: u64,
    primary_crashed: bool,
    /// `wrote_in_generation`: a client write in the current generation.
    wrote: bool,
    // Volatile.
    /// `known_from`: the peer whose generation set `known`.
    known_from: Option<(usize, Generation)>,
    /// `lease_hold_until`: lost Primaries whose lease from this voter may
    /// still run; promotions wait.
    held: Vec<usize>,
    /// `StartHold`: after a restart, the peers not yet heard on a new
    /// connection (one may count a grant given before the crash).
    start_held: Vec<usize>,
    role: Role,
    disk: DiskState,
    peers: Vec<Peer>,
    promotion: Option<Promotion>,
    gen_change: Option<GenChange>,
    needs_generation: bool,
    no_quorum: bool,
    gate: Gate,
    /// The volume's write targets, `(peer, session)` of each link, as the
    /// core last set them (`refresh_targets`).
    targets: Vec<(usize, u64)>,
    /// Sessions whose loss the core handled (`mark_loss_handled`).
    loss_handled: Vec<u64>,
    pending: Vec<Pending>,
    next_token: u64,
}

impl Node {
    fn fresh(kind: Kind, n: usize) -> Node {
        Node {
            kind,
            up: true,
            lineage: Lineage::initial(),
            known: Generation::INITIAL,
            stored: Stored::UpToDate,
            data: 0,
            primary_crashed: false,
            wrote: false,
            known_from: None,
            held: Vec::new(),
            start_held: Vec::new(),
            role: Role::Secondary,
            disk: if kind == Kind::Data {
                DiskState::UpToDate
            } else {
                DiskState::Diskless
            },
            peers: vec![Peer::default(); n],
            promotion: None,
            gen_change: None,
            needs_generation: false,
            no_quorum: false,
            gate: Gate::NotPrimary,
            targets: Vec::new(),
            loss_handled: Vec::new(),
            pending: Vec::new(),
            next_token: 1,
        }
    }

    /// The volatile state a restart starts from.
    fn restart(&mut self) {
        let n = self.peers.len();
        self.up = true;
        self.known_from = None;
        self.held.clear();
        self.role = Role::Secondary;
        self.disk = match (self.kind, self.stored) {
            (Kind::Witness, _) => DiskState::Diskless,
            (Kind::Data, Stored::UpToDate) => DiskState::Consistent,
            (Kind::Data, Stored::Outdated) => DiskState::Outdated,
            (Kind::Data, Stored::Inconsistent) => DiskState::Inconsistent,
        };
        self.peers = vec![Peer::default(); n];
        self.promotion = None;
        self.gen_change = None;
        self.needs_generation = false;
        self.no_quorum = false;
        self.gate = Gate::NotPrimary;
        self.targets.clear();
        self.loss_handled.clear();
        self.pending.clear();
    }

    fn connected(&self, peer: usize) -> bool {
        let p = &self.peers[peer];
        p.link.is_some() && !p.closed
    }
}

/// One live TCP connection: a FIFO queue per direction.
#[derive(Debug, Clone)]
struct Conn {
    session: u64,
    /// `[lower id → higher id, higher id → lower id]`.
    queues: [VecDeque<Msg>; 2],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Cut(usize, usize),
    Heal(usize, usize),
    Crash(usize),
    Restart(usize),
    /// The session of `.0` toward `.1` finds its connection dead: the link
    /// closes (writes whose copy to `.1` was lost wait for `Notice`).
    SessionEnds(usize, usize),
    /// The core of `.0` processes the loss of `.1` (`peer_closed`).
    Notice(usize, usize),
    Connect(usize, usize),
    /// The next message from `.0` is processed by `.1`.
    Deliver(usize, usize),
    Promote(usize),
    Write(usize),
    /// All acks of the write are in (or failed): reply to the client.
    Complete(usize, u32),
    /// The resync task of `.0` toward `.1` finished streaming.
    SyncDone(usize, usize),
    Demote(usize),
    /// The new generation's deadline passed: unanswered voters are dropped.
    Deadline(usize),
    /// The delayed close after reporting a split-brain to the peer.
    CloseStandAlone(usize, usize),
    /// The lease of `.0` no longer counts `.1`'s answers, and `.1` no
    /// longer holds promotions for `.0` (possible once `.1` stopped
    /// granting `.0`'s lease).
    LeaseExpires(usize, usize),
    /// A ping timeout has passed since `.0` started.
    StartHoldExpires(usize),
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    histories: u64,
    steps: u64,
    promotions: u64,
    acked_writes: u64,
    resyncs: u64,
    split_brains: u64,
    generations_failed: u64,
    votes_followed: u64,
    two_writable_primaries: u64,
}

struct Sim {
    setup: &'static Setup,
    nodes: Vec<Node>,
    link_up: Vec<bool>,
    conns: Vec<Option<Conn>>,
    next_session: u64,
    next_generation: u64,
    next_write: u32,
    env_events: u32,
    promotions: u32,
    /// Ghost: every write ever acknowledged to a client.
    acked: u64,
    /// `lease_counted[p][v]`: `p`'s lease counts `v`'s answer to a
    /// heartbeat on session `s` — from the answer until the lease
    /// expires (`LeaseExpires`, possible once `v` stopped granting).
    lease_counted: Vec<Vec<Option<u64>>>,
    violation: Option<String>,
    notes: Vec<String>,
    stats: Stats,
}

fn pair(a: usize, b: usize) -> usize {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    // n ≤ 3: (0,1)=0, (0,2)=1, (1,2)=2
    lo + hi - 1
}

fn side(id: usize, report: &Report, other: usize) -> Side {
    Side {
        id: id as u8,
        role: report.role,
        disk: report.disk,
        lineage: report.lineage.clone(),
        primary_crashed: report.primary_crashed,
        needs_full_sync: false,
        connected_to_other_primary: report
            .connections
            .iter()
            .any(|&(node, role)| node != other && role == Role::Primary),
        discard_my_data: false,
        known: report.known,
        wrote_in_generation: report.wrote,
    }
}

impl Sim {
    /// All up, all connected and in sync, generation 0 everywhere, empty
    /// disks, no Primary.
    fn new(setup: &'static Setup) -> Sim {
        let n = setup.kinds.len();
        let mut sim = Sim {
            setup,
            nodes: setup.kinds.iter().map(|&k| Node::fresh(k, n)).collect(),
            link_up: vec![true; 3],
            conns: vec![None, None, None],
            next_session: 1,
            next_generation: 1,
            next_write: 0,
            env_events: 0,
            promotions: 0,
            acked: 0,
            lease_counted: vec![vec![None; n]; n],
            violation: None,
            notes: Vec::new(),
            stats: Stats::default(),
        };
        for a in 0..n {
            for b in a + 1..n {
                let session = sim.next_session;
                sim.next_session += 1;
                sim.conns[pair(a, b)] = Some(Conn {
                    session,
                    queues: [VecDeque::new(), VecDeque::new()],
                });
                sim.nodes[a].peers[b].link = Some(session);
                sim.nodes[b].peers[a].link = Some(session);
            }
        }
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    let report = sim.report(j);
                    let both_data = setup.kinds[i] == Kind::Data && setup.kinds[j] == Kind::Data;
                    let peer = &mut sim.nodes[i].peers[j];
                    peer.report = Some(report);
                    if both_data {
                        peer.in_sync_at = Some(Generation::INITIAL);
                    }
                }
            }
        }
        sim
    }

    fn n(&self) -> usize {
        self.nodes.len()
    }

    fn name(&self, i: usize) -> &'static str {
        self.setup.names[i]
    }

    fn is_data(&self, i: usize) -> bool {
        self.nodes[i].kind == Kind::Data
    }

    fn note(&mut self, text: String) {
        self.notes.push(text);
    }

    fn violate(&mut self, text: String) {
        if self.violation.is_none() {
            self.violation = Some(text);
        }
    }

    /// The connection of `a` and `b` if it is alive and is the session `a`
    /// believes in.
    fn live(&self, a: usize, b: usize) -> bool {
        match (&self.conns[pair(a, b)], self.nodes[a].peers[b].link) {
            (Some(conn), Some(session)) => conn.session == session,
            _ => false,
        }
    }

    /// Both believe connected, over a live connection.
    fn established(&self, a: usize, b: usize) -> bool {
        self.nodes[a].up
            && self.nodes[b].up
            && self.nodes[a].connected(b)
            && self.nodes[b].connected(a)
            && self.live(a, b)
            && self.live(b, a)
    }

    fn queue(&mut self, from: usize, to: usize) -> Option<&mut VecDeque<Msg>> {
        let dir = usize::from(from > to);
        self.conns[pair(from, to)]
            .as_mut()
            .map(|c| &mut c.queues[dir])
    }

    /// `link.send`: queued if the link is not closed; lost with a dead
    /// connection.
    fn send(&mut self, from: usize, to: usize, msg: Msg) -> bool {
        if !self.nodes[from].connected(to) {
            return false;
        }
        if self.live(from, to) {
            if let Some(q) = self.queue(from, to) {
                q.push_back(msg);
            }
        }
        true
    }

    fn kill_conn(&mut self, a: usize, b: usize) {
        self.conns[pair(a, b)] = None;
    }

    /// `PeerLink::close` by this node: the socket dies. A write whose copy
    /// to the peer is then lost waits for the core to handle the loss.
    fn close_link(&mut self, i: usize, j: usize) {
        if self.nodes[i].peers[j].link.is_none() {
            return;
        }
        if self.live(i, j) {
            self.kill_conn(i, j);
        }
        self.nodes[i].peers[j].closed = true;
    }

    /// `link.mark_loss_handled()` for `i`'s session `session` with `j`:
    /// writes whose copy to `j` failed (or was never sent) may complete.
    fn mark_loss_handled(&mut self, i: usize, j: usize, session: u64) {
        let node = &mut self.nodes[i];
        node.loss_handled.push(session);
        for p in &mut node.pending {
            p.waiting.retain(|&t| t != (j, session));
        }
    }

    /// `refresh_targets`: the write targets are the peers that receive
    /// writes, over the link the core holds — closed or not: a write finds
    /// a closed one closed and waits until its loss is handled.
    fn refresh_targets(&mut self, i: usize) {
        let node = &self.nodes[i];
        let targets = (0..self.n())
            .filter(|&j| j != i && node.role == Role::Primary && node.peers[j].receives_writes)
            .filter_map(|j| node.peers[j].link.map(|s| (j, s)))
            .collect();
        self.nodes[i].targets = targets;
    }

    // ------------------------------------------------------------ reports

    fn report(&self, i: usize) -> Report {
        let n = &self.nodes[i];
        Report {
            role: n.role,
            disk: n.disk,
            lineage: n.lineage.clone(),
            known: n.known,
            primary_crashed: n.primary_crashed && n.role != Role::Primary,
            connections: (0..self.n())
                .filter(|&j| j != i && n.connected(j))
                .map(|j| {
                    (
                        j,
                        n.peers[j].report.as_ref().map_or(Role::Unknown, |r| r.role),
                    )
                })
                .collect(),
            recording: n.gen_change.is_some(),
            wrote: n.wrote || (n.primary_crashed && n.role != Role::Primary),
        }
    }

    fn send_reports(&mut self, i: usize) {
        for j in 0..self.n() {
            if j != i && self.nodes[i].peers[j].link.is_some() {
                let report = self.report(i);
                self.send(i, j, Msg::Report(report));
            }
        }
    }

    fn quorum(&self, i: usize) -> bool {
        match self.setup.quorum {
            QuorumMode::Off => true,
            QuorumMode::Majority => self.voters_seen(i).len() >= majority(self.n()),
        }
    }

    /// A voter counts once its report is in.
    fn voters_seen(&self, i: usize) -> Vec<&'static str> {
        let mut seen = vec![self.name(i)];
        for j in 0..self.n() {
            if j != i && self.nodes[i].connected(j) && self.nodes[i].peers[j].report.is_some() {
                seen.push(self.name(j));
            }
        }
        seen
    }

    /// `grants_lease`: voter `v` answers `p`'s heartbeats as a lease
    /// grant — `p`'s reported lineage holds `v`'s `known`, or `known` is the
    /// generation `p` asked `v` to record.
    fn grants(&self, v: usize, p: usize) -> bool {
        let voter = &self.nodes[v];
        voter.up
            && voter.connected(p)
            && voter.peers[p].report.as_ref().is_some_and(|r| {
                r.lineage.contains(voter.known) || voter.known_from == Some((p, voter.known))
            })
    }

    /// Rule (b)'s input: a peer that is Primary or reports one.
    fn primary_seen(&self, i: usize) -> Option<(usize, usize)> {
        for j in 0..self.n() {
            if j == i || !self.nodes[i].connected(j) {
                continue;
            }
            let Some(report) = &self.nodes[i].peers[j].report else {
                continue;
            };
            if report.role == Role::Primary {
                return Some((j, j));
            }
            // A connection whose role is not reported yet may be to a
            // Primary.
            if let Some(&(k, _)) = report
                .connections
                .iter()
                .find(|&&(k, role)| matches!(role, Role::Primary | Role::Unknown) && k != i)
            {
                return Some((j, k));
            }
        }
        None
    }

    /// Rule (d)'s input (`newer_generation_seen`).
    fn newer_generation_seen(&self, i: usize) -> Option<usize> {
        let me = &self.nodes[i];
        if !me.lineage.contains(me.known) {
            return Some(i);
        }
        for j in 0..self.n() {
            if j == i || !me.connected(j) {
                continue;
            }
            let Some(report) = &me.peers[j].report else {
                continue;
            };
            let knows_newer = !me.lineage.contains(report.known)
                || (self.is_data(j) && me.lineage.relation_to(&report.lineage) == Relation::Older);
            if knows_newer {
                return Some(j);
            }
        }
        None
    }

    // ------------------------------------------------------------ handlers

    fn deliver(&mut self, from: usize, to: usize, msg: Msg) {
        match msg {
            Msg::Report(report) => self.on_report(to, from, report),
            Msg::NewGeneration {
                lineage,
                token,
                may_adopt,
            } => self.on_new_generation(to, from, &lineage, token, may_adopt),
            Msg::GenerationRecorded {
                token,
                accepted,
                adopted,
            } => {
                if let Some(change) = self.nodes[to]
                    .gen_change
                    .as_mut()
                    .filter(|c| c.token == token)
                {
                    if adopted {
                        change.adopted.push(from);
                    }
                    self.generation_answer(to, from, accepted);
                }
            }
            Msg::PromoteQuery { token } => {
                let report = self.report(to);
                let held = !self.nodes[to].held.is_empty() || !self.nodes[to].start_held.is_empty();
                self.send(
                    to,
                    from,
                    Msg::PromoteReply {
                        token,
                        held,
                        report,
                    },
                );
            }
            Msg::PromoteReply {
                token,
                held,
                report,
            } => {
                self.on_report(to, from, report);
                self.promote_reply(to, from, token, held);
            }
            Msg::SyncBegin { source_data } => self.on_sync_begin(to, from, source_data),
            Msg::SyncRefuse => {
                // The target may have refused on a stale view: it gets a
                // fresh one.
                self.nodes[to].peers[from].sync = None;
                let report = self.report(to);
                self.send(to, from, Msg::Report(report));
            }
            Msg::BitmapDone { bits } => self.on_bitmap_done(to, from, bits),
            Msg::SyncEnd {
                lineage,
                blocks,
                values,
            } => self.on_sync_end(to, from, lineage, blocks, values),
            Msg::Write { w } => {
                self.nodes[to].data |= 1 << w;
                self.send(to, from, Msg::WriteAck { w });
            }
            Msg::WriteAck { w } => {
                // Delivered on a live connection: `to`'s link is its session.
                let session = self.nodes[to].peers[from].link;
                for p in &mut self.nodes[to].pending {
                    if p.w == w {
                        p.waiting.retain(|&t| Some(t) != session.map(|s| (from, s)));
                    }
                }
            }
            Msg::SplitBrain => self.mark_split_brain(to, from, false),
        }
    }

    /// `follow_superseded_vote`: a settled lineage that has this voter's
    /// `known` in its history moved past it (a successor, or its recorder
    /// gave it up): the vote follows that lineage's current generation.
    fn follow_superseded_vote(&mut self, i: usize, j: usize, report: &Report) {
        let node = &self.nodes[i];
        if node.role == Role::Primary
            || node.promotion.is_some()
            || node.gen_change.is_some()
            || report.recording
            || node.known == Generation::INITIAL
            || node.known == report.lineage.current
            || !report.lineage.history.contains(&node.known)
        {
            return;
        }
        self.note(format!(
            "{}: vote follows {}'s lineage from {} to {}",
            self.name(i),
            self.name(j),
            fmt_gen(node.known),
            fmt_gen(report.lineage.current)
        ));
        self.nodes[i].known = report.lineage.current;
        self.stats.votes_followed += 1;
    }

    fn on_report(&mut self, i: usize, j: usize, report: Report) {
        let first = self.nodes[i].peers[j].report.is_none();
        let peer_is_data = self.is_data(j);
        self.nodes[i].peers[j].report = Some(report.clone());
        self.nodes[i].start_held.retain(|&k| k != j);
        // Only ever raised by a report: one sent before the peer took a
        // generation it was asked to record may arrive after the ask.
        let current = self.nodes[i].lineage.current;
        if peer_is_data && report.lineage.current == current {
            self.nodes[i].peers[j].saw_generation = Some(current);
        }
        if report.disk == DiskState::UpToDate
            && self.nodes[i].peers[j].sync_end_sent == Some(report.lineage.current)
        {
            self.nodes[i].peers[j].sync_end_sent = None;
        }
        self.follow_superseded_vote(i, j, &report);
        let (disk_before, role_before) = (self.nodes[i].disk, self.nodes[i].role);
        if self.nodes[i].role == Role::Primary
            && peer_is_data
            && self.nodes[i].lineage.relation_to(&report.lineage) == Relation::Older
            && report.disk == DiskState::UpToDate
        {
            self.note(format!(
                "{} steps down: {} holds a newer generation",
                self.name(i),
                self.name(j)
            ));
            self.become_secondary(i);
        }
        if self.nodes[i].disk == DiskState::Consistent && peer_is_data {
            let older = self.nodes[i].lineage.relation_to(&report.lineage) == Relation::Older;
            self.resolve_consistent(i, older);
        } else if self.nodes[i].disk == DiskState::Consistent
            && self.is_data(i)
            && !peer_is_data
            && self.quorum(i)
        {
            // Restarted alone, now with a quorum that includes a witness.
            let outdated = !self.nodes[i].lineage.contains(report.known);
            self.resolve_consistent(i, outdated);
        }
        let changed = self.nodes[i].disk != disk_before || self.nodes[i].role != role_before;
        if first || changed {
            self.send_reports(i);
        }
        self.re_evaluate(i, j);
    }

    fn resolve_consistent(&mut self, i: usize, outdated: bool) {
        let node = &mut self.nodes[i];
        if outdated {
            node.disk = DiskState::Outdated;
            node.stored = Stored::Outdated;
        } else {
            node.disk = DiskState::UpToDate;
            node.stored = Stored::UpToDate;
        }
    }

    fn re_evaluate_all(&mut self, i: usize) {
        for j in 0..self.n() {
            if j != i {
                self.re_evaluate(i, j);
            }
        }
    }

    /// The connect decision for a connected data peer (`re_evaluate`).
    fn re_evaluate(&mut self, i: usize, j: usize) {
        if !self.is_data(i) || !self.is_data(j) {
            return;
        }
        let me = &self.nodes[i];
        let peer = &me.peers[j];
        // A generation still being recorded (this node's or the peer's)
        // decides nothing until it is settled.
        if !me.connected(j)
            || peer.sync.is_some()
            || peer.standalone
            || peer.sync_end_sent.is_some()
            || me.gen_change.is_some()
        {
            return;
        }
        let Some(report) = peer.report.clone().filter(|r| !r.recording) else {
            return;
        };
        let current = me.lineage.current;
        let still_in_sync = peer.in_sync_at == Some(current)
            && report.lineage.current == current
            && report.disk == DiskState::UpToDate
            && me.disk == DiskState::UpToDate
            && (me.role != Role::Primary || peer.receives_writes);
        if still_in_sync {
            return;
        }
        let theirs = side(j, &report, i);
        let mine = side(i, &self.report(i), j);
        let decision = decide(&mine, &theirs);
        // INV4: both hold acknowledged writes the other lacks.
        let (di, dj) = (self.nodes[i].data, self.nodes[j].data);
        let (only_i, only_j) = (self.acked & di & !dj, self.acked & dj & !di);
        if only_i != 0 && only_j != 0 && matches!(decision, Decision::Sync { .. }) {
            self.violate(format!(
                "INV4 (divergence not reported as split-brain): {} holds acknowledged {} and {} \
                 holds acknowledged {}, but decide() = {decision:?}",
                self.name(i),
                fmt_set(only_i),
                self.name(j),
                fmt_set(only_j)
            ));
        }
        match decision {
            Decision::SplitBrain => self.split_brain(i, j),
            Decision::None => {}
            Decision::Sync { source, .. } if usize::from(source) == i => {
                let source_data = self.nodes[i].data;
                self.nodes[i].peers[j].sync = Some(SyncRun {
                    source: true,
                    streaming: false,
                    snapshot: source_data,
                    bits: 0,
                    generation: self.nodes[i].lineage.current,
                });
                self.send(i, j, Msg::SyncBegin { source_data });
                self.note(format!(
                    "{} starts a resync toward {}",
                    self.name(i),
                    self.name(j)
                ));
            }
            Decision::Sync { .. } => {}
        }
    }

    fn split_brain(&mut self, i: usize, j: usize) {
        self.note(format!(
            "SPLIT-BRAIN detected by {} with {}",
            self.name(i),
            self.name(j)
        ));
        self.stats.split_brains += 1;
        self.mark_split_brain(i, j, true);
    }

    /// StandAlone toward `j`, nothing overwritten. The detecting side
    /// tells the peer and closes a moment later (`CloseStandAlone`).
    fn mark_split_brain(&mut self, i: usize, j: usize, tell_peer: bool) {
        self.nodes[i].peers[j].standalone = true;
        if tell_peer {
            self.send(i, j, Msg::SplitBrain);
        } else {
            self.close_link(i, j);
        }
    }

    /// A connected peer of `i` other than `j` last reported itself Primary.
    fn other_primary(&self, i: usize, j: usize) -> bool {
        (0..self.n()).any(|k| {
            k != i
                && k != j
                && self.nodes[i].connected(k)
                && self.nodes[i].peers[k]
                    .report
                    .as_ref()
                    .is_some_and(|r| r.role == Role::Primary)
        })
    }

    fn on_sync_begin(&mut self, i: usize, j: usize, source_data: u64) {
        if let Some(run) = self.nodes[i].peers[j].sync {
            if run.source {
                if i < j {
                    return;
                }
                self.nodes[i].peers[j].sync = None;
            }
        }
        let agreed = self.nodes[i].peers[j]
            .report
            .as_ref()
            .is_some_and(|report| {
                let theirs = side(j, report, i);
                let mine = side(i, &self.report(i), j);
                matches!(decide(&mine, &theirs),
                Decision::Sync { source, target, .. }
                    if usize::from(source) == j && usize::from(target) == i)
            });
        // One source at a time.
        let other_source =
            (0..self.n()).any(|k| k != j && self.nodes[i].peers[k].sync.is_some_and(|r| !r.source));
        // While another node is Primary, only that Primary may overwrite
        // this node's data.
        let other_primary = self.other_primary(i, j);
        if !agreed
            || other_source
            || other_primary
            || self.nodes[i].role == Role::Primary
            || self.nodes[i].promotion.is_some()
        {
            self.send(i, j, Msg::SyncRefuse);
            let report = self.report(i);
            self.send(i, j, Msg::Report(report));
            return;
        }
        let bits = source_data ^ self.nodes[i].data;
        self.nodes[i].peers[j].sync = Some(SyncRun {
            source: false,
            streaming: true,
            snapshot: 0,
            bits,
            generation: self.nodes[i].lineage.current,
        });
        self.send(i, j, Msg::BitmapDone { bits });
        if bits != 0 {
            self.nodes[i].disk = DiskState::Inconsistent;
            self.nodes[i].stored = Stored::Inconsistent;
            self.send_reports(i);
        }
    }

    fn on_bitmap_done(&mut self, i: usize, j: usize, bits: u64) {
        let primary = self.nodes[i].role == Role::Primary;
        let peer = &mut self.nodes[i].peers[j];
        let Some(run) = peer.sync.as_mut().filter(|r| r.source && !r.streaming) else {
            return;
        };
        run.streaming = true;
        run.bits = bits;
        if primary {
            peer.receives_writes = true;
            self.refresh_targets(i);
        }
    }

    fn sync_done(&mut self, i: usize, j: usize) {
        let lineage = self.nodes[i].lineage.clone();
        let began_in = self.nodes[i].peers[j].sync.map(|r| r.generation);
        if self.nodes[i].role != Role::Primary && began_in != Some(lineage.current) {
            // Its generation moved on meanwhile (it took another node's):
            // the target does not get that generation's writes, so no
            // SyncEnd may hand it over; the reconnection decides again.
            self.note(format!(
                "{} is no longer in the generation its resync toward {} began in; closes the link",
                self.name(i),
                self.name(j)
            ));
            self.close_link(i, j);
            return;
        }
        let data = self.nodes[i].data;
        let peer = &mut self.nodes[i].peers[j];
        // The source streams until its bitmap toward the target is empty:
        // the union, plus every block that changed here since `SyncBegin`.
        let blocks = peer.sync.map_or(0, |r| r.bits | (data ^ r.snapshot));
        peer.sync = None;
        peer.in_sync_at = Some(lineage.current);
        // The SyncEnd hands the target this generation.
        peer.saw_generation = Some(lineage.current);
        peer.sync_end_sent = Some(lineage.current);
        self.send(
            i,
            j,
            Msg::SyncEnd {
                lineage,
                blocks,
                values: data & blocks,
            },
        );
    }

    fn on_sync_end(&mut self, i: usize, j: usize, lineage: Lineage, blocks: u64, values: u64) {
        let expected = self.nodes[i].peers[j].sync.is_some_and(|r| !r.source);
        if !expected || self.nodes[i].role == Role::Primary {
            // Not its target (any more): the reconnection decides again.
            self.note(format!(
                "{} cannot take the SyncEnd from {}; closes the link",
                self.name(i),
                self.name(j)
            ));
            self.close_link(i, j);
            return;
        }
        if self.other_primary(i, j) {
            // Another node became Primary during the resync: its writes may
            // be here. The link to the source closes (sync state stays until
            // the loss is handled); the reconnection decides again.
            self.note(format!(
                "{} ignores the SyncEnd from {}: another node is Primary; closes the link",
                self.name(i),
                self.name(j)
            ));
            self.close_link(i, j);
            return;
        }
        // Only a lineage newer than (or equal to) this node's is taken.
        let relation = self.nodes[i].lineage.relation_to(&lineage);
        if relation == Relation::Newer || relation == Relation::Diverged {
            self.note(format!(
                "{} ignores the SyncEnd from {}: {} is not newer than {}; closes the link",
                self.name(i),
                self.name(j),
                fmt_lineage(&lineage),
                fmt_lineage(&self.nodes[i].lineage)
            ));
            self.close_link(i, j);
            return;
        }
        let before = self.nodes[i].data;
        let data = (before & !blocks) | values;
        let lost = self.acked & before & !data;
        if lost != 0 {
            let other = self.acked & data & !before;
            self.violate(format!(
                "INV3{} (resync drops acknowledged writes): resync {} -> {} completes and {} \
                 loses acknowledged {}",
                if other != 0 {
                    " + INV4 (divergence silently resolved)"
                } else {
                    ""
                },
                self.name(j),
                self.name(i),
                self.name(i),
                fmt_set(lost)
            ));
        }
        self.stats.resyncs += 1;
        let generation = lineage.current;
        let node = &mut self.nodes[i];
        node.data = data;
        if node.known == generation || lineage.history.contains(&node.known) {
            node.known = generation;
        }
        node.lineage = lineage;
        node.wrote = false;
        node.stored = Stored::UpToDate;
        node.primary_crashed = false;
        node.disk = DiskState::UpToDate;
        node.peers[j].sync = None;
        node.peers[j].in_sync_at = Some(generation);
        // The SyncEnd is the source's newest word on its data: an older
        // report must not make this node resync it back.
        if let Some(report) = node.peers[j].report.as_mut() {
            report.lineage = node.lineage.clone();
            report.disk = DiskState::UpToDate;
        }
        self.note(format!(
            "{} UpToDate in {} (resync from {} done)",
            self.name(i),
            fmt_gen(generation),
            self.name(j)
        ));
        self.send_reports(i);
        self.re_evaluate_all(i);
    }

    /// A voter records a peer's new generation (compare-and-set).
    fn on_new_generation(
        &mut self,
        i: usize,
        j: usize,
        new: &Lineage,
        token: u64,
        may_adopt: bool,
    ) {
        let generation = new.current;
        // A Primary, or a node promoting itself, backs no other generation.
        let competing = self.nodes[i].role == Role::Primary || self.nodes[i].promotion.is_some();
        // Nor while it backs another Primary's (or recorder's) lease that
        // the new generation would supersede: without time, every grant
        // still given counts as a lease that may still run.
        let leased_to = (0..self.n()).find(|&k| {
            k != i
                && k != j
                && self.lease_counted[k][i].is_some()
                && self.nodes[i].peers[k].link.is_some()
                && self.nodes[i].peers[k].report.as_ref().is_some_and(|r| {
                    (r.role == Role::Primary || r.recording) && !r.lineage.contains(generation)
                })
        });
        let me = &self.nodes[i];
        let accepted = !competing && leased_to.is_none() && new.contains(me.known);
        let previous = new.history.first().copied();
        let in_sync_with_sender = me.kind == Kind::Data
            && me.disk == DiskState::UpToDate
            && Some(me.lineage.current) == previous
            && may_adopt
            && me.peers[j].sync.is_none();
        if accepted {
            let node = &mut self.nodes[i];
            node.known = generation;
            node.known_from = Some((j, generation));
            if in_sync_with_sender {
                node.lineage = new.clone();
                node.wrote = false;
            } else if node.lineage.current != generation && node.disk == DiskState::UpToDate {
                node.stored = Stored::Outdated;
                node.disk = DiskState::Outdated;
            }
        }
        self.note(format!(
            "{} {} {} from {}{}",
            self.name(i),
            if accepted { "records" } else { "REFUSES" },
            fmt_gen(generation),
            self.name(j),
            match (accepted, in_sync_with_sender, self.nodes[i].kind) {
                (true, true, _) => " (adopts it as data generation)".into(),
                (true, false, Kind::Data) => " (behind: keeps its data generation)".into(),
                (false, _, _) if competing => " (Primary or promoting)".into(),
                (false, _, _) if leased_to.is_some() => format!(
                    " (its lease to {} may still run)",
                    leased_to.map_or("?", |k| self.name(k))
                ),
                _ => String::new(),
            }
        ));
        self.send(
            i,
            j,
            Msg::GenerationRecorded {
                token,
                accepted,
                adopted: accepted && in_sync_with_sender,
            },
        );
        self.send_reports(i);
    }

    fn peer_closed(&mut self, i: usize, j: usize) {
        let recorded_its_generation = self.nodes[i].known_from.is_some_and(|(from, _)| from == j);
        let peer = &mut self.nodes[i].peers[j];
        let Some(session) = peer.link else {
            return;
        };
        let was_primary = peer
            .report
            .as_ref()
            .is_some_and(|r| r.role == Role::Primary);
        // Or may be one whose report has not arrived yet.
        let may_hold_lease = was_primary
            || peer.report.as_ref().is_some_and(|r| r.recording)
            || recorded_its_generation;
        let was_target = peer.receives_writes;
        let peer_generation = peer.saw_generation;
        peer.link = None;
        peer.closed = false;
        peer.report = None;
        peer.receives_writes = false;
        peer.in_sync_at = None;
        peer.sync_end_sent = None;
        peer.sync = None;
        // Back no new Primary until the lost one's lease has surely expired.
        if may_hold_lease && self.lease_counted[j][i].is_some() && !self.nodes[i].held.contains(&j)
        {
            self.nodes[i].held.push(j);
        }
        self.generation_answer(i, j, false);
        self.promotion_peer_lost(i, j);
        if was_target {
            self.refresh_targets(i);
        }
        // Rule A, for a data peer that may hold the current generation.
        if self.nodes[i].role == Role::Primary
            && self.is_data(j)
            && peer_generation == Some(self.nodes[i].lineage.current)
        {
            self.note(format!(
                "{} lost data peer {} (rule A): new generation",
                self.name(i),
                self.name(j)
            ));
            self.start_generation(i, false);
        }
        if was_primary && self.nodes[i].role != Role::Primary {
            self.nodes[i].gate = Gate::NotPrimary;
        }
        self.send_reports(i);
        self.mark_loss_handled(i, j, session);
    }

    // --------------------------------------------------- roles.rs mirror

    fn promote(&mut self, i: usize) {
        let known_at_start = self.nodes[i].known;
        self.nodes[i].promotion = Some(Promotion {
            token: 0,
            waiting: Vec::new(),
            known_at_start,
            held: false,
        });
        self.promotion_round(i);
    }

    fn promotion_round(&mut self, i: usize) {
        let token = self.nodes[i].next_token;
        self.nodes[i].next_token += 1;
        let mut waiting = Vec::new();
        for j in 0..self.n() {
            if j != i && self.send(i, j, Msg::PromoteQuery { token }) {
                waiting.push(j);
            }
        }
        if let Some(p) = &mut self.nodes[i].promotion {
            p.token = token;
            p.waiting = waiting;
        }
        self.evaluate_promotion(i);
    }

    fn promote_reply(&mut self, i: usize, j: usize, token: u64, held: bool) {
        let Some(p) = &mut self.nodes[i].promotion else {
            return;
        };
        if p.token != token {
            return;
        }
        p.held |= held;
        p.waiting.retain(|&k| k != j);
        self.evaluate_promotion(i);
    }

    fn promotion_peer_lost(&mut self, i: usize, j: usize) {
        if let Some(p) = &mut self.nodes[i].promotion {
            p.waiting.retain(|&k| k != j);
            self.evaluate_promotion(i);
        }
    }

    fn evaluate_promotion(&mut self, i: usize) {
        let Some(p) = &self.nodes[i].promotion else {
            return;
        };
        if !p.waiting.is_empty() {
            return;
        }
        if self.nodes[i].known != p.known_at_start {
            self.nodes[i].promotion = None;
            self.note(format!(
                "promotion of {} refused: it recorded another node's generation meanwhile",
                self.name(i)
            ));
            return;
        }
        let seen = self.voters_seen(i);
        let primary_seen = self
            .primary_seen(i)
            .map(|(a, b)| (self.name(a), self.name(b)));
        let newer = self.newer_generation_seen(i).map(|k| self.name(k));
        let input = PromotionInput {
            quorum_mode: self.setup.quorum,
            voters_total: self.n(),
            voters_seen: &seen,
            override_quorum: false,
            force: false,
            disk: self.nodes[i].disk,
            primary_seen,
            newer_generation_seen: newer,
        };
        let verdict = check(&input);
        let held = p.held || !self.nodes[i].held.is_empty() || !self.nodes[i].start_held.is_empty();
        self.nodes[i].promotion = None;
        match verdict {
            Err(refusal) => {
                let why = match refusal {
                    PromotionRefusal::NoQuorum { .. } => "(a) no quorum".to_owned(),
                    PromotionRefusal::PrimaryExists { reporter, primary } => {
                        format!("(b) {reporter} reports Primary {primary}")
                    }
                    PromotionRefusal::DiskNotUpToDate(d) => format!("(c) disk {d}"),
                    PromotionRefusal::NewerGeneration(who) => {
                        format!("(d) {who} knows a newer generation")
                    }
                };
                self.note(format!("promotion of {} refused: {why}", self.name(i)));
            }
            Ok(()) if held => {
                self.note(format!(
                    "promotion of {} waits out a lost Primary's lease (ends here)",
                    self.name(i)
                ));
            }
            Ok(()) => {
                self.note(format!("{} passes rules (a)-(d)", self.name(i)));
                self.become_primary(i);
            }
        }
    }

    fn become_primary(&mut self, i: usize) {
        self.stats.promotions += 1;
        let node = &mut self.nodes[i];
        node.stored = Stored::UpToDate;
        node.primary_crashed = true;
        node.disk = DiskState::UpToDate;
        node.role = Role::Primary;
        node.gate = Gate::Held;
        // Data peers in sync (as last reported) and those it streams a
        // resync to are write targets from the first write on.
        let current = self.nodes[i].lineage.current;
        for j in 0..self.n() {
            if j == i || !self.is_data(j) || !self.nodes[i].connected(j) {
                continue;
            }
            let peer = &mut self.nodes[i].peers[j];
            let in_sync = peer
                .report
                .as_ref()
                .is_some_and(|r| r.lineage.current == current && r.disk == DiskState::UpToDate)
                && peer.sync.is_none();
            let resyncing = peer.sync.is_some_and(|r| r.source && r.streaming);
            if in_sync || resyncing {
                peer.receives_writes = true;
            }
        }
        self.refresh_targets(i);
        self.start_generation(i, true);
        self.send_reports(i);
        self.re_evaluate_all(i);
    }

    fn start_generation(&mut self, i: usize, promoting: bool) {
        let generation = Generation(self.next_generation);
        self.next_generation += 1;
        let node = &mut self.nodes[i];
        let previous = node.lineage.clone();
        let known_before = node.known;
        let wrote_before = node.wrote;
        node.lineage.advance(generation);
        node.known = generation;
        node.wrote = false;
        if node.role == Role::Primary {
            node.gate = Gate::Held;
        }
        let token = node.next_token;
        node.next_token += 1;
        let lineage = node.lineage.clone();
        let mut waiting = Vec::new();
        for j in 0..self.n() {
            // Only a write target holds every write of this generation.
            let may_adopt = self.nodes[i].peers[j].receives_writes;
            if j != i
                && self.send(
                    i,
                    j,
                    Msg::NewGeneration {
                        lineage: lineage.clone(),
                        token,
                        may_adopt,
                    },
                )
            {
                waiting.push(j);
                if self.is_data(j) {
                    // It may take the generation as its data before its
                    // answer arrives: losing it then is rule A.
                    self.nodes[i].peers[j].saw_generation = Some(generation);
                }
            }
        }
        let (mut promoting, mut previous, mut known_before, mut wrote_before) =
            (promoting, previous, known_before, wrote_before);
        if let Some(old) = self.nodes[i].gen_change.take() {
            promoting |= old.promoting;
            previous = old.previous;
            known_before = old.known_before;
            wrote_before = old.wrote_before;
        }
        self.note(format!(
            "{} starts {} (asks {})",
            self.name(i),
            fmt_gen(generation),
            waiting
                .iter()
                .map(|&k| self.name(k))
                .collect::<Vec<_>>()
                .join(",")
        ));
        self.nodes[i].gen_change = Some(GenChange {
            token,
            generation,
            previous,
            known_before,
            wrote_before,
            asked: waiting.len(),
            waiting,
            accepted: vec![i],
            promoting,
            adopted: Vec::new(),
        });
        self.maybe_finish_generation(i);
    }

    fn generation_answer(&mut self, i: usize, j: usize, accepted: bool) {
        let Some(change) = &mut self.nodes[i].gen_change else {
            return;
        };
        let before = change.waiting.len();
        change.waiting.retain(|&k| k != j);
        if change.waiting.len() != before && accepted {
            change.accepted.push(j);
        }
        self.maybe_finish_generation(i);
    }

    fn maybe_finish_generation(&mut self, i: usize) {
        if !self.nodes[i]
            .gen_change
            .as_ref()
            .is_some_and(|c| c.waiting.is_empty())
        {
            return;
        }
        let Some(change) = self.nodes[i].gen_change.take() else {
            return;
        };
        let needed = match self.setup.quorum {
            QuorumMode::Off => {
                let connected = (0..self.n())
                    .filter(|&j| j != i && self.nodes[i].connected(j))
                    .count();
                1 + change.asked.min(connected)
            }
            QuorumMode::Majority => majority(self.n()),
        };
        if change.accepted.len() >= needed {
            self.note(format!(
                "{}: {} recorded on {}",
                self.name(i),
                fmt_gen(change.generation),
                change
                    .accepted
                    .iter()
                    .map(|&k| self.name(k))
                    .collect::<Vec<_>>()
                    .join(",")
            ));
            let node = &mut self.nodes[i];
            node.needs_generation = false;
            if node.role == Role::Primary {
                // Every peer that adopted the generation gets every write
                // acknowledged in it.
                for &j in &change.adopted {
                    if node.connected(j) {
                        node.peers[j].receives_writes = true;
                    }
                }
                self.refresh_targets(i);
                self.nodes[i].gate = Gate::Open;
            }
            self.send_reports(i);
            self.re_evaluate_all(i);
            return;
        }
        self.stats.generations_failed += 1;
        self.note(format!(
            "{}: {} NOT recorded on a majority; back to {}",
            self.name(i),
            fmt_gen(change.generation),
            fmt_gen(change.previous.current)
        ));
        let mut lineage = change.previous.clone();
        lineage.history.insert(0, change.generation);
        lineage.history.truncate(MAX_GENERATION_HISTORY);
        self.nodes[i].lineage = lineage;
        // No write was acknowledged in the failed generation: as a voter
        // the node need not hold out for it.
        if self.nodes[i].known == change.generation {
            self.nodes[i].known = change.known_before;
        }
        self.nodes[i].wrote |= change.wrote_before;
        if change.promoting && self.nodes[i].role == Role::Primary {
            self.drop_source_resyncs(i);
            self.become_secondary(i);
        } else if self.nodes[i].role == Role::Primary {
            self.nodes[i].needs_generation = true;
            self.apply_no_quorum(i);
        }
        self.send_reports(i);
        self.re_evaluate_all(i);
    }

    /// `drop_source_resyncs`: closes the link to every peer this node
    /// resyncs (the loss is handled when the core processes it).
    fn drop_source_resyncs(&mut self, i: usize) {
        for j in 0..self.n() {
            if j != i && self.nodes[i].peers[j].sync.is_some_and(|r| r.source) {
                self.note(format!(
                    "{} drops its resync toward {}",
                    self.name(i),
                    self.name(j)
                ));
                self.close_link(i, j);
            }
        }
    }

    /// `drop_invalid_source_resyncs`: a source that is no longer UpToDate,
    /// or (not Primary) now sees another Primary, stops streaming.
    fn drop_invalid_source_resyncs(&mut self, i: usize) {
        for j in 0..self.n() {
            let node = &self.nodes[i];
            let streams =
                j != i && node.peers[j].sync.is_some_and(|r| r.source) && node.connected(j);
            if !streams {
                continue;
            }
            if node.disk != DiskState::UpToDate
                || (node.role != Role::Primary && self.other_primary(i, j))
            {
                self.note(format!(
                    "{} drops its resync toward {} (not UpToDate, or a Primary appeared)",
                    self.name(i),
                    self.name(j)
                ));
                self.close_link(i, j);
            }
        }
    }

    fn apply_no_quorum(&mut self, i: usize) {
        self.nodes[i].gate = Gate::NoQuorum;
        self.nodes[i].no_quorum = true;
    }

    fn check_quorum(&mut self, i: usize) {
        if self.nodes[i].role != Role::Primary {
            self.nodes[i].no_quorum = false;
            return;
        }
        if !self.quorum(i) {
            if self.nodes[i].gen_change.is_none() {
                self.nodes[i].needs_generation = true;
                self.apply_no_quorum(i);
            }
            return;
        }
        let node = &self.nodes[i];
        let reports_pending =
            (0..self.n()).any(|j| j != i && node.connected(j) && node.peers[j].report.is_none());
        if (node.no_quorum || node.needs_generation)
            && node.gen_change.is_none()
            && !reports_pending
        {
            if let Some(who) = self.newer_generation_seen(i) {
                self.note(format!(
                    "{} steps down: {} knows a newer generation",
                    self.name(i),
                    self.name(who)
                ));
                self.become_secondary(i);
                return;
            }
            self.nodes[i].no_quorum = false;
            self.start_generation(i, false);
        }
    }

    fn become_secondary(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if node.role != Role::Primary {
            return;
        }
        node.role = Role::Secondary;
        node.no_quorum = false;
        node.needs_generation = false;
        node.targets.clear();
        for p in &mut node.peers {
            p.receives_writes = false;
        }
        node.gate = Gate::NotPrimary;
        self.send_reports(i);
    }

    // ------------------------------------------------------------ events

    fn enabled(&self, bounds: &Bounds) -> Vec<(u32, Event)> {
        let n = self.n();
        let mut out = Vec::new();
        if self.env_events < bounds.env_events {
            for a in 0..n {
                for b in a + 1..n {
                    if self.link_up[pair(a, b)] {
                        out.push((2, Event::Cut(a, b)));
                    } else {
                        out.push((4, Event::Heal(a, b)));
                    }
                }
                if self.nodes[a].up {
                    out.push((2, Event::Crash(a)));
                } else {
                    out.push((4, Event::Restart(a)));
                }
            }
        }
        for i in 0..n {
            let node = &self.nodes[i];
            if !node.up {
                continue;
            }
            for j in 0..n {
                if j == i {
                    continue;
                }
                let peer = &node.peers[j];
                if peer.link.is_some() && !peer.closed && !self.live(i, j) {
                    out.push((4, Event::SessionEnds(i, j)));
                }
                if peer.link.is_some() && peer.closed {
                    out.push((4, Event::Notice(i, j)));
                }
                if j > i
                    && self.nodes[j].up
                    && self.link_up[pair(i, j)]
                    && self.conns[pair(i, j)].is_none()
                    && !peer.standalone
                    && !self.nodes[j].peers[i].standalone
                    && (peer.link.is_none() || self.nodes[j].peers[i].link.is_none())
                {
                    out.push((4, Event::Connect(i, j)));
                }
                let dir = usize::from(i > j);
                if self.conns[pair(i, j)]
                    .as_ref()
                    .is_some_and(|c| !c.queues[dir].is_empty())
                {
                    out.push((10, Event::Deliver(i, j)));
                }
                if peer.standalone && peer.link.is_some() && !peer.closed {
                    out.push((4, Event::CloseStandAlone(i, j)));
                }
                if peer.sync.is_some_and(|r| r.source && r.streaming) && self.live(i, j) {
                    out.push((3, Event::SyncDone(i, j)));
                }
            }
            if node.kind == Kind::Data
                && node.role != Role::Primary
                && node.promotion.is_none()
                && self.promotions < bounds.promotions
            {
                out.push((2, Event::Promote(i)));
            }
            if node.role == Role::Primary {
                if node.gate == Gate::Open && self.next_write < bounds.writes {
                    out.push((5, Event::Write(i)));
                }
                if node.pending.is_empty() {
                    out.push((1, Event::Demote(i)));
                }
            }
            for p in &node.pending {
                if p.waiting.is_empty() && node.gate != Gate::Held {
                    out.push((6, Event::Complete(i, p.w)));
                }
            }
            if node
                .gen_change
                .as_ref()
                .is_some_and(|c| !c.waiting.is_empty())
            {
                out.push((1, Event::Deadline(i)));
            }
        }
        for p in 0..n {
            for v in 0..n {
                if self.lease_counted[p][v].is_some() && !self.renews_lease(v, p) {
                    out.push((3, Event::LeaseExpires(p, v)));
                }
            }
        }
        for v in 0..n {
            // The hold outlasts every lease granted before the restart.
            if !self.nodes[v].start_held.is_empty()
                && (0..n).all(|p| self.lease_counted[p][v].is_none() || self.renews_lease(v, p))
            {
                out.push((3, Event::StartHoldExpires(v)));
            }
        }
        out
    }

    fn apply(&mut self, event: Event) -> String {
        self.notes.clear();
        let label = match event {
            Event::Cut(a, b) => {
                self.env_events += 1;
                self.link_up[pair(a, b)] = false;
                self.kill_conn(a, b);
                format!("link {}-{} cut", self.name(a), self.name(b))
            }
            Event::Heal(a, b) => {
                self.env_events += 1;
                self.link_up[pair(a, b)] = true;
                format!("link {}-{} healed", self.name(a), self.name(b))
            }
            Event::Crash(i) => {
                self.env_events += 1;
                for j in 0..self.n() {
                    if j != i {
                        self.kill_conn(i, j);
                    }
                }
                self.nodes[i].up = false;
                format!("{} crashes", self.name(i))
            }
            Event::Restart(i) => {
                self.env_events += 1;
                self.nodes[i].restart();
                if self.setup.quorum == QuorumMode::Majority {
                    self.nodes[i].start_held = (0..self.n()).filter(|&p| p != i).collect();
                }
                format!("{} restarts", self.name(i))
            }
            Event::StartHoldExpires(v) => {
                self.nodes[v].start_held.clear();
                format!("{}'s start hold ends", self.name(v))
            }
            Event::LeaseExpires(p, v) => {
                self.lease_counted[p][v] = None;
                self.nodes[v].held.retain(|&k| k != p);
                format!("{}'s lease no longer counts {}", self.name(p), self.name(v))
            }
            Event::SessionEnds(i, j) => {
                self.nodes[i].peers[j].closed = true;
                format!(
                    "{}'s session with {} ends (link closed)",
                    self.name(i),
                    self.name(j)
                )
            }
            Event::Notice(i, j) => {
                self.peer_closed(i, j);
                format!(
                    "{}'s core processes the loss of {}",
                    self.name(i),
                    self.name(j)
                )
            }
            Event::Connect(a, b) => {
                for (x, y) in [(a, b), (b, a)] {
                    if self.nodes[x].peers[y].link.is_some() {
                        // `established` closes the old link, closed or not,
                        // and handles its loss; its own `Closed` event then
                        // names a stale session and is ignored.
                        self.note(format!(
                            "{} replaces its {} link to {}",
                            self.name(x),
                            if self.nodes[x].connected(y) {
                                "live"
                            } else {
                                "closed, unhandled"
                            },
                            self.name(y)
                        ));
                        self.close_link(x, y);
                        self.peer_closed(x, y);
                    }
                }
                let session = self.next_session;
                self.next_session += 1;
                self.conns[pair(a, b)] = Some(Conn {
                    session,
                    queues: [VecDeque::new(), VecDeque::new()],
                });
                for (x, y) in [(a, b), (b, a)] {
                    let old = &self.nodes[x].peers[y];
                    self.nodes[x].peers[y] = Peer {
                        link: Some(session),
                        standalone: old.standalone,
                        saw_generation: old.saw_generation,
                        ..Peer::default()
                    };
                }
                self.send_reports(a);
                self.send_reports(b);
                format!("{} and {} connect", self.name(a), self.name(b))
            }
            Event::Deliver(from, to) => {
                let msg = self.queue(from, to).and_then(|q| q.pop_front());
                match msg {
                    Some(msg) => {
                        let label =
                            format!("{} -> {}: {}", self.name(from), self.name(to), msg.name());
                        self.deliver(from, to, msg);
                        label
                    }
                    None => "nothing to deliver".into(),
                }
            }
            Event::Promote(i) => {
                self.promotions += 1;
                self.promote(i);
                format!("operator: `primary` on {}", self.name(i))
            }
            Event::Write(i) => {
                let w = self.next_write;
                self.next_write += 1;
                self.nodes[i].data |= 1 << w;
                self.nodes[i].wrote = true;
                // `fan_out`: every volume target; one whose link is closed
                // is waited for until the core handled its loss.
                let mut waiting = Vec::new();
                let mut sent = Vec::new();
                for (j, session) in self.nodes[i].targets.clone() {
                    let node = &self.nodes[i];
                    if node.peers[j].link == Some(session) && !node.peers[j].closed {
                        self.send(i, j, Msg::Write { w });
                        sent.push(self.name(j));
                        waiting.push((j, session));
                    } else if !node.loss_handled.contains(&session) {
                        waiting.push((j, session));
                    }
                }
                let label = format!(
                    "client write w{w} on {} (sent to {{{}}}, waits for {{{}}})",
                    self.name(i),
                    sent.join(","),
                    waiting
                        .iter()
                        .map(|&(k, _)| self.name(k))
                        .collect::<Vec<_>>()
                        .join(",")
                );
                self.nodes[i].pending.push(Pending { w, waiting });
                label
            }
            Event::Complete(i, w) => {
                self.nodes[i].pending.retain(|p| p.w != w);
                if self.nodes[i].gate == Gate::Open {
                    self.acked |= 1 << w;
                    self.stats.acked_writes += 1;
                    format!("w{w} ACKNOWLEDGED to the client by {}", self.name(i))
                } else {
                    format!("w{w} fails with EIO on {}", self.name(i))
                }
            }
            Event::SyncDone(i, j) => {
                self.sync_done(i, j);
                format!(
                    "{}'s resync toward {} finished streaming",
                    self.name(i),
                    self.name(j)
                )
            }
            Event::Demote(i) => {
                self.become_secondary(i);
                self.nodes[i].primary_crashed = false;
                format!("operator: `secondary` on {}", self.name(i))
            }
            Event::Deadline(i) => {
                let waiting = self.nodes[i]
                    .gen_change
                    .as_ref()
                    .map(|c| c.waiting.clone())
                    .unwrap_or_default();
                for j in waiting {
                    if self.nodes[i].peers[j].link.is_some() {
                        // Closed, and its loss handled at once (rule A).
                        self.close_link(i, j);
                        self.peer_closed(i, j);
                    } else {
                        self.generation_answer(i, j, false);
                    }
                }
                format!("{}'s new generation times out", self.name(i))
            }
            Event::CloseStandAlone(i, j) => {
                self.close_link(i, j);
                format!(
                    "{} closes its split-brain connection to {}",
                    self.name(i),
                    self.name(j)
                )
            }
        };
        for i in 0..self.n() {
            if self.nodes[i].up {
                self.check_quorum(i);
                self.drop_invalid_source_resyncs(i);
            }
        }
        self.renew_leases();
        self.check_state();
        self.stats.steps += 1;
        if self.notes.is_empty() {
            label
        } else {
            format!("{label}  [{}]", self.notes.join("; "))
        }
    }

    // ------------------------------------------------------------ invariants

    /// `i` can acknowledge a new client write with no further step: gate
    /// open, quorum in its own view, every write target really reachable,
    /// and (with quorum on) a valid lease — approximated, without time, as
    /// really reaching a majority of voters that grant it (a lease outlives
    /// its grants by less than the wait before another node may be
    /// promoted).
    fn able(&self, i: usize) -> bool {
        let node = &self.nodes[i];
        node.up
            && node.role == Role::Primary
            && node.gate == Gate::Open
            && !node.needs_generation
            && self.quorum(i)
            && (self.setup.quorum == QuorumMode::Off || self.lease_count(i) >= majority(self.n()))
            && node.targets.iter().all(|&(j, session)| {
                node.loss_handled.contains(&session)
                    || (node.peers[j].link == Some(session) && node.connected(j) && self.live(i, j))
            })
    }

    /// `v` answers `p`'s heartbeats, renewing `p`'s lease.
    fn renews_lease(&self, v: usize, p: usize) -> bool {
        v != p && self.established(v, p) && self.grants(v, p)
    }

    /// Heartbeats flow on every established connection.
    fn renew_leases(&mut self) {
        for p in 0..self.n() {
            for v in 0..self.n() {
                if self.renews_lease(v, p) {
                    self.lease_counted[p][v] = self.nodes[p].peers[v].link;
                }
            }
        }
    }

    /// `i` and the voters whose answers its lease counts: over the link
    /// it holds (the core recomputes the lease once it handles a loss).
    fn lease_count(&self, i: usize) -> usize {
        1 + (0..self.n())
            .filter(|&j| {
                j != i
                    && self.lease_counted[i][j].is_some()
                    && self.lease_counted[i][j] == self.nodes[i].peers[j].link
            })
            .count()
    }

    fn check_state(&mut self) {
        let ables: Vec<usize> = (0..self.n()).filter(|&i| self.able(i)).collect();
        if self.setup.quorum == QuorumMode::Off {
            if ables.len() >= 2 {
                self.stats.two_writable_primaries += 1;
            }
            return;
        }
        if ables.len() >= 2 {
            let names: Vec<_> = ables.iter().map(|&i| self.name(i)).collect();
            self.violate(format!(
                "INV2: {} are all Primary with quorum and can all acknowledge new writes",
                names.join(" and ")
            ));
        }
        for i in 0..self.n() {
            let node = &self.nodes[i];
            // A Primary serving I/O (its generation recorded, gate open)
            // that really has quorum.
            if node.up
                && node.role == Role::Primary
                && node.gate == Gate::Open
                && (ables.contains(&i) || self.lease_count(i) >= majority(self.n()))
            {
                let missing = self.acked & !node.data;
                if missing != 0 {
                    self.violate(format!(
                        "INV1: {} is Primary with quorum but lacks acknowledged {}",
                        self.name(i),
                        fmt_set(missing)
                    ));
                }
            }
        }
    }

    // ------------------------------------------------------------ printing

    fn fmt_state(&self) -> String {
        let mut out = String::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let _ = write!(out, "{}[", self.name(i));
            if !node.up {
                out.push_str("DOWN ");
            }
            if node.kind == Kind::Witness {
                let _ = write!(out, "witness known={}] ", fmt_gen(node.known));
                continue;
            }
            let _ = write!(
                out,
                "{} {:?} {} known={} data{}",
                if node.role == Role::Primary { "P" } else { "S" },
                node.disk,
                fmt_lineage(&node.lineage),
                fmt_gen(node.known),
                fmt_set(node.data)
            );
            if node.role == Role::Primary {
                let _ = write!(out, " gate={:?}", node.gate);
                let targets: Vec<_> = (0..self.n())
                    .filter(|&j| node.peers[j].receives_writes)
                    .map(|j| self.name(j))
                    .collect();
                let _ = write!(out, " targets={{{}}}", targets.join(","));
                // The volume's list, when it differs (a link closed before
                // the last `refresh_targets`, or one still listed after).
                let volume: Vec<_> = node.targets.iter().map(|&(j, _)| self.name(j)).collect();
                if volume != targets {
                    let _ = write!(out, " volume-targets={{{}}}", volume.join(","));
                }
            }
            for p in &node.pending {
                let _ = write!(
                    out,
                    " pending w{}(waits {{{}}})",
                    p.w,
                    p.waiting
                        .iter()
                        .map(|&(k, _)| self.name(k))
                        .collect::<Vec<_>>()
                        .join(",")
                );
            }
            if let Some(c) = &node.gen_change {
                let _ = write!(out, " recording {}", fmt_gen(c.generation));
            }
            for (j, p) in node.peers.iter().enumerate() {
                if let Some(run) = p.sync {
                    let _ = write!(
                        out,
                        " {}{}",
                        if run.source { "source->" } else { "target<-" },
                        self.name(j)
                    );
                }
            }
            out.push_str("] ");
        }
        out.push_str("\n          links:");
        for a in 0..self.n() {
            for b in a + 1..self.n() {
                let view = |x: usize, y: usize| match (
                    self.nodes[x].peers[y].link,
                    self.nodes[x].peers[y].closed,
                ) {
                    (None, _) => "-",
                    (Some(_), true) => "closed",
                    (Some(_), false) if self.live(x, y) => "conn",
                    (Some(_), false) => "stale",
                };
                let _ = write!(
                    out,
                    " {}{}:{}/{}:{}/{}:{}",
                    self.name(a),
                    self.name(b),
                    if self.link_up[pair(a, b)] {
                        "up"
                    } else {
                        "CUT"
                    },
                    self.name(a),
                    view(a, b),
                    self.name(b),
                    view(b, a)
                );
                if self.nodes[a].peers[b].standalone || self.nodes[b].peers[a].standalone {
                    out.push_str("/SPLIT-BRAIN");
                }
            }
        }
        let _ = write!(out, "  acked{}", fmt_set(self.acked));
        out
    }
}

fn fmt_gen(g: Generation) -> String {
    format!("g{}", g.0)
}

fn fmt_lineage(l: &Lineage) -> String {
    let mut s = fmt_gen(l.current);
    for g in &l.history {
        let _ = write!(s, "<{}", fmt_gen(*g));
    }
    s
}

fn fmt_set(set: u64) -> String {
    let ids: Vec<String> = (0..64)
        .filter(|b| set & (1 << b) != 0)
        .map(|b| format!("w{b}"))
        .collect();
    format!("{{{}}}", ids.join(","))
}

// ---------------------------------------------------------------- driver

/// splitmix64: small, and the same on every platform and version.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One random history; returns its events and the violation, if any.
fn random_history(setup: &'static Setup, seed: u64) -> (Vec<Event>, Option<String>, Stats) {
    let mut rng = Rng(seed);
    let mut sim = Sim::new(setup);
    let mut events = Vec::new();
    while events.len() < BOUNDS.steps && sim.violation.is_none() {
        let enabled = sim.enabled(&BOUNDS);
        let total: u64 = enabled.iter().map(|&(w, _)| u64::from(w)).sum();
        if total == 0 {
            break;
        }
        let mut pick = rng.below(total);
        let mut chosen = enabled[0].1;
        for &(w, e) in &enabled {
            if pick < u64::from(w) {
                chosen = e;
                break;
            }
            pick -= u64::from(w);
        }
        sim.apply(chosen);
        events.push(chosen);
    }
    (events, sim.violation.clone(), sim.stats)
}

/// Replays `events`, skipping those not enabled; stops at the first
/// violation. Returns the violation and the printed trace.
fn replay(setup: &'static Setup, events: &[Event]) -> (Option<String>, Vec<Event>, String) {
    let mut sim = Sim::new(setup);
    let mut kept = Vec::new();
    let mut trace = format!("   0. initial\n          {}\n", sim.fmt_state());
    for &event in events {
        if !sim.enabled(&BOUNDS).iter().any(|&(_, e)| e == event) {
            continue;
        }
        let label = sim.apply(event);
        kept.push(event);
        let _ = writeln!(
            trace,
            "  {:2}. {label}\n          {}",
            kept.len(),
            sim.fmt_state()
        );
        if sim.violation.is_some() {
            break;
        }
    }
    (sim.violation, kept, trace)
}

fn kind_of(violation: &str) -> &str {
    violation
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("")
}

/// Greedily drops events while the same kind of violation still happens.
fn shrink(setup: &'static Setup, events: Vec<Event>, violation: &str) -> Vec<Event> {
    let kind = kind_of(violation).to_owned();
    let (_, mut events, _) = replay(setup, &events);
    loop {
        let mut progress = false;
        let mut i = 0;
        while i < events.len() {
            let mut candidate = events.clone();
            candidate.remove(i);
            match replay(setup, &candidate) {
                (Some(v), kept, _) if kind_of(&v) == kind => {
                    events = kept;
                    progress = true;
                }
                _ => i += 1,
            }
        }
        if !progress {
            return events;
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => value.parse().ok(),
    }
}

fn history_seed(base: u64, index: u64) -> u64 {
    Rng(base ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03)).next()
}

fn run(setup: &'static Setup) {
    let base = env_u64("SAFETY_MODEL_SEED").unwrap_or(DEFAULT_SEED);
    let histories = env_u64("SAFETY_MODEL_HISTORIES").unwrap_or(DEFAULT_HISTORIES);
    let mut total = Stats::default();
    for index in 0..histories {
        let seed = history_seed(base, index);
        let (events, violation, stats) = random_history(setup, seed);
        total.histories += 1;
        total.steps += stats.steps;
        total.promotions += stats.promotions;
        total.acked_writes += stats.acked_writes;
        total.resyncs += stats.resyncs;
        total.split_brains += stats.split_brains;
        total.generations_failed += stats.generations_failed;
        total.votes_followed += stats.votes_followed;
        total.two_writable_primaries += u64::from(stats.two_writable_primaries > 0);
        if let Some(violation) = violation {
            let shrunk = shrink(setup, events.clone(), &violation);
            let (shrunk_violation, _, trace) = replay(setup, &shrunk);
            panic!(
                "{}: VIOLATION in history {index} (seed {seed:#x}; rerun with \
                 SAFETY_MODEL_SEED={base:#x} SAFETY_MODEL_HISTORIES={}):\n  {violation}\n\n\
                 shrunk from {} to {} steps ({}):\n{trace}\nevents: {shrunk:?}",
                setup.name,
                index + 1,
                events.len(),
                shrunk.len(),
                shrunk_violation.as_deref().unwrap_or("?"),
            );
        }
    }
    println!(
        "{}: {} histories, {} steps, {} promotions, {} acknowledged writes, {} resyncs, \
         {} split-brains detected, {} generations not recorded, {} votes moved past a \
         superseded generation, {} histories with two writable Primaries",
        setup.name,
        total.histories,
        total.steps,
        total.promotions,
        total.acked_writes,
        total.resyncs,
        total.split_brains,
        total.generations_failed,
        total.votes_followed,
        total.two_writable_primaries
    );
    // The histories must reach what the invariants are about.
    assert!(total.promotions > 0 && total.acked_writes > 0 && total.resyncs > 0);
    if setup.quorum == QuorumMode::Off {
        // Without quorum two writable Primaries are possible; their
        // divergence must then be detected.
        assert!(total.two_writable_primaries > 0 && total.split_brains > 0);
    }
}

#[test]
fn two_data_and_witness() {
    run(&TWO_DATA_AND_WITNESS);
}

#[test]
fn three_data() {
    run(&THREE_DATA);
}

#[test]
fn two_data_quorum_off() {
    run(&TWO_DATA_QUORUM_OFF);
}

/// A hand-written history, step by step: every event must be enabled
/// when its turn comes, so the scenario cannot silently drift.
struct Scenario {
    sim: Sim,
    trace: String,
    notes: Vec<String>,
}

impl Scenario {
    fn new(setup: &'static Setup) -> Scenario {
        Scenario {
            sim: Sim::new(setup),
            trace: String::new(),
            notes: Vec::new(),
        }
    }

    fn step(&mut self, event: Event) {
        assert!(
            self.sim.enabled(&BOUNDS).iter().any(|&(_, e)| e == event),
            "{event:?} is not enabled here; trace so far:\n{}",
            self.trace
        );
        let label = self.sim.apply(event);
        self.notes.extend(self.sim.notes.iter().cloned());
        let _ = writeln!(self.trace, "  {label}\n      {}", self.sim.fmt_state());
        assert!(
            self.sim.violation.is_none(),
            "{:?}\n{}",
            self.sim.violation,
            self.trace
        );
    }

    /// Delivers every queued message, lowest connection first.
    fn settle(&mut self) {
        loop {
            let next = self
                .sim
                .enabled(&BOUNDS)
                .into_iter()
                .find(|&(_, e)| matches!(e, Event::Deliver(..)));
            match next {
                Some((_, event)) => self.step(event),
                None => return,
            }
        }
    }

    /// Delivers the messages from `from` to `to` in order, through the
    /// first one whose step mentions `text`.
    fn deliver_until(&mut self, from: usize, to: usize, text: &str) {
        loop {
            let before = self.trace.len();
            self.step(Event::Deliver(from, to));
            if self.trace[before..]
                .lines()
                .next()
                .is_some_and(|l| l.contains(text))
            {
                return;
            }
        }
    }

    fn noted(&self, text: &str) -> bool {
        self.notes.iter().any(|n| n.contains(text))
    }

    /// A (Primary) is cut off from B and W without noticing it; B and W
    /// notice, and the leases A held from them expire.
    fn primary_a_cut_off() -> Scenario {
        let mut s = Scenario::new(&TWO_DATA_AND_WITNESS);
        let (a, b, w) = (0, 1, 2);
        s.step(Event::Promote(a));
        s.settle();
        assert_eq!(s.sim.nodes[a].gate, Gate::Open, "{}", s.trace);
        for (x, y) in [(a, b), (a, w)] {
            s.step(Event::Cut(x, y));
            s.step(Event::SessionEnds(y, x));
            s.step(Event::Notice(y, x));
            s.step(Event::LeaseExpires(x, y));
        }
        s
    }

    /// After `primary_a_cut_off`, B is promoted with W's vote, its new
    /// generation on its way to W, and A's link to W heals.
    fn old_primary_cut_off_and_b_promoting() -> Scenario {
        let mut s = Scenario::primary_a_cut_off();
        let (a, b, w) = (0, 1, 2);
        s.step(Event::Promote(b));
        s.deliver_until(b, w, "PromoteQuery");
        s.deliver_until(w, b, "PromoteReply");
        assert!(s.noted("B starts g2"), "{}", s.trace);
        s.step(Event::Heal(a, w));
        s.step(Event::Connect(a, w));
        s
    }
}

#[test]
fn a_voter_renews_no_lease_of_a_primary_whose_successor_it_recorded() {
    let mut s = Scenario::old_primary_cut_off_and_b_promoting();
    let (a, b, w) = (0, 1, 2);
    // W records B's generation first, then hears from A, still Primary.
    s.deliver_until(b, w, "NewGeneration");
    assert!(s.noted("W records g2 from B"), "{}", s.trace);
    s.deliver_until(a, w, "Report(Primary");
    assert!(!s.sim.grants(w, a), "{}", s.trace);
    s.settle();
    s.step(Event::Write(b));
    s.step(Event::Complete(b, 0));
    assert_eq!(s.sim.lease_count(a), 1, "A's lease counts W:\n{}", s.trace);
}

#[test]
fn a_voter_records_no_generation_while_a_primary_it_renews_may_hold_its_lease() {
    let mut s = Scenario::old_primary_cut_off_and_b_promoting();
    let (a, b, w) = (0, 1, 2);
    // W hears from A, still Primary, and renews its lease before B's new
    // generation arrives: recording it would leave A serving stale reads.
    s.deliver_until(a, w, "Report(Primary");
    assert!(s.sim.grants(w, a), "{}", s.trace);
    s.deliver_until(b, w, "NewGeneration");
    assert!(
        s.noted("W REFUSES g2 from B (its lease to A may still run)"),
        "{}",
        s.trace
    );
    assert_eq!(s.sim.nodes[w].known, s.sim.nodes[a].lineage.current);
    s.settle();
    assert_ne!(s.sim.nodes[b].gate, Gate::Open, "{}", s.trace);
}

#[test]
fn a_voter_just_reconnected_to_the_primary_blocks_a_promotion_by_rule_b() {
    let mut s = Scenario::primary_a_cut_off();
    let (a, b, w) = (0, 1, 2);
    // W is connected to A again, but A's report has not arrived: W cannot
    // tell whether A is still Primary.
    s.step(Event::Heal(a, w));
    s.step(Event::Connect(a, w));
    s.step(Event::Promote(b));
    s.deliver_until(b, w, "PromoteQuery");
    s.deliver_until(w, b, "PromoteReply");
    assert!(
        s.noted("promotion of B refused: (b) W reports Primary A"),
        "{}",
        s.trace
    );
    assert_eq!(s.sim.nodes[b].role, Role::Secondary);
}

#[test]
fn a_generation_not_recorded_on_a_majority_gives_the_vote_back() {
    let mut s = Scenario::new(&TWO_DATA_AND_WITNESS);
    let (a, b, w) = (0, 1, 2);
    s.step(Event::Promote(a));
    s.deliver_until(a, b, "PromoteQuery");
    s.deliver_until(a, w, "PromoteQuery");
    s.deliver_until(b, a, "PromoteReply");
    s.deliver_until(w, a, "PromoteReply");
    assert!(s.noted("A starts g1"), "{}", s.trace);
    // Neither voter gets to answer.
    s.step(Event::Cut(a, b));
    s.step(Event::Cut(a, w));
    s.step(Event::Deadline(a));
    // The deadline drops B, which may hold g1: rule A supersedes g1 by g2,
    // which fails in turn.
    assert!(
        s.noted("g2 NOT recorded on a majority; back to g0"),
        "{}",
        s.trace
    );
    let node = &s.sim.nodes[a];
    assert_eq!(node.role, Role::Secondary, "{}", s.trace);
    assert_eq!(node.known, Generation::INITIAL, "the vote is given back");
    assert_eq!(node.lineage.current, Generation::INITIAL);
    assert!(
        node.lineage.history.contains(&Generation(2)),
        "the failed id stays in the history"
    );
}
