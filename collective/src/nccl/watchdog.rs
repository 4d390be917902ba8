//! The deadline watchdog of [`Nccl`]: every collective, device or host, is queued through
//! [`Nccl::enqueue`], which waits (under the collective timeout) until NCCL has queued it and
//! records an event after it; waits poll that event and NCCL's asynchronous error until the
//! collective is done, an error shows, or the timeout passes. Any failure aborts the
//! communicator and poisons it.
//!
//! Buffers may belong to another stream than the communicator's (candle's, say). Each
//! collective is therefore ordered both ways with the streams of its buffers: the
//! communicator's stream waits for what was queued on them before the collective, and they
//! wait for the collective before what is queued on them after it. cudarc's own event tracking
//! would do this only for buffers of a context that tracks events, and only when the buffer's
//! next user goes through cudarc.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::CudaStream;
use cudarc::nccl::result::{NcclError, NcclStatus};
use cudarc::nccl::sys;
use tracing::warn;

use super::handle::Backoff;
use super::state::{Failure, InFlight, Nccl, cuda_message};
use crate::error::{Error, Result};
use crate::operation::Collective;
use crate::progress::Entered;

/// Collectives queued and not yet seen finished beyond which queueing another first waits for
/// the oldest: bounds the events kept when callers never synchronize.
const MAX_IN_FLIGHT: usize = 64;

impl Nccl {
    /// Waits until every collective queued so far has finished. Fails, aborting the
    /// communicator, when one takes longer than the collective timeout (counted from when this
    /// call starts waiting for it) or NCCL reports an error.
    pub fn synchronize(&mut self) -> Result<()> {
        if let Some(failure) = &self.failure {
            return Err(poisoned(failure, failure.collective));
        }
        self.wait_in_flight()
    }

    /// Fails with [`Error::Poisoned`] once an earlier failure aborted the communicator.
    pub(super) fn check_usable(&self, collective: Collective) -> Result<()> {
        match &self.failure {
            Some(failure) => Err(poisoned(failure, collective)),
            None => Ok(()),
        }
    }

    /// Makes the device's context current on this thread (NCCL and the driver act on it).
    pub(super) fn bind(&mut self, collective: Collective) -> Result<()> {
        let bound = self.stream.context().bind_to_thread();
        bound.map_err(|error| {
            let message = cuda_message("make the device current", &error);
            self.fail(collective, message)
        })
    }

    /// Calls `launch` with the communicator and the stream, waits (under the deadline) until
    /// NCCL has queued what it asked for, and records the collective as in flight.
    ///
    /// `buffer_streams` are the streams of the buffers the collective reads or writes (repeats
    /// and the communicator's own stream are skipped): the collective waits for the work queued
    /// on them so far, and work queued on them later waits for the collective.
    pub(super) fn enqueue(
        &mut self,
        collective: Collective,
        call: &str,
        bytes: usize,
        buffer_streams: &[Arc<CudaStream>],
        launch: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<NcclStatus, NcclError>,
    ) -> Result<()> {
        self.bind(collective)?;
        self.make_room(collective)?;
        let mut other_streams: Vec<&Arc<CudaStream>> = Vec::new();
        for stream in buffer_streams {
            let known =
                **stream == *self.stream || other_streams.iter().any(|known| known == &stream);
            if !known {
                other_streams.push(stream);
            }
        }
        for stream in &other_streams {
            if let Err(error) = self.stream.join(stream) {
                let message =
                    cuda_message("order the collective after its buffers' stream", &error);
                return Err(self.fail(collective, message));
            }
        }
        let entered = self.channel.enter(collective.name(), bytes, None);
        let deadline = Instant::now() + self.collective_timeout;
        let cu_stream = self.stream.cu_stream() as sys::cudaStream_t;
        let settled = match &self.comm {
            Some(comm) => comm.settle(call, launch(comm.as_ptr(), cu_stream), deadline),
            None => Err("the communicator was already aborted".to_owned()),
        };
        settled.map_err(|message| self.fail(collective, message))?;
        // Recorded only now that NCCL has queued the collective (a non-blocking communicator may
        // queue it from its own thread after the call returns): the event follows it.
        self.record_in_flight(collective, Some(entered))?;
        let ordered = match self.in_flight.back() {
            Some(queued) => other_streams
                .iter()
                .try_for_each(|stream| stream.wait(&queued.done)),
            None => Ok(()),
        };
        ordered.map_err(|error| {
            let message = cuda_message("order the buffers' stream after the collective", &error);
            self.fail(collective, message)
        })
    }

