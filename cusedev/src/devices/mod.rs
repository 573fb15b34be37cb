//! Device models, one module per kernel driver, and [`DRIVER_TABLE`]: the one list of them.
//!
//! A row says everything the rest of cusedev needs to know about a device (see
//! [`crate::table`] for what each field means); the model behind it is its module here. To
//! add a device, follow docs/adding-a-device.md: a module here and a row below.
//!
//! Read next: [`fcopy`], the first row's model, and [`hv_util`], what the Hyper-V util
//! drivers share.

pub mod delayed_work;
pub mod fcopy;
pub mod hv_util;
pub mod hvutil_transport;
pub mod kvp;
pub mod lguest;
#[cfg(test)]
mod probe_tests;
pub mod vss;
pub mod xs_fastpath;

use vmbus::guid::Guid;

use crate::table::{BusClass, DriverRow, NO_SERVE_ARGS};

/// Every device cusedev can serve: the kernel's `util_id_table` and `misc_register()` calls.
pub static DRIVER_TABLE: &[DriverRow] = &[
    DriverRow {
        name: "fcopy",
        node: fcopy::DEVICE_NAME,
        about: "Hyper-V file copy (Copy-VMFile on the host), served to hv_fcopy_daemon",
        class: BusClass::Vmbus(Guid::FCOPY),
        ring_bytes: hv_util::UTIL_RING_BYTES,
        profiles: hv_util::KERNEL_PROFILES,
        serve_args: NO_SERVE_ARGS,
        probe: fcopy::probe,
    },
    DriverRow {
        name: "kvp",
        node: kvp::DEVICE_NAME,
        about:
            "Hyper-V key-value exchange (pools, guest info, IP injection), served to hv_kvp_daemon",
        class: BusClass::Vmbus(Guid::KVP),
        ring_bytes: hv_util::UTIL_RING_BYTES,
        profiles: hv_util::KERNEL_PROFILES,
        serve_args: NO_SERVE_ARGS,
        probe: kvp::probe,
    },
    DriverRow {
        name: "vss",
        node: vss::DEVICE_NAME,
        about: "Hyper-V volume snapshot (freeze/thaw for host backups), served to hv_vss_daemon",
        class: BusClass::Vmbus(Guid::VSS),
        ring_bytes: hv_util::UTIL_RING_BYTES,
        profiles: hv_util::KERNEL_PROFILES,
        serve_args: NO_SERVE_ARGS,
        probe: vss::probe,
    },
    DriverRow {
        name: "xs_fastpath",
        node: xs_fastpath::DEVICE_NAME,
        about: "Azure XStore fastpath (the 2021 patch's blob ioctl), answered by a fake XStore",
        class: BusClass::Vmbus(Guid::XS_FASTPATH),
        ring_bytes: vmbus::xs_fastpath::RING_BYTES,
        profiles: xs_fastpath::PROFILES,
        serve_args: NO_SERVE_ARGS,
        probe: xs_fastpath::probe,
    },
    DriverRow {
        name: "lguest",
        node: lguest::DEVICE_NAME,
        about: "the lguest launcher interface of Linux 3.x, with a scripted fake Guest",
        class: BusClass::LguestGuest,
        // The Guest's messages are small; a Launcher's notifications are one at a time.
        ring_bytes: 64 << 10,
        profiles: lguest::PROFILES,
        serve_args: lguest::serve_args,
        probe: lguest::probe,
    },
];
