//! What a node offers the scheduler, behind [`DeviceInventory`] so that the worker's logic does
//! not depend on the hardware: CPU slots always, GPUs when a GPU inventory is plugged in.

use cohort_proto::v1::{Device, DeviceKind};

/// Lists the devices a node offers.
pub trait DeviceInventory: Send + Sync {
    /// Returns every device this node offers, each kind indexed from 0.
    fn devices(&self) -> Vec<Device>;
}

/// A fixed number of CPU slots.
#[derive(Debug, Clone, Copy)]
pub struct CpuSlots {
    /// How many ranks of one CPU slot each may run at once.
    pub slots: u32,
}

impl DeviceInventory for CpuSlots {
    fn devices(&self) -> Vec<Device> {
        (0..self.slots)
            .map(|index| Device {
                kind: DeviceKind::Cpu as i32,
                index,
                name: "cpu slot".to_owned(),
                ..Device::default()
            })
            .collect()
    }
}

/// Several inventories offered together (CPU slots and GPUs).
pub struct Combined(pub Vec<Box<dyn DeviceInventory>>);

impl DeviceInventory for Combined {
    fn devices(&self) -> Vec<Device> {
        self.0
            .iter()
            .flat_map(|inventory| inventory.devices())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_slots_are_indexed_from_zero() {
        let devices = CpuSlots { slots: 3 }.devices();
        let indices: Vec<_> = devices.iter().map(|d| d.index).collect();
        assert_eq!(indices, [0, 1, 2]);
        assert!(devices.iter().all(|d| d.kind == DeviceKind::Cpu as i32));
    }
}
