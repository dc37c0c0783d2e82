//! Answers signed in batches: one Ed25519 signature over the Merkle root
//! of the answers made at the same time, each answer carrying its path.

use crate::app::AppState;
use crate::error::{Error, Result};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::oneshot;

/// Signs resolve answers in batches: an answer waits for the next batch,
/// which one signature covers through a Merkle root (see
/// [`sluice_protocol::ResponseSigner::sign_batch`]), each answer carrying its
/// inclusion path. Nothing waits for a batch to fill: a signing task takes
/// whatever answers are queued when it runs, and runs again while more come,
/// so a lone answer is signed at once and, under load, one Ed25519 signature
/// (about 11 µs here) serves every answer made meanwhile.
#[derive(Default)]
pub struct AnswerSigner {
    pub(crate) queue: Mutex<Vec<([u8; 32], oneshot::Sender<String>)>>,
    /// Whether a signing task runs (or is about to).
    pub(crate) running: AtomicBool,
}

impl AnswerSigner {
    /// The `Sluice-Signature` header for `body`.
    pub async fn sign(&self, state: &AppState, body: &[u8]) -> Result<String> {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut q = self.queue.lock().expect("answer queue lock");
            q.push((sluice_protocol::leaf_hash(body), tx));
            !self.running.swap(true, Ordering::AcqRel)
        };
        if lead {
            // A task of its own, so a client going away cannot strand the
            // answers of others.
            let state = state.clone();
            tokio::spawn(async move { state.answers.drain(&state).await });
        }
        rx.await
            .map_err(|_| Error::Internal(anyhow::anyhow!("the answer signer stopped")))
    }

    pub(crate) async fn drain(&self, state: &AppState) {
        loop {
            // Let the answers being made now (and those just signed) run
            // before the next batch is taken: on a busy worker that both
            // fills the batch and keeps this loop from holding the thread.
            tokio::task::yield_now().await;
            let batch = std::mem::take(&mut *self.queue.lock().expect("answer queue lock"));
            if batch.is_empty() {
                self.running.store(false, Ordering::Release);
                // An answer queued after the take but before the store found
                // `running` set and started no task: take it over, unless a
                // newer task already did.
                if self.queue.lock().expect("answer queue lock").is_empty()
                    || self.running.swap(true, Ordering::AcqRel)
                {
                    return;
                }
                continue;
            }
            let leaves: Vec<[u8; 32]> = batch.iter().map(|(leaf, _)| *leaf).collect();
            let headers = state.keys.response_signer().sign_batch(&leaves);
            for ((_, tx), header) in batch.into_iter().zip(headers) {
                // The request may have gone away meanwhile.
                let _ = tx.send(header);
            }
        }
    }
}
