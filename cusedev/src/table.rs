//! The driver table: which devices exist, what they bind to, how they are built.
//!
//! In the kernel a util driver is one row of `util_id_table` (drivers/hv/hv_util.c: the
//! service class GUID and the driver's init) plus a `misc_register()` with its node name. The
//! vmbus core matches every offer against those rows and calls the matching driver's probe;
//! nothing else in the kernel knows which drivers exist. Here [`DriverRow`] is such a row, and
//! the one table of them is [`crate::devices::DRIVER_TABLE`]. The bus client, the frontends
//! and the CLI read rows; none of them names a device.
//!
//! A row's profiles are the kernel versions (or patch versions) of that driver whose
//! user-visible behaviour differs: they belong to the device that has them. [`Drivers`] is
//! the table with one profile chosen per row, from `--kernel` and `--profile DEVICE=PROFILE`.
//!
//! Read next: [`crate::devices`] for the rows, then [`crate::bus::client`] for how an offer
//! finds its row and gets probed.

use std::fmt;
use std::sync::Arc;

use vmbus::guid::Guid;

use crate::bus::channel::{ChannelDriver, HostChannel};
use crate::device::Device;

/// What a driver binds to on the bus: `hv_vmbus_device_id` in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BusClass {
    /// A VMBus channel offered with this service class GUID (the offer's `if_type`).
    Vmbus(Guid),
    /// lguest's Guest: not a VMBus service at all (in Linux 3.x the Guest ran inside the
    /// host kernel). Its stand-in, the bus's fake Guest, is offered on the same bus under
    /// this project's own class GUID, [`Guid::LGUEST_GUEST`].
    LguestGuest,
}

impl BusClass {
    /// The class an offer with this `if_type` belongs to.
    pub fn of_offer(if_type: Guid) -> BusClass {
        if if_type == Guid::LGUEST_GUEST {
            BusClass::LguestGuest
        } else {
            BusClass::Vmbus(if_type)
        }
    }
}

impl fmt::Display for BusClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusClass::Vmbus(guid) => match guid.service_name() {
                Some(service) => write!(f, "VMBus {service} {{{guid}}}"),
                None => write!(f, "VMBus {{{guid}}}"),
            },
            BusClass::LguestGuest => write!(f, "the fake lguest Guest {{{}}}", Guid::LGUEST_GUEST),
        }
    }
}

/// One profile of a driver: a version whose user-visible behaviour differs from the others.
#[derive(Debug, PartialEq, Eq)]
pub struct Profile {
    /// What `--profile DEVICE=NAME` (and for util drivers `--kernel NAME`) says.
    pub name: &'static str,
    /// One line for `--help`: which version, and who needs it.
    pub about: &'static str,
}

/// The profiles of one row, and which one a user who chooses nothing gets.
#[derive(Debug, PartialEq, Eq)]
pub struct ProfileSet {
    /// At least one: every model reproduces some version, and says which.
    pub profiles: &'static [Profile],
    /// The name of the profile the packaged clients need.
    pub default: &'static str,
    /// Whether `--kernel` selects among these. True for the Hyper-V util drivers, whose
    /// profiles are kernel versions that come together in a real guest
    /// ([`crate::devices::hv_util::KERNEL_PROFILES`]).
    pub set_by_kernel_flag: bool,
}

