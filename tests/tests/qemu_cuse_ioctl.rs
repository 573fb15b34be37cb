//! Unrestricted ioctl through a real kernel's CUSE (the host kernel here has none): a toy CUSE
//! device with a pointer-carrying ioctl (`cuse-ioctl-toy`), served by cusedev's CUSE frontend in
//! a QEMU guest and called through real ioctl(2) syscalls. Proves the FUSE_IOCTL_RETRY rounds
//! against fs/fuse/ioctl.c as Debian's 6.1 kernel has it, EFAULT for unmapped buffers included.

use std::time::Duration;

use cusedev_tests::harness::workspace_binary;
use cusedev_tests::qemu::{Guest, GuestConfig, GuestImage};

const SHORT: Duration = Duration::from_secs(60);

const CHECKS: [&str; 5] = [
    "pointer_carrying_ioctl_reads_and_writes_caller_memory",
    "unmapped_buffer_in_the_struct_is_efault",
    "null_argument_is_efault",
    "driver_errno_reaches_the_caller",
    "unknown_command_is_enotty",
];

#[test]
fn pointer_carrying_ioctl_reaches_caller_memory_through_cuse_retries() {
    let image = GuestImage::ensure().expect("guest image (tests/scripts/guest/build-guest.sh)");
    let mut guest =
        Guest::boot(&image, GuestConfig::named("qemu-cuse-ioctl")).expect("boot the guest");
    let toy = workspace_binary("cuse-ioctl-toy");
    let wait_log = workspace_binary("wait-log");
    guest
        .run_ok(
            &format!(
                "setsid {} serve >/tmp/toy.log 2>&1 </dev/null & {} /tmp/toy.log 'TOY ready' --timeout 60",
                toy.display(),
                wait_log.display()
            ),
            SHORT,
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", guest.console_tail(30)));
    let node = guest
        .run_ok("stat -c '%F %a' /dev/cusedev-ioctl-toy", SHORT)
        .expect("stat the toy node");
    assert_eq!(node.trim(), "character special file 600");

    let probed = guest
        .run(&format!("{} probe", toy.display()), SHORT)
        .expect("run the probe");
    for check in CHECKS {
        assert!(
            probed.output.contains(&format!("PROBE ok {check}\n")),
            "{check} did not pass:\n{}",
            probed.output
        );
    }
    assert_eq!(probed.status, 0, "{}", probed.output);
    guest.poweroff().expect("clean poweroff");
}
