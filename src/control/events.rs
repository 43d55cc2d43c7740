//! The events stream (`hablk events`), in the spirit of `drbdsetup events2`:
//! one line per state change of an object (the resource, a connection, a
//! peer device), and a `call` line per command the daemon answered.
//!
//! The cluster core does not emit change lines by hand: after every step it
//! compares each object's fields with what it last published and emits a
//! `change` for each object that differs ([`ObjectTracker`]). A state change
//! can therefore never be missing from the stream.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::broadcast;

/// Events buffered per subscriber; a subscriber that falls further behind
/// is told so and disconnected (it resubscribes and gets a fresh snapshot).
pub const EVENT_BUFFER: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    Exists,
    Create,
    Change,
    Destroy,
    Call,
    EndOfSnapshot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObjectKind {
    Resource,
    Connection,
    PeerDevice,
}

/// One line of the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub time: String,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<ObjectKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default)]
    pub peer: Option<String>,
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl Event {
    pub fn object(
        kind: EventKind,
        object: ObjectKind,
        node: &str,
        peer: Option<&str>,
        fields: Map<String, Value>,
    ) -> Event {
        Event {
            time: now_rfc3339(),
            kind,
            object: Some(object),
            node: Some(node.to_owned()),
            peer: peer.map(str::to_owned),
            fields,
        }
    }

    pub fn end_of_snapshot() -> Event {
        Event {
            time: now_rfc3339(),
            kind: EventKind::EndOfSnapshot,
            object: None,
            node: None,
            peer: None,
            fields: Map::new(),
        }
    }

    /// The `key:value` text form.
    pub fn to_text(&self) -> String {
        let mut line = format!("{} {}", self.time, kind_text(self.kind));
        if let Some(object) = self.object {
            line.push(' ');
            line.push_str(object_text(object));
        }
        if let Some(node) = &self.node {
            line.push_str(&format!(" node:{node}"));
        }
        if let Some(peer) = &self.peer {
            line.push_str(&format!(" peer:{peer}"));
        }
        for (key, value) in &self.fields {
            let text = match value {
                Value::String(s) if s.contains(' ') => format!("\"{s}\""),
                Value::String(s) => s.clone(),
                Value::Null => "none".to_owned(),
                other => other.to_string(),
            };
            line.push_str(&format!(" {}:{text}", key.replace('_', "-")));
        }
        line
    }
}

fn kind_text(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Exists => "exists",
        EventKind::Create => "create",
        EventKind::Change => "change",
        EventKind::Destroy => "destroy",
        EventKind::Call => "call",
        EventKind::EndOfSnapshot => "end-of-snapshot",
    }
}

fn object_text(object: ObjectKind) -> &'static str {
    match object {
        ObjectKind::Resource => "resource",
        ObjectKind::Connection => "connection",
        ObjectKind::PeerDevice => "peer-device",
    }
}

/// Identifies one object: its kind and, for per-peer objects, the peer.
pub type ObjectKey = (ObjectKind, Option<String>);

/// Publishes events and remembers what each object last looked like.
#[derive(Debug)]
pub struct ObjectTracker {
    node: String,
    sender: broadcast::Sender<Event>,
    published: BTreeMap<ObjectKey, Map<String, Value>>,
}

impl ObjectTracker {
    pub fn new(node: String) -> ObjectTracker {
        let (sender, _) = broadcast::channel(EVENT_BUFFER);
        ObjectTracker {
            node,
            sender,
            published: BTreeMap::new(),
        }
    }

    /// Publishes create/change/destroy lines for every object whose fields
    /// differ from the last published ones. Returns the events sent.
    pub fn publish(&mut self, current: BTreeMap<ObjectKey, Map<String, Value>>) -> Vec<Event> {
        let mut sent = Vec::new();
        for (key, fields) in &current {
            let kind = match self.published.get(key) {
                None => EventKind::Create,
                Some(old) if old != fields => EventKind::Change,
                Some(_) => continue,
            };
            sent.push(Event::object(
                kind,
                key.0,
                &self.node,
                key.1.as_deref(),
                fields.clone(),
            ));
        }
        for (key, fields) in &self.published {
            if !current.contains_key(key) {
                sent.push(Event::object(
                    EventKind::Destroy,
                    key.0,
                    &self.node,
                    key.1.as_deref(),
                    fields.clone(),
                ));
            }
        }
        self.published = current;
        for event in &sent {
            // No subscriber is not an error.
            let _ = self.sender.send(event.clone());
        }
        sent
    }

    /// Publishes a `call` line (a command answered, refused or not).
    pub fn call(&self, fields: Map<String, Value>) {
        let event = Event::object(
            EventKind::Call,
            ObjectKind::Resource,
            &self.node,
            None,
            fields,
        );
        let _ = self.sender.send(event);
    }

    /// An `exists` line per object, then end-of-snapshot, and a receiver
    /// for everything after — taken together, so nothing falls between.
    pub fn snapshot(&self) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let mut lines: Vec<Event> = self
            .published
            .iter()
            .map(|(key, fields)| {
                Event::object(
                    EventKind::Exists,
                    key.0,
                    &self.node,
                    key.1.as_deref(),
                    fields.clone(),
                )
            })
            .collect();
        lines.push(Event::end_of_snapshot());
        (lines, self.sender.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => unreachable!(),
        }
    }

    #[test]
    fn only_changed_objects_are_published() {
        let mut tracker = ObjectTracker::new("alpha".into());
        let (_, mut rx) = tracker.snapshot();
        let mut state = BTreeMap::new();
        state.insert(
            (ObjectKind::Resource, None),
            fields(json!({"role": "Secondary"})),
        );
        assert_eq!(tracker.publish(state.clone())[0].kind, EventKind::Create);
        assert!(
            tracker.publish(state.clone()).is_empty(),
            "no change, no event"
        );
        state.insert(
            (ObjectKind::Resource, None),
            fields(json!({"role": "Primary"})),
        );
        let sent = tracker.publish(state);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].kind, EventKind::Change);
        assert_eq!(rx.try_recv().unwrap().kind, EventKind::Create);
        assert_eq!(rx.try_recv().unwrap().fields["role"], "Primary");
        let (snapshot, _) = tracker.snapshot();
        assert_eq!(snapshot.len(), 2);
        assert_eq!(snapshot[0].kind, EventKind::Exists);
        assert_eq!(snapshot[1].kind, EventKind::EndOfSnapshot);
    }

    #[test]
    fn json_and_text_forms() {
        let event = Event::object(
            EventKind::Change,
            ObjectKind::Connection,
            "alpha",
            Some("beta"),
            fields(json!({"connection": "Connected", "split_brain": false})),
        );
        let value = serde_json::to_value(&event).unwrap();
        assert_eq!(value["kind"], "change");
        assert_eq!(value["object"], "connection");
        assert_eq!(value["peer"], "beta");
        assert_eq!(value["connection"], "Connected");
        let text = event.to_text();
        assert!(
            text.contains("change connection node:alpha peer:beta"),
            "{text}"
        );
        assert!(
            text.contains("connection:Connected split-brain:false"),
            "{text}"
        );
        let end = serde_json::to_value(Event::end_of_snapshot()).unwrap();
        assert_eq!(end["kind"], "end-of-snapshot");
    }
}