impl ProfileSet {
    /// The profile called `name`.
    pub fn get(&self, name: &str) -> Option<&'static Profile> {
        self.profiles.iter().find(|p| p.name == name)
    }

    /// The default profile; `None` only if the row is wrong (a unit test rules that out).
    pub fn default_profile(&self) -> Option<&'static Profile> {
        self.get(self.default)
    }

    /// `linux-6.1 (default), linux-3.14`, for error messages.
    fn names(&self) -> String {
        self.profiles
            .iter()
            .map(|p| {
                if p.name == self.default {
                    format!("{} (default)", p.name)
                } else {
                    p.name.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A model bound to a channel: the char device the frontends serve and the driver the bus
/// calls, as one object (a kernel driver is both its `file_operations` and its channel
/// callback). Every type that is both is one.
pub trait ChannelDevice: Device + ChannelDriver {}

impl<T: Device + ChannelDriver + ?Sized> ChannelDevice for T {}

/// Why a probe refused a channel. The bus client logs it and leaves the offer alone.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The row handed its probe a profile the driver does not know: the row and the model
    /// disagree (a unit test per row rules that out).
    #[error("this driver has no profile `{profile}` (the driver table and the model disagree)")]
    UnknownProfile { profile: String },
    /// The driver cannot work on this channel, for its own reason.
    #[error("{0}")]
    Driver(Box<dyn std::error::Error + Send + Sync>),
    /// The system refused what the driver needs to exist, a thread for its timer: the
    /// kernel's `util_probe` fails the same way with -ENOMEM when its receive buffer cannot
    /// be allocated (drivers/hv/hv_util.c 6.1), and the channel stays without a driver.
    /// Nothing of the driver is left; a later offer may succeed.
    #[error("out of resources: {0}")]
    Resources(#[source] std::io::Error),
}

/// Builds the model for an offered channel (the driver's `probe`, run after the channel is
/// open). `profile` is always one of the row's own profiles; `options` are `cusedev serve`'s
/// parsed options, the row's own among them (those its [`DriverRow::serve_args`] added; in
/// matches built without them, `ArgMatches::default()`, a driver takes its defaults).
pub type ProbeFn = fn(
    channel: Arc<dyn HostChannel>,
    profile: &Profile,
    options: &clap::ArgMatches,
) -> Result<Arc<dyn ChannelDevice>, ProbeError>;

/// Adds a row's own options to `cusedev serve` (lguest's `--lguest-word`).
pub type ServeArgsFn = fn(clap::Command) -> clap::Command;

/// A row whose driver takes no options of its own.
pub const NO_SERVE_ARGS: ServeArgsFn = |serve| serve;

/// One device: `util_id_table` row + `misc_register()`.
#[derive(Debug)]
pub struct DriverRow {
    /// Short name for logs and `--profile` (`"fcopy"`, the service's name on the host side).
    pub name: &'static str,
    /// The misc device name, relative to /dev (`"vmbus/hv_fcopy"`, `"lguest"`). The model's
    /// [`Device::name`] must say the same; the bus client checks it.
    pub node: &'static str,
    /// One line for `--help`: what the device is for.
    pub about: &'static str,
    /// What it binds to.
    pub class: BusClass,
    /// Data bytes of the channel's inbound ring (what the kernel driver passes to
    /// `vmbus_open()`).
    pub ring_bytes: usize,
    pub profiles: ProfileSet,
    /// Its own `cusedev serve` options, read back by its probe; [`NO_SERVE_ARGS`] for none.
    pub serve_args: ServeArgsFn,
    pub probe: ProbeFn,
}

impl DriverRow {
    /// Whether `--profile` means this row by `device`: its short name or its node name.
    fn is_called(&self, device: &str) -> bool {
        device == self.name || device == self.node
    }
}

/// Why the profiles asked for on the command line cannot be had. Each message lists what
/// would be valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error(
        "`{arg}` is not DEVICE=PROFILE (e.g. `fcopy=linux-3.14`); devices and profiles: {known}"
    )]
    NotAPair { arg: String, known: String },
    #[error("no device `{device}` in the driver table; devices and profiles: {known}")]
    UnknownDevice { device: String, known: String },
    #[error("device `{device}` has no profile `{profile}`; its profiles: {known}")]
    UnknownProfile {
        device: String,
        profile: String,
        known: String,
    },
    #[error(
        "--kernel {kernel}: device `{device}` has no such profile (its profiles: {known}); \
         choose one for it with --profile {device}=PROFILE"
    )]
    KernelNotModelled {
        kernel: String,
        device: String,
        known: String,
    },
    #[error("--profile gives device `{device}` two profiles, `{first}` and `{second}`; give one")]
    Conflict {
        device: String,
        first: String,
        second: String,
    },
    #[error(
        "the driver table is wrong: device `{device}` has default profile `{default}`, which \
         is not one of its profiles"
    )]
    BadDefault { device: String, default: String },
}