    /// Waits, under the collective timeout, for everything queued on the stream so far (a copy
    /// to the host, after `collective`), by recording an event and polling it like a
    /// collective's.
    pub(super) fn wait_for_stream(&mut self, collective: Collective) -> Result<()> {
        self.record_in_flight(collective, None)?;
        self.wait_in_flight()
    }

    /// Records an event after the collective just queued (`entered` in the progress record).
    fn record_in_flight(&mut self, collective: Collective, entered: Option<Entered>) -> Result<()> {
        let event = match self.spare_events.pop() {
            Some(event) => event,
            None => {
                let created = self.stream.context().new_event(None);
                created.map_err(|error| {
                    let message = cuda_message("create an event", &error);
                    self.fail(collective, message)
                })?
            }
        };
        if let Err(error) = event.record(&self.stream) {
            return Err(self.fail(collective, cuda_message("record an event", &error)));
        }
        self.in_flight.push_back(InFlight {
            collective,
            done: event,
            entered,
        });
        Ok(())
    }

    /// Forgets collectives already finished, and waits for the oldest when too many are queued.
    fn make_room(&mut self, collective: Collective) -> Result<()> {
        while let Some(oldest) = self.in_flight.front() {
            match oldest.done.try_is_complete() {
                Ok(true) => {
                    if let Some(finished) = self.in_flight.pop_front() {
                        self.retire(finished);
                    }
                }
                Ok(false) => break,
                Err(error) => {
                    let message = cuda_message("query an event", &error);
                    return Err(self.fail(collective, message));
                }
            }
        }
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            self.wait_oldest()?;
        }
        Ok(())
    }

    /// Forgets a collective seen finished: its event is kept for reuse, and it is recorded
    /// as completed.
    fn retire(&mut self, finished: InFlight) {
        self.spare_events.push(finished.done);
        if let Some(entered) = finished.entered {
            self.channel.finish(entered);
        }
    }

    /// Waits until every queued collective has finished.
    pub(super) fn wait_in_flight(&mut self) -> Result<()> {
        while !self.in_flight.is_empty() {
            self.wait_oldest()?;
        }
        Ok(())
    }

    /// The watchdog: polls the oldest queued collective's event, and NCCL's asynchronous error,
    /// until the event completes, an error shows, or the collective timeout passes.
    fn wait_oldest(&mut self) -> Result<()> {
        let Some(InFlight {
            collective,
            done,
            entered,
        }) = self.in_flight.pop_front()
        else {
            return Ok(());
        };
        self.bind(collective)?;
        let started = Instant::now();
        let mut backoff = Backoff::default();
        loop {
            match done.try_is_complete() {
                Ok(true) => {
                    self.retire(InFlight {
                        collective,
                        done,
                        entered,
                    });
                    return Ok(());
                }
                Ok(false) => {}
                Err(error) => {
                    let message = cuda_message("wait for the collective", &error);
                    return Err(self.fail(collective, message));
                }
            }
            let progress = match &self.comm {
                Some(comm) => comm.progress().map(drop),
                None => Err("the communicator was already aborted".to_owned()),
            };
            if let Err(message) = progress {
                return Err(self.fail(collective, message));
            }
            if started.elapsed() >= self.collective_timeout {
                let message = format!(
                    "did not complete within {:?} (a rank stopped, died, or called a different \
                     collective)",
                    self.collective_timeout
                );
                return Err(self.fail(collective, message));
            }
            backoff.pause();
        }
    }

    /// Aborts the communicator after a failure of `collective` and returns the error to report.
    /// Later calls fail with [`Error::Poisoned`].
    pub(super) fn fail(&mut self, collective: Collective, message: String) -> Error {
        let error = Error::Nccl {
            operation: collective.name(),
            message,
        };
        warn!(
            prefix = %self.prefix,
            rank = self.rank,
            %error,
            "aborting the nccl communicator"
        );
        if self.failure.is_none() {
            self.failure = Some(Failure {
                collective,
                message: error.to_string(),
            });
        }
        // Queued collectives will not be waited for; aborting stops them on the device.
        self.in_flight.clear();
        if let Some(comm) = self.comm.take() {
            comm.abort();
        }
        error
    }
}

/// Returns the error for a call on a communicator aborted by `failure`.
fn poisoned(failure: &Failure, collective: Collective) -> Error {
    Error::Poisoned {
        collective,
        first_failure: failure.message.clone(),
        failed_rank: None,
    }
}
