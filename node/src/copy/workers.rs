//! Threads at the lowest scheduling priority for background copy work that arrives over
//! the network (a remote copier's tracks), so that storing it never delays host IO on
//! this node: a host request that wakes up preempts them at once.

use crate::{Error, Result};
use parking_lot::Mutex;
use std::sync::mpsc;
use std::sync::Arc;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of low-priority threads that run jobs in arrival order.
pub struct BackgroundWorkers {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl BackgroundWorkers {
    /// Starts `threads` threads named `name-N`; they end when the pool is dropped.
    pub fn start(name: &str, threads: usize) -> Result<BackgroundWorkers> {
        let (sender, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        for index in 0..threads {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    super::lower_thread_priority();
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = receiver.lock().recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(BackgroundWorkers {
            jobs: Mutex::new(sender),
        })
    }

    /// Runs `work` on one of the threads and waits for its result without blocking the
    /// async runtime.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = answer.send(work());
        });
        self.jobs.lock().send(job).map_err(|_| Error::Engine {
            detail: "the background copy threads have stopped".to_string(),
        })?;
        answered.await.map_err(|_| Error::Engine {
            detail: "a background copy job ended without an answer".to_string(),
        })?
    }
}
