//! TEMPORARY stand-in for cohort-collective's API until that crate exports it.

use std::sync::{Arc, Barrier, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("shim: {0}")]
    Failed(String),
}

#[derive(Debug, Clone, Copy)]
pub enum ReduceOp {
    Sum,
    #[allow(dead_code)]
    Average,
}

pub enum BufferMut<'a> {
    F32(&'a mut [f32]),
}

impl<'a> From<&'a mut [f32]> for BufferMut<'a> {
    fn from(slice: &'a mut [f32]) -> Self {
        BufferMut::F32(slice)
    }
}

pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    fn all_reduce(&mut self, buffer: BufferMut<'_>, op: ReduceOp) -> Result<(), Error>;
    fn broadcast(&mut self, buffer: BufferMut<'_>, root: usize) -> Result<(), Error>;
}

/// Ranks as threads sharing memory.
#[allow(dead_code)]
pub struct ThreadGroup {
    rank: usize,
    world_size: usize,
    barrier: Arc<Barrier>,
    slots: Arc<Mutex<Vec<Vec<f32>>>>,
}

#[allow(dead_code)]
impl ThreadGroup {
    pub fn group(world_size: usize) -> Vec<ThreadGroup> {
        let barrier = Arc::new(Barrier::new(world_size));
        let slots = Arc::new(Mutex::new(vec![Vec::new(); world_size]));
        (0..world_size)
            .map(|rank| ThreadGroup {
                rank,
                world_size,
                barrier: barrier.clone(),
                slots: slots.clone(),
            })
            .collect()
    }
}

impl Communicator for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_reduce(&mut self, buffer: BufferMut<'_>, op: ReduceOp) -> Result<(), Error> {
        let BufferMut::F32(buffer) = buffer;
        self.slots.lock().unwrap()[self.rank] = buffer.to_vec();
        self.barrier.wait();
        {
            let slots = self.slots.lock().unwrap();
            for (i, value) in buffer.iter_mut().enumerate() {
                let mut sum = 0.0f32;
                for slot in slots.iter() {
                    sum += slot[i];
                }
                *value = match op {
                    ReduceOp::Sum => sum,
                    ReduceOp::Average => sum / self.world_size as f32,
                };
            }
        }
        self.barrier.wait();
        Ok(())
    }
    fn broadcast(&mut self, buffer: BufferMut<'_>, root: usize) -> Result<(), Error> {
        let BufferMut::F32(buffer) = buffer;
        if self.rank == root {
            self.slots.lock().unwrap()[root] = buffer.to_vec();
        }
        self.barrier.wait();
        if self.rank != root {
            buffer.copy_from_slice(&self.slots.lock().unwrap()[root]);
        }
        self.barrier.wait();
        Ok(())
    }
}
