//! Running one epoch: worker threads claim batches within a bounded window ahead of the
//! consumer, which takes them back in plan order.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::loader::{Built, ImageBatch, Shared};
use crate::error::{DataError, Result};

/// Progress shared by the consumer and the workers.
#[derive(Debug, Default)]
struct Progress {
    /// Next batch a worker may claim.
    next_claim: usize,
    /// Batches the consumer has taken.
    consumed: usize,
}

#[derive(Debug, Default)]
struct Control {
    progress: Mutex<Progress>,
    wake: Condvar,
    stop: AtomicBool,
}

impl Control {
    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shut_down(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let _guard = self.lock();
        self.wake.notify_all();
    }
}

fn worker(
    shared: Arc<Shared>,
    control: Arc<Control>,
    plan: Arc<Vec<Vec<usize>>>,
    epoch: u64,
    tx: Sender<(usize, Built)>,
) {
    let window = shared.options.prefetch;
    loop {
        let job = {
            let mut p = control.lock();
            loop {
                if control.stop.load(Ordering::Relaxed) || p.next_claim >= plan.len() {
                    return;
                }
                if p.next_claim < p.consumed + window {
                    break;
                }
                p = control.wake.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            p.next_claim += 1;
            p.next_claim - 1
        };
        let built = catch_unwind(AssertUnwindSafe(|| {
            shared.build(epoch, &plan[job], Some(&control.stop))
        }))
        .unwrap_or_else(|_| {
            Err(DataError::Loader {
                reason: format!("a worker panicked while building batch {job}"),
            })
        });
        if tx.send((job, built)).is_err() {
            return;
        }
    }
}

/// One epoch's batches, in plan order, as `Result<ImageBatch>`.
///
/// Workers build at most `prefetch` batches beyond the last one taken. Batches whose images
/// were all skipped are not yielded. After an error the iteration ends. Dropping the iterator
/// stops the workers (each finishes at most the image it is on) and joins them.
#[derive(Debug)]
pub struct EpochIter {
    control: Arc<Control>,
    rx: Option<Receiver<(usize, Built)>>,
    workers: Vec<JoinHandle<()>>,
    pending: BTreeMap<usize, Built>,
    next: usize,
    total: usize,
    skipped: usize,
    bad_images: Vec<String>,
}

impl EpochIter {
    pub(super) fn start(shared: Arc<Shared>, epoch: u64, plan: Vec<Vec<usize>>) -> Self {
        let total = plan.len();
        let plan = Arc::new(plan);
        let control = Arc::new(Control::default());
        let (tx, rx) = channel();
        let workers = (0..shared.options.workers.min(total))
            .map(|_| {
                let (shared, control, plan, tx) =
                    (shared.clone(), control.clone(), plan.clone(), tx.clone());
                std::thread::spawn(move || worker(shared, control, plan, epoch, tx))
            })
            .collect();
        Self {
            control,
            rx: Some(rx),
            workers,
            pending: BTreeMap::new(),
            next: 0,
            total,
            skipped: 0,
            bad_images: Vec::new(),
        }
    }

    /// Images skipped so far this epoch (all of the epoch's once the iterator is exhausted).
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// Why each skipped image was skipped (file and decoder reason), in batch order.
    pub fn bad_images(&self) -> &[String] {
        &self.bad_images
    }

    /// Number of planned batches, including those already taken.
    pub fn num_batches(&self) -> usize {
        self.total
    }

    fn finish(&mut self) {
        self.control.shut_down();
        self.rx = None;
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }

    fn receive(&mut self, job: usize) -> Built {
        loop {
            if let Some(built) = self.pending.remove(&job) {
                return built;
            }
            let Some(rx) = &self.rx else {
                return Err(DataError::Loader {
                    reason: "the epoch was stopped".into(),
                });
            };
            match rx.recv() {
                Ok((j, built)) => {
                    self.pending.insert(j, built);
                }
                Err(_) => {
                    return Err(DataError::Loader {
                        reason: format!("workers stopped before batch {job}"),
                    })
                }
            }
        }
    }
}

impl Iterator for EpochIter {
    type Item = Result<ImageBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.next < self.total {
            let job = self.next;
            let built = self.receive(job);
            self.next += 1;
            {
                let mut p = self.control.lock();
                p.consumed = self.next;
                self.control.wake.notify_all();
            }
            match built {
                Ok((batch, reasons)) => {
                    self.skipped += batch.skipped;
                    self.bad_images.extend(reasons);
                    if batch.batch_size > 0 {
                        return Some(Ok(batch));
                    }
                }
                Err(e) => {
                    self.total = self.next;
                    self.finish();
                    return Some(Err(e));
                }
            }
        }
        self.finish();
        None
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.finish();
    }
}
