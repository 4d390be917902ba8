//! The [`Collective`] names: which operation a rank is in, as error messages and message headers
//! name it. Errors, transports and the [`Communicator`](crate::Communicator) trait all use them,
//! so they live apart from each.

use std::fmt;

/// The collective operations, named as in error messages (`all_reduce: peer rank 2 ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Collective {
    /// [`Communicator::all_reduce`](crate::Communicator::all_reduce).
    AllReduce,
    /// [`Communicator::broadcast`](crate::Communicator::broadcast).
    Broadcast,
    /// [`Communicator::all_gather`](crate::Communicator::all_gather).
    AllGather,
    /// [`Communicator::reduce_scatter`](crate::Communicator::reduce_scatter).
    ReduceScatter,
    /// [`Communicator::barrier`](crate::Communicator::barrier).
    Barrier,
}

impl Collective {
    /// Returns the snake_case name (`all_reduce`).
    pub fn name(self) -> &'static str {
        match self {
            Collective::AllReduce => "all_reduce",
            Collective::Broadcast => "broadcast",
            Collective::AllGather => "all_gather",
            Collective::ReduceScatter => "reduce_scatter",
            Collective::Barrier => "barrier",
        }
    }

    /// Returns the code that identifies the collective in message headers.
    pub(crate) fn code(self) -> u8 {
        match self {
            Collective::AllReduce => 1,
            Collective::Broadcast => 2,
            Collective::AllGather => 3,
            Collective::ReduceScatter => 4,
            Collective::Barrier => 5,
        }
    }

    /// Decodes a header code.
    pub(crate) fn from_code(code: u8) -> Option<Collective> {
        Some(match code {
            1 => Collective::AllReduce,
            2 => Collective::Broadcast,
            3 => Collective::AllGather,
            4 => Collective::ReduceScatter,
            5 => Collective::Barrier,
            _ => return None,
        })
    }
}

impl fmt::Display for Collective {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collective_codes_round_trip() {
        for collective in [
            Collective::AllReduce,
            Collective::Broadcast,
            Collective::AllGather,
            Collective::ReduceScatter,
            Collective::Barrier,
        ] {
            assert_eq!(Collective::from_code(collective.code()), Some(collective));
        }
        assert_eq!(Collective::from_code(0), None);
    }
}
