//! The fault matrix of issue #11: each row a fault through real processes and real syscalls.

mod cusedev_killed;
