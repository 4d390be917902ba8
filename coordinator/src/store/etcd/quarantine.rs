//! Moving an unusable etcd record into quarantine (see [the store's module doc](super::super)):
//! one transaction writes its raw bytes and note into a free slot and deletes it, on condition
//! that it is still the record that was read; when another writer changed it meanwhile, its new
//! value is looked at again instead of being clobbered.

use etcd_client::{Compare, CompareOp, TxnOp, TxnOpResponse};

use super::super::{
    QuarantineNote, Quarantined, RecordKind, codec, log_quarantined, quarantine_slots,
};
use super::{EtcdStore, MAX_QUARANTINE_RETRIES};
use crate::error::Result;

/// What one attempt to move a record into quarantine found.
pub(super) enum MoveAttempt {
    /// The record moved.
    Moved,
    /// The quarantine slot holds an earlier record with the same key.
    SlotTaken,
    /// The record is no longer the one read: its current value and `mod_revision`, or `None`
    /// when it was deleted.
    Changed(Option<(Vec<u8>, i64)>),
}

/// How moving a record into quarantine ended.
pub(super) enum Settled<T> {
    /// It moved.
    Moved(Quarantined),
    /// Another writer replaced it with a record that decodes.
    Record(T),
    /// Another writer deleted it.
    Gone,
}

impl EtcdStore {
    /// Moves the record of `kind` named `name`, read as `current` (value and `mod_revision`),
    /// into quarantine for `reason`, trying the slots of [`quarantine_slots`] in order.
    ///
    /// When another writer changes the record meanwhile, the new value is looked at again: with
    /// `recheck`, one that decodes is returned as [`Settled::Record`] and one that does not is
    /// moved with its own reason; without, the new value is moved.
    pub(super) async fn quarantine<T: codec::Record>(
        &self,
        kind: RecordKind,
        name: &str,
        mut current: (Vec<u8>, i64),
        mut reason: String,
        recheck: bool,
    ) -> Result<Settled<T>> {
        let operation = format!("quarantining {} {name}", kind.name());
        let mut slots = quarantine_slots(name);
        let mut slot = slots.next();
        let mut changes = 0;
        while let Some(free) = &slot {
            let note = QuarantineNote::new(name, &reason);
            let (bytes, mod_revision) = &current;
            match self
                .try_move_aside(
                    kind,
                    name,
                    bytes,
                    *mod_revision,
                    free,
                    &codec::encode(&note)?,
                )
                .await?
            {
                MoveAttempt::Moved => {
                    let moved = note.into_quarantined(kind, free.clone());
                    log_quarantined(&moved);
                    return Ok(Settled::Moved(moved));
                }
                MoveAttempt::SlotTaken => slot = slots.next(),
                MoveAttempt::Changed(None) => return Ok(Settled::Gone),
                MoveAttempt::Changed(Some(value)) => {
                    changes += 1;
                    if changes > MAX_QUARANTINE_RETRIES {
                        return Err(self.etcd_error(
                            &operation,
                            format!(
                                "the record changed {MAX_QUARANTINE_RETRIES} times while being \
                                 moved"
                            ),
                        ));
                    }
                    if recheck {
                        match codec::decode::<T>(&value.0) {
                            Ok(record) => return Ok(Settled::Record(record)),
                            Err(error) => reason = error.to_string(),
                        }
                    }
                    current = value;
                }
            }
        }
        Err(self.etcd_error(&operation, "every quarantine slot for it is taken"))
    }

    /// Makes one attempt at moving the record of `kind` named `name` into quarantine slot
    /// `slot`: one transaction that writes `bytes` and `note` into the slot and deletes the
    /// record, if the record's `mod_revision` is still `mod_revision` and the slot is free.
    pub(super) async fn try_move_aside(
        &self,
        kind: RecordKind,
        name: &str,
        bytes: &[u8],
        mod_revision: i64,
        slot: &str,
        note: &[u8],
    ) -> Result<MoveAttempt> {
        let operation = format!("quarantining {} {name}", kind.name());
        let record_key = self.record_key(kind, name);
        let raw_key = format!(
            "{}/{}/{slot}",
            self.prefix,
            Self::quarantine_directory(kind)
        );
        let note_key = format!(
            "{}/{}/{slot}",
            self.prefix,
            Self::quarantine_notes_directory(kind)
        );
        let response = self
            .transact(
                &operation,
                [
                    Compare::mod_revision(record_key.clone(), CompareOp::Equal, mod_revision),
                    Compare::create_revision(raw_key.clone(), CompareOp::Equal, 0),
                    Compare::create_revision(note_key.clone(), CompareOp::Equal, 0),
                ],
                vec![
                    TxnOp::put(raw_key, bytes.to_vec(), None),
                    TxnOp::put(note_key, note.to_vec(), None),
                    TxnOp::delete(record_key.clone(), None),
                ],
                [TxnOp::get(record_key, None)],
            )
            .await?;
        if response.succeeded() {
            return Ok(MoveAttempt::Moved);
        }
        match response.op_responses().first() {
            Some(TxnOpResponse::Get(get)) => Ok(match get.kvs().first() {
                Some(pair) if pair.mod_revision() == mod_revision => MoveAttempt::SlotTaken,
                Some(pair) => {
                    MoveAttempt::Changed(Some((pair.value().to_vec(), pair.mod_revision())))
                }
                None => MoveAttempt::Changed(None),
            }),
            _ => Err(self.etcd_error(
                &operation,
                "transaction failed without returning the record",
            )),
        }
    }
}