/// `fcopy (/dev/vmbus/hv_fcopy): linux-6.1 (default), linux-3.14; ...`, for error messages.
fn known_devices(table: &[DriverRow]) -> String {
    table
        .iter()
        .map(|row| format!("{} (/dev/{}): {}", row.name, row.node, row.profiles.names()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// One `--profile DEVICE=PROFILE`, checked against a table.
#[derive(Debug, Clone, Copy)]
pub struct ProfileChoice {
    pub row: &'static DriverRow,
    pub profile: &'static Profile,
}

impl ProfileChoice {
    /// Parses `DEVICE=PROFILE`, DEVICE being a row's name or node name.
    pub fn parse(table: &'static [DriverRow], arg: &str) -> Result<ProfileChoice, ProfileError> {
        let Some((device, profile)) = arg.split_once('=') else {
            return Err(ProfileError::NotAPair {
                arg: arg.to_string(),
                known: known_devices(table),
            });
        };
        let row = table
            .iter()
            .find(|row| row.is_called(device))
            .ok_or_else(|| ProfileError::UnknownDevice {
                device: device.to_string(),
                known: known_devices(table),
            })?;
        let profile = row
            .profiles
            .get(profile)
            .ok_or_else(|| ProfileError::UnknownProfile {
                device: row.name.to_string(),
                profile: profile.to_string(),
                known: row.profiles.names(),
            })?;
        Ok(ProfileChoice { row, profile })
    }
}

/// The table with one profile chosen for every row: what the bus client binds with.
#[derive(Debug, Clone)]
pub struct Drivers {
    rows: Vec<(&'static DriverRow, &'static Profile)>,
    /// `cusedev serve`'s parsed options, for the probes.
    options: Arc<clap::ArgMatches>,
}

impl Drivers {
    /// Every row with its default profile.
    pub fn with_defaults(table: &'static [DriverRow]) -> Result<Drivers, ProfileError> {
        Drivers::configure(table, None, &[])
    }

    /// Every row's profile: `--profile` for the rows it names, else `kernel` (`--kernel`) for
    /// the rows whose profiles it selects, else the row's default.
    pub fn configure(
        table: &'static [DriverRow],
        kernel: Option<&str>,
        choices: &[ProfileChoice],
    ) -> Result<Drivers, ProfileError> {
        let mut rows = Vec::with_capacity(table.len());
        for row in table {
            let mut chosen: Option<&'static Profile> = None;
            for choice in choices.iter().filter(|c| std::ptr::eq(c.row, row)) {
                match chosen {
                    Some(first) if first != choice.profile => {
                        return Err(ProfileError::Conflict {
                            device: row.name.to_string(),
                            first: first.name.to_string(),
                            second: choice.profile.name.to_string(),
                        })
                    }
                    _ => chosen = Some(choice.profile),
                }
            }
            let profile = match (chosen, kernel) {
                (Some(profile), _) => profile,
                (None, Some(kernel)) if row.profiles.set_by_kernel_flag => row
                    .profiles
                    .get(kernel)
                    .ok_or_else(|| ProfileError::KernelNotModelled {
                        kernel: kernel.to_string(),
                        device: row.name.to_string(),
                        known: row.profiles.names(),
                    })?,
                (None, _) => {
                    row.profiles
                        .default_profile()
                        .ok_or_else(|| ProfileError::BadDefault {
                            device: row.name.to_string(),
                            default: row.profiles.default.to_string(),
                        })?
                }
            };
            rows.push((row, profile));
        }
        Ok(Drivers {
            rows,
            options: Arc::new(clap::ArgMatches::default()),
        })
    }

    /// The same rows, whose probes get `options` (`cusedev serve`'s parsed options).
    pub fn with_options(self, options: clap::ArgMatches) -> Drivers {
        Drivers {
            options: Arc::new(options),
            ..self
        }
    }

    /// What the probes get: `cusedev serve`'s options.
    pub fn options(&self) -> &clap::ArgMatches {
        &self.options
    }

    /// Adds every row's own options to `serve`.
    pub fn augment(table: &[DriverRow], serve: clap::Command) -> clap::Command {
        table
            .iter()
            .fold(serve, |serve, row| (row.serve_args)(serve))
    }

    /// The row that binds to `class`, with its chosen profile (`None`: no driver here).
    pub fn for_class(&self, class: BusClass) -> Option<(&'static DriverRow, &'static Profile)> {
        self.rows
            .iter()
            .copied()
            .find(|(row, _)| row.class == class)
    }

    /// Every row with its chosen profile, in table order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static DriverRow, &'static Profile)> + '_ {
        self.rows.iter().copied()
    }
}

/// The devices of `table` and their profiles, for `cusedev serve --help`.
pub fn describe(table: &[DriverRow]) -> String {
    let mut out = String::from(
        "Devices (the driver table) and their profiles, for --profile DEVICE=PROFILE:",
    );
    for row in table {
        let kernel = if row.profiles.set_by_kernel_flag {
            " (--kernel sets them too)"
        } else {
            ""
        };
        out.push_str(&format!(
            "\n  {}: /dev/{}, {}\n      binds to {}; profiles{kernel}:",
            row.name, row.node, row.about, row.class
        ));
        let width = row
            .profiles
            .profiles
            .iter()
            .map(|p| p.name.len())
            .max()
            .unwrap_or(0);
        for profile in row.profiles.profiles {
            let default = if profile.name == row.profiles.default {
                "(default) "
            } else {
                ""
            };
            out.push_str(&format!(
                "\n      {:width$}  {default}{}",
                profile.name, profile.about
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::hv_util::KERNEL_PROFILES;
    use crate::devices::DRIVER_TABLE;

    fn refuse(
        _: Arc<dyn HostChannel>,
        _: &Profile,
        _: &clap::ArgMatches,
    ) -> Result<Arc<dyn ChannelDevice>, ProbeError> {
        Err(ProbeError::Driver("no".into()))
    }

    /// A util row and a row with profiles of its own (as xs_fastpath will have), neither of
    /// which binds to a real channel here.
    static TWO_ROWS: &[DriverRow] = &[
        DriverRow {
            name: "util",
            node: "vmbus/hv_util_test",
            about: "a util driver",
            class: BusClass::Vmbus(Guid::KVP),
            ring_bytes: 8192,
            profiles: KERNEL_PROFILES,
            serve_args: NO_SERVE_ARGS,
            probe: refuse,
        },
        DriverRow {
            name: "fast",
            node: "fast_test",
            about: "a driver with its own profiles",
            class: BusClass::Vmbus(Guid::XS_FASTPATH),
            ring_bytes: 131072,
            profiles: ProfileSet {
                profiles: &[
                    Profile {
                        name: "posted",
                        about: "as posted",
                    },
                    Profile {
                        name: "reviewed",
                        about: "with the review's fixes",
                    },
                ],
                default: "posted",
                set_by_kernel_flag: false,
            },
            serve_args: NO_SERVE_ARGS,
            probe: refuse,
        },
    ];

    fn chosen(drivers: &Drivers, name: &str) -> &'static str {
        drivers
            .iter()
            .find(|(row, _)| row.name == name)
            .map(|(_, p)| p.name)
            .unwrap()
    }

    #[test]
    fn every_row_has_unique_names_nodes_and_classes() {
        let mut seen = std::collections::HashSet::new();
        for row in DRIVER_TABLE {
            // A name and a node both select a row in --profile, so neither may repeat either.
            assert!(seen.insert(row.name), "{} twice", row.name);
            if row.node != row.name {
                assert!(seen.insert(row.node), "{} twice", row.node);
            }
        }
        let classes: std::collections::HashSet<_> = DRIVER_TABLE.iter().map(|r| r.class).collect();
        assert_eq!(classes.len(), DRIVER_TABLE.len(), "two rows bind one class");
    }

    #[test]
    fn every_row_has_profiles_with_unique_names_and_a_listed_default() {
        for row in DRIVER_TABLE {
            let set = &row.profiles;
            assert!(!set.profiles.is_empty(), "{} has no profile", row.name);
            let mut names: Vec<_> = set.profiles.iter().map(|p| p.name).collect();
            names.sort();
            names.dedup();
            assert_eq!(
                names.len(),
                set.profiles.len(),
                "{}: a profile twice",
                row.name
            );
            assert!(
                set.default_profile().is_some(),
                "{}: default unlisted",
                row.name
            );
            assert!(row.ring_bytes > 0, "{}: no ring", row.name);
        }
    }

    /// What both frontends check a device name with (`crate::fuse::name`): a node in a
    /// directory (`vmbus/hv_fcopy`) or right in /dev (`lguest`), never climbing out of /dev.
    fn frontends_accept(node: &str) -> bool {
        crate::fuse::name::parse_node_name(node).is_ok()
    }

    #[test]
    fn every_row_has_a_node_name_the_frontends_accept() {
        for row in DRIVER_TABLE.iter().chain(TWO_ROWS) {
            assert!(frontends_accept(row.node), "{}", row.node);
        }
    }

    #[test]
    fn frontends_accept_top_level_and_nested_nodes_but_nothing_outside_dev() {
        for good in ["lguest", "azure_xs_fastpath", "vmbus/hv_fcopy", "a/b/c"] {
            assert!(frontends_accept(good), "{good}");
        }
        for bad in [
            "",
            "/lguest",
            "/dev/lguest",
            "..",
            "../lguest",
            "vmbus/..",
            "vmbus//x",
        ] {
            assert!(!frontends_accept(bad), "{bad:?}");
        }
    }

    #[test]
    fn defaults_are_each_rows_default() {
        let drivers = Drivers::with_defaults(TWO_ROWS).unwrap();
        assert_eq!(chosen(&drivers, "util"), "linux-6.1");
        assert_eq!(chosen(&drivers, "fast"), "posted");
    }

    #[test]
    fn kernel_flag_sets_only_the_rows_whose_profiles_are_kernel_versions() {
        let drivers = Drivers::configure(TWO_ROWS, Some("linux-3.14"), &[]).unwrap();
        assert_eq!(chosen(&drivers, "util"), "linux-3.14");
        assert_eq!(chosen(&drivers, "fast"), "posted");
    }

    #[test]
    fn profile_choice_overrides_the_kernel_flag_and_the_default() {
        let choices = [
            ProfileChoice::parse(TWO_ROWS, "util=linux-6.1").unwrap(),
            // By node name, too.
            ProfileChoice::parse(TWO_ROWS, "fast_test=reviewed").unwrap(),
        ];
        let drivers = Drivers::configure(TWO_ROWS, Some("linux-3.14"), &choices).unwrap();
        assert_eq!(chosen(&drivers, "util"), "linux-6.1");
        assert_eq!(chosen(&drivers, "fast"), "reviewed");
    }

    #[test]
    fn unknown_profile_device_is_rejected_listing_the_devices() {
        let err = ProfileChoice::parse(TWO_ROWS, "lguest=reviewed").unwrap_err();
        assert!(matches!(err, ProfileError::UnknownDevice { .. }));
        let message = err.to_string();
        assert!(message.contains("no device `lguest`"), "{message}");
        assert!(
            message.contains("util (/dev/vmbus/hv_util_test): linux-6.1 (default), linux-3.14"),
            "{message}"
        );
        assert!(
            message.contains("fast (/dev/fast_test): posted (default), reviewed"),
            "{message}"
        );
    }

    #[test]
    fn unknown_profile_name_is_rejected_listing_the_devices_profiles() {
        let err = ProfileChoice::parse(TWO_ROWS, "fast=linux-6.1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "device `fast` has no profile `linux-6.1`; its profiles: posted (default), reviewed"
        );
    }

    #[test]
    fn profile_argument_without_equals_is_rejected() {
        let err = ProfileChoice::parse(TWO_ROWS, "fast").unwrap_err();
        assert!(matches!(err, ProfileError::NotAPair { .. }), "{err}");
        assert!(err.to_string().contains("DEVICE=PROFILE"));
    }

    #[test]
    fn two_profiles_for_one_device_are_rejected() {
        let choices = [
            ProfileChoice::parse(TWO_ROWS, "fast=posted").unwrap(),
            ProfileChoice::parse(TWO_ROWS, "fast=reviewed").unwrap(),
        ];
        let err = Drivers::configure(TWO_ROWS, None, &choices).unwrap_err();
        assert!(matches!(err, ProfileError::Conflict { .. }), "{err}");
        // The same choice twice is no conflict.
        let same = [choices[0], choices[0]];
        assert!(Drivers::configure(TWO_ROWS, None, &same).is_ok());
    }

    #[test]
    fn kernel_a_util_row_does_not_model_is_rejected_with_the_way_out() {
        let err = Drivers::configure(TWO_ROWS, Some("linux-5.10"), &[]).unwrap_err();
        assert!(err.to_string().contains("--profile util=PROFILE"), "{err}");
        // Naming a profile for that row is the way out.
        let choice = [ProfileChoice::parse(TWO_ROWS, "util=linux-6.1").unwrap()];
        assert!(Drivers::configure(TWO_ROWS, Some("linux-5.10"), &choice).is_ok());
    }

    #[test]
    fn for_class_finds_the_row_or_none() {
        let drivers = Drivers::with_defaults(TWO_ROWS).unwrap();
        let (row, _) = drivers
            .for_class(BusClass::Vmbus(Guid::XS_FASTPATH))
            .unwrap();
        assert_eq!(row.name, "fast");
        assert!(drivers
            .for_class(BusClass::Vmbus(Guid::HEARTBEAT))
            .is_none());
    }

    #[test]
    fn help_lists_every_device_and_profile_of_the_table() {
        let help = describe(TWO_ROWS);
        assert!(
            help.contains("util: /dev/vmbus/hv_util_test, a util driver\n"),
            "{help}"
        );
        assert!(help.contains("binds to VMBus kvp {"), "{help}");
        assert!(help.contains("posted    (default) as posted"), "{help}");
        assert!(help.contains("reviewed  with the review's fixes"), "{help}");
        assert_eq!(
            help.matches("(--kernel sets them too)").count(),
            1,
            "{help}"
        );
    }
}
