//! Answers signed in batches: one Ed25519 signature over the Merkle root
//! of the answers made at the same time, each answer carrying its path.

use crate::app::AppState;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Open batches, one per worker thread (threads beyond this share them).
const SLOTS: usize = 16;

/// Signs resolve answers in batches, one signature (about 12 µs here) for
/// every answer a batch holds, through its Merkle root and each answer's
/// inclusion path (see [`sluice_protocol::ResponseSigner::sign_batch`]).
///
/// Each worker thread gathers the answers it makes into an open batch of its
/// own. The first answer of a batch leads it: it yields, so that the requests
/// ready on its thread run and add their answers, then closes the batch,
/// signs it and wakes the others, which wait on the same thread. Nothing
/// waits for a batch to fill (a lone answer is a batch of one), no task is
/// spawned, and no answer moves to another thread to be finished: the
/// signing task this replaced woke every answer of a batch onto its own
/// thread, away from its connection's data, which cost more than the
/// signature it saved.
#[derive(Default)]
pub struct AnswerSigner {
    open: [Mutex<Option<Arc<Batch>>>; SLOTS],
}

/// The answers of one batch and, once signed, their headers.
struct Batch {
    state: Mutex<BatchState>,
    signed: Notify,
}

#[derive(Default)]
struct BatchState {
    leaves: Vec<[u8; 32]>,
    /// No answer joins once its leader took the leaves.
    closed: bool,
    /// Each answer's `Sluice-Signature` header, taken by its request.
    headers: Vec<Option<String>>,
}

impl AnswerSigner {
    /// The `Sluice-Signature` header for `body`.
    pub async fn sign(&self, state: &AppState, body: &[u8]) -> Result<String> {
        let leaf = sluice_protocol::leaf_hash(body);
        let slot = thread_slot();
        let joined = {
            let mut open = self.open[slot].lock().expect("open batch lock");
            match open
                .as_ref()
                .and_then(|b| b.join(leaf).map(|i| (b.clone(), i)))
            {
                Some(joined) => Ok(joined),
                None => {
                    let batch = Arc::new(Batch {
                        state: Mutex::new(BatchState {
                            leaves: vec![leaf],
                            ..Default::default()
                        }),
                        signed: Notify::new(),
                    });
                    *open = Some(batch.clone());
                    Err(batch)
                }
            }
        };
        match joined {
            Ok((batch, index)) => batch.header(index).await,
            Err(batch) => {
                let mut lead = Lead {
                    state,
                    slot,
                    batch,
                    done: false,
                };
                // Let the requests ready on this thread add their answers.
                tokio::task::yield_now().await;
                lead.close_and_sign();
                lead.batch.header(0).await
            }
        }
    }
}

impl Batch {
    /// Adds a leaf to the batch while it is open; its index.
    fn join(&self, leaf: [u8; 32]) -> Option<usize> {
        let mut s = self.state.lock().expect("batch lock");
        (!s.closed).then(|| {
            s.leaves.push(leaf);
            s.leaves.len() - 1
        })
    }

    /// Waits for the batch's signature; the header of answer `index`.
    async fn header(&self, index: usize) -> Result<String> {
        let signed = self.signed.notified();
        tokio::pin!(signed);
        loop {
            // Registered before looking, so a signature made meanwhile wakes it.
            signed.as_mut().enable();
            {
                let mut s = self.state.lock().expect("batch lock");
                if !s.headers.is_empty() {
                    return s
                        .headers
                        .get_mut(index)
                        .and_then(Option::take)
                        .ok_or_else(|| {
                            Error::Internal(anyhow::anyhow!(
                                "answer {index} of a batch had no header"
                            ))
                        });
                }
            }
            signed.as_mut().await;
            signed.set(self.signed.notified());
        }
    }
}

/// The leader of a batch. If its request goes away before it signed (the
/// client left while it yielded), dropping it signs the batch, so the
/// answers that joined are never stranded.
struct Lead<'a> {
    state: &'a AppState,
    slot: usize,
    batch: Arc<Batch>,
    done: bool,
}

impl Lead<'_> {
    fn close_and_sign(&mut self) {
        self.done = true;
        {
            // New answers on this thread open the next batch.
            let mut open = self.state.answers.open[self.slot]
                .lock()
                .expect("open batch lock");
            if open.as_ref().is_some_and(|b| Arc::ptr_eq(b, &self.batch)) {
                *open = None;
            }
        }
        let leaves = {
            let mut s = self.batch.state.lock().expect("batch lock");
            s.closed = true;
            std::mem::take(&mut s.leaves)
        };
        let headers = self.state.keys.response_signer().sign_batch(&leaves);
        self.batch.state.lock().expect("batch lock").headers =
            headers.into_iter().map(Some).collect();
        self.batch.signed.notify_waiters();
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.close_and_sign();
        }
    }
}

/// This thread's slot among the open batches.
fn thread_slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SLOTS;
    }
    SLOT.with(|s| *s)
}
