//! [`Nccl`] in a build without the `cuda` feature: the same types and constructors, which fail
//! with [`Error::NotCompiledWithCuda`], so that callers compile the same either way (as candle's
//! `dummy_cuda_backend`). No value of these types can exist, so their methods are never reached.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use super::NcclConfig;
use crate::buffer::{BufferMut, BufferRef, ReduceOp};
use crate::communicator::Communicator;
use crate::error::{Error, Result};
use crate::rendezvous::Store;

/// Stands in for cudarc's `CudaStream`, which this build does not link; it has no values.
#[derive(Debug)]
pub enum CudaStream {}

/// The NCCL communicator, unavailable in this build: [`Nccl::connect`] returns
/// [`Error::NotCompiledWithCuda`]. Like the real one, it is neither `Send` nor `Sync`.
#[derive(Debug)]
pub struct Nccl {
    /// No value exists.
    never: Infallible,
    /// Keeps the type bound to its thread, as with the `cuda` feature.
    _thread_bound: PhantomData<*const ()>,
}

impl Nccl {
    /// Checks `config`, then fails: this build has no CUDA support.
    pub fn connect(_store: &dyn Store, config: &NcclConfig) -> Result<Nccl> {
        config.validate()?;
        Err(Error::NotCompiledWithCuda)
    }

    /// Cannot be called: no [`CudaStream`] exists in this build.
    pub fn connect_on_stream(
        _store: &dyn Store,
        _config: &NcclConfig,
        stream: Arc<CudaStream>,
    ) -> Result<Nccl> {
        match *stream {}
    }

    /// Returns the key prefix the communicator was formed under.
    pub fn prefix(&self) -> &str {
        match self.never {}
    }

    /// Returns the ordinal of this rank's CUDA device.
    pub fn device(&self) -> usize {
        match self.never {}
    }

    /// Returns the longest one collective may take once waited for.
    pub fn collective_timeout(&self) -> Duration {
        match self.never {}
    }

    /// Waits until every collective queued so far has finished.
    pub fn synchronize(&mut self) -> Result<()> {
        match self.never {}
    }

    /// Ends the communicator gracefully at the end of a job.
    pub fn close(self) -> Result<()> {
        match self.never {}
    }
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        match self.never {}
    }

    fn world_size(&self) -> usize {
        match self.never {}
    }

    fn all_reduce(&mut self, _buffer: BufferMut<'_>, _op: ReduceOp) -> Result<()> {
        match self.never {}
    }

    fn broadcast(&mut self, _buffer: BufferMut<'_>, _root: usize) -> Result<()> {
        match self.never {}
    }

    fn all_gather(&mut self, _input: BufferRef<'_>, _output: BufferMut<'_>) -> Result<()> {
        match self.never {}
    }

    fn reduce_scatter(
        &mut self,
        _input: BufferRef<'_>,
        _output: BufferMut<'_>,
        _op: ReduceOp,
    ) -> Result<()> {
        match self.never {}
    }

    fn barrier(&mut self) -> Result<()> {
        match self.never {}
    }
}
